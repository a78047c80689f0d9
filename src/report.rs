//! Failure capture (SPEC "Failure capture", seed 002 §5.5.3-5.5.4): one JSON
//! report per failed step and node under `<report dir>/<job id>/`, one
//! metrics line per finished task, and a syslog line per failure.
//!
//! Reports are written by root in slurmstepd: the job directory is made
//! root-owned with the job's group (mode 0750), the report is created under
//! a temporary name with O_EXCL|O_NOFOLLOW, given mode 0640 and the job's
//! group, then renamed into place, so a symlink planted at either name is
//! never followed and the user can read but not write.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::probe::{CommandProbe, MasterProbe};

/// How one task ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOutcome {
    pub rank: u32,
    pub local_id: u32,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
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
        }
    }

    pub fn failed(&self) -> bool {
        self.signal.is_some() || self.exit_code.is_some_and(|c| c != 0)
    }

    pub fn describe(&self) -> String {
        match (self.exit_code, self.signal) {
            (_, Some(s)) => format!("killed by signal {s} ({})", signal_name(s)),
            (Some(c), None) => format!("exit code {c}"),
            (None, None) => "unknown".to_string(),
        }
    }
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
                        why.push(format!("image {} is not world-readable", self.image.path.display()));
                    }
                    for b in &ctx.missing_bind_sources {
                        why.push(format!("bind source {} is missing", b.display()));
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
                            self.image.path.display(),
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
        if let Some(m) = &self.node_state.master {
            if !m.reachable {
                issue(
                    format!(
                        "MASTER_ADDR:MASTER_PORT ({}:{}) did not answer from {}",
                        m.addr, m.port, self.node
                    ),
                    "rank 0 probably failed or never listened: look at rank 0's report and output first".into(),
                );
            }
        }
        if ctx.dist_enabled {
            if let Some(e) = &ctx.dist_error {
                issue(
                    format!("the distributed environment could not be set: {e}"),
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

    /// `<dir>/<job id>/<step id>.<node>.json`
    pub fn path_in(&self, dir: &Path) -> PathBuf {
        dir.join(self.job_id.to_string())
            .join(format!("{}.{}.json", self.step_id, self.node))
    }

    /// Writes the report as root (see the module comment); returns its path.
    pub fn write(&self, dir: &Path, gid: u32) -> io::Result<PathBuf> {
        crate::secure::ensure_private_dir(dir, 0o755, 0)?;
        let job_dir = dir.join(self.job_id.to_string());
        match fs::symlink_metadata(&job_dir) {
            Ok(m) if m.file_type().is_dir() && m.uid() == 0 => {}
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "{} is not a root-owned directory (a planted link?); not writing there",
                    job_dir.display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&job_dir)?;
            }
            Err(e) => return Err(e),
        }
        std::os::unix::fs::chown(&job_dir, Some(0), Some(gid))?;
        fs::set_permissions(
            &job_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o750),
        )?;
        let final_path = self.path_in(dir);
        let mut text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        text.push('\n');
        crate::secure::replace_file(&final_path, text.as_bytes(), 0o640, Some((0, gid)))?;
        Ok(final_path)
    }
}

/// One metrics line (SPEC: `JOB_ID= STEP_ID= NODE= IMAGE= EXIT_CODE= ...`).
pub fn metrics_line(
    job: u32,
    step: u32,
    node: &str,
    image: &str,
    t: &TaskOutcome,
    duration_ms: u128,
) -> String {
    format!(
        "JOB_ID={job} STEP_ID={step} NODE={node} RANK={} IMAGE={} EXIT_CODE={} SIGNAL={} DURATION_MS={duration_ms}\n",
        t.rank,
        image.replace(char::is_whitespace, "_"),
        t.exit_code.map_or("-".to_string(), |c| c.to_string()),
        t.signal.map_or("-".to_string(), |s| signal_name(s).to_string()),
    )
}

/// Appends `line` with one O_APPEND write, not following a symlink.
pub fn append_line(path: &Path, line: &str) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    f.write_all(line.as_bytes())
}

/// One line to the local syslog (/dev/log, facility user, priority err).
pub fn syslog(msg: &str) {
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let _ = sock.send_to(format!("<11>ml-container: {msg}").as_bytes(), "/dev/log");
}

/// Reads the reports of a job, for `ml-container diagnose`.
pub fn read_job(dir: &Path, job: u32) -> io::Result<Vec<(PathBuf, Result<Report, String>)>> {
    let job_dir = dir.join(job.to_string());
    let mut out = Vec::new();
    for e in fs::read_dir(&job_dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "json") {
            let parsed = fs::read_to_string(&p)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str::<Report>(&t).map_err(|e| e.to_string()));
            out.push((p, parsed));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// A report for a person.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "job {} step {} on {} (uid {}{}): image {} ({})\n",
        r.job_id,
        r.step_id,
        r.node,
        r.uid,
        r.user.as_ref().map(|u| format!(" {u}")).unwrap_or_default(),
        r.image.reference,
        r.image.path.display()
    ));
    for t in &r.tasks {
        s.push_str(&format!(
            "  rank {:>4} (local {}): {}\n",
            t.rank,
            t.local_id,
            t.describe()
        ));
    }
    if let Some(m) = &r.node_state.master {
        s.push_str(&format!(
            "  master {}:{} {}\n",
            m.addr,
            m.port,
            if m.reachable {
                "answered"
            } else {
                "did not answer"
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
            cg.display()
        ));
    }
    for i in &r.issues_found {
        s.push_str(&format!("  issue: {i}\n"));
    }
    for i in &r.recommendations {
        s.push_str(&format!("  fix:   {i}\n"));
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
    }

    #[test]
    fn json_round_trip() {
        let r = report(vec![TaskOutcome::from_wait_status(1, 0, 7 << 8)]);
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&text).unwrap(), r);
    }
}
