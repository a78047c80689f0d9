//! What resolving an image can fail with: each error carries the value at
//! fault and its message ends with the fix.
#![forbid(unsafe_code)]

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::catalog::{self, CatalogError};
use crate::secure::TrustError;

use super::escaped;
use super::pin::HANDOFF_ENV;

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
    /// The handoff (or the pin in it) from the job environment is refused;
    /// `reason` names what is wrong, never a value from it.
    BadPin {
        reason: String,
    },
    /// In srun: the resolved image's path is not UTF-8, so it cannot be
    /// handed to the nodes (which refuse such a pin).
    Unsendable {
        reference: String,
        path: PathBuf,
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
            RegistryError::Unsendable { reference, path } => write!(
                f,
                "image '{}': its path {} is not UTF-8, so srun cannot hand it to the nodes; \
                 ask the admins to rename it",
                escaped(reference),
                escaped(&path.to_string_lossy())
            ),
            RegistryError::BadPin { reason } => write!(
                f,
                "the image choice srun passed in {HANDOFF_ENV} is invalid ({reason}); do not set \
                 {HANDOFF_ENV} yourself"
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
