//! The node's exit side, in slurmstepd (root) after each local task of a
//! containerized step ends: a metrics line per task, the master probe at
//! the node's first failure, and, once the node's last task is done, the
//! Prometheus sample and (when a task failed) the failure report.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use crate::capture;
use crate::config::SiteConfig;
use crate::distenv;
use crate::options::Mount;
use crate::probe::{self, MasterProbe};
use crate::prom;
use crate::report::{self, Report, StepFacts, TaskOutcome};

use super::{fault_injection, hostname, now_ms, state, Host, PluginError, State};

/// `slurm_spank_task_exit`, in slurmstepd (root) after each local task of a
/// containerized step ends: a metrics line per task; when the node's last
/// task is done and one failed, the report (and a syslog line per failure).
/// Reporting problems are logged, never turned into a step failure.
pub fn task_exit(host: &mut dyn Host) -> Result<(), PluginError> {
    fault_injection(host, "task_exit");
    let mut guard = state();
    // Disjoint borrows of the fields: nothing is cloned per task.
    let State {
        config,
        options,
        plan,
        started_ms,
        oom_at_start,
        outcomes,
        step_dir,
        task_starts,
        master_probe,
        prepare_ms,
        ..
    } = &mut *guard;
    let (Some(Ok(config)), Some((pin, plan))) = (config.as_ref(), plan.as_ref()) else {
        return Ok(());
    };
    let Some(status) = host.task_exit_status() else {
        return Ok(());
    };
    let mut outcome = TaskOutcome::from_wait_status(
        host.task_global_id().unwrap_or(u32::MAX),
        host.task_local_id().unwrap_or(u32::MAX),
        status,
    );
    let ended = now_ms();
    outcome.ended_unix_ms = u64::try_from(ended).ok();
    outcome.started_unix_ms = task_starts
        .iter()
        .find(|(r, _)| *r == outcome.rank)
        .map(|(_, t)| *t);
    let job = host.job_id().unwrap_or(0);
    let step = host.step_id().unwrap_or(0);
    let node = hostname();
    let line = report::metrics_line(
        job,
        step,
        &node,
        &pin.display_name(),
        &outcome,
        ended.saturating_sub(*started_ms),
    );
    if let Err(e) = report::append_line(config.failure.metrics_log.as_path(), &line) {
        log::warn!(
            "cannot append to {}: {e}",
            config.failure.metrics_log.as_path().display()
        );
    }
    if outcome.failed() && config.failure.syslog {
        report::syslog(&format!(
            "job {job} step {step} node {node} rank {} {} (image {})",
            outcome.rank,
            outcome.describe(),
            pin.display_name()
        ));
    }
    if outcome.failed() {
        if let Some(d) = step_dir.as_ref() {
            let cap = usize::try_from(config.failure.capture_stderr).unwrap_or(0);
            if cap > 0 {
                if let Some(f) = d.read(&capture::stderr_name(outcome.rank), cap) {
                    outcome.stderr_tail = capture::tail_lines(&f.bytes, capture::TAIL_LINES);
                    outcome.last_stderr_unix_ms = f.modified_unix_ms;
                }
            }
            outcome.torch_error = d
                .read(
                    &capture::torch_error_name(outcome.rank),
                    capture::TORCH_ERROR_CAP,
                )
                .and_then(|f| capture::parse_torch_error(&f.bytes));
        }
    }
    let local_tasks = host.local_task_count();
    let still_running = local_tasks.map_or(0, |n| (n as usize).saturating_sub(outcomes.len() + 1));
    // The master probe where it can tell something: at this node's first
    // failure of its own (not a stop by Slurm), while other tasks of the
    // step still run here. Never after every local rank has exited.
    let options_dist = options.dist.unwrap_or(config.distributed.enabled);
    if outcome.failed()
        && !report::stopped_by_slurm(&outcome)
        && master_probe.is_none()
        && !outcomes.iter().any(TaskOutcome::failed)
        && still_running > 0
        && options_dist
    {
        *master_probe = probe_own_master(host, config).map(|mut m| {
            m.when = Some(format!(
                "when rank {} failed, with {still_running} other task(s) of the step still \
                 running on {node}",
                outcome.rank
            ));
            m.at_unix_ms = u64::try_from(now_ms()).ok();
            m
        });
    }
    outcomes.push(outcome);
    let all_done = local_tasks.is_none_or(|n| outcomes.len() >= n as usize);
    if !all_done {
        return Ok(());
    }
    if let Some(dir) = config.failure.prometheus_dir.as_path() {
        let step_ms = u64::try_from(now_ms().saturating_sub(*started_ms)).unwrap_or(u64::MAX);
        let oom = probe::step_oom_kills(job, step)
            .map(|(_, o)| o.total)
            .or_else(|| match (*oom_at_start, probe::oom_kills()) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                _ => None,
            })
            .unwrap_or(0);
        let sample = prom::StepSample {
            image: prom::image_label(pin),
            tasks: outcomes.iter().map(prom::exit_class).collect(),
            oom_kills: oom,
            step_ms,
            prepare_ms: *prepare_ms,
        };
        if let Err(e) = prom::record(dir, &sample) {
            log::warn!("Prometheus metrics not updated: {e}");
        }
    }
    if outcomes.iter().any(TaskOutcome::failed) {
        let get = |k: &str| host.getenv(k);
        let rep = Report::assemble(StepFacts {
            job_id: host.job_id().unwrap_or(0),
            step_id: host.step_id().unwrap_or(0),
            node: hostname(),
            uid: host.job_ids().map_or(u32::MAX, |(uid, _)| uid),
            getenv: &get,
            config,
            pin,
            plan,
            outcomes,
            started_ms: *started_ms,
            oom_at_start: *oom_at_start,
            dist: options_dist,
            master: master_probe.clone(),
            missing_bind_sources: missing_as_user(host, &plan.binds),
        });
        match host.job_ids() {
            None => log::error!("no job uid/gid from Slurm: not writing the failure report"),
            Some((uid, gid)) => match rep.write(config.failure.report_dir.as_path(), uid, gid) {
                Ok(path) => log::info!("failure report: {}", path.display()),
                Err(e) => log::error!(
                    "cannot write the failure report under {}: {e}",
                    config.failure.report_dir.as_path().display()
                ),
            },
        }
    }
    if let Some(d) = step_dir.take() {
        // Before the directory goes: the shared container's records are
        // in it (src/share.rs).
        let gid = host.job_ids().map_or(d.uid, |(_, g)| g);
        if let Some((level, line)) = crate::share::finish(
            &d,
            &plan.runtime,
            &crate::share::instance_name(job, step),
            gid,
        ) {
            log::log!(level, "{line}");
        }
        d.remove();
    }
    Ok(())
}

/// The plugin's own MASTER_ADDR:MASTER_PORT, from Slurm's step facts and the
/// site config, probed within `failure.probe_timeout`. Never the values in
/// the job's environment: root does not connect where a variable the user
/// controls points.
fn probe_own_master(host: &dyn Host, config: &SiteConfig) -> Option<MasterProbe> {
    let timeout = std::time::Duration::from_secs(u64::from(config.failure.probe_timeout));
    let mut by_name = config.clone();
    by_name.distributed.addr = crate::config::AddrKind::Hostname;
    let get = |k: &str| host.getenv(k);
    let vars = distenv::facts_for(&get, None)
        .and_then(|f| distenv::contract(&by_name, &f))
        .ok()?;
    let val = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let port = val("MASTER_PORT")?.parse().ok()?;
    Some(probe::probe_master(&val("MASTER_ADDR")?, port, timeout))
}

/// Bind sources the job's user cannot see, asked as the user: root's own
/// answer would tell the user whether a path they cannot see exists. When
/// the check cannot run as the user, nothing is reported.
fn missing_as_user(host: &dyn Host, binds: &[Mount]) -> Vec<PathBuf> {
    let sources: Vec<PathBuf> = binds.iter().map(|b| b.src.clone()).collect();
    let mut missing = Vec::new();
    let asked = host.as_job_user(&mut || {
        missing = sources.iter().filter(|p| !p.exists()).cloned().collect();
    });
    match asked {
        Ok(()) => missing,
        Err(e) => {
            log::warn!("cannot check bind sources as the job's user: {e}");
            Vec::new()
        }
    }
}
