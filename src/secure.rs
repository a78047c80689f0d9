//! File trust, the one safe way root opens a file, and root-safe file
//! creation.
//!
//! The plugin runs as root in slurmstepd and reads files that decide what a
//! job executes (the site config, the catalog, registry settings, images,
//! its hash cache). Every such file is opened once, by [`open_regular`]:
//! `O_NONBLOCK` (a FIFO swapped in cannot block root), `O_NOFOLLOW` (a
//! symlink swapped in for the last component is refused), `O_CLOEXEC`; the
//! type, size, owner and mode are then read with `fstat` on that fd and every
//! later read uses the same fd, so no check-by-path then open-by-path race
//! exists. Like sudo-rs's secure_open, [`open_trusted`] refuses a file unless
//! it and its directory are owned by a trusted user and not writable by group
//! or others. Files root writes (hash cache, reports) are created without
//! following symlinks, with explicit modes.
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

/// Opens `path` for reading the one safe way (see the module doc):
/// `O_RDONLY|O_NONBLOCK|O_NOFOLLOW|O_CLOEXEC`, then `fstat` on the fd must
/// say regular file. Opening a FIFO with `O_NONBLOCK` returns at once, and
/// the type check then refuses it, so root never waits on a user's FIFO;
/// `O_NONBLOCK` is cleared again before returning (it means nothing for a
/// regular file, but a reader should not have to think about it).
pub fn open_regular(path: &Path) -> Result<(File, Metadata), TrustError> {
    let io_err = |source| TrustError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(TrustError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    clear_nonblock(&file).map_err(io_err)?;
    Ok((file, meta))
}

fn clear_nonblock(file: &File) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

/// [`open_regular`] on the canonical path of `path`, then the trust rules
/// on the fd's own `fstat` (owner in `trusted`, not writable by group or
/// others) and on the directory holding it (or someone could swap the
/// file). Symlinks in the configured path are resolved first, as an admin
/// may keep `/etc/slurm` on shared storage; the file itself is opened with
/// `O_NOFOLLOW`, so a symlink swapped in after that is refused.
pub fn open_trusted(path: &Path, trusted: &[u32]) -> Result<(File, Metadata), TrustError> {
    let real = fs::canonicalize(path).map_err(|source| TrustError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    open_trusted_here(&real, trusted)
}

/// [`open_trusted`] without resolving symlinks first: the file must be
/// right at `path` (a symlink there is refused), as root's own files are
/// (the hash cache's entries, written by [`replace_file`]).
pub fn open_trusted_here(path: &Path, trusted: &[u32]) -> Result<(File, Metadata), TrustError> {
    let real = path;
    let (file, meta) = open_regular(real)?;
    check_owner_mode(real, meta.uid(), meta.mode(), trusted)?;
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
    Ok((file, meta))
}

/// The whole text of a trusted file of at most `max` bytes, read from the
/// fd [`open_trusted`] checked. `Ok(None)` when the file is larger.
pub fn read_trusted(path: &Path, trusted: &[u32], max: u64) -> Result<ReadText, TrustError> {
    let (file, meta) = open_trusted(path, trusted)?;
    read_limited(file, &meta, path, max)
}

/// [`read_trusted`] of a file that must be right at `path`, not behind a
/// symlink ([`open_trusted_here`]).
pub fn read_trusted_here(path: &Path, trusted: &[u32], max: u64) -> Result<ReadText, TrustError> {
    let (file, meta) = open_trusted_here(path, trusted)?;
    read_limited(file, &meta, path, max)
}

/// What a limited read found.
#[derive(Debug)]
pub enum ReadText {
    Text(String),
    TooLarge(u64),
}

/// Reads an already opened file, at most `max` bytes (`meta` is its fstat).
pub fn read_limited(
    file: File,
    meta: &Metadata,
    path: &Path,
    max: u64,
) -> Result<ReadText, TrustError> {
    use std::io::Read;
    if meta.len() > max {
        return Ok(ReadText::TooLarge(meta.len()));
    }
    let mut text = String::new();
    file.take(max)
        .read_to_string(&mut text)
        .map_err(|source| TrustError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(ReadText::Text(text))
}

/// Checks that `path` (after following symlinks) is a regular file that
/// only a trusted user can change, and that so is the directory holding it.
/// Returns the file's metadata (from the fd [`open_trusted`] opened).
pub fn check_trusted_file(path: &Path, trusted: &[u32]) -> Result<Metadata, TrustError> {
    open_trusted(path, trusted).map(|(_, meta)| meta)
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

/// A file's identity as root's caches key it (the sha256 cache, the node
/// image cache): device, inode, size, mtime and ctime to the nanosecond.
/// Any change to the file (rewrite, replace, touch, chmod) changes it.
pub fn file_identity(m: &Metadata) -> String {
    format!(
        "{}-{}-{}-{}.{:09}-{}.{:09}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    )
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens `path` as a lock file: created 0600 when absent, never through a
/// symlink, never blocking on a FIFO someone put there. Owner and mode
/// checks are the caller's (who may hold it differs: root, the user).
pub fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// Takes `file`'s exclusive lock (flock(2), released when the file is
/// closed) within `timeout`, trying every `nap`: `Ok(true)` when taken,
/// `Ok(false)` when another holder kept it that long. Every lock the crate
/// waits for goes through here, so every such wait is bounded.
pub fn lock_within(
    file: &File,
    timeout: std::time::Duration,
    nap: std::time::Duration,
) -> io::Result<bool> {
    let started = std::time::Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(true),
            Err(fs::TryLockError::WouldBlock) if started.elapsed() < timeout => {
                std::thread::sleep(nap)
            }
            Err(fs::TryLockError::WouldBlock) => return Ok(false),
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_held_lock_is_waited_for_within_the_timeout_only() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("x.lock");
        let holder = open_lock_file(&p).unwrap();
        assert!(lock_within(&holder, Duration::ZERO, Duration::ZERO).unwrap());
        let other = open_lock_file(&p).unwrap();
        let began = std::time::Instant::now();
        let taken = lock_within(
            &other,
            Duration::from_millis(200),
            Duration::from_millis(10),
        )
        .unwrap();
        assert!(!taken);
        assert!(began.elapsed() >= Duration::from_millis(200));
        assert!(began.elapsed() < Duration::from_secs(5));
        drop(holder);
        assert!(lock_within(&other, Duration::from_secs(1), Duration::from_millis(10)).unwrap());
        // A FIFO planted at the name neither blocks nor is taken as a lock.
        std::fs::remove_file(&p).unwrap();
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let f = open_lock_file(&p).unwrap();
        assert!(!f.metadata().unwrap().is_file());
        // A symlink is not followed.
        let q = t.path().join("y.lock");
        std::os::unix::fs::symlink(t.path().join("target"), &q).unwrap();
        assert!(open_lock_file(&q).is_err());
        assert!(!t.path().join("target").exists());
    }

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
    fn open_regular_refuses_fifos_symlinks_and_directories_without_blocking() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        fs::write(&file, "data").unwrap();
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();

        let (f, meta) = open_regular(&file).unwrap();
        assert_eq!(meta.len(), 4);
        // O_NONBLOCK is cleared on the returned fd.
        let flags = nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            nix::fcntl::FcntlArg::F_GETFL,
        )
        .unwrap();
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        // Nobody holds the FIFO's other end: a blocking open would hang
        // this test forever.
        assert!(matches!(
            open_regular(&fifo),
            Err(TrustError::NotRegular { .. })
        ));
        match open_regular(&link) {
            Err(TrustError::Io { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ELOOP))
            }
            other => panic!("a symlink was opened: {other:?}"),
        }
        assert!(matches!(
            open_regular(&dir),
            Err(TrustError::NotRegular { .. })
        ));
        // A trusted read goes through the same open: a FIFO is refused.
        let me = nix::unistd::geteuid().as_raw();
        assert!(matches!(
            read_trusted(&fifo, &[me], 100),
            Err(TrustError::NotRegular { .. })
        ));
        assert!(matches!(
            read_trusted(&file, &[me], 100),
            Ok(ReadText::Text(t)) if t == "data"
        ));
        assert!(matches!(
            read_trusted(&file, &[me], 3),
            Ok(ReadText::TooLarge(4))
        ));
    }

    #[test]
    fn replace_file_does_not_follow_a_planted_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
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
    }
}
