//! The `pytorch` test image: Debian's PyTorch built by
//! `ml-container build pytorch-debian`, as a site would, once per recipe.
//!
//! The Debian root tree comes from tests/cluster/pytorch-base.sh
//! (debootstrap on the host, root, ~3 min, cached). The build itself runs in
//! a 1-node trixie cluster (Apptainer lives only there) as the unprivileged
//! `mluser`, who owns the registry there (`registry.owner`): Apptainer run
//! as root fails in this sandbox (docs/DESIGN.md, Apptainer facts), unprivileged Apptainer
//! runs the recipe's %post in a root-mapped user namespace. The SIF is
//! cached under /var/cache/slurm-ml-container/pytorch-sif-<stamp>/, the stamp
//! a hash of the recipe and the base tree's name, so a changed recipe
//! builds a new image (the CLI's build code is tested in tests/recipes_cli.rs). flock'd against concurrent builders;
//! placed by rename, so a cache entry is never partial.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::slurm::manifest_dir;
use super::{Cluster, Options, Slurm, REGISTRY};

/// Where scenarios find the image: the cache directory is bound read-only
/// here, inside the registry root (the default allowed directory).
pub const PYTORCH_DIR: &str = "/opt/containers/ml-frameworks/pytorch-cache";

fn cache() -> PathBuf {
    std::env::var_os("MLC_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/slurm-ml-container"))
}

/// The built image's cache directory: `pytorch.sif` and `build.log` (the
/// CLI's output, %test included) and `show.txt` (`ml-container show`).
pub fn pytorch_image() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    let out = Command::new("bash")
        .arg(manifest_dir().join("tests/cluster/pytorch-base.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run tests/cluster/pytorch-base.sh");
    assert!(
        out.status.success(),
        "building the PyTorch base tree failed"
    );
    let base = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());

    let mut h = Sha256::new();
    h.update(
        fs::read(manifest_dir().join("packaging/recipes/pytorch-debian.def"))
            .expect("read the pytorch-debian recipe"),
    );
    h.update(base.as_os_str().as_encoded_bytes());
    let stamp: String = format!("{:x}", h.finalize()).chars().take(12).collect();
    let dir = cache().join(format!("pytorch-sif-{stamp}"));
    if dir.join("pytorch.sif").is_file() {
        return dir;
    }
    fs::create_dir_all(cache()).expect("cache dir");
    let lock = fs::File::create(cache().join(".lock-pytorch-sif")).expect("lock file");
    let _flock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock the PyTorch image cache");
    if dir.join("pytorch.sif").is_file() {
        return dir;
    }
    build(&base, &dir);
    dir
}

fn build(base: &Path, dir: &Path) {
    let config = format!("[registry]\nroot = \"{REGISTRY}\"\nowner = \"mluser\"\n");
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options {
            nodes: 1,
            binds: vec![(base.to_path_buf(), "/bases/trixie-pytorch".to_string())],
            ..Options::default()
        }
        .file("/etc/mlc-build.toml", &config)
        .copy(
            &manifest_dir().join("packaging/recipes/pytorch-debian.def"),
            "/usr/share/slurm-ml-container/recipes/pytorch-debian.def",
        ),
    );
    c.run_root(
        1,
        &["ml-container", "init", "--config", "/etc/mlc-build.toml"],
    )
    .assert_ok();
    c.run_root(1, &["chown", "-R", "mluser", REGISTRY])
        .assert_ok();
    // The harness bounds each command to 120 s; the build takes minutes, so
    // it runs detached and this polls for its exit status.
    let script = "ml-container build pytorch-debian --name pytorch --tag test --default \
                  --set container_image_base=/bases/trixie-pytorch --config /etc/mlc-build.toml \
                  >/tmp/build.log 2>&1; echo $? >/tmp/build.rc.tmp; mv /tmp/build.rc.tmp /tmp/build.rc";
    c.run(
        1,
        &[],
        &[
            "sh",
            "-c",
            &format!("setsid sh -c '{script}' </dev/null >/dev/null 2>&1 &"),
        ],
    )
    .assert_ok();
    let start = Instant::now();
    eprintln!("pytorch image: ml-container build pytorch-debian (about 4 minutes on 2 cores)");
    let rc = loop {
        let rc = c.read("/tmp/build.rc");
        if !rc.is_empty() {
            break rc;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1200),
            "ml-container build did not finish in 20 minutes:\n{}",
            c.read("/tmp/build.log")
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    let log = c.read("/tmp/build.log");
    assert_eq!(
        rc.trim(),
        "0",
        "ml-container build pytorch-debian failed:\n{log}"
    );
    // The recipe's %test ran during the build and passed.
    assert!(
        log.contains("Running testscript") && log.contains("torch 2.6"),
        "no %test in the build output:\n{log}"
    );
    let show = c.run(
        1,
        &[],
        &[
            "ml-container",
            "show",
            "pytorch",
            "--config",
            "/etc/mlc-build.toml",
        ],
    );
    show.assert_ok();
    eprintln!(
        "pytorch image: built in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    let tmp = dir.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).expect("image cache dir");
    fs::copy(
        c.path("/opt/containers/ml-frameworks/pytorch-test.sif"),
        tmp.join("pytorch.sif"),
    )
    .expect("copy the image out of the cluster");
    fs::write(tmp.join("build.log"), &log).expect("build log");
    fs::write(tmp.join("show.txt"), &show.stdout).expect("show output");
    // Readable by the clusters' unprivileged user through the bind.
    for p in [tmp.clone(), tmp.join("pytorch.sif")] {
        use std::os::unix::fs::PermissionsExt;
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    fs::rename(&tmp, dir).expect("place the image cache");
}

impl Options {
    /// The cached `pytorch` image in the registry as `pytorch` (default tag
    /// `test`), through a catalog entry; `extra_catalog` is appended.
    pub fn with_pytorch(self, extra_catalog: &str) -> Options {
        let dir = pytorch_image();
        let catalog = format!(
            "version = 1\n[[image]]\nname = \"pytorch\"\ntag = \"test\"\n\
             path = \"ml-frameworks/pytorch-cache/pytorch.sif\"\ndefault = true\n{extra_catalog}"
        );
        let mut o = self.file("/opt/containers/.registry/catalog.toml", &catalog);
        o.binds.push((dir, PYTORCH_DIR.to_string()));
        o
    }
}
