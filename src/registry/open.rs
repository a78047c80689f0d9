//! Opening a resolved image the one safe way, and reading the registry's
//! own metadata files after their trust check.
#![forbid(unsafe_code)]

use std::fmt;
use std::fs::{self, File, Metadata};
use std::io;
use std::path::{Path, PathBuf};

use crate::catalog::{self, Catalog};
use crate::config::RegistryConfig;
use crate::secure::{self, ReadText, TrustError};

use super::{normalize, Pin, Registry, RegistryError, Source};

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

impl Registry<'_> {
    /// Directories an image of this source may live in, as configured:
    /// the root (catalog and scan results), the allowed directories
    /// (catalog entries and absolute paths; the root when none is set).
    pub(super) fn allowed_dirs(&self, source: Source) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = match source {
            Source::Scan => Vec::new(),
            _ => self.cfg.allowed_dirs.iter().map(|d| d.0.clone()).collect(),
        };
        if source != Source::Path || self.cfg.allowed_dirs.is_empty() {
            dirs.push(self.cfg.root.0.clone());
        }
        dirs
    }

    pub(super) fn pin_file(
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
}

pub(super) fn trusted_uids(cfg: &RegistryConfig) -> Result<Vec<u32>, RegistryError> {
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
pub(super) fn read_trusted(path: &Path, trusted: &[u32]) -> Result<Option<String>, RegistryError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::tests::{fixture, CATALOG};

    #[test]
    fn escapes_are_refused() {
        let f = fixture(CATALOG);
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
    fn untrusted_catalog_refused() {
        use std::os::unix::fs::PermissionsExt;
        let f = fixture(CATALOG);
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

    #[test]
    fn images_are_opened_once_safely() {
        let f = fixture(CATALOG);
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
        let f = fixture(CATALOG);
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
}
