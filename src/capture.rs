//! What a failed task said, for its report: the tail of its
//! stderr, kept by `ml-container-launch`, and TorchElastic's structured
//! error file (`TORCHELASTIC_ERROR_FILE`, written by torch's `@record`).
//!
//! Both reach root through a per-step directory that root (slurmstepd,
//! before any task starts) creates for the job's user:
//! `/run/slurm-ml-container/<job>.<step>.<node>/`, owned by the user, mode
//! 0700, in a root-owned parent. The user's processes write there; root
//! reads each file only through [`read_user_file`]: opened relative to the
//! directory's descriptor with O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC, a regular
//! file owned by the job's uid, at most a capped number of bytes. When the
//! node's last task of the step has ended, root removes the directory by
//! its descriptor (unlinkat never follows a link).
#![forbid(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};
use serde::{Deserialize, Serialize};

use crate::jobtext;

/// Where the per-step directories live (root's, 0755).
pub const BASE: &str = "/run/slurm-ml-container";
/// Lines of a stderr tail shown in a report.
pub const TAIL_LINES: usize = 50;
/// The most a TorchElastic error file may hold for root to read it.
pub const TORCH_ERROR_CAP: usize = 256 << 10;
/// A line of a tail longer than this is cut (and marked).
const LINE_CAP: usize = 2048;

/// The file the launcher leaves for rank `rank` when its task failed.
pub fn stderr_name(rank: u32) -> String {
    format!("stderr.{rank}")
}

/// The TorchElastic error file the plugin gives rank `rank`.
pub fn torch_error_name(rank: u32) -> String {
    format!("torch-error.{rank}.json")
}

/// The step directory's name under [`BASE`]: nodes of a test cluster (or a
/// site with a shared /run, unusual) must not collide.
pub fn step_dir_name(job: u32, step: u32, node: &str) -> String {
    format!("{job}.{step}.{}", jobtext::field(node).replace('/', "_"))
}

/// Opens a directory without following a symlink at its last component.
pub(crate) fn open_dir(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// `name` in the directory open as `dir`, as a path the kernel resolves
/// through that descriptor (`/proc/self/fd/N/name`): the directory is the
/// one the descriptor holds, whatever happened to its path since, and
/// O_NOFOLLOW applies to `name`. (The standard library has no openat, and
/// this crate's safe modules have no raw-fd ownership.)
pub(crate) fn at(dir: &File, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()))
}

/// A per-step directory root made for the job's user.
#[derive(Debug)]
pub struct StepDir {
    pub path: PathBuf,
    pub uid: u32,
}

#[derive(Debug)]
pub enum CaptureError {
    Io { path: PathBuf, source: io::Error },
    NotRoots { path: PathBuf, uid: u32, mode: u32 },
}

impl std::fmt::Display for CaptureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaptureError::Io { path, source } => write!(
                f,
                "cannot prepare {} for the tasks' error output: {source}; check that /run is \
                 writable by root",
                path.display()
            ),
            CaptureError::NotRoots { path, uid, mode } => write!(
                f,
                "{} is not a root-owned directory closed to others (uid {uid}, mode {:o}); \
                 remove it, the plugin recreates it",
                path.display(),
                mode & 0o7777
            ),
        }
    }
}

impl StepDir {
    /// As root: `<base>/<name>`, the user's, 0700, in a root-owned `base`
    /// (created 0755 when missing). One left by an earlier step with the
    /// same name is emptied and made afresh.
    pub fn create(base: &Path, name: &str, uid: u32, gid: u32) -> Result<StepDir, CaptureError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaptureError::Io { path, source }
        };
        crate::secure::ensure_private_dir(base, 0o755, 0).map_err(io_err(base))?;
        let b = open_dir(base).map_err(io_err(base))?;
        let m = b.metadata().map_err(io_err(base))?;
        if m.uid() != 0 || m.mode() & 0o022 != 0 {
            return Err(CaptureError::NotRoots {
                path: base.to_path_buf(),
                uid: m.uid(),
                mode: m.mode(),
            });
        }
        let path = base.join(name);
        remove_in(&b, name);
        mkdirat(Some(b.as_raw_fd()), name, Mode::from_bits_truncate(0o700))
            .map_err(|e| io_err(&path)(e.into()))?;
        let d = open_dir(&at(&b, name)).map_err(io_err(&path))?;
        std::os::unix::fs::fchown(&d, Some(uid), Some(gid)).map_err(io_err(&path))?;
        d.set_permissions(fs::Permissions::from_mode(0o700))
            .map_err(io_err(&path))?;
        Ok(StepDir { path, uid })
    }

    /// As root, when the node's last task of the step has ended.
    pub fn remove(&self) {
        let (Some(parent), Some(name)) = (self.path.parent(), self.path.file_name()) else {
            return;
        };
        if let Ok(b) = open_dir(parent) {
            remove_in(&b, &name.to_string_lossy());
        }
    }

    /// As root: a file the user's processes wrote here, read safely
    /// ([`read_user_file`]).
    pub fn read(&self, name: &str, cap: usize) -> Option<UserFile> {
        read_user_file(&self.path, name, self.uid, cap)
    }
}

/// Removes the directory `name` in the open `base` and everything in it,
/// never following a link: each subdirectory is opened through its
/// parent's descriptor with O_NOFOLLOW, each entry unlinked with unlinkat.
/// Bounded: at most [`REMOVE_DEPTH`] levels and [`REMOVE_ENTRIES`] entries
/// (the shared container's records are five levels deep: src/share.rs);
/// what is left beyond that stays for the next step of the same name, or
/// tmpfs's end at reboot.
fn remove_in(base: &File, name: &str) {
    let mut budget = REMOVE_ENTRIES;
    remove_tree(base, name, 0, &mut budget);
}

const REMOVE_DEPTH: u32 = 8;
const REMOVE_ENTRIES: u32 = 10_000;

fn remove_tree(base: &File, name: &str, depth: u32, budget: &mut u32) {
    let Ok(d) = open_dir(&at(base, name)) else {
        // Not there, or a symlink or file: unlink whatever it is.
        let _ = unlinkat(Some(base.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir);
        return;
    };
    if let Ok(entries) = fs::read_dir(at(&d, "")) {
        for e in entries.flatten() {
            if *budget == 0 {
                return;
            }
            *budget -= 1;
            let n = e.file_name();
            // d_type, never a stat that follows a link.
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            match n.to_str() {
                Some(sub) if is_dir && depth < REMOVE_DEPTH => {
                    remove_tree(&d, sub, depth + 1, budget)
                }
                _ => {
                    let _ = unlinkat(
                        Some(d.as_raw_fd()),
                        n.as_os_str(),
                        UnlinkatFlags::NoRemoveDir,
                    );
                }
            }
        }
    }
    let _ = unlinkat(Some(base.as_raw_fd()), name, UnlinkatFlags::RemoveDir);
}

/// As root: `name` in `dir` (a directory root created), only if it is a
/// regular file owned by `uid`: opened without following a symlink and
/// without blocking (a FIFO), at most `cap` bytes (the last `cap` when it
/// is longer). None when absent or refused.
pub fn read_user_file(dir: &Path, name: &str, uid: u32, cap: usize) -> Option<UserFile> {
    if name.contains('/') {
        return None;
    }
    let d = open_dir(dir).ok()?;
    // The one safe open (secure::open_regular), through the directory's
    // descriptor: no symlink, no FIFO, a regular file checked on the fd.
    let (mut f, m) = crate::secure::open_regular(&at(&d, name)).ok()?;
    if m.uid() != uid {
        return None;
    }
    let len = m.len();
    if len > cap as u64 {
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(len - cap as u64)).ok()?;
    }
    let mut bytes = Vec::with_capacity(cap.min(len as usize));
    (&mut f).take(cap as u64).read_to_end(&mut bytes).ok()?;
    let modified_unix_ms = u64::try_from(m.mtime())
        .ok()
        .map(|s| s.saturating_mul(1000) + u64::try_from(m.mtime_nsec()).unwrap_or(0) / 1_000_000);
    Some(UserFile {
        bytes,
        modified_unix_ms,
    })
}

/// A file read by [`read_user_file`]: (the end of) its content, and its
/// mtime (the user's to set: only ever used to order the user's own ranks).
#[derive(Debug)]
pub struct UserFile {
    pub bytes: Vec<u8>,
    pub modified_unix_ms: Option<u64>,
}

/// The last `n` lines of `bytes`, each escaped ([`jobtext::escape`]) and
/// capped: what a report shows of a task's stderr. A partial first line
/// (the tail was cut there) is kept.
pub fn tail_lines(bytes: &[u8], n: usize) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    if text.is_empty() {
        return Vec::new();
    }
    let lines: Vec<&str> = text.split('\n').collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| jobtext::escape(l.strip_suffix('\r').unwrap_or(l), LINE_CAP))
        .collect()
}

/// TorchElastic's error file, as `torch.distributed.elastic.multiprocessing
/// .errors.ErrorHandler.record_exception` writes it:
/// `{"message": {"message": "Type: text", "extraInfo": {"py_callstack":
/// "...", "timestamp": "1700000000"}}}` (a C++ error may give `message` as
/// a plain string). Every field is optional and escaped.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TorchError {
    /// The exception's type (`RuntimeError`), from the message's prefix.
    pub error_type: Option<String>,
    pub message: String,
    /// The Python traceback, by line.
    pub traceback: Vec<String>,
    /// Unix seconds.
    pub timestamp: Option<u64>,
}

/// Parses a TorchElastic error file leniently; None when it is not one.
pub fn parse_torch_error(bytes: &[u8]) -> Option<TorchError> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let m = v.get("message")?;
    let (text, extra) = match m {
        serde_json::Value::String(s) => (s.clone(), None),
        serde_json::Value::Object(o) => (
            o.get("message")
                .and_then(|x| x.as_str())
                .unwrap_or_default()
                .to_string(),
            o.get("extraInfo"),
        ),
        _ => return None,
    };
    let error_type = text
        .split_once(": ")
        .map(|(t, _)| t)
        .filter(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '.')
        })
        .map(|t| jobtext::escape(t, 256));
    let traceback = extra
        .and_then(|e| e.get("py_callstack"))
        .and_then(|c| c.as_str())
        .map(|c| tail_lines(c.as_bytes(), 200))
        .unwrap_or_default();
    let timestamp = extra
        .and_then(|e| e.get("timestamp"))
        .and_then(|t| match t {
            serde_json::Value::String(s) => s.trim().parse().ok(),
            serde_json::Value::Number(n) => n.as_u64(),
            _ => None,
        });
    Some(TorchError {
        error_type,
        message: jobtext::escape(&text, 8192),
        traceback,
        timestamp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_keep_the_last_lines_escaped() {
        let t = tail_lines(b"a\nb\nc\n", 2);
        assert_eq!(t, ["b", "c"]);
        let esc = tail_lines(b"x\x1b[2Jy", 5);
        assert_eq!(esc, [jobtext::escape("x\x1b[2Jy", LINE_CAP)]);
        assert!(!esc[0].contains('\x1b'), "{esc:?}");
        assert!(tail_lines(b"", 5).is_empty());
        let long = "z".repeat(10_000);
        assert!(tail_lines(long.as_bytes(), 1)[0].len() <= LINE_CAP + 16);
    }

    #[test]
    fn torch_error_files_parse_leniently() {
        let text = r#"{"message": {"message": "RuntimeError: boom", "extraInfo": {"py_callstack": "Traceback (most recent call last):\n  File \"x.py\", line 3\nRuntimeError: boom\n", "timestamp": "1700000000"}}}"#;
        let e = parse_torch_error(text.as_bytes()).unwrap();
        assert_eq!(e.error_type.as_deref(), Some("RuntimeError"));
        assert_eq!(e.message, "RuntimeError: boom");
        assert_eq!(e.traceback.len(), 3);
        assert_eq!(e.timestamp, Some(1_700_000_000));
        let plain = parse_torch_error(br#"{"message": "c10 error"}"#).unwrap();
        assert_eq!(
            (plain.error_type, plain.message.as_str()),
            (None, "c10 error")
        );
        assert!(parse_torch_error(b"not json").is_none());
        assert!(parse_torch_error(b"{}").is_none());
    }

    /// As root (the tests run as root, as slurmstepd does).
    #[test]
    fn root_reads_only_the_users_regular_files_and_removes_the_dir() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("base");
        let d = StepDir::create(&base, "7.0.n1", 1500, 1600).unwrap();
        let m = fs::symlink_metadata(&d.path).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1500, 1600, 0o700));
        let own = d.path.join("stderr.1");
        fs::write(&own, b"0123456789").unwrap();
        std::os::unix::fs::chown(&own, Some(1500), None).unwrap();
        assert_eq!(d.read("stderr.1", 4).unwrap().bytes, b"6789");
        // Another owner's file, a symlink and a FIFO are refused.
        fs::write(d.path.join("stderr.2"), b"root's").unwrap();
        assert!(d.read("stderr.2", 100).is_none());
        std::os::unix::fs::symlink(&own, d.path.join("stderr.3")).unwrap();
        assert!(d.read("stderr.3", 100).is_none());
        nix::unistd::mkfifo(&d.path.join("stderr.4"), Mode::from_bits_truncate(0o600)).unwrap();
        std::os::unix::fs::chown(d.path.join("stderr.4"), Some(1500), None).unwrap();
        assert!(d.read("stderr.4", 100).is_none());
        assert!(d.read("../x", 100).is_none());
        // What Apptainer leaves (the shared container's records) goes
        // too, and a link out of the directory is removed, not followed.
        let outside = base.join("outside");
        fs::create_dir_all(outside.join("keep")).unwrap();
        fs::write(outside.join("keep/file"), b"x").unwrap();
        let deep = d.path.join("apptainer/instances/app/n1/mluser/mlc-7-0");
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("mlc-7-0.json"), b"{}").unwrap();
        std::os::unix::fs::symlink(&outside, d.path.join("apptainer/link")).unwrap();
        std::os::unix::fs::symlink(&outside, deep.join("link")).unwrap();
        // Made again over a leftover: empty.
        let again = StepDir::create(&base, "7.0.n1", 1500, 1600).unwrap();
        assert_eq!(fs::read_dir(&again.path).unwrap().count(), 0);
        again.remove();
        assert!(!again.path.exists());
        assert!(outside.join("keep/file").exists(), "a link was followed");
        fs::remove_dir_all(&outside).unwrap();
    }
}
