//! What the plugin does in each SPANK callback, written against the narrow
//! [`Host`] trait so that it is safe Rust and testable without Slurm. The
//! `spank` module implements `Host` over a real `spank_t` and calls these
//! functions from the exported callbacks.
//!
//! Contexts (spank(8)): `Local` is srun, `Allocator` is sbatch/salloc,
//! `Remote` is slurmstepd on each node (and the tasks it forks).
#![forbid(unsafe_code)]

use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::config::{ConfigError, PlugstackArgs, SiteConfig};
use crate::options::{OptionError, OptionId, OptionSpec, UserOptions, OPTIONS};

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
}

/// Why a callback fails the job. `Display` is the one line the user sees.
#[derive(Debug)]
pub enum PluginError {
    Option(OptionError),
    Config(String),
    Host(HostError),
    UnknownOption(i32),
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginError::Option(e) => write!(f, "{e}"),
            PluginError::Config(e) => write!(f, "configuration error: {e}"),
            PluginError::Host(e) => write!(f, "{e}"),
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
    let result = state().options.apply(id, arg);
    if let Err(e) = &result {
        if remote {
            log::error!("option received on the node is invalid: {e}");
        }
    }
    result.map_err(PluginError::from)
}

/// `slurm_spank_init_post_opt`: the options are known; fail early if the
/// plugin was asked for and cannot work.
pub fn init_post_opt(host: &mut dyn Host) -> Result<(), PluginError> {
    fault_injection(host, "init_post_opt");
    let ctx = host.context();
    let mut st = state();
    if !st.options.any() {
        return Ok(());
    }
    let config_error = match &st.config {
        Some(Ok(_)) => None,
        Some(Err(e)) => Some(e.clone()),
        None => Some("the plugin was not initialised".to_string()),
    };
    match ctx {
        Context::Local | Context::Allocator => {
            if let Some(e) = config_error {
                return Err(PluginError::Config(e));
            }
            log::debug!("options: {}", st.options.summary());
        }
        Context::Remote => {
            log::info!(
                "job {} step {} node {}: options received: {}",
                fmt_id(host.job_id()),
                fmt_id(host.step_id()),
                fmt_id(host.node_id()),
                st.options.summary()
            );
            if let Some(e) = config_error {
                log::error!("{e}");
                st.deferred = Some(format!("configuration error on this node: {e}"));
            }
        }
        _ => {}
    }
    Ok(())
}

/// `slurm_spank_task_init`: in each task, as the user. Problems found in
/// slurmstepd are reported here, where the user's stderr is.
pub fn task_init(host: &mut dyn Host) -> Result<(), PluginError> {
    fault_injection(host, "task_init");
    let st = state();
    if !st.options.any() {
        return Ok(());
    }
    match &st.deferred {
        Some(e) => Err(PluginError::Config(e.clone())),
        None => Ok(()),
    }
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
