//! Writing the catalog (the CLI replaces the catalog
//! atomically under a lock: a reader never sees half a file).
//!
//! Every change takes an exclusive lock on `.registry/catalog.lock`,
//! re-reads the catalog, applies the change, renders it, checks the result
//! parses back to the same entries, writes a temporary file in the same
//! directory, fsyncs it, renames it over the catalog and fsyncs the
//! directory. Readers never lock: rename(2) swaps whole files.
//!
//! The lock file is mode 0600 and must belong to the writer (root), in
//! `.registry/`, which only root can write: no user can open it, so no user
//! can hold the lock (with the old 0644 file, `flock catalog.lock sleep
//! 1000` as any user blocked every `ml-container add`).
//! An older 0644 file is closed to others on first use. The lock is tried
//! until a deadline (10 s, `ML_CONTAINER_LOCK_TIMEOUT` seconds), and the
//! error names the process that holds it (from /proc/locks).
#![forbid(unsafe_code)]

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::catalog::{self, Catalog, CatalogError, Image};
use crate::secure;

#[derive(Debug)]
pub enum WriteError {
    Io {
        path: PathBuf,
        source: io::Error,
    },
    Catalog(CatalogError),
    Duplicate {
        reference: String,
    },
    NotFound {
        reference: String,
    },
    Invalid {
        message: String,
    },
    /// Another process held the lock for the whole deadline.
    Busy {
        path: PathBuf,
        waited: Duration,
        holders: String,
    },
    /// The catalog was written but its index could not be (none is left:
    /// resolution parses the catalog until the next write).
    Index {
        path: PathBuf,
        source: io::Error,
    },
    /// The lock file is not a regular file of the writer's.
    LockFile {
        path: PathBuf,
        reason: String,
    },
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            WriteError::Catalog(e) => write!(f, "{e}"),
            WriteError::Duplicate { reference } => write!(
                f,
                "{reference} is already in the catalog: remove it first (ml-container remove {reference})"
            ),
            WriteError::NotFound { reference } => write!(
                f,
                "{reference} is not in the catalog ('ml-container list' shows what is)"
            ),
            WriteError::Invalid { message } => write!(f, "{message}"),
            WriteError::Busy {
                path,
                waited,
                holders,
            } => write!(
                f,
                "the catalog is locked by {holders} ({}, waited {} s): let that finish and \
                 retry, or stop it if it hangs",
                path.display(),
                waited.as_secs()
            ),
            WriteError::Index { path, source } => write!(
                f,
                "the catalog was written, but not its index {} ({source}): resolution parses \
                 the whole catalog until 'ml-container reindex' (or the next add/remove) succeeds",
                path.display()
            ),
            WriteError::LockFile { path, reason } => write!(
                f,
                "{}: {reason}: remove it (the next writer makes a new one)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for WriteError {}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WriteError + '_ {
    move |source| WriteError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Inverse of catalog::days_from_civil (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The catalog as TOML text, entries in order.
pub fn render(c: &Catalog) -> String {
    let mut out = String::from(
        "# Written by ml-container; edit with 'ml-container add/remove'.\nversion = 1\n",
    );
    for im in &c.images {
        out.push_str("\n[[image]]\n");
        out.push_str(&format!(
            "name = {}\ntag = {}\n",
            quote(&im.name),
            quote(&im.tag)
        ));
        out.push_str(&format!("path = {}\n", quote(&im.path.to_string_lossy())));
        if let Some(s) = &im.sha256 {
            out.push_str(&format!("sha256 = {}\n", quote(s)));
        }
        if let Some(s) = im.size {
            out.push_str(&format!("size = {s}\n"));
        }
        if im.default {
            out.push_str("default = true\n");
        }
        if !im.aliases.is_empty() {
            let a: Vec<String> = im.aliases.iter().map(|a| quote(a)).collect();
            out.push_str(&format!("aliases = [{}]\n", a.join(", ")));
        }
        if let Some(d) = &im.description {
            out.push_str(&format!("description = {}\n", quote(d)));
        }
        if !im.labels.is_empty() {
            let l: Vec<String> = im
                .labels
                .iter()
                .map(|(k, v)| format!("{} = {}", quote(k), quote(v)))
                .collect();
            out.push_str(&format!("labels = {{ {} }}\n", l.join(", ")));
        }
        if let Some(a) = im.added {
            out.push_str(&format!("added = {}\n", format_rfc3339(a)));
        }
    }
    out
}

/// Holds the registry's catalog lock; dropped, it releases it.
#[derive(Debug)]
pub struct Locked {
    _lock: File,
    path: PathBuf,
    pub catalog: Catalog,
}

/// The environment variable that sets the lock deadline in seconds.
pub const LOCK_TIMEOUT_ENV: &str = "ML_CONTAINER_LOCK_TIMEOUT";
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

fn lock_timeout() -> Duration {
    std::env::var(LOCK_TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(LOCK_TIMEOUT, Duration::from_secs)
}

/// Takes the lock and reads the current catalog (empty when absent).
pub fn lock(root: &Path) -> Result<Locked, WriteError> {
    lock_within(root, lock_timeout())
}

/// [`lock`] with an explicit deadline.
pub fn lock_within(root: &Path, timeout: Duration) -> Result<Locked, WriteError> {
    let dir = root.join(".registry");
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let lock_path = dir.join("catalog.lock");
    let lock = secure::open_lock_file(&lock_path).map_err(io_err(&lock_path))?;
    let meta = lock.metadata().map_err(io_err(&lock_path))?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_file() || meta.uid() != me {
        return Err(WriteError::LockFile {
            path: lock_path,
            reason: format!(
                "not a regular file owned by uid {me} (owner uid {}, {:?})",
                meta.uid(),
                meta.file_type()
            ),
        });
    }
    if meta.mode() & 0o077 != 0 {
        // An older install's 0644 file: nobody else may open it from now.
        lock.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err(&lock_path))?;
    }
    let started = Instant::now();
    // Short naps: writers hold the lock for milliseconds, and a long nap
    // lets newer writers overtake this one.
    let taken = secure::lock_within(&lock, timeout, Duration::from_millis(10))
        .map_err(io_err(&lock_path))?;
    if !taken {
        let procs = fs::read_to_string("/proc/locks").unwrap_or_default();
        let holders = lock_holders(&procs, meta.dev(), meta.ino());
        return Err(WriteError::Busy {
            path: lock_path,
            waited: started.elapsed(),
            holders: if holders.is_empty() {
                "another process (not found in /proc/locks)".to_string()
            } else {
                holders
                    .iter()
                    .map(|&pid| describe_pid(pid))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        });
    }
    let path = root.join(catalog::CATALOG_PATH);
    let catalog = match fs::read_to_string(&path) {
        Ok(text) => Catalog::parse(&path, &text).map_err(WriteError::Catalog)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Catalog::default(),
        Err(e) => return Err(io_err(&path)(e)),
    };
    Ok(Locked {
        _lock: lock,
        path,
        catalog,
    })
}

/// Linux's dev_t split (the kernel's new_encode_dev), as /proc/locks
/// prints it (`MAJ:MIN:INODE`, major and minor in hex).
fn dev_major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

/// The pids holding a lock on the file `dev`/`ino`, from /proc/locks text
/// (`1: FLOCK  ADVISORY  WRITE 8476 fe:00:5480466 0 EOF`; waiters' lines
/// have `->` after the number and are skipped).
pub fn lock_holders(proc_locks: &str, dev: u64, ino: u64) -> Vec<u32> {
    let (major, minor) = dev_major_minor(dev);
    let mut pids: Vec<u32> = proc_locks
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(1) == Some(&"->") {
                return None;
            }
            let mut id = f.get(5)?.split(':');
            let (ma, mi, i) = (id.next()?, id.next()?, id.next()?);
            let same = u64::from_str_radix(ma, 16).ok()? == major
                && u64::from_str_radix(mi, 16).ok()? == minor
                && i.parse::<u64>().ok()? == ino;
            same.then(|| f.get(4)?.parse().ok()).flatten()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// `pid N (COMMAND, uid U NAME)`, as far as /proc tells.
fn describe_pid(pid: u32) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.split_whitespace().next().unwrap_or_default().to_string())
    };
    match (
        field("Name:"),
        field("Uid:").and_then(|u| u.parse::<u32>().ok()),
    ) {
        (Some(name), Some(uid)) => {
            let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|u| format!(" {}", u.name))
                .unwrap_or_default();
            format!(
                "pid {pid} ({}, uid {uid}{})",
                crate::jobtext::field(&name),
                crate::jobtext::field(&user)
            )
        }
        _ => format!("pid {pid} (gone, or in another pid namespace)"),
    }
}

impl Locked {
    /// Adds `image`; with `default`, the other tags of its name lose theirs.
    pub fn add(&mut self, image: Image) -> Result<(), WriteError> {
        if self.catalog.get(&image.name, &image.tag).is_some() {
            return Err(WriteError::Duplicate {
                reference: image.reference(),
            });
        }
        if image.default {
            for other in self
                .catalog
                .images
                .iter_mut()
                .filter(|i| i.name == image.name)
            {
                other.default = false;
            }
        }
        self.catalog.images.push(image);
        Ok(())
    }

    pub fn remove(&mut self, name: &str, tag: &str) -> Result<Image, WriteError> {
        let idx = self
            .catalog
            .images
            .iter()
            .position(|i| i.name == name && i.tag == tag)
            .ok_or_else(|| WriteError::NotFound {
                reference: format!("{name}:{tag}"),
            })?;
        Ok(self.catalog.images.remove(idx))
    }

    /// Renders, checks and atomically replaces the catalog file.
    pub fn commit(self) -> Result<(), WriteError> {
        let text = render(&self.catalog);
        // What we write must be a valid catalog with the same entries.
        let back = Catalog::parse(&self.path, &text).map_err(|e| WriteError::Invalid {
            message: format!("the change would make the catalog invalid: {e}"),
        })?;
        if back.images.len() != self.catalog.images.len() {
            return Err(WriteError::Invalid {
                message: "internal: the rendered catalog lost entries".to_string(),
            });
        }
        crate::secure::replace_file(&self.path, text.as_bytes(), 0o644, None)
            .map_err(io_err(&self.path))?;
        // Still under the lock: the index for exactly this catalog. A
        // failure leaves no index (resolution then parses the catalog).
        let root = self
            .path
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("/"));
        if let Err(e) = crate::catalog_index::write(root, &self.catalog, &text) {
            // The catalog is in place, so the change stands; say why
            // resolution will be slow (only the CLI writes catalogs).
            eprintln!(
                "ml-container: warning: {}",
                WriteError::Index {
                    path: root.join(crate::catalog_index::INDEX_PATH),
                    source: e,
                }
            );
        }
        Ok(())
    }

    /// Rewrites the index of the current catalog (`ml-container reindex`),
    /// after checking the catalog strictly (it was parsed under the lock).
    pub fn reindex(self) -> Result<(), WriteError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return self.commit(),
            Err(e) => return Err(io_err(&self.path)(e)),
        };
        let root = self
            .path
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("/"));
        crate::catalog_index::write(root, &self.catalog, &text).map_err(|e| WriteError::Index {
            path: root.join(crate::catalog_index::INDEX_PATH),
            source: e,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str, tag: &str, default: bool) -> Image {
        Image {
            name: name.into(),
            tag: tag.into(),
            path: format!("ml-frameworks/{name}-{tag}.sif").into(),
            sha256: Some("ab".repeat(32)),
            size: Some(1048576),
            default,
            aliases: vec![format!("registry.example/{name}:{tag}")],
            description: Some("with \"quotes\" and \\ backslash".into()),
            labels: [("cuda".to_string(), "12.1".to_string())]
                .into_iter()
                .collect(),
            added: Some(1_700_000_000),
            line: 0,
        }
    }

    #[test]
    fn dates() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_868_800), "2000-03-01T00:00:00Z");
        for s in [0i64, 1, 86399, 951_782_400, 1_700_000_000, 4_102_444_800] {
            assert_eq!(catalog::parse_rfc3339(&format_rfc3339(s)), Some(s));
        }
    }

    #[test]
    fn render_round_trips() {
        let c = Catalog {
            images: vec![
                image("a", "1", false),
                image("a", "2", true),
                image("b", "x", false),
            ],
        };
        let back = Catalog::parse(Path::new("/c"), &render(&c)).unwrap();
        assert_eq!(back.images.len(), 3);
        for (x, y) in c.images.iter().zip(&back.images) {
            assert_eq!(
                (&x.name, &x.tag, &x.path, &x.sha256, x.size, x.default),
                (&y.name, &y.tag, &y.path, &y.sha256, y.size, y.default)
            );
            assert_eq!(
                (&x.aliases, &x.description, &x.labels, x.added),
                (&y.aliases, &y.description, &y.labels, y.added)
            );
        }
    }

    #[test]
    fn add_remove_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let mut l = lock(&root).unwrap();
        l.add(image("a", "1", true)).unwrap();
        l.add(image("a", "2", true)).unwrap();
        assert!(matches!(
            l.add(image("a", "2", false)),
            Err(WriteError::Duplicate { .. })
        ));
        l.commit().unwrap();
        let mut l = lock(&root).unwrap();
        assert_eq!(l.catalog.images.len(), 2);
        assert_eq!(
            l.catalog.default_for("a").map(|i| i.tag.as_str()),
            Some("2")
        );
        l.remove("a", "2").unwrap();
        assert!(matches!(
            l.remove("a", "9"),
            Err(WriteError::NotFound { .. })
        ));
        // An alias colliding with an entry is refused at commit.
        let mut bad = image("c", "1", false);
        bad.aliases = vec!["a:1".into()];
        l.add(bad).unwrap();
        assert!(matches!(l.commit(), Err(WriteError::Invalid { .. })));
        let l = lock(&root).unwrap();
        assert_eq!(l.catalog.images.len(), 2, "a failed commit changed nothing");
        drop(l);
    }

    #[test]
    fn holders_from_proc_locks() {
        let dev = (0xfe << 8) | 0x01; // fe:01
        let text = "1: FLOCK  ADVISORY  WRITE 8476 fe:01:5480466 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 9000 fe:01:5480466 0 EOF\n\
                    2: FLOCK  ADVISORY  READ 8477 fe:01:10133507 0 EOF\n\
                    3: POSIX  ADVISORY  WRITE 11600 fe:00:5480466 0 EOF\n";
        assert_eq!(lock_holders(text, dev, 5480466), vec![8476]);
        assert_eq!(lock_holders(text, dev, 1), Vec::<u32>::new());
        assert_eq!(lock_holders("garbage\n", dev, 1), Vec::<u32>::new());
    }

    #[test]
    fn a_held_lock_fails_within_the_deadline_naming_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        fs::create_dir_all(root.join(".registry")).unwrap();
        let lock_path = root.join(".registry/catalog.lock");
        // An older install's world-readable lock file.
        fs::write(&lock_path, "").unwrap();
        fs::set_permissions(&lock_path, fs::Permissions::from_mode(0o644)).unwrap();
        // -o: the lock stays with flock itself, so killing it frees it.
        let mut holder = std::process::Command::new("flock")
            .arg("-o")
            .arg(&lock_path)
            .args(["sleep", "10"])
            .spawn()
            .unwrap();
        // Until flock holds it.
        let t = Instant::now();
        while lock_holders(
            &fs::read_to_string("/proc/locks").unwrap(),
            fs::metadata(&lock_path).unwrap().dev(),
            fs::metadata(&lock_path).unwrap().ino(),
        )
        .is_empty()
        {
            assert!(t.elapsed() < Duration::from_secs(10), "flock never locked");
            std::thread::sleep(Duration::from_millis(20));
        }
        let t = Instant::now();
        let e = lock_within(&root, Duration::from_millis(500)).unwrap_err();
        let took = t.elapsed();
        let _ = holder.kill();
        let _ = holder.wait();
        let msg = e.to_string();
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert!(
            msg.contains(&format!("locked by pid {} (flock, uid 0", holder.id())),
            "{msg}"
        );
        assert_eq!(fs::metadata(&lock_path).unwrap().mode() & 0o777, 0o600);
        // Free again: taken at once.
        lock_within(&root, Duration::from_secs(5)).unwrap();
    }
}
