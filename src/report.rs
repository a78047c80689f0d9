//! Failure capture (SPEC "Failure capture", seed 002 §5.5.3-5.5.4): one JSON
//! report per failed step and node under `<report dir>/<job id>/`, one
//! metrics line per finished task, and a syslog line per failure.
//!
//! Reports are written by root in slurmstepd and readable by the job's user
//! and root only (issue 10, L2): the report file is owned by the job's uid
//! (group root, mode 0400) in a job directory owned by root with the job's
//! group (mode 0750: the user can list and read, a group-mate sees names
//! only, nobody but root can add, rename or remove). The job directory is
//! opened with O_DIRECTORY|O_NOFOLLOW and its owner and mode are set on that
//! fd (I2); files are created in it with O_EXCL|O_NOFOLLOW, checked to be
//! that directory's entries, and renamed into place by the directory's fd,
//! so a symlink planted at any of these names is never followed. Each job
//! directory records its user (`.owner`, root's, 0600): a directory whose
//! record names another user, or that has none, is left from an older job
//! with the same id (MaxJobId wrap, lost state) and is moved aside to
//! `.stale-<job>-<time>-<pid>` rather than inherited (I1). `ml-container
//! prune` (and the package's tmpfiles.d rule) expires old directories.
//!
//! Every job string that reaches the metrics log, syslog or a report's free
//! text goes through [`crate::jobtext`]; a metrics line is capped at
//! [`METRICS_LINE_CAP`] bytes.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{renameat, renameat2, AtFlags, RenameFlags};
use nix::sys::stat::{fstatat, mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

use serde::{Deserialize, Serialize};

use crate::jobtext;
use crate::probe::{CommandProbe, MasterProbe};

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

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        _ => "signal",
    }
}

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

impl Report {
    /// Fills `issues_found` and `recommendations` from the outcome and the
    /// node state: the checks seed 002 §5.5.4 asks for.
    pub fn analyze(&mut self, ctx: &Context) {
        let hang = self.hang_note();
        let mut issue = |i: String, r: String| {
            if !self.issues_found.contains(&i) {
                self.issues_found.push(i);
            }
            if !self.recommendations.contains(&r) {
                self.recommendations.push(r);
            }
        };
        // The step's memory cgroup counts only this step's OOM kills: a
        // SIGKILL with one there is the OOM killer's, without one it came
        // from outside. Without such a cgroup the node's counter is all
        // there is, and another job's kill counts too: a SIGKILL during one
        // is then most likely, not surely, this step's.
        let ns = &self.node_state;
        let step_oom = ns
            .oom_kills_in_step_cgroup
            .filter(|n| *n > 0)
            .zip(ns.step_memory_cgroup.as_ref())
            .map(|(n, cg)| (n, cg.display().to_string()));
        let oom = match ns.oom_kills_in_step_cgroup {
            Some(_) => None,
            None => ns.oom_kills_during_step.filter(|n| *n > 0),
        };
        let more_memory = "request more memory (--mem / --mem-per-gpu) or reduce the batch size";
        for t in self.tasks.iter().filter(|t| t.failed()) {
            match (t.exit_code, t.signal) {
                (_, Some(sig)) if (sig == libc::SIGKILL || sig == libc::SIGTERM) && step_oom.is_some() => {
                    let (n, cgroup) = step_oom.clone().unwrap_or_default();
                    // The OOM killer sends SIGKILL. A rank whose own task
                    // cgroup saw no kill (or any SIGTERM) was stopped after
                    // another process of the step was killed: Slurm ends
                    // the step (srun -K / --kill-on-bad-exit, an OOM-ed
                    // step's teardown).
                    let own = ns.oom_kills_by_local_task.get(&t.local_id);
                    let text = if sig == libc::SIGKILL && own != Some(&0) {
                        format!(
                            "rank {} was killed by the kernel's OOM killer: the step ran out of \
                             memory ({n} kill(s) in its memory cgroup {cgroup})",
                            t.rank
                        )
                    } else {
                        format!(
                            "rank {} was stopped by {} after the step ran out of memory \
                             ({n} OOM kill(s) in its memory cgroup {cgroup}, none in this rank's)",
                            t.rank,
                            signal_name(sig)
                        )
                    };
                    issue(text, more_memory.into())
                }
                (_, Some(libc::SIGKILL)) if oom.is_some() => issue(
                    format!(
                        "rank {} was killed by SIGKILL while the kernel's OOM killer ran on this node \
                         ({} kill(s) during the step): most likely out of memory, else scancel, a \
                         time limit or preemption",
                        t.rank,
                        oom.unwrap_or_default()
                    ),
                    more_memory.into(),
                ),
                (_, Some(s)) if s == libc::SIGTERM || s == libc::SIGKILL => issue(
                    format!("rank {} was stopped by {} from outside (scancel, time limit or preemption)", t.rank, signal_name(s)),
                    format!("check 'sacct -j {} -o State,Elapsed,Timelimit' for CANCELLED or TIMEOUT; raise --time or checkpoint more often", self.job_id),
                ),
                (_, Some(s)) => issue(
                    format!("rank {} crashed with {}", t.rank, signal_name(s)),
                    "look at the task's stderr for a stack trace; run the step with fewer ranks to reproduce".into(),
                ),
                (Some(255), None) if ctx.runtime_is_apptainer => {
                    let mut why = Vec::new();
                    if !ctx.image_readable_by_others {
                        why.push(format!("image {} is not world-readable", jobtext::field(&self.image.path.to_string_lossy())));
                    }
                    for b in &ctx.missing_bind_sources {
                        why.push(format!("bind source {} is missing", jobtext::field(&b.to_string_lossy())));
                    }
                    let found = if why.is_empty() {
                        "image and bind sources look fine, so most likely the command was not found in the image or the payload itself exited 255".to_string()
                    } else {
                        why.join("; ")
                    };
                    issue(
                        format!("rank {} exited 255, Apptainer's own failure code: {found}", t.rank),
                        format!(
                            "run 'apptainer exec {} <command>' by hand on {} to see Apptainer's message",
                            jobtext::field(&self.image.path.to_string_lossy()),
                            self.node
                        ),
                    );
                }
                (Some(c), None) => issue(
                    format!("rank {} exited with code {c}", t.rank),
                    "the payload failed: read its stderr (srun -l prefixes lines with the rank)".into(),
                ),
                (None, None) => {}
            }
        }
        if let Some(h) = hang {
            issue(
                h,
                "a rank blocked in a collective after another stopped making progress holds \
                 the whole allocation: set a collective timeout (init_process_group(timeout=...), \
                 NCCL_ASYNC_ERROR_HANDLING / TORCH_NCCL_ASYNC_ERROR_HANDLING) and look at the \
                 ranks that ended first"
                    .into(),
            );
        }
        // The master rank failed here before the probe ran: that it did not
        // answer says nothing more.
        let master_gone = self.node_state.master.as_ref().is_some_and(|m| {
            m.at_unix_ms.is_some_and(|at| {
                self.tasks
                    .iter()
                    .any(|t| t.rank == 0 && t.failed() && t.failed_at_ms().is_some_and(|f| f <= at))
            })
        });
        if let Some(m) = self.node_state.master.as_ref().filter(|_| !master_gone) {
            if !m.reachable {
                issue(
                    format!(
                        "{MASTER_ISSUE}({}:{}) did not answer from {}{}",
                        jobtext::field(&m.addr),
                        m.port,
                        self.node,
                        m.when
                            .as_ref()
                            .map(|w| format!(" {}", jobtext::field(w)))
                            .unwrap_or_default()
                    ),
                    format!(
                        "{MASTER_POINTER}{}' names the first rank to fail: start there (when it \
                         is not rank 0, the master may have ended because of it)",
                        self.job_id
                    ),
                );
            }
        }
        if ctx.dist_enabled {
            if let Some(e) = &ctx.dist_error {
                issue(
                    format!(
                        "the distributed environment could not be set: {}",
                        jobtext::field(e)
                    ),
                    "run 'ml-container env' in the job to see what is missing".into(),
                );
            }
            for var in ["MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE"] {
                if !self.environment.contains_key(var) {
                    issue(
                        format!("{var} was not set for the tasks"),
                        "use --ml-container-dist=on and run under srun".into(),
                    );
                }
            }
        }
        if ctx.gpus_requested
            && !matches!(&self.node_state.gpus, CommandProbe::Ok(s) if !s.is_empty())
        {
            issue(
                "the step requested GPUs but nvidia-smi shows none on this node".into(),
                "check the node's GPU driver ('nvidia-smi' on the node) and the gres.conf".into(),
            );
        }
    }

    /// Whether the OOM killer hit this task: its own task cgroup counted a
    /// kill, or (without per-task cgroups) it died of SIGKILL while the
    /// step's cgroup, else the node, counted one.
    pub fn oom_killed(&self, t: &TaskOutcome) -> bool {
        let ns = &self.node_state;
        if t.signal != Some(libc::SIGKILL) {
            return false;
        }
        match (
            ns.oom_kills_by_local_task.get(&t.local_id),
            ns.oom_kills_in_step_cgroup,
        ) {
            (Some(n), _) => *n > 0,
            (None, Some(n)) => n > 0,
            (None, None) => ns.oom_kills_during_step.is_some_and(|n| n > 0),
        }
    }

    /// This node's tasks stopped by Slurm while others had already ended
    /// on their own: which ranks were still alive, and for how long after
    /// the last exit (a hung collective looks like this).
    fn hang_note(&self) -> Option<String> {
        let stopped: Vec<&TaskOutcome> = self
            .tasks
            .iter()
            .filter(|t| stopped_by_slurm(t) && !self.oom_killed(t))
            .collect();
        let stop_at = stopped.iter().filter_map(|t| t.ended_unix_ms).min()?;
        let own = |t: &&TaskOutcome| !stopped_by_slurm(t) || self.oom_killed(t);
        let ranks = stopped
            .iter()
            .map(|t| t.rank.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let last = self
            .tasks
            .iter()
            .filter(own)
            .filter_map(|t| t.ended_unix_ms.map(|e| (e, t)))
            .filter(|(e, _)| *e <= stop_at)
            .max_by_key(|(e, _)| *e);
        if let Some((e, t)) = last {
            // Stopped right after a rank failed: that failure explains it.
            if t.failed() && stop_at.saturating_sub(e) < HANG_AFTER_MS {
                return None;
            }
        }
        Some(match last {
            Some((e, t)) => format!(
                "rank(s) {ranks} were still running when Slurm stopped the step, {} after the \
                 last task exit on {} (rank {}, {})",
                fmt_ms(stop_at.saturating_sub(e)),
                self.node,
                t.rank,
                t.describe()
            ),
            None => format!(
                "rank(s) {ranks} were still running when Slurm stopped the step; no task of the \
                 step had ended on {} before",
                self.node
            ),
        })
    }

    /// `<dir>/<job id>/<step id>.<node>.json`
    pub fn path_in(&self, dir: &Path) -> PathBuf {
        dir.join(self.job_id.to_string())
            .join(format!("{}.{}.json", self.step_id, self.node))
    }

    /// Writes the report as root for the job's user `uid` (group `gid`):
    /// see the module comment. Returns its path.
    pub fn write(&self, dir: &Path, uid: u32, gid: u32) -> io::Result<PathBuf> {
        crate::secure::ensure_private_dir(dir, 0o755, 0)?;
        let base = open_dir(dir)?;
        check_root_dir(dir, &base, 0o022)?;
        let job = self.job_id.to_string();
        let job_path = dir.join(&job);
        let job_dir = job_dir_for(dir, &base, &job, uid, gid)?;
        // I2: owner and mode set on the open directory, never by path.
        std::os::unix::fs::fchown(&job_dir, Some(0), Some(gid))?;
        job_dir.set_permissions(fs::Permissions::from_mode(0o750))?;
        let name = format!("{}.{}.json", self.step_id, self.node);
        let tmp = format!(".{name}.{}.tmp", std::process::id());
        let _ = unlinkat(
            Some(job_dir.as_raw_fd()),
            tmp.as_str(),
            UnlinkatFlags::NoRemoveDir,
        );
        let mut text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        text.push('\n');
        let written = (|| {
            let mut f = create_in(&job_path, &job_dir, &tmp, 0o400)?;
            std::os::unix::fs::fchown(&f, Some(uid), Some(0))?;
            f.set_permissions(fs::Permissions::from_mode(0o400))?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            let fd = Some(job_dir.as_raw_fd());
            renameat(fd, tmp.as_str(), fd, name.as_str()).map_err(io::Error::from)
        })();
        if let Err(e) = written {
            let _ = unlinkat(
                Some(job_dir.as_raw_fd()),
                tmp.as_str(),
                UnlinkatFlags::NoRemoveDir,
            );
            return Err(e);
        }
        job_dir.sync_all()?;
        Ok(job_path.join(name))
    }
}

/// See [`TaskOutcome::failed_at_ms`].
pub const LAST_WORDS_MS: u64 = 2_000;

/// How the master probe's issue starts.
const MASTER_ISSUE: &str = "MASTER_ADDR:MASTER_PORT ";

/// How the master probe's recommendation starts.
const MASTER_POINTER: &str = "'ml-container diagnose ";

/// A rank that ends within this long after the first failure was stopped
/// by it; one that Slurm stops later than this after the last exit had
/// stopped making progress (a hang).
pub const STOPPED_AFTER_MS: u64 = 120_000;
pub const HANG_AFTER_MS: u64 = 60_000;

/// `1.234 s`, `3 min 20 s`, `2 h 5 min`.
pub fn fmt_ms(ms: u64) -> String {
    match ms {
        0..=59_999 => format!("{}.{:03} s", ms / 1000, ms % 1000),
        60_000..=3_599_999 => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// How one rank of a step ended, seen across every node's report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The first rank to fail on its own.
    First,
    /// Failed within [`STOPPED_AFTER_MS`] after the first (its collective
    /// lost a peer) or was signalled by Slurm: not an independent failure.
    StoppedAfter {
        rank: u32,
        after_ms: Option<u64>,
    },
    /// Stopped by Slurm (scancel, time limit) while no rank had failed.
    StoppedBySlurm,
    /// Failed on its own, long after the first failure.
    FailedLater {
        after_ms: Option<u64>,
    },
    Succeeded,
}

/// One rank in the merged view.
#[derive(Clone, Debug)]
pub struct RankView<'a> {
    pub node: &'a str,
    pub task: &'a TaskOutcome,
    pub oom_killed: bool,
    pub verdict: Verdict,
}

/// The merged view of a step's reports: every rank the reports name, in
/// the order they ended, and what ended the step.
#[derive(Clone, Debug)]
pub struct Timeline<'a> {
    pub job_id: u32,
    pub step_id: u32,
    pub ranks: Vec<RankView<'a>>,
    /// Index into `ranks` of the first rank to fail on its own.
    pub first: Option<usize>,
    /// A hang: Slurm stopped ranks that were still running long after the
    /// last rank ended (or with none ended), in words.
    pub hang: Option<String>,
}

/// How a task ended, with an OOM kill named.
pub fn how(t: &TaskOutcome, oom_killed: bool) -> String {
    if oom_killed {
        "killed by the kernel's OOM killer (SIGKILL)".to_string()
    } else {
        t.describe()
    }
}

/// Merges the reports of one step (one per node that had a failure).
pub fn timeline<'a>(reports: &[&'a Report]) -> Timeline<'a> {
    let mut ranks: Vec<RankView<'a>> = reports
        .iter()
        .flat_map(|r| {
            r.tasks.iter().map(move |t| RankView {
                node: r.node.as_str(),
                task: t,
                oom_killed: r.oom_killed(t),
                verdict: Verdict::Succeeded,
            })
        })
        .collect();
    // By end time (unknown last), then rank.
    ranks.sort_by_key(|v| (v.task.failed_at_ms().unwrap_or(u64::MAX), v.task.rank));
    let own = |v: &RankView| v.task.failed() && (!stopped_by_slurm(v.task) || v.oom_killed);
    let first = ranks.iter().position(own);
    let first_end = first.and_then(|i| ranks[i].task.failed_at_ms());
    let first_rank = first.map(|i| ranks[i].task.rank);
    let verdicts: Vec<Verdict> = ranks
        .iter()
        .enumerate()
        .map(|(i, v)| {
            if Some(i) == first {
                return Verdict::First;
            }
            if !v.task.failed() {
                return Verdict::Succeeded;
            }
            let after_ms = first_end
                .zip(v.task.failed_at_ms())
                .map(|(f, e)| e.saturating_sub(f));
            match first_rank {
                None => Verdict::StoppedBySlurm,
                Some(rank) if !own(v) || after_ms.is_none_or(|a| a <= STOPPED_AFTER_MS) => {
                    Verdict::StoppedAfter { rank, after_ms }
                }
                Some(_) => Verdict::FailedLater { after_ms },
            }
        })
        .collect();
    for (v, verdict) in ranks.iter_mut().zip(verdicts) {
        v.verdict = verdict;
    }
    // A hang: ranks Slurm stopped long after the last rank that ended on
    // its own (or with none ended).
    let stopped: Vec<&RankView> = ranks
        .iter()
        .filter(|v| v.task.failed() && !own(v))
        .collect();
    let hang = stopped
        .iter()
        .filter_map(|v| v.task.ended_unix_ms)
        .min()
        .and_then(|stop_at| {
            let alive = stopped
                .iter()
                .map(|v| format!("{} ({})", v.task.rank, v.node))
                .collect::<Vec<_>>()
                .join(", ");
            let last = ranks
                .iter()
                .filter(|v| !v.task.failed() || own(v))
                .filter_map(|v| v.task.ended_unix_ms.map(|e| (e, v)))
                .filter(|(e, _)| *e <= stop_at)
                .max_by_key(|(e, _)| *e);
            match last {
                Some((e, v)) if stop_at.saturating_sub(e) >= HANG_AFTER_MS || !v.task.failed() => {
                    Some(format!(
                        "rank(s) {alive} were still running when Slurm stopped the step (scancel \
                         or time limit), {} after the step's last task exit (rank {} on {}, {}): \
                         a hung collective?",
                        fmt_ms(stop_at.saturating_sub(e)),
                        v.task.rank,
                        v.node,
                        how(v.task, v.oom_killed)
                    ))
                }
                Some(_) => None,
                None => Some(format!(
                    "rank(s) {alive} were still running when Slurm stopped the step (scancel or \
                     time limit); no rank had ended before"
                )),
            }
        });
    Timeline {
        job_id: reports.first().map_or(0, |r| r.job_id),
        step_id: reports.first().map_or(0, |r| r.step_id),
        ranks,
        first,
        hang,
    }
}

/// The merged view for a person: the first rank to fail (how, its error
/// in its own words), then every other rank and why it ended. Escaped.
pub fn render_timeline(t: &Timeline) -> String {
    let f = |s: &str| jobtext::field(s);
    let mut s = format!("job {} step {}:\n", t.job_id, t.step_id);
    if let Some(i) = t.first {
        let v = &t.ranks[i];
        let next = t
            .ranks
            .iter()
            .filter(|o| o.task.rank != v.task.rank && o.task.failed())
            .filter_map(|o| o.task.failed_at_ms())
            .min();
        let lead = match (v.task.failed_at_ms(), next) {
            (Some(a), Some(b)) => format!(
                ", {} before the next rank ended",
                fmt_ms(b.saturating_sub(a))
            ),
            _ => String::new(),
        };
        s.push_str(&format!(
            "  first to fail: rank {} on {}: {}{lead}\n",
            v.task.rank,
            f(v.node),
            how(v.task, v.oom_killed)
        ));
        if let Some(e) = &v.task.torch_error {
            s.push_str(&format!("    error (TorchElastic): {}\n", f(&e.message)));
            for l in e.traceback.iter().rev().take(capture_tail_shown()).rev() {
                s.push_str(&format!("      {}\n", f(l)));
            }
        }
        if !v.task.stderr_tail.is_empty() {
            s.push_str("    stderr (last lines):\n");
            for l in &v.task.stderr_tail {
                s.push_str(&format!("      {}\n", f(l)));
            }
        }
    } else if t.ranks.iter().any(|v| v.task.failed()) {
        s.push_str("  no rank failed on its own: Slurm stopped the step\n");
    }
    for (i, v) in t.ranks.iter().enumerate() {
        if Some(i) == t.first {
            continue;
        }
        let why = match &v.verdict {
            Verdict::First => continue,
            Verdict::Succeeded => "succeeded".to_string(),
            Verdict::StoppedBySlurm => "stopped by Slurm".to_string(),
            Verdict::StoppedAfter { rank, after_ms } => format!(
                "stopped after rank {rank} failed{}",
                after_ms
                    .map(|a| format!(" (+{})", fmt_ms(a)))
                    .unwrap_or_default()
            ),
            Verdict::FailedLater { after_ms } => format!(
                "failed later, on its own{}",
                after_ms
                    .map(|a| format!(" (+{})", fmt_ms(a)))
                    .unwrap_or_default()
            ),
        };
        s.push_str(&format!(
            "  rank {} on {}: {}: {why}\n",
            v.task.rank,
            f(v.node),
            how(v.task, v.oom_killed)
        ));
    }
    if let Some(h) = &t.hang {
        s.push_str(&format!("  hang: {}\n", f(h)));
    }
    s
}

/// Traceback lines shown in the merged view.
fn capture_tail_shown() -> usize {
    crate::capture::TAIL_LINES
}

/// The owner record in each job directory: `uid=N`, root's, mode 0600.
pub const OWNER_FILE: &str = ".owner";
/// Prefix of a job directory moved aside because its job id was reused.
pub const STALE_PREFIX: &str = ".stale-";

/// Opens a directory without following a symlink at its last component.
fn open_dir(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// A directory only root can change: owned by root, none of `forbidden`'s
/// mode bits.
fn check_root_dir(path: &Path, d: &File, forbidden: u32) -> io::Result<()> {
    let m = d.metadata()?;
    if !m.is_dir() || m.uid() != 0 || m.mode() & forbidden != 0 {
        return Err(io::Error::other(format!(
            "{} is not a root-owned directory closed to others (uid {}, mode {:o}); not \
             writing there: fix its owner and mode",
            path.display(),
            m.uid(),
            m.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Creates `name` (new, O_EXCL, never through a symlink) in the directory
/// open as `dir` (whose path is `dir_path`), and checks that the file
/// created is that directory's entry: the path is only a way to the fd's
/// directory, which only root can change.
fn create_in(dir_path: &Path, dir: &File, name: &str, mode: u32) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir_path.join(name))?;
    let entry = fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    let m = f.metadata()?;
    if entry.st_ino != m.ino() || entry.st_dev != m.dev() {
        return Err(io::Error::other(format!(
            "{} changed while root wrote there; not writing",
            dir_path.display()
        )));
    }
    Ok(f)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A name unique to this process on this host: report dirs may be shared
/// by nodes (NFS), where pids repeat.
fn unique_suffix() -> String {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(
        "{}-{}",
        jobtext::field(&host).replace('/', "_"),
        std::process::id()
    )
}

/// Moves `<base>/<job>` aside (I1: a reused job id never inherits it); the
/// old directory keeps its owner and modes, `prune` removes it in time.
/// `inspected` is the directory that was judged stale: when a concurrent
/// writer (another node) has meanwhile replaced it by a fresh one, that one
/// is put back. Gone already (another node moved it): fine.
fn move_aside(dir: &Path, base: &File, job: &str, inspected: Option<(u64, u64)>) -> io::Result<()> {
    let aside = format!("{STALE_PREFIX}{job}-{}-{}", now_secs(), unique_suffix());
    let fd = Some(base.as_raw_fd());
    match renameat2(fd, job, fd, aside.as_str(), RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => {}
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    if let Some((dev, ino)) = inspected {
        let moved = fs::symlink_metadata(dir.join(&aside))?;
        if (moved.dev(), moved.ino()) != (dev, ino) {
            let _ = renameat2(fd, aside.as_str(), fd, job, RenameFlags::RENAME_NOREPLACE);
        }
    }
    Ok(())
}

/// The uid an owner record names.
fn parse_owner(text: &str) -> Option<u32> {
    text.trim().strip_prefix("uid=")?.parse().ok()
}

/// Reads the owner record of the open job directory `d`: root's regular
/// file, not through a symlink, never blocking.
fn read_owner(d_path: &Path, d: &File) -> Option<u32> {
    let p = d_path.join(OWNER_FILE);
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&p)
        .ok()?;
    let m = f.metadata().ok()?;
    let entry = fstatat(
        Some(d.as_raw_fd()),
        OWNER_FILE,
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .ok()?;
    if !m.is_file() || m.uid() != 0 || entry.st_ino != m.ino() {
        return None;
    }
    let mut text = String::new();
    (&mut f).take(64).read_to_string(&mut text).ok()?;
    parse_owner(&text)
}

/// The job directory `<base>/<job>` of the job's user `uid`, open. A
/// directory there that is not root's, is a symlink or file, has no owner
/// record (written before records existed) or records another uid belongs
/// to an older job with the same id: it is moved aside and a fresh one made.
/// A fresh one is made under a temporary name, given its owner record and
/// modes, then renamed into place without replacing anything: a directory
/// under the job's name always has its record, even to a node writing
/// concurrently.
fn job_dir_for(dir: &Path, base: &File, job: &str, uid: u32, gid: u32) -> io::Result<File> {
    let job_path = dir.join(job);
    for _ in 0..4 {
        match open_dir(&job_path) {
            Ok(d) => {
                let theirs = check_root_dir(&job_path, &d, 0o027).is_ok()
                    && read_owner(&job_path, &d) == Some(uid);
                if theirs {
                    return Ok(d);
                }
                log::warn!(
                    "{} belongs to an older job with the same id: moved aside",
                    job_path.display()
                );
                let m = d.metadata()?;
                move_aside(dir, base, job, Some((m.dev(), m.ino())))?;
            }
            Err(e)
                if e.raw_os_error() == Some(libc::ELOOP)
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                move_aside(dir, base, job, None)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let tmp = format!(".new-{job}-{}", unique_suffix());
                let tmp_path = dir.join(&tmp);
                let _ = fs::remove_dir_all(&tmp_path);
                mkdirat(
                    Some(base.as_raw_fd()),
                    tmp.as_str(),
                    Mode::from_bits_truncate(0o700),
                )?;
                let made = (|| {
                    let d = open_dir(&tmp_path)?;
                    check_root_dir(&tmp_path, &d, 0o077)?;
                    let mut rec = create_in(&tmp_path, &d, OWNER_FILE, 0o600)?;
                    rec.write_all(format!("uid={uid}\n").as_bytes())?;
                    rec.sync_all()?;
                    std::os::unix::fs::fchown(&d, Some(0), Some(gid))?;
                    d.set_permissions(fs::Permissions::from_mode(0o750))?;
                    let fd = Some(base.as_raw_fd());
                    renameat2(fd, tmp.as_str(), fd, job, RenameFlags::RENAME_NOREPLACE)
                        .map_err(io::Error::from)
                })();
                if let Err(e) = made {
                    let _ = fs::remove_dir_all(&tmp_path);
                    // Another node made it meanwhile: use that one.
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(e);
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!(
        "{} keeps changing under root; not writing there",
        job_path.display()
    )))
}

/// The longest metrics line, newline included (issue 10: a 120 KB image
/// name must not add 120 KB per task to the log).
pub const METRICS_LINE_CAP: usize = 512;

/// A job string as one metrics field: escaped, no white space (the line is
/// space-separated `KEY=VALUE`), at most `cap` bytes.
fn metrics_field(s: &str, cap: usize) -> String {
    jobtext::escape(s, cap.max(1)).replace(' ', "_")
}

/// One metrics line (SPEC: `JOB_ID= STEP_ID= NODE= IMAGE= EXIT_CODE= ...`),
/// at most [`METRICS_LINE_CAP`] bytes: the image, the only field a job
/// chooses, gets what the fixed fields leave.
pub fn metrics_line(
    job: u32,
    step: u32,
    node: &str,
    image: &str,
    t: &TaskOutcome,
    duration_ms: u128,
) -> String {
    let node = metrics_field(node, 64);
    let exit = t.exit_code.map_or("-".to_string(), |c| c.to_string());
    let signal = t
        .signal
        .map_or("-".to_string(), |s| signal_name(s).to_string());
    let line = |image: &str| {
        format!(
            "JOB_ID={job} STEP_ID={step} NODE={node} RANK={} IMAGE={image} EXIT_CODE={exit} SIGNAL={signal} DURATION_MS={duration_ms}\n",
            t.rank,
        )
    };
    let fixed = line("").len();
    line(&metrics_field(
        image,
        METRICS_LINE_CAP.saturating_sub(fixed),
    ))
}

/// Appends `line` with one O_APPEND write, not following a symlink; the
/// log must be a regular file owned by root (a FIFO planted there would
/// block root in open, another user's file would receive root's lines).
pub fn append_line(path: &Path, line: &str) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    let m = f.metadata()?;
    if !m.file_type().is_file() || m.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::other(format!(
            "{} is not a regular file owned by this process's user (uid {}, {:?}): not \
             appending; remove it",
            path.display(),
            m.uid(),
            m.file_type()
        )));
    }
    f.write_all(line.as_bytes())
}

/// One line to the local syslog (/dev/log, facility user, priority err);
/// escaped and capped, the message carries job strings.
pub fn syslog(msg: &str) {
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let msg = jobtext::escape(msg, 1024);
    let _ = sock.send_to(format!("<11>ml-container: {msg}").as_bytes(), "/dev/log");
}

/// The largest report `read_job` reads: a report file belongs to the job's
/// user, who may have grown it.
const MAX_REPORT_BYTES: u64 = 16 << 20;

/// Reads the reports of a job, for `ml-container diagnose` (as whoever runs
/// it: files it may not read come back as errors). Never follows a symlink
/// nor blocks on a FIFO; reads at most 16 MiB of each.
pub fn read_job(dir: &Path, job: u32) -> io::Result<Vec<(PathBuf, Result<Report, String>)>> {
    let job_dir = dir.join(job.to_string());
    open_dir(&job_dir)?;
    let mut out = Vec::new();
    for e in fs::read_dir(&job_dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "json") {
            let parsed = read_report(&p);
            out.push((p, parsed));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn read_report(p: &Path) -> Result<Report, String> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(p)
        .map_err(|e| e.to_string())?;
    let m = f.metadata().map_err(|e| e.to_string())?;
    if !m.is_file() {
        return Err("not a regular file".to_string());
    }
    let mut text = String::new();
    (&mut f)
        .take(MAX_REPORT_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    serde_json::from_str::<Report>(&text).map_err(|e| e.to_string())
}

/// Removes the job directories under `dir` (numeric names, and those moved
/// aside or left half-made: `.stale-`, `.new-`) not modified for `age`;
/// with `dry_run` only lists them. Entries are removed without following
/// symlinks (`remove_dir_all` does not); anything else is left alone.
pub fn prune(dir: &Path, age: std::time::Duration, dry_run: bool) -> io::Result<Vec<PathBuf>> {
    let base = open_dir(dir)?;
    check_root_dir(dir, &base, 0o022)?;
    let cutoff = std::time::SystemTime::now()
        .checked_sub(age)
        .unwrap_or(std::time::UNIX_EPOCH);
    let mut removed = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        let ours = name.parse::<u32>().is_ok()
            || name.starts_with(STALE_PREFIX)
            || name.starts_with(".new-");
        if !ours {
            continue;
        }
        let p = e.path();
        let m = fs::symlink_metadata(&p)?;
        if m.modified()? > cutoff {
            continue;
        }
        if !dry_run {
            if m.is_dir() {
                fs::remove_dir_all(&p)?;
            } else {
                fs::remove_file(&p)?;
            }
        }
        removed.push(p);
    }
    removed.sort();
    Ok(removed)
}

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

    fn report(tasks: Vec<TaskOutcome>) -> Report {
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

    #[test]
    fn analysis_rules() {
        let mut r = report(vec![TaskOutcome::from_wait_status(1, 0, 7 << 8)]);
        r.analyze(&Context::default());
        assert!(
            r.issues_found[0].contains("rank 1 exited with code 7"),
            "{:?}",
            r.issues_found
        );

        let mut r = report(vec![TaskOutcome::from_wait_status(2, 0, libc::SIGKILL)]);
        r.node_state.oom_kills_during_step = Some(2);
        r.analyze(&Context::default());
        assert!(
            r.issues_found[0].contains("OOM killer ran on this node (2 kill(s)")
                && r.issues_found[0].contains("most likely out of memory"),
            "{:?}",
            r.issues_found
        );
        assert!(r.recommendations[0].contains("--mem"));
        // The step's own cgroup counted the kill: no "most likely".
        let mut r = report(vec![TaskOutcome::from_wait_status(2, 0, libc::SIGKILL)]);
        r.node_state.oom_kills_during_step = Some(3);
        r.node_state.step_memory_cgroup = Some("/sys/fs/cgroup/job_7/step_0".into());
        r.node_state.oom_kills_in_step_cgroup = Some(1);
        r.analyze(&Context::default());
        assert_eq!(
            r.issues_found,
            [
                "rank 2 was killed by the kernel's OOM killer: the step ran out of memory \
              (1 kill(s) in its memory cgroup /sys/fs/cgroup/job_7/step_0)"
            ]
        );
        assert!(r.recommendations[0].contains("--mem"));
        // Per task: rank 2 (local 0) was hit, ranks 3 and 4 only stopped
        // afterwards (SIGKILL, SIGTERM).
        let mut r2 = report(vec![
            TaskOutcome::from_wait_status(2, 0, libc::SIGKILL),
            TaskOutcome::from_wait_status(3, 1, libc::SIGKILL),
            TaskOutcome::from_wait_status(4, 2, libc::SIGTERM),
        ]);
        r2.node_state = r.node_state.clone();
        r2.node_state.oom_kills_by_local_task = [(0, 1), (1, 0), (2, 0)].into_iter().collect();
        r2.analyze(&Context::default());
        let i = &r2.issues_found;
        assert!(
            i[0].starts_with("rank 2 was killed by the kernel's OOM killer")
                && i[1]
                    .starts_with("rank 3 was stopped by SIGKILL after the step ran out of memory")
                && i[2]
                    .starts_with("rank 4 was stopped by SIGTERM after the step ran out of memory")
                && i[2].ends_with("none in this rank's)"),
            "{i:?}"
        );
        assert_eq!(r2.recommendations.len(), 1, "{:?}", r2.recommendations);
        // Its cgroup had none: another job's OOM kills on the node do not
        // make this SIGKILL an OOM kill.
        r.node_state.oom_kills_in_step_cgroup = Some(0);
        r.issues_found.clear();
        r.recommendations.clear();
        r.analyze(&Context::default());
        assert!(
            r.issues_found[0].contains("from outside") && !r.issues_found[0].contains("OOM"),
            "{:?}",
            r.issues_found
        );
        // No OOM kill on the node: a SIGKILL came from outside.
        let mut r = report(vec![TaskOutcome::from_wait_status(2, 0, libc::SIGKILL)]);
        r.node_state.oom_kills_during_step = Some(0);
        r.analyze(&Context::default());
        assert!(
            r.issues_found[0].contains("scancel"),
            "{:?}",
            r.issues_found
        );

        let mut r = report(vec![TaskOutcome::from_wait_status(2, 0, libc::SIGTERM)]);
        r.analyze(&Context::default());
        assert!(
            r.issues_found[0].contains("scancel"),
            "{:?}",
            r.issues_found
        );

        let mut r = report(vec![TaskOutcome::from_wait_status(3, 0, 255 << 8)]);
        r.analyze(&Context {
            runtime_is_apptainer: true,
            missing_bind_sources: vec!["/data".into()],
            image_readable_by_others: true,
            ..Context::default()
        });
        assert!(
            r.issues_found[0].contains("bind source /data is missing"),
            "{:?}",
            r.issues_found
        );

        let mut r = report(vec![TaskOutcome::from_wait_status(3, 0, 1 << 8)]);
        r.node_state.master = Some(MasterProbe {
            addr: "n1".into(),
            port: 29500,
            reachable: false,
            error: Some("refused".into()),
            when: Some("when rank 3 failed".into()),
            at_unix_ms: None,
        });
        r.environment.remove("WORLD_SIZE");
        r.analyze(&Context {
            dist_enabled: true,
            gpus_requested: true,
            ..Context::default()
        });
        let all = r.issues_found.join("\n");
        assert!(all.contains("n1:29500) did not answer"), "{all}");
        assert!(all.contains("WORLD_SIZE was not set"), "{all}");
        assert!(all.contains("nvidia-smi shows none"), "{all}");
        assert_eq!(r.issues_found.len(), r.recommendations.len());
        let text = render(&r);
        assert!(text.contains("rank    3 (local 0): exit code 1"), "{text}");
        assert!(!text.contains("rank 0 probably failed"), "{text}");
        assert!(
            text.contains("did not answer from n2 when rank 3 failed"),
            "{text}"
        );
        // diagnose, which names the first rank to fail, leaves the
        // pointer to itself out.
        assert!(text.contains("fix:   'ml-container diagnose 5'"), "{text}");
        assert!(!render_in_job(&r, Some((3, None))).contains("fix:   'ml-container diagnose"));
        // Probed after the first failure: not an issue in diagnose.
        let mut late = r.clone();
        if let Some(m) = late.node_state.master.as_mut() {
            m.at_unix_ms = Some(9_000);
        }
        let text = render_in_job(&late, Some((1, Some(8_000))));
        assert!(!text.contains("issue: MASTER_ADDR"), "{text}");
        assert!(
            text.contains("did not answer (probed after rank 1 had failed"),
            "{text}"
        );
        let text = render_in_job(&late, Some((1, Some(9_500))));
        assert!(text.contains("issue: MASTER_ADDR"), "{text}");
        // Rank 0 failed here before the probe: no master issue at all.
        let mut r0 = report(vec![ended(0, 0, 1 << 8, 5_000), ended(1, 1, 1 << 8, 5_200)]);
        r0.node_state.master = late.node_state.master.clone();
        r0.analyze(&Context::default());
        assert!(
            !r0.issues_found.iter().any(|i| i.contains("did not answer")),
            "{:?}",
            r0.issues_found
        );
    }

    fn ended(rank: u32, local: u32, status: i32, at: u64) -> TaskOutcome {
        let mut t = TaskOutcome::from_wait_status(rank, local, status);
        t.started_unix_ms = Some(1_000);
        t.ended_unix_ms = Some(at);
        t
    }

    #[test]
    fn the_first_rank_to_fail_is_named_across_nodes() {
        // n1: ranks 0 and 1; n2: ranks 2 and 3. Rank 1 raised first; rank
        // 0 and 2 failed in the collective after it, Slurm stopped rank 3.
        let mut n1 = report(vec![ended(0, 0, 1 << 8, 5_300), ended(1, 1, 1 << 8, 5_000)]);
        n1.node = "n1".into();
        n1.tasks[1].stderr_tail = vec!["Traceback ...".into(), "RuntimeError: boom".into()];
        let n2 = report(vec![
            ended(2, 0, 1 << 8, 5_250),
            ended(3, 1, libc::SIGTERM, 5_400),
        ]);
        let t = timeline(&[&n2, &n1]);
        let first = &t.ranks[t.first.unwrap()];
        assert_eq!((first.task.rank, first.node), (1, "n1"));
        let v = |rank| {
            t.ranks
                .iter()
                .find(|r| r.task.rank == rank)
                .unwrap()
                .verdict
                .clone()
        };
        assert_eq!(
            v(2),
            Verdict::StoppedAfter {
                rank: 1,
                after_ms: Some(250)
            }
        );
        assert_eq!(
            v(0),
            Verdict::StoppedAfter {
                rank: 1,
                after_ms: Some(300)
            }
        );
        assert_eq!(
            v(3),
            Verdict::StoppedAfter {
                rank: 1,
                after_ms: Some(400)
            }
        );
        assert!(t.hang.is_none(), "{:?}", t.hang);
        let text = render_timeline(&t);
        assert!(
            text.contains(
                "first to fail: rank 1 on n1: exit code 1, 0.250 s before the next rank ended"
            ),
            "{text}"
        );
        assert!(text.contains("      RuntimeError: boom\n"), "{text}");
        assert!(text.contains("rank 3 on n2: killed by signal 15 (SIGTERM): stopped after rank 1 failed (+0.400 s)"), "{text}");
        // Ranks that end within the runtime's teardown of each other are
        // ordered by their last words: rank 0 ended first, but rank 1's
        // traceback came before rank 0's message.
        let mut a = ended(0, 0, 1 << 8, 5_000);
        a.last_stderr_unix_ms = Some(4_990);
        let mut b = ended(1, 1, 1 << 8, 5_100);
        b.last_stderr_unix_ms = Some(4_900);
        let mut old = ended(2, 2, 1 << 8, 5_050);
        old.last_stderr_unix_ms = Some(1_000); // long before its end: not last words
        let r = report(vec![a, b, old]);
        let t = timeline(&[&r]);
        assert_eq!(t.ranks[t.first.unwrap()].task.rank, 1);
        assert_eq!(t.ranks[1].task.rank, 0);
        assert_eq!(
            t.ranks[2].verdict,
            Verdict::StoppedAfter {
                rank: 1,
                after_ms: Some(150)
            }
        );
        // A rank that fails on its own long after is not "stopped after".
        let late = report(vec![ended(4, 0, 2 << 8, 5_000 + STOPPED_AFTER_MS + 1)]);
        let t = timeline(&[&n1, &late]);
        assert!(matches!(
            t.ranks.last().unwrap().verdict,
            Verdict::FailedLater { .. }
        ));
    }

    #[test]
    fn an_oom_kill_is_a_failure_of_its_own_and_a_scancel_is_not() {
        let mut r = report(vec![
            ended(0, 0, libc::SIGTERM, 9_000),
            ended(1, 1, libc::SIGKILL, 8_000),
        ]);
        r.node_state.oom_kills_in_step_cgroup = Some(1);
        r.node_state.step_memory_cgroup = Some("/sys/fs/cgroup/x".into());
        r.node_state.oom_kills_by_local_task = [(0, 0), (1, 1)].into_iter().collect();
        let t = timeline(&[&r]);
        let first = &t.ranks[t.first.unwrap()];
        assert_eq!(first.task.rank, 1);
        assert!(render_timeline(&t).contains("rank 1 on n2: killed by the kernel's OOM killer"));
    }

    #[test]
    fn a_hang_names_the_ranks_still_alive() {
        // Rank 0 finished, ranks 1 and 2 stayed in a collective until
        // Slurm's time limit 2 h later.
        let h = 7_200_000;
        let mut r = report(vec![
            ended(0, 0, 0, 10_000),
            ended(1, 1, libc::SIGTERM, 10_000 + h),
            ended(2, 2, libc::SIGKILL, 10_000 + h + 5),
        ]);
        let t = timeline(&[&r]);
        assert!(t.first.is_none());
        let hang = t.hang.clone().unwrap();
        assert!(
            hang.contains("rank(s) 1 (n2), 2 (n2) were still running")
                && hang.contains(
                    "2 h 0 min after the step's last task exit (rank 0 on n2, exit code 0)"
                ),
            "{hang}"
        );
        r.analyze(&Context::default());
        assert!(
            r.issues_found
                .iter()
                .any(|i| i.starts_with("rank(s) 1, 2 were still running")),
            "{:?}",
            r.issues_found
        );
        // A plain scancel with nothing ended before: named too.
        let r = report(vec![ended(0, 0, libc::SIGTERM, 10_000)]);
        assert!(timeline(&[&r])
            .hang
            .unwrap()
            .contains("no rank had ended before"));
        // Stopped right after a failure: that failure, not a hang.
        let r = report(vec![
            ended(0, 0, 1 << 8, 10_000),
            ended(1, 1, libc::SIGTERM, 10_500),
        ]);
        assert!(timeline(&[&r]).hang.is_none());
    }

    #[test]
    fn metrics_format() {
        let l = metrics_line(
            5,
            0,
            "n2",
            "py torch",
            &TaskOutcome::from_wait_status(3, 1, 7 << 8),
            12,
        );
        assert_eq!(l, "JOB_ID=5 STEP_ID=0 NODE=n2 RANK=3 IMAGE=py_torch EXIT_CODE=7 SIGNAL=- DURATION_MS=12\n");
        // A forged name: one line, escaped, capped.
        let huge = format!("tiny:1.0\nJOB_ID=666 FAKE{}", "x".repeat(120_000));
        let l = metrics_line(
            u32::MAX,
            u32::MAX,
            "n2",
            &huge,
            &TaskOutcome::from_wait_status(u32::MAX, 1, libc::SIGKILL),
            u128::MAX,
        );
        assert!(l.len() <= METRICS_LINE_CAP, "{} bytes", l.len());
        assert_eq!(l.matches('\n').count(), 1, "{l}");
        assert!(l.ends_with(&format!("DURATION_MS={}\n", u128::MAX)), "{l}");
        assert!(l.contains("IMAGE=tiny:1.0\\nJOB_ID=666_FAKExxx"), "{l}");
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

    /// As root (the tests run as root, as slurmstepd does).
    #[test]
    fn reports_belong_to_the_user_and_a_reused_job_id_starts_afresh() {
        let dir = std::env::temp_dir().join(format!("mlc-reports-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let r = report(vec![TaskOutcome::from_wait_status(1, 0, 7 << 8)]);
        let p = r.write(&dir, 1500, 1600).unwrap();
        assert_eq!(p, dir.join("5/0.n2.json"));
        let m = fs::symlink_metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1500, 0, 0o400));
        let d = fs::symlink_metadata(dir.join("5")).unwrap();
        assert_eq!((d.uid(), d.gid(), d.mode() & 0o7777), (0, 1600, 0o750));
        assert_eq!(
            fs::read_to_string(dir.join("5").join(OWNER_FILE)).unwrap(),
            "uid=1500\n"
        );
        // The same user's next step: same directory, both reports.
        let mut r1 = r.clone();
        r1.step_id = 1;
        r1.write(&dir, 1500, 1600).unwrap();
        assert!(dir.join("5/0.n2.json").exists() && dir.join("5/1.n2.json").exists());
        // Job id 5 again, another user: the old directory is moved aside.
        let mut other = r.clone();
        other.uid = 1501;
        other.step_id = 3;
        other.write(&dir, 1501, 1600).unwrap();
        let names: Vec<String> = fs::read_dir(dir.join("5"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains(&"3.n2.json".to_string()), "{names:?}");
        let aside: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(STALE_PREFIX))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert!(dir.join(&aside[0]).join("0.n2.json").exists());
        // A directory without a record (older versions) is not inherited.
        fs::create_dir(dir.join("6")).unwrap();
        fs::write(dir.join("6/0.n1.json"), "old").unwrap();
        let mut six = r.clone();
        six.job_id = 6;
        six.write(&dir, 1500, 1600).unwrap();
        assert!(!dir.join("6/0.n1.json").exists());
        // A symlink planted as the job directory is never followed.
        let target = dir.join("elsewhere");
        fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(&target, dir.join("7")).unwrap();
        let mut seven = r.clone();
        seven.job_id = 7;
        seven.write(&dir, 1500, 1600).unwrap();
        assert_eq!(fs::read_dir(&target).unwrap().count(), 0);
        assert!(fs::symlink_metadata(dir.join("7")).unwrap().is_dir());
        // diagnose reads them back.
        let back = read_job(&dir, 5).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].1.as_ref().unwrap(), &other);
        // Expiry: nothing is a day old yet; everything is older than 0 s.
        fs::write(dir.join("notes.txt"), "kept").unwrap();
        assert!(prune(&dir, std::time::Duration::from_secs(86400), false)
            .unwrap()
            .is_empty());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let gone = prune(&dir, std::time::Duration::ZERO, false).unwrap();
        assert_eq!(gone.len(), 6, "{gone:?}"); // 5, 6, 7 and three moved aside
        let left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        // notes.txt, and elsewhere/ (the planted link went, not its target).
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(fs::read_to_string(dir.join("notes.txt")).unwrap(), "kept");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn json_round_trip() {
        let r = report(vec![TaskOutcome::from_wait_status(1, 0, 7 << 8)]);
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&text).unwrap(), r);
    }
}
