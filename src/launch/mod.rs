//! How a task is run in its image: the runtime's argv that goes in front of
//! the task's own command (`apptainer exec --nv --bind ...`).
//!
//! Apptainer and Singularity share one CLI (`exec [--nv] [--bind S:D[:ro]]
//! [--pwd DIR] [--writable-tmpfs] IMAGE CMD...`); Charliecloud's `ch-run`
//! takes `-b S:D`, `-c DIR`, `--write-fake`, then `IMAGE -- CMD...`. Never
//! `--contain`: it gives each rank a private /dev/shm, which breaks NCCL and
//! MPI shared memory (docs/DESIGN.md, Apptainer facts).
//!
//! [`spec`] is what the plugin hands `ml-container-launch` and how that
//! program words a failure; [`checks`] are the checks made as the job's
//! user just before the task becomes the launcher.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::{GpuPolicy, RuntimeKind, SiteConfig};
use crate::options::{self, Mount, UserOptions};
use crate::share::Share;

pub mod checks;
pub mod spec;

pub use checks::{check_as_user, is_executable, CheckError};
pub use spec::{
    command_alternatives, container_argv0, failure_notice, missing_command_hint, signal_name,
    typed_command, Ended, LaunchSpec, StderrCapture, TaskLabel, LAUNCH_ENV,
};

/// Everything needed to build the runtime prefix for every task of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub kind: RuntimeKind,
    pub runtime: PathBuf,
    pub image: PathBuf,
    pub nv: bool,
    pub binds: Vec<Mount>,
    pub workdir: Option<PathBuf>,
    pub writable_tmpfs: bool,
    pub extra_args: Vec<String>,
    /// The runtime's global `--quiet` (config `runtime.quiet`).
    pub quiet: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchError {
    /// A user bind onto or from a path the site denies.
    Denied { mount: String, denied: PathBuf },
    /// A default bind in the site config that does not parse.
    BadDefault { entry: String, reason: String },
}

impl fmt::Display for LaunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LaunchError::Denied { mount, denied } => write!(
                f,
                "--ml-container-mounts entry '{mount}' touches {}, which the site does not \
                 allow to bind: bind a directory of your own instead",
                denied.display()
            ),
            LaunchError::BadDefault { entry, reason } => write!(
                f,
                "runtime.binds entry '{entry}' in the site config is invalid: {reason}"
            ),
        }
    }
}

impl std::error::Error for LaunchError {}

/// Where runtimes are looked up when `runtime.path` is not set.
pub const RUNTIME_DIRS: &[&str] = &["/usr/local/bin", "/usr/bin", "/bin"];

/// The runtime's program name for its kind.
pub fn runtime_name(kind: RuntimeKind) -> &'static str {
    match kind {
        RuntimeKind::Apptainer => "apptainer",
        RuntimeKind::Singularity => "singularity",
        RuntimeKind::Charliecloud => "ch-run",
    }
}

/// The runtime binary: `runtime.path`, else the kind's program in
/// [`RUNTIME_DIRS`]; `None` when it is not installed.
pub fn runtime_binary(cfg: &SiteConfig) -> Option<PathBuf> {
    if let Some(p) = &cfg.runtime.path {
        return p.as_path().is_file().then(|| p.0.clone());
    }
    RUNTIME_DIRS
        .iter()
        .map(|d| Path::new(d).join(runtime_name(cfg.runtime.kind)))
        .find(|p| p.is_file())
}

/// Whether `path` is, or (except for `/` itself) lies under, a denied path.
pub fn denied_by<'a>(path: &Path, denied: &'a [PathBuf]) -> Option<&'a Path> {
    denied
        .iter()
        .find(|d| {
            if d.as_path() == Path::new("/") {
                path == Path::new("/")
            } else {
                path.starts_with(d)
            }
        })
        .map(PathBuf::as_path)
}

/// The paths users may not bind: the site's list plus the registry's own
/// metadata directory.
pub fn denied_paths(cfg: &SiteConfig) -> Vec<PathBuf> {
    let mut d: Vec<PathBuf> = cfg
        .runtime
        .denied_binds
        .iter()
        .map(|p| p.0.clone())
        .collect();
    d.push(cfg.registry.root.0.join(".registry"));
    d
}

/// Checks the user's binds against the denied paths (in srun, early).
pub fn check_user_binds(cfg: &SiteConfig, user: &[Mount]) -> Result<(), LaunchError> {
    let denied = denied_paths(cfg);
    for m in user {
        for p in [&m.src, &m.dst] {
            if let Some(d) = denied_by(&crate::registry::normalize(p), &denied) {
                return Err(LaunchError::Denied {
                    mount: m.to_string(),
                    denied: d.to_path_buf(),
                });
            }
        }
    }
    Ok(())
}

/// The binds of a step: the site's defaults whose source exists on this
/// node, then the user's. The defaults skipped for a missing source come
/// back as one note (the slurmd log gets one line per node and step, not
/// one per missing directory).
pub fn binds(
    cfg: &SiteConfig,
    user: &[Mount],
    exists: &dyn Fn(&Path) -> bool,
) -> Result<(Vec<Mount>, Option<String>), LaunchError> {
    check_user_binds(cfg, user)?;
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for entry in &cfg.runtime.binds {
        let parsed = options::parse_mounts(entry).map_err(|e| LaunchError::BadDefault {
            entry: entry.clone(),
            reason: e.to_string(),
        })?;
        for m in parsed {
            if exists(&m.src) {
                out.push(m);
            } else {
                skipped.push(m.src.display().to_string());
            }
        }
    }
    // A user bind to the same destination replaces the default.
    out.retain(|d| !user.iter().any(|u| u.dst == d.dst));
    out.extend(user.iter().cloned());
    let note = (!skipped.is_empty()).then(|| {
        format!(
            "default binds skipped, their sources do not exist on this node: {} (create them \
             or remove them from runtime.binds)",
            skipped.join(", ")
        )
    });
    Ok((out, note))
}

/// Whether the step was given GPUs: Slurm exports these to the tasks of a
/// step with a GPU GRES (gres.conf(5), srun(1) "SLURM_STEP_GPUS").
pub fn step_has_gpus(get: &dyn Fn(&str) -> Option<String>) -> bool {
    [
        "SLURM_STEP_GPUS",
        "SLURM_JOB_GPUS",
        "CUDA_VISIBLE_DEVICES",
        "GPU_DEVICE_ORDINAL",
    ]
    .iter()
    .any(|k| get(k).is_some_and(|v| !v.trim().is_empty() && v.trim() != "NoDevFiles"))
}

/// Whether the step has or asked for GPUs: given ([`step_has_gpus`]) or
/// requested with srun's GPU options (`--gpus*`, `--tres-per-task=gres/gpu`),
/// which a report checks against what the job saw.
pub fn gpus_requested(get: &dyn Fn(&str) -> Option<String>) -> bool {
    step_has_gpus(get)
        || ["SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK"]
            .iter()
            .any(|k| get(k).is_some())
        || get("SLURM_TRES_PER_TASK").is_some_and(|v| v.contains("gpu"))
}

/// What an MPI program in the image needs from Slurm's PMIx server
/// (`srun --mpi=pmix`): its temporary directory (shared
/// memory segments, sockets) and, when PMIx authenticates with munge, the
/// munge socket directory. Bound at the same paths; only existing ones.
/// The server URI itself is TCP on the node, reachable as the container
/// shares the node's network.
pub fn mpi_binds(
    get: &dyn Fn(&str) -> Option<String>,
    exists: &dyn Fn(&Path) -> bool,
) -> Vec<Mount> {
    let mut out: Vec<Mount> = Vec::new();
    let mut add = |p: &str| {
        let path = PathBuf::from(p.trim_end_matches('/'));
        // Apptainer binds /tmp itself; relative or odd values are ignored.
        if path.is_absolute()
            && path != Path::new("/tmp")
            && exists(&path)
            && !out.iter().any(|m| m.dst == path)
        {
            out.push(Mount {
                src: path.clone(),
                dst: path,
                read_only: false,
            });
        }
    };
    for var in ["PMIX_SERVER_TMPDIR", "PMIX_SYSTEM_TMPDIR"] {
        if let Some(v) = get(var) {
            add(&v);
        }
    }
    if get("PMIX_SECURITY_MODE").is_some_and(|m| m.contains("munge")) {
        add("/run/munge");
    }
    out
}

/// `--nv` or not: the user's choice, else the site's, under `auto` exactly
/// when the step has GPUs.
pub fn wants_nv(cfg: &SiteConfig, opts: &UserOptions, has_gpus: bool) -> bool {
    match opts.gpus.unwrap_or(cfg.runtime.gpus) {
        GpuPolicy::On => true,
        GpuPolicy::Off => false,
        GpuPolicy::Auto => has_gpus,
    }
}

impl Plan {
    /// The step's shared container on a node (src/share.rs) for `tasks`
    /// local tasks, or None where the runtime has no
    /// instances we rely on (Charliecloud; Singularity is not tested).
    pub fn shared(&self, dir: &Path, instance: &str, tasks: u32) -> Option<Share> {
        if self.kind != RuntimeKind::Apptainer || tasks < 2 {
            return None;
        }
        // The container's mounts go to `instance start`; each task's
        // working directory to its own `exec`.
        let mut start = self.apptainer_head();
        start.extend(["instance".into(), "start".into()]);
        self.push_apptainer_mounts(&mut start);
        start.extend(self.extra_args.iter().cloned());
        start.push(self.image.to_string_lossy().into_owned());
        start.push(instance.to_string());
        let mut exec = self.apptainer_head();
        exec.push("exec".into());
        self.push_apptainer_workdir(&mut exec);
        exec.extend(self.extra_args.iter().cloned());
        exec.push(format!("instance://{instance}"));
        let mut stop = self.apptainer_head();
        stop.extend(["instance".into(), "stop".into(), instance.to_string()]);
        Some(Share {
            dir: dir.to_path_buf(),
            instance: instance.to_string(),
            start,
            exec,
            stop,
            tasks,
        })
    }

    /// Apptainer's and Singularity's runtime and global options (`--quiet`
    /// goes before the subcommand).
    fn apptainer_head(&self) -> Vec<String> {
        let mut argv = vec![self.runtime.to_string_lossy().into_owned()];
        if self.quiet {
            argv.push("--quiet".into());
        }
        argv
    }

    /// What the container is made of: `--nv`, `--writable-tmpfs`, binds.
    fn push_apptainer_mounts(&self, argv: &mut Vec<String>) {
        if self.nv {
            argv.push("--nv".into());
        }
        if self.writable_tmpfs {
            argv.push("--writable-tmpfs".into());
        }
        for b in &self.binds {
            argv.push("--bind".into());
            argv.push(bind_arg(b, true));
        }
    }

    fn push_apptainer_workdir(&self, argv: &mut Vec<String>) {
        if let Some(w) = &self.workdir {
            argv.push("--pwd".into());
            argv.push(w.to_string_lossy().into_owned());
        }
    }

    /// The argv that goes in front of the task's command.
    pub fn prefix(&self) -> Vec<String> {
        let s = |p: &Path| p.to_string_lossy().into_owned();
        match self.kind {
            RuntimeKind::Apptainer | RuntimeKind::Singularity => {
                let mut argv = self.apptainer_head();
                argv.push("exec".into());
                self.push_apptainer_mounts(&mut argv);
                self.push_apptainer_workdir(&mut argv);
                argv.extend(self.extra_args.iter().cloned());
                argv.push(s(&self.image));
                argv
            }
            RuntimeKind::Charliecloud => {
                let mut argv = vec![s(&self.runtime)];
                for b in &self.binds {
                    argv.push("-b".into());
                    argv.push(bind_arg(b, false));
                }
                if let Some(w) = &self.workdir {
                    argv.push("-c".into());
                    argv.push(s(w));
                }
                if self.writable_tmpfs {
                    argv.push("--write-fake".into());
                }
                argv.extend(self.extra_args.iter().cloned());
                argv.push(s(&self.image));
                argv.push("--".into());
                argv
            }
        }
    }
}

/// One bind as the runtime takes it: `SRC:DST`, and `:ro` where the
/// runtime has it (Apptainer, Singularity; Charliecloud binds read-only
/// anyway).
pub fn bind_arg(b: &Mount, with_ro: bool) -> String {
    let s = |p: &Path| p.to_string_lossy().into_owned();
    if b.read_only && with_ro {
        format!("{}:{}:ro", s(&b.src), s(&b.dst))
    } else {
        format!("{}:{}", s(&b.src), s(&b.dst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AbsPath;

    fn mounts(s: &str) -> Vec<Mount> {
        options::parse_mounts(s).unwrap()
    }

    #[test]
    fn apptainer_prefix() {
        let p = Plan {
            kind: RuntimeKind::Apptainer,
            runtime: "/usr/bin/apptainer".into(),
            image: "/opt/containers/x.sif".into(),
            nv: true,
            binds: mounts("/data:/data:ro,/scratch"),
            workdir: Some("/work".into()),
            writable_tmpfs: true,
            extra_args: vec!["--cleanenv".into()],
            quiet: false,
        };
        assert_eq!(
            p.prefix().join(" "),
            "/usr/bin/apptainer exec --nv --writable-tmpfs --bind /data:/data:ro --bind \
             /scratch:/scratch --pwd /work --cleanenv /opt/containers/x.sif"
        );
        assert!(!p.prefix().iter().any(|a| a.starts_with("--contain")));
        let quiet = Plan { quiet: true, ..p };
        assert_eq!(
            quiet.prefix()[..3],
            ["/usr/bin/apptainer", "--quiet", "exec"]
        );
    }

    #[test]
    fn charliecloud_prefix() {
        let p = Plan {
            kind: RuntimeKind::Charliecloud,
            runtime: "/usr/bin/ch-run".into(),
            image: "/opt/containers/x.sqfs".into(),
            nv: false,
            binds: mounts("/data:/in"),
            workdir: Some("/in".into()),
            writable_tmpfs: false,
            extra_args: vec![],
            quiet: true,
        };
        assert_eq!(
            p.prefix().join(" "),
            "/usr/bin/ch-run -b /data:/in -c /in /opt/containers/x.sqfs --"
        );
    }

    #[test]
    fn binds_defaults_user_and_denied() {
        let mut cfg = SiteConfig::default();
        cfg.runtime.binds = vec![
            "/shared/data:/data".into(),
            "/shared/models:/models:ro".into(),
        ];
        let exists = |p: &Path| p != Path::new("/shared/models");
        let (b, notes) = binds(&cfg, &mounts("/home/u/x:/data"), &exists).unwrap();
        assert_eq!(
            b,
            mounts("/home/u/x:/data"),
            "user bind replaces the default's destination"
        );
        let note = notes.expect("a note for the missing default");
        assert!(
            note.contains("/shared/models") && !note.contains("/shared/data"),
            "{note}"
        );
        let all_missing = |_: &Path| false;
        let (_, note) = binds(&cfg, &[], &all_missing).unwrap();
        let note = note.expect("one note for every missing default");
        assert_eq!(note.lines().count(), 1);
        assert!(note.contains("/shared/data, /shared/models"), "{note}");
        assert_eq!(binds(&cfg, &[], &|_: &Path| true).unwrap().1, None);

        for bad in [
            "/etc/shadow:/x",
            "/x:/etc",
            "/:/host",
            "/proc",
            "/opt/containers/.registry:/r",
        ] {
            let e = binds(&cfg, &mounts(bad), &exists);
            assert!(
                matches!(e, Err(LaunchError::Denied { .. })),
                "{bad} allowed"
            );
        }
        // "/" is denied as itself only.
        assert!(binds(&cfg, &mounts("/home/u:/mnt"), &exists).is_ok());

        cfg.runtime.binds = vec!["relative:/x".into()];
        assert!(matches!(
            binds(&cfg, &[], &exists),
            Err(LaunchError::BadDefault { .. })
        ));
        cfg.runtime.denied_binds = vec![AbsPath("/home".into())];
        cfg.runtime.binds = vec![];
        assert!(binds(&cfg, &mounts("/home/u:/mnt"), &exists).is_err());
    }

    #[test]
    fn gpu_policy() {
        let cfg = SiteConfig::default();
        let mut o = UserOptions::default();
        assert!(!wants_nv(&cfg, &o, false));
        assert!(wants_nv(&cfg, &o, true));
        o.gpus = Some(GpuPolicy::Off);
        assert!(!wants_nv(&cfg, &o, true));
        o.gpus = Some(GpuPolicy::On);
        assert!(wants_nv(&cfg, &o, false));
        let env = |v: &'static str| move |k: &str| (k == "SLURM_STEP_GPUS").then(|| v.to_string());
        assert!(step_has_gpus(&env("0,1")));
        assert!(!step_has_gpus(&env("")));
        assert!(!step_has_gpus(&|_| None));
    }

    #[test]
    fn pmix_binds() {
        let env = |k: &str| match k {
            "PMIX_SERVER_TMPDIR" => Some("/var/spool/slurmd/n1/pmix.1.0/".to_string()),
            "PMIX_SYSTEM_TMPDIR" => Some("/tmp".to_string()),
            "PMIX_SECURITY_MODE" => Some("munge,native".to_string()),
            _ => None,
        };
        let b = mpi_binds(&env, &|_| true);
        let dsts: Vec<&Path> = b.iter().map(|m| m.dst.as_path()).collect();
        assert_eq!(
            dsts,
            [
                Path::new("/var/spool/slurmd/n1/pmix.1.0"),
                Path::new("/run/munge")
            ]
        );
        assert!(mpi_binds(&env, &|_| false).is_empty());
        assert!(mpi_binds(&|_| None, &|_| true).is_empty());
    }
}
