//! One container per node per step (`runtime.share_namespaces`): the tasks
//! of a step on a node run in one Apptainer instance, so they share one
//! user namespace, one mount namespace and one image mount (one squashfuse
//! instead of one per task). Ranks in one user namespace can use
//! cross-memory attach (CMA), which MPI's shared-memory transports need for
//! their single-copy path; ranks in separate ones cannot.
//!
//! Why an instance and not `apptainer exec --sharens`: `--sharens` keys
//! the shared container on the parent's pid and makes the *first* process
//! its owner; when that process exits before another task joins, the
//! latecomer dies with 255 (docs/DESIGN.md, Apptainer facts). An instance
//! lives on its own until it is stopped, so its lifetime can be made to
//! cover every task of the step on the node, whatever order they start and
//! end in:
//!
//! - **start**: the first task's launcher (as the user) takes the lock in
//!   the step directory (`/run/slurm-ml-container/<job>.<step>.<node>/`,
//!   the user's, 0700, made by root before any task: [`crate::capture`])
//!   and runs `apptainer instance start [--nv] [--bind ...] IMAGE
//!   mlc-<job>-<step>`; the other tasks wait for the lock and find it up.
//!   `APPTAINER_CONFIGDIR` points into the step directory for every
//!   runtime call, so the instance's records live there (node-local,
//!   removed with the directory) and not in the user's home.
//! - **run**: each task runs `apptainer exec [--pwd DIR] instance://NAME
//!   CMD...` as the launcher's own child: its argv, environment, cwd,
//!   stdio, exit code, signals and cgroup stay the task's own.
//! - **stop**: the launcher of the node's last task to end stops the
//!   instance. A task whose launcher never got there (killed with SIGKILL,
//!   as the OOM killer or scancel's last step do) leaves it up: root, at
//!   the node's last `task_exit`, stops it as the user
//!   ([`stop_as_user`]), and removes the directory.
//! - **fallback**: when the instance cannot start (an old Apptainer, no
//!   FUSE, ...), the reason is written to the state file, each task runs
//!   its own `apptainer exec` as before, and root logs one line.
//!
//! Tasks per node < 2, Charliecloud and Singularity: one container per
//! task, as before.
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow};
use serde::{Deserialize, Serialize};

/// The state file in the step directory (the user's; root reads it only
/// through [`crate::capture::read_user_file`]).
pub const STATE_FILE: &str = "share.json";
/// The lock the node's launchers take around start and stop.
pub const LOCK_FILE: &str = "share.lock";
/// `APPTAINER_CONFIGDIR` for every runtime call of a shared step: the
/// instance's records (`instances/app/<host>/<user>/<name>/`).
pub const CONFIG_SUBDIR: &str = "apptainer";
pub const CONFIGDIR_ENV: &str = "APPTAINER_CONFIGDIR";
/// The most a state file may hold for root to read it.
pub const STATE_CAP: usize = 8 << 10;

/// How long a task waits for the lock and for `instance start`: a large
/// image without squashfuse is unpacked first, which takes minutes.
pub const START_LIMIT: Duration = Duration::from_secs(600);
/// How long `instance stop` may take before it is killed.
pub const STOP_LIMIT: Duration = Duration::from_secs(30);
/// The most of `instance start`'s stderr kept as the reason it failed.
const REASON_CAP: usize = 600;

/// The instance's name for a step: unique per node (the records live in
/// the step's own directory) and readable in `ps`.
pub fn instance_name(job: u32, step: u32) -> String {
    format!("mlc-{job}-{step}")
}

/// What a task's launcher needs to run in the step's shared container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// The step directory (the user's, 0700).
    pub dir: PathBuf,
    pub instance: String,
    /// `apptainer [--quiet] instance start [--nv] ... IMAGE NAME`.
    pub start: Vec<String>,
    /// `apptainer [--quiet] exec [--pwd DIR] ... instance://NAME`: the
    /// task's command follows.
    pub exec: Vec<String>,
    /// `apptainer [--quiet] instance stop NAME`.
    pub stop: Vec<String>,
    /// Tasks of the step on this node: the last of them stops it.
    pub tasks: u32,
}

impl Share {
    /// The value of [`CONFIGDIR_ENV`] for every runtime call.
    pub fn config_dir(&self) -> PathBuf {
        self.dir.join(CONFIG_SUBDIR)
    }
}

/// Where the shared container stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Nobody has tried to start it yet.
    #[default]
    New,
    Up,
    /// `instance start` failed: every task runs its own container.
    Failed,
    Stopped,
}

/// The state file: the phase, how many of the node's tasks have ended,
/// and why the start failed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub phase: Phase,
    #[serde(default)]
    pub done: u32,
    #[serde(default)]
    pub reason: String,
    /// Milliseconds `instance start` took.
    #[serde(default)]
    pub start_ms: u64,
}

impl State {
    pub fn parse(bytes: &[u8]) -> Option<State> {
        serde_json::from_slice(bytes).ok()
    }
}

/// Why a task did not join the shared container (it then runs its own).
#[derive(Debug)]
pub enum ShareError {
    Io {
        path: PathBuf,
        source: io::Error,
    },
    /// The lock stayed taken for [`START_LIMIT`].
    Locked {
        path: PathBuf,
    },
    /// An earlier task found the instance would not start.
    Failed {
        reason: String,
    },
    /// The instance was already stopped (a task counted twice).
    Stopped,
}

impl std::fmt::Display for ShareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShareError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            ShareError::Locked { path } => write!(
                f,
                "{} stayed locked for {} s; the task runs in a container of its own",
                path.display(),
                START_LIMIT.as_secs()
            ),
            ShareError::Failed { reason } => write!(
                f,
                "the step's shared container did not start ({reason}); the task runs in a \
                 container of its own"
            ),
            ShareError::Stopped => write!(
                f,
                "the step's shared container was already stopped; the task runs in a \
                 container of its own"
            ),
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ShareError + '_ {
    move |source| ShareError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The lock, held until dropped, and the state read under it.
struct Locked {
    /// Holds the flock until dropped.
    _lock: File,
    state_path: PathBuf,
    state: State,
}

impl Locked {
    fn take(share: &Share) -> Result<Locked, ShareError> {
        let path = share.dir.join(LOCK_FILE);
        let lock = crate::secure::open_lock_file(&path).map_err(io_at(&path))?;
        match crate::secure::lock_within(&lock, START_LIMIT, Duration::from_millis(5)) {
            Ok(true) => {}
            Ok(false) => return Err(ShareError::Locked { path }),
            Err(e) => return Err(io_at(&path)(e)),
        }
        let state_path = share.dir.join(STATE_FILE);
        let state = match std::fs::read(&state_path) {
            Ok(b) => State::parse(&b).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io_at(&state_path)(e)),
        };
        Ok(Locked {
            _lock: lock,
            state_path,
            state,
        })
    }

    fn save(&self) -> Result<(), ShareError> {
        let json = serde_json::to_vec(&self.state).unwrap_or_default();
        let tmp = self.state_path.with_extension("tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io_at(&tmp))?;
        f.write_all(&json).map_err(io_at(&tmp))?;
        std::fs::rename(&tmp, &self.state_path).map_err(io_at(&self.state_path))
    }
}

/// A runtime call of a shared step, with [`CONFIGDIR_ENV`] set.
pub fn command(share: &Share, argv: &[String]) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).env(CONFIGDIR_ENV, share.config_dir());
    cmd
}

/// Signals held (blocked) from the moment `instance start` runs until its
/// outcome is saved: Slurm's SIGTERM (scancel) then cannot end the
/// launcher between an instance coming up and its record, which would
/// leave an instance nobody knows of. When dropped, the old mask is back
/// and a pending signal acts as it would have. (The child is spawned
/// before the mask is set: it inherits the mask.)
#[derive(Debug)]
pub struct Held(Option<SigSet>);

impl Held {
    fn block(set: Option<&SigSet>) -> Held {
        let Some(set) = set else { return Held(None) };
        let mut old = SigSet::empty();
        match sigprocmask(SigmaskHow::SIG_BLOCK, Some(set), Some(&mut old)) {
            Ok(()) => Held(Some(old)),
            Err(_) => Held(None),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
        }
    }
}

/// Runs `argv` bounded by `limit`; Ok, or the end of its stderr. `hold`:
/// signals blocked once the child exists, until the returned [`Held`] is
/// dropped.
fn run_bounded(
    share: &Share,
    argv: &[String],
    limit: Duration,
    hold: Option<&SigSet>,
) -> (Result<(), String>, Held) {
    if argv.is_empty() {
        return (Err("no command".into()), Held(None));
    }
    let spawned = command(share, argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return (Err(format!("cannot run {}: {e}", argv[0])), Held(None)),
    };
    // Before the reader thread: it inherits the mask, and a signal for the
    // process must not find a thread that would take its default action.
    let held = Held::block(hold);
    // The runtime's stderr is small (a few lines); read it on a thread so a
    // chatty one cannot block on a full pipe while we wait.
    let err = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut e) = err {
            let _ = (&mut e).take(64 << 10).read_to_end(&mut out);
        }
        out
    });
    let status = crate::probe::wait_limited(&mut child, limit);
    let text = reader.join().unwrap_or_default();
    let r = match status {
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(reason_from(&text, &format!("{s}"))),
        None => Err(format!("did not finish within {} s", limit.as_secs())),
    };
    (r, held)
}

/// The last lines of a runtime's stderr, capped, as one line.
fn reason_from(stderr: &[u8], status: &str) -> String {
    let text = String::from_utf8_lossy(stderr);
    let joined: String = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" / ");
    let mut r = if joined.is_empty() {
        status.to_string()
    } else {
        format!("{status}: {joined}")
    };
    if r.len() > REASON_CAP {
        let mut cut = r.len() - REASON_CAP;
        while !r.is_char_boundary(cut) {
            cut += 1;
        }
        r = format!("...{}", &r[cut..]);
    }
    r
}

/// Before a task runs, as the user: starts the step's container if no
/// task on this node has yet, and returns the prefix that runs the task's
/// command in it. An error means: run in a container of its own.
pub fn join(share: &Share, hold: Option<&SigSet>) -> Result<Vec<String>, ShareError> {
    let cfg = share.config_dir();
    match std::fs::create_dir(&cfg) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_at(&cfg)(e)),
    }
    let mut locked = Locked::take(share)?;
    match locked.state.phase {
        Phase::Up => Ok(share.exec.clone()),
        Phase::Failed => Err(ShareError::Failed {
            reason: locked.state.reason.clone(),
        }),
        Phase::Stopped => Err(ShareError::Stopped),
        Phase::New => {
            let began = Instant::now();
            let (outcome, held) = run_bounded(share, &share.start, START_LIMIT, hold);
            locked.state.start_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(0);
            let r = match outcome {
                Ok(()) => {
                    locked.state.phase = Phase::Up;
                    Ok(share.exec.clone())
                }
                Err(reason) => {
                    locked.state.phase = Phase::Failed;
                    locked.state.reason = reason.clone();
                    Err(ShareError::Failed { reason })
                }
            };
            let saved = locked.save();
            // Recorded and unlocked first, then a held signal may act.
            drop(locked);
            drop(held);
            saved.and(r)
        }
    }
}

/// After a task's command ended, as the user: counts it, and the node's
/// last task stops the container. Errors are left for root to see.
pub fn leave(share: &Share) -> Result<Phase, ShareError> {
    let mut locked = Locked::take(share)?;
    locked.state.done = locked.state.done.saturating_add(1);
    if locked.state.done >= share.tasks && locked.state.phase == Phase::Up {
        match run_bounded(share, &share.stop, STOP_LIMIT, None).0 {
            Ok(()) => locked.state.phase = Phase::Stopped,
            Err(reason) => locked.state.reason = format!("instance stop: {reason}"),
        }
    }
    locked.save()?;
    Ok(locked.state.phase)
}

/// Where `setpriv` (util-linux) is looked up: root runs the stop as the
/// job's user through it.
const SETPRIV: &[&str] = &["/usr/bin/setpriv", "/bin/setpriv"];

/// As root, at the node's last `task_exit`, when the state says the
/// container is still up (a task's launcher was killed before it could
/// count itself): `apptainer instance stop NAME` as the job's user
/// (`setpriv --reuid --regid --init-groups`), bounded by [`STOP_LIMIT`].
/// The name and the directory are root's own; nothing is read from the
/// user's files but the phase.
pub fn stop_as_user(
    runtime: &Path,
    dir: &Path,
    instance: &str,
    uid: u32,
    gid: u32,
    home: &Path,
) -> Result<(), String> {
    let setpriv = SETPRIV
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .ok_or_else(|| format!("setpriv not found in {}", SETPRIV.join(", ")))?;
    let mut child = Command::new(setpriv)
        .args([
            "--reuid",
            &uid.to_string(),
            "--regid",
            &gid.to_string(),
            "--init-groups",
            "--",
        ])
        .arg(runtime)
        .args(["--quiet", "instance", "stop", instance])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", home)
        .env(CONFIGDIR_ENV, dir.join(CONFIG_SUBDIR))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", setpriv.display()))?;
    match crate::probe::wait_limited(&mut child, STOP_LIMIT) {
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(format!("instance stop {s}")),
        None => Err(format!(
            "instance stop did not finish within {} s",
            STOP_LIMIT.as_secs()
        )),
    }
}

/// As root, at the node's last `task_exit` of a step whose tasks may have
/// shared a container: stops it if it is still up, and returns the one
/// line for the slurmd log (None when the step shared nothing).
pub fn finish(
    dir: &crate::capture::StepDir,
    runtime: &Path,
    instance: &str,
    gid: u32,
) -> Option<(log::Level, String)> {
    let esc = |s: &str| crate::jobtext::escape(s, REASON_CAP);
    let Some(f) = dir.read(STATE_FILE, STATE_CAP) else {
        // No task recorded a start: none tried, or the step was cancelled
        // while the first one started it (it may be up). Stopping what is
        // not there only fails.
        return match stop_logged(dir, runtime, instance, gid) {
            Ok(()) => Some((
                log::Level::Warn,
                format!(
                    "shared container {instance} was up but never recorded (the step was \
                     stopped while it started): stopped it as the user"
                ),
            )),
            Err(_) => None,
        };
    };
    let Some(state) = State::parse(&f.bytes) else {
        let how = match stop_logged(dir, runtime, instance, gid) {
            Ok(()) => "stopped it as the user".to_string(),
            Err(e) => format!("could not stop it: {}", esc(&e)),
        };
        return Some((
            log::Level::Warn,
            format!("shared container {instance}: unreadable state file; {how}"),
        ));
    };
    Some(match state.phase {
        Phase::Stopped => (
            log::Level::Info,
            format!(
                "shared container {instance}: {} task(s) ran in one container (started in {} ms), stopped by the last one",
                state.done, state.start_ms
            ),
        ),
        Phase::Failed => (
            {
                // A start ended by a signal (scancel) may have left one up.
                let _ = stop_logged(dir, runtime, instance, gid);
                log::Level::Warn
            },
            format!(
                "shared container {instance} did not start ({}): the step's tasks on this node ran one container each",
                esc(&state.reason)
            ),
        ),
        Phase::Up | Phase::New => {
            let how = match stop_logged(dir, runtime, instance, gid) {
                Ok(()) => "stopped it as the user".to_string(),
                Err(e) => format!("could not stop it: {}", esc(&e)),
            };
            (
                log::Level::Warn,
                format!(
                    "shared container {instance} was still up when the node's tasks had ended ({} counted themselves; a launcher was killed): {how}",
                    state.done
                ),
            )
        }
    })
}

fn stop_logged(
    dir: &crate::capture::StepDir,
    runtime: &Path,
    instance: &str,
    gid: u32,
) -> Result<(), String> {
    let home = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(dir.uid))
        .ok()
        .flatten()
        .map_or_else(|| PathBuf::from("/"), |u| u.dir);
    stop_as_user(runtime, &dir.path, instance, dir.uid, gid, &home)
}

#[cfg(test)]
mod tests;
