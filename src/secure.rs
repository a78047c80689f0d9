//! File trust and root-safe file creation.
//!
//! The plugin runs as root in slurmstepd and reads files that decide what a
//! job executes (the site config, the catalog). Like sudo-rs's secure_open,
//! it refuses such a file unless it and its directory are owned by a trusted
//! user and not writable by group or others. Files root writes (hash cache,
//! reports) are created without following symlinks, with explicit modes.
#![forbid(unsafe_code)]

use std::fmt;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub enum TrustError {
    Io {
        path: PathBuf,
        source: io::Error,
    },
    NotRegular {
        path: PathBuf,
    },
    Owner {
        path: PathBuf,
        uid: u32,
        trusted: Vec<u32>,
    },
    Writable {
        path: PathBuf,
        mode: u32,
    },
}

impl fmt::Display for TrustError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrustError::Io { path, source } => {
                write!(f, "cannot check {}: {source}", path.display())
            }
            TrustError::NotRegular { path } => {
                write!(f, "{} is not a regular file", path.display())
            }
            TrustError::Owner { path, uid, trusted } => write!(
                f,
                "{} is owned by uid {uid}, not by a trusted owner (uid {}): chown it",
                path.display(),
                trusted
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
            TrustError::Writable { path, mode } => write!(
                f,
                "{} is writable by group or others (mode {:04o}): chmod go-w it",
                path.display(),
                mode & 0o7777
            ),
        }
    }
}

impl std::error::Error for TrustError {}

/// Pure part of the check, for the CLI's `doctor` and for tests.
pub fn check_owner_mode(
    path: &Path,
    uid: u32,
    mode: u32,
    trusted: &[u32],
) -> Result<(), TrustError> {
    if !trusted.contains(&uid) {
        return Err(TrustError::Owner {
            path: path.to_path_buf(),
            uid,
            trusted: trusted.to_vec(),
        });
    }
    if mode & 0o022 != 0 {
        return Err(TrustError::Writable {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Checks that `path` (after following symlinks) is a regular file that
/// only a trusted user can change, and that so is the directory holding it
/// (or someone could swap the file). Returns the file's metadata.
pub fn check_trusted_file(path: &Path, trusted: &[u32]) -> Result<Metadata, TrustError> {
    let io_err = |source| TrustError::Io {
        path: path.to_path_buf(),
        source,
    };
    let real = fs::canonicalize(path).map_err(io_err)?;
    let meta = fs::metadata(&real).map_err(io_err)?;
    if !meta.is_file() {
        return Err(TrustError::NotRegular { path: real });
    }
    check_owner_mode(&real, meta.uid(), meta.mode(), trusted)?;
    if let Some(dir) = real.parent() {
        let dmeta = fs::metadata(dir).map_err(|source| TrustError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        // A sticky, world-writable directory (/tmp) still lets others
        // create files, but not replace ours; that is not good enough for a
        // config either, so the same rule applies.
        check_owner_mode(dir, dmeta.uid(), dmeta.mode(), trusted)?;
    }
    Ok(meta)
}

/// Replaces `path` with `bytes` atomically, as root writes its files: a
/// temporary file next to it is created with O_EXCL|O_NOFOLLOW and exactly
/// `mode` (optionally owned by `owner` = (uid, gid)), written and fsynced,
/// then renamed over `path` (rename(2) replaces a symlink there without
/// following it), and the directory is fsynced. A reader sees the old file
/// or the new one, never half of one.
pub fn replace_file(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    // A leftover of a crashed writer with our pid; removing a symlink
    // removes the link itself.
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    let written = owner
        .map_or(Ok(()), |(uid, gid)| {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
        })
        .and_then(|()| f.set_permissions(fs::Permissions::from_mode(mode)))
        .and_then(|()| f.write_all(bytes))
        .and_then(|()| f.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir).and_then(|d| d.sync_all())
}

/// Makes `dir` (and missing parents) and insists the final directory is a
/// real directory, not a symlink, owned by `uid`, not writable by others.
pub fn ensure_private_dir(dir: &Path, mode: u32, uid: u32) -> io::Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(mode))?;
        }
        Err(e) => return Err(e),
    }
    let meta = fs::symlink_metadata(dir)?;
    if !meta.file_type().is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory (a symlink?)",
            dir.display()
        )));
    }
    check_owner_mode(dir, meta.uid(), meta.mode(), &[uid])
        .map_err(|e| io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_and_mode_rules() {
        let p = Path::new("/x");
        assert!(check_owner_mode(p, 0, 0o100644, &[0]).is_ok());
        assert!(check_owner_mode(p, 0, 0o100664, &[0]).is_err());
        assert!(check_owner_mode(p, 0, 0o100646, &[0]).is_err());
        assert!(check_owner_mode(p, 1000, 0o100644, &[0]).is_err());
        assert!(check_owner_mode(p, 1000, 0o100644, &[0, 1000]).is_ok());
        let msg = check_owner_mode(p, 0, 0o100666, &[0])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("0666") && msg.contains("chmod"), "{msg}");
    }

    #[test]
    fn replace_file_does_not_follow_a_planted_symlink() {
        let dir = std::env::temp_dir().join(format!("mlc-secure-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let target = dir.join("target");
        fs::write(&target, "keep").unwrap();
        let link = dir.join("file");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        replace_file(&link, b"new", 0o640, None).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
        let meta = fs::symlink_metadata(&link).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.mode() & 0o777, 0o640);
        assert_eq!(fs::read_to_string(&link).unwrap(), "new");
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            2,
            "a temporary file was left"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
