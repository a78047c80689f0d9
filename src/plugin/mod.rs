//! What the plugin does in each SPANK callback, written against the narrow
//! [`Host`] trait so that it is safe Rust and testable without Slurm. The
//! `spank` module implements `Host` over a real `spank_t` and calls these
//! functions from the exported callbacks.
//!
//! Contexts (spank(8)): `Local` is srun, `Allocator` is sbatch/salloc,
//! `Remote` is slurmstepd on each node (and the tasks it forks). The code is
//! split by where it runs: [`host`] is the contract with the SPANK layer,
//! `srun` what runs in srun/sbatch/salloc, `task` the node's preparation
//! and each task's start, `exit` the node's side of a task's end. This file
//! holds the state they share between callbacks and the thin dispatch.
#![forbid(unsafe_code)]

use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::capture::StepDir;
use crate::config::{ConfigError, PlugstackArgs, SiteConfig};
use crate::distenv::DistError;
use crate::integrity::IntegrityError;
use crate::launch::{CheckError, LaunchError, Plan};
use crate::options::{OptionError, OptionId, UserOptions, OPTIONS};
use crate::probe::MasterProbe;
use crate::registry::{Pin, RegistryError};
use crate::report::TaskOutcome;

mod exit;
pub mod host;
mod srun;
mod task;
#[cfg(test)]
mod testhost;
#[cfg(test)]
mod tests;

pub use exit::task_exit;
pub use host::{Context, Host, HostError};
pub use task::{task_init, task_post_fork};

/// Why a callback fails the job. `Display` is the one line the user sees.
#[derive(Debug)]
pub enum PluginError {
    Option(OptionError),
    Config(String),
    Host(HostError),
    UnknownOption(i32),
    NoImage,
    Registry(RegistryError),
    Integrity(IntegrityError),
    /// A problem found in slurmstepd, reported from the task.
    Node(String),
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginError::Option(e) => write!(f, "{e}"),
            PluginError::Config(e) => write!(f, "configuration error: {e}"),
            PluginError::Host(e) => write!(f, "{e}"),
            PluginError::NoImage => write!(
                f,
                "--ml-container-* options need an image: add --ml-container=IMAGE"
            ),
            PluginError::Registry(e) => write!(f, "{e}"),
            PluginError::Integrity(e) => write!(f, "{e}"),
            PluginError::Node(e) => write!(f, "{e}"),
            PluginError::UnknownOption(v) => write!(
                f,
                "Slurm passed unknown option value {v}: is plugstack.conf loading an \
                 outdated spank_ml_container.so?"
            ),
        }
    }
}

impl From<OptionError> for PluginError {
    fn from(e: OptionError) -> Self {
        PluginError::Option(e)
    }
}

impl From<DistError> for PluginError {
    fn from(e: DistError) -> Self {
        PluginError::Node(format!("distributed environment: {e}"))
    }
}

impl From<LaunchError> for PluginError {
    fn from(e: LaunchError) -> Self {
        PluginError::Node(e.to_string())
    }
}

impl From<RegistryError> for PluginError {
    fn from(e: RegistryError) -> Self {
        PluginError::Registry(e)
    }
}

impl From<IntegrityError> for PluginError {
    fn from(e: IntegrityError) -> Self {
        PluginError::Integrity(e)
    }
}

impl From<HostError> for PluginError {
    fn from(e: HostError) -> Self {
        PluginError::Host(e)
    }
}

impl From<CheckError> for PluginError {
    fn from(e: CheckError) -> Self {
        PluginError::Node(e.to_string())
    }
}

/// What the plugin knows in this process, between callbacks.
#[derive(Debug)]
struct State {
    /// The config, or the one-line reason it cannot be used.
    config: Option<Result<SiteConfig, String>>,
    options: UserOptions,
    /// A problem found on a node, reported from the task: an error returned
    /// from slurmstepd's own callbacks reaches the slurmd log, never the srun
    /// user.
    deferred: Option<String>,
    /// On a node: the first option value that failed validation. srun
    /// checks what it is given, but values can reach the node only through
    /// the job environment (Slurm's `_SLURM_SPANK_OPTION_*` variables), and
    /// slurmstepd ignores a failed option callback: the step must fail
    /// with the message srun would have printed, not run without the option.
    option_error: Option<String>,
    /// On a node: the image every task of this step runs, and the runtime.
    plan: Option<(Pin, Plan)>,
    /// On a node: when the step started, the OOM-kill counter then, and
    /// how each local task ended so far.
    started_ms: u128,
    oom_at_start: Option<u64>,
    outcomes: Vec<TaskOutcome>,
    /// On a node: the step's directory for what failed tasks leave root
    /// (stderr tails, TorchElastic error files), when it could be made.
    step_dir: Option<StepDir>,
    /// On a node: when each local task was forked (rank, unix ms).
    task_starts: Vec<(u32, u64)>,
    /// On a node: the master probe made at the node's first failure while
    /// other local tasks still ran (a probe after every rank has exited
    /// tells nothing).
    master_probe: Option<MasterProbe>,
    /// On a node: how long the plugin's node-side preparation took (ms).
    prepare_ms: u64,
}

impl State {
    const fn new() -> State {
        State {
            config: None,
            options: UserOptions {
                image: None,
                mounts: Vec::new(),
                workdir: None,
                gpus: None,
                dist: None,
                writable_tmpfs: false,
            },
            deferred: None,
            option_error: None,
            plan: None,
            started_ms: 0,
            oom_at_start: None,
            outcomes: Vec::new(),
            step_dir: None,
            task_starts: Vec::new(),
            master_probe: None,
            prepare_ms: 0,
        }
    }
}

static STATE: Mutex<State> = Mutex::new(State::new());

/// The plugin state. A panic in an earlier callback poisons the mutex; the
/// state is still usable (each field is valid on its own), so the poison is
/// ignored rather than failing every later callback of the process.
fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A fresh state, as a new process would have (tests run many "processes"
/// in one).
#[cfg(test)]
fn reset() {
    *state() = State::new();
}

fn load_config(args: &[String]) -> Result<SiteConfig, ConfigError> {
    SiteConfig::load(&PlugstackArgs::parse(args)?)
}

/// `slurm_spank_init`: read the config, register the options.
pub fn init(host: &mut dyn Host, args: &[String]) -> Result<(), PluginError> {
    let ctx = host.context();
    fault_injection(host, "init");
    let config = load_config(args).map_err(|e| e.to_string());
    if let Err(e) = &config {
        // Not fatal here: only jobs that ask for the plugin fail because of
        // it (init_post_opt), every other job runs as before.
        log::debug!("{e}");
    }
    {
        let mut st = state();
        *st = State::new();
        st.config = Some(config);
    }
    if ctx.has_options() {
        for spec in OPTIONS {
            host.register_option(spec)?;
        }
    }
    Ok(())
}

/// The callback of every option: validate and remember the value. In srun,
/// sbatch and salloc an error here stops the command before any node runs
/// anything.
pub fn on_option(val: i32, arg: Option<&str>, remote: bool) -> Result<(), PluginError> {
    let id = OptionId::from_val(val).ok_or(PluginError::UnknownOption(val))?;
    let mut st = state();
    let result = st.options.apply(id, arg);
    match result {
        Err(e) if remote => {
            // The message is escaped (OptionError's Display) and so is the
            // log line (the log sink).
            log::error!("option received on the node is invalid: {e}");
            st.option_error.get_or_insert_with(|| e.to_string());
            // Recorded for task_init, where the user's stderr is; an error
            // returned here is only logged by slurmstepd.
            Ok(())
        }
        other => other.map_err(PluginError::from),
    }
}

/// `slurm_spank_init_post_opt`: the options are known; fail early if the
/// plugin was asked for and cannot work. In srun, resolve the image once and
/// pin it for the nodes; on a node, check the pin (or resolve, when srun
/// could not read the registry) and verify the image.
pub fn init_post_opt(host: &mut dyn Host) -> Result<(), PluginError> {
    fault_injection(host, "init_post_opt");
    let ctx = host.context();
    let mut st = state();
    if ctx == Context::Remote {
        if let Some(e) = st.option_error.clone() {
            // Exactly the line srun prints for the same value.
            st.deferred = Some(e);
            return Ok(());
        }
    }
    if !st.options.any() {
        return Ok(());
    }
    let config = match &st.config {
        Some(Ok(c)) => Ok(c.clone()),
        Some(Err(e)) => Err(e.clone()),
        None => Err("the plugin was not initialised".to_string()),
    };
    match ctx {
        Context::Local | Context::Allocator => srun::init_post_opt(host, ctx, config, &st.options),
        Context::Remote => task::init_post_opt(host, &mut st, config),
        _ => Ok(()),
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".to_string())
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Test-only: `ML_CONTAINER_TEST_PANIC=<callback>` in the job's environment
/// panics in that callback, so the cluster tests can prove the panic guard.
#[cfg(feature = "fault-injection")]
fn fault_injection(host: &dyn Host, callback: &str) {
    if host.getenv("ML_CONTAINER_TEST_PANIC").as_deref() == Some(callback) {
        panic!("injected panic in {callback} (fault-injection build)");
    }
}

#[cfg(not(feature = "fault-injection"))]
fn fault_injection(_: &dyn Host, _: &str) {}
