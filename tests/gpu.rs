//! `--nv` on a real GPU: the plugin's own callbacks (init, the options,
//! init_post_opt, task_init) run against a host that stands in for
//! slurmstepd, and the runtime command they hand the launcher is run
//! with real Apptainer on a real NVIDIA GPU, as an unprivileged user.
//!
//! No GPU and no Slurm exist where CI runs, so the test is ignored there.
//! On a GPU machine `tests/gpu/run.sh` installs Apptainer, builds
//! `tests/gpu/device_count.cu` with nvcc and runs this test with
//! `--ignored`; it reads:
//!   MLC_GPU_IMAGE  a SIF to run (the busybox test image is enough)
//!   MLC_GPU_BIN    a directory holding the built `device_count`
//!   MLC_GPU_USER   the unprivileged user that runs Apptainer

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use slurm_ml_container::launch::{LaunchSpec, LAUNCH_ENV};
use slurm_ml_container::options::{OptionId, OptionSpec};
use slurm_ml_container::plugin::{self, Context, Host, HostError};
use slurm_ml_container::probe::{self, CommandProbe};

/// What slurmstepd would be for one task of step 0 of job 1 on node 0.
struct StepdStandIn {
    /// The task's environment, as slurmstepd holds it; set_job_env writes here.
    env: HashMap<String, String>,
    argv: Vec<String>,
}

impl Host for StepdStandIn {
    fn context(&self) -> Context {
        Context::Remote
    }
    fn getenv(&self, name: &str) -> Option<String> {
        self.env.get(name).cloned()
    }
    fn job_id(&self) -> Option<u32> {
        Some(1)
    }
    fn step_id(&self) -> Option<u32> {
        Some(0)
    }
    fn node_id(&self) -> Option<u32> {
        Some(0)
    }
    fn register_option(&mut self, _: &OptionSpec) -> Result<(), HostError> {
        Ok(())
    }
    fn set_local_env(&mut self, _: &str, _: Option<&str>) {}
    fn set_job_env(&mut self, name: &str, value: &str) -> Result<(), HostError> {
        self.env.insert(name.to_string(), value.to_string());
        Ok(())
    }
    fn job_argv(&self) -> Option<Vec<String>> {
        Some(self.argv.clone())
    }
    fn set_argv0(&mut self, value: &str) -> Result<(), HostError> {
        self.argv[0] = value.to_string();
        Ok(())
    }
    fn task_exit_status(&self) -> Option<i32> {
        None
    }
    fn task_global_id(&self) -> Option<u32> {
        Some(0)
    }
    fn task_local_id(&self) -> Option<u32> {
        Some(0)
    }
    fn local_task_count(&self) -> Option<u32> {
        Some(1)
    }
    fn job_ids(&self) -> Option<(u32, u32)> {
        None
    }
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set (see tests/gpu/run.sh)"))
}

/// A root-owned registry with the image as `gpu`, and a site config whose
/// binds give the host-built CUDA program its libraries (the busybox image
/// has none; the CUDA driver comes with --nv).
fn site(dir: &Path, image: &Path) -> PathBuf {
    let reg = dir.join("containers");
    fs::create_dir_all(reg.join("ml-frameworks")).unwrap();
    fs::create_dir_all(reg.join(".registry")).unwrap();
    for d in [
        dir,
        &reg,
        &reg.join("ml-frameworks"),
        &reg.join(".registry"),
    ] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let sif = reg.join("ml-frameworks/gpu.sif");
    fs::copy(image, &sif).unwrap();
    fs::set_permissions(&sif, fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = dir.join("ml-container.toml");
    fs::write(
        &cfg,
        format!(
            "[registry]\nroot = \"{}\"\n[runtime]\nbinds = [\"/lib/x86_64-linux-gnu\", \"/lib64\"]\n",
            reg.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&cfg, fs::Permissions::from_mode(0o644)).unwrap();
    cfg
}

/// The callbacks of one task with `policy`, the step's GPU variables in
/// `gpu_env`: the runtime prefix they hand the launcher, and the task's
/// environment.
fn callbacks(
    cfg: &Path,
    bin: &str,
    policy: &str,
    gpu_env: &[(&str, &str)],
) -> (Vec<String>, HashMap<String, String>) {
    let mut host = StepdStandIn {
        env: [("PATH", "/usr/bin:/bin")]
            .iter()
            .chain(gpu_env)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        argv: vec!["/gpubin/device_count".to_string()],
    };
    plugin::init(&mut host, &[format!("config={}", cfg.display())]).unwrap();
    for (id, value) in [
        (OptionId::Image, "gpu"),
        (OptionId::Gpus, policy),
        (OptionId::Dist, "off"),
        (OptionId::Mounts, &format!("{bin}:/gpubin:ro")),
    ] {
        plugin::on_option(id as i32, Some(value), true).unwrap();
    }
    plugin::init_post_opt(&mut host).unwrap();
    plugin::task_init(&mut host).unwrap();
    let spec = LaunchSpec::decode(&host.env[LAUNCH_ENV]).expect("task_init left the launch spec");
    (spec.prefix, host.env)
}

/// Runs prefix + the task's command as `user` with exactly `env`.
fn run_as(user: &str, prefix: &[String], env: &HashMap<String, String>) -> String {
    let home = nix::unistd::User::from_name(user)
        .unwrap()
        .expect("the user exists")
        .dir;
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", user, "--", "env", "-i"])
        .arg(format!("HOME={}", home.display()))
        .args(env.iter().map(|(k, v)| format!("{k}={v}")))
        .args(prefix)
        .arg("/gpubin/device_count")
        .current_dir("/tmp");
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("$ {} ...\n{text}", prefix.join(" "));
    assert!(out.status.success(), "{text}");
    text
}

#[test]
#[ignore = "needs an NVIDIA GPU, nvcc and Apptainer: tests/gpu/run.sh on a GPU machine"]
fn nv_follows_the_policy_and_the_container_uses_the_gpu() {
    // The test's own directory, readable by the unprivileged user the
    // tasks run as.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = site(&dir, Path::new(&var("MLC_GPU_IMAGE")));
    let bin = var("MLC_GPU_BIN");
    let user = var("MLC_GPU_USER");
    let step_gpus: &[(&str, &str)] = &[("SLURM_STEP_GPUS", "0"), ("CUDA_VISIBLE_DEVICES", "0")];
    // (policy, the step's GPU variables, --nv expected)
    for (policy, gpu_env, nv) in [
        ("auto", step_gpus, true),
        ("auto", &[][..], false),
        ("off", step_gpus, false),
        ("on", &[][..], true),
    ] {
        let (prefix, env) = callbacks(&cfg, &bin, policy, gpu_env);
        assert_eq!(
            prefix.iter().any(|a| a == "--nv"),
            nv,
            "policy {policy}, step GPUs {gpu_env:?}: {prefix:?}"
        );
        let out = run_as(&user, &prefix, &env);
        if nv {
            assert!(out.contains("cuda devices: 1"), "{out}");
            assert!(out.contains("kernel: 31*31 = 961"), "{out}");
        } else {
            assert!(out.contains("cuda devices: 0"), "{out}");
        }
    }
    // The failure report's GPU probe reads the real nvidia-smi.
    match probe::gpus(Duration::from_secs(10)) {
        CommandProbe::Ok(csv) => {
            println!("nvidia-smi: {csv}");
            assert!(csv.contains("NVIDIA"), "{csv}");
        }
        other => panic!("the GPU probe gave {other:?}"),
    }
}
