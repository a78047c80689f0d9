//! The contract between the plugin and `ml-container-launch`: what the
//! task runs ([`LaunchSpec`], in [`LAUNCH_ENV`]), how the command the user
//! typed is looked up in the image, and the lines the launcher prints when
//! a task fails.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

/// Every containerized task's `argv[0]` becomes `ml-container-launch`, which
/// finds here what to run (see that program's doc for why a process of our
/// own stays between slurmstepd and the runtime).
pub const LAUNCH_ENV: &str = "ML_CONTAINER_LAUNCH";

/// What `ml-container-launch` runs: `prefix`, then `command` (the task's
/// `argv[0]`, looked up in the image when it is a bare name), then its own
/// arguments (the task's argv[1..]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LaunchSpec {
    pub prefix: Vec<String>,
    pub command: String,
    /// `command` is a bare name that the runtime looks up in the image's
    /// PATH (so a 255 from the runtime may mean "not in the image").
    #[serde(default)]
    pub in_image: bool,
    /// Whether the runtime can run a probe command in the image
    /// (Apptainer, Singularity: `<prefix> sh -c ...`).
    #[serde(default)]
    pub can_probe: bool,
    /// Who this task is, for the line printed when it fails.
    #[serde(default)]
    pub task: Option<TaskLabel>,
    /// Keep the tail of the task's stderr for its failure report.
    #[serde(default)]
    pub capture: Option<StderrCapture>,
    /// Run in the step's shared container (`runtime.share_namespaces`).
    #[serde(default)]
    pub share: Option<crate::share::Share>,
}

/// Where and how much of a task's stderr the launcher keeps: it copies
/// every byte through as it arrives and, when the task fails, leaves the
/// last `bytes` in `file` (in the step directory root made for the user,
/// [`crate::capture`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StderrCapture {
    pub file: PathBuf,
    pub bytes: u32,
}

/// The task as the failure notice names it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TaskLabel {
    pub job: u32,
    pub step: u32,
    pub rank: u32,
    pub node: String,
    /// The image's `name:tag` (or what the user typed).
    pub image: String,
}

impl LaunchSpec {
    pub fn encode(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    pub fn decode(text: &str) -> Result<LaunchSpec, String> {
        let spec: LaunchSpec = toml::from_str(text).map_err(|e| e.message().to_string())?;
        if spec.prefix.is_empty() {
            return Err("empty prefix".to_string());
        }
        Ok(spec)
    }
}

/// How a task's runtime process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    Code(i32),
    Signal(i32),
}

/// The name of a signal a task may end by, for people ("SIGSEGV").
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        _ => "signal",
    }
}

/// The one line a failed task prints on its own stderr, so the user learns
/// that a report exists (srun only says "Exited with exit code N"). None
/// for success, and for the signals Slurm sends to every task of a step
/// it stops (scancel, time limit, srun's Ctrl-C, another task's failure
/// under --kill-on-bad-exit): those tasks did not fail on their own.
pub fn failure_notice(label: &TaskLabel, ended: Ended) -> Option<String> {
    let how = match ended {
        Ended::Code(0) => return None,
        Ended::Signal(s)
            if [libc::SIGTERM, libc::SIGKILL, libc::SIGINT, libc::SIGHUP].contains(&s) =>
        {
            return None
        }
        Ended::Code(c) => format!("exited with code {c}"),
        Ended::Signal(s) => format!("was killed by {}", signal_name(s)),
    };
    Some(format!(
        "ml-container: job {} step {} rank {} (image {}) {how} on {}; the failure report: \
         ml-container diagnose {} (on {})",
        label.job, label.step, label.rank, label.image, label.node, label.job, label.node
    ))
}

/// Other names the user may have meant for a command: `python` and
/// `python3`, `pip` and `pip3`, in both directions.
pub fn command_alternatives(command: &str) -> Vec<String> {
    let stem = command.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
    let mut out = Vec::new();
    if stem != command && !stem.is_empty() {
        out.push(stem.to_string());
    }
    if !command.ends_with(|c: char| c.is_ascii_digit()) {
        out.push(format!("{command}3"));
    }
    out
}

/// The line printed when the runtime exited 255 and `command` was not
/// found in the image: `found` holds the paths that the image's PATH gave
/// for the alternatives (empty when none is there).
pub fn missing_command_hint(command: &str, image: &str, found: &[String]) -> String {
    let mut line = format!(
        "ml-container: '{}' is not in image {image} (looked up in the image's PATH, not the \
         host's)",
        command.escape_default()
    );
    match found.first() {
        Some(alt) => {
            let name = alt.rsplit('/').next().unwrap_or(alt);
            line.push_str(&format!("; did you mean {name} ({alt})?"));
        }
        None => line.push_str("; give its full path in the image, or use an image that has it"),
    }
    line
}

/// The command the user typed, found in srun's own argv (recorded by the
/// plugin in srun): the element just before the task's arguments. `None`
/// when it cannot be told apart.
pub fn typed_command(srun_argv: &[String], task_argv: &[String]) -> Option<String> {
    let args = task_argv.get(1..)?;
    if srun_argv.len() < args.len() + 2 {
        return None;
    }
    (1..=srun_argv.len() - args.len() - 1)
        .rev()
        .find(|&p| srun_argv.get(p + 1..p + 1 + args.len()) == Some(args))
        .and_then(|p| srun_argv.get(p).cloned())
}

/// What to run as the task's `argv[0]` inside the container: a command the
/// user typed as a bare name (`python`) is looked up in the image's PATH,
/// not at the host path srun resolved it to (srun(1), "EXECUTABLE PATH
/// RESOLUTION"). A path the user typed stays.
pub fn container_argv0(typed: Option<&str>, resolved: &str) -> Option<String> {
    let typed = typed?;
    if typed.contains('/') || typed.is_empty() {
        return None;
    }
    let base = Path::new(resolved).file_name()?.to_string_lossy();
    (base == typed).then(|| typed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_spec_round_trip() {
        let spec = LaunchSpec {
            prefix: vec!["/usr/bin/ch-run".into(), "/img.sqfs".into(), "--".into()],
            command: "python".into(),
            in_image: true,
            can_probe: false,
            task: Some(label()),
            capture: Some(StderrCapture {
                file: "/run/slurm-ml-container/6.0.n1/stderr.1".into(),
                bytes: 65536,
            }),
            share: crate::launch::Plan {
                kind: crate::config::RuntimeKind::Apptainer,
                runtime: "/usr/bin/apptainer".into(),
                image: "/img.sif".into(),
                nv: false,
                binds: Vec::new(),
                workdir: None,
                writable_tmpfs: false,
                extra_args: Vec::new(),
                quiet: true,
            }
            .shared(
                std::path::Path::new("/run/slurm-ml-container/6.0.n1"),
                "mlc-6-0",
                2,
            ),
        };
        assert!(spec.share.is_some());
        assert_eq!(LaunchSpec::decode(&spec.encode()).unwrap(), spec);
        // A spec of an older plugin (only prefix and command) still runs.
        let old = LaunchSpec::decode("prefix = [\"/x\"]\ncommand = \"y\"").unwrap();
        assert_eq!(
            (old.in_image, old.can_probe, old.task),
            (false, false, None)
        );
        assert!(LaunchSpec::decode("prefix = []\ncommand = \"x\"").is_err());
        assert!(LaunchSpec::decode("nonsense").is_err());
    }

    fn label() -> TaskLabel {
        TaskLabel {
            job: 6,
            step: 0,
            rank: 1,
            node: "n1".into(),
            image: "pytorch:2.6.0".into(),
        }
    }

    #[test]
    fn a_failed_task_names_its_report_and_a_stopped_one_says_nothing() {
        let line = failure_notice(&label(), Ended::Code(1)).unwrap();
        assert_eq!(
            line,
            "ml-container: job 6 step 0 rank 1 (image pytorch:2.6.0) exited with code 1 on n1; \
             the failure report: ml-container diagnose 6 (on n1)"
        );
        let segv = failure_notice(&label(), Ended::Signal(libc::SIGSEGV)).unwrap();
        assert!(segv.contains("was killed by SIGSEGV"), "{segv}");
        for quiet in [
            Ended::Code(0),
            Ended::Signal(libc::SIGTERM),
            Ended::Signal(libc::SIGKILL),
            Ended::Signal(libc::SIGINT),
            Ended::Signal(libc::SIGHUP),
        ] {
            assert_eq!(failure_notice(&label(), quiet), None, "{quiet:?}");
        }
    }

    #[test]
    fn a_missing_command_hint_names_the_image_and_the_alternative() {
        assert_eq!(command_alternatives("python"), ["python3"]);
        assert_eq!(command_alternatives("python3"), ["python"]);
        assert_eq!(command_alternatives("python3.11"), ["python"]);
        assert_eq!(command_alternatives("pip"), ["pip3"]);
        assert!(command_alternatives("3").is_empty());
        let h = missing_command_hint("python", "pytorch:2.6.0", &["/usr/bin/python3".into()]);
        assert_eq!(
            h,
            "ml-container: 'python' is not in image pytorch:2.6.0 (looked up in the image's PATH, \
             not the host's); did you mean python3 (/usr/bin/python3)?"
        );
        let none = missing_command_hint("tr\nain", "x", &[]);
        assert!(!none.contains('\n') && none.contains("full path"), "{none}");
    }

    #[test]
    fn command_lookup() {
        let srun: Vec<String> = [
            "srun",
            "-N2",
            "--ml-container=x",
            "python",
            "-c",
            "print(1)",
        ]
        .map(String::from)
        .to_vec();
        let task: Vec<String> = ["/usr/bin/python", "-c", "print(1)"]
            .map(String::from)
            .to_vec();
        let typed = typed_command(&srun, &task);
        assert_eq!(typed.as_deref(), Some("python"));
        assert_eq!(
            container_argv0(typed.as_deref(), &task[0]).as_deref(),
            Some("python")
        );
        // A path typed by the user stays.
        assert_eq!(container_argv0(Some("./run.sh"), "/home/u/run.sh"), None);
        assert_eq!(container_argv0(Some("/opt/bin/x"), "/opt/bin/x"), None);
        // No arguments: the command is srun's last element.
        let srun: Vec<String> = ["srun", "hostname"].map(String::from).to_vec();
        assert_eq!(
            typed_command(&srun, &["/usr/bin/hostname".to_string()]).as_deref(),
            Some("hostname")
        );
        assert_eq!(typed_command(&[], &["/bin/x".to_string()]), None);
        // Arguments that do not match srun's tail: unknown.
        assert_eq!(typed_command(&srun, &["/bin/x".into(), "y".into()]), None);
    }
}
