//! Registry, catalog and resolution: Slurm 24.11 with
//! Apptainer, 2 nodes, jobs as `mluser`. Each test image carries /MARKER
//! with its own name, so the output says which image really ran.

use std::fs;
use std::path::Path;

use crate::harness::{images, Cluster, Options, Slurm, HOME, REGISTRY};
use slurm_ml_container::integrity::sha256_file;

crate::on_slurm_24_11!(
    truncated_image_refused_under_quick,
    flipped_byte_refused_under_full_and_hash_cached,
    untrusted_catalog_refused,
);
crate::on_apptainer_slurms!(
    images_run_by_name_tag_alias_scan_and_path,
    escapes_are_refused_in_srun_before_any_node_runs,
    catalog_rewritten_mid_launch_fails_the_step_clearly,
);

const CATALOG: &str = "/opt/containers/.registry/catalog.toml";

/// The markers every run printed, one per task.
fn markers(c: &Cluster, image: &str, tasks: &str) -> Vec<String> {
    let r = c.srun(&[
        "-N2",
        "-n",
        tasks,
        &format!("--ml-container={image}"),
        "/bin/cat",
        "/MARKER",
    ]);
    r.assert_ok();
    let mut lines: Vec<String> = r.stdout.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

fn entry(name: &str, tag: &str, path: &str, extra: &str) -> String {
    format!("[[image]]\nname = \"{name}\"\ntag = \"{tag}\"\npath = \"{path}\"\n{extra}\n")
}

fn images_run_by_name_tag_alias_scan_and_path(slurm: Slurm) {
    let img = images(&["a1", "a2", "b1", "scan", "direct"]);
    let catalog = format!(
        "version = 1\n{}{}{}",
        entry(
            "alpha",
            "1",
            "ml-frameworks/a1.sif",
            "added = 2024-01-01T00:00:00Z"
        ),
        entry(
            "alpha",
            "2",
            "ml-frameworks/a2.sif",
            "added = 2024-06-01T00:00:00Z"
        ),
        entry(
            "beta",
            "1",
            "/opt/containers/custom-images/b1.sif",
            "aliases = [\"nvcr.io/nvidia/pytorch:24.01-py3\"]\ndefault = true"
        ),
    );
    let c = Cluster::start_with(
        slurm,
        Options::default()
            .copy(&img["a1"], "/opt/containers/ml-frameworks/a1.sif")
            .copy(&img["a2"], "/opt/containers/ml-frameworks/a2.sif")
            .copy(&img["b1"], "/opt/containers/custom-images/b1.sif")
            .copy(&img["scan"], "/opt/containers/custom-images/scanme.sif")
            .copy(&img["direct"], "/opt/containers/base-images/direct.sif")
            .file(CATALOG, &catalog),
    );
    // A bare name: no default, so the newest `added`.
    assert_eq!(markers(&c, "alpha", "2"), ["a2", "a2"]);
    assert_eq!(markers(&c, "alpha:1", "2"), ["a1", "a1"]);
    assert_eq!(markers(&c, "beta", "2"), ["b1", "b1"]);
    assert_eq!(
        markers(&c, "nvcr.io/nvidia/pytorch:24.01-py3", "2"),
        ["b1", "b1"]
    );
    assert_eq!(markers(&c, "scanme", "2"), ["scan", "scan"]);
    assert_eq!(
        markers(&c, "/opt/containers/base-images/direct.sif", "3"),
        ["direct", "direct", "direct"]
    );
    // Tasks run as the user, inside the image (its busybox, not the host's).
    let r = c.srun(&[
        "-N1",
        "--ml-container=alpha",
        "/bin/sh",
        "-c",
        "id -u; ls /bin/cat -l",
    ]);
    r.assert_ok();
    assert!(r.stdout.starts_with("1500\n"), "{r}");
    assert!(r.stdout.contains("busybox"), "{r}");

    // An unknown name lists the closest ones.
    let r = c.srun(&["-N2", "--ml-container=alhpa", "/bin/true"]);
    r.assert_failed();
    assert!(
        r.stderr.contains("unknown image 'alhpa'; closest: alpha"),
        "{r}"
    );
    assert!(r.stderr.contains("ml-container list"), "{r}");
}

fn escapes_are_refused_in_srun_before_any_node_runs(slurm: Slurm) {
    let img = images(&["a1"]);
    let c = Cluster::start_with(
        slurm,
        Options::default()
            .copy(&img["a1"], "/opt/containers/ml-frameworks/a1.sif")
            .copy(&img["a1"], "/srv/elsewhere/evil.sif"),
    );
    // A symlink inside the registry pointing out of it, planted by root.
    c.run_root(
        1,
        &[
            "sh",
            "-c",
            "mkdir -p /opt/containers/base-images && \
             ln -s /srv/elsewhere/evil.sif /opt/containers/base-images/escape.sif",
        ],
    )
    .assert_ok();
    let marker = format!("{HOME}/ran");
    const OUTSIDE: &str = "outside the allowed image directories";
    for (image, why) in [
        ("/srv/elsewhere/evil.sif", OUTSIDE),
        ("/opt/containers/../srv/elsewhere/evil.sif", OUTSIDE),
        (
            "/opt/containers/ml-frameworks/../../../srv/elsewhere/evil.sif",
            OUTSIDE,
        ),
        ("escape", OUTSIDE),
        ("../srv/elsewhere/evil.sif", "invalid image"),
        ("/etc/passwd", "invalid image"),
    ] {
        let r = c.srun(&[
            "-N2",
            &format!("--ml-container={image}"),
            "/bin/touch",
            &marker,
        ]);
        r.assert_failed();
        assert!(r.stderr.contains(why), "{image}: {r}");
        assert!(!c.path(&marker).exists(), "{image}: a task ran");
    }
    // Nothing was allocated by any of the refused runs.
    let r = c.srun(&["-N1", "sh", "-c", "echo $SLURM_JOB_ID"]);
    assert_eq!(r.assert_ok().stdout.trim(), "1", "{r}");
}

/// The node never believes srun (docs/DESIGN.md, Decisions): a node resolves the image again from its
/// own catalog and srun's pin may only confirm it, so a catalog rewritten
/// while srun waits fails the step with a clear message (it used to run
/// the pinned image, which meant believing a value the user can set).
fn catalog_rewritten_mid_launch_fails_the_step_clearly(slurm: Slurm) {
    let img = images(&["a1", "a2"]);
    let first = format!(
        "version = 1\n{}{}",
        entry("alpha", "1", "ml-frameworks/a1.sif", ""),
        entry("alpha", "2", "ml-frameworks/a2.sif", "default = true"),
    );
    let c = Cluster::start_with(
        slurm,
        Options::default()
            .copy(&img["a1"], "/opt/containers/ml-frameworks/a1.sif")
            .copy(&img["a2"], "/opt/containers/ml-frameworks/a2.sif")
            .file(CATALOG, &first),
    );
    let rewritten = first.replace("default = true", "").replace(
        "path = \"ml-frameworks/a1.sif\"\n",
        "path = \"ml-frameworks/a1.sif\"\ndefault = true\n",
    );

    // Occupy both nodes (Cluster::hold_every_node), so the next srun
    // resolves and pins, then waits; Cluster::wait_pending_besides waits
    // for that srun to pend (init_post_opt runs before the allocation
    // request, so it has resolved its image by then).
    let launch = || {
        c.spawn_srun(&[
            "-N2",
            "-n2",
            "--exclusive",
            "--ml-container=alpha",
            "/bin/cat",
            "/MARKER",
        ])
    };

    // 1. The catalog now says alpha = a1; srun chose a2: no node runs
    // either, and the user is told why.
    let holder = c.hold_every_node("8");
    let bg = launch();
    c.wait_pending_besides(&holder);
    c.write(CATALOG, &rewritten, 0o644);
    let r = bg.wait();
    r.assert_failed();
    assert!(r.stderr.contains("changed after srun chose it"), "{r}");
    assert!(
        r.stderr
            .contains("the catalog was rewritten during the launch"),
        "{r}"
    );
    assert!(r.stderr.contains("submit it again"), "{r}");
    assert!(
        !r.stdout.contains("a1") && !r.stdout.contains("a2"),
        "a node ran an image: {r}"
    );
    // A new step follows the new catalog.
    assert_eq!(markers(&c, "alpha", "2"), ["a1", "a1"]);

    // 2. The pinned file disappears while the step waits: it fails clearly.
    let holder = c.hold_every_node("8");
    let bg = launch();
    c.wait_pending_besides(&holder);
    c.remove("/opt/containers/ml-frameworks/a1.sif");
    let r = bg.wait();
    r.assert_failed();
    assert!(r.stderr.contains("a1.sif cannot be used"), "{r}");
    assert!(!r.stdout.contains("a2"), "a node ran another image: {r}");
}

/// `src` cut to `len` bytes, in a temp file of the test's own (removed on
/// drop).
fn truncated(src: &Path, len: u64) -> tempfile::NamedTempFile {
    let out = tempfile::NamedTempFile::new().unwrap();
    let data = fs::read(src).unwrap();
    fs::write(out.path(), &data[..len as usize]).unwrap();
    out
}

fn truncated_image_refused_under_quick() {
    let img = images(&["a1"]);
    let full = fs::metadata(&img["a1"]).unwrap().len();
    let cut = truncated(&img["a1"], full / 2);
    let catalog = format!(
        "version = 1\n{}",
        entry(
            "cut",
            "1",
            "ml-frameworks/cut.sif",
            &format!("size = {full}")
        ),
    );
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default()
            .copy(cut.path(), "/opt/containers/ml-frameworks/cut.sif")
            .copy(cut.path(), "/opt/containers/custom-images/cutscan.sif")
            .file(CATALOG, &catalog),
    );
    drop(cut);
    // The catalog knows the size.
    let r = c.srun(&["-N2", "--ml-container=cut", "/bin/true"]);
    r.assert_failed();
    assert!(
        r.stderr.contains(&format!("the catalog says {full}")),
        "{r}"
    );
    // Found by the scan, no size known: the SIF structure gives it away.
    let r = c.srun(&["-N2", "--ml-container=cutscan", "/bin/true"]);
    r.assert_failed();
    assert!(r.stderr.contains("is not a sound SIF file"), "{r}");
}

fn flipped_byte_refused_under_full_and_hash_cached() {
    let img = images(&["a1"]);
    let good_sum = sha256_file(&img["a1"]).unwrap();
    // Flip one byte in the middle of the squashfs partition: same size,
    // sound structure, different content.
    let mut data = fs::read(&img["a1"]).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    let tmp = tempfile::tempdir().unwrap();
    let flipped = tmp.path().join("flipped.sif");
    fs::write(&flipped, &data).unwrap();
    let catalog = format!(
        "version = 1\n{}{}",
        entry(
            "good",
            "1",
            "ml-frameworks/good.sif",
            &format!("sha256 = \"{good_sum}\"")
        ),
        entry(
            "flipped",
            "1",
            "ml-frameworks/flipped.sif",
            &format!("sha256 = \"{good_sum}\"")
        ),
    );
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default()
            .copy(&img["a1"], "/opt/containers/ml-frameworks/good.sif")
            .copy(&flipped, "/opt/containers/ml-frameworks/flipped.sif")
            .file(CATALOG, &catalog)
            .file(
                "/etc/slurm/ml-container.toml",
                "[registry]\nverify = \"full\"\n",
            ),
    );
    drop(tmp);

    // quick would pass the flipped image; full refuses it, on every node.
    let r = c.srun(&["-N2", "--ml-container=flipped", "/bin/cat", "/MARKER"]);
    r.assert_failed();
    assert!(r.stderr.contains("corrupted or was replaced"), "{r}");
    assert!(!r.stdout.contains("a1"), "{r}");

    assert_eq!(markers(&c, "good", "2"), ["a1", "a1"]);
    assert_eq!(markers(&c, "good", "2"), ["a1", "a1"]);
    for node in 1..=2 {
        let log = c.slurmd_log(node);
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("image good:1 = "))
            .collect();
        assert_eq!(lines.len(), 2, "n{node}: verify lines:\n{log}");
        assert!(
            lines[0].contains("sha256 hashed in"),
            "n{node}: {}",
            lines[0]
        );
        assert!(
            lines[1].contains("sha256 (cached on this node)"),
            "n{node}: {}",
            lines[1]
        );
    }
    let cache = c.run_root(
        1,
        &[
            "stat",
            "-c",
            "%U %a",
            "/var/cache/slurm-ml-container/sha256",
        ],
    );
    assert_eq!(cache.assert_ok().stdout.trim(), "root 755", "{cache}");
}

fn untrusted_catalog_refused() {
    let img = images(&["a1"]);
    let catalog = format!(
        "version = 1\n{}",
        entry("alpha", "1", "ml-frameworks/a1.sif", "")
    );
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default()
            .copy(&img["a1"], "/opt/containers/ml-frameworks/a1.sif")
            .file(CATALOG, &catalog),
    );
    assert_eq!(markers(&c, "alpha", "2"), ["a1", "a1"]);
    c.run_root(1, &["chmod", "0666", CATALOG]).assert_ok();
    let r = c.srun(&["-N2", "--ml-container=alpha", "/bin/true"]);
    r.assert_failed();
    assert!(r.stderr.contains("writable by group or others"), "{r}");
    c.run_root(1, &["chmod", "0644", CATALOG]).assert_ok();
    c.run_root(1, &["chown", "mluser", CATALOG]).assert_ok();
    let r = c.srun(&["-N2", "--ml-container=alpha", "/bin/true"]);
    r.assert_failed();
    assert!(r.stderr.contains("not by a trusted owner"), "{r}");
    let _ = REGISTRY;
}
