//! Polling with a bound, and the steps that hold every node and wait for
//! an srun to pend.

use std::time::{Duration, Instant};

use super::Cluster;

/// Polls `f` every 50 ms until it gives a value or `within` has passed.
pub fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Cluster {
    /// Occupies both nodes with a batch job for `secs`, so that the next
    /// srun resolves its image and then waits; returns the job's id once
    /// it runs.
    pub fn hold_every_node(&self, secs: &str) -> String {
        let r = self.run(
            1,
            &[],
            &[
                "sbatch",
                "--parsable",
                "-N2",
                "--exclusive",
                "--wrap",
                &format!("sleep {secs}"),
            ],
        );
        let id = r.assert_ok().stdout.trim().to_string();
        wait_for(Duration::from_secs(15), || {
            let q = self.run(1, &[], &["squeue", "-h", "-j", &id, "-o", "%T"]);
            (q.stdout.trim() == "RUNNING").then_some(())
        })
        .unwrap_or_else(|| panic!("the holding job {id} never ran"));
        id
    }

    /// Until a job other than `holder` pends (an srun, past its resolution).
    pub fn wait_pending_besides(&self, holder: &str) {
        wait_for(Duration::from_secs(15), || {
            let q = self.run(1, &[], &["squeue", "-h", "-t", "PD", "-o", "%i"]);
            q.stdout
                .split_whitespace()
                .any(|id| id != holder)
                .then_some(())
        })
        .expect("srun never pended");
    }
}
