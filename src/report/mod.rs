//! Failure capture: one JSON report per failed step and node under
//! `<report dir>/<job id>/`, one metrics line per finished task, and a
//! syslog line per failure.
//!
//! Here: the report and how a person reads it (`render`). Next to it:
//! the analysis that fills its issues and recommendations (`analyze.rs`),
//! the report a node assembles when a step fails there (`assemble.rs`),
//! the merged view of a step across nodes (`timeline.rs`), the root-owned
//! report directory (`files.rs`) and the metrics log and syslog
//! (`metrics.rs`).
//!
//! Every job string that reaches the metrics log, syslog or a report's free
//! text goes through [`crate::jobtext`]; a metrics line is capped at
//! [`METRICS_LINE_CAP`] bytes.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::jobtext;
use crate::probe::{CommandProbe, MasterProbe};

mod analyze;
mod assemble;
mod files;
mod metrics;
mod timeline;

pub use assemble::StepFacts;
pub use files::{prune, read_job, OWNER_FILE, STALE_PREFIX};
pub use metrics::{append_line, metrics_line, syslog, METRICS_LINE_CAP};
pub use timeline::{
    fmt_ms, how, render_timeline, timeline, RankView, Timeline, Verdict, HANG_AFTER_MS,
    STOPPED_AFTER_MS,
};

/// How one task ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOutcome {
    pub rank: u32,
    pub local_id: u32,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// When slurmstepd forked the task and when it ended (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_unix_ms: Option<u64>,
    /// When the task last wrote to stderr (with `failure.capture_stderr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_stderr_unix_ms: Option<u64>,
    /// The last lines the task wrote to stderr (failed tasks, with
    /// `failure.capture_stderr`), escaped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stderr_tail: Vec<String>,
    /// TorchElastic's structured error, where the task wrote one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_error: Option<crate::capture::TorchError>,
}

impl TaskOutcome {
    /// From a wait(2) status as `S_TASK_EXIT_STATUS` gives it.
    pub fn from_wait_status(rank: u32, local_id: u32, status: i32) -> TaskOutcome {
        let (exit_code, signal) = if libc::WIFSIGNALED(status) {
            (None, Some(libc::WTERMSIG(status)))
        } else {
            (Some(libc::WEXITSTATUS(status)), None)
        };
        TaskOutcome {
            rank,
            local_id,
            exit_code,
            signal,
            started_unix_ms: None,
            ended_unix_ms: None,
            last_stderr_unix_ms: None,
            stderr_tail: Vec::new(),
            torch_error: None,
        }
    }

    pub fn failed(&self) -> bool {
        self.signal.is_some() || self.exit_code.is_some_and(|c| c != 0)
    }

    /// When the task failed, as near as the plugin can tell: its last
    /// stderr output when that came within [`LAST_WORDS_MS`] of its end (a
    /// traceback or error message is written just before a program exits,
    /// while the runtime's teardown after the payload takes a varying
    /// while, so end times alone misorder ranks that fail within it), else
    /// its end.
    pub fn failed_at_ms(&self) -> Option<u64> {
        match (self.ended_unix_ms, self.last_stderr_unix_ms) {
            (Some(e), Some(l)) if l <= e && e - l <= LAST_WORDS_MS => Some(l),
            (e, _) => e,
        }
    }

    pub fn describe(&self) -> String {
        match (self.exit_code, self.signal) {
            (_, Some(s)) => format!("killed by signal {s} ({})", signal_name(s)),
            (Some(c), None) => format!("exit code {c}"),
            (None, None) => "unknown".to_string(),
        }
    }
}

/// Whether a task ended by a signal Slurm sends every task of a step it
/// stops (scancel, time limit, srun's Ctrl-C, --kill-on-bad-exit): such a
/// task did not fail on its own. (An OOM kill is also a SIGKILL: see
/// [`Report::oom_killed`].)
pub fn stopped_by_slurm(t: &TaskOutcome) -> bool {
    t.signal
        .is_some_and(|s| [libc::SIGTERM, libc::SIGKILL, libc::SIGINT, libc::SIGHUP].contains(&s))
}

pub use crate::launch::signal_name;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub reference: String,
    pub name: Option<String>,
    pub tag: Option<String>,
    pub path: PathBuf,
    pub sha256: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub memory_total_kb: Option<u64>,
    pub memory_available_kb: Option<u64>,
    /// OOM kills on this node while the step ran (/proc/vmstat oom_kill).
    pub oom_kills_during_step: Option<u64>,
    /// The step's own memory cgroup on this node, where Slurm's task/cgroup
    /// made one, and the OOM kills in it: exact, unlike the node's count.
    /// (Absent from reports written before these fields existed.)
    #[serde(default)]
    pub step_memory_cgroup: Option<PathBuf>,
    #[serde(default)]
    pub oom_kills_in_step_cgroup: Option<u64>,
    /// Of those, the kills in each local task's own cgroup (`task_N`), by
    /// local task id: which ranks the OOM killer hit.
    #[serde(default)]
    pub oom_kills_by_local_task: BTreeMap<u32, u64>,
    pub listening_ports: Vec<u16>,
    pub gpus: CommandProbe,
    pub master: Option<MasterProbe>,
}

/// The report of one failed step on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub version: u32,
    pub job_id: u32,
    pub step_id: u32,
    pub node: String,
    pub uid: u32,
    pub user: Option<String>,
    pub image: ImageInfo,
    pub runtime_command: Vec<String>,
    /// The distributed environment of this node's tasks (RANK and
    /// LOCAL_RANK are per task, see `tasks`).
    pub environment: BTreeMap<String, String>,
    pub tasks: Vec<TaskOutcome>,
    pub step_started_unix_ms: u128,
    pub last_task_ended_unix_ms: u128,
    pub node_state: NodeState,
    pub issues_found: Vec<String>,
    pub recommendations: Vec<String>,
}

/// What the analysis knows besides the report.
#[derive(Clone, Debug, Default)]
pub struct Context {
    pub runtime_is_apptainer: bool,
    pub dist_enabled: bool,
    pub dist_error: Option<String>,
    pub gpus_requested: bool,
    pub image_readable_by_others: bool,
    pub missing_bind_sources: Vec<PathBuf>,
}

/// See [`TaskOutcome::failed_at_ms`].
pub const LAST_WORDS_MS: u64 = 2_000;

/// How the master probe's issue starts.
const MASTER_ISSUE: &str = "MASTER_ADDR:MASTER_PORT ";

/// How the master probe's recommendation starts.
const MASTER_POINTER: &str = "'ml-container diagnose ";

/// A report for a person. Every string is escaped: a report's fields can
/// hold job strings (paths, names), and a file the job's user owns may
/// have been edited; nothing in it may move an admin's cursor.
pub fn render(r: &Report) -> String {
    render_in_job(r, None)
}

/// [`render`] within `diagnose`'s merged view: where that view already
/// names the first rank to fail (`first`: its rank and when it failed),
/// the master probe's pointer to it is left out, and a probe made after
/// that failure is not an issue of its own: the master may have ended
/// because of it.
pub fn render_in_job(r: &Report, first: Option<(u32, Option<u64>)>) -> String {
    let first_known = first.is_some();
    let probe_after_first = match (first, r.node_state.master.as_ref()) {
        (Some((_, Some(f))), Some(m)) => m.at_unix_ms.is_none_or(|at| at >= f),
        (Some((_, None)), Some(_)) => true,
        _ => false,
    };
    let f = |s: &str| jobtext::field(s);
    let mut s = String::new();
    s.push_str(&format!(
        "job {} step {} on {} (uid {}{}): image {} ({})\n",
        r.job_id,
        r.step_id,
        f(&r.node),
        r.uid,
        r.user
            .as_ref()
            .map(|u| format!(" {}", f(u)))
            .unwrap_or_default(),
        f(&r.image.reference),
        f(&r.image.path.to_string_lossy())
    ));
    for t in &r.tasks {
        let times = match (t.started_unix_ms, t.ended_unix_ms) {
            (Some(a), Some(b)) => format!(", ran {}", fmt_ms(b.saturating_sub(a))),
            _ => String::new(),
        };
        s.push_str(&format!(
            "  rank {:>4} (local {}): {}{times}\n",
            t.rank,
            t.local_id,
            how(t, r.oom_killed(t))
        ));
        if let Some(e) = &t.torch_error {
            s.push_str(&format!("    error (TorchElastic): {}\n", f(&e.message)));
        }
        if let Some(last) = t.stderr_tail.iter().rev().find(|l| !l.trim().is_empty()) {
            s.push_str(&format!(
                "    stderr, last line of {}: {}\n",
                t.stderr_tail.len(),
                f(last)
            ));
        }
    }
    if let Some(m) = &r.node_state.master {
        s.push_str(&format!(
            "  master {}:{} {}{}\n",
            f(&m.addr),
            m.port,
            if m.reachable {
                "answered"
            } else {
                "did not answer"
            },
            match first {
                Some((rank, _)) if probe_after_first && !m.reachable => format!(
                    " (probed after rank {rank} had failed: the master may have ended because \
                     of it)"
                ),
                _ => String::new(),
            }
        ));
    }
    if let Some(n) = r.node_state.oom_kills_during_step {
        s.push_str(&format!("  OOM kills on the node during the step: {n}\n"));
    }
    if let (Some(n), Some(cg)) = (
        r.node_state.oom_kills_in_step_cgroup,
        &r.node_state.step_memory_cgroup,
    ) {
        s.push_str(&format!(
            "  OOM kills in the step's memory cgroup {}: {n}\n",
            f(&cg.to_string_lossy())
        ));
    }
    for i in &r.issues_found {
        if probe_after_first && i.starts_with(MASTER_ISSUE) {
            continue;
        }
        s.push_str(&format!("  issue: {}\n", f(i)));
    }
    for i in &r.recommendations {
        if first_known && i.starts_with(MASTER_POINTER) {
            continue;
        }
        s.push_str(&format!("  fix:   {}\n", f(i)));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report of job 5 step 0 on n2 with `tasks`, for the tests here.
    pub(super) fn report(tasks: Vec<TaskOutcome>) -> Report {
        Report {
            version: 1,
            job_id: 5,
            step_id: 0,
            node: "n2".into(),
            uid: 1500,
            user: Some("u".into()),
            image: ImageInfo {
                reference: "pytorch".into(),
                path: "/opt/containers/p.sif".into(),
                ..ImageInfo::default()
            },
            runtime_command: vec!["apptainer".into(), "exec".into()],
            environment: [
                ("MASTER_ADDR", "n1"),
                ("MASTER_PORT", "29500"),
                ("WORLD_SIZE", "4"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            tasks,
            step_started_unix_ms: 0,
            last_task_ended_unix_ms: 1,
            node_state: NodeState {
                memory_total_kb: None,
                memory_available_kb: None,
                oom_kills_during_step: Some(0),
                step_memory_cgroup: None,
                oom_kills_in_step_cgroup: None,
                oom_kills_by_local_task: BTreeMap::new(),
                listening_ports: vec![],
                gpus: CommandProbe::Absent,
                master: None,
            },
            issues_found: vec![],
            recommendations: vec![],
        }
    }

    #[test]
    fn wait_status_decoding() {
        let exited = TaskOutcome::from_wait_status(1, 0, 7 << 8);
        assert_eq!((exited.exit_code, exited.signal), (Some(7), None));
        assert!(exited.failed());
        let killed = TaskOutcome::from_wait_status(1, 0, libc::SIGKILL);
        assert_eq!((killed.exit_code, killed.signal), (None, Some(9)));
        assert!(!TaskOutcome::from_wait_status(0, 0, 0).failed());
    }

    /// A task that started at 1 s and ended at `at` ms.
    pub(super) fn ended(rank: u32, local: u32, status: i32, at: u64) -> TaskOutcome {
        let mut t = TaskOutcome::from_wait_status(rank, local, status);
        t.started_unix_ms = Some(1_000);
        t.ended_unix_ms = Some(at);
        t
    }

    #[test]
    fn rendering_escapes_what_a_report_holds() {
        let mut r = report(vec![TaskOutcome::from_wait_status(1, 0, 7 << 8)]);
        r.image.reference = "x\n  issue: forged\u{1b}[2J".into();
        r.issues_found.push("line\nbreak".into());
        let text = render(&r);
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(!text.contains("\n  issue: forged"), "{text}");
        assert!(text.contains("issue: line\\nbreak\n"), "{text}");
    }

    #[test]
    fn json_round_trip() {
        let r = report(vec![TaskOutcome::from_wait_status(1, 0, 7 << 8)]);
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&text).unwrap(), r);
    }
}
