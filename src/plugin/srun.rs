//! What runs in srun (`Local`) and in sbatch/salloc (`Allocator`): the
//! options are checked and the image resolved before any node is used; srun
//! pins the image for the nodes and records its own argv. The batch
//! script's MASTER_ADDR/MASTER_PORT ([`set_batch_env`]) belong here too:
//! they are sbatch's share of the contract, set in the batch step's task.
#![forbid(unsafe_code)]

use crate::config::SiteConfig;
use crate::distenv::{self, DistError};
use crate::integrity;
use crate::launch;
use crate::options::UserOptions;
use crate::registry::{Opened, Registry, RegistryError, PIN_ENV};

use super::{Context, Host, PluginError};

/// `slurm_spank_init_post_opt` in srun, sbatch or salloc, for a job that
/// asked for the plugin: a broken config, a missing image, a denied bind or
/// an image that does not resolve stops the command here.
pub(super) fn init_post_opt(
    host: &mut dyn Host,
    ctx: Context,
    config: Result<SiteConfig, String>,
    options: &UserOptions,
) -> Result<(), PluginError> {
    let config = config.map_err(PluginError::Config)?;
    let image = options.image.clone().ok_or(PluginError::NoImage)?;
    log::debug!("options: {}", options.summary());
    launch::check_user_binds(&config, &options.mounts)?;
    if ctx == Context::Local {
        record_srun_argv(host);
    }
    resolve_in_srun(host, &config, &image, ctx == Context::Local)
}

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

pub(super) fn recorded_srun_argv(host: &dyn Host) -> Vec<String> {
    host.getenv(ARGV_ENV)
        .and_then(|t| toml::from_str::<toml::Table>(&format!("a = {t}")).ok())
        .and_then(|mut t| t.remove("a"))
        .and_then(|v| v.try_into::<Vec<String>>().ok())
        .unwrap_or_default()
}

/// The batch script: MASTER_ADDR/MASTER_PORT of the job, recorded as ours
/// so that the script's srun steps compute their own.
pub(super) fn set_batch_env(host: &mut dyn Host, config: &SiteConfig) -> Result<(), PluginError> {
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
