//! The real-cluster test harness (issue 2, shared/PLATFORM.md).
//!
//! `Cluster::start` builds the plugin against the chosen Slurm's headers
//! (once per test process), then runs `tests/cluster/cluster.sh` as pid 1 of
//! a new pid and mount namespace. That script overlays a throwaway tmpfs on
//! the Slurm root (the cached Debian trixie root for 24.11, the sid root
//! for 26.05, the host for 22.05), gives each node its own network and UTS
//! namespace, starts munged, slurmctld and one slurmd per node, and prints
//! READY. Commands then run
//! inside a node by `nsenter` into that node's anchor process, as the
//! unprivileged user `mluser` or as root. Dropping the `Cluster` closes the
//! script's stdin; it exits and the kernel kills every daemon of its pid
//! namespace, so nothing outlives the test. A failing test prints the
//! slurmctld and slurmd logs.

pub mod pytorch;

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

pub const USER: &str = "mluser";
pub const USER_ID: &str = "1500";
pub const HOME: &str = "/home/mluser";
/// A second unprivileged user sharing `mluser`'s primary group.
pub const USER2: &str = "mluser2";
pub const USER2_ID: &str = "1501";
const PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin";

/// Which Slurm a cluster runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slurm {
    /// Debian 12's Slurm, installed on the host (no Apptainer).
    V22_05,
    /// Debian 13's Slurm with Apptainer 1.4.5, in the cached trixie root.
    V24_11,
    /// Debian sid's Slurm with Apptainer 1.4.5, in the cached sid root.
    V26_05,
}

impl Slurm {
    pub fn name(self) -> &'static str {
        match self {
            Slurm::V22_05 => "22.05",
            Slurm::V24_11 => "24.11",
            Slurm::V26_05 => "26.05",
        }
    }

    /// The directory overlaid as the cluster's root.
    pub fn lower(self) -> PathBuf {
        match self {
            Slurm::V22_05 => PathBuf::from("/"),
            Slurm::V24_11 | Slurm::V26_05 => release_dirs(self).1.clone(),
        }
    }

    fn include_dir(self) -> PathBuf {
        match self {
            Slurm::V22_05 => PathBuf::from("/usr/include"),
            Slurm::V24_11 | Slurm::V26_05 => release_dirs(self).0.clone(),
        }
    }
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    manifest_dir().join("target").join("cluster")
}

/// `tests/cluster/include.sh RELEASE`: the include dir that exposes only
/// the root's slurm/ headers (its libc headers must not shadow the host's
/// for bindgen), and the root itself (trixie for 24.11, sid for 26.05),
/// built on first use. The same script serves build-deb.sh, which the
/// package test runs concurrently with the other tests, so the link is made
/// in one place only.
fn release_dirs(slurm: Slurm) -> &'static (PathBuf, PathBuf) {
    static DIRS_24_11: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    static DIRS_26_05: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    let cell = match slurm {
        Slurm::V26_05 => &DIRS_26_05,
        _ => &DIRS_24_11,
    };
    cell.get_or_init(|| {
        let out = Command::new("bash")
            .arg(manifest_dir().join("tests/cluster/include.sh"))
            .arg(slurm.name())
            .stderr(Stdio::inherit())
            .output()
            .expect("run tests/cluster/include.sh");
        assert!(
            out.status.success(),
            "building the root of Slurm {} failed",
            slurm.name()
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines().map(|l| PathBuf::from(l.trim()));
        let inc = lines.next().expect("include dir line");
        let root = lines.next().expect("root line");
        (inc, root)
    })
}

/// The admin CLI built against `slurm`'s headers (its hostlist rules are
/// that release's), for clusters that must run the CLI of their own
/// release; built once per test process, next to [`plugin`].
pub fn cli(slurm: Slurm) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<Slurm, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    let map = built.get_or_insert_with(HashMap::new);
    if let Some(p) = map.get(&slurm) {
        return p.clone();
    }
    let dir = target_dir().join(slurm.name());
    let status = Command::new(env!("CARGO"))
        .current_dir(manifest_dir())
        .args(["build", "--quiet", "--bin", "ml-container", "--target-dir"])
        .arg(&dir)
        .env("SLURM_INCLUDE_DIR", slurm.include_dir())
        .status()
        .expect("run cargo build");
    assert!(
        status.success(),
        "building the CLI for Slurm {} failed",
        slurm.name()
    );
    let out = dir.join("ml-container");
    fs::copy(dir.join("debug/ml-container"), &out).expect("copy CLI");
    map.insert(slurm, out.clone());
    out
}

/// The plugin built against `slurm`'s headers, optionally with the
/// test-only fault-injection feature. Built once per test process.
pub fn plugin(slurm: Slurm, fault_injection: bool) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<(Slurm, bool), PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    let map = built.get_or_insert_with(HashMap::new);
    if let Some(p) = map.get(&(slurm, fault_injection)) {
        return p.clone();
    }
    let dir = target_dir().join(slurm.name());
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(manifest_dir())
        .args(["build", "--quiet", "--lib", "--target-dir"])
        .arg(&dir)
        .env("SLURM_INCLUDE_DIR", slurm.include_dir());
    if fault_injection {
        cmd.args(["--features", "fault-injection"]);
    }
    let status = cmd.status().expect("run cargo build");
    assert!(
        status.success(),
        "building the plugin for Slurm {} failed",
        slurm.name()
    );
    let out = dir.join(format!(
        "spank_ml_container{}.so",
        if fault_injection { "-fi" } else { "" }
    ));
    fs::copy(dir.join("debug/libslurm_ml_container.so"), &out).expect("copy plugin");
    map.insert((slurm, fault_injection), out.clone());
    out
}

/// One command's result, with helpers that print everything on failure.
#[derive(Debug)]
pub struct Run {
    pub argv: Vec<String>,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from_output(argv: Vec<String>, out: Output) -> Run {
        use std::os::unix::process::ExitStatusExt;
        Run {
            argv,
            code: out.status.code(),
            signal: out.status.signal(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    #[track_caller]
    pub fn assert_ok(&self) -> &Run {
        assert!(self.ok(), "command failed: {self}");
        self
    }

    #[track_caller]
    pub fn assert_failed(&self) -> &Run {
        assert!(
            !self.ok(),
            "command succeeded but should have failed: {self}"
        );
        self
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?}\n  exit code {:?}, signal {:?}\n  stdout:\n{}\n  stderr:\n{}",
            self.argv, self.code, self.signal, self.stdout, self.stderr
        )
    }
}

/// A command running in the background.
pub struct Background {
    child: Child,
    argv: Vec<String>,
}

impl Background {
    pub fn wait(self) -> Run {
        let out = self
            .child
            .wait_with_output()
            .expect("wait for background command");
        Run::from_output(self.argv, out)
    }
}

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

/// The `mpi` image: Debian trixie with Open MPI and mpi4py (tree from
/// tests/cluster/mpi-sandbox.sh, cached like the trixie root), packed as a
/// plain squashfs on the host: Apptainer runs such images directly, and an
/// unprivileged `apptainer build` cannot copy a root-owned tree.
pub fn mpi_image() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    let image = target_dir().join("images-v2").join("mpi-v2.sqfs");
    if image.exists() {
        return image;
    }
    let out = Command::new("bash")
        .arg(manifest_dir().join("tests/cluster/mpi-sandbox.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run tests/cluster/mpi-sandbox.sh");
    assert!(out.status.success(), "building the MPI image tree failed");
    let tree = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    fs::create_dir_all(image.parent().expect("parent")).expect("images dir");
    let tmp = image.with_extension("tmp");
    let st = Command::new("mksquashfs")
        .arg(&tree)
        .arg(&tmp)
        .args([
            "-noappend",
            "-quiet",
            "-no-progress",
            "-all-root",
            // Apptainer's instance start runs the image's
            // /.singularity.d/actions/start, which every image Apptainer
            // builds has and a bare tree lacks: without it the step's
            // tasks cannot share a container (src/share.rs).
            "-p",
            "/.singularity.d d 755 0 0",
            "-p",
            "/.singularity.d/actions d 755 0 0",
            "-p",
            "/.singularity.d/actions/start f 755 0 0 printf '#!/bin/sh\\nexit 0\\n'",
            // Last: -e takes every argument after it.
            "-e",
            ".complete",
        ])
        .status()
        .expect("run mksquashfs");
    assert!(st.success(), "mksquashfs of the MPI tree failed");
    fs::rename(&tmp, &image).expect("place mpi image");
    image
}

/// A plain squashfs image (for Charliecloud's ch-run) with `/MARKER`
/// holding `marker`, built on the host with mksquashfs, cached under target/.
pub fn sqfs_image(marker: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    let out = target_dir()
        .join("images-v2")
        .join(format!("{marker}.sqfs"));
    if out.exists() {
        return out;
    }
    let tree = tempdir("mlc-sqfs");
    for d in [
        "bin", "etc", "dev", "proc", "sys", "tmp", "home", "root", "mnt", "run",
    ] {
        fs::create_dir_all(tree.join(d)).expect("image dir");
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("busybox on the host (apt-get install busybox-static)");
    fs::copy(busybox, tree.join("bin/busybox")).expect("copy busybox");
    for c in ["sh", "cat", "echo", "id", "pwd", "env", "true", "hostname"] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(c)).expect("applet link");
    }
    for f in ["etc/passwd", "etc/group", "etc/hosts", "etc/resolv.conf"] {
        fs::write(tree.join(f), "").expect("image file");
    }
    fs::write(tree.join("MARKER"), format!("{marker}\n")).expect("marker");
    fs::create_dir_all(out.parent().expect("parent")).expect("images dir");
    let st = Command::new("mksquashfs")
        .arg(&tree)
        .arg(&out)
        .args(["-noappend", "-quiet", "-no-progress", "-all-root"])
        .status()
        .expect("run mksquashfs (apt-get install squashfs-tools)");
    assert!(st.success(), "mksquashfs failed");
    let _ = fs::remove_dir_all(&tree);
    out
}

/// `packaging/build-deb.sh SLURM OUT VERSION`: the package's path.
pub fn build_deb(slurm: Slurm, version: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(manifest_dir().join("packaging/build-deb.sh"))
        .arg(slurm.name())
        .arg(target_dir().join("debs"))
        .arg(version)
        .stderr(Stdio::inherit())
        .output()
        .expect("run packaging/build-deb.sh");
    assert!(out.status.success(), "building the package failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The registry root in the test clusters (the config default).
pub const REGISTRY: &str = "/opt/containers";

/// Tiny busybox SIF images, one per marker, each with `/MARKER` holding
/// the marker's name, so a test can tell which image ran. Built with the
/// trixie root's Apptainer in a 1-node cluster, once, cached under target/.
/// Call before starting a cluster (clusters run one at a time).
pub fn images(markers: &[&str]) -> HashMap<String, PathBuf> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    // Bump with the image recipe below.
    let dir = target_dir().join("images-v2");
    fs::create_dir_all(&dir).expect("images dir");
    let missing: Vec<&str> = markers
        .iter()
        .copied()
        .filter(|m| !dir.join(format!("{m}.sif")).exists())
        .collect();
    if !missing.is_empty() {
        let c = Cluster::start_with(
            Slurm::V24_11,
            Options {
                nodes: 1,
                ..Options::default()
            },
        );
        for m in &missing {
            // An image whose %environment sets RANK=999, to prove the
            // plugin's values win over the image's.
            let extra = match *m {
                "rank999" => {
                    "mkdir -p $d/.singularity.d/env && \
                     echo 'export RANK=999 MASTER_PORT=1' > $d/.singularity.d/env/90-environment.sh &&"
                }
                // An image with `python3` and no `python`, as Debian's.
                "py3" => {
                    "printf '#!/bin/sh\\necho python3 stand-in \\\"$@\\\"\\n' > $d/bin/python3 && \
                     chmod 755 $d/bin/python3 &&"
                }
                _ => "",
            };
            let script = format!(
                "set -e; d=/tmp/sb-{m}; rm -rf $d; mkdir -p $d/bin $d/tmp $d/home $d/etc; touch $d/etc/passwd $d/etc/group; \
                 cp /bin/busybox $d/bin/; \
                 for c in sh cat echo ls true env sleep id hostname pwd touch kill; do ln -s busybox $d/bin/$c; done; \
                 printf '#!/bin/sh\\necho only in the image\\n' > $d/bin/only-in-image; \
                 chmod 755 $d/bin/only-in-image; \
                 echo {m} > $d/MARKER; {extra} apptainer -s build /tmp/{m}.sif $d"
            );
            c.run(1, &[], &["sh", "-c", &script]).assert_ok();
            fs::copy(
                c.path(&format!("/tmp/{m}.sif")),
                dir.join(format!("{m}.sif")),
            )
            .expect("copy image out of the cluster");
        }
    }
    markers
        .iter()
        .map(|m| (m.to_string(), dir.join(format!("{m}.sif"))))
        .collect()
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
    scratch: PathBuf,
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

        let scratch = tempdir("mlc-test");
        let stage = scratch.join("stage");
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
        let log_path = scratch.join("cluster.log");
        let mut child = Command::new("unshare")
            .args(["--mount", "--pid", "--fork", "--kill-child", "--", "bash"])
            .arg(manifest_dir().join("tests/cluster/cluster.sh"))
            .arg(&lower)
            .arg(opts.nodes.to_string())
            .arg(&plugin)
            .arg(&stage)
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
            scratch,
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
        let _ = fs::remove_dir_all(&self.scratch);
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

fn tempdir(prefix: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let p = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&p);
    fs::create_dir_all(&p).expect("create temp dir");
    p
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

/// Polls `f` every 50 ms until it gives a value or `within` has passed.
pub fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Cluster {
    /// Occupies both nodes with a batch job for `secs`, so that the next
    /// srun resolves its image and then waits; returns the job's id once
    /// it runs.
    pub fn hold_every_node(&self, secs: &str) -> String {
        let r = self.run(
            1,
            &[],
            &[
                "sbatch",
                "--parsable",
                "-N2",
                "--exclusive",
                "--wrap",
                &format!("sleep {secs}"),
            ],
        );
        let id = r.assert_ok().stdout.trim().to_string();
        wait_for(Duration::from_secs(15), || {
            let q = self.run(1, &[], &["squeue", "-h", "-j", &id, "-o", "%T"]);
            (q.stdout.trim() == "RUNNING").then_some(())
        })
        .unwrap_or_else(|| panic!("the holding job {id} never ran"));
        id
    }

    /// Until a job other than `holder` pends (an srun, past its resolution).
    pub fn wait_pending_besides(&self, holder: &str) {
        wait_for(Duration::from_secs(15), || {
            let q = self.run(1, &[], &["squeue", "-h", "-t", "PD", "-o", "%i"]);
            q.stdout
                .split_whitespace()
                .any(|id| id != holder)
                .then_some(())
        })
        .expect("srun never pended");
    }
}
