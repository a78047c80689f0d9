//! A recording [`Host`] for the unit tests: it answers every query from
//! its fields (the environment from a map) and records every call the
//! plugin makes (options registered, variables set in srun's environment
//! and in the job's, `argv[0]` replaced, checks run as the job's user).
//! Also the site the tests run against: a registry, a runtime and a
//! launcher in a temporary directory, and the lock that serializes the
//! tests that go through the plugin's process-wide state.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{Context, Host, HostError};
use crate::options::OptionSpec;

/// One call the plugin made into the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Call {
    RegisterOption(&'static str),
    SetLocalEnv(String, Option<String>),
    SetJobEnv(String, String),
    SetArgv0(String),
}

#[derive(Debug)]
pub(super) struct TestHost {
    pub ctx: Context,
    /// The job's environment (in srun: the process's); the plugin's own
    /// writes land here too, as they do in Slurm.
    pub env: BTreeMap<String, String>,
    pub job_id: Option<u32>,
    pub step_id: Option<u32>,
    pub node_id: Option<u32>,
    pub argv: Option<Vec<String>>,
    pub exit_status: Option<i32>,
    pub global_id: Option<u32>,
    pub local_id: Option<u32>,
    pub local_tasks: Option<u32>,
    pub job_ids: Option<(u32, u32)>,
    /// `set_job_env` of this variable fails, as a Slurm error would.
    pub fail_set_job_env: Option<&'static str>,
    /// `as_job_user` cannot switch to the user.
    pub as_user_fails: bool,
    pub calls: Vec<Call>,
    pub as_user_calls: Cell<usize>,
}

impl TestHost {
    /// Job 7, step 0, node 0, nothing else known.
    pub fn new(ctx: Context) -> TestHost {
        TestHost {
            ctx,
            env: BTreeMap::new(),
            job_id: Some(7),
            step_id: Some(0),
            node_id: Some(0),
            argv: None,
            exit_status: None,
            global_id: None,
            local_id: None,
            local_tasks: None,
            job_ids: None,
            fail_set_job_env: None,
            as_user_fails: false,
            calls: Vec::new(),
            as_user_calls: Cell::new(0),
        }
    }

    /// Task `rank` (local id `local`) of `tasks` on this node, running `argv`.
    pub fn task(rank: u32, local: u32, tasks: u32, argv: &[&str]) -> TestHost {
        let mut h = TestHost::new(Context::Remote);
        h.global_id = Some(rank);
        h.local_id = Some(local);
        h.local_tasks = Some(tasks);
        h.argv = Some(argv.iter().map(|a| a.to_string()).collect());
        h
    }

    pub fn registered(&self) -> Vec<&'static str> {
        self.calls
            .iter()
            .filter_map(|c| match c {
                Call::RegisterOption(n) => Some(*n),
                _ => None,
            })
            .collect()
    }

    /// The last `set_local_env` of `name`: `Some(None)` when it was removed.
    pub fn local_env(&self, name: &str) -> Option<Option<&str>> {
        self.calls.iter().rev().find_map(|c| match c {
            Call::SetLocalEnv(n, v) if n == name => Some(v.as_deref()),
            _ => None,
        })
    }

    /// The last value the plugin set for `name` in the job's environment.
    pub fn job_env(&self, name: &str) -> Option<&str> {
        self.calls.iter().rev().find_map(|c| match c {
            Call::SetJobEnv(n, v) if n == name => Some(v.as_str()),
            _ => None,
        })
    }

    pub fn argv0_set(&self) -> Option<&str> {
        self.calls.iter().rev().find_map(|c| match c {
            Call::SetArgv0(v) => Some(v.as_str()),
            _ => None,
        })
    }

    /// Whether the plugin set or removed anything anywhere.
    pub fn changed_anything(&self) -> bool {
        self.calls
            .iter()
            .any(|c| !matches!(c, Call::RegisterOption(_)))
    }
}

impl Host for TestHost {
    fn context(&self) -> Context {
        self.ctx
    }
    fn getenv(&self, name: &str) -> Option<String> {
        self.env.get(name).cloned()
    }
    fn job_id(&self) -> Option<u32> {
        self.job_id
    }
    fn step_id(&self) -> Option<u32> {
        self.step_id
    }
    fn node_id(&self) -> Option<u32> {
        self.node_id
    }
    fn register_option(&mut self, spec: &OptionSpec) -> Result<(), HostError> {
        self.calls.push(Call::RegisterOption(spec.name));
        Ok(())
    }
    fn set_local_env(&mut self, name: &str, value: Option<&str>) {
        self.calls.push(Call::SetLocalEnv(
            name.to_string(),
            value.map(str::to_string),
        ));
        match value {
            Some(v) => self.env.insert(name.to_string(), v.to_string()),
            None => self.env.remove(name),
        };
    }
    fn set_job_env(&mut self, name: &str, value: &str) -> Result<(), HostError> {
        if self.fail_set_job_env == Some(name) {
            return Err(HostError::Spank {
                call: "spank_setenv",
                what: name.to_string(),
                code: 3,
                message: "Bad argument".to_string(),
            });
        }
        self.calls
            .push(Call::SetJobEnv(name.to_string(), value.to_string()));
        self.env.insert(name.to_string(), value.to_string());
        Ok(())
    }
    fn job_argv(&self) -> Option<Vec<String>> {
        self.argv.clone()
    }
    fn set_argv0(&mut self, value: &str) -> Result<(), HostError> {
        self.calls.push(Call::SetArgv0(value.to_string()));
        if let Some(a) = self.argv.as_mut().and_then(|a| a.first_mut()) {
            *a = value.to_string();
        }
        Ok(())
    }
    fn task_exit_status(&self) -> Option<i32> {
        self.exit_status
    }
    fn task_global_id(&self) -> Option<u32> {
        self.global_id
    }
    fn task_local_id(&self) -> Option<u32> {
        self.local_id
    }
    fn local_task_count(&self) -> Option<u32> {
        self.local_tasks
    }
    fn job_ids(&self) -> Option<(u32, u32)> {
        self.job_ids
    }
    fn as_job_user(&self, f: &mut (dyn FnMut() + Send)) -> Result<(), HostError> {
        self.as_user_calls.set(self.as_user_calls.get() + 1);
        if self.as_user_fails {
            return Err(HostError::Unsupported("setfsuid"));
        }
        f();
        Ok(())
    }
}

static SERIAL: Mutex<()> = Mutex::new(());

/// The plugin's state is per process, as in Slurm: a test that goes
/// through it holds this guard, and starts from a fresh state.
pub(super) fn serial() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    super::reset();
    guard
}

/// A site in a temporary directory: the registry (`demo:1`, a sound SIF,
/// the default; `gone:1`, whose file is missing), an executable runtime
/// and launcher (never run), the report directory and the metrics log,
/// and the site config naming them (`args`, the plugstack arguments).
#[derive(Debug)]
pub(super) struct Site {
    pub dir: PathBuf,
    pub args: Vec<String>,
}

impl Site {
    pub fn new(name: &str) -> Site {
        Site::with(name, "")
    }

    /// With `extra` appended to the site config.
    pub fn with(name: &str, extra: &str) -> Site {
        let dir = std::env::temp_dir().join(format!("mlc-plugin-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("containers");
        for d in ["ml-frameworks", ".registry"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        let sif = root.join("ml-frameworks/demo-1.sif");
        let len = 65_536;
        let mut image = crate::sif::example_header(len);
        image.resize(usize::try_from(len).unwrap(), 0);
        std::fs::write(&sif, image).unwrap();
        std::fs::write(
            root.join(".registry/catalog.toml"),
            "version = 1\n[[image]]\nname = \"demo\"\ntag = \"1\"\n\
             path = \"ml-frameworks/demo-1.sif\"\ndefault = true\n\
             [[image]]\nname = \"gone\"\ntag = \"1\"\npath = \"ml-frameworks/gone-1.sif\"\n",
        )
        .unwrap();
        for exe in ["apptainer", "ml-container-launch"] {
            let p = dir.join("bin").join(exe);
            std::fs::write(&p, "#!/bin/sh\nexit 99\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // Temp dirs are world-writable-sticky parents; make ours strict.
        for d in [
            &dir,
            &root,
            &root.join("ml-frameworks"),
            &root.join(".registry"),
        ] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(&sif, std::fs::Permissions::from_mode(0o644)).unwrap();
        let d = dir.display();
        let config = dir.join("ml-container.toml");
        std::fs::write(
            &config,
            format!(
                "[registry]\nroot = \"{d}/containers\"\n\
                 [runtime]\npath = \"{d}/bin/apptainer\"\nlauncher = \"{d}/bin/ml-container-launch\"\n\
                 binds = []\n\
                 [failure]\nreport_dir = \"{d}/reports\"\nmetrics_log = \"{d}/metrics.log\"\n\
                 syslog = false\n{extra}"
            ),
        )
        .unwrap();
        let args = vec![format!("config={}", config.display())];
        Site { dir, args }
    }

    pub fn image(&self) -> PathBuf {
        self.dir.join("containers/ml-frameworks/demo-1.sif")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn launcher(&self) -> PathBuf {
        self.dir.join("bin/ml-container-launch")
    }

    pub fn metrics(&self) -> String {
        std::fs::read_to_string(self.dir.join("metrics.log")).unwrap_or_default()
    }

    pub fn report_dir(&self) -> PathBuf {
        self.dir.join("reports")
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
