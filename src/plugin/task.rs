//! The node's task side: slurmstepd (root) resolves and verifies the image
//! once per step before any task starts (`init_post_opt`, `Remote`) and
//! notes when each task is forked; each task then sets its distributed
//! environment and becomes the launcher, as the job's user (`task_init`).
//! A problem found in slurmstepd is kept and reported from `task_init`,
//! where the user's stderr is.
#![forbid(unsafe_code)]

use std::path::Path;

use crate::capture::{self, StepDir};
use crate::config::{RuntimeKind, SiteConfig};
use crate::distenv::{self, TaskFacts, BATCH_STEP};
use crate::handoff::{Handoff, HANDOFF_ENV};
use crate::integrity::{self, Verified};
use crate::launch::{self, Plan};
use crate::options::UserOptions;
use crate::probe;
use crate::registry::{self, Opened, Pin, Registry, UserCheck};
use crate::secure;

use super::srun::set_batch_env;
use super::{fault_injection, hostname, now_ms, state, Host, PluginError, State};

/// Step ids from here up are Slurm's pseudo steps (SLURM_BATCH_SCRIPT
/// 0xfffffffb, SLURM_EXTERN_CONT 0xfffffffc, SLURM_INTERACTIVE_STEP ...).
const SLURM_PSEUDO_STEPS: u32 = 0xffff_fff0;

/// `slurm_spank_init_post_opt` in slurmstepd, for a step that asked for the
/// plugin: the image and the runtime plan, or the reason there is none
/// (kept in `deferred` for `task_init`). Never fails the callback itself:
/// slurmstepd would only log it.
pub(super) fn init_post_opt(
    host: &mut dyn Host,
    st: &mut State,
    config: Result<SiteConfig, String>,
) -> Result<(), PluginError> {
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

/// srun's own argv from the handoff; empty when there is none, or the
/// handoff is refused (slurmstepd then already failed the step).
fn srun_argv(host: &dyn Host) -> Vec<String> {
    host.getenv(HANDOFF_ENV)
        .and_then(|text| Handoff::decode(&text).ok())
        .map(|h| h.srun_argv)
        .unwrap_or_default()
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

/// On a node, as root: the image this step runs, verified, and how to run
/// each task in it. The image is resolved here, from the catalog this node
/// reads; srun's pin (in the handoff, from the job environment, which the
/// user controls) may only confirm it; a handoff the node cannot read fails
/// the step as a forged one. The user's right to read the image is asked
/// as the user before root opens it; the hash stops when the job is
/// cancelled.
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
    if let Some(text) = host.getenv(HANDOFF_ENV) {
        if let Some(srun) = Handoff::decode(&text)?.pin {
            opened.pin.confirms(&srun)?;
        }
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

/// The prefix that makes Apptainer/Singularity put a variable into the
/// container over the image's own `%environment`: `APPTAINERENV_X` beats
/// both the host's `X` and the image's (docs/DESIGN.md, Apptainer facts).
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
    launch::check_as_user(&plan, &hostname())?;
    // The command: a bare name the user typed is looked up in the image.
    let task_argv = host.job_argv().unwrap_or_default();
    let resolved = task_argv.first().cloned().unwrap_or_default();
    let typed = launch::typed_command(&srun_argv(host), &task_argv);
    let bare = launch::container_argv0(typed.as_deref(), &resolved);
    let job = host.job_id().unwrap_or(0);
    let step = host.step_id().unwrap_or(0);
    let share = st
        .step_dir
        .as_ref()
        .filter(|_| config.runtime.share_namespaces)
        .and_then(|d| {
            plan.shared(
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
    if !launch::is_executable(launcher) {
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

fn fmt_id(id: Option<u32>) -> String {
    match id {
        // SLURM_BATCH_SCRIPT and friends are large sentinels; print them as is.
        Some(v) => v.to_string(),
        None => "?".to_string(),
    }
}
