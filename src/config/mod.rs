//! The site configuration, `/etc/slurm/ml-container.toml`.
//!
//! Sources, in order of precedence (one documented source per setting:
//! docs/DESIGN.md, Decisions): built-in defaults, then the file, then `key=value` arguments on
//! the plugstack line (`runtime.gpus=off`). A missing file means defaults; a
//! malformed one is an error naming the file, the line and the key.
//!
//! Here: the sections and their defaults. Beside it: `values.rs` (the
//! value types, each checked as it is deserialized) and `load.rs`
//! (reading the file, the plugstack arguments and overrides, the errors).
#![forbid(unsafe_code)]

mod load;
mod values;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use load::{ConfigError, PlugstackArgs};
pub use values::{
    AbsPath, AddrKind, ByteSize, EnvMap, EnvName, EnvValue, GpuPolicy, NodeCacheDir, OptAbsPath,
    PortRange, RuntimeKind, VerifyLevel,
};

/// Where the site config lives unless `config=PATH` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/slurm/ml-container.toml";
/// Where the package installs `ml-container-launch`.
pub const DEFAULT_LAUNCHER: &str = "/usr/libexec/slurm-ml-container/ml-container-launch";
/// A config larger than this is certainly not a config.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// The registry root: `ml-frameworks/`, `custom-images/`,
    /// `base-images/` and `.registry/` (the catalog) under it.
    pub root: AbsPath,
    /// Directories under the root scanned for `<name>.sif`.
    pub search_dirs: Vec<String>,
    /// Directories an absolute image path may point into; empty: the root.
    pub allowed_dirs: Vec<AbsPath>,
    pub verify: VerifyLevel,
    /// Besides root, the user trusted to own the catalog (name or uid).
    pub owner: String,
    /// Per-node cache of verified sha256 sums (root-owned).
    pub hash_cache: AbsPath,
    /// Node-local image cache directory ("" = off); `%n` is the node's
    /// short host name (one directory per node on a shared file system).
    pub node_cache: NodeCacheDir,
    /// The most the node cache may hold, e.g. "200G".
    pub node_cache_max: ByteSize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            root: AbsPath(PathBuf::from("/opt/containers")),
            search_dirs: ["ml-frameworks", "custom-images", "base-images"]
                .map(String::from)
                .to_vec(),
            allowed_dirs: Vec::new(),
            verify: VerifyLevel::Quick,
            owner: "root".to_string(),
            hash_cache: AbsPath(PathBuf::from("/var/cache/slurm-ml-container/sha256")),
            node_cache: NodeCacheDir::default(),
            node_cache_max: ByteSize(100 << 30),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    pub kind: RuntimeKind,
    /// The runtime binary; unset: looked up in PATH by kind.
    pub path: Option<AbsPath>,
    pub gpus: GpuPolicy,
    /// Default binds, `SRC[:DST[:ro|rw]]` (the documented example binds
    /// the site's data, work and models directories).
    pub binds: Vec<String>,
    /// Paths users may not bind onto or from.
    pub denied_binds: Vec<AbsPath>,
    /// Extra arguments passed to `<runtime> exec`.
    pub extra_args: Vec<String>,
    /// The runtime's global `--quiet` (Apptainer, Singularity): hides its
    /// INFO lines (such as "gocryptfs not found") on every task's stderr;
    /// warnings and errors still show.
    pub quiet: bool,
    /// One container per node per step: the step's tasks on a node run in
    /// one Apptainer instance (one user and mount namespace, one image
    /// mount) instead of one container each (src/share.rs).
    pub share_namespaces: bool,
    /// The small program every containerized task runs under
    /// (src/bin/ml-container-launch.rs).
    pub launcher: AbsPath,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            kind: RuntimeKind::Apptainer,
            path: None,
            gpus: GpuPolicy::Auto,
            binds: [
                "/shared/data:/data",
                "/shared/work:/work",
                "/shared/models:/models",
            ]
            .map(String::from)
            .to_vec(),
            denied_binds: ["/", "/etc", "/proc", "/sys", "/dev", "/boot", "/run"]
                .map(|p| AbsPath(PathBuf::from(p)))
                .to_vec(),
            extra_args: Vec::new(),
            quiet: true,
            share_namespaces: true,
            launcher: AbsPath(PathBuf::from(DEFAULT_LAUNCHER)),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    pub enabled: bool,
    pub port_range: PortRange,
    pub addr: AddrKind,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        DistributedConfig {
            enabled: true,
            port_range: PortRange {
                lo: 29500,
                hi: 30499,
            },
            addr: AddrKind::Hostname,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailureConfig {
    pub report_dir: AbsPath,
    pub metrics_log: AbsPath,
    pub syslog: bool,
    /// Seconds each node probe (nvidia-smi, master reachability) may take.
    pub probe_timeout: u32,
    /// Bytes of each task's stderr tail kept for the report (0 = off): the
    /// launcher copies the task's stderr through a pipe and keeps the last
    /// bytes (the output itself is unchanged).
    pub capture_stderr: u32,
    /// node_exporter's textfile-collector directory ("" = off): each node
    /// keeps `ml-container.prom` there.
    pub prometheus_dir: OptAbsPath,
}

impl Default for FailureConfig {
    fn default() -> Self {
        FailureConfig {
            report_dir: AbsPath(PathBuf::from("/var/log/slurm/debug")),
            metrics_log: AbsPath(PathBuf::from("/var/log/slurm/job_metrics.log")),
            syslog: true,
            probe_timeout: 5,
            capture_stderr: 65536,
            prometheus_dir: OptAbsPath(None),
        }
    }
}

/// The whole site configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SiteConfig {
    pub registry: RegistryConfig,
    pub runtime: RuntimeConfig,
    pub distributed: DistributedConfig,
    pub nccl: EnvMap,
    pub env: EnvMap,
    pub failure: FailureConfig,
}
