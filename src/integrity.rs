//! Image integrity without Apptainer (config `registry.verify`).
//!
//! `quick` (default): the file's size matches what the catalog says and
//! its SIF structure is sound — a few KiB read, whatever the image size.
//! `full`: also its sha256 against the catalog's. Everything is read from
//! the one fd the registry opened ([`crate::secure::open_regular`]).
//!
//! Hashing is bounded and cancellable: never more bytes than the catalog's
//! size (a larger file fails the size check first), and the caller's
//! `cancelled` predicate is asked between chunks, so a cancelled step stops
//! hashing within a chunk. A node hashes a file once: the sum it found is
//! cached in a root-owned directory under a key of device, inode, size,
//! mtime and ctime, whether it matched or not, so neither a good nor a
//! wrong file is hashed again at every step (verify once per node, not per
//! task: docs/DESIGN.md, Decisions); a changed or replaced file misses the
//! cache.
#![forbid(unsafe_code)]

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::config::VerifyLevel;
use crate::registry::Pin;
use crate::secure;
use crate::sif::{self, SifError};
use crate::squashfs::{self, SuperblockError};

#[derive(Debug)]
pub enum IntegrityError {
    Open {
        path: PathBuf,
        source: io::Error,
    },
    /// A plain squashfs image whose superblock is unsound: wrong version,
    /// or more bytes claimed than the file has.
    Squashfs {
        path: PathBuf,
        source: SuperblockError,
    },
    Size {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    Structure {
        path: PathBuf,
        source: SifError,
    },
    NoChecksum {
        path: PathBuf,
        image: String,
    },
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// The step was cancelled while the image was being hashed.
    Cancelled {
        path: PathBuf,
    },
}

impl fmt::Display for IntegrityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntegrityError::Open { path, source } => {
                write!(f, "cannot read image {}: {source}", shown(path))
            }
            IntegrityError::Size {
                path,
                expected,
                actual,
            } => write!(
                f,
                "image {} is {actual} bytes, the catalog says {expected}: truncated or replaced; \
                 re-copy it or update the catalog with 'ml-container add'",
                shown(path)
            ),
            IntegrityError::Structure { path, source } => {
                write!(f, "image {} is not a sound SIF file: {source}", shown(path))
            }
            IntegrityError::Squashfs { path, source } => match source {
                SuperblockError::Size { bytes_used, len } => write!(
                    f,
                    "squashfs image {} claims {bytes_used} bytes but the file has {len}: \
                     truncated; re-copy it",
                    shown(path)
                ),
                other => write!(f, "squashfs image {}: {other}", shown(path)),
            },
            IntegrityError::NoChecksum { path, image } => write!(
                f,
                "verify = \"full\" but the catalog has no sha256 for {image} ({}): add one with \
                 'ml-container add'",
                shown(path)
            ),
            IntegrityError::Checksum {
                path,
                expected,
                actual,
            } => write!(
                f,
                "image {} has sha256 {actual}, the catalog says {expected}: the file is \
                 corrupted or was replaced; re-copy it",
                shown(path)
            ),
            IntegrityError::Cancelled { path } => write!(
                f,
                "the step was cancelled while image {} was being verified; submit it again if \
                 that was not meant",
                shown(path)
            ),
        }
    }
}

impl std::error::Error for IntegrityError {}

/// A path for a message that reaches logs: a user may name files in an
/// allowed directory, so it is escaped and capped like any job string.
fn shown(path: &Path) -> String {
    crate::registry::escaped(&path.to_string_lossy())
}

/// What a verification did, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    Quick,
    /// Hashed now, taking this many milliseconds.
    Hashed {
        millis: u128,
    },
    /// The cache already held this file's verified sum.
    Cached,
}

/// Size and structure of the file at `path` (the CLI; opened the one safe
/// way).
pub fn quick(path: &Path, expected_size: Option<u64>) -> Result<(), IntegrityError> {
    let (mut file, meta) = secure::open_regular(path).map_err(|e| IntegrityError::Open {
        path: path.to_path_buf(),
        source: match e {
            secure::TrustError::Io { source, .. } => source,
            other => io::Error::other(other.to_string()),
        },
    })?;
    quick_file(&mut file, &meta, path, expected_size)
}

/// Size and structure of an open image (one open serves the size, the
/// format sniff and the structure; `verify` hashes the same file): its
/// metadata, for the hash cache's key.
pub fn quick_file(
    file: &mut File,
    meta: &fs::Metadata,
    path: &Path,
    expected_size: Option<u64>,
) -> Result<(), IntegrityError> {
    let io_err = |source| IntegrityError::Open {
        path: path.to_path_buf(),
        source,
    };
    if let Some(expected) = expected_size {
        if meta.len() != expected {
            return Err(IntegrityError::Size {
                path: path.to_path_buf(),
                expected,
                actual: meta.len(),
            });
        }
    }
    // A plain squashfs image (Charliecloud's `.sqfs`) rather than a SIF:
    // its superblock must be version 4 and its `bytes_used` fit the file
    // (squashfs::check, the same check as a SIF's partition).
    let mut sb = [0u8; squashfs::SUPERBLOCK_LEN as usize];
    let head = file.read(&mut sb[..4]).map_err(io_err)?;
    if head == 4 && squashfs::has_magic(&sb) {
        file.read_exact(&mut sb[4..]).map_err(io_err)?;
        squashfs::check(&sb, meta.len()).map_err(|source| IntegrityError::Squashfs {
            path: path.to_path_buf(),
            source,
        })?;
        return Ok(());
    }
    sif::inspect(file, meta.len()).map_err(|source| IntegrityError::Structure {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// Verifies a resolved, opened image at `level`: `file` and `meta` are
/// the fd the registry opened and its `fstat`, `pin` what the catalog read
/// here says. `cache_dir` is used (and created) only when this process may
/// write it (root on a node). `cancelled` is asked between chunks of the
/// hash; it should be cheap or rate-limit itself.
pub fn verify(
    pin: &Pin,
    mut file: File,
    meta: &fs::Metadata,
    level: VerifyLevel,
    cache_dir: Option<&Path>,
    cancelled: &dyn Fn() -> bool,
) -> Result<Verified, IntegrityError> {
    let expected_size = pin.catalog_size.unwrap_or(meta.len());
    quick_file(&mut file, meta, &pin.path, Some(expected_size))?;
    if level == VerifyLevel::Quick {
        return Ok(Verified::Quick);
    }
    let Some(expected) = pin.sha256.as_deref() else {
        return Err(IntegrityError::NoChecksum {
            path: pin.path.clone(),
            image: pin.display_name(),
        });
    };
    let key = cache_key(meta);
    let mismatch = |actual: String| IntegrityError::Checksum {
        path: pin.path.clone(),
        expected: expected.to_string(),
        actual,
    };
    if let Some(known) = cache_dir.and_then(|dir| cached_sum(dir, &key)) {
        return if known == expected {
            Ok(Verified::Cached)
        } else {
            // Remembered: this very file was hashed before and was wrong.
            Err(mismatch(known))
        };
    }
    let start = Instant::now();
    let actual = file
        .rewind()
        .map_err(|source| IntegrityError::Open {
            path: pin.path.clone(),
            source,
        })
        .and_then(|()| {
            sha256_bounded(&mut file, expected_size, cancelled).map_err(|e| match e {
                HashStop::Cancelled => IntegrityError::Cancelled {
                    path: pin.path.clone(),
                },
                HashStop::Io(source) => IntegrityError::Open {
                    path: pin.path.clone(),
                    source,
                },
            })
        })?;
    if let Some(dir) = cache_dir {
        if let Err(e) = store_sum(dir, &key, &actual) {
            log::warn!(
                "cannot cache the sha256 of {} in {}: {e}",
                pin.path.display(),
                dir.display()
            );
        }
    }
    if actual != expected {
        return Err(mismatch(actual));
    }
    Ok(Verified::Hashed {
        millis: start.elapsed().as_millis(),
    })
}

/// Why a bounded hash stopped early.
#[derive(Debug)]
pub enum HashStop {
    Cancelled,
    Io(io::Error),
}

/// The size of one hashed chunk: `cancelled` is asked this often.
const HASH_CHUNK: usize = 1 << 20;

/// SHA-256 of at most `limit` bytes of `r`, asking `cancelled` before each
/// chunk.
pub fn sha256_bounded<R: Read>(
    r: R,
    limit: u64,
    cancelled: &dyn Fn() -> bool,
) -> Result<String, HashStop> {
    let mut r = r.take(limit);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    loop {
        if cancelled() {
            return Err(HashStop::Cancelled);
        }
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HashStop::Io(e)),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

use secure::hex;

/// The cache key: [`secure::file_identity`].
fn cache_key(m: &fs::Metadata) -> String {
    secure::file_identity(m)
}

/// The sum this node found for the file with `key`, if it hashed it.
fn cached_sum(dir: &Path, key: &str) -> Option<String> {
    let path = dir.join(key);
    // Only trust entries root wrote: a regular file right there (not a
    // symlink, even to a root-owned file), owned by root, not writable by
    // others, in a root-owned directory; opened the one safe way and read
    // from that fd.
    match secure::read_trusted_here(&path, &[0], 128).ok()? {
        secure::ReadText::Text(text) => {
            let sum = text.trim();
            crate::catalog::is_sha256_hex(sum).then(|| sum.to_string())
        }
        secure::ReadText::TooLarge(_) => None,
    }
}

fn store_sum(dir: &Path, key: &str, sum: &str) -> io::Result<()> {
    secure::ensure_private_dir(dir, 0o755, 0)?;
    secure::replace_file(&dir.join(key), sum.as_bytes(), 0o644, None)
}

/// Streams a reader through SHA-256; lowercase hex.
pub fn sha256_reader<R: Read>(mut r: R) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

pub fn sha256_file(path: &Path) -> io::Result<String> {
    sha256_reader(File::open(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_known_values() {
        assert_eq!(
            sha256_reader(&b""[..]).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_reader(&b"abc"[..]).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let big = vec![b'a'; 3 << 20];
        assert_eq!(sha256_reader(&big[..]).unwrap().len(), 64);
    }

    /// A file of the test's own, removed with its directory on drop.
    struct Temp {
        path: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Temp {
        fn new(name: &str, bytes: &[u8]) -> Temp {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(name);
            fs::write(&path, bytes).unwrap();
            Temp { path, _dir: dir }
        }
    }

    /// A plain squashfs image of `len` bytes whose superblock says
    /// `bytes_used`.
    fn sqfs(bytes_used: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[..squashfs::SUPERBLOCK_LEN as usize].copy_from_slice(&squashfs::example(bytes_used));
        v
    }

    fn pin(path: &Path, size: u64, sha256: Option<&str>) -> Pin {
        Pin {
            reference: "t".into(),
            source: crate::registry::Source::Path,
            name: None,
            tag: None,
            path: path.to_path_buf(),
            size,
            catalog_size: None,
            sha256: sha256.map(str::to_string),
            mode: None,
        }
    }

    #[test]
    fn quick_checks_plain_squashfs_and_refuses_others() {
        let good = Temp::new("good.sqfs", &sqfs(4096, 4096));
        quick(&good.path, Some(4096)).unwrap();
        assert!(matches!(
            quick(&good.path, Some(4097)),
            Err(IntegrityError::Size {
                expected: 4097,
                actual: 4096,
                ..
            })
        ));
        let cut = Temp::new("cut.sqfs", &sqfs(8192, 4096));
        assert!(matches!(
            quick(&cut.path, None),
            Err(IntegrityError::Squashfs {
                source: SuperblockError::Size {
                    bytes_used: 8192,
                    len: 4096,
                },
                ..
            })
        ));
        // Squashfs 3.x: another layout, which no current kernel mounts.
        let mut v3 = sqfs(4096, 4096);
        v3[squashfs::MAJOR_AT..squashfs::MAJOR_AT + 2].copy_from_slice(&3u16.to_le_bytes());
        let old = Temp::new("v3.sqfs", &v3);
        let e = quick(&old.path, None).unwrap_err();
        assert!(
            matches!(
                e,
                IntegrityError::Squashfs {
                    source: SuperblockError::Version { major: 3, minor: 0 },
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .ends_with("rebuild it with a current mksquashfs"),
            "{e}"
        );
        // Shorter than a superblock, or neither squashfs nor SIF.
        let tiny = Temp::new("tiny.sqfs", b"hsqs");
        assert!(quick(&tiny.path, None).is_err());
        let text = Temp::new("text.sif", &[b'x'; 200]);
        assert!(matches!(
            quick(&text.path, None),
            Err(IntegrityError::Structure { .. })
        ));
        assert!(matches!(
            quick(Path::new("/nonexistent/x.sif"), None),
            Err(IntegrityError::Open { .. })
        ));
    }

    fn never() -> bool {
        false
    }

    fn run(
        p: &Pin,
        level: VerifyLevel,
        cache: Option<&Path>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Verified, IntegrityError> {
        let (file, meta) = secure::open_regular(&p.path).unwrap();
        verify(p, file, &meta, level, cache, cancelled)
    }

    #[test]
    fn full_hashes_the_same_open_file_after_the_structure_check() {
        let bytes = sqfs(4096, 4096);
        let f = Temp::new("full.sqfs", &bytes);
        let sum = sha256_reader(&bytes[..]).unwrap();
        assert!(matches!(
            run(
                &pin(&f.path, 4096, Some(&sum)),
                VerifyLevel::Full,
                None,
                &never
            ),
            Ok(Verified::Hashed { .. })
        ));
        let wrong = "0".repeat(64);
        assert!(matches!(
            run(
                &pin(&f.path, 4096, Some(&wrong)),
                VerifyLevel::Full,
                None,
                &never
            ),
            Err(IntegrityError::Checksum { .. })
        ));
        assert!(matches!(
            run(&pin(&f.path, 4096, None), VerifyLevel::Full, None, &never),
            Err(IntegrityError::NoChecksum { .. })
        ));
        assert_eq!(
            run(&pin(&f.path, 4096, None), VerifyLevel::Quick, None, &never).unwrap(),
            Verified::Quick
        );
    }

    #[test]
    fn hashing_is_bounded_and_cancellable() {
        // Never more than the limit, whatever the reader holds.
        let data = vec![7u8; 3 * HASH_CHUNK + 5];
        let first = sha256_reader(&data[..HASH_CHUNK + 1]).unwrap();
        assert_eq!(
            sha256_bounded(&data[..], HASH_CHUNK as u64 + 1, &never).unwrap(),
            first
        );
        // Asked before every chunk: stops after the second.
        let asked = std::cell::Cell::new(0);
        let stop_at_two = || {
            asked.set(asked.get() + 1);
            asked.get() > 2
        };
        assert!(matches!(
            sha256_bounded(&data[..], u64::MAX, &stop_at_two),
            Err(HashStop::Cancelled)
        ));
        assert_eq!(asked.get(), 3);
        // A cancelled verification says so, and caches nothing.
        let bytes = sqfs(4096, 4096);
        let f = Temp::new("cancel.sqfs", &bytes);
        let sum = sha256_reader(&bytes[..]).unwrap();
        assert!(matches!(
            run(
                &pin(&f.path, 4096, Some(&sum)),
                VerifyLevel::Full,
                None,
                &|| true
            ),
            Err(IntegrityError::Cancelled { .. })
        ));
    }

    #[test]
    fn a_mismatch_is_remembered_per_file() {
        if !nix::unistd::geteuid().is_root() {
            return; // the cache only trusts root's entries
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let bytes = sqfs(4096, 4096);
        let f = Temp::new("remember.sqfs", &bytes);
        let sum = sha256_reader(&bytes[..]).unwrap();
        let wrong = "0".repeat(64);
        let hashed = std::cell::Cell::new(0);
        let counting = || {
            hashed.set(hashed.get() + 1);
            false
        };
        for _ in 0..3 {
            let e = run(
                &pin(&f.path, 4096, Some(&wrong)),
                VerifyLevel::Full,
                Some(&dir),
                &counting,
            )
            .unwrap_err();
            assert!(
                matches!(&e, IntegrityError::Checksum { actual, .. } if *actual == sum),
                "{e}"
            );
        }
        // One hash (one chunk plus the end-of-file check), then the cache.
        assert_eq!(hashed.get(), 2);
        // The right sum for the same file comes from the cache too.
        assert_eq!(
            run(
                &pin(&f.path, 4096, Some(&sum)),
                VerifyLevel::Full,
                Some(&dir),
                &counting
            )
            .unwrap(),
            Verified::Cached
        );
        assert_eq!(hashed.get(), 2);
    }
}
