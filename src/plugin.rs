//! What the plugin does in each SPANK callback, written against the narrow
//! [`Host`] trait so that it is safe Rust and testable without Slurm. The
//! `spank` module implements `Host` over a real `spank_t` and calls these
//! functions from the exported callbacks.
//!
//! Contexts (spank(8)): `Local` is srun, `Allocator` is sbatch/salloc,
//! `Remote` is slurmstepd on each node (and the tasks it forks).
#![forbid(unsafe_code)]

use std::fmt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::capture::{self, StepDir};
use crate::config::{ConfigError, PlugstackArgs, RuntimeKind, SiteConfig};
use crate::distenv::{self, DistError, TaskFacts, BATCH_STEP};
use crate::integrity::{self, IntegrityError, Verified};
use crate::launch::{self, LaunchError, Plan};
use crate::options::{OptionError, OptionId, OptionSpec, UserOptions, OPTIONS};
use crate::probe::{self, MasterProbe};
use crate::prom;
use crate::registry::{self, Opened, Pin, Registry, RegistryError, UserCheck, PIN_ENV};
use crate::report::{self, ImageInfo, NodeState, Report, TaskOutcome};
use crate::secure;

/// spank_context_t, as far as the plugin cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    Local,
    Remote,
    Allocator,
    Slurmd,
    JobScript,
    Error,
}

impl Context {
    /// Contexts in which user options exist (spank(8): srun, sbatch/salloc,
    /// slurmstepd).
    pub fn has_options(self) -> bool {
        matches!(self, Context::Local | Context::Remote | Context::Allocator)
    }
}

/// A failed call into Slurm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    Spank {
        call: &'static str,
        what: String,
        code: u32,
        message: String,
    },
    /// A string with an interior NUL cannot cross into C.
    Nul(String),
    /// The running Slurm lacks this call.
    Unsupported(&'static str),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::Spank {
                call,
                what,
                code,
                message,
            } => write!(f, "{call}({what}) failed: {message} (code {code})"),
            HostError::Nul(s) => write!(f, "'{}' contains a NUL byte", s.escape_default()),
            HostError::Unsupported(call) => write!(f, "this Slurm has no {call}"),
        }
    }
}

/// The Slurm side of the plugin, reduced to what the plugin needs.
pub trait Host {
    fn context(&self) -> Context;
    /// A variable of the job's environment (in srun/sbatch: the process's).
    fn getenv(&self, name: &str) -> Option<String>;
    fn job_id(&self) -> Option<u32>;
    fn step_id(&self) -> Option<u32>;
    fn node_id(&self) -> Option<u32>;
    fn register_option(&mut self, spec: &OptionSpec) -> Result<(), HostError>;
    /// Sets (or with `None` removes) a variable in srun's own environment,
    /// which srun hands to the step's tasks.
    fn set_local_env(&mut self, name: &str, value: Option<&str>);
    /// Sets a variable in the job's (task's) environment, overwriting.
    fn set_job_env(&mut self, name: &str, value: &str) -> Result<(), HostError>;
    /// The task's argv (task context).
    fn job_argv(&self) -> Option<Vec<String>>;
    /// Replaces the task's `argv[0]` in place (task context).
    fn set_argv0(&mut self, value: &str) -> Result<(), HostError>;
    /// In task_exit: the task's wait(2) status, global and local ids.
    fn task_exit_status(&self) -> Option<i32>;
    fn task_global_id(&self) -> Option<u32>;
    fn task_local_id(&self) -> Option<u32>;
    /// Tasks of this step on this node.
    fn local_task_count(&self) -> Option<u32>;
    /// The job's uid and gid.
    fn job_ids(&self) -> Option<(u32, u32)>;
    /// On a node: whether the job was cancelled (scancel) while the plugin
    /// works, asked between chunks of long work (hashing an image); it
    /// rate-limits itself. Slurm sends slurmstepd no signal before the
    /// tasks exist, so this asks the controller. Default: never.
    fn cancelled(&self) -> bool {
        false
    }
    /// Runs `f` on a thread whose file-system identity is the job's user
    /// (fsuid, fsgid and supplementary groups), so that root in slurmstepd
    /// asks "may the user read this" as the user and learns nothing the
    /// user could not. Default (srun, tests: already the user): in place.
    fn as_job_user(&self, f: &mut (dyn FnMut() + Send)) -> Result<(), HostError> {
        f();
        Ok(())
    }
}

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

/// What the plugin knows in this process, between callbacks.
#[derive(Debug)]
struct State {
    /// The config, or the one-line reason it cannot be used.
    config: Option<Result<SiteConfig, String>>,
    options: UserOptions,
    /// A problem found on a node, reported from the task (PLATFORM.md:
    /// errors from slurmstepd's own callbacks do not reach the srun user).
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
    /// other local tasks still ran (issue 14: a probe after every rank has
    /// exited tells nothing).
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
        Context::Local | Context::Allocator => {
            let config = config.map_err(PluginError::Config)?;
            let image = st.options.image.clone().ok_or(PluginError::NoImage)?;
            log::debug!("options: {}", st.options.summary());
            launch::check_user_binds(&config, &st.options.mounts)?;
            if ctx == Context::Local {
                record_srun_argv(host);
            }
            resolve_in_srun(host, &config, &image, ctx == Context::Local)
        }
        Context::Remote => {
            let step = host.step_id().unwrap_or(u32::MAX);
            log::info!(
                "job {} step {} node {}: options received: {}",
                fmt_id(host.job_id()),
                fmt_id(Some(step)),
                fmt_id(host.node_id()),
                st.options.summary()
            );
            if step >= SLURM_PSEUDO_STEPS {
                // The batch script, extern and interactive steps are not
                // containerized; their srun steps are.
                return Ok(());
            }
            let began = now_ms();
            let outcome = config
                .map_err(|e| PluginError::Config(format!("on this node: {e}")))
                .and_then(|config| prepare_on_node(host, &config, &st.options));
            st.started_ms = now_ms();
            st.prepare_ms = u64::try_from(st.started_ms.saturating_sub(began)).unwrap_or(0);
            st.oom_at_start = probe::oom_kills();
            match outcome {
                Ok(plan) => {
                    st.step_dir = make_step_dir(host, step);
                    st.plan = Some(plan);
                }
                Err(e) => {
                    let msg = format!("node {}: {e}", hostname());
                    log::error!("{msg}");
                    st.deferred = Some(msg);
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// On a node, as root, before any task starts: the step's directory for
/// what failed tasks leave the report ([`capture`]). Without it the report
/// has no stderr tail; the step runs all the same.
fn make_step_dir(host: &dyn Host, step: u32) -> Option<StepDir> {
    let (uid, gid) = host.job_ids()?;
    let name = capture::step_dir_name(host.job_id().unwrap_or(0), step, &hostname());
    match StepDir::create(std::path::Path::new(capture::BASE), &name, uid, gid) {
        Ok(d) => Some(d),
        Err(e) => {
            log::warn!("{e}");
            None
        }
    }
}

/// `slurm_spank_task_post_fork`, in slurmstepd (root) after each task is
/// forked: its start time for the report.
pub fn task_post_fork(host: &mut dyn Host) -> Result<(), PluginError> {
    fault_injection(host, "task_post_fork");
    let mut st = state();
    if st.plan.is_none() {
        return Ok(());
    }
    if let Some(rank) = host.task_global_id() {
        let now = u64::try_from(now_ms()).unwrap_or(u64::MAX);
        st.task_starts.push((rank, now));
    }
    Ok(())
}

/// Step ids from here up are Slurm's pseudo steps (SLURM_BATCH_SCRIPT
/// 0xfffffffb, SLURM_EXTERN_CONT 0xfffffffc, SLURM_INTERACTIVE_STEP ...).
const SLURM_PSEUDO_STEPS: u32 = 0xffff_fff0;

/// srun (pin = true) or sbatch/salloc (check only): resolve where the
/// registry is readable, so a bad image fails before any node is used.
fn resolve_in_srun(
    host: &mut dyn Host,
    config: &SiteConfig,
    image: &str,
    pin: bool,
) -> Result<(), PluginError> {
    let registry = match Registry::open(&config.registry) {
        Ok(r) => r,
        Err(RegistryError::Unavailable { root, source }) => {
            log::debug!(
                "registry {} not readable here ({source}); the nodes resolve '{image}'",
                root.display()
            );
            if pin {
                host.set_local_env(PIN_ENV, None);
            }
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let Opened {
        pin: resolved,
        mut file,
        meta,
    } = registry.resolve_open(image, None)?;
    integrity::quick_file(&mut file, &meta, &resolved.path, resolved.catalog_size)?;
    log::debug!(
        "image '{image}' is {} ({} bytes)",
        resolved.path.display(),
        resolved.size
    );
    if pin {
        host.set_local_env(PIN_ENV, Some(&resolved.encode()));
    }
    Ok(())
}

/// srun's own argv, so the nodes can tell which command the user typed
/// (srun replaces a bare command name with the host path it found).
pub const ARGV_ENV: &str = "ML_CONTAINER_SRUN_ARGV";
/// Longer argv records are not kept (the lookup then keeps srun's path).
const MAX_ARGV_RECORD: usize = 64 << 10;

fn record_srun_argv(host: &mut dyn Host) {
    let record = std::fs::read("/proc/self/cmdline").ok().and_then(|raw| {
        let argv: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let text =
            toml::Value::Array(argv.into_iter().map(toml::Value::String).collect()).to_string();
        (text.len() <= MAX_ARGV_RECORD).then_some(text)
    });
    host.set_local_env(ARGV_ENV, record.as_deref());
}

fn recorded_srun_argv(host: &dyn Host) -> Vec<String> {
    host.getenv(ARGV_ENV)
        .and_then(|t| toml::from_str::<toml::Table>(&format!("a = {t}")).ok())
        .and_then(|mut t| t.remove("a"))
        .and_then(|v| v.try_into::<Vec<String>>().ok())
        .unwrap_or_default()
}

/// On a node, as root: the image this step runs, verified, and how to run
/// each task in it. The image is resolved here, from the catalog this node
/// reads; srun's pin (the job environment, which the user controls) may
/// only confirm it. The user's right to read the image is asked as the
/// user before root opens it; the hash stops when the job is cancelled.
fn prepare_on_node(
    host: &dyn Host,
    config: &SiteConfig,
    opts: &UserOptions,
) -> Result<(Pin, Plan), PluginError> {
    let image = opts.image.as_deref().ok_or(PluginError::NoImage)?;
    let registry = Registry::open(&config.registry)?;
    let may_read = |path: &Path| user_may_read(host, path);
    let check = UserCheck {
        user: job_user_name(host),
        may_read: &may_read,
    };
    let opened = registry.resolve_open(image, Some(&check))?;
    if let Some(text) = host.getenv(PIN_ENV) {
        opened.pin.confirms(&Pin::decode(&text)?)?;
    }
    let Opened { pin, file, meta } = opened;
    // The node cache copies from this very descriptor (pread: the offset
    // integrity's reads move does not matter).
    let source = file.try_clone().ok();
    let how = integrity::verify(
        &pin,
        file,
        &meta,
        registry.verify_level(),
        Some(config.registry.hash_cache.as_path()),
        &|| host.cancelled(),
    )?;
    log::info!(
        "image {} = {} verified: {}",
        registry::escaped(&pin.display_name()),
        registry::escaped(&pin.path.to_string_lossy()),
        match how {
            Verified::Quick => "size and SIF structure".to_string(),
            Verified::Cached => "sha256 (cached on this node)".to_string(),
            Verified::Hashed { millis } => format!("sha256 hashed in {millis} ms"),
        }
    );
    let runtime = launch::runtime_binary(config).ok_or_else(|| {
        PluginError::Node(format!(
            "the container runtime '{}' is not installed (looked in {}); install it or set \
             runtime.path in the site config",
            launch::runtime_name(config.runtime.kind),
            launch::RUNTIME_DIRS.join(", ")
        ))
    })?;
    let (binds, note) = launch::binds(config, &opts.mounts, &|p| p.exists())?;
    if let Some(n) = note {
        log::info!("{n}");
    }
    let image_path = match source {
        Some(src) => from_node_cache(host, config, &pin, &src),
        None => pin.path.clone(),
    };
    let plan = Plan {
        kind: config.runtime.kind,
        runtime,
        image: image_path,
        // Decided per task: Slurm sets the GPU variables in the task's
        // environment (SLURM_STEP_GPUS), not yet here.
        nv: false,
        binds,
        workdir: opts.workdir.clone(),
        writable_tmpfs: opts.writable_tmpfs,
        extra_args: config.runtime.extra_args.clone(),
        quiet: config.runtime.quiet,
    };
    Ok((pin, plan))
}

/// The path the tasks run the image from: the node cache's copy when
/// `registry.node_cache` is set (copied on first use, hashed while copying
/// against the catalog's sha256, held in use until this step ends), else,
/// and on any cache failure (one log line), the registry's file.
fn from_node_cache(
    host: &dyn Host,
    config: &SiteConfig,
    pin: &Pin,
    src: &std::fs::File,
) -> std::path::PathBuf {
    let node = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.split('.').next().unwrap_or_default().to_string())
        .unwrap_or_default();
    let Some(dir) = config.registry.node_cache.for_host(&node) else {
        return pin.path.clone();
    };
    let cache = crate::node_cache::Cache {
        dir,
        max: config.registry.node_cache_max.0,
    };
    let suffix = crate::node_cache::suffix_of(&pin.path);
    match cache.provide(pin.sha256.as_deref(), pin.size, suffix, src, &|| {
        host.cancelled()
    }) {
        Ok((lease, outcome)) => {
            let path = crate::node_cache::hold(lease);
            match outcome {
                crate::node_cache::Outcome::Hit => log::info!(
                    "node cache: {} from {} (cached)",
                    registry::escaped(&pin.display_name()),
                    path.display()
                ),
                crate::node_cache::Outcome::Copied { bytes, millis } => log::info!(
                    "node cache: copied {} ({bytes} bytes, sha256 ok) from {} to {} in {millis} ms",
                    registry::escaped(&pin.display_name()),
                    registry::escaped(&pin.path.to_string_lossy()),
                    path.display()
                ),
            }
            path
        }
        Err(e) => {
            log::warn!(
                "node cache {}: not used for {} ({}); running it from the registry",
                cache.dir.display(),
                registry::escaped(&pin.display_name()),
                registry::escaped(&e.to_string())
            );
            pin.path.clone()
        }
    }
}

/// The job's user name for messages (the uid when it has none).
fn job_user_name(host: &dyn Host) -> String {
    match host.job_ids() {
        Some((uid, _)) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map_or_else(|| format!("uid {uid}"), |u| u.name),
        None => "?".to_string(),
    }
}

/// Whether the job's user can open `path` for reading, asked as the user
/// (the one safe open: a FIFO or a symlink is refused without blocking).
/// A file that is not a regular one passes here: root's own safe open
/// refuses it next, with the message that says so.
fn user_may_read(host: &dyn Host, path: &Path) -> std::io::Result<()> {
    let path = path.to_path_buf();
    let mut outcome = Err(std::io::Error::other(
        "the check as the job's user did not run",
    ));
    host.as_job_user(&mut || {
        outcome = match secure::open_regular(&path) {
            Ok(_) | Err(secure::TrustError::NotRegular { .. }) => Ok(()),
            Err(secure::TrustError::Io { source, .. }) => Err(source),
            Err(other) => Err(std::io::Error::other(other.to_string())),
        };
    })
    .map_err(|e| std::io::Error::other(format!("cannot act as the job's user: {e}")))?;
    outcome
}

/// Bind sources the job's user cannot see, asked as the user: root's own
/// answer would tell the user whether a path they cannot see exists. When
/// the check cannot run as the user, nothing is reported.
fn missing_as_user(host: &dyn Host, binds: &[crate::options::Mount]) -> Vec<std::path::PathBuf> {
    let sources: Vec<std::path::PathBuf> = binds.iter().map(|b| b.src.clone()).collect();
    let mut missing = Vec::new();
    let asked = host.as_job_user(&mut || {
        missing = sources.iter().filter(|p| !p.exists()).cloned().collect();
    });
    match asked {
        Ok(()) => missing,
        Err(e) => {
            log::warn!("cannot check bind sources as the job's user: {e}");
            Vec::new()
        }
    }
}

/// The prefix that makes Apptainer/Singularity put a variable into the
/// container over the image's own `%environment` (Apptainer docs,
/// "Environment and Metadata": APPTAINERENV_ beats both).
fn runtime_env_prefix(kind: RuntimeKind) -> Option<&'static str> {
    match kind {
        RuntimeKind::Apptainer => Some("APPTAINERENV_"),
        RuntimeKind::Singularity => Some("SINGULARITYENV_"),
        RuntimeKind::Charliecloud => None,
    }
}

/// Sets the contract for this task: each variable the user has not set,
/// and, so that the image's `%environment` cannot override it, the
/// runtime's prefixed copy of the value in effect (the user's or ours).
///
/// A task that runs an elastic launcher (torchrun) gets the step's
/// MASTER_ADDR/MASTER_PORT and the site's variables only: the launcher
/// numbers its own workers ([`distenv::PER_WORKER`]).
fn set_task_env(host: &mut dyn Host, config: &SiteConfig) -> Result<(), PluginError> {
    let facts = TaskFacts::from_env(&|k| host.getenv(k))?;
    let mut vars = distenv::contract(config, &facts)?;
    if distenv::is_elastic_launcher(&host.job_argv().unwrap_or_default()) {
        vars.retain(|(k, _)| !distenv::PER_WORKER.contains(&k.as_str()));
    }
    let prefix = runtime_env_prefix(config.runtime.kind);
    let mut effective = Vec::with_capacity(vars.len());
    let ours = distenv::to_set(vars.clone(), &|k| host.getenv(k));
    for (k, v) in vars {
        let value = if ours.iter().any(|(ok, _)| *ok == k) {
            host.set_job_env(&k, &v)?;
            v
        } else {
            host.getenv(&k).unwrap_or(v)
        };
        effective.push((k, value));
    }
    if let Some(prefix) = prefix {
        for (k, v) in &effective {
            let name = format!("{prefix}{k}");
            if host.getenv(&name).is_none() {
                host.set_job_env(&name, v)?;
            }
        }
    }
    log::debug!(
        "rank {}: {}",
        facts.rank,
        effective
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

/// The batch script: MASTER_ADDR/MASTER_PORT of the job, recorded as ours
/// so that the script's srun steps compute their own.
fn set_batch_env(host: &mut dyn Host, config: &SiteConfig) -> Result<(), PluginError> {
    let job_id = host.job_id().unwrap_or(0);
    let nodes = host
        .getenv("SLURM_JOB_NODELIST")
        .ok_or(DistError::Missing {
            var: "SLURM_JOB_NODELIST",
        })?;
    let vars = distenv::batch_contract(config, job_id, &nodes)?;
    let set = distenv::to_set(vars, &|k| host.getenv(k));
    for (k, v) in &set {
        host.set_job_env(k, v)?;
    }
    if !set.is_empty() {
        host.set_job_env(distenv::OWNED_ENV, &distenv::owned_record(&set))?;
    }
    Ok(())
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".to_string())
}

/// `slurm_spank_task_init`: in each task, as the user. Problems found in
/// slurmstepd are reported here, where the user's stderr is; then the
/// distributed environment is set and the task is wrapped in
/// `<runtime> exec IMAGE`. A batch script only gets MASTER_ADDR/MASTER_PORT.
pub fn task_init(host: &mut dyn Host) -> Result<(), PluginError> {
    fault_injection(host, "task_init");
    let st = state();
    // Before `any()`: a bad image value leaves no option set, and the
    // step must still fail rather than run outside the container.
    if let Some(e) = &st.deferred {
        return Err(PluginError::Node(e.clone()));
    }
    if !st.options.any() {
        return Ok(());
    }
    let Some(Ok(config)) = &st.config else {
        return Ok(());
    };
    let dist = st.options.dist.unwrap_or(config.distributed.enabled);
    if host.step_id() == Some(BATCH_STEP) {
        if dist {
            set_batch_env(host, config)?;
        }
        return Ok(());
    }
    let Some((pin, plan)) = &st.plan else {
        return Ok(());
    };
    if dist {
        set_task_env(host, config)?;
    }
    let mut plan = plan.clone();
    plan.nv = launch::wants_nv(
        config,
        &st.options,
        launch::step_has_gpus(&|k| host.getenv(k)),
    );
    add_mpi_binds(&mut plan, config, host);
    let rank = host.task_global_id().unwrap_or(0);
    let capture = st
        .step_dir
        .as_ref()
        .map(|d| prepare_capture(host, config, &mut plan, d, rank))
        .transpose()?
        .flatten();
    check_as_user(&plan, &hostname())?;
    // The command: a bare name the user typed is looked up in the image.
    let task_argv = host.job_argv().unwrap_or_default();
    let resolved = task_argv.first().cloned().unwrap_or_default();
    let typed = launch::typed_command(&recorded_srun_argv(host), &task_argv);
    let bare = launch::container_argv0(typed.as_deref(), &resolved);
    let job = host.job_id().unwrap_or(0);
    let step = host.step_id().unwrap_or(0);
    let share = st
        .step_dir
        .as_ref()
        .filter(|_| config.runtime.share_namespaces)
        .and_then(|d| {
            crate::share::Share::for_plan(
                &plan,
                &d.path,
                &crate::share::instance_name(job, step),
                host.local_task_count().unwrap_or(1),
            )
        });
    match &share {
        None => log::info!(
            "task {}: runtime command: {} {}",
            host.getenv("SLURM_PROCID").unwrap_or_default(),
            plan.prefix().join(" "),
            bare.as_deref().unwrap_or(&resolved)
        ),
        Some(s) => log::info!(
            "task {}: runtime command: {} {} (in the step's shared container, started as: {})",
            host.getenv("SLURM_PROCID").unwrap_or_default(),
            s.exec.join(" "),
            bare.as_deref().unwrap_or(&resolved),
            s.start.join(" ")
        ),
    }
    // argv[0] becomes the launcher, which reads the prefix and the command
    // from the environment and runs them (TaskProlog, TMPDIR, rlimits and
    // cgroups are already in place: nothing is exec'd from task_init
    // itself). It stays the task's process so that a failed task can name
    // its report on its own stderr (src/bin/ml-container-launch.rs).
    let launcher = config.runtime.launcher.as_path();
    if !is_executable(launcher) {
        return Err(PluginError::Node(format!(
            "node {}: cannot run {}: the launcher {} is missing; install the \
             slurm-ml-container package on this node",
            hostname(),
            pin.display_name(),
            launcher.display()
        )));
    }
    let spec = launch::LaunchSpec {
        prefix: plan.prefix(),
        in_image: bare.is_some(),
        command: bare.unwrap_or(resolved),
        can_probe: matches!(plan.kind, RuntimeKind::Apptainer | RuntimeKind::Singularity),
        task: Some(launch::TaskLabel {
            job,
            step,
            rank: host.task_global_id().unwrap_or(0),
            node: hostname(),
            image: pin.display_name(),
        }),
        capture,
        share,
    };
    host.set_job_env(launch::LAUNCH_ENV, &spec.encode())?;
    host.set_argv0(&launcher.to_string_lossy())?;
    Ok(())
}

/// What a task leaves its report, in the step directory: the launcher's
/// stderr tail (`failure.capture_stderr` bytes, 0 = none) and, for
/// Apptainer and Singularity, TorchElastic's error file: the plugin sets
/// `TORCHELASTIC_ERROR_FILE` (and the runtime's prefixed copy) unless the
/// user set it, and binds the step directory into the container at the
/// same path so that torch, inside, can write it.
fn prepare_capture(
    host: &mut dyn Host,
    config: &SiteConfig,
    plan: &mut Plan,
    dir: &StepDir,
    rank: u32,
) -> Result<Option<launch::StderrCapture>, PluginError> {
    const TORCH_ENV: &str = "TORCHELASTIC_ERROR_FILE";
    if let Some(prefix) = runtime_env_prefix(config.runtime.kind) {
        if host.getenv(TORCH_ENV).is_none() {
            let file = dir.path.join(capture::torch_error_name(rank));
            let file = file.to_string_lossy();
            host.set_job_env(TORCH_ENV, &file)?;
            let prefixed = format!("{prefix}{TORCH_ENV}");
            if host.getenv(&prefixed).is_none() {
                host.set_job_env(&prefixed, &file)?;
            }
            if !plan.binds.iter().any(|b| b.dst == dir.path) {
                plan.binds.push(crate::options::Mount {
                    src: dir.path.clone(),
                    dst: dir.path.clone(),
                    read_only: false,
                });
            }
        }
    }
    Ok(
        (config.failure.capture_stderr > 0).then(|| launch::StderrCapture {
            file: dir.path.join(capture::stderr_name(rank)),
            bytes: config.failure.capture_stderr,
        }),
    )
}

/// `srun --mpi=pmix`: Slurm's PMIx server directory (and munge's socket
/// directory) bound into the container ([`launch::mpi_binds`]). Slurm puts
/// PMIX_* into the task's environment, so this is decided per task, here,
/// as the user. The values come from the job's environment like a user's
/// own --ml-container-mounts, so the site's denied paths apply to them too.
fn add_mpi_binds(plan: &mut Plan, config: &SiteConfig, host: &dyn Host) {
    let denied = launch::denied_paths(config);
    for m in launch::mpi_binds(&|k| host.getenv(k), &|p| p.is_dir()) {
        if let Some(d) = launch::denied_by(&m.src, &denied) {
            log::warn!(
                "MPI bind {} not made: {} is denied by runtime.denied_binds",
                m.src.display(),
                d.display()
            );
        } else if !plan.binds.iter().any(|b| b.dst == m.dst) {
            plan.binds.push(m);
        }
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Checks, as the job's user, what the runtime would otherwise report as a
/// bare exit code 255 (PLATFORM.md): each with the node and the path.
fn check_as_user(plan: &Plan, node: &str) -> Result<(), PluginError> {
    let fail = |what: String| Err(PluginError::Node(format!("node {node}: {what}")));
    if !is_executable(&plan.runtime) {
        return fail(format!(
            "the container runtime {} is not executable here",
            plan.runtime.display()
        ));
    }
    // The one safe open, here as the user: a path swapped for a FIFO or a
    // symlink since slurmstepd verified it fails at once instead of
    // blocking the task.
    if let Err(e) = secure::open_regular(&plan.image) {
        return fail(format!(
            "cannot read image {}: {e}; ask the admins to make it readable (chmod o+r)",
            plan.image.display()
        ));
    }
    for b in &plan.binds {
        if let Err(e) = std::fs::metadata(&b.src) {
            return fail(format!(
                "bind source {} (for {}): {e}; create it or fix --ml-container-mounts",
                b.src.display(),
                b.dst.display()
            ));
        }
    }
    if let Some(w) = &plan.workdir {
        // A workdir inside a bind can be checked on the host; one inside
        // the image only by the runtime.
        let on_host = plan
            .binds
            .iter()
            .filter_map(|b| w.strip_prefix(&b.dst).ok().map(|rest| b.src.join(rest)))
            .next_back();
        if let Some(h) = on_host {
            if !h.is_dir() {
                return fail(format!(
                    "--ml-container-workdir {} does not exist ({} on the host): create it or \
                     pick another directory",
                    w.display(),
                    h.display()
                ));
            }
        }
    }
    Ok(())
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// `slurm_spank_task_exit`, in slurmstepd (root) after each local task of a
/// containerized step ends: a metrics line per task; when the node's last
/// task is done and one failed, the report (and a syslog line per failure).
/// Reporting problems are logged, never turned into a step failure.
pub fn task_exit(host: &mut dyn Host) -> Result<(), PluginError> {
    fault_injection(host, "task_exit");
    let mut guard = state();
    // Disjoint borrows of the fields: nothing is cloned per task.
    let State {
        config,
        options,
        plan,
        started_ms,
        oom_at_start,
        outcomes,
        step_dir,
        task_starts,
        master_probe,
        prepare_ms,
        ..
    } = &mut *guard;
    let (Some(Ok(config)), Some((pin, plan))) = (config.as_ref(), plan.as_ref()) else {
        return Ok(());
    };
    let Some(status) = host.task_exit_status() else {
        return Ok(());
    };
    let mut outcome = TaskOutcome::from_wait_status(
        host.task_global_id().unwrap_or(u32::MAX),
        host.task_local_id().unwrap_or(u32::MAX),
        status,
    );
    let ended = now_ms();
    outcome.ended_unix_ms = u64::try_from(ended).ok();
    outcome.started_unix_ms = task_starts
        .iter()
        .find(|(r, _)| *r == outcome.rank)
        .map(|(_, t)| *t);
    let job = host.job_id().unwrap_or(0);
    let step = host.step_id().unwrap_or(0);
    let node = hostname();
    let line = report::metrics_line(
        job,
        step,
        &node,
        &pin.display_name(),
        &outcome,
        ended.saturating_sub(*started_ms),
    );
    if let Err(e) = report::append_line(config.failure.metrics_log.as_path(), &line) {
        log::warn!(
            "cannot append to {}: {e}",
            config.failure.metrics_log.as_path().display()
        );
    }
    if outcome.failed() && config.failure.syslog {
        report::syslog(&format!(
            "job {job} step {step} node {node} rank {} {} (image {})",
            outcome.rank,
            outcome.describe(),
            pin.display_name()
        ));
    }
    if outcome.failed() {
        if let Some(d) = step_dir.as_ref() {
            let cap = usize::try_from(config.failure.capture_stderr).unwrap_or(0);
            if cap > 0 {
                if let Some(f) = d.read(&capture::stderr_name(outcome.rank), cap) {
                    outcome.stderr_tail = capture::tail_lines(&f.bytes, capture::TAIL_LINES);
                    outcome.last_stderr_unix_ms = f.modified_unix_ms;
                }
            }
            outcome.torch_error = d
                .read(
                    &capture::torch_error_name(outcome.rank),
                    capture::TORCH_ERROR_CAP,
                )
                .and_then(|f| capture::parse_torch_error(&f.bytes));
        }
    }
    let local_tasks = host.local_task_count();
    let still_running = local_tasks.map_or(0, |n| (n as usize).saturating_sub(outcomes.len() + 1));
    // The master probe where it can tell something: at this node's first
    // failure of its own (not a stop by Slurm), while other tasks of the
    // step still run here. Never after every local rank has exited.
    let options_dist = options.dist.unwrap_or(config.distributed.enabled);
    if outcome.failed()
        && !report::stopped_by_slurm(&outcome)
        && master_probe.is_none()
        && !outcomes.iter().any(TaskOutcome::failed)
        && still_running > 0
        && options_dist
    {
        *master_probe = probe_own_master(host, config).map(|mut m| {
            m.when = Some(format!(
                "when rank {} failed, with {still_running} other task(s) of the step still \
                 running on {node}",
                outcome.rank
            ));
            m.at_unix_ms = u64::try_from(now_ms()).ok();
            m
        });
    }
    outcomes.push(outcome);
    let all_done = local_tasks.is_none_or(|n| outcomes.len() >= n as usize);
    if !all_done {
        return Ok(());
    }
    if let Some(dir) = config.failure.prometheus_dir.as_path() {
        let step_ms = u64::try_from(now_ms().saturating_sub(*started_ms)).unwrap_or(u64::MAX);
        let oom = probe::step_oom_kills(job, step)
            .map(|(_, o)| o.total)
            .or_else(|| match (*oom_at_start, probe::oom_kills()) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                _ => None,
            })
            .unwrap_or(0);
        let sample = prom::StepSample {
            image: prom::image_label(pin),
            tasks: outcomes.iter().map(prom::exit_class).collect(),
            oom_kills: oom,
            step_ms,
            prepare_ms: *prepare_ms,
        };
        if let Err(e) = prom::record(dir, &sample) {
            log::warn!("Prometheus metrics not updated: {e}");
        }
    }
    if outcomes.iter().any(TaskOutcome::failed) {
        let rep = build_report(
            host,
            config,
            pin,
            plan,
            outcomes,
            *started_ms,
            *oom_at_start,
            options_dist,
            master_probe.clone(),
        );
        match host.job_ids() {
            None => log::error!("no job uid/gid from Slurm: not writing the failure report"),
            Some((uid, gid)) => match rep.write(config.failure.report_dir.as_path(), uid, gid) {
                Ok(path) => log::info!("failure report: {}", path.display()),
                Err(e) => log::error!(
                    "cannot write the failure report under {}: {e}",
                    config.failure.report_dir.as_path().display()
                ),
            },
        }
    }
    if let Some(d) = step_dir.take() {
        // Before the directory goes: the shared container's records are
        // in it (src/share.rs).
        let gid = host.job_ids().map_or(d.uid, |(_, g)| g);
        if let Some((level, line)) = crate::share::finish(
            &d,
            &plan.runtime,
            &crate::share::instance_name(job, step),
            gid,
        ) {
            log::log!(level, "{line}");
        }
        d.remove();
    }
    Ok(())
}

/// The plugin's own MASTER_ADDR:MASTER_PORT (Slurm's step facts and the
/// site config, never the job environment: issue 10, L5), probed within
/// `failure.probe_timeout`.
fn probe_own_master(host: &dyn Host, config: &SiteConfig) -> Option<MasterProbe> {
    let timeout = std::time::Duration::from_secs(u64::from(config.failure.probe_timeout));
    let mut by_name = config.clone();
    by_name.distributed.addr = crate::config::AddrKind::Hostname;
    let get = |k: &str| host.getenv(k);
    let vars = distenv::facts_for(&get, None)
        .and_then(|f| distenv::contract(&by_name, &f))
        .ok()?;
    let val = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let port = val("MASTER_PORT")?.parse().ok()?;
    Some(probe::probe_master(&val("MASTER_ADDR")?, port, timeout))
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    host: &dyn Host,
    config: &SiteConfig,
    pin: &Pin,
    plan: &Plan,
    outcomes: &[TaskOutcome],
    started_ms: u128,
    oom_at_start: Option<u64>,
    dist: bool,
    master: Option<MasterProbe>,
) -> Report {
    let timeout = std::time::Duration::from_secs(u64::from(config.failure.probe_timeout));
    let get = |k: &str| host.getenv(k);
    // The node's share of the contract: values the user set win, RANK and
    // LOCAL_RANK are per task (see `tasks`).
    // The contract with MASTER_ADDR as the host name (Slurm's step node
    // list, which slurmstepd sets over the user's environment): with
    // `distributed.addr = "ip"` the contract would resolve it here, without
    // a deadline; the probe resolves it within probe_timeout instead.
    let mut by_name = config.clone();
    by_name.distributed.addr = crate::config::AddrKind::Hostname;
    let (contract, dist_error): (std::collections::BTreeMap<String, String>, _) = if dist {
        match distenv::facts_for(&get, None).and_then(|f| distenv::contract(&by_name, &f)) {
            Ok(vars) => (
                vars.into_iter()
                    .filter(|(k, _)| k != "RANK" && k != "LOCAL_RANK" && k != "NODE_RANK")
                    .collect(),
                None,
            ),
            Err(e) => (Default::default(), Some(e.to_string())),
        }
    } else {
        (Default::default(), None)
    };
    // What the tasks had: a value the user set wins (it is what they ran
    // with), escaped and capped like every job string in a report.
    let environment: std::collections::BTreeMap<String, String> = contract
        .iter()
        .map(|(k, v)| {
            let v = get(k).map_or_else(|| v.clone(), |u| crate::jobtext::field(&u));
            (k.clone(), v)
        })
        .collect();
    // Read at the end only: the step's cgroup is made for the step, so its
    // counter started at zero (and slurmstepd may join it after spank_init).
    let step_oom = probe::step_oom_kills(host.job_id().unwrap_or(0), host.step_id().unwrap_or(0));
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let (memory_total_kb, memory_available_kb) = probe::memory_kb(&meminfo);
    let (uid, _) = host.job_ids().unwrap_or((u32::MAX, u32::MAX));
    let mut rep = Report {
        version: 1,
        job_id: host.job_id().unwrap_or(0),
        step_id: host.step_id().unwrap_or(0),
        node: hostname(),
        uid,
        user: nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name),
        image: ImageInfo {
            reference: pin.reference.clone(),
            name: pin.name.clone(),
            tag: pin.tag.clone(),
            path: pin.path.clone(),
            sha256: pin.sha256.clone(),
        },
        runtime_command: plan.prefix(),
        environment,
        tasks: outcomes.to_vec(),
        step_started_unix_ms: started_ms,
        last_task_ended_unix_ms: now_ms(),
        node_state: NodeState {
            memory_total_kb,
            memory_available_kb,
            oom_kills_during_step: match (oom_at_start, probe::oom_kills()) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                _ => None,
            },
            step_memory_cgroup: step_oom.as_ref().map(|(cg, _)| cg.dir.clone()),
            oom_kills_in_step_cgroup: step_oom.as_ref().map(|(_, o)| o.total),
            oom_kills_by_local_task: step_oom.map(|(_, o)| o.by_local_task).unwrap_or_default(),
            listening_ports: probe::read_listening_ports(),
            gpus: probe::gpus(timeout),
            master,
        },
        issues_found: Vec::new(),
        recommendations: Vec::new(),
    };
    let ctx = report::Context {
        runtime_is_apptainer: matches!(
            plan.kind,
            RuntimeKind::Apptainer | RuntimeKind::Singularity
        ),
        dist_enabled: dist,
        dist_error,
        gpus_requested: launch::step_has_gpus(&get)
            || ["SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK"]
                .iter()
                .any(|k| get(k).is_some())
            || get("SLURM_TRES_PER_TASK").is_some_and(|v| v.contains("gpu")),
        // From the fstat of the fd that was verified: no path lookup as root.
        image_readable_by_others: pin.mode.is_some_and(|m| m & 0o004 != 0),
        missing_bind_sources: missing_as_user(host, &plan.binds),
    };
    rep.analyze(&ctx);
    rep
}

fn fmt_id(id: Option<u32>) -> String {
    match id {
        // SLURM_BATCH_SCRIPT and friends are large sentinels; print them as is.
        Some(v) => v.to_string(),
        None => "?".to_string(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The plugin's state is per process, as in Slurm: tests that go
    /// through it take this lock.
    static SERIAL: Mutex<()> = Mutex::new(());

    struct FakeHost {
        ctx: Context,
        env: HashMap<String, String>,
        registered: Vec<&'static str>,
    }

    impl FakeHost {
        fn new(ctx: Context) -> FakeHost {
            FakeHost {
                ctx,
                env: HashMap::new(),
                registered: Vec::new(),
            }
        }
    }

    impl Host for FakeHost {
        fn context(&self) -> Context {
            self.ctx
        }
        fn getenv(&self, name: &str) -> Option<String> {
            self.env.get(name).cloned()
        }
        fn job_id(&self) -> Option<u32> {
            Some(7)
        }
        fn step_id(&self) -> Option<u32> {
            Some(0)
        }
        fn node_id(&self) -> Option<u32> {
            Some(1)
        }
        fn register_option(&mut self, spec: &OptionSpec) -> Result<(), HostError> {
            self.registered.push(spec.name);
            Ok(())
        }
        fn set_local_env(&mut self, name: &str, value: Option<&str>) {
            match value {
                Some(v) => self.env.insert(name.to_string(), v.to_string()),
                None => self.env.remove(name),
            };
        }
        fn set_job_env(&mut self, name: &str, value: &str) -> Result<(), HostError> {
            self.env.insert(name.to_string(), value.to_string());
            Ok(())
        }
        fn job_argv(&self) -> Option<Vec<String>> {
            None
        }
        fn task_exit_status(&self) -> Option<i32> {
            None
        }
        fn task_global_id(&self) -> Option<u32> {
            None
        }
        fn task_local_id(&self) -> Option<u32> {
            None
        }
        fn local_task_count(&self) -> Option<u32> {
            None
        }
        fn job_ids(&self) -> Option<(u32, u32)> {
            None
        }
        fn set_argv0(&mut self, _: &str) -> Result<(), HostError> {
            Ok(())
        }
    }

    fn bad_config_args() -> (tempdir::Dir, Vec<String>) {
        let dir = tempdir::Dir::new();
        let path = dir.path().join("ml.toml");
        std::fs::write(&path, "[runtime]\ngpus = \"maybe\"\n").unwrap();
        (dir, vec![format!("config={}", path.display())])
    }

    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let p = std::env::temp_dir().join(format!(
                    "mlc-test-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn registers_every_option_where_options_exist() {
        let _g = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        for ctx in [Context::Local, Context::Remote, Context::Allocator] {
            let mut h = FakeHost::new(ctx);
            init(&mut h, &[]).unwrap();
            assert_eq!(h.registered.len(), OPTIONS.len());
        }
        let mut h = FakeHost::new(Context::Slurmd);
        init(&mut h, &[]).unwrap();
        assert!(h.registered.is_empty());
    }

    #[test]
    fn bad_option_fails_in_srun() {
        let _g = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        init(&mut FakeHost::new(Context::Local), &[]).unwrap();
        let e = on_option(OptionId::Gpus as i32, Some("bogus"), false).unwrap_err();
        assert!(e.to_string().contains("--ml-container-gpus"));
        assert!(on_option(42, Some("x"), false).is_err());
    }

    #[test]
    fn broken_config_fails_only_jobs_that_use_the_plugin() {
        let _g = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        let (_dir, args) = bad_config_args();
        let mut h = FakeHost::new(Context::Local);
        init(&mut h, &args).unwrap();
        init_post_opt(&mut h).unwrap();

        init(&mut h, &args).unwrap();
        on_option(OptionId::Image as i32, Some("pytorch"), false).unwrap();
        let e = init_post_opt(&mut h).unwrap_err().to_string();
        assert!(e.contains("ml.toml:2"), "{e}");
        assert!(e.contains("runtime.gpus"), "{e}");
    }

    #[test]
    fn broken_config_on_node_is_reported_from_the_task() {
        let _g = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        let (_dir, args) = bad_config_args();
        let mut h = FakeHost::new(Context::Remote);
        init(&mut h, &args).unwrap();
        on_option(OptionId::Image as i32, Some("pytorch"), true).unwrap();
        init_post_opt(&mut h).unwrap();
        let e = task_init(&mut h).unwrap_err().to_string();
        assert!(e.contains("runtime.gpus"), "{e}");
    }

    #[test]
    fn a_bad_value_only_the_node_sees_fails_the_task_with_sruns_message() {
        let _g = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        let srun_says = on_option(OptionId::Gpus as i32, Some("bo\ngus"), false)
            .unwrap_err()
            .to_string();
        for (id, value) in [(OptionId::Gpus, "bo\ngus"), (OptionId::Image, "demo\nFAKE")] {
            let mut h = FakeHost::new(Context::Remote);
            init(&mut h, &[]).unwrap();
            on_option(id as i32, Some(value), true).unwrap();
            init_post_opt(&mut h).unwrap();
            let e = task_init(&mut h).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e}");
            if id == OptionId::Gpus {
                assert_eq!(e, srun_says);
            } else {
                assert!(e.contains("invalid --ml-container='demo\\nFAKE'"), "{e}");
            }
        }
        // A clean job on the next step of the same process is not affected.
        let mut h = FakeHost::new(Context::Remote);
        init(&mut h, &[]).unwrap();
        init_post_opt(&mut h).unwrap();
        task_init(&mut h).unwrap();
    }

    #[test]
    fn state_survives_a_poisoned_lock() {
        let _g = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = std::thread::spawn(|| {
            let _st = state();
            panic!("poison the lock");
        })
        .join();
        assert!(STATE.is_poisoned());
        init(&mut FakeHost::new(Context::Local), &[]).unwrap();
        on_option(OptionId::Dist as i32, Some("off"), false).unwrap();
        assert_eq!(state().options.dist, Some(false));
    }
}
