//! `ml-container-launch`: the process between slurmstepd and the container
//! runtime in every containerized task.
//!
//! The plugin makes this the task's `argv[0]` and leaves the runtime prefix
//! and the real command in ML_CONTAINER_LAUNCH; the task's other arguments
//! arrive as ours. Running here, after slurmstepd's own exec, keeps
//! TaskProlog, TMPDIR, rlimits and cgroup placement intact (nothing is
//! exec'd from the plugin's task_init).
//!
//! Why a process of our own stays instead of exec'ing the runtime: when the
//! task fails, it can still speak to the user on the task's own stderr —
//! one line that names the failure report (srun itself only says "Exited
//! with exit code N"), and, where the runtime exits 255 because a bare
//! command name is not in the image (`python` in an image with only
//! `python3`), which name is. Otherwise it is transparent:
//! - stdin and stdout are the runtime's own (inherited, never copied), so
//!   the job's output is byte for byte what it was; so is stderr, unless
//!   the plugin asks for its tail (`failure.capture_stderr`) and it is not
//!   a terminal: then the runtime writes into a pipe, and every byte read
//!   from it is written to the task's stderr at once, in the same chunks,
//!   while the last N bytes are kept. When the task fails they are left in
//!   the step directory for root's report (`capture.rs`). A write to our
//!   stderr that fails (EPIPE) closes the pipe, so the payload sees its
//!   stderr closed as it would have. Output still written by a background
//!   process of the task after the runtime has exited is copied for at
//!   most `DRAIN_LIMIT`;
//! - the task ends as the runtime did: the same exit code, or death by the
//!   same signal (re-raised on this process, core dumps off);
//! - signals: Slurm signals every process of a step (proctrack's
//!   container: scancel, time limits, srun's Ctrl-C, `--signal`), so one
//!   sent by slurmstepd (our parent) already reached the runtime and is not
//!   sent again; one from anyone else (`kill` of the task's pid) is passed
//!   on to the runtime.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::process::{Child, ChildStderr, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::{getppid, Pid};

use slurm_ml_container::launch::{
    command_alternatives, failure_notice, missing_command_hint, Ended, LaunchSpec, StderrCapture,
    LAUNCH_ENV,
};
use slurm_ml_container::share::{self, ShareError};

/// Signals passed on to the runtime when someone other than slurmstepd
/// sends them to this process. SIGCHLD is waited for, not passed on.
const FORWARDED: [Signal; 13] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
    Signal::SIGCONT,
    Signal::SIGTSTP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGWINCH,
    Signal::SIGXCPU,
];

/// How long stderr is still copied after the runtime has exited (a
/// background process of the task may hold it open).
const DRAIN_LIMIT: Duration = Duration::from_secs(1);

/// How long the "is the command in the image" probe may take.
const PROBE_LIMIT: Duration = Duration::from_secs(15);

fn main() -> ExitCode {
    let spec = match std::env::var(LAUNCH_ENV)
        .map_err(|e| e.to_string())
        .and_then(|t| LaunchSpec::decode(&t))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "ml-container-launch: {LAUNCH_ENV} is missing or invalid ({e}); this program is \
                 started by the ml-container Slurm plugin, not by hand"
            );
            return ExitCode::from(127);
        }
    };
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    // In the step's shared container when the plugin asked for one and it
    // is (or can be made) up; otherwise in a container of our own.
    let joined = spec
        .share
        .as_ref()
        .and_then(|s| match share::join(s, Some(&held_signals())) {
            Ok(exec) => Some((exec, s.config_dir())),
            Err(e) => {
                // A start that failed is in the state file, for root's log;
                // anything else only we can tell.
                if matches!(e, ShareError::Io { .. } | ShareError::Locked { .. }) {
                    let _ = writeln!(std::io::stderr(), "ml-container: {e}");
                }
                None
            }
        });
    let (prefix, config_dir) = match &joined {
        Some((exec, dir)) => (exec.as_slice(), Some(dir.as_path())),
        None => (spec.prefix.as_slice(), None),
    };
    let outcome = run(&spec, prefix, config_dir, &args);
    // Counted whether it joined or not: the node's last task stops it.
    if let Some(s) = &spec.share {
        if let Err(e) = share::leave(s) {
            let _ = writeln!(std::io::stderr(), "ml-container: {e}");
        }
    }
    let (ended, mask, tail) = match outcome {
        Ok(e) => e,
        Err(e) => {
            eprintln!("ml-container-launch: cannot run {}: {e}", prefix[0]);
            return ExitCode::from(127);
        }
    };
    // The probe below runs with the task's own signal mask, as the runtime did.
    let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&mask), None);
    if let (Some(c), Some(tail), false) = (&spec.capture, tail, ended == Ended::Code(0)) {
        leave_tail(c, &tail);
    }
    if let (Some(label), Some(line)) = (
        &spec.task,
        spec.task.as_ref().and_then(|l| failure_notice(l, ended)),
    ) {
        if ended == Ended::Code(255) && spec.in_image && spec.can_probe {
            if let Some(hint) = probe_command(&spec, &label.image) {
                let _ = writeln!(std::io::stderr(), "{hint}");
            }
        }
        let _ = writeln!(std::io::stderr(), "{line}");
    }
    end_as(ended)
}

/// The last `cap` bytes written to the task's stderr.
struct Tail {
    cap: usize,
    bytes: VecDeque<u8>,
    /// When the last byte arrived: a failing program's last words (a
    /// traceback) come right before it ends, while the runtime's own
    /// teardown after it takes a varying while.
    last: Option<std::time::SystemTime>,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        let chunk = &chunk[chunk.len().saturating_sub(self.cap)..];
        let over = (self.bytes.len() + chunk.len()).saturating_sub(self.cap);
        self.bytes.drain(..over.min(self.bytes.len()));
        self.bytes.extend(chunk);
        self.last = Some(std::time::SystemTime::now());
    }
}

/// Leaves the tail for the plugin (root reads it with O_NOFOLLOW, as the
/// job's own file): created without following a link, 0600. Its mtime is
/// when the last byte arrived.
fn leave_tail(c: &StderrCapture, tail: &Tail) {
    use std::os::unix::fs::OpenOptionsExt;
    let (a, b) = tail.bytes.as_slices();
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&c.file)
        .and_then(|mut f| {
            f.write_all(a)?;
            f.write_all(b)?;
            match tail.last {
                Some(t) => f.set_modified(t),
                None => Ok(()),
            }
        });
}

/// Copies one chunk from the runtime's stderr pipe to ours. False at the
/// pipe's end, or when our stderr is closed (the pipe is then closed too).
fn copy_chunk(pipe: &mut ChildStderr, tail: &mut Tail, buf: &mut [u8]) -> bool {
    match pipe.read(buf) {
        Ok(0) => false,
        Ok(n) => {
            tail.push(&buf[..n]);
            std::io::stderr().write_all(&buf[..n]).is_ok()
        }
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => true,
        Err(_) => false,
    }
}

/// Runs the runtime and waits for it, passing on the signals that did not
/// already reach it, and copying its stderr when asked to.
fn run(
    spec: &LaunchSpec,
    prefix: &[String],
    config_dir: Option<&std::path::Path>,
    args: &[OsString],
) -> std::io::Result<(Ended, SigSet, Option<Tail>)> {
    let mask = held_signals();
    let capture = spec
        .capture
        .as_ref()
        .filter(|c| c.bytes > 0 && !std::io::stderr().is_terminal());
    // The child first, then the mask: a child inherits the signal mask, and
    // the payload must start with the one slurmstepd gave the task. A
    // signal in the few microseconds between the two gets its default
    // action here, as it would have without us; a SIGCHLD then is not
    // lost, as the loop asks for the child's status before waiting.
    let mut cmd = Command::new(&prefix[0]);
    cmd.args(&prefix[1..])
        .arg(&spec.command)
        .args(args)
        .env_remove(LAUNCH_ENV);
    if let Some(d) = config_dir {
        cmd.env(share::CONFIGDIR_ENV, d);
    }
    if capture.is_some() {
        cmd.stderr(Stdio::piped());
    }
    let mut child = cmd.spawn()?;
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    let child_pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let parent = getppid();
    let mut pipe = child.stderr.take();
    let mut tail = capture.map(|c| Tail {
        cap: c.bytes as usize,
        bytes: VecDeque::new(),
        last: None,
    });
    let mut buf = vec![0u8; if pipe.is_some() { 64 << 10 } else { 0 }];
    let mut exited: Option<(Ended, Instant)> = None;
    loop {
        if exited.is_none() {
            if let Some(status) = child.try_wait()? {
                exited = Some((ended(status), Instant::now() + DRAIN_LIMIT));
            }
        }
        let timeout = match exited {
            Some((e, deadline)) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if pipe.is_none() || left.is_zero() {
                    return Ok((e, mask, tail));
                }
                PollTimeout::try_from(left).unwrap_or(PollTimeout::ZERO)
            }
            None => PollTimeout::NONE,
        };
        let (sig_ready, pipe_ready) = {
            let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
            if let Some(p) = &pipe {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), fds.get(1).is_some_and(ready))
        };
        if pipe_ready {
            if let (Some(p), Some(t)) = (pipe.as_mut(), tail.as_mut()) {
                if !copy_chunk(p, t, &mut buf) {
                    pipe = None;
                }
            }
        }
        if !sig_ready {
            continue;
        }
        let Some(info) = signals.read_signal()? else {
            continue;
        };
        let Ok(sig) = Signal::try_from(i32::try_from(info.ssi_signo).unwrap_or(0)) else {
            continue;
        };
        let from_slurmstepd = i32::try_from(info.ssi_pid).is_ok_and(|p| p == parent.as_raw());
        if sig != Signal::SIGCHLD && !from_slurmstepd && exited.is_none() {
            let _ = kill(child_pid, sig);
        }
    }
}

/// The signals this process takes through its signalfd while a child of
/// its own runs (and holds while the shared container starts).
fn held_signals() -> SigSet {
    let mut mask = SigSet::empty();
    for s in FORWARDED {
        mask.add(s);
    }
    mask.add(Signal::SIGCHLD);
    mask
}

fn ended(status: ExitStatus) -> Ended {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => Ended::Code(c),
        (None, Some(s)) => Ended::Signal(s),
        (None, None) => Ended::Code(255),
    }
}

/// Ends this process as the runtime ended.
fn end_as(ended: Ended) -> ExitCode {
    match ended {
        Ended::Code(c) => ExitCode::from(u8::try_from(c & 0xff).unwrap_or(255)),
        Ended::Signal(s) => {
            // The runtime dumped core if it was going to; this process's
            // own image is of no use to anyone.
            let _ = setrlimit(Resource::RLIMIT_CORE, 0, 0);
            // The default action of the signal, with the disposition reset
            // first (the standard library ignores SIGPIPE in every Rust
            // program) and the signal unblocked: ends the process as the
            // runtime ended, for every signal a process can die of.
            let _ = signal_hook::low_level::emulate_default_handler(s);
            ExitCode::from(u8::try_from((128 + s) & 0xff).unwrap_or(255))
        }
    }
}

/// After the runtime exited 255 for a bare command name: asks the image's
/// own shell which of the command and its alternatives its PATH has, and
/// returns the hint when the command is not there.
fn probe_command(spec: &LaunchSpec, image: &str) -> Option<String> {
    let mut names = vec![spec.command.clone()];
    names.extend(command_alternatives(&spec.command));
    // The names are arguments of the script, never part of its text.
    let mut child = Command::new(&spec.prefix[0])
        .args(&spec.prefix[1..])
        .args([
            "/bin/sh",
            "-c",
            "for c do command -v -- \"$c\" || echo -; done",
            "sh",
        ])
        .args(&names)
        .env_remove(LAUNCH_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let out = wait_bounded(&mut child)?;
    let text = String::from_utf8_lossy(&out);
    let found: Vec<&str> = text.lines().map(str::trim).collect();
    if found.len() != names.len() || found[0] != "-" {
        // The command is there (it failed for another reason), or the
        // image has no shell to ask: nothing to add.
        return None;
    }
    let alternatives: Vec<String> = found[1..]
        .iter()
        .filter(|p| p.starts_with('/'))
        .map(|p| p.to_string())
        .collect();
    Some(missing_command_hint(&spec.command, image, &alternatives))
}

/// The probe's output, or None if it failed or took longer than
/// [`PROBE_LIMIT`] (then it is killed).
fn wait_bounded(child: &mut Child) -> Option<Vec<u8>> {
    use std::io::Read;
    slurm_ml_container::probe::wait_limited(child, PROBE_LIMIT)?;
    let mut out = Vec::new();
    child
        .stdout
        .take()?
        .take(64 << 10)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}
