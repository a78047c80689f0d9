//! What runs in srun (`Local`) and in sbatch/salloc (`Allocator`): the
//! options are checked and the image resolved before any node is used; srun
//! hands the nodes its pin and its own argv in one value
//! ([`crate::handoff`]). The batch script's MASTER_ADDR/MASTER_PORT
//! ([`set_batch_env`]) belong here too: they are sbatch's share of the
//! contract, set in the batch step's task.
#![forbid(unsafe_code)]

use crate::config::SiteConfig;
use crate::distenv::{self, DistError};
use crate::handoff::{Handoff, HANDOFF_ENV};
use crate::integrity;
use crate::launch;
use crate::options::UserOptions;
use crate::registry::{Opened, Pin, Registry, RegistryError};

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
    let pin = resolve_in_srun(&config, &image)?;
    if ctx == Context::Local {
        // One value for the nodes, replacing whatever the environment held.
        let handoff = Handoff::new(pin, own_argv());
        host.set_local_env(HANDOFF_ENV, Some(&handoff.encode()?));
    }
    Ok(())
}

/// srun or sbatch/salloc: resolve where the registry is readable, so a bad
/// image fails before any node is used. The pin, or `None` when the
/// registry is not readable here (the nodes resolve alone).
fn resolve_in_srun(config: &SiteConfig, image: &str) -> Result<Option<Pin>, PluginError> {
    let registry = match Registry::open(&config.registry) {
        Ok(r) => r,
        Err(RegistryError::Unavailable { root, source }) => {
            log::debug!(
                "registry {} not readable here ({source}); the nodes resolve '{image}'",
                root.display()
            );
            return Ok(None);
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
    Ok(Some(resolved))
}

/// srun's own argv, so the nodes can tell which command the user typed
/// (srun replaces a bare command name with the host path it found). Empty
/// when it cannot be read; [`Handoff::new`] drops one over its caps (the
/// lookup then keeps srun's path).
fn own_argv() -> Vec<String> {
    std::fs::read("/proc/self/cmdline")
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
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
