//! What a failed step's report concludes: its issues and, for each, what
//! to do (`Report::analyze`), and which tasks the OOM killer hit.
#![forbid(unsafe_code)]

use super::{
    fmt_ms, signal_name, stopped_by_slurm, Context, Report, TaskOutcome, HANG_AFTER_MS,
    MASTER_ISSUE, MASTER_POINTER,
};
use crate::jobtext;
use crate::probe::CommandProbe;

impl Report {
    /// Fills `issues_found` and `recommendations` from the outcome and the
    /// node state: exit codes, signals, OOM kills, Apptainer's 255, a hang, an
    /// unreachable master, a missing distributed environment, missing GPUs.
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::MasterProbe;
    use crate::report::render;
    use crate::report::render_in_job;
    use crate::report::tests::{ended, report};

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
}
