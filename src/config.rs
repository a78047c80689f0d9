//! The site configuration, `/etc/slurm/ml-container.toml` (SPEC "Site config").
//!
//! Sources, in order of precedence (USERS.md #5: one documented source per
//! setting): built-in defaults, then the file, then `key=value` arguments on
//! the plugstack line (`runtime.gpus=off`). A missing file means defaults; a
//! malformed one is an error naming the file, the line and the key.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where the site config lives unless `config=PATH` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/slurm/ml-container.toml";
/// Where the package installs `ml-container-launch`.
pub const DEFAULT_LAUNCHER: &str = "/usr/libexec/slurm-ml-container/ml-container-launch";
/// A config larger than this is certainly not a config.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GpuPolicy {
    /// `--nv` when the step was given GPUs.
    #[default]
    Auto,
    On,
    Off,
}

impl fmt::Display for GpuPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GpuPolicy::Auto => "auto",
            GpuPolicy::On => "on",
            GpuPolicy::Off => "off",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VerifyLevel {
    /// Size and SIF structure.
    #[default]
    Quick,
    /// sha256, cached per node.
    Full,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    #[default]
    Apptainer,
    Singularity,
    Charliecloud,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AddrKind {
    /// MASTER_ADDR is the first host name of the step.
    #[default]
    Hostname,
    /// MASTER_ADDR is that host's IP address.
    Ip,
}

/// An absolute path; relative paths in a root-read config are a trap.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AbsPath(pub PathBuf);

impl AbsPath {
    pub fn as_path(&self) -> &Path {
        &self.0
    }
}

impl<'de> Deserialize<'de> for AbsPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.starts_with('/') {
            Ok(AbsPath(PathBuf::from(s)))
        } else {
            Err(serde::de::Error::custom(format!(
                "'{s}' is not an absolute path (it must start with /)"
            )))
        }
    }
}

impl Serialize for AbsPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string_lossy())
    }
}

/// `[lo, hi]`, both inclusive, inside the unprivileged port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = <[u16; 2]>::deserialize(d)?;
        if v[0] < 1024 || v[0] > v[1] {
            return Err(serde::de::Error::custom(format!(
                "[{}, {}] is not a port range: write [LOW, HIGH] with 1024 <= LOW <= HIGH <= 65535",
                v[0], v[1]
            )));
        }
        Ok(PortRange { lo: v[0], hi: v[1] })
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        [self.lo, self.hi].serialize(s)
    }
}

/// An environment variable name, `[A-Za-z_][A-Za-z0-9_]*`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct EnvName(pub String);

impl<'de> Deserialize<'de> for EnvName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let mut chars = s.chars();
        let ok = matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
            && chars.all(|c| c == '_' || c.is_ascii_alphanumeric());
        if ok {
            Ok(EnvName(s))
        } else {
            Err(serde::de::Error::custom(format!(
                "'{s}' is not a valid environment variable name"
            )))
        }
    }
}

/// A variable's value: TOML strings, integers and booleans are all accepted
/// (`NCCL_IB_DISABLE = 1` is what admins write).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct EnvValue(pub String);

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            S(String),
            I(i64),
            B(bool),
        }
        match Scalar::deserialize(d) {
            Ok(Scalar::S(s)) if s.contains('\0') => Err(serde::de::Error::custom(
                "a value may not contain a NUL character",
            )),
            Ok(Scalar::S(s)) => Ok(EnvValue(s)),
            Ok(Scalar::I(i)) => Ok(EnvValue(i.to_string())),
            Ok(Scalar::B(b)) => Ok(EnvValue(if b { "1" } else { "0" }.to_string())),
            Err(_) => Err(serde::de::Error::custom(
                "expected a string, an integer or a boolean",
            )),
        }
    }
}

pub type EnvMap = BTreeMap<EnvName, EnvValue>;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// The registry root (seed 001 layout).
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

/// `registry.node_cache`: "" (off) or an absolute path, `%n` allowed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeCacheDir(pub String);

impl NodeCacheDir {
    /// The directory on the node named `host`; `None` when off.
    pub fn for_host(&self, host: &str) -> Option<PathBuf> {
        if self.0.is_empty() {
            return None;
        }
        Some(PathBuf::from(self.0.replace("%n", host)))
    }
}

impl<'de> Deserialize<'de> for NodeCacheDir {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let ok = s.is_empty()
            || (s.starts_with('/')
                && !s.contains('\0')
                && !s.split('/').any(|c| c == "..")
                && s.replace("%n", "").find('%').is_none());
        if ok {
            Ok(NodeCacheDir(s))
        } else {
            Err(serde::de::Error::custom(format!(
                "'{}' is not an absolute path without '..' ('%n' = the node's name; \"\" = off)",
                s.escape_default()
            )))
        }
    }
}

impl Serialize for NodeCacheDir {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// A size in bytes, written `200G`, `512M`, `1T`, `4096` (powers of 1024).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Option<ByteSize> {
        let s = s.trim();
        let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
        let n: u64 = digits.parse().ok()?;
        let shift = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 0,
            "K" | "KB" | "KIB" => 10,
            "M" | "MB" | "MIB" => 20,
            "G" | "GB" | "GIB" => 30,
            "T" | "TB" | "TIB" => 40,
            _ => return None,
        };
        n.checked_mul(1u64 << shift).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if n >= 1 << shift && n.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", n >> shift);
            }
        }
        write!(f, "{n}")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        let parsed = match Raw::deserialize(d) {
            Ok(Raw::N(n)) => Some(ByteSize(n)),
            Ok(Raw::S(s)) => ByteSize::parse(&s),
            Err(_) => None,
        };
        parsed.ok_or_else(|| {
            serde::de::Error::custom("expected a size such as \"200G\", \"512M\" or 4096 (bytes)")
        })
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
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
    /// Default binds, `SRC[:DST[:ro|rw]]` (seed 002: data, work, models).
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

/// An absolute path, or "" for off.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OptAbsPath(pub Option<PathBuf>);

impl OptAbsPath {
    pub fn as_path(&self) -> Option<&Path> {
        self.0.as_deref()
    }
}

impl<'de> Deserialize<'de> for OptAbsPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            Ok(OptAbsPath(None))
        } else if s.starts_with('/') {
            Ok(OptAbsPath(Some(PathBuf::from(s))))
        } else {
            Err(serde::de::Error::custom(format!(
                "'{s}' is not an absolute path; give one, or \"\" for off"
            )))
        }
    }
}

impl Serialize for OptAbsPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(p) => s.serialize_str(&p.to_string_lossy()),
            None => s.serialize_str(""),
        }
    }
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

/// Why the configuration could not be used. `Display` is one line.
#[derive(Debug)]
pub enum ConfigError {
    Read {
        path: PathBuf,
        source: io::Error,
    },
    TooLarge {
        path: PathBuf,
        size: u64,
    },
    Parse {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    Argument {
        arg: String,
        message: String,
    },
    /// Read as root, the file (or its directory) could be changed by
    /// someone other than root.
    Untrusted(crate::secure::TrustError),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            ConfigError::TooLarge { path, size } => write!(
                f,
                "{}: {size} bytes is too large for a config (limit {MAX_CONFIG_BYTES})",
                path.display()
            ),
            ConfigError::Parse {
                path,
                line,
                key,
                message,
            } => {
                write!(f, "{}:{line}: ", path.display())?;
                if !key.is_empty() {
                    write!(f, "key '{key}': ")?;
                }
                write!(
                    f,
                    "{message}; fix the file (or remove it to use the defaults)"
                )
            }
            ConfigError::Argument { arg, message } => write!(
                f,
                "plugstack argument '{arg}': {message}; fix the ml-container line in plugstack.conf"
            ),
            ConfigError::Untrusted(e) => write!(f, "refusing the site config: {e}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The arguments of the plugin's plugstack.conf line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlugstackArgs {
    pub config_path: Option<PathBuf>,
    /// `section.key` and the raw value, in the order given.
    pub overrides: Vec<(String, String)>,
}

impl PlugstackArgs {
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<PlugstackArgs, ConfigError> {
        let mut out = PlugstackArgs::default();
        for arg in args {
            let arg = arg.as_ref();
            let Some((key, value)) = arg.split_once('=') else {
                return Err(ConfigError::Argument {
                    arg: arg.to_string(),
                    message: "expected config=PATH or section.key=value".to_string(),
                });
            };
            if key == "config" {
                if !value.starts_with('/') {
                    return Err(ConfigError::Argument {
                        arg: arg.to_string(),
                        message: "the config path must be absolute".to_string(),
                    });
                }
                out.config_path = Some(PathBuf::from(value));
            } else {
                out.overrides.push((key.to_string(), value.to_string()));
            }
        }
        Ok(out)
    }

    pub fn path(&self) -> &Path {
        self.config_path
            .as_deref()
            .unwrap_or(Path::new(DEFAULT_CONFIG_PATH))
    }
}

impl SiteConfig {
    /// Loads the file named by the plugstack arguments (or the default path)
    /// and applies the overrides. A missing file gives the defaults.
    pub fn load(args: &PlugstackArgs) -> Result<SiteConfig, ConfigError> {
        let path = args.path();
        let text = match read_limited(path) {
            Ok(t) => Some(t),
            Err(ConfigError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                None
            }
            Err(e) => return Err(e),
        };
        let config = match text {
            Some(t) => SiteConfig::parse(path, &t)?,
            None => SiteConfig::default(),
        };
        config.with_overrides(&args.overrides)
    }

    /// Parses config text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<SiteConfig, ConfigError> {
        let cfg: SiteConfig = toml::from_str(text).map_err(|e| {
            let (line, key) = match e.span() {
                Some(span) => locate(text, span.start),
                None => (1, String::new()),
            };
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                key,
                message: one_line(e.message()),
            }
        })?;
        cfg.check_nccl().map_err(|(name, message)| {
            let line = find_key_line(text, "nccl", &name).unwrap_or(1);
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                key: format!("nccl.{name}"),
                message,
            }
        })?;
        Ok(cfg)
    }

    /// Applies `section.key=value` overrides. Values are read as TOML when
    /// they parse as such (`29500`, `true`, `["a"]`), else as plain strings.
    pub fn with_overrides(self, overrides: &[(String, String)]) -> Result<SiteConfig, ConfigError> {
        if overrides.is_empty() {
            return Ok(self);
        }
        let arg_err = |k: &str, v: &str, message: String| ConfigError::Argument {
            arg: format!("{k}={v}"),
            message,
        };
        let mut root =
            toml::Value::try_from(&self).map_err(|e| arg_err("", "", format!("internal: {e}")))?;
        for (key, value) in overrides {
            let Some((section, name)) = key.split_once('.') else {
                return Err(arg_err(
                    key,
                    value,
                    "name a key as section.key, e.g. runtime.gpus=off".to_string(),
                ));
            };
            let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.clone()));
            let Some(table) = root.get_mut(section).and_then(toml::Value::as_table_mut) else {
                return Err(arg_err(key, value, format!("unknown section '{section}'")));
            };
            table.insert(name.to_string(), parsed);
            // Check each override alone so the error names the right one.
            root.clone()
                .try_into::<SiteConfig>()
                .map_err(|e| arg_err(key, value, one_line(e.message())))?;
        }
        let cfg: SiteConfig = root
            .try_into()
            .map_err(|e: toml::de::Error| arg_err("", "", one_line(e.message())))?;
        cfg.check_nccl()
            .map_err(|(name, message)| arg_err(&format!("nccl.{name}"), "", message))?;
        Ok(cfg)
    }

    fn check_nccl(&self) -> Result<(), (String, String)> {
        match self.nccl.keys().find(|k| !k.0.starts_with("NCCL_")) {
            Some(k) => Err((
                k.0.clone(),
                format!(
                    "'{}' does not start with NCCL_: put other variables under [env]",
                    k.0
                ),
            )),
            None => Ok(()),
        }
    }

    /// Directories an absolute image path may point into.
    pub fn allowed_image_dirs(&self) -> Vec<&Path> {
        if self.registry.allowed_dirs.is_empty() {
            vec![self.registry.root.as_path()]
        } else {
            self.registry
                .allowed_dirs
                .iter()
                .map(AbsPath::as_path)
                .collect()
        }
    }
}

/// The config's text, opened the one safe way ([`crate::secure`]). As root
/// (slurmstepd, srun run by root, the CLI under sudo) the file decides what
/// root runs, so it must be root's alone: owned by root and not writable
/// by group or others, nor its directory. Other users read it as
/// themselves, which gives them nothing they could not do anyway.
fn read_limited(path: &Path) -> Result<String, ConfigError> {
    use crate::secure::{self, ReadText, TrustError};
    let to_config_err = |e: TrustError| match e {
        TrustError::Io { path, source } => ConfigError::Read { path, source },
        other => ConfigError::Untrusted(other),
    };
    let (file, meta) = if nix::unistd::geteuid().is_root() {
        secure::open_trusted(path, &[0])
    } else {
        std::fs::canonicalize(path)
            .map_err(|source| TrustError::Io {
                path: path.to_path_buf(),
                source,
            })
            .and_then(|real| secure::open_regular(&real))
    }
    .map_err(to_config_err)?;
    match secure::read_limited(file, &meta, path, MAX_CONFIG_BYTES).map_err(to_config_err)? {
        ReadText::Text(t) => Ok(t),
        ReadText::TooLarge(size) => Err(ConfigError::TooLarge {
            path: path.to_path_buf(),
            size,
        }),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The 1-based line of byte `offset` and the dotted key written there
/// (`section.key`), found from the text around it.
fn locate(text: &str, offset: usize) -> (usize, String) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or("");
    let line_no = before.matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let section = text
        .lines()
        .take(line_no)
        .filter_map(section_name)
        .last()
        .unwrap_or_default();
    let key = match line.split_once('=') {
        _ if section_name(line).is_some() => section.clone(),
        Some((k, _)) => {
            let k = k.trim().trim_matches('"');
            if section.is_empty() {
                k.to_string()
            } else {
                format!("{section}.{k}")
            }
        }
        None => section.clone(),
    };
    (line_no, key)
}

fn section_name(line: &str) -> Option<String> {
    let l = line.trim();
    if l.starts_with('[') {
        let inner = l.trim_start_matches('[');
        let end = inner.find(']')?;
        Some(inner[..end].trim().to_string())
    } else {
        None
    }
}

fn find_key_line(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(s) = section_name(line) {
            current = s;
        } else if current == section {
            if let Some((k, _)) = line.split_once('=') {
                if k.trim().trim_matches('"') == key {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SiteConfig, ConfigError> {
        SiteConfig::parse(Path::new("/etc/slurm/ml-container.toml"), text)
    }

    #[test]
    fn empty_file_is_defaults() {
        assert_eq!(parse("").unwrap(), SiteConfig::default());
    }

    #[test]
    fn full_file() {
        let cfg = parse(
            r#"
[registry]
root = "/srv/containers"
verify = "full"
allowed_dirs = ["/scratch/images"]

[runtime]
kind = "singularity"
gpus = "off"
binds = ["/lustre/data:/data:ro"]

[distributed]
port_range = [40000, 40099]
addr = "ip"

[nccl]
NCCL_DEBUG = "WARN"
NCCL_IB_DISABLE = 1

[env]
OMP_NUM_THREADS = 4

[failure]
syslog = false
probe_timeout = 2
"#,
        )
        .unwrap();
        assert_eq!(cfg.registry.root.as_path(), Path::new("/srv/containers"));
        assert_eq!(cfg.registry.verify, VerifyLevel::Full);
        assert_eq!(cfg.runtime.kind, RuntimeKind::Singularity);
        assert_eq!(cfg.runtime.gpus, GpuPolicy::Off);
        assert_eq!(
            cfg.distributed.port_range,
            PortRange {
                lo: 40000,
                hi: 40099
            }
        );
        assert_eq!(cfg.distributed.addr, AddrKind::Ip);
        assert_eq!(
            cfg.nccl.get(&EnvName("NCCL_IB_DISABLE".into())),
            Some(&EnvValue("1".into()))
        );
        assert_eq!(
            cfg.env.get(&EnvName("OMP_NUM_THREADS".into())),
            Some(&EnvValue("4".into()))
        );
        assert!(!cfg.failure.syslog);
        assert_eq!(cfg.allowed_image_dirs(), vec![Path::new("/scratch/images")]);
    }

    fn parse_err(text: &str) -> (usize, String, String) {
        match parse(text) {
            Err(ConfigError::Parse {
                line, key, message, ..
            }) => (line, key, message),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn bad_value_names_line_and_key() {
        let (line, key, msg) =
            parse_err("[registry]\nroot = \"/x\"\n\n[runtime]\ngpus = \"maybe\"\n");
        assert_eq!(line, 5);
        assert_eq!(key, "runtime.gpus");
        assert!(msg.contains("maybe"), "{msg}");
    }

    #[test]
    fn node_cache_keys() {
        let p = Path::new("/etc/slurm/ml-container.toml");
        let c = SiteConfig::parse(p, "").unwrap();
        assert_eq!(c.registry.node_cache.for_host("n1"), None);
        assert_eq!(c.registry.node_cache_max, ByteSize(100 << 30));
        let c = SiteConfig::parse(
            p,
            "[registry]\nnode_cache = \"/var/cache/mlc/%n\"\nnode_cache_max = \"200G\"\n",
        )
        .unwrap();
        assert_eq!(
            c.registry.node_cache.for_host("gpu1"),
            Some(PathBuf::from("/var/cache/mlc/gpu1"))
        );
        assert_eq!(c.registry.node_cache_max, ByteSize(200 << 30));
        assert_eq!(c.registry.node_cache_max.to_string(), "200G");
        for (value, n) in [
            ("4096", 4096u64),
            ("512M", 512 << 20),
            ("1t", 1 << 40),
            ("3 KiB", 3072),
        ] {
            assert_eq!(ByteSize::parse(value), Some(ByteSize(n)), "{value}");
        }
        for bad in [
            "node_cache = \"relative\"",
            "node_cache = \"/a/../b\"",
            "node_cache = \"/a/%u\"",
            "node_cache_max = \"12X\"",
            "node_cache_max = \"99999999999T\"",
            "node_cache_max = -1",
        ] {
            let e = SiteConfig::parse(p, &format!("[registry]\n{bad}\n")).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("ml-container.toml:2"), "{bad}: {msg}");
        }
        // The size round-trips through the overrides path (plugstack args).
        let c = SiteConfig::default()
            .with_overrides(&[("registry.node_cache_max".into(), "1G".into())])
            .unwrap();
        assert_eq!(c.registry.node_cache_max, ByteSize(1 << 30));
    }

    #[test]
    fn unknown_key_named() {
        let (line, key, msg) = parse_err("[runtime]\nkind = \"apptainer\"\ngpu = \"on\"\n");
        assert_eq!(line, 3);
        assert_eq!(key, "runtime.gpu");
        assert!(msg.contains("unknown field"), "{msg}");
    }

    #[test]
    fn unknown_section_named() {
        let (line, key, _) = parse_err("[registry]\n\n[runtimes]\nkind = \"x\"\n");
        assert_eq!(line, 3);
        assert_eq!(key, "runtimes");
    }

    #[test]
    fn syntax_error_has_line() {
        let (line, _, _) = parse_err("[registry]\nroot = \"/x\"\nverify = \n");
        assert_eq!(line, 3);
    }

    #[test]
    fn semantic_checks() {
        let (line, key, _) = parse_err("[registry]\nroot = \"relative\"\n");
        assert_eq!((line, key.as_str()), (2, "registry.root"));
        let (line, key, _) = parse_err("[distributed]\nport_range = [30000, 20000]\n");
        assert_eq!((line, key.as_str()), (2, "distributed.port_range"));
        let (_, key, _) = parse_err("[distributed]\nport_range = [80, 90]\n");
        assert_eq!(key, "distributed.port_range");
        let (line, key, _) = parse_err("[nccl]\nNCCL_A = \"1\"\nFOO = \"2\"\n");
        assert_eq!((line, key.as_str()), (3, "nccl.FOO"));
        let (_, key, _) = parse_err("[env]\n\"1BAD\" = \"x\"\n");
        assert_eq!(key, "env.1BAD");
        let (_, key, _) = parse_err("[env]\nX = [1]\n");
        assert_eq!(key, "env.X");
    }

    #[test]
    fn display_is_one_line_with_file_line_key() {
        let e = parse("[runtime]\ngpus = 3\n").unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.starts_with("/etc/slurm/ml-container.toml:2: key 'runtime.gpus'"),
            "{e}"
        );
    }

    #[test]
    fn plugstack_args() {
        let a = PlugstackArgs::parse(&["config=/tmp/x.toml", "runtime.gpus=off"]).unwrap();
        assert_eq!(a.path(), Path::new("/tmp/x.toml"));
        assert_eq!(a.overrides, vec![("runtime.gpus".into(), "off".into())]);
        assert!(PlugstackArgs::parse(&["bogus"]).is_err());
        assert!(PlugstackArgs::parse(&["config=rel.toml"]).is_err());
        assert_eq!(
            PlugstackArgs::parse::<&str>(&[]).unwrap().path(),
            Path::new(DEFAULT_CONFIG_PATH)
        );
    }

    #[test]
    fn overrides_apply_and_fail_clearly() {
        let cfg = SiteConfig::default()
            .with_overrides(&[
                ("runtime.gpus".into(), "off".into()),
                ("distributed.port_range".into(), "[40000, 40010]".into()),
                ("registry.root".into(), "/srv/c".into()),
                ("nccl.NCCL_DEBUG".into(), "INFO".into()),
            ])
            .unwrap();
        assert_eq!(cfg.runtime.gpus, GpuPolicy::Off);
        assert_eq!(cfg.distributed.port_range.lo, 40000);
        assert_eq!(cfg.registry.root.as_path(), Path::new("/srv/c"));
        for (k, v) in [
            ("runtime.gpus", "maybe"),
            ("runtime.nope", "1"),
            ("nosection.x", "1"),
            ("flat", "1"),
            ("nccl.FOO", "1"),
        ] {
            let e = SiteConfig::default()
                .with_overrides(&[(k.into(), v.into())])
                .unwrap_err();
            assert!(matches!(e, ConfigError::Argument { .. }), "{k}: {e}");
            assert!(
                e.to_string()
                    .contains(k.split('.').next_back().unwrap_or(k)),
                "{e}"
            );
        }
    }

    #[test]
    fn load_missing_file_is_default() {
        let args = PlugstackArgs {
            config_path: Some(PathBuf::from("/nonexistent/ml-container.toml")),
            overrides: vec![],
        };
        assert_eq!(SiteConfig::load(&args).unwrap(), SiteConfig::default());
    }

    /// As root, a site config someone else could change is refused, with
    /// the fix; as any other user the same file is read (I4).
    #[test]
    fn root_refuses_an_untrusted_config() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("mlc-cfg-trust-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("ml-container.toml");
        std::fs::write(&path, "[runtime]\ngpus = \"off\"\n").unwrap();
        let args = PlugstackArgs {
            config_path: Some(path.clone()),
            overrides: vec![],
        };
        let chmod = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
        chmod(&path, 0o644).unwrap();
        let good = SiteConfig::load(&args);
        chmod(&path, 0o666).unwrap();
        let writable = SiteConfig::load(&args);
        chmod(&path, 0o644).unwrap();
        chmod(&dir, 0o777).unwrap();
        let dir_writable = SiteConfig::load(&args);
        chmod(&dir, 0o755).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(good.unwrap().runtime.gpus, GpuPolicy::Off);
        if nix::unistd::geteuid().is_root() {
            for (what, r) in [("file", writable), ("directory", dir_writable)] {
                let e = r.expect_err(what).to_string();
                assert!(e.starts_with("refusing the site config"), "{what}: {e}");
                assert!(e.ends_with("chmod go-w it"), "{what}: {e}");
            }
        } else {
            assert!(writable.is_ok() && dir_writable.is_ok());
        }
    }

    #[test]
    fn hostile_inputs_do_not_panic() {
        for text in [
            "[",
            "[[registry]]",
            "registry = 1",
            "\u{0}",
            "[registry]\nroot = \"\\u0000\"",
            "[a.b.c.d]\n",
            "x = \"\n",
            "[runtime]\nbinds = [[[]]]",
        ] {
            let _ = parse(text);
        }
    }
}
