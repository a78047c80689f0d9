//! The metrics log (one line per finished task) and the syslog line per
//! failure.
#![forbid(unsafe_code)]

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::{signal_name, TaskOutcome};
use crate::jobtext;

/// The longest metrics line, newline included: a 120 KB image name must
/// not add 120 KB per task to the log.
pub const METRICS_LINE_CAP: usize = 512;

/// A job string as one metrics field: escaped, no white space (the line is
/// space-separated `KEY=VALUE`), at most `cap` bytes.
fn metrics_field(s: &str, cap: usize) -> String {
    jobtext::escape(s, cap.max(1)).replace(' ', "_")
}

/// One metrics line (`JOB_ID= STEP_ID= NODE= RANK= IMAGE= EXIT_CODE= ...`),
/// at most [`METRICS_LINE_CAP`] bytes: the image, the only field a job
/// chooses, gets what the fixed fields leave.
pub fn metrics_line(
    job: u32,
    step: u32,
    node: &str,
    image: &str,
    t: &TaskOutcome,
    duration_ms: u128,
) -> String {
    let node = metrics_field(node, 64);
    let exit = t.exit_code.map_or("-".to_string(), |c| c.to_string());
    let signal = t
        .signal
        .map_or("-".to_string(), |s| signal_name(s).to_string());
    let line = |image: &str| {
        format!(
            "JOB_ID={job} STEP_ID={step} NODE={node} RANK={} IMAGE={image} EXIT_CODE={exit} SIGNAL={signal} DURATION_MS={duration_ms}\n",
            t.rank,
        )
    };
    let fixed = line("").len();
    line(&metrics_field(
        image,
        METRICS_LINE_CAP.saturating_sub(fixed),
    ))
}

/// Appends `line` with one O_APPEND write, not following a symlink; the
/// log must be a regular file owned by root (a FIFO planted there would
/// block root in open, another user's file would receive root's lines).
pub fn append_line(path: &Path, line: &str) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    let m = f.metadata()?;
    if !m.file_type().is_file() || m.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::other(format!(
            "{} is not a regular file owned by this process's user (uid {}, {:?}): not \
             appending; remove it",
            path.display(),
            m.uid(),
            m.file_type()
        )));
    }
    f.write_all(line.as_bytes())
}

/// One line to the local syslog (/dev/log, facility user, priority err);
/// escaped and capped, the message carries job strings.
pub fn syslog(msg: &str) {
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let msg = jobtext::escape(msg, 1024);
    let _ = sock.send_to(format!("<11>ml-container: {msg}").as_bytes(), "/dev/log");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_format() {
        let l = metrics_line(
            5,
            0,
            "n2",
            "py torch",
            &TaskOutcome::from_wait_status(3, 1, 7 << 8),
            12,
        );
        assert_eq!(l, "JOB_ID=5 STEP_ID=0 NODE=n2 RANK=3 IMAGE=py_torch EXIT_CODE=7 SIGNAL=- DURATION_MS=12\n");
        // A forged name: one line, escaped, capped.
        let huge = format!("tiny:1.0\nJOB_ID=666 FAKE{}", "x".repeat(120_000));
        let l = metrics_line(
            u32::MAX,
            u32::MAX,
            "n2",
            &huge,
            &TaskOutcome::from_wait_status(u32::MAX, 1, libc::SIGKILL),
            u128::MAX,
        );
        assert!(l.len() <= METRICS_LINE_CAP, "{} bytes", l.len());
        assert_eq!(l.matches('\n').count(), 1, "{l}");
        assert!(l.ends_with(&format!("DURATION_MS={}\n", u128::MAX)), "{l}");
        assert!(l.contains("IMAGE=tiny:1.0\\nJOB_ID=666_FAKExxx"), "{l}");
    }
}
