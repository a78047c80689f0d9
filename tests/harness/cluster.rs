//! `Cluster`: a throwaway Slurm cluster in namespaces (start, run commands
//! in a node, srun, logs), and the `Options` it starts with.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::slurm::{cli, manifest_dir, plugin};
use super::{
    images, scratch_dir, Background, Run, Slurm, HOME, PATH, REGISTRY, USER, USER2, USER2_ID,
    USER_ID,
};

/// What a test wants in its cluster.
#[derive(Debug, Clone)]
pub struct Options {
    pub nodes: usize,
    pub fault_injection: bool,
    /// Files placed into the root before the daemons start: (path, content).
    pub files: Vec<(String, String)>,
    /// Host files copied into the root before the daemons start: (host path, path inside).
    pub copies: Vec<(PathBuf, String)>,
    /// Host directories bound read-only into the root: (host dir, path inside).
    pub binds: Vec<(PathBuf, String)>,
    /// Install the freshly built plugin, CLI and launcher (false: a test
    /// installs the Debian package itself).
    pub install_plugin: bool,
}

impl Options {
    /// A registry whose search directories hold `ml-frameworks/<marker>.sif`
    /// for each marker (images built by [`images`]), and no catalog.
    pub fn with_scan_images(mut self, markers: &[&str]) -> Options {
        let built = images(markers);
        for m in markers {
            self.copies.push((
                built[*m].clone(),
                format!("{REGISTRY}/ml-frameworks/{m}.sif"),
            ));
        }
        self
    }

    /// A file in the root; one that starts with `#!` is made executable.
    pub fn file(mut self, path: &str, content: &str) -> Options {
        self.files.push((path.to_string(), content.to_string()));
        self
    }

    /// slurm.conf's TaskProlog: a shell script with `body` (it takes the
    /// slurm.conf.extra file).
    pub fn task_prolog(self, body: &str) -> Options {
        self.file(
            "/etc/slurm/slurm.conf.extra",
            "TaskProlog=/etc/slurm/taskprolog.sh\n",
        )
        .file("/etc/slurm/taskprolog.sh", &format!("#!/bin/sh\n{body}\n"))
    }

    pub fn copy(mut self, host: &std::path::Path, inside: &str) -> Options {
        self.copies.push((host.to_path_buf(), inside.to_string()));
        self
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 2,
            fault_injection: false,
            files: Vec::new(),
            copies: Vec::new(),
            binds: Vec::new(),
            install_plugin: true,
        }
    }
}

/// Clusters run one at a time: the machine has two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

pub struct Cluster {
    pub slurm: Slurm,
    pub nodes: usize,
    child: Child,
    stdin: Option<ChildStdin>,
    pid1: u32,
    anchors: Vec<u32>,
    /// The cluster's staging directory on the host, removed when the
    /// cluster is dropped (after the daemons are gone).
    _scratch: tempfile::TempDir,
    _serial: MutexGuard<'static, ()>,
}

impl Cluster {
    pub fn start(slurm: Slurm) -> Cluster {
        Cluster::start_with(slurm, Options::default())
    }

    pub fn start_with(slurm: Slurm, opts: Options) -> Cluster {
        assert!(
            running_as_root(),
            "the cluster tests need root (namespaces, mounts); run them as root"
        );
        let plugin = if opts.install_plugin {
            plugin(slurm, opts.fault_injection)
        } else {
            PathBuf::from("-")
        };
        let lower = slurm.lower();
        let serial = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);

        let scratch = scratch_dir();
        let stage = scratch.path().join("stage");
        let snippet = fs::read_to_string(manifest_dir().join("plugstack/ml-container.conf"))
            .expect("read plugstack/ml-container.conf");
        let mut files = Vec::new();
        if opts.install_plugin {
            files.push((
                "/etc/slurm/plugstack.conf.d/ml-container.conf".to_string(),
                snippet,
            ));
        }
        files.extend(opts.files.iter().cloned());
        for (path, content) in &files {
            let dest = stage.join(path.trim_start_matches('/'));
            fs::create_dir_all(dest.parent().expect("parent")).expect("stage dir");
            fs::write(&dest, content).expect("stage file");
            if content.starts_with("#!") {
                fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)).expect("chmod");
            }
        }
        // The CLI (built for this cluster's release: its hostlist rules are
        // that release's) and the launcher, as the package installs them.
        let tools: Vec<(PathBuf, &str)> = if opts.install_plugin {
            vec![
                (cli(slurm), "/usr/local/bin/ml-container"),
                (
                    PathBuf::from(env!("CARGO_BIN_EXE_ml-container-launch")),
                    "/usr/libexec/slurm-ml-container/ml-container-launch",
                ),
            ]
        } else {
            Vec::new()
        };
        for (host, inside) in &tools {
            let dest = stage.join(inside.trim_start_matches('/'));
            fs::create_dir_all(dest.parent().expect("parent")).expect("stage dir");
            fs::copy(host, &dest).unwrap_or_else(|e| panic!("stage {}: {e}", host.display()));
            fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        for (host, inside) in &opts.copies {
            let dest = stage.join(inside.trim_start_matches('/'));
            fs::create_dir_all(dest.parent().expect("parent")).expect("stage dir");
            fs::copy(host, &dest).unwrap_or_else(|e| panic!("stage {}: {e}", host.display()));
            fs::set_permissions(&dest, fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        if !opts.binds.is_empty() {
            let lines: String = opts
                .binds
                .iter()
                .map(|(h, i)| format!("{} {i}\n", h.display()))
                .collect();
            fs::write(stage.join(".binds"), lines).expect("stage binds");
        }
        let log_path = scratch.path().join("cluster.log");
        let mut child = Command::new("unshare")
            .args(["--mount", "--pid", "--fork", "--kill-child", "--", "bash"])
            .arg(manifest_dir().join("tests/cluster/cluster.sh"))
            .arg(&lower)
            .arg(opts.nodes.to_string())
            .arg(&plugin)
            .arg(&stage)
            // The tmpfs mount point goes in our scratch dir, removed on drop.
            .env("MLC_SCRATCH_PARENT", scratch.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log_path).expect("cluster log"))
            .spawn()
            .expect("start unshare");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let ready = rx.recv_timeout(Duration::from_secs(90));
        if ready.as_deref() != Ok("READY") {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "cluster (Slurm {}) did not start: {ready:?}\n{}",
                slurm.name(),
                fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        let pid1 = first_child(child.id()).expect("cluster pid 1");
        let anchors = (1..=opts.nodes)
            .map(|i| find_anchor(pid1, i).unwrap_or_else(|| panic!("anchor of node n{i}")))
            .collect();
        Cluster {
            slurm,
            nodes: opts.nodes,
            stdin: child.stdin.take(),
            child,
            pid1,
            anchors,
            _scratch: scratch,
            _serial: serial,
        }
    }

    /// A path inside the cluster, as node n1 sees it (each node has its own
    /// /tmp; everything else is shared), from the test process.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.path_on(1, inside)
    }

    /// A path as node `node` sees it.
    pub fn path_on(&self, node: usize, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.anchors[node - 1]))
            .join(inside.trim_start_matches('/'))
    }

    pub fn write(&self, inside: &str, content: &str, mode: u32) {
        let p = self.path(inside);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).expect("create dir in cluster");
        }
        fs::write(&p, content).unwrap_or_else(|e| panic!("write {inside}: {e}"));
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    pub fn read(&self, inside: &str) -> String {
        fs::read_to_string(self.path(inside)).unwrap_or_default()
    }

    pub fn remove(&self, inside: &str) {
        let _ = fs::remove_file(self.path(inside));
    }

    fn command(&self, node: usize, as_user: bool, env: &[(&str, &str)], argv: &[&str]) -> Command {
        let who = if as_user { Some(USER) } else { None };
        self.command_as(node, who, env, argv)
    }

    /// `argv` inside `node` as `user` (`mluser` or `mluser2`; both have
    /// mluser's primary group) or, with `None`, as root.
    fn command_as(
        &self,
        node: usize,
        user: Option<&str>,
        env: &[(&str, &str)],
        argv: &[&str],
    ) -> Command {
        let anchor = self.anchors[node - 1];
        let mut cmd = Command::new("nsenter");
        cmd.env_clear().arg("-t").arg(anchor.to_string()).arg("-a");
        let home_of_2 = format!("/home/{USER2}");
        let (home, user) = match user {
            Some(USER2) => {
                cmd.args(["-S", USER2_ID, "-G", USER_ID]);
                (home_of_2.as_str(), USER2)
            }
            Some(_) => {
                cmd.args(["-S", USER_ID, "-G", USER_ID]);
                (HOME, USER)
            }
            None => ("/root", "root"),
        };
        cmd.args(["--", "env", "-i", "-C", home])
            .arg(format!("PATH={PATH}"))
            .arg(format!("HOME={home}"))
            .arg(format!("USER={user}"))
            .arg(format!("LOGNAME={user}"));
        for (k, v) in env {
            cmd.arg(format!("{k}={v}"));
        }
        cmd.args(["timeout", "-k", "5", "120"]).args(argv);
        cmd
    }

    /// Runs `argv` on `node` (1-based) as the unprivileged test user.
    pub fn run(&self, node: usize, env: &[(&str, &str)], argv: &[&str]) -> Run {
        self.exec(self.command(node, true, env, argv), argv)
    }

    /// Runs `argv` on `node` as the second test user, `mluser2`.
    pub fn run_as_user2(&self, node: usize, env: &[(&str, &str)], argv: &[&str]) -> Run {
        self.exec(self.command_as(node, Some(USER2), env, argv), argv)
    }

    /// Runs `argv` on `node` as root.
    pub fn run_root(&self, node: usize, argv: &[&str]) -> Run {
        self.exec(self.command(node, false, &[], argv), argv)
    }

    /// `srun ARGS` from node n1 as the test user.
    pub fn srun(&self, args: &[&str]) -> Run {
        self.srun_env(&[], args)
    }

    pub fn srun_env(&self, env: &[(&str, &str)], args: &[&str]) -> Run {
        let mut argv = vec!["srun"];
        argv.extend_from_slice(args);
        self.run(1, env, &argv)
    }

    /// Starts `srun ARGS` in the background; `wait` it later.
    pub fn spawn_srun(&self, args: &[&str]) -> Background {
        let mut argv = vec!["srun"];
        argv.extend_from_slice(args);
        let child = self
            .command(1, true, &[], &argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn srun");
        Background {
            child,
            argv: argv.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn exec(&self, mut cmd: Command, argv: &[&str]) -> Run {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("nsenter for {argv:?}: {e}"));
        Run::from_output(argv.iter().map(|s| s.to_string()).collect(), out)
    }

    /// `srun ARGS` with `input` on its standard input.
    pub fn srun_input(&self, args: &[&str], input: &str) -> Run {
        let mut argv = vec!["srun"];
        argv.extend_from_slice(args);
        let mut child = self
            .command(1, true, &[], &argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn srun");
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(input.as_bytes());
        }
        let out = child.wait_with_output().expect("wait for srun");
        Run::from_output(argv.iter().map(|s| s.to_string()).collect(), out)
    }

    /// The slurmd log of node `node`.
    pub fn slurmd_log(&self, node: usize) -> String {
        self.read(&format!("/var/log/slurm/slurmd-n{node}.log"))
    }

    /// Every daemon log, for failure reports.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut names = vec!["slurmctld.log".to_string()];
        names.extend((1..=self.nodes).map(|i| format!("slurmd-n{i}.log")));
        for name in names {
            let text = self.read(&format!("/var/log/slurm/{name}"));
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            out.push_str(&format!("==== {name} (last {} lines)\n", tail.len()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Whether every daemon of the cluster is still running.
    pub fn daemons_alive(&self) -> bool {
        let ns = pid_ns(self.pid1);
        let mut slurmd = 0;
        let mut slurmctld = 0;
        for pid in all_pids() {
            if pid_ns(pid) != ns {
                continue;
            }
            match fs::read_to_string(format!("/proc/{pid}/comm"))
                .as_deref()
                .map(str::trim)
            {
                Ok("slurmd") => slurmd += 1,
                Ok("slurmctld") => slurmctld += 1,
                _ => {}
            }
        }
        slurmd == self.nodes && slurmctld == 1
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- cluster logs (Slurm {}) ----\n{}",
                self.slurm.name(),
                self.logs()
            );
        }
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
    }
}

fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

fn first_child(pid: u32) -> Option<u32> {
    let text = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn pid_ns(pid: u32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

fn find_anchor(pid1: u32, node: usize) -> Option<u32> {
    let want = format!("mlc-anchor-n{node}");
    let ns = pid_ns(pid1)?;
    all_pids().into_iter().find(|&pid| {
        let argv0 = fs::read(format!("/proc/{pid}/cmdline"))
            .ok()
            .and_then(|c| c.split(|b| *b == 0).next().map(|a| a.to_vec()));
        argv0.as_deref() == Some(want.as_bytes()) && pid_ns(pid).as_ref() == Some(&ns)
    })
}

/// Reads every file under `dir` (inside the cluster) whose name starts with `prefix`.
pub fn read_matching(cluster: &Cluster, dir: &str, prefix: &str) -> Vec<(String, String)> {
    let Ok(entries) = fs::read_dir(cluster.path(dir)) else {
        return Vec::new();
    };
    let mut out: Vec<(String, String)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read_to_string(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    out
}

/// `srun -N2 -n2 --ml-container=rank999`: the image (see [`images`]) says
/// RANK=999 and MASTER_PORT=1 in its `%environment`; each task must still
/// see its own RANK, the step's WORLD_SIZE and MASTER_ADDR, and the
/// plugin's MASTER_PORT, in that image.
pub fn assert_contract_beats_rank999(c: &Cluster) {
    let r = c.srun(&[
        "-N2",
        "-n2",
        "--ml-container=rank999",
        "/bin/sh",
        "-c",
        "echo $SLURM_PROCID $RANK $MASTER_PORT $(cat /MARKER) $WORLD_SIZE $MASTER_ADDR",
    ]);
    r.assert_ok();
    assert_eq!(r.stdout.lines().count(), 2, "{r}");
    for line in r.stdout.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f[0], f[1], "RANK is not the task's: {r}");
        assert_ne!(f[2], "1", "the image's MASTER_PORT won: {r}");
        assert_eq!(f[3..], ["rank999", "2", "n1"], "{r}");
    }
}
