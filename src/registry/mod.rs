//! Image resolution: what `--ml-container=IMAGE` means; README "Images: the registry".
//!
//! In order: an absolute path (only inside the allowed directories, checked
//! after canonicalisation so `..` and symlinks cannot escape); `name:tag`
//! in the catalog; an alias (including registry references such as
//! `nvcr.io/nvidia/pytorch:24.01-py3`); a bare `name` (its default tag, else
//! the newest `added`); `<name>.sif` in the search directories. Anything
//! else is an error that lists the closest names.
//!
//! srun resolves once and sends the result to the nodes as a [`Pin`] (path,
//! size, sha256) inside the handoff ([`crate::handoff`]) in the job
//! environment. The job environment is the
//! user's, so a node never believes a pin: it resolves the image again from
//! the catalog it reads itself, and the pin may only confirm that srun and
//! the node agree ([`Pin::confirms`]); when they do not (the catalog was
//! rewritten during the launch) the step fails rather than nodes running
//! different images. What is verified (expected size, sha256) comes only
//! from the node's own catalog.
//!
//! Images are opened once, by [`crate::secure::open_regular`], and everything
//! after (size, structure, hash) is read from that fd. On a node, root first
//! asks whether the job's user may read the file, as that user, so root
//! never reads (or reveals in an error) a file the user could not.
//!
//! Here: [`Registry`] and the resolution order. Beside it: `pin.rs` (the
//! pin and its checks), `open.rs` (the safe open, the trust-checked
//! metadata reads), `index.rs` (lookups through the catalog index),
//! `error.rs` and `text.rs` (escaping, path normalisation, edit distance).
#![forbid(unsafe_code)]

mod error;
mod index;
mod open;
mod pin;
mod text;

use std::cell::{Cell, OnceCell};
use std::fs;
use std::path::{Path, PathBuf};

use crate::catalog::{self, Catalog, RegistrySettings};
use crate::config::{RegistryConfig, VerifyLevel};

pub use error::RegistryError;
pub use open::{load_catalog, Opened, UserCheck};
pub use pin::{Pin, Source, HANDOFF_ENV};
pub use text::{edit_distance, escaped, normalize};

use open::{read_trusted, trusted_uids};

/// Image files: SIF for Apptainer/Singularity, plain squashfs for
/// Charliecloud's ch-run.
pub const IMAGE_SUFFIXES: &[&str] = &[".sif", ".sqfs"];
/// How many close names an "unknown image" error lists.
pub const SUGGESTIONS: usize = 5;
/// The largest pin text (inside the handoff) a node parses: a pin is a few
/// hundred bytes; the job environment is the user's and may hold anything.
pub const MAX_PIN_BYTES: usize = 16 << 10;
/// Caps on the pin's fields, checked before any use.
pub const MAX_PIN_PATH: usize = 4096;
pub const MAX_PIN_REFERENCE: usize = 1024;

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

/// The fixture every test of the registry resolves in: a registry root
/// with a catalog, scanned images and a symlink that escapes it.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AbsPath;

    /// The registry under a directory of the test's own, removed on drop.
    pub(super) struct Fixture {
        pub(super) dir: PathBuf,
        pub(super) cfg: RegistryConfig,
        _tmp: tempfile::TempDir,
    }

    pub(super) fn fixture(catalog: &str) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
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
        Fixture {
            dir,
            cfg,
            _tmp: tmp,
        }
    }

    pub(super) const CATALOG: &str = r#"version = 1
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
        let f = fixture(CATALOG);
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
    fn unknown_lists_closest() {
        let f = fixture(CATALOG);
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
    fn registry_settings_apply() {
        let f = fixture(CATALOG);
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
}
