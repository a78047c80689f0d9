//! The report a node assembles when a task of a step failed there: the
//! plugin hands over what it knows of the step ([`StepFacts`]); the node's
//! state (memory, OOM kills, listening ports, GPUs) is probed here, then
//! the report is analyzed.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::{Context, ImageInfo, NodeState, Report, TaskOutcome};
use crate::config::{AddrKind, RuntimeKind, SiteConfig};
use crate::distenv;
use crate::launch::{self, Plan};
use crate::probe::{self, MasterProbe};
use crate::registry::Pin;

/// What the plugin knows of a step on this node when its last task ended.
pub struct StepFacts<'a> {
    pub job_id: u32,
    pub step_id: u32,
    pub node: String,
    /// The job's uid (`u32::MAX` when Slurm did not say).
    pub uid: u32,
    /// A variable of the job's environment.
    pub getenv: &'a dyn Fn(&str) -> Option<String>,
    pub config: &'a SiteConfig,
    pub pin: &'a Pin,
    pub plan: &'a Plan,
    pub outcomes: &'a [TaskOutcome],
    /// When the step started (unix ms) and the node's OOM-kill counter then.
    pub started_ms: u128,
    pub oom_at_start: Option<u64>,
    /// Whether the distributed environment was on for the step.
    pub dist: bool,
    /// The master probe made at the node's first failure, if any.
    pub master: Option<MasterProbe>,
    /// Bind sources the job's user cannot see (asked as the user).
    pub missing_bind_sources: Vec<PathBuf>,
}

impl std::fmt::Debug for StepFacts<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepFacts")
            .field("job_id", &self.job_id)
            .field("step_id", &self.step_id)
            .field("node", &self.node)
            .field("uid", &self.uid)
            .field("pin", &self.pin)
            .field("outcomes", &self.outcomes)
            .finish_non_exhaustive()
    }
}

impl Report {
    /// The analyzed report of a step that failed on this node.
    pub fn assemble(facts: StepFacts) -> Report {
        let StepFacts {
            job_id,
            step_id,
            node,
            uid,
            getenv: get,
            config,
            pin,
            plan,
            outcomes,
            started_ms,
            oom_at_start,
            dist,
            master,
            missing_bind_sources,
        } = facts;
        let timeout = Duration::from_secs(u64::from(config.failure.probe_timeout));
        // The node's share of the contract: values the user set win, RANK and
        // LOCAL_RANK are per task (see `tasks`).
        // The contract with MASTER_ADDR as the host name (Slurm's step node
        // list, which slurmstepd sets over the user's environment): with
        // `distributed.addr = "ip"` the contract would resolve it here, without
        // a deadline; the probe resolves it within probe_timeout instead.
        let mut by_name = config.clone();
        by_name.distributed.addr = AddrKind::Hostname;
        let (contract, dist_error): (BTreeMap<String, String>, _) = if dist {
            match distenv::facts_for(get, None).and_then(|f| distenv::contract(&by_name, &f)) {
                Ok(vars) => (
                    vars.into_iter()
                        .filter(|(k, _)| k != "RANK" && k != "LOCAL_RANK" && k != "NODE_RANK")
                        .collect(),
                    None,
                ),
                Err(e) => (Default::default(), Some(e.to_string())),
            }
        } else {
            (Default::default(), None)
        };
        // What the tasks had: a value the user set wins (it is what they ran
        // with), escaped and capped like every job string in a report.
        let environment: BTreeMap<String, String> = contract
            .iter()
            .map(|(k, v)| {
                let v = get(k).map_or_else(|| v.clone(), |u| crate::jobtext::field(&u));
                (k.clone(), v)
            })
            .collect();
        // Read at the end only: the step's cgroup is made for the step, so its
        // counter started at zero (and slurmstepd may join it after spank_init).
        let step_oom = probe::step_oom_kills(job_id, step_id);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let (memory_total_kb, memory_available_kb) = probe::memory_kb(&meminfo);
        let mut rep = Report {
            version: 1,
            job_id,
            step_id,
            node,
            uid,
            user: nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|u| u.name),
            image: ImageInfo {
                reference: pin.reference.clone(),
                name: pin.name.clone(),
                tag: pin.tag.clone(),
                path: pin.path.clone(),
                sha256: pin.sha256.clone(),
            },
            runtime_command: plan.prefix(),
            environment,
            tasks: outcomes.to_vec(),
            step_started_unix_ms: started_ms,
            last_task_ended_unix_ms: now_ms(),
            node_state: NodeState {
                memory_total_kb,
                memory_available_kb,
                oom_kills_during_step: match (oom_at_start, probe::oom_kills()) {
                    (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                    _ => None,
                },
                step_memory_cgroup: step_oom.as_ref().map(|(cg, _)| cg.dir.clone()),
                oom_kills_in_step_cgroup: step_oom.as_ref().map(|(_, o)| o.total),
                oom_kills_by_local_task: step_oom.map(|(_, o)| o.by_local_task).unwrap_or_default(),
                listening_ports: probe::read_listening_ports(),
                gpus: probe::gpus(timeout),
                master,
            },
            issues_found: Vec::new(),
            recommendations: Vec::new(),
        };
        let ctx = Context {
            runtime_is_apptainer: matches!(
                plan.kind,
                RuntimeKind::Apptainer | RuntimeKind::Singularity
            ),
            dist_enabled: dist,
            dist_error,
            gpus_requested: launch::gpus_requested(get),
            // From the fstat of the fd that was verified: no path lookup as root.
            image_readable_by_others: pin.mode.is_some_and(|m| m & 0o004 != 0),
            missing_bind_sources,
        };
        rep.analyze(&ctx);
        rep
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}
