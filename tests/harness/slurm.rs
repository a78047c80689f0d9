//! The Slurm releases the clusters run, and what is built for each: the
//! plugin (against that release's headers, once per test process), the
//! CLI and the Debian package.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};

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

pub(super) fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub(super) fn target_dir() -> PathBuf {
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
