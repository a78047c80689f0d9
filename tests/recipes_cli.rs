//! `ml-container recipes` and `ml-container build` on a temporary registry
//! rendering, unknown variables, the build timeout, and that a
//! failed build leaves the catalog and the registry as they were. The
//! runtime here is a stand-in script (`runtime.path`): Apptainer runs only
//! in the trixie root, where the cluster tests build the real pytorch-debian
//! image with this same command (tests/harness/pytorch.rs). Runs as root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use slurm_ml_container::{integrity, sif};

/// A registry and its config under a directory of the test's own,
/// removed on drop.
struct Env {
    dir: PathBuf,
    config: PathBuf,
    _tmp: tempfile::TempDir,
}

/// A registry, and a stand-in runtime whose body is `runtime` (sh).
fn env(runtime: &str) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let rt = dir.join("fake-apptainer");
    fs::write(&rt, format!("#!/bin/sh\n{runtime}\n")).unwrap();
    fs::set_permissions(&rt, fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.join("ml-container.toml");
    fs::write(
        &config,
        format!(
            "[registry]\nroot = \"{}/containers\"\n[runtime]\npath = \"{}\"\n",
            dir.display(),
            rt.display()
        ),
    )
    .unwrap();
    let e = Env {
        dir,
        config,
        _tmp: tmp,
    };
    let o = cli(&e, &["init"]);
    assert!(o.status.success(), "{}", text(&o));
    e
}

fn cli(e: &Env, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ml-container"))
        .args(args)
        .arg("--config")
        .arg(&e.config)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn shipped() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging/recipes")
        .display()
        .to_string()
}

/// Every file under the registry root, and the catalog's bytes.
fn registry_state(e: &Env) -> (Vec<PathBuf>, Vec<u8>) {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            }
            out.push(p);
        }
    }
    let root = e.dir.join("containers");
    let mut files = Vec::new();
    walk(&root, &mut files);
    files.sort();
    let catalog = fs::read(root.join(".registry/catalog.toml")).unwrap_or_default();
    (files, catalog)
}

/// A recipe directory holding one tiny recipe.
fn tiny_recipe(e: &Env) -> String {
    let d = e.dir.join("recipes");
    fs::create_dir_all(&d).unwrap();
    fs::write(
        d.join("tiny.def"),
        "# about: a tiny test recipe\n\
         # var container_image_base = /nonexistent-not-used ; unused by the stand-in\n\
         # var pytorch_version = 9.9 ; label\n\
         # var container_build_timeout = 600 ; seconds\n\
         Bootstrap: docker\nFrom: {{ container_image_base }}\n\
         %labels\n    recipe {{ recipe }}\n    pytorch {{ pytorch_version }}\n    build_date {{ build_date }}\n\
         %test\n    true\n",
    )
    .unwrap();
    d.display().to_string()
}

#[test]
fn recipes_lists_the_shipped_recipes_with_their_variables() {
    let e = env("exit 1");
    let o = cli(&e, &["recipes", "--recipes", &shipped()]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("pytorch-debian: Debian's PyTorch"), "{out}");
    assert!(out.contains("pytorch-cuda: NVIDIA CUDA"), "{out}");
    for var in [
        "container_image_base = \"nvidia/cuda:12.1.1-devel-ubuntu22.04\"",
        "pytorch_version = \"2.0.0\"",
        "pytorch_cuda_version = \"cu121\"",
        "mpi_type = \"openmpi\"",
        "mpi_version = \"4.1.4\"",
        "mpi_pmix_enabled = \"true\"",
        "container_image_python_version = \"3.10\"",
        "container_build_timeout = \"3600\"",
        "pytorch_version = \"2.6.0\"",
    ] {
        assert!(out.contains(var), "{var} missing:\n{out}");
    }
}

/// CI's check of pytorch-cuda (building it needs the NVIDIA base image):
/// a site's custom configuration (PyTorch 2.1 for CUDA 12.1, Open MPI,
/// parallel build, its own wheel mirror) renders into a definition with every
/// value in place and nothing left of the template.
#[test]
fn pytorch_cuda_renders_for_the_custom_configuration() {
    let e = env("exit 1");
    let o = cli(
        &e,
        &[
            "build",
            "pytorch-cuda",
            "--recipes",
            &shipped(),
            "--name",
            "pytorch",
            "--tag",
            "2.1",
            "--set",
            "pytorch_version=2.1.0",
            "--set",
            "pytorch_cuda_version=cu121",
            "--set",
            "mpi_type=openmpi",
            "--set",
            "container_build_parallel=true",
            "--dry-run",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let def = String::from_utf8_lossy(&o.stdout);
    assert!(
        def.contains("Bootstrap: docker\nFrom: nvidia/cuda:12.1.1-devel-ubuntu22.04\n"),
        "{def}"
    );
    assert!(def.contains("\"torch==2.1.0\""), "{def}");
    assert!(
        def.contains("    pytorch 2.1.0\n    cuda cu121\n    mpi openmpi 4.1.4\n"),
        "{def}"
    );
    assert!(def.contains("    image pytorch:2.1\n"), "{def}");
    assert!(!def.contains("{{") && !def.contains("}}"), "{def}");
}

#[test]
fn unknown_variable_fails_and_changes_nothing() {
    let e = env("echo ran >> \"$(dirname \"$0\")/ran\"; exit 0");
    let before = registry_state(&e);
    let o = cli(
        &e,
        &[
            "build",
            "pytorch-debian",
            "--recipes",
            &shipped(),
            "--name",
            "pytorch",
            "--tag",
            "x",
            "--set",
            "pytorch_verison=2.1.0",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no variable 'pytorch_verison'") && err.contains("pytorch_version"),
        "{err}"
    );
    assert!(!e.dir.join("ran").exists(), "the runtime ran");
    assert_eq!(registry_state(&e), before);
    // A malformed --set, and a recipe that does not exist, the same way.
    let o = cli(
        &e,
        &[
            "build",
            "pytorch-debian",
            "--recipes",
            &shipped(),
            "--name",
            "p",
            "--tag",
            "x",
            "--set",
            "novalue",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("KEY=VALUE"), "{}", text(&o));
    let o = cli(
        &e,
        &[
            "build",
            "pytorch-debain",
            "--recipes",
            &shipped(),
            "--name",
            "p",
            "--tag",
            "x",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("pytorch-debian"), "{}", text(&o));
    assert_eq!(registry_state(&e), before);
}

/// `container_build_timeout` kills the whole build: the stand-in starts a
/// child that would outlive it (as %post's commands would), and both die.
#[test]
fn timeout_kills_the_build_group_and_changes_nothing() {
    let e = env(
        "d=$(dirname \"$0\"); sleep 300 & echo $! > \"$d/child.pid\"; \
         for a; do out=$prev; prev=$a; done; echo partial > \"$out\"; wait",
    );
    let recipes = tiny_recipe(&e);
    let before = registry_state(&e);
    let start = Instant::now();
    let o = cli(
        &e,
        &[
            "build",
            "tiny",
            "--recipes",
            &recipes,
            "--name",
            "tiny",
            "--tag",
            "1",
            "--set",
            "container_build_timeout=2",
        ],
    );
    let took = start.elapsed();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(took >= Duration::from_secs(2), "took {took:?}");
    assert!(text(&o).contains("container_build_timeout"), "{}", text(&o));
    let pid = fs::read_to_string(e.dir.join("child.pid")).unwrap();
    let pid = pid.trim();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists()
        && fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(
            Instant::now() < deadline,
            "the build's child {pid} survived the timeout"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(registry_state(&e), before, "{}", text(&o));
}

/// A build that succeeds: the image lands at <root>/ml-frameworks/
/// <name>-<tag>.sif, in the catalog with its size, sha256 and the recipe's
/// labels, which `show` prints; the rendered definition reached the runtime.
#[test]
fn build_adds_the_image_with_size_sha256_and_labels() {
    let e = env("d=$(dirname \"$0\"); for a; do out=$prev; prev=$a; done; \
         cp \"$prev\" \"$d/seen.def\"; cp \"$d/prebuilt.sif\" \"$out\"");
    let prebuilt = e.dir.join("prebuilt.sif");
    let f = fs::File::create(&prebuilt).unwrap();
    f.write_all_at(&sif::example_header(1 << 20), 0).unwrap();
    f.set_len(1 << 20).unwrap();
    let recipes = tiny_recipe(&e);
    let o = cli(
        &e,
        &[
            "build",
            "tiny",
            "--recipes",
            &recipes,
            "--name",
            "tiny",
            "--tag",
            "1",
            "--default",
            "--set",
            "pytorch_version=1.2.3",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let seen = fs::read_to_string(e.dir.join("seen.def")).unwrap();
    assert!(
        seen.contains("    pytorch 1.2.3\n    build_date 20"),
        "{seen}"
    );
    let image = e.dir.join("containers/ml-frameworks/tiny-1.sif");
    let catalog = fs::read_to_string(e.dir.join("containers/.registry/catalog.toml")).unwrap();
    let sum = integrity::sha256_file(&image).unwrap();
    assert!(catalog.contains(&sum), "{catalog}");
    assert!(catalog.contains("size = 1048576"), "{catalog}");
    let o = cli(&e, &["show", "tiny"]);
    assert!(o.status.success(), "{}", text(&o));
    let shown = String::from_utf8_lossy(&o.stdout);
    for want in [
        "\"pytorch\": \"1.2.3\"",
        "\"recipe\": \"tiny\"",
        "build_date",
    ] {
        assert!(shown.contains(want), "{want}: {shown}");
    }
    // No temporary files left beside the image.
    let names: Vec<String> = fs::read_dir(e.dir.join("containers/ml-frameworks"))
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["tiny-1.sif"]);
    // The same name:tag again: refused before the runtime runs.
    fs::remove_file(e.dir.join("seen.def")).unwrap();
    let o = cli(
        &e,
        &[
            "build",
            "tiny",
            "--recipes",
            &recipes,
            "--name",
            "tiny",
            "--tag",
            "1",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(!e.dir.join("seen.def").exists());
}
