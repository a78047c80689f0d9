//! The report directory, written by root in slurmstepd and readable by the
//! job's user and root only: the report file is owned by the job's uid
//! (group root, mode 0400) in a job directory owned by root with the job's
//! group (mode 0750: the user can list and read, a group-mate sees names
//! only, nobody but root can add, rename or remove). The job directory is
//! opened with O_DIRECTORY|O_NOFOLLOW and its owner and mode are set on that
//! fd, never by path; files are created in it with O_EXCL|O_NOFOLLOW,
//! checked to be that directory's entries, and renamed into place by the
//! directory's fd, so a symlink planted at any of these names is never
//! followed. Each job directory records its user (`.owner`, root's, 0600):
//! a directory whose record names another user, or that has none, is left
//! from an older job with the same id (MaxJobId wrap, lost state) and is
//! moved aside to `.stale-<job>-<time>-<pid>` rather than inherited: a
//! reused job id never shows one user another's reports. `ml-container
//! prune` (and the package's tmpfiles.d rule) expires old directories.
#![forbid(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{renameat, renameat2, AtFlags, RenameFlags};
use nix::sys::stat::{fstatat, mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

use super::Report;
use crate::jobtext;

impl Report {
    /// `<dir>/<job id>/<step id>.<node>.json`
    pub fn path_in(&self, dir: &Path) -> PathBuf {
        dir.join(self.job_id.to_string())
            .join(format!("{}.{}.json", self.step_id, self.node))
    }

    /// Writes the report as root for the job's user `uid` (group `gid`):
    /// see the module comment. Returns its path.
    pub fn write(&self, dir: &Path, uid: u32, gid: u32) -> io::Result<PathBuf> {
        crate::secure::ensure_private_dir(dir, 0o755, 0)?;
        let base = open_dir(dir)?;
        check_root_dir(dir, &base, 0o022)?;
        let job = self.job_id.to_string();
        let job_path = dir.join(&job);
        let job_dir = job_dir_for(dir, &base, &job, uid, gid)?;
        // Owner and mode set on the open directory, never by path.
        std::os::unix::fs::fchown(&job_dir, Some(0), Some(gid))?;
        job_dir.set_permissions(fs::Permissions::from_mode(0o750))?;
        let name = format!("{}.{}.json", self.step_id, self.node);
        let tmp = format!(".{name}.{}.tmp", std::process::id());
        let _ = unlinkat(
            Some(job_dir.as_raw_fd()),
            tmp.as_str(),
            UnlinkatFlags::NoRemoveDir,
        );
        let mut text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        text.push('\n');
        let written = (|| {
            let mut f = create_in(&job_path, &job_dir, &tmp, 0o400)?;
            std::os::unix::fs::fchown(&f, Some(uid), Some(0))?;
            f.set_permissions(fs::Permissions::from_mode(0o400))?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            let fd = Some(job_dir.as_raw_fd());
            renameat(fd, tmp.as_str(), fd, name.as_str()).map_err(io::Error::from)
        })();
        if let Err(e) = written {
            let _ = unlinkat(
                Some(job_dir.as_raw_fd()),
                tmp.as_str(),
                UnlinkatFlags::NoRemoveDir,
            );
            return Err(e);
        }
        job_dir.sync_all()?;
        Ok(job_path.join(name))
    }
}

/// The owner record in each job directory: `uid=N`, root's, mode 0600.
pub const OWNER_FILE: &str = ".owner";
/// Prefix of a job directory moved aside because its job id was reused.
pub const STALE_PREFIX: &str = ".stale-";

/// Opens a directory without following a symlink at its last component.
fn open_dir(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// A directory only root can change: owned by root, none of `forbidden`'s
/// mode bits.
fn check_root_dir(path: &Path, d: &File, forbidden: u32) -> io::Result<()> {
    let m = d.metadata()?;
    if !m.is_dir() || m.uid() != 0 || m.mode() & forbidden != 0 {
        return Err(io::Error::other(format!(
            "{} is not a root-owned directory closed to others (uid {}, mode {:o}); not \
             writing there: fix its owner and mode",
            path.display(),
            m.uid(),
            m.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Creates `name` (new, O_EXCL, never through a symlink) in the directory
/// open as `dir` (whose path is `dir_path`), and checks that the file
/// created is that directory's entry: the path is only a way to the fd's
/// directory, which only root can change.
fn create_in(dir_path: &Path, dir: &File, name: &str, mode: u32) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir_path.join(name))?;
    let entry = fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    let m = f.metadata()?;
    if entry.st_ino != m.ino() || entry.st_dev != m.dev() {
        return Err(io::Error::other(format!(
            "{} changed while root wrote there; not writing",
            dir_path.display()
        )));
    }
    Ok(f)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A name unique to this process on this host: report dirs may be shared
/// by nodes (NFS), where pids repeat.
fn unique_suffix() -> String {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(
        "{}-{}",
        jobtext::field(&host).replace('/', "_"),
        std::process::id()
    )
}

/// Moves `<base>/<job>` aside (a reused job id never inherits it); the
/// old directory keeps its owner and modes, `prune` removes it in time.
/// `inspected` is the directory that was judged stale: when a concurrent
/// writer (another node) has meanwhile replaced it by a fresh one, that one
/// is put back. Gone already (another node moved it): fine.
fn move_aside(dir: &Path, base: &File, job: &str, inspected: Option<(u64, u64)>) -> io::Result<()> {
    let aside = format!("{STALE_PREFIX}{job}-{}-{}", now_secs(), unique_suffix());
    let fd = Some(base.as_raw_fd());
    match renameat2(fd, job, fd, aside.as_str(), RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => {}
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    if let Some((dev, ino)) = inspected {
        let moved = fs::symlink_metadata(dir.join(&aside))?;
        if (moved.dev(), moved.ino()) != (dev, ino) {
            let _ = renameat2(fd, aside.as_str(), fd, job, RenameFlags::RENAME_NOREPLACE);
        }
    }
    Ok(())
}

/// The uid an owner record names.
fn parse_owner(text: &str) -> Option<u32> {
    text.trim().strip_prefix("uid=")?.parse().ok()
}

/// Reads the owner record of the open job directory `d`: root's regular
/// file, not through a symlink, never blocking.
fn read_owner(d_path: &Path, d: &File) -> Option<u32> {
    let p = d_path.join(OWNER_FILE);
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&p)
        .ok()?;
    let m = f.metadata().ok()?;
    let entry = fstatat(
        Some(d.as_raw_fd()),
        OWNER_FILE,
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .ok()?;
    if !m.is_file() || m.uid() != 0 || entry.st_ino != m.ino() {
        return None;
    }
    let mut text = String::new();
    (&mut f).take(64).read_to_string(&mut text).ok()?;
    parse_owner(&text)
}

/// The job directory `<base>/<job>` of the job's user `uid`, open. A
/// directory there that is not root's, is a symlink or file, has no owner
/// record (written before records existed) or records another uid belongs
/// to an older job with the same id: it is moved aside and a fresh one made.
/// A fresh one is made under a temporary name, given its owner record and
/// modes, then renamed into place without replacing anything: a directory
/// under the job's name always has its record, even to a node writing
/// concurrently.
fn job_dir_for(dir: &Path, base: &File, job: &str, uid: u32, gid: u32) -> io::Result<File> {
    let job_path = dir.join(job);
    for _ in 0..4 {
        match open_dir(&job_path) {
            Ok(d) => {
                let theirs = check_root_dir(&job_path, &d, 0o027).is_ok()
                    && read_owner(&job_path, &d) == Some(uid);
                if theirs {
                    return Ok(d);
                }
                log::warn!(
                    "{} belongs to an older job with the same id: moved aside",
                    job_path.display()
                );
                let m = d.metadata()?;
                move_aside(dir, base, job, Some((m.dev(), m.ino())))?;
            }
            Err(e)
                if e.raw_os_error() == Some(libc::ELOOP)
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                move_aside(dir, base, job, None)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let tmp = format!(".new-{job}-{}", unique_suffix());
                let tmp_path = dir.join(&tmp);
                let _ = fs::remove_dir_all(&tmp_path);
                mkdirat(
                    Some(base.as_raw_fd()),
                    tmp.as_str(),
                    Mode::from_bits_truncate(0o700),
                )?;
                let made = (|| {
                    let d = open_dir(&tmp_path)?;
                    check_root_dir(&tmp_path, &d, 0o077)?;
                    let mut rec = create_in(&tmp_path, &d, OWNER_FILE, 0o600)?;
                    rec.write_all(format!("uid={uid}\n").as_bytes())?;
                    rec.sync_all()?;
                    std::os::unix::fs::fchown(&d, Some(0), Some(gid))?;
                    d.set_permissions(fs::Permissions::from_mode(0o750))?;
                    let fd = Some(base.as_raw_fd());
                    renameat2(fd, tmp.as_str(), fd, job, RenameFlags::RENAME_NOREPLACE)
                        .map_err(io::Error::from)
                })();
                if let Err(e) = made {
                    let _ = fs::remove_dir_all(&tmp_path);
                    // Another node made it meanwhile: use that one.
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(e);
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!(
        "{} keeps changing under root; not writing there",
        job_path.display()
    )))
}

/// The largest report `read_job` reads: a report file belongs to the job's
/// user, who may have grown it.
const MAX_REPORT_BYTES: u64 = 16 << 20;

/// Reads the reports of a job, for `ml-container diagnose` (as whoever runs
/// it: files it may not read come back as errors). Never follows a symlink
/// nor blocks on a FIFO; reads at most 16 MiB of each.
pub fn read_job(dir: &Path, job: u32) -> io::Result<Vec<(PathBuf, Result<Report, String>)>> {
    let job_dir = dir.join(job.to_string());
    open_dir(&job_dir)?;
    let mut out = Vec::new();
    for e in fs::read_dir(&job_dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "json") {
            let parsed = read_report(&p);
            out.push((p, parsed));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn read_report(p: &Path) -> Result<Report, String> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(p)
        .map_err(|e| e.to_string())?;
    let m = f.metadata().map_err(|e| e.to_string())?;
    if !m.is_file() {
        return Err("not a regular file".to_string());
    }
    let mut text = String::new();
    (&mut f)
        .take(MAX_REPORT_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    serde_json::from_str::<Report>(&text).map_err(|e| e.to_string())
}

/// Removes the job directories under `dir` (numeric names, and those moved
/// aside or left half-made: `.stale-`, `.new-`) not modified for `age`;
/// with `dry_run` only lists them. Entries are removed without following
/// symlinks (`remove_dir_all` does not); anything else is left alone.
pub fn prune(dir: &Path, age: std::time::Duration, dry_run: bool) -> io::Result<Vec<PathBuf>> {
    let base = open_dir(dir)?;
    check_root_dir(dir, &base, 0o022)?;
    let cutoff = std::time::SystemTime::now()
        .checked_sub(age)
        .unwrap_or(std::time::UNIX_EPOCH);
    let mut removed = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        let ours = name.parse::<u32>().is_ok()
            || name.starts_with(STALE_PREFIX)
            || name.starts_with(".new-");
        if !ours {
            continue;
        }
        let p = e.path();
        let m = fs::symlink_metadata(&p)?;
        if m.modified()? > cutoff {
            continue;
        }
        if !dry_run {
            if m.is_dir() {
                fs::remove_dir_all(&p)?;
            } else {
                fs::remove_file(&p)?;
            }
        }
        removed.push(p);
    }
    removed.sort();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::report;
    use crate::report::TaskOutcome;

    /// As root (the tests run as root, as slurmstepd does).
    #[test]
    fn reports_belong_to_the_user_and_a_reused_job_id_starts_afresh() {
        let dir = std::env::temp_dir().join(format!("mlc-reports-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let r = report(vec![TaskOutcome::from_wait_status(1, 0, 7 << 8)]);
        let p = r.write(&dir, 1500, 1600).unwrap();
        assert_eq!(p, dir.join("5/0.n2.json"));
        let m = fs::symlink_metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1500, 0, 0o400));
        let d = fs::symlink_metadata(dir.join("5")).unwrap();
        assert_eq!((d.uid(), d.gid(), d.mode() & 0o7777), (0, 1600, 0o750));
        assert_eq!(
            fs::read_to_string(dir.join("5").join(OWNER_FILE)).unwrap(),
            "uid=1500\n"
        );
        // The same user's next step: same directory, both reports.
        let mut r1 = r.clone();
        r1.step_id = 1;
        r1.write(&dir, 1500, 1600).unwrap();
        assert!(dir.join("5/0.n2.json").exists() && dir.join("5/1.n2.json").exists());
        // Job id 5 again, another user: the old directory is moved aside.
        let mut other = r.clone();
        other.uid = 1501;
        other.step_id = 3;
        other.write(&dir, 1501, 1600).unwrap();
        let names: Vec<String> = fs::read_dir(dir.join("5"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains(&"3.n2.json".to_string()), "{names:?}");
        let aside: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(STALE_PREFIX))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert!(dir.join(&aside[0]).join("0.n2.json").exists());
        // A directory without a record (older versions) is not inherited.
        fs::create_dir(dir.join("6")).unwrap();
        fs::write(dir.join("6/0.n1.json"), "old").unwrap();
        let mut six = r.clone();
        six.job_id = 6;
        six.write(&dir, 1500, 1600).unwrap();
        assert!(!dir.join("6/0.n1.json").exists());
        // A symlink planted as the job directory is never followed.
        let target = dir.join("elsewhere");
        fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(&target, dir.join("7")).unwrap();
        let mut seven = r.clone();
        seven.job_id = 7;
        seven.write(&dir, 1500, 1600).unwrap();
        assert_eq!(fs::read_dir(&target).unwrap().count(), 0);
        assert!(fs::symlink_metadata(dir.join("7")).unwrap().is_dir());
        // diagnose reads them back.
        let back = read_job(&dir, 5).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].1.as_ref().unwrap(), &other);
        // Expiry: nothing is a day old yet; everything is older than 0 s.
        fs::write(dir.join("notes.txt"), "kept").unwrap();
        assert!(prune(&dir, std::time::Duration::from_secs(86400), false)
            .unwrap()
            .is_empty());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let gone = prune(&dir, std::time::Duration::ZERO, false).unwrap();
        assert_eq!(gone.len(), 6, "{gone:?}"); // 5, 6, 7 and three moved aside
        let left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        // notes.txt, and elsewhere/ (the planted link went, not its target).
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(fs::read_to_string(dir.join("notes.txt")).unwrap(), "kept");
        fs::remove_dir_all(&dir).unwrap();
    }
}
