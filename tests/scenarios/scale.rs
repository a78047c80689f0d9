//! At scale: the catalog index in srun and on the
//! nodes, and the node-local image cache: Slurm 24.11 with
//! Apptainer, 2 nodes, jobs as `mluser`. The test nodes share one file
//! system, so the cache key says `%n`: each node gets its own directory,
//! as node-local disks would. Copies are counted from the plugin's own
//! line in each node's slurmd log ("node cache: copied ...").

use std::fs;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use crate::harness::{images, Cluster, Options, Slurm};
use slurm_ml_container::integrity::sha256_file;

crate::on_slurm_24_11!(
    five_concurrent_jobs_copy_once_per_node_and_a_changed_copy_is_replaced,
    eviction_keeps_the_cap_and_spares_images_in_use,
    a_read_only_or_full_cache_falls_back_to_the_registry,
    stage_and_verify_nodes_fill_and_check_every_node,
    srun_and_nodes_resolve_through_the_index_until_the_catalog_changes,
);

const CATALOG: &str = "/opt/containers/.registry/catalog.toml";
const CONFIG: &str = "/etc/slurm/ml-container.toml";
const CACHE: &str = "/var/cache/mlc-node";

fn entry(name: &str, tag: &str, file: &str, sum: &str) -> String {
    format!(
        "[[image]]\nname = \"{name}\"\ntag = \"{tag}\"\npath = \"ml-frameworks/{file}\"\n\
         sha256 = \"{sum}\"\nadded = 2024-01-0{tag}T00:00:00Z\n"
    )
}

fn config(max: &str) -> String {
    format!("[registry]\nnode_cache = \"{CACHE}/%n\"\nnode_cache_max = \"{max}\"\n")
}

fn copies(c: &Cluster, node: usize, image: &str) -> usize {
    c.slurmd_log(node)
        .matches(&format!("node cache: copied {image} "))
        .count()
}

fn cached(c: &Cluster, node: usize, image: &str) -> usize {
    c.slurmd_log(node)
        .lines()
        .filter(|l| l.contains(&format!("node cache: {image} from ")) && l.contains("(cached)"))
        .count()
}

fn markers(c: &Cluster, args: &[&str]) -> Vec<String> {
    let r = c.srun(args);
    r.assert_ok();
    let mut lines: Vec<String> = r.stdout.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

fn five_concurrent_jobs_copy_once_per_node_and_a_changed_copy_is_replaced() {
    let img = images(&["a1"]);
    let sum = sha256_file(&img["a1"]).unwrap();
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default()
            .copy(&img["a1"], "/opt/containers/ml-frameworks/a1.sif")
            .file(
                CATALOG,
                &format!("version = 1\n{}", entry("alpha", "1", "a1.sif", &sum)),
            )
            .file(CONFIG, &config("1G")),
    );
    let jobs: Vec<_> = (0..5)
        .map(|_| c.spawn_srun(&["-N2", "-n2", "--ml-container=alpha", "/bin/cat", "/MARKER"]))
        .collect();
    for j in jobs {
        let r = j.wait();
        r.assert_ok();
        assert_eq!(r.stdout.lines().filter(|l| *l == "a1").count(), 2, "{r}");
    }
    for node in 1..=2 {
        assert_eq!(
            copies(&c, node, "alpha:1"),
            1,
            "n{node}:\n{}",
            c.slurmd_log(node)
        );
        assert_eq!(cached(&c, node, "alpha:1"), 4, "n{node}");
        let copy = c.path_on(node, &format!("{CACHE}/n{node}/images/{sum}.sif"));
        assert_eq!(sha256_file(&copy).unwrap(), sum, "n{node}");
        // The line says the sum was checked while copying.
        assert!(c.slurmd_log(node).contains("sha256 ok"));
    }
    let st = c.run_root(1, &["stat", "-c", "%U %a", &format!("{CACHE}/n1/images")]);
    assert_eq!(st.assert_ok().stdout.trim(), "root 755", "{st}");
    let st = c.run_root(
        1,
        &[
            "stat",
            "-c",
            "%U %a",
            &format!("{CACHE}/n1/images/{sum}.sif"),
        ],
    );
    assert_eq!(st.assert_ok().stdout.trim(), "root 644", "{st}");

    // The copy on n1 changes behind the cache's back (same size): it is
    // detected and copied again before anything runs; n2's is untouched.
    let copy = c.path_on(1, &format!("{CACHE}/n1/images/{sum}.sif"));
    let len = fs::metadata(&copy).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&copy).unwrap();
    f.write_all_at(&[0x5a; 64], len / 2).unwrap();
    drop(f);
    assert_ne!(sha256_file(&copy).unwrap(), sum);
    assert_eq!(
        markers(
            &c,
            &["-N2", "-n2", "--ml-container=alpha", "/bin/cat", "/MARKER"]
        ),
        ["a1", "a1"]
    );
    assert_eq!(copies(&c, 1, "alpha:1"), 2, "{}", c.slurmd_log(1));
    assert_eq!(copies(&c, 2, "alpha:1"), 1);
    assert_eq!(sha256_file(&copy).unwrap(), sum, "the changed copy stayed");
}

/// Waits until no step holds `image`'s entry on `node` (its slurmstepd
/// has exited).
fn until_idle(c: &Cluster, node: usize) {
    let t = Instant::now();
    loop {
        let r = c.run_root(node, &["ml-container", "cache", "list"]);
        if r.ok() && !r.stdout.contains("in-use") {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "still in use: {r}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn eviction_keeps_the_cap_and_spares_images_in_use() {
    let img = images(&["a1", "a2"]);
    let (s1, s2) = (
        sha256_file(&img["a1"]).unwrap(),
        sha256_file(&img["a2"]).unwrap(),
    );
    let (l1, l2) = (
        fs::metadata(&img["a1"]).unwrap().len(),
        fs::metadata(&img["a2"]).unwrap().len(),
    );
    // Room for one of them, not both.
    let cap = l1.max(l2) + l1.min(l2) / 2;
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default()
            .copy(&img["a1"], "/opt/containers/ml-frameworks/a1.sif")
            .copy(&img["a2"], "/opt/containers/ml-frameworks/a2.sif")
            .file(
                CATALOG,
                &format!(
                    "version = 1\n{}{}",
                    entry("alpha", "1", "a1.sif", &s1),
                    entry("alpha", "2", "a2.sif", &s2)
                ),
            )
            .file(CONFIG, &config(&cap.to_string())),
    );
    // alpha:1 in use on n1 for a while.
    let long = c.spawn_srun(&[
        "-N1",
        "-w",
        "n1",
        "--ml-container=alpha:1",
        "/bin/sh",
        "-c",
        "cat /MARKER; sleep 8",
    ]);
    let t = Instant::now();
    while copies(&c, 1, "alpha:1") == 0 {
        assert!(t.elapsed() < Duration::from_secs(60), "{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    // alpha:2 needs room that only evicting alpha:1 would make: it runs
    // from the registry, alpha:1 stays.
    assert_eq!(
        markers(
            &c,
            &[
                "-N1",
                "-w",
                "n1",
                "--ml-container=alpha:2",
                "/bin/cat",
                "/MARKER"
            ]
        ),
        ["a2"]
    );
    let log = c.slurmd_log(1);
    assert!(
        log.contains("not used for alpha:2") && log.contains("running it from the registry"),
        "{log}"
    );
    assert!(c.path(&format!("{CACHE}/n1/images/{s1}.sif")).exists());
    let r = long.wait();
    r.assert_ok();
    assert!(r.stdout.contains("a1"), "{r}");
    until_idle(&c, 1);
    // Now alpha:1 is idle: least recently used, evicted for alpha:2.
    assert_eq!(
        markers(
            &c,
            &[
                "-N1",
                "-w",
                "n1",
                "--ml-container=alpha:2",
                "/bin/cat",
                "/MARKER"
            ]
        ),
        ["a2"]
    );
    let log = c.slurmd_log(1);
    assert!(
        log.contains(&format!("evicted {CACHE}/n1/images/{s1}.sif")),
        "{log}"
    );
    assert_eq!(copies(&c, 1, "alpha:2"), 1, "{log}");
    assert!(!c.path(&format!("{CACHE}/n1/images/{s1}.sif")).exists());
    let total: u64 = fs::read_dir(c.path(&format!("{CACHE}/n1/images")))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".sif"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(total <= cap, "{total} > {cap}");
}

fn a_read_only_or_full_cache_falls_back_to_the_registry() {
    let img = images(&["a1"]);
    let sum = sha256_file(&img["a1"]).unwrap();
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default()
            .copy(&img["a1"], "/opt/containers/ml-frameworks/a1.sif")
            .file(
                CATALOG,
                &format!("version = 1\n{}", entry("alpha", "1", "a1.sif", &sum)),
            )
            .file(CONFIG, &config("1G")),
    );
    // Each node has its own mount namespace: n1's cache is a read-only
    // file system, n2's a full one (64 KiB, the image is larger).
    c.run_root(
        1,
        &[
            "sh",
            "-c",
            &format!("mkdir -p {CACHE}/n1 && mount -t tmpfs -o ro,mode=0755 tmpfs {CACHE}/n1"),
        ],
    )
    .assert_ok();
    c.run_root(
        2,
        &[
            "sh",
            "-c",
            &format!(
                "mkdir -p {CACHE}/n2 && mount -t tmpfs -o size=64k,mode=0755 tmpfs {CACHE}/n2"
            ),
        ],
    )
    .assert_ok();
    for _ in 0..2 {
        assert_eq!(
            markers(
                &c,
                &["-N2", "-n2", "--ml-container=alpha", "/bin/cat", "/MARKER"]
            ),
            ["a1", "a1"]
        );
    }
    let n1 = c.slurmd_log(1);
    let n2 = c.slurmd_log(2);
    for (log, why) in [
        (&n1, "Read-only file system"),
        (&n2, "No space left on device"),
    ] {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("not used for alpha:1"))
            .collect();
        assert_eq!(lines.len(), 2, "{log}");
        assert!(
            lines
                .iter()
                .all(|l| l.contains(why) && l.contains("running it from the registry")),
            "{lines:?}"
        );
    }
    assert_eq!(copies(&c, 1, "alpha:1") + copies(&c, 2, "alpha:1"), 0);
    // No partial copy left on the full disk.
    let left = c.run_root(2, &["sh", "-c", &format!("ls -A {CACHE}/n2/images")]);
    assert_eq!(left.assert_ok().stdout.trim(), "", "{left}");
}

fn stage_and_verify_nodes_fill_and_check_every_node() {
    let img = images(&["a1"]);
    let sum = sha256_file(&img["a1"]).unwrap();
    let size = fs::metadata(&img["a1"]).unwrap().len();
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default()
            .copy(&img["a1"], "/opt/containers/ml-frameworks/a1.sif")
            .file(
                CATALOG,
                &format!("version = 1\n{}", entry("alpha", "1", "a1.sif", &sum)),
            )
            .file(CONFIG, &config("1G")),
    );
    let verify = |what: &str| {
        let r = c.run_root(1, &["ml-container", "verify", "--nodes", "n[1-2]", "alpha"]);
        r.assert_ok();
        let lines: Vec<&str> = r.stdout.lines().collect();
        assert_eq!(lines.len(), 2, "one line per node: {r}");
        for (i, l) in lines.iter().enumerate() {
            assert!(
                l.starts_with(&format!("n{}: alpha:1: {what}", i + 1)),
                "{r}"
            );
            assert!(l.contains(&format!("size {size}")), "{r}");
        }
        r.stdout.clone()
    };
    verify("in registry only");
    // As root (the cache is root's), through srun: one task per node.
    let r = c.run_root(1, &["ml-container", "stage", "alpha", "--nodes", "n[1-2]"]);
    r.assert_ok();
    for node in 1..=2 {
        assert!(
            r.stdout.contains(&format!("n{node}: alpha:1 copied to {CACHE}/n{node}/images/{sum}.sif ({size} bytes, sha256 ok")),
            "{r}"
        );
        assert_eq!(
            sha256_file(&c.path_on(node, &format!("{CACHE}/n{node}/images/{sum}.sif"))).unwrap(),
            sum
        );
    }
    let out = verify("in cache");
    assert_eq!(out.matches("sha256 ok").count(), 2, "{out}");
    // Staged again: nothing copied.
    let r = c.run_root(1, &["ml-container", "stage", "alpha", "--nodes", "n[1-2]"]);
    assert_eq!(
        r.assert_ok().stdout.matches("already cached").count(),
        2,
        "{r}"
    );
    // A job now copies nothing: both nodes run the staged copy.
    assert_eq!(
        markers(
            &c,
            &["-N2", "-n2", "--ml-container=alpha", "/bin/cat", "/MARKER"]
        ),
        ["a1", "a1"]
    );
    for node in 1..=2 {
        assert_eq!(copies(&c, node, "alpha:1"), 0);
        assert_eq!(cached(&c, node, "alpha:1"), 1, "{}", c.slurmd_log(node));
    }
    // A node whose copy changed is named, and verify fails.
    let copy = c.path_on(2, &format!("{CACHE}/n2/images/{sum}.sif"));
    let f = fs::OpenOptions::new().write(true).open(&copy).unwrap();
    f.write_all_at(b"zz", 100).unwrap();
    drop(f);
    let r = c.run_root(1, &["ml-container", "verify", "--nodes", "n[1-2]", "alpha"]);
    r.assert_failed();
    assert!(r.stdout.contains("n1: alpha:1: in cache"), "{r}");
    assert!(
        r.stdout.contains("n2: alpha:1: in cache") && r.stdout.contains("CHANGED"),
        "{r}"
    );
}

/// The catalog index in srun and on the nodes: an index that (for this
/// test only, written by root) says alpha means a2 while the catalog says
/// a1 proves both read the index, not the catalog; a touch of the catalog
/// then makes it stale, and everybody reads the catalog again.
fn srun_and_nodes_resolve_through_the_index_until_the_catalog_changes() {
    use slurm_ml_container::catalog::Catalog;
    use slurm_ml_container::catalog_index::{self, Identity};
    let img = images(&["a1", "a2"]);
    let (s1, s2) = (
        sha256_file(&img["a1"]).unwrap(),
        sha256_file(&img["a2"]).unwrap(),
    );
    let truth = format!(
        "version = 1\n{}{}",
        entry("alpha", "1", "a1.sif", &s1),
        entry("beta", "2", "a2.sif", &s2)
    );
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default()
            .copy(&img["a1"], "/opt/containers/ml-frameworks/a1.sif")
            .copy(&img["a2"], "/opt/containers/ml-frameworks/a2.sif")
            .file(CATALOG, &truth),
    );
    let run = || {
        markers(
            &c,
            &["-N2", "-n2", "--ml-container=alpha", "/bin/cat", "/MARKER"],
        )
    };
    assert_eq!(run(), ["a1", "a1"]);
    // The CLI indexes the catalog; the answer is the same.
    let r = c.run_root(1, &["ml-container", "reindex"]);
    assert!(
        r.assert_ok().stdout.contains("indexed 2 catalog entries"),
        "{r}"
    );
    assert_eq!(run(), ["a1", "a1"]);
    // An index for this very catalog file that says otherwise.
    let lie = Catalog::parse(
        std::path::Path::new("lie"),
        &truth.replace("ml-frameworks/a1.sif", "ml-frameworks/a2.sif"),
    )
    .unwrap();
    let id = Identity::of(&fs::metadata(c.path(CATALOG)).unwrap());
    let text = catalog_index::render(&lie, &id).unwrap();
    let index = c.path(&format!("/opt/containers/{}", catalog_index::INDEX_PATH));
    fs::write(&index, text).unwrap();
    assert_eq!(
        run(),
        ["a2", "a2"],
        "srun and the nodes did not use the index"
    );
    // Any change to the catalog (here only its times) makes it stale.
    c.run_root(1, &["touch", CATALOG]).assert_ok();
    assert_eq!(run(), ["a1", "a1"], "a stale index was believed");
}
