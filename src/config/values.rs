//! The value types of the site config, each checked as it is
//! deserialized, so a bad value names its key and line.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
