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
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_at(&path))?;
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
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// The test's own scratch directory (0755, as a node's would be),
    /// removed when dropped.
    fn scratch() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    fn image(dir: &Path, name: &str, len: usize, seed: u8) -> (PathBuf, String) {
        let p = dir.join(name);
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
        fs::write(&p, &data).unwrap();
        fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let sum = hex(&Sha256::digest(&data));
        (p, sum)
    }

    fn never() -> bool {
        false
    }

    fn running_as_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn copies_once_then_hits_and_replaces_a_changed_copy() {
        if !running_as_root() {
            return;
        }
        let d = scratch();
        let (src, sum) = image(d.path(), "a.sif", 3 << 20, 7);
        let cache = Cache {
            dir: d.path().join("cache"),
            max: 100 << 20,
        };
        let f = File::open(&src).unwrap();
        let (lease, o) = cache
            .provide(Some(&sum), 3 << 20, ".sif", &f, &never)
            .unwrap();
        assert!(matches!(o, Outcome::Copied { bytes, .. } if bytes == 3 << 20));
        assert_eq!(fs::read(&lease.path).unwrap(), fs::read(&src).unwrap());
        let m = fs::metadata(&lease.path).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o644));
        let (_, o) = cache
            .provide(Some(&sum), 3 << 20, ".sif", &f, &never)
            .unwrap();
        assert_eq!(o, Outcome::Hit);
        // Damage the copy in place (same size): detected, copied again.
        let w = OpenOptions::new().write(true).open(&lease.path).unwrap();
        w.write_all_at(b"evil", 100).unwrap();
        drop(w);
        assert!(!cache.valid(&sum, ".sif", 3 << 20));
        drop(lease);
        let (lease, o) = cache
            .provide(Some(&sum), 3 << 20, ".sif", &f, &never)
            .unwrap();
        assert!(matches!(o, Outcome::Copied { .. }), "{o:?}");
        assert_eq!(fs::read(&lease.path).unwrap(), fs::read(&src).unwrap());
        // A wrong sum in the catalog: nothing cached, an error to log.
        let wrong = "0".repeat(64);
        let e = cache
            .provide(Some(&wrong), 3 << 20, ".sif", &f, &never)
            .unwrap_err();
        assert!(matches!(e, CacheError::Mismatch { .. }), "{e}");
        assert!(!cache.entry_path(&wrong, ".sif").exists());
        let leftovers: Vec<_> = fs::read_dir(cache.images())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "a partial copy was left");
        // No sum: not cached.
        assert!(matches!(
            cache.provide(None, 3 << 20, ".sif", &f, &never),
            Err(CacheError::NoChecksum)
        ));
        // Readable only by some: never copied to a world-readable cache.
        let (secret, ssum) = image(d.path(), "s.sif", 1 << 20, 11);
        fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
        assert!(matches!(
            cache.provide(
                Some(&ssum),
                1 << 20,
                ".sif",
                &File::open(&secret).unwrap(),
                &never
            ),
            Err(CacheError::NotPublic)
        ));
        assert!(!cache.entry_path(&ssum, ".sif").exists());
    }

    /// Many steps at once: exactly one copy, every one gets the image.
    #[test]
    fn concurrent_steps_copy_once() {
        if !running_as_root() {
            return;
        }
        let d = scratch();
        let (src, sum) = image(d.path(), "a.sif", 8 << 20, 3);
        let cache = Arc::new(Cache {
            dir: d.path().join("cache"),
            max: 100 << 20,
        });
        let copies = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, copies, src, sum) =
                    (cache.clone(), copies.clone(), src.clone(), sum.clone());
                std::thread::spawn(move || {
                    // Separate open file descriptions, as separate steps have.
                    let f = File::open(&src).unwrap();
                    let (lease, o) = cache
                        .provide(Some(&sum), 8 << 20, ".sif", &f, &never)
                        .unwrap();
                    if matches!(o, Outcome::Copied { .. }) {
                        copies.fetch_add(1, Ordering::SeqCst);
                    }
                    fs::metadata(&lease.path).unwrap().len()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 8 << 20);
        }
        assert_eq!(copies.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn eviction_keeps_the_cap_and_spares_images_in_use() {
        if !running_as_root() {
            return;
        }
        let d = scratch();
        let cache = Cache {
            dir: d.path().join("cache"),
            max: 5 << 20,
        };
        let imgs: Vec<_> = (0..3)
            .map(|i| image(d.path(), &format!("{i}.sif"), 2 << 20, i as u8 + 2))
            .collect();
        let open = |i: usize| File::open(&imgs[i].0).unwrap();
        let (in_use, _) = cache
            .provide(Some(&imgs[0].1), 2 << 20, ".sif", &open(0), &never)
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let (done, _) = cache
            .provide(Some(&imgs[1].1), 2 << 20, ".sif", &open(1), &never)
            .unwrap();
        drop(done);
        // 0 is older but in use: 1 goes.
        let (_third, _) = cache
            .provide(Some(&imgs[2].1), 2 << 20, ".sif", &open(2), &never)
            .unwrap();
        let left: Vec<String> = cache.list().into_iter().map(|l| l.sha256).collect();
        assert!(
            left.contains(&imgs[0].1) && left.contains(&imgs[2].1),
            "{left:?}"
        );
        assert!(!left.contains(&imgs[1].1));
        let total: u64 = cache.list().iter().map(|l| l.size).sum();
        assert!(total <= cache.max);
        assert!(in_use.path.exists());
        // Both remaining in use: no room for a fourth, nothing removed.
        let (p3, s3) = image(d.path(), "3.sif", 2 << 20, 9);
        let e = cache
            .provide(Some(&s3), 2 << 20, ".sif", &File::open(p3).unwrap(), &never)
            .unwrap_err();
        assert!(matches!(e, CacheError::NoRoom { .. }), "{e}");
        assert_eq!(cache.list().len(), 2);
        // Too large for the cap at all.
        assert!(matches!(
            cache.provide(Some(&s3), 6 << 20, ".sif", &open(0), &never),
            Err(CacheError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_cancelled_copy_leaves_nothing() {
        if !running_as_root() {
            return;
        }
        let d = scratch();
        let (src, sum) = image(d.path(), "a.sif", 20 << 20, 5);
        let cache = Cache {
            dir: d.path().join("cache"),
            max: 100 << 20,
        };
        let asked = AtomicUsize::new(0);
        let cancel_later = || asked.fetch_add(1, Ordering::SeqCst) >= 1;
        let e = cache
            .provide(
                Some(&sum),
                20 << 20,
                ".sif",
                &File::open(&src).unwrap(),
                &cancel_later,
            )
            .unwrap_err();
        assert!(matches!(e, CacheError::Cancelled), "{e}");
        assert_eq!(fs::read_dir(cache.images()).unwrap().count(), 0);
    }

    #[test]
    fn a_read_only_or_foreign_cache_dir_is_an_error_not_a_crash() {
        if !running_as_root() {
            return;
        }
        let d = scratch();
        let (src, sum) = image(d.path(), "a.sif", 1 << 20, 5);
        let dir = d.path().join("cache");
        fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        let cache = Cache { dir, max: 10 << 20 };
        let e = cache
            .provide(
                Some(&sum),
                1 << 20,
                ".sif",
                &File::open(&src).unwrap(),
                &never,
            )
            .unwrap_err();
        assert!(matches!(e, CacheError::Io { .. }), "{e}");
        // A symlink for the cache directory is refused too.
        let link = d.path().join("link");
        std::os::unix::fs::symlink(d.path().join("elsewhere"), &link).unwrap();
        fs::create_dir_all(d.path().join("elsewhere")).unwrap();
        let cache = Cache {
            dir: link,
            max: 10 << 20,
        };
        assert!(cache
            .provide(
                Some(&sum),
                1 << 20,
                ".sif",
                &File::open(&src).unwrap(),
                &never
            )
            .is_err());
    }
}
