//! The real-cluster tests: the behaviour of every part, run on real
//! Slurm daemons (24.11 in the cached trixie root, 22.05 on the host) and
//! real Apptainer, as an unprivileged user. See tests/harness/mod.rs.

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;
mod scenarios;
