//! `ml-container-launch`: runs a task in its image where Slurm cannot
//! prepend to the task's argv (before 23.11). The plugin makes this the
//! task's argv[0] and leaves the runtime prefix and the real command in
//! ML_CONTAINER_LAUNCH; the task's other arguments arrive as ours. Exec'ing
//! here, after slurmstepd's own exec, keeps TaskProlog, TMPDIR, rlimits and
//! cgroup placement intact.
#![forbid(unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use slurm_ml_container::launch::{LaunchSpec, LAUNCH_ENV};

fn main() -> ExitCode {
    let spec = match std::env::var(LAUNCH_ENV)
        .map_err(|e| e.to_string())
        .and_then(|t| LaunchSpec::decode(&t))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "ml-container-launch: {LAUNCH_ENV} is missing or invalid ({e}); this program is \
                 started by the ml-container Slurm plugin, not by hand"
            );
            return ExitCode::from(127);
        }
    };
    let err = Command::new(&spec.prefix[0])
        .args(&spec.prefix[1..])
        .arg(&spec.command)
        .args(std::env::args_os().skip(1))
        .env_remove(LAUNCH_ENV)
        .exec();
    eprintln!("ml-container-launch: cannot run {}: {err}", spec.prefix[0]);
    ExitCode::from(127)
}
