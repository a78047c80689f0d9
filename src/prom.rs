//! Prometheus metrics for node_exporter's textfile collector:
//! with `failure.prometheus_dir` set, each node keeps `ml-container.prom`
//! there, rewritten when the node's last task of a step has ended.
//!
//! Counters must survive steps, so their values live in a state file,
//! `<dir>/.ml-container/state.json` (root's, in a root-only 0700
//! directory), read and rewritten under an exclusive lock
//! (`.ml-container/lock`, waited for at most [`LOCK_WAIT`]): concurrent
//! steps on a node each add their own. Both files are rewritten atomically
//! (a temporary file created with O_EXCL|O_NOFOLLOW in the same directory,
//! then renamed by the directory's descriptor): node_exporter never reads
//! half a file and a symlink planted at either name is never followed.
//!
//! Labels are bounded: `image` (the catalog's `name:tag`; an image given
//! by path is `path`; past [`MAX_IMAGES`] distinct images, `other`),
//! `exit_class` (a fixed set, [`exit_class`]), `outcome` (ok, failed). No
//! job id on a long-lived counter.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::renameat;
use nix::sys::stat::{mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};
use serde::{Deserialize, Serialize};

use crate::capture::{at, open_dir};
use crate::registry::{Pin, Source};
use crate::report::{signal_name, TaskOutcome};

/// The file node_exporter reads.
pub const FILE: &str = "ml-container.prom";
/// The state directory inside the textfile directory.
pub const STATE_DIR: &str = ".ml-container";
const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";
const STATE_CAP: u64 = 4 << 20;
/// How long a step waits for another step's update.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);
/// Distinct image labels kept; more become `other`.
pub const MAX_IMAGES: usize = 200;

/// What one step on one node adds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepSample {
    pub image: String,
    /// Each local task's [`exit_class`].
    pub tasks: Vec<&'static str>,
    pub oom_kills: u64,
    pub step_ms: u64,
    /// The plugin's node-side preparation (image check, runtime plan).
    pub prepare_ms: u64,
}

/// The `image` label of a step: `name:tag` from the catalog, the name of
/// an image found in the search directories (`<name>.sif`), `path` for an
/// image given as a path (unbounded names stay out of labels).
pub fn image_label(pin: &Pin) -> String {
    let label = match (&pin.source, &pin.name, &pin.tag) {
        (Source::Path, _, _) => "path".to_string(),
        (_, Some(n), Some(t)) => format!("{n}:{t}"),
        (_, Some(n), None) => n.clone(),
        (Source::Scan, None, _) => pin.reference.clone(),
        _ => "path".to_string(),
    };
    crate::jobtext::escape(&label, 128)
}

/// How a task ended, as a label value from a fixed set: `ok`, `exit_1`,
/// `exit_255` (the runtime's own failure code), `exit_other`, `oom` is
/// counted separately, `signal_SIGKILL` and the other named signals,
/// `signal_other`.
pub fn exit_class(t: &TaskOutcome) -> &'static str {
    match (t.exit_code, t.signal) {
        (_, Some(s)) => match signal_name(s) {
            "SIGHUP" => "signal_SIGHUP",
            "SIGINT" => "signal_SIGINT",
            "SIGQUIT" => "signal_SIGQUIT",
            "SIGILL" => "signal_SIGILL",
            "SIGABRT" => "signal_SIGABRT",
            "SIGBUS" => "signal_SIGBUS",
            "SIGFPE" => "signal_SIGFPE",
            "SIGKILL" => "signal_SIGKILL",
            "SIGSEGV" => "signal_SIGSEGV",
            "SIGPIPE" => "signal_SIGPIPE",
            "SIGTERM" => "signal_SIGTERM",
            "SIGUSR1" | "SIGUSR2" | "SIGALRM" | "SIGXCPU" => "signal_other",
            _ => "signal_other",
        },
        (Some(0), None) => "ok",
        (Some(1), None) => "exit_1",
        (Some(255), None) => "exit_255",
        _ => "exit_other",
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
struct ImageCounters {
    tasks_started: u64,
    tasks_failed: BTreeMap<String, u64>,
    oom_kills: u64,
    steps_ok: u64,
    steps_failed: u64,
    step_ms_sum: u64,
    last_step_ms: u64,
}

/// The counters, as kept between steps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    version: u32,
    images: BTreeMap<String, ImageCounters>,
    prepare_ms_sum: u64,
    prepare_count: u64,
    updated_ms: u64,
}

impl State {
    /// Adds one step's sample.
    pub fn add(&mut self, s: &StepSample, now_ms: u64) {
        self.version = 1;
        let key = if self.images.contains_key(&s.image) || self.images.len() < MAX_IMAGES {
            s.image.clone()
        } else {
            "other".to_string()
        };
        let c = self.images.entry(key).or_default();
        c.tasks_started += s.tasks.len() as u64;
        for class in s.tasks.iter().filter(|c| **c != "ok") {
            *c.tasks_failed.entry((*class).to_string()).or_default() += 1;
        }
        c.oom_kills += s.oom_kills;
        if s.tasks.iter().all(|c| *c == "ok") {
            c.steps_ok += 1;
        } else {
            c.steps_failed += 1;
        }
        c.step_ms_sum += s.step_ms;
        c.last_step_ms = s.step_ms;
        self.prepare_ms_sum += s.prepare_ms;
        self.prepare_count += 1;
        self.updated_ms = now_ms;
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut o = String::new();
        let secs = |ms: u64| format!("{}.{:03}", ms / 1000, ms % 1000);
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
            for (suffix_labels, v) in rows {
                let _ = writeln!(o, "{suffix_labels} {v}");
            }
        };
        let img = |i: &str| format!("image=\"{}\"", label_value(i));
        family(
            "ml_container_tasks_started_total",
            "counter",
            "Tasks of --ml-container steps that ran on this node, by image.",
            self.images
                .iter()
                .map(|(i, c)| {
                    (
                        format!("ml_container_tasks_started_total{{{}}}", img(i)),
                        c.tasks_started.to_string(),
                    )
                })
                .collect(),
        );
        family(
            "ml_container_tasks_failed_total",
            "counter",
            "Tasks of --ml-container steps that ended with a non-zero exit code or a signal, by \
             image and exit class.",
            self.images
                .iter()
                .flat_map(|(i, c)| {
                    c.tasks_failed.iter().map(move |(class, n)| {
                        (
                            format!(
                                "ml_container_tasks_failed_total{{{},exit_class=\"{}\"}}",
                                img(i),
                                label_value(class)
                            ),
                            n.to_string(),
                        )
                    })
                })
                .collect(),
        );
        family(
            "ml_container_oom_kills_total",
            "counter",
            "OOM kills during --ml-container steps on this node (the step's memory cgroup where \
             Slurm made one, else the node's counter), by image.",
            self.images
                .iter()
                .map(|(i, c)| {
                    (
                        format!("ml_container_oom_kills_total{{{}}}", img(i)),
                        c.oom_kills.to_string(),
                    )
                })
                .collect(),
        );
        family(
            "ml_container_steps_total",
            "counter",
            "--ml-container steps that ended on this node, by image and outcome (failed: a task \
             failed here).",
            self.images
                .iter()
                .flat_map(|(i, c)| {
                    [("ok", c.steps_ok), ("failed", c.steps_failed)]
                        .into_iter()
                        .map(move |(what, n)| {
                            (
                                format!(
                                    "ml_container_steps_total{{{},outcome=\"{what}\"}}",
                                    img(i)
                                ),
                                n.to_string(),
                            )
                        })
                })
                .collect(),
        );
        family(
            "ml_container_step_duration_seconds",
            "summary",
            "Time from the plugin's step setup on this node to its last task's end, by image.",
            self.images
                .iter()
                .flat_map(|(i, c)| {
                    [
                        (
                            format!("ml_container_step_duration_seconds_sum{{{}}}", img(i)),
                            secs(c.step_ms_sum),
                        ),
                        (
                            format!("ml_container_step_duration_seconds_count{{{}}}", img(i)),
                            (c.steps_ok + c.steps_failed).to_string(),
                        ),
                    ]
                })
                .collect(),
        );
        family(
            "ml_container_last_step_duration_seconds",
            "gauge",
            "Duration of the last --ml-container step that ended on this node, by image.",
            self.images
                .iter()
                .map(|(i, c)| {
                    (
                        format!("ml_container_last_step_duration_seconds{{{}}}", img(i)),
                        secs(c.last_step_ms),
                    )
                })
                .collect(),
        );
        family(
            "ml_container_launch_overhead_seconds",
            "summary",
            "What the plugin adds to a step's launch on this node (image check and runtime plan \
             in slurmstepd).",
            vec![
                (
                    "ml_container_launch_overhead_seconds_sum".to_string(),
                    secs(self.prepare_ms_sum),
                ),
                (
                    "ml_container_launch_overhead_seconds_count".to_string(),
                    self.prepare_count.to_string(),
                ),
            ],
        );
        family(
            "ml_container_metrics_updated_timestamp_seconds",
            "gauge",
            "When a --ml-container step last updated these metrics (unix time).",
            vec![(
                "ml_container_metrics_updated_timestamp_seconds".to_string(),
                secs(self.updated_ms),
            )],
        );
        o
    }
}

/// A label value escaped as the text format asks (backslash, quote,
/// newline).
fn label_value(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

/// Why the metrics were not updated. Messages end with the fix.
#[derive(Debug)]
pub enum PromError {
    Io { path: PathBuf, source: io::Error },
    Unsafe { path: PathBuf, why: String },
    Locked { path: PathBuf },
}

impl std::fmt::Display for PromError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PromError::Io { path, source } => write!(
                f,
                "{}: {source}; check failure.prometheus_dir",
                path.display()
            ),
            PromError::Unsafe { path, why } => write!(
                f,
                "{} {why}; fix its owner and mode (root's, not writable by group or others)",
                path.display()
            ),
            PromError::Locked { path } => write!(
                f,
                "{} stayed locked for {} s (another step's update); this step's figures are \
                 not counted",
                path.display(),
                LOCK_WAIT.as_secs()
            ),
        }
    }
}

/// Writes `text` as `name` in the open `dir` (path `dir_path`): a new
/// temporary file, then a rename by the directory's descriptor.
fn replace_in(dir_path: &Path, dir: &File, name: &str, text: &[u8], mode: u32) -> io::Result<()> {
    let tmp = format!(".{name}.{}.tmp", std::process::id());
    let fd = Some(dir.as_raw_fd());
    let _ = unlinkat(fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(at(dir, &tmp))?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(text)?;
        f.sync_all()?;
        renameat(fd, tmp.as_str(), fd, name).map_err(io::Error::from)
    })();
    if written.is_err() {
        let _ = unlinkat(fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    }
    written.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir_path.join(name).display())))
}

/// As root: adds `sample` to the node's counters under `dir` and rewrites
/// `ml-container.prom`. Returns the new state.
pub fn record(dir: &Path, sample: &StepSample) -> Result<State, PromError> {
    let io_at = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PromError::Io { path, source }
    };
    let d = open_dir(dir).map_err(io_at(dir))?;
    let m = d.metadata().map_err(io_at(dir))?;
    if m.mode() & 0o022 != 0 {
        return Err(PromError::Unsafe {
            path: dir.to_path_buf(),
            why: format!(
                "is writable by group or others (mode {:o})",
                m.mode() & 0o7777
            ),
        });
    }
    let sd_path = dir.join(STATE_DIR);
    match mkdirat(
        Some(d.as_raw_fd()),
        STATE_DIR,
        Mode::from_bits_truncate(0o700),
    ) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(io_at(&sd_path)(e.into())),
    }
    let sd = open_dir(&at(&d, STATE_DIR)).map_err(io_at(&sd_path))?;
    let sm = sd.metadata().map_err(io_at(&sd_path))?;
    if sm.uid() != 0 || sm.mode() & 0o077 != 0 {
        return Err(PromError::Unsafe {
            path: sd_path,
            why: format!(
                "is not root's alone (uid {}, mode {:o})",
                sm.uid(),
                sm.mode() & 0o7777
            ),
        });
    }
    let lock_path = sd_path.join(LOCK_FILE);
    let lock = crate::secure::open_lock_file(&at(&sd, LOCK_FILE)).map_err(io_at(&lock_path))?;
    match crate::secure::lock_within(&lock, LOCK_WAIT, Duration::from_millis(10)) {
        Ok(true) => {}
        Ok(false) => return Err(PromError::Locked { path: lock_path }),
        Err(e) => return Err(io_at(&lock_path)(e)),
    }
    let mut state = read_state(&sd).unwrap_or_default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    state.add(sample, now);
    let json = serde_json::to_vec(&state).map_err(|e| io_at(&sd_path)(io::Error::other(e)))?;
    replace_in(&sd_path, &sd, STATE_FILE, &json, 0o600).map_err(io_at(&sd_path))?;
    replace_in(dir, &d, FILE, state.render().as_bytes(), 0o644).map_err(io_at(dir))?;
    Ok(state)
}

/// The state file: root's regular file, never through a link, capped. A
/// damaged one starts the counters afresh (Prometheus sees a reset).
fn read_state(sd: &File) -> Option<State> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(at(sd, STATE_FILE))
        .ok()?;
    let m = f.metadata().ok()?;
    if !m.is_file() || m.uid() != 0 {
        return None;
    }
    let mut buf = Vec::new();
    (&mut f).take(STATE_CAP).read_to_end(&mut buf).ok()?;
    serde_json::from_slice(&buf).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(image: &str, tasks: Vec<&'static str>) -> StepSample {
        StepSample {
            image: image.into(),
            tasks,
            oom_kills: 0,
            step_ms: 1500,
            prepare_ms: 3,
        }
    }

    #[test]
    fn counters_add_up_and_render_with_help_and_type() {
        let mut s = State::default();
        s.add(&sample("demo:latest", vec!["ok", "exit_1"]), 1_000);
        s.add(&sample("demo:latest", vec!["ok", "ok"]), 2_000);
        s.add(&sample("py\"t\\h\non", vec!["signal_SIGKILL"]), 3_000);
        let t = s.render();
        assert!(
            t.contains("ml_container_tasks_started_total{image=\"demo:latest\"} 4\n"),
            "{t}"
        );
        assert!(
            t.contains(
                "ml_container_tasks_failed_total{image=\"demo:latest\",exit_class=\"exit_1\"} 1\n"
            ),
            "{t}"
        );
        assert!(t.contains("ml_container_steps_total{image=\"demo:latest\",outcome=\"ok\"} 1\n"));
        assert!(
            t.contains("ml_container_steps_total{image=\"demo:latest\",outcome=\"failed\"} 1\n")
        );
        assert!(t.contains("ml_container_step_duration_seconds_sum{image=\"demo:latest\"} 3.000\n"));
        assert!(
            t.contains("ml_container_launch_overhead_seconds_count 3\n"),
            "{t}"
        );
        assert!(t.contains("image=\"py\\\"t\\\\h\\non\""), "{t}");
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap_or_default();
            let family = name.trim_end_matches("_sum").trim_end_matches("_count");
            assert!(t.contains(&format!("# TYPE {family} ")), "{l}");
            assert!(t.contains(&format!("# HELP {family} ")), "{l}");
        }
    }

    #[test]
    fn image_labels_are_bounded() {
        let mut s = State::default();
        for i in 0..MAX_IMAGES + 10 {
            s.add(&sample(&format!("img{i}"), vec!["ok"]), 1);
        }
        assert_eq!(s.images.len(), MAX_IMAGES + 1);
        assert_eq!(s.images["other"].tasks_started, 10);
    }

    #[test]
    fn classes() {
        let t = |st| exit_class(&TaskOutcome::from_wait_status(0, 0, st));
        assert_eq!(t(0), "ok");
        assert_eq!(t(1 << 8), "exit_1");
        assert_eq!(t(255 << 8), "exit_255");
        assert_eq!(t(7 << 8), "exit_other");
        assert_eq!(t(libc::SIGKILL), "signal_SIGKILL");
        assert_eq!(t(libc::SIGUSR1), "signal_other");
    }

    /// As root: state kept across calls, concurrent writers all counted,
    /// a planted symlink never followed.
    #[test]
    fn record_persists_under_a_lock_and_never_follows_links() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let target = dir.join("target");
        fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, dir.join(FILE)).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let d = dir.clone();
                std::thread::spawn(move || record(&d, &sample("demo", vec!["ok", "exit_1"])))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
        let text = fs::read_to_string(dir.join(FILE)).unwrap();
        assert!(
            text.contains("ml_container_tasks_started_total{image=\"demo\"} 16\n"),
            "{text}"
        );
        let m = fs::symlink_metadata(dir.join(STATE_DIR)).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o700));
        // No temporary file left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        // A directory others may write to is refused.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(record(&dir, &sample("demo", vec!["ok"])).is_err());
    }
}
