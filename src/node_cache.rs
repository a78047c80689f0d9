//! The node-local image cache (`registry.node_cache`,
//! `registry.node_cache_max`): the first step on a node that needs an image
//! copies it from the registry to local disk, and the node's steps then run
//! it from there.
//!
//! Layout of the cache directory (root-owned, 0755, never a symlink):
//!
//! ```text
//! images/<sha256>.sif    the copy (root, 0644), named by the catalog's sum
//! images/<sha256>.ok     "<dev>-<ino>-<size>-<mtime>-<ctime> <sha256>" of
//!                        the copy when it was hashed (root, 0644)
//! locks/<sha256>.lock    the entry's lock (root, 0600); its mtime is the
//!                        entry's last use (least recently used goes first)
//! ```
//!
//! **One copy per node and image.** A step takes the entry's lock shared
//! and, when the entry is there and valid, keeps it (a hit). Otherwise it
//! waits for the lock exclusive (bounded: `FILL_WAIT`, and it stops when
//! the step is cancelled), looks again (another step may have filled it
//! meanwhile: waiters reuse the result), and copies only if it is still
//! missing: to a temporary file, hashing while copying, compared with the
//! catalog's sha256, fsynced, renamed into place. A partial or wrong copy is
//! never under the entry's name.
//!
//! **Never evict an image in use.** Every step keeps its entry's lock
//! shared for as long as its slurmstepd lives ([`hold`]: the descriptor
//! stays open in the process, so the kernel drops the lock when the step
//! ends, whatever way it ends). Eviction takes a victim's lock exclusive
//! *without waiting*: a lock held shared by any step means "in use", and
//! the victim is skipped. The cap is kept before each copy, oldest last use
//! first; when in-use entries leave no room the image is not cached.
//!
//! **Verified on every use.** A hit opens the copy the one safe way
//! ([`secure::open_regular`]), checks it is root's, 0644, of the catalog's
//! size, and that its identity (`fstat`) is the one recorded when it was
//! hashed: any write to the copy changes its ctime, so a changed copy is
//! replaced, never run.
//!
//! **Failures fall back.** Any error (read-only or full disk, wrong owner,
//! a lock not granted in time) returns an error the caller logs in one line
//! before running the image from the registry: the cache never fails a job.
#![forbid(unsafe_code)]

use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use crate::secure;

/// How long a step waits for another step's copy of the same image.
pub const FILL_WAIT: Duration = Duration::from_secs(1800);
/// Copy chunk; `cancelled` is asked this often.
const CHUNK: usize = 8 << 20;

#[derive(Debug)]
pub enum CacheError {
    Io {
        path: PathBuf,
        source: io::Error,
    },
    NoChecksum,
    /// The registry's file is not readable by everyone.
    NotPublic,
    TooLarge {
        size: u64,
        max: u64,
    },
    NoRoom {
        size: u64,
        max: u64,
    },
    Mismatch {
        expected: String,
        actual: String,
    },
    Busy {
        waited: Duration,
    },
    Cancelled,
    Untrusted {
        path: PathBuf,
        reason: String,
    },
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            CacheError::NoChecksum => write!(
                f,
                "the catalog has no sha256 for it (ml-container add records one)"
            ),
            CacheError::NotPublic => write!(
                f,
                "the registry's file is not readable by everyone, and a cached copy would be \
                 (chmod o+r it to cache it)"
            ),
            CacheError::TooLarge { size, max } => write!(
                f,
                "the image ({size} bytes) is larger than registry.node_cache_max ({max} bytes)"
            ),
            CacheError::NoRoom { size, max } => write!(
                f,
                "no room for {size} bytes under registry.node_cache_max ({max} bytes): the \
                 cached images are in use"
            ),
            CacheError::Mismatch { expected, actual } => write!(
                f,
                "the copy's sha256 is {actual}, the catalog says {expected}: the registry's file \
                 changed or is damaged ('ml-container verify' checks it)"
            ),
            CacheError::Busy { waited } => write!(
                f,
                "another step's copy did not finish within {} s",
                waited.as_secs()
            ),
            CacheError::Cancelled => write!(f, "the step was cancelled during the copy"),
            CacheError::Untrusted { path, reason } => {
                write!(f, "{}: {reason}: remove it", path.display())
            }
        }
    }
}

impl std::error::Error for CacheError {}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The cached copy was there and valid.
    Hit,
    /// This step copied the image (bytes read from the registry).
    Copied { bytes: u64, millis: u64 },
}

/// A cached image a step uses: while the lease lives, nobody evicts it.
#[derive(Debug)]
pub struct Lease {
    lock: File,
    pub path: PathBuf,
}

/// Leases held until this process (the step's slurmstepd) exits.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// Keeps the lease for the rest of this process's life.
pub fn hold(lease: Lease) -> PathBuf {
    if let Ok(mut held) = HELD.lock() {
        held.push(lease.lock);
    }
    lease.path
}

/// The node cache at `dir`, holding at most `max` bytes of images.
#[derive(Debug, Clone)]
pub struct Cache {
    pub dir: PathBuf,
    pub max: u64,
}

/// One cached image, for `cache list`.
#[derive(Debug, Clone)]
pub struct Listed {
    pub sha256: String,
    pub path: PathBuf,
    pub size: u64,
    pub last_used: Option<SystemTime>,
    pub in_use: bool,
    pub valid: bool,
}

use secure::{file_identity as identity, hex};

impl Cache {
    fn images(&self) -> PathBuf {
        self.dir.join("images")
    }
    fn locks(&self) -> PathBuf {
        self.dir.join("locks")
    }
    pub fn entry_path(&self, sha: &str, suffix: &str) -> PathBuf {
        self.images().join(format!("{sha}{suffix}"))
    }
    fn ok_path(&self, sha: &str) -> PathBuf {
        self.images().join(format!("{sha}.ok"))
    }

    /// The directories, root's, 0755, not symlinks.
    fn prepare(&self) -> Result<(), CacheError> {
        for d in [&self.dir, &self.images(), &self.locks()] {
            secure::ensure_private_dir(d, 0o755, 0).map_err(io_at(d))?;
        }
        Ok(())
    }

    fn open_lock(&self, sha: &str) -> Result<File, CacheError> {
        let path = self.locks().join(format!("{sha}.lock"));
        let f = secure::open_lock_file(&path).map_err(io_at(&path))?;
        let m = f.metadata().map_err(io_at(&path))?;
        if !m.is_file() || m.uid() != 0 || m.mode() & 0o077 != 0 {
            return Err(CacheError::Untrusted {
                path,
                reason: "not a regular file of root's, mode 0600".into(),
            });
        }
        Ok(f)
    }

    /// Is the entry there, root's, 0644, `size` bytes and unchanged since
    /// it was hashed to `sha`?
    pub fn valid(&self, sha: &str, suffix: &str, size: u64) -> bool {
        let path = self.entry_path(sha, suffix);
        let Ok((_, m)) = secure::open_regular(&path) else {
            return false;
        };
        if m.uid() != 0 || m.mode() & 0o7777 != 0o644 || m.len() != size {
            return false;
        }
        match secure::read_trusted_here(&self.ok_path(sha), &[0], 512) {
            Ok(secure::ReadText::Text(t)) => t.trim() == format!("{} {sha}", identity(&m)),
            _ => false,
        }
    }

    /// The image with catalog sum `sha` and `size`, copied from `src` (the
    /// registry's file, opened the one safe way) when not cached yet.
    /// `suffix` keeps the file type (`.sif`, `.sqfs`).
    pub fn provide(
        &self,
        sha: Option<&str>,
        size: u64,
        suffix: &str,
        src: &File,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(Lease, Outcome), CacheError> {
        let sha = sha.ok_or(CacheError::NoChecksum)?;
        if !crate::catalog::is_sha256_hex(sha) || !matches!(suffix, ".sif" | ".sqfs") {
            return Err(CacheError::NoChecksum);
        }
        // A copy is world-readable: an image only some may read (a
        // licensed one, mode 0640) stays in the registry, behind its mode.
        let public = src
            .metadata()
            .map(|m| m.mode() & 0o004 != 0)
            .unwrap_or(false);
        if !public {
            return Err(CacheError::NotPublic);
        }
        if size > self.max {
            return Err(CacheError::TooLarge {
                size,
                max: self.max,
            });
        }
        self.prepare()?;
        let lock = self.open_lock(sha)?;
        let path = self.entry_path(sha, suffix);
        let started = Instant::now();
        // A hit: shared, and there.
        wait_lock(&lock, false, started, cancelled)?;
        if self.valid(sha, suffix, size) {
            touch(&lock);
            return Ok((Lease { lock, path }, Outcome::Hit));
        }
        // Missing or bad: exclusive, look again, copy if still needed.
        lock.unlock().map_err(io_at(&path))?;
        wait_lock(&lock, true, started, cancelled)?;
        let outcome = if self.valid(sha, suffix, size) {
            Outcome::Hit
        } else {
            let t = Instant::now();
            let _ = fs::remove_file(&path);
            let _ = fs::remove_file(self.ok_path(sha));
            self.make_room(size, sha)?;
            let bytes = self.copy(sha, suffix, size, src, cancelled)?;
            Outcome::Copied {
                bytes,
                millis: t.elapsed().as_millis() as u64,
            }
        };
        // Down to shared: the lease. (Not atomic in Linux; an evictor that
        // slips in between finds the entry and may take it: look again.)
        wait_lock(&lock, false, Instant::now(), cancelled)?;
        if !self.valid(sha, suffix, size) {
            return Err(CacheError::Io {
                path,
                source: io::Error::other("evicted while being taken into use"),
            });
        }
        touch(&lock);
        Ok((Lease { lock, path }, outcome))
    }

    fn copy(
        &self,
        sha: &str,
        suffix: &str,
        size: u64,
        src: &File,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<u64, CacheError> {
        let path = self.entry_path(sha, suffix);
        let tmp = self
            .images()
            .join(format!(".{sha}.{}.tmp", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io_at(&tmp))?;
        let copied = (|| {
            out.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .map_err(io_at(&tmp))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; CHUNK];
            let mut done: u64 = 0;
            while done < size {
                if cancelled() {
                    return Err(CacheError::Cancelled);
                }
                let want = CHUNK.min((size - done) as usize);
                let n = match src.read_at(&mut buf[..want], done) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(CacheError::Io {
                            path: PathBuf::from("the registry's image"),
                            source: e,
                        })
                    }
                };
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io_at(&tmp))?;
                done += n as u64;
            }
            let actual = hex(&hasher.finalize());
            if done != size || actual != sha {
                return Err(CacheError::Mismatch {
                    expected: sha.to_string(),
                    actual: if done != size {
                        format!("(short: {done} of {size} bytes)")
                    } else {
                        actual
                    },
                });
            }
            out.sync_all().map_err(io_at(&tmp))?;
            fs::rename(&tmp, &path).map_err(io_at(&path))?;
            // The identity after the rename (which sets the ctime).
            let (_, m) = secure::open_regular(&path).map_err(|e| CacheError::Io {
                path: path.clone(),
                source: io::Error::other(e.to_string()),
            })?;
            let ok = self.ok_path(sha);
            secure::replace_file(
                &ok,
                format!("{} {sha}\n", identity(&m)).as_bytes(),
                0o644,
                None,
            )
            .map_err(io_at(&ok))?;
            if let Ok(d) = File::open(self.images()) {
                let _ = d.sync_all();
            }
            Ok(done)
        })();
        if copied.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        copied
    }

    /// Evicts least recently used entries not in use until `size` more
    /// bytes fit under the cap.
    fn make_room(&self, size: u64, keep: &str) -> Result<(), CacheError> {
        let mut entries = self.list();
        let mut total: u64 = entries.iter().map(|e| e.size).sum();
        if total + size <= self.max {
            return Ok(());
        }
        entries.sort_by_key(|e| e.last_used);
        for e in entries {
            if total + size <= self.max {
                break;
            }
            if e.sha256 == keep {
                continue;
            }
            if self.evict(&e.sha256).unwrap_or(false) {
                log::info!(
                    "node cache {}: evicted {} ({} bytes, least recently used)",
                    self.dir.display(),
                    e.path.display(),
                    e.size
                );
                total -= e.size;
            }
        }
        if total + size <= self.max {
            Ok(())
        } else {
            Err(CacheError::NoRoom {
                size,
                max: self.max,
            })
        }
    }

    /// Removes the entry `sha` unless a step uses it (its lock is taken
    /// exclusive without waiting); `Ok(true)` when removed.
    pub fn evict(&self, sha: &str) -> Result<bool, CacheError> {
        let lock = self.open_lock(sha)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(false),
            Err(TryLockError::Error(e)) => return Err(io_at(&self.locks())(e)),
        }
        for suffix in [".sif", ".sqfs", ".ok"] {
            let _ = fs::remove_file(self.entry_path(sha, suffix));
        }
        Ok(true)
    }

    /// The cached images (partial copies are not listed).
    pub fn list(&self) -> Vec<Listed> {
        let Ok(rd) = fs::read_dir(self.images()) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in rd.flatten().take(100_000) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((sha, suffix)) = [".sif", ".sqfs"]
                .iter()
                .find_map(|s| name.strip_suffix(s).map(|h| (h.to_string(), *s)))
            else {
                continue;
            };
            if !crate::catalog::is_sha256_hex(&sha) {
                continue;
            }
            let Ok(m) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            let lock_path = self.locks().join(format!("{sha}.lock"));
            let last_used = fs::symlink_metadata(&lock_path)
                .and_then(|m| m.modified())
                .ok();
            let in_use = match self.open_lock(&sha) {
                Ok(l) => match l.try_lock() {
                    Ok(()) => false,
                    Err(TryLockError::WouldBlock) => true,
                    Err(TryLockError::Error(_)) => false,
                },
                Err(_) => false,
            };
            out.push(Listed {
                valid: self.valid(&sha, suffix, m.len()),
                sha256: sha,
                path: e.path(),
                size: m.len(),
                last_used,
                in_use,
            });
        }
        out
    }
}

/// Marks the entry used now (its lock file's mtime).
fn touch(lock: &File) {
    let _ = lock.set_modified(SystemTime::now());
}

/// Takes `lock` (exclusive or shared) by `started + FILL_WAIT`, asking
/// `cancelled` while waiting.
fn wait_lock(
    lock: &File,
    exclusive: bool,
    started: Instant,
    cancelled: &dyn Fn() -> bool,
) -> Result<(), CacheError> {
    loop {
        let r = if exclusive {
            lock.try_lock()
        } else {
            lock.try_lock_shared()
        };
        match r {
            Ok(()) => return Ok(()),
            Err(TryLockError::WouldBlock) => {
                if cancelled() {
                    return Err(CacheError::Cancelled);
                }
                if started.elapsed() >= FILL_WAIT {
                    return Err(CacheError::Busy {
                        waited: started.elapsed(),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(TryLockError::Error(e)) => {
                return Err(CacheError::Io {
                    path: PathBuf::from("the cache lock"),
                    source: e,
                })
            }
        }
    }
}

/// The image file's suffix as the cache keeps it.
pub fn suffix_of(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("sqfs") => ".sqfs",
        _ => ".sif",
    }
}

#[cfg(test)]
mod tests;
