//! The merged view of a step across nodes, for `ml-container diagnose`:
//! every rank the reports name, in the order they failed, the first to
//! fail on its own, and a hang when Slurm stopped ranks long after the
//! last one ended.
#![forbid(unsafe_code)]

use super::{stopped_by_slurm, Report, TaskOutcome};
use crate::jobtext;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::{ended, report};
    use crate::report::Context;

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
}
