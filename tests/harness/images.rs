//! The test images: busybox SIFs with a marker, plain squashfs images, the
//! MPI image; built once and cached under target/.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};

use super::slurm::{manifest_dir, target_dir};
use super::{scratch_dir, Cluster, Options, Slurm};

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
    let tmp = scratch_dir();
    let tree = tmp.path();
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
        .arg(tree)
        .arg(&out)
        .args(["-noappend", "-quiet", "-no-progress", "-all-root"])
        .status()
        .expect("run mksquashfs (apt-get install squashfs-tools)");
    assert!(st.success(), "mksquashfs failed");
    out
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
