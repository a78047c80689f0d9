//! Image resolution: what `--ml-container=IMAGE` means (SPEC "Registry").
//!
//! In order: an absolute path (only inside the allowed directories, checked
//! after canonicalisation so `..` and symlinks cannot escape); `name:tag`
//! in the catalog; an alias (including registry references such as
//! `nvcr.io/nvidia/pytorch:24.01-py3`); a bare `name` (its default tag, else
//! the newest `added`); `<name>.sif` in the search directories. Anything
//! else is an error that lists the closest names.
//!
//! srun resolves once and sends the result to the nodes as a [`Pin`] (path,
//! size, sha256) in the job environment. The job environment is the
//! user's, so a node never believes a pin: it resolves the image again from
//! the catalog it reads itself, and the pin may only confirm that srun and
//! the node agree ([`Pin::confirms`]); when they do not (the catalog was
//! rewritten during the launch) the step fails rather than nodes running
//! different images. What is verified (expected size, sha256) comes only
//! from the node's own catalog.
//!
//! Images are opened once, by [`secure::open_regular`], and everything
//! after (size, structure, hash) is read from that fd. On a node, root first
//! asks whether the job's user may read the file, as that user, so root
//! never reads (or reveals in an error) a file the user could not.
#![forbid(unsafe_code)]

use std::cell::{Cell, OnceCell};
use std::fmt;
use std::fs::{self, File, Metadata};
use std::io;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::catalog::{self, Catalog, CatalogError, RegistrySettings};
use crate::catalog_index::{self, Kind};
use crate::config::{RegistryConfig, VerifyLevel};
use crate::secure::{self, ReadText, TrustError};

/// The job environment variable that carries srun's resolution to the nodes.
pub const PIN_ENV: &str = "ML_CONTAINER_PIN";
/// Image files: SIF for Apptainer/Singularity, plain squashfs for
/// Charliecloud's ch-run.
pub const IMAGE_SUFFIXES: &[&str] = &[".sif", ".sqfs"];
/// How many close names an "unknown image" error lists.
pub const SUGGESTIONS: usize = 5;
/// The largest pin text a node parses: a pin is a few hundred bytes; the
/// job environment is the user's and may hold anything.
pub const MAX_PIN_BYTES: usize = 16 << 10;
/// Caps on the pin's fields, checked before any use.
pub const MAX_PIN_PATH: usize = 4096;
pub const MAX_PIN_REFERENCE: usize = 1024;

#[derive(Debug)]
pub enum RegistryError {
    /// The registry root is not there (or not readable) in this process.
    Unavailable {
        root: PathBuf,
        source: io::Error,
    },
    Catalog(CatalogError),
    CatalogRead {
        path: PathBuf,
        source: io::Error,
    },
    CatalogTooLarge {
        path: PathBuf,
        size: u64,
    },
    Untrusted(TrustError),
    UnknownOwner {
        owner: String,
    },
    BadReference {
        reference: String,
        reason: &'static str,
    },
    Unknown {
        reference: String,
        suggestions: Vec<String>,
    },
    Outside {
        reference: String,
        resolved: PathBuf,
        allowed: Vec<PathBuf>,
    },
    Missing {
        reference: String,
        path: PathBuf,
        source: io::Error,
    },
    NotFile {
        reference: String,
        path: PathBuf,
    },
    /// srun's pin and this node's own resolution differ in `what`.
    PinChanged {
        reference: String,
        path: PathBuf,
        what: &'static str,
    },
    BadPin {
        reason: String,
    },
    /// On a node: the job's user cannot read the image (asked as the user,
    /// before root opens it).
    UserCannotRead {
        path: PathBuf,
        user: String,
        source: io::Error,
    },
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryError::Unavailable { root, source } => write!(
                f,
                "the image registry {} is not available here: {source}",
                root.display()
            ),
            RegistryError::Catalog(e) => write!(f, "{e}"),
            RegistryError::CatalogRead { path, source } => {
                write!(f, "cannot read the catalog {}: {source}", path.display())
            }
            RegistryError::CatalogTooLarge { path, size } => write!(
                f,
                "the catalog {} is {size} bytes, over the {} limit",
                path.display(),
                catalog::MAX_CATALOG_BYTES
            ),
            RegistryError::Untrusted(e) => write!(f, "refusing the catalog: {e}"),
            RegistryError::UnknownOwner { owner } => write!(
                f,
                "registry.owner = '{owner}' is not a known user: fix it in the site config"
            ),
            RegistryError::BadReference { reference, reason } => write!(
                f,
                "invalid image '{}': {reason}; use NAME, NAME:TAG, a catalog reference or an \
                 absolute path to a .sif",
                reference.escape_default()
            ),
            RegistryError::Unknown {
                reference,
                suggestions,
            } => {
                write!(f, "unknown image '{}'", escaped(reference))?;
                if !suggestions.is_empty() {
                    write!(f, "; closest: {}", suggestions.join(", "))?;
                }
                write!(f, "; 'ml-container list' shows every image")
            }
            RegistryError::Outside {
                reference,
                resolved,
                allowed,
            } => write!(
                f,
                "image '{}' resolves to {}, outside the allowed image directories ({}): \
                 copy the image there or ask the admins to allow its directory",
                escaped(reference),
                escaped(&resolved.to_string_lossy()),
                allowed
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            RegistryError::Missing {
                reference,
                path,
                source,
            } => write!(
                f,
                "image '{}': {} cannot be used: {source} (is the catalog stale? \
                 'ml-container verify' checks it)",
                escaped(reference),
                escaped(&path.to_string_lossy())
            ),
            RegistryError::NotFile { reference, path } => write!(
                f,
                "image '{}': {} is not a regular file; use a .sif file",
                escaped(reference),
                escaped(&path.to_string_lossy())
            ),
            RegistryError::PinChanged {
                reference,
                path,
                what,
            } => write!(
                f,
                "image '{}' changed after srun chose it: this node's catalog names {} with \
                 another {what} than srun saw (the catalog was rewritten during the launch); \
                 every node must run the same image, so the step is stopped; submit it again",
                escaped(reference),
                escaped(&path.to_string_lossy())
            ),
            RegistryError::BadPin { reason } => write!(
                f,
                "the image choice srun passed in {PIN_ENV} is invalid ({reason}); do not set \
                 {PIN_ENV} yourself"
            ),
            RegistryError::UserCannotRead { path, user, source } => write!(
                f,
                "cannot read image {} as user {}: {source}; ask the admins to make it readable \
                 (chmod o+r)",
                escaped(&path.to_string_lossy()),
                escaped(user)
            ),
        }
    }
}

impl std::error::Error for RegistryError {}

/// How a reference was resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Catalog,
    Alias,
    Scan,
    Path,
}

/// A resolved image, also what srun pins for the nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// What the user typed.
    pub reference: String,
    pub source: Source,
    pub name: Option<String>,
    pub tag: Option<String>,
    /// Canonical path of the image file.
    pub path: PathBuf,
    /// The file's size when resolved.
    pub size: u64,
    /// The size the catalog records, if any.
    pub catalog_size: Option<u64>,
    pub sha256: Option<String>,
    /// The file's mode, from `fstat` of the fd that was verified (for the
    /// report; never sent to the nodes).
    #[serde(skip)]
    pub mode: Option<u32>,
}

impl Pin {
    /// The pin as an environment value (TOML text; Slurm carries any bytes
    /// but NUL, and a value with newlines is fine).
    pub fn encode(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Parses a pin from the job environment, which the user controls: the
    /// text and every field are checked against caps and character rules
    /// before anything uses them, and no part of a refused pin is echoed
    /// (a reason names the field, never its value).
    pub fn decode(text: &str) -> Result<Pin, RegistryError> {
        let bad = |reason: &str| RegistryError::BadPin {
            reason: reason.to_string(),
        };
        if text.len() > MAX_PIN_BYTES {
            return Err(bad("too long"));
        }
        let pin: Pin = toml::from_str(text).map_err(|_| bad("not a pin"))?;
        let path = pin.path.to_str().ok_or_else(|| bad("path is not UTF-8"))?;
        if !path.starts_with('/') || path.len() > MAX_PIN_PATH || has_control(path) {
            return Err(bad("path must be absolute, printable, at most 4096 bytes"));
        }
        if pin.reference.is_empty()
            || pin.reference.len() > MAX_PIN_REFERENCE
            || pin
                .reference
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad(
                "reference must be printable, without spaces, at most 1024 bytes",
            ));
        }
        if pin.name.as_deref().is_some_and(|n| !catalog::valid_name(n))
            || pin.tag.as_deref().is_some_and(|t| !catalog::valid_tag(t))
        {
            return Err(bad("name or tag is not a catalog name"));
        }
        if pin
            .sha256
            .as_deref()
            .is_some_and(|h| !catalog::is_sha256_hex(h))
        {
            return Err(bad("sha256 must be 64 lowercase hex digits"));
        }
        Ok(pin)
    }

    /// On a node: does srun's pin (`srun`) name exactly what this node
    /// resolved (`self`)? A pin can only confirm, never choose: path, size
    /// and sha256 all come from the node's own resolution.
    pub fn confirms(&self, srun: &Pin) -> Result<(), RegistryError> {
        let what = if srun.reference != self.reference {
            Some("image name")
        } else if srun.path != self.path {
            Some("file")
        } else if srun.size != self.size {
            Some("size")
        } else if srun.sha256 != self.sha256 || srun.catalog_size != self.catalog_size {
            Some("sha256 or size in the catalog")
        } else {
            None
        };
        match what {
            None => Ok(()),
            Some(what) => Err(RegistryError::PinChanged {
                reference: self.reference.clone(),
                path: self.path.clone(),
                what,
            }),
        }
    }

    /// `name:tag` when known, else the reference.
    pub fn display_name(&self) -> String {
        match (&self.name, &self.tag) {
            (Some(n), Some(t)) => format!("{n}:{t}"),
            _ => self.reference.clone(),
        }
    }
}

/// An image resolved and opened the one safe way: the open file is what
/// every later check (size, structure, hash) reads.
#[derive(Debug)]
pub struct Opened {
    pub pin: Pin,
    pub file: File,
    /// `fstat` of `file`.
    pub meta: Metadata,
}

/// "May the job's user read this path?", asked as that user (on a node,
/// where the plugin is root): the user's name for messages, and the check.
pub struct UserCheck<'a> {
    pub user: String,
    pub may_read: &'a dyn Fn(&Path) -> io::Result<()>,
}

impl fmt::Debug for UserCheck<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserCheck({})", self.user)
    }
}

/// This process's user name (the uid when it has none).
fn this_user() -> String {
    let uid = nix::unistd::geteuid();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {uid}"), |u| u.name)
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// A string from a job, safe for one log line: escaped and capped.
pub fn escaped(s: &str) -> String {
    const CAP: usize = 512;
    let mut out: String = s.chars().take(CAP).flat_map(char::escape_default).collect();
    if s.chars().nth(CAP).is_some() {
        out.push_str("...");
    }
    out
}

/// The registry as seen from this process.
#[derive(Debug)]
pub struct Registry<'a> {
    cfg: &'a RegistryConfig,
    root: PathBuf,
    /// Parsed on first use: a node given a pin never needs it, and a
    /// catalog of 10,000 images takes a third of a second to parse.
    catalog: OnceCell<Catalog>,
    settings: RegistrySettings,
    use_index: bool,
    index_hits: Cell<u32>,
}

impl<'a> Registry<'a> {
    /// Opens the registry: the root must be there; the registry settings
    /// are optional but, when present, must be trusted and well-formed.
    /// The catalog is read on first use ([`Registry::catalog`]).
    pub fn open(cfg: &'a RegistryConfig) -> Result<Registry<'a>, RegistryError> {
        let root =
            fs::canonicalize(cfg.root.as_path()).map_err(|source| RegistryError::Unavailable {
                root: cfg.root.0.clone(),
                source,
            })?;
        let settings_path = root.join(catalog::REGISTRY_CONFIG_PATH);
        let settings = match read_trusted(&settings_path, &trusted_uids(cfg)?)? {
            None => RegistrySettings::default(),
            Some(text) => {
                RegistrySettings::parse(&settings_path, &text).map_err(RegistryError::Catalog)?
            }
        };
        Ok(Registry {
            cfg,
            root,
            catalog: OnceCell::new(),
            settings,
            use_index: true,
            index_hits: Cell::new(0),
        })
    }

    /// Directories scanned for `<name>.sif`: the registry's own setting,
    /// else the site config's.
    pub fn search_dirs(&self) -> Vec<&str> {
        match &self.settings.search_dirs {
            Some(dirs) => dirs.iter().map(|d| d.0.as_str()).collect(),
            None => self.cfg.search_dirs.iter().map(String::as_str).collect(),
        }
    }

    /// The verify level in force: the site's, raised to the registry's floor.
    pub fn verify_level(&self) -> VerifyLevel {
        match (self.cfg.verify, self.settings.verify) {
            (VerifyLevel::Full, _) | (_, Some(VerifyLevel::Full)) => VerifyLevel::Full,
            _ => VerifyLevel::Quick,
        }
    }

    /// The catalog, optional but, when present, trusted and well-formed;
    /// read and parsed once per `Registry`.
    pub fn catalog(&self) -> Result<&Catalog, RegistryError> {
        if let Some(c) = self.catalog.get() {
            return Ok(c);
        }
        let path = self.root.join(catalog::CATALOG_PATH);
        let parsed = match read_trusted(&path, &trusted_uids(self.cfg)?)? {
            None => Catalog::default(),
            Some(text) => Catalog::parse(&path, &text).map_err(RegistryError::Catalog)?,
        };
        Ok(self.catalog.get_or_init(|| parsed))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves what the user typed to one image file (opened, checked,
    /// then closed: for the CLI and srun, which run as the user).
    pub fn resolve(&self, reference: &str) -> Result<Pin, RegistryError> {
        self.resolve_open(reference, None).map(|o| o.pin)
    }

    /// Resolves what the user typed to one image file and opens it the one
    /// safe way. With `user` (on a node, as root), the user's right to read
    /// the file is checked as the user before root opens it.
    pub fn resolve_open(
        &self,
        reference: &str,
        user: Option<&UserCheck<'_>>,
    ) -> Result<Opened, RegistryError> {
        let bad = |reason| RegistryError::BadReference {
            reference: reference.to_string(),
            reason,
        };
        if reference.is_empty() {
            return Err(bad("empty"));
        }
        if reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad("white space or control characters"));
        }
        if reference.starts_with('/') {
            if !IMAGE_SUFFIXES.iter().any(|s| reference.ends_with(s)) {
                return Err(bad(
                    "an absolute image path must name a .sif (or .sqfs) file",
                ));
            }
            return self.pin_file(reference, Source::Path, None, Path::new(reference), user);
        }
        if reference.starts_with('.') || reference.split('/').any(|c| c == "..") {
            return Err(bad("relative paths are not image names"));
        }
        if let Some((source, im)) = self.indexed(reference) {
            return self.pin_file(reference, source, Some(&im), &im.path, user);
        }
        let catalog = self.catalog()?;
        if let Some((name, tag)) = reference.rsplit_once(':') {
            if let Some(im) = catalog.get(name, tag) {
                return self.pin_file(reference, Source::Catalog, Some(im), &im.path, user);
            }
        }
        if let Some(im) = catalog.by_alias(reference) {
            return self.pin_file(reference, Source::Alias, Some(im), &im.path, user);
        }
        if !reference.contains(':') {
            if let Some(im) = catalog.default_for(reference) {
                return self.pin_file(reference, Source::Catalog, Some(im), &im.path, user);
            }
            if catalog::valid_name(reference) && !reference.contains('/') {
                for dir in self.search_dirs() {
                    for suffix in IMAGE_SUFFIXES {
                        let candidate = self.root.join(dir).join(format!("{reference}{suffix}"));
                        if fs::symlink_metadata(&candidate).is_ok() {
                            return self.pin_file(reference, Source::Scan, None, &candidate, user);
                        }
                    }
                }
            }
        }
        Err(RegistryError::Unknown {
            reference: reference.to_string(),
            suggestions: self.closest(reference),
        })
    }

    /// The catalog entry `reference` names, from the index beside the
    /// catalog, in the order the full resolution uses (`name:tag`, alias,
    /// bare name); `None` sends the caller to the full strict parse: no
    /// index, a stale or damaged one, or a key it does not have (a lost
    /// record costs time, never another image). Used only while the
    /// catalog has not been parsed in this `Registry`.
    fn indexed(&self, reference: &str) -> Option<(Source, catalog::Image)> {
        if !self.use_index || self.catalog.get().is_some() {
            return None;
        }
        let trusted = trusted_uids(self.cfg).ok()?;
        let catalog_path = self.root.join(catalog::CATALOG_PATH);
        let (_, meta) = secure::open_trusted(&catalog_path, &trusted).ok()?;
        if meta.len() > catalog::MAX_CATALOG_BYTES {
            return None;
        }
        let index = match catalog_index::open(
            &self.root.join(catalog_index::INDEX_PATH),
            &meta,
            &trusted,
        ) {
            Ok(i) => i,
            Err(catalog_index::IndexError::Missing) => return None,
            Err(e) => {
                log::debug!("{e}");
                return None;
            }
        };
        let mut tries = Vec::with_capacity(3);
        if reference.contains(':') {
            tries.push((Kind::NameTag, Source::Catalog));
        }
        tries.push((Kind::Alias, Source::Alias));
        if !reference.contains(':') {
            tries.push((Kind::Bare, Source::Catalog));
        }
        for (kind, source) in tries {
            match index.lookup(kind, reference) {
                Ok(Some(e)) => {
                    self.index_hits.set(self.index_hits.get() + 1);
                    return Some((source, e.image()));
                }
                Ok(None) => {}
                Err(e) => {
                    log::debug!("{e}");
                    return None;
                }
            }
        }
        None
    }

    /// How many resolutions the index answered (tests, benchmarks).
    pub fn index_hits(&self) -> u32 {
        self.index_hits.get()
    }

    /// Never use the index (benchmarks compare; `doctor` and `verify`
    /// parse the catalog anyway).
    pub fn without_index(mut self) -> Self {
        self.use_index = false;
        self
    }

    /// Directories an image of this source may live in, as configured:
    /// the root (catalog and scan results), the allowed directories
    /// (catalog entries and absolute paths; the root when none is set).
    fn allowed_dirs(&self, source: Source) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = match source {
            Source::Scan => Vec::new(),
            _ => self.cfg.allowed_dirs.iter().map(|d| d.0.clone()).collect(),
        };
        if source != Source::Path || self.cfg.allowed_dirs.is_empty() {
            dirs.push(self.cfg.root.0.clone());
        }
        dirs
    }

    fn pin_file(
        &self,
        reference: &str,
        source: Source,
        entry: Option<&catalog::Image>,
        path: &Path,
        user: Option<&UserCheck<'_>>,
    ) -> Result<Opened, RegistryError> {
        let joined = if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.root.join(path)
        };
        let configured = self.allowed_dirs(source);
        let allowed: Vec<PathBuf> = configured
            .iter()
            .filter_map(|d| fs::canonicalize(d).ok())
            .collect();
        let outside = |resolved: PathBuf| RegistryError::Outside {
            reference: reference.to_string(),
            resolved,
            allowed: configured.clone(),
        };
        // Lexical check first, so a path outside is refused as such even
        // when it does not exist (configured names count too, for a root
        // that is itself a symlink); then the real path, after symlinks.
        let lexical = normalize(&joined);
        if !configured
            .iter()
            .chain(&allowed)
            .any(|d| lexical.starts_with(d))
        {
            return Err(outside(lexical));
        }
        let real = fs::canonicalize(&joined).map_err(|source| RegistryError::Missing {
            reference: reference.to_string(),
            path: joined.clone(),
            source,
        })?;
        if !allowed.iter().any(|d| real.starts_with(d)) {
            return Err(outside(real));
        }
        if let Some(u) = user {
            (u.may_read)(&real).map_err(|source| RegistryError::UserCannotRead {
                path: real.clone(),
                user: u.user.clone(),
                source,
            })?;
        }
        let (file, meta) = secure::open_regular(&real).map_err(|e| match e {
            TrustError::NotRegular { .. } => RegistryError::NotFile {
                reference: reference.to_string(),
                path: real.clone(),
            },
            // srun and the CLI run as the user: say so, with the fix, rather
            // than suggest a stale catalog.
            TrustError::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
                RegistryError::UserCannotRead {
                    path: real.clone(),
                    user: user.map_or_else(this_user, |u| u.user.clone()),
                    source,
                }
            }
            TrustError::Io { source, .. } => RegistryError::Missing {
                reference: reference.to_string(),
                path: real.clone(),
                source,
            },
            other => RegistryError::Missing {
                reference: reference.to_string(),
                path: real.clone(),
                source: io::Error::other(other.to_string()),
            },
        })?;
        let pin = Pin {
            reference: reference.to_string(),
            source,
            name: entry.map(|e| e.name.clone()),
            tag: entry.map(|e| e.tag.clone()),
            path: real,
            size: meta.len(),
            catalog_size: entry.and_then(|e| e.size),
            sha256: entry.and_then(|e| e.sha256.clone()),
            mode: Some(std::os::unix::fs::MetadataExt::mode(&meta)),
        };
        Ok(Opened { pin, file, meta })
    }

    /// Up to [`SUGGESTIONS`] known references closest to `reference`.
    pub fn closest(&self, reference: &str) -> Vec<String> {
        let mut scored: Vec<(usize, String)> = self
            .catalog()
            .ok()
            .into_iter()
            .flat_map(Catalog::references)
            .chain(self.scanned_names())
            .map(|r| (edit_distance(reference, &r), r))
            .collect();
        scored.sort();
        scored.dedup_by(|a, b| a.1 == b.1);
        scored
            .into_iter()
            .take(SUGGESTIONS)
            .map(|(_, r)| r)
            .collect()
    }

    /// `<name>` of every `<name>.sif` in the search directories.
    pub fn scanned_names(&self) -> Vec<String> {
        self.scanned().into_iter().map(|(n, _)| n).collect()
    }

    /// `(<name>, path)` of every `<name>.sif` in the search directories.
    pub fn scanned(&self) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        for dir in self.search_dirs() {
            let Ok(entries) = fs::read_dir(self.root.join(dir)) else {
                continue;
            };
            for e in entries.flatten().take(10_000) {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(stem) = IMAGE_SUFFIXES.iter().find_map(|s| name.strip_suffix(s)) {
                    out.push((stem.to_string(), e.path()));
                }
            }
        }
        out
    }
}

fn trusted_uids(cfg: &RegistryConfig) -> Result<Vec<u32>, RegistryError> {
    let owner = cfg.owner.trim();
    if owner == "root" || owner == "0" {
        return Ok(vec![0]);
    }
    let uid = match owner.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => nix::unistd::User::from_name(owner)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
            .ok_or_else(|| RegistryError::UnknownOwner {
                owner: owner.to_string(),
            })?,
    };
    Ok(vec![0, uid])
}

/// Reads and parses a catalog after the trust check (`ml-container` and
/// the tests; a missing catalog is an error here).
pub fn load_catalog(path: &Path, trusted: &[u32]) -> Result<Catalog, RegistryError> {
    let text = read_trusted(path, trusted)?.ok_or_else(|| RegistryError::CatalogRead {
        path: path.to_path_buf(),
        source: io::Error::from(io::ErrorKind::NotFound),
    })?;
    Catalog::parse(path, &text).map_err(RegistryError::Catalog)
}

/// A registry metadata file, opened the one safe way, after the trust
/// check (on the fd) and a size limit; `None` when it does not exist.
fn read_trusted(path: &Path, trusted: &[u32]) -> Result<Option<String>, RegistryError> {
    match secure::read_trusted(path, trusted, catalog::MAX_CATALOG_BYTES) {
        Ok(ReadText::Text(t)) => Ok(Some(t)),
        Ok(ReadText::TooLarge(size)) => Err(RegistryError::CatalogTooLarge {
            path: path.to_path_buf(),
            size,
        }),
        Err(TrustError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(TrustError::Io { source, .. }) => Err(RegistryError::CatalogRead {
            path: path.to_path_buf(),
            source,
        }),
        Err(e) => Err(RegistryError::Untrusted(e)),
    }
}

/// `a/./b/../c` -> `a/c`, without touching the file system.
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Levenshtein distance, bounded work for long inputs.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().take(256).collect();
    let b: Vec<char> = b.chars().take(256).collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AbsPath;

    struct Fixture {
        dir: PathBuf,
        cfg: RegistryConfig,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn fixture(name: &str, catalog: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("mlc-reg-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let root = dir.join("containers");
        for d in ["ml-frameworks", "custom-images", "base-images", ".registry"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("ml-frameworks/pytorch-2.1.sif"), "a").unwrap();
        fs::write(root.join("ml-frameworks/pytorch-2.2.sif"), "bb").unwrap();
        fs::write(root.join("custom-images/scanned.sif"), "ccc").unwrap();
        fs::create_dir_all(dir.join("outside")).unwrap();
        fs::write(dir.join("outside/evil.sif"), "x").unwrap();
        std::os::unix::fs::symlink(
            dir.join("outside/evil.sif"),
            root.join("base-images/escape.sif"),
        )
        .unwrap();
        fs::write(root.join(".registry/catalog.toml"), catalog).unwrap();
        // Temp dirs are world-writable-sticky parents; make ours strict.
        use std::os::unix::fs::PermissionsExt;
        for d in [&dir, &root, &root.join(".registry")] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let cfg = RegistryConfig {
            root: AbsPath(root),
            owner: nix::unistd::getuid().as_raw().to_string(),
            ..RegistryConfig::default()
        };
        Fixture { dir, cfg }
    }

    const CATALOG: &str = r#"version = 1
[[image]]
name = "pytorch"
tag = "2.1"
path = "ml-frameworks/pytorch-2.1.sif"
aliases = ["nvcr.io/nvidia/pytorch:24.01-py3"]
size = 1
[[image]]
name = "pytorch"
tag = "2.2"
path = "ml-frameworks/pytorch-2.2.sif"
default = true
[[image]]
name = "gone"
tag = "1"
path = "ml-frameworks/gone.sif"
[[image]]
name = "sneaky"
tag = "1"
path = "base-images/escape.sif"
"#;

    #[test]
    fn resolution_order() {
        let f = fixture("order", CATALOG);
        let r = Registry::open(&f.cfg).unwrap();
        let p = r.resolve("pytorch").unwrap();
        assert_eq!(
            (p.tag.as_deref(), p.size, p.source),
            (Some("2.2"), 2, Source::Catalog)
        );
        let p = r.resolve("pytorch:2.1").unwrap();
        assert_eq!((p.tag.as_deref(), p.catalog_size), (Some("2.1"), Some(1)));
        let p = r.resolve("nvcr.io/nvidia/pytorch:24.01-py3").unwrap();
        assert_eq!((p.tag.as_deref(), p.source), (Some("2.1"), Source::Alias));
        let p = r.resolve("scanned").unwrap();
        assert_eq!((p.source, p.size), (Source::Scan, 3));
        let abs = f.cfg.root.0.join("ml-frameworks/pytorch-2.1.sif");
        let p = r.resolve(abs.to_str().unwrap()).unwrap();
        assert_eq!(p.source, Source::Path);
        assert!(p.path.ends_with("ml-frameworks/pytorch-2.1.sif"));
    }

    #[test]
    fn escapes_are_refused() {
        let f = fixture("escape", CATALOG);
        let r = Registry::open(&f.cfg).unwrap();
        let outside = f.dir.join("outside/evil.sif");
        assert!(matches!(
            r.resolve(outside.to_str().unwrap()),
            Err(RegistryError::Outside { .. })
        ));
        let dotdot = format!("{}/../outside/evil.sif", f.cfg.root.0.display());
        assert!(matches!(
            r.resolve(&dotdot),
            Err(RegistryError::Outside { .. })
        ));
        // A symlink inside the registry that points outside it.
        assert!(matches!(
            r.resolve("sneaky:1"),
            Err(RegistryError::Outside { .. })
        ));
        assert!(matches!(
            r.resolve("escape"),
            Err(RegistryError::Outside { .. })
        ));
        assert!(matches!(
            r.resolve("/etc/passwd"),
            Err(RegistryError::BadReference { .. })
        ));
        assert!(matches!(
            r.resolve("../x"),
            Err(RegistryError::BadReference { .. })
        ));
        assert!(matches!(
            r.resolve("gone:1"),
            Err(RegistryError::Missing { .. })
        ));
    }

    #[test]
    fn unknown_lists_closest() {
        let f = fixture("unknown", CATALOG);
        let r = Registry::open(&f.cfg).unwrap();
        let e = r.resolve("pytorh").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("unknown image 'pytorh'; closest: pytorch"),
            "{msg}"
        );
        assert!(msg.contains("ml-container list"), "{msg}");
        if let RegistryError::Unknown { suggestions, .. } = e {
            assert!(suggestions.len() <= SUGGESTIONS);
        }
        assert!(matches!(
            r.resolve("pytorch:9.9"),
            Err(RegistryError::Unknown { .. })
        ));
    }

    #[test]
    fn untrusted_catalog_refused() {
        use std::os::unix::fs::PermissionsExt;
        let f = fixture("trust", CATALOG);
        let cat = f.cfg.root.0.join(".registry/catalog.toml");
        fs::set_permissions(&cat, fs::Permissions::from_mode(0o666)).unwrap();
        // Opening does not read the catalog (a pinned node never needs it);
        // the first use refuses it.
        let r = Registry::open(&f.cfg).unwrap();
        let e = r.resolve("pytorch").unwrap_err().to_string();
        assert!(e.contains("writable by group or others"), "{e}");
        let e = r.catalog().unwrap_err().to_string();
        assert!(e.contains("writable by group or others"), "{e}");
    }

    /// The node resolves itself; srun's pin only confirms (M1).
    #[test]
    fn a_pin_confirms_and_never_chooses() {
        let f = fixture("pin", CATALOG);
        let r = Registry::open(&f.cfg).unwrap();
        let srun = r.resolve("pytorch:2.1").unwrap();
        let back = Pin::decode(&srun.encode()).unwrap();
        assert_eq!(
            back,
            Pin {
                mode: None,
                ..srun.clone()
            }
        );
        // The same resolution on the node: confirmed.
        let node = Registry::open(&f.cfg)
            .unwrap()
            .resolve("pytorch:2.1")
            .unwrap();
        node.confirms(&back).unwrap();
        // A pin naming another file, size or sum is refused; the message
        // names the node's file, never the pin's values.
        for forged in [
            Pin {
                path: f.dir.join("outside/evil.sif"),
                ..back.clone()
            },
            Pin {
                size: 99,
                ..back.clone()
            },
            Pin {
                sha256: Some("a".repeat(64)),
                ..back.clone()
            },
            Pin {
                reference: "pytorch".into(),
                ..back.clone()
            },
        ] {
            let e = node.confirms(&forged).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, RegistryError::PinChanged { .. }), "{msg}");
            assert!(msg.contains("pytorch-2.1.sif"), "{msg}");
            assert!(!msg.contains("evil"), "{msg}");
            assert!(msg.ends_with("submit it again"), "{msg}");
        }
        // The catalog rewritten after srun resolved: the node's own
        // resolution differs, and the pin cannot override it.
        fs::write(
            f.cfg.root.0.join(".registry/catalog.toml"),
            CATALOG.replace("pytorch-2.1.sif", "pytorch-2.2.sif"),
        )
        .unwrap();
        let node = Registry::open(&f.cfg)
            .unwrap()
            .resolve("pytorch:2.1")
            .unwrap();
        assert!(matches!(
            node.confirms(&back),
            Err(RegistryError::PinChanged { what: "file", .. })
        ));
    }

    #[test]
    fn pin_fields_are_checked_before_use() {
        let good = Pin {
            reference: "tiny".into(),
            source: Source::Catalog,
            name: Some("tiny".into()),
            tag: Some("1.0".into()),
            path: PathBuf::from("/opt/containers/tiny.sif"),
            size: 1,
            catalog_size: None,
            sha256: Some("0".repeat(64)),
            mode: None,
        };
        Pin::decode(&good.encode()).unwrap();
        let refused = [
            Pin {
                name: Some("tiny:1.0\nfake log line".into()),
                ..good.clone()
            },
            Pin {
                name: Some("x".repeat(120_000)),
                ..good.clone()
            },
            Pin {
                path: PathBuf::from("relative.sif"),
                ..good.clone()
            },
            Pin {
                path: PathBuf::from("/a\nb.sif"),
                ..good.clone()
            },
            Pin {
                reference: "a b".into(),
                ..good.clone()
            },
            Pin {
                reference: String::new(),
                ..good.clone()
            },
            Pin {
                sha256: Some("Z".repeat(64)),
                ..good.clone()
            },
            Pin {
                sha256: Some("0".repeat(63)),
                ..good.clone()
            },
            Pin {
                tag: Some("-x".into()),
                ..good.clone()
            },
        ];
        for pin in refused {
            let text = pin.encode();
            let e = Pin::decode(&text).unwrap_err().to_string();
            assert!(e.contains("do not set ML_CONTAINER_PIN"), "{e}");
            // The reason never echoes a value from the pin.
            assert!(!e.contains("fake") && !e.contains("xxxx"), "{e}");
            assert!(e.len() < 300, "{e}");
        }
        assert!(Pin::decode("path = 3").is_err());
        assert!(Pin::decode(&" ".repeat(MAX_PIN_BYTES + 1)).is_err());
    }

    #[test]
    fn images_are_opened_once_safely() {
        let f = fixture("fifo", CATALOG);
        let root = &f.cfg.root.0;
        // A FIFO where the catalog's image should be: refused at once (a
        // blocking open would hang this test: nobody writes the FIFO).
        let sif = root.join("ml-frameworks/pytorch-2.2.sif");
        fs::remove_file(&sif).unwrap();
        nix::unistd::mkfifo(&sif, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let r = Registry::open(&f.cfg).unwrap();
        let e = r.resolve("pytorch:2.2").unwrap_err();
        assert!(matches!(e, RegistryError::NotFile { .. }), "{e}");
        // The opened file is the resolved one.
        let o = r.resolve_open("pytorch:2.1", None).unwrap();
        assert_eq!(o.meta.len(), 1);
        assert_eq!(o.pin.size, 1);
        assert!(o.pin.mode.is_some());
    }

    #[test]
    fn the_user_check_runs_before_root_opens() {
        let f = fixture("user", CATALOG);
        let r = Registry::open(&f.cfg).unwrap();
        let asked = std::cell::RefCell::new(Vec::new());
        let deny = |p: &Path| {
            asked.borrow_mut().push(p.to_path_buf());
            Err(io::Error::from(io::ErrorKind::PermissionDenied))
        };
        let check = UserCheck {
            user: "mluser".into(),
            may_read: &deny,
        };
        let e = r.resolve_open("pytorch:2.1", Some(&check)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("cannot read image ") && msg.contains("as user mluser"),
            "{msg}"
        );
        assert!(msg.ends_with("(chmod o+r)"), "{msg}");
        assert_eq!(asked.borrow().len(), 1);
        assert!(asked.borrow()[0].ends_with("ml-frameworks/pytorch-2.1.sif"));
    }

    #[test]
    fn registry_settings_apply() {
        let f = fixture("settings", CATALOG);
        let r = Registry::open(&f.cfg).unwrap();
        assert_eq!(r.verify_level(), VerifyLevel::Quick);
        assert!(r.resolve("scanned").is_ok());
        fs::write(
            f.cfg.root.0.join(".registry/config.toml"),
            "version = 1\nsearch_dirs = [\"base-images\"]\nverify = \"full\"\n",
        )
        .unwrap();
        let r = Registry::open(&f.cfg).unwrap();
        assert_eq!(r.verify_level(), VerifyLevel::Full);
        assert!(matches!(
            r.resolve("scanned"),
            Err(RegistryError::Unknown { .. })
        ));
        fs::write(f.cfg.root.0.join(".registry/config.toml"), "verify = 1\n").unwrap();
        let e = Registry::open(&f.cfg).unwrap_err().to_string();
        assert!(e.contains("config.toml:1"), "{e}");
    }

    /// Writes the index for the fixture's catalog as the CLI does.
    fn index(f: &Fixture) {
        let root = &f.cfg.root.0;
        let text = fs::read_to_string(root.join(catalog::CATALOG_PATH)).unwrap();
        let c = Catalog::parse(Path::new("/c"), &text).unwrap();
        catalog_index::write(root, &c, &text).unwrap();
    }

    /// With an index, every catalog reference resolves without the parse,
    /// to exactly what the parse gives; misses (scan, unknown, bad paths)
    /// still go the full way.
    #[test]
    fn the_index_answers_as_the_catalog_does() {
        let f = fixture("index", CATALOG);
        index(&f);
        for (reference, from_index) in [
            ("pytorch", true),
            ("pytorch:2.1", true),
            ("pytorch:2.2", true),
            ("nvcr.io/nvidia/pytorch:24.01-py3", true),
            ("scanned", false),
            ("pytorh", false),
            ("pytorch:9.9", false),
        ] {
            let fast = Registry::open(&f.cfg).unwrap();
            let slow = Registry::open(&f.cfg).unwrap().without_index();
            let a = fast.resolve(reference).map_err(|e| e.to_string());
            let b = slow.resolve(reference).map_err(|e| e.to_string());
            assert_eq!(a, b, "{reference}");
            assert_eq!(fast.index_hits(), u32::from(from_index), "{reference}");
            assert_eq!(slow.index_hits(), 0);
        }
        // Index hits take the same checks after the lookup.
        let r = Registry::open(&f.cfg).unwrap();
        assert!(matches!(
            r.resolve("sneaky:1"),
            Err(RegistryError::Outside { .. })
        ));
        assert!(matches!(
            r.resolve("gone:1"),
            Err(RegistryError::Missing { .. })
        ));
        assert_eq!(r.index_hits(), 2);
    }

    /// A catalog edited by hand after the index was written is read, not
    /// the index; so is one the index's own trust checks refuse.
    #[test]
    fn a_stale_or_untrusted_index_is_bypassed() {
        use std::os::unix::fs::PermissionsExt;
        let f = fixture("index-stale", CATALOG);
        index(&f);
        let cat = f.cfg.root.0.join(catalog::CATALOG_PATH);
        // Same length: only the identity tells.
        let edited = CATALOG.replace("pytorch-2.1.sif", "pytorch-2.2.sif");
        assert_eq!(edited.len(), CATALOG.len());
        fs::write(&cat, &edited).unwrap();
        let r = Registry::open(&f.cfg).unwrap();
        let p = r.resolve("pytorch:2.1").unwrap();
        assert!(p.path.ends_with("pytorch-2.2.sif"), "{}", p.path.display());
        assert_eq!(r.index_hits(), 0);
        index(&f);
        let r = Registry::open(&f.cfg).unwrap();
        r.resolve("pytorch:2.1").unwrap();
        assert_eq!(r.index_hits(), 1);
        let idx = f.cfg.root.0.join(catalog_index::INDEX_PATH);
        fs::set_permissions(&idx, fs::Permissions::from_mode(0o666)).unwrap();
        let r = Registry::open(&f.cfg).unwrap();
        r.resolve("pytorch:2.1").unwrap();
        assert_eq!(r.index_hits(), 0);
        // The catalog's own checks still apply: an untrusted catalog is
        // refused even with a matching index.
        fs::set_permissions(&idx, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(&cat, fs::Permissions::from_mode(0o666)).unwrap();
        let e = Registry::open(&f.cfg)
            .unwrap()
            .resolve("pytorch:2.1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("writable by group or others"), "{e}");
    }

    #[test]
    fn helpers() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
        assert_eq!(normalize(Path::new("/../..")), PathBuf::from("/"));
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
