//! The real-cluster test harness (docs/DESIGN.md, Slurm facts per release:
//! several slurmd on one machine).
//!
//! `Cluster::start` builds the plugin against the chosen Slurm's headers
//! (once per test process), then runs `tests/cluster/cluster.sh` as pid 1 of
//! a new pid and mount namespace. That script overlays a throwaway tmpfs on
//! the Slurm root (the cached Debian trixie root for 24.11, the sid root
//! for 26.05, the host for 22.05), gives each node its own network and UTS
//! namespace, starts munged, slurmctld and one slurmd per node, and prints
//! READY. Commands then run
//! inside a node by `nsenter` into that node's anchor process, as the
//! unprivileged user `mluser` or as root. Dropping the `Cluster` closes the
//! script's stdin; it exits and the kernel kills every daemon of its pid
//! namespace, so nothing outlives the test. A failing test prints the
//! slurmctld and slurmd logs.
//!
//! Here: the test user's names and the scratch directories. Beside it:
//! `slurm.rs` (the releases, the CLI, plugin and package built for each),
//! `images.rs` (the test images), `cluster.rs` (`Cluster`: start, run,
//! srun, logs; `Options`), `run.rs` (a command's result), `wait.rs`
//! (polling), `pytorch.rs` (the PyTorch image).

mod cluster;
mod images;
pub mod pytorch;
mod run;
mod slurm;
mod wait;

pub use cluster::{assert_contract_beats_rank999, read_matching, Cluster, Options};
pub use images::{images, mpi_image, sqfs_image, REGISTRY};
pub use run::{Background, Run};
pub use slurm::{build_deb, cli, plugin, Slurm};
pub use wait::wait_for;

use std::fs;
use std::os::unix::fs::PermissionsExt;

pub const USER: &str = "mluser";
pub const USER_ID: &str = "1500";
pub const HOME: &str = "/home/mluser";
/// A second unprivileged user sharing `mluser`'s primary group.
pub const USER2: &str = "mluser2";
pub const USER2_ID: &str = "1501";
const PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin";

/// A directory of the test's own, 0755 (the cluster's users, and the root
/// of an image packed from it, must read it), removed when dropped.
fn scratch_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("create temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    dir
}
