//! Security, part 1: what root in slurmstepd opens, hashes and believes.
//! Slurm 24.11 with Apptainer, 2 nodes, jobs as the unprivileged `mluser`
//! (and `mluser2`, who shares its primary group). Each scenario reproduces
//! a red-team finding and shows it held: a FIFO swapped in for an image, a
//! forged pin, a cancelled full hash, the bind-source existence oracle,
//! root-only registry files, an untrusted site config.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{images, wait_for, Cluster, Options, Run, Slurm, HOME, USER};

crate::on_slurm_24_11!(
    a_fifo_swapped_in_for_an_image_never_blocks_a_node,
    a_forged_pin_is_never_believed,
    scancel_during_a_full_hash_frees_the_node,
    the_report_is_no_bind_source_existence_oracle,
    root_only_registry_files_leak_nothing,
    the_hash_cache_trusts_only_roots_own_entries,
    an_untrusted_site_config_is_refused_on_the_nodes,
    the_nodes_resolve_when_srun_cannot_read_the_registry,
    denied_bind_spellings_are_refused_in_srun_and_on_the_nodes,
);

const CATALOG: &str = "/opt/containers/.registry/catalog.toml";
const CONFIG: &str = "/etc/slurm/ml-container.toml";
const METRICS: &str = "/var/log/slurm/job_metrics.log";
/// An image directory users may write to (users' own custom
/// containers), allowed for absolute image paths.
const USER_DIR: &str = "/srv/user-images";
/// Slurm's carrier of the option from srun to the nodes; a user can set it
/// in srun's environment without passing the option to srun.
const OPTION_ENV: &str = "_SLURM_SPANK_OPTION_ml_container_ml_container";

fn entry(name: &str, tag: &str, path: &str, extra: &str) -> String {
    format!("[[image]]\nname = \"{name}\"\ntag = \"{tag}\"\npath = \"{path}\"\n{extra}\n")
}

/// Both nodes idle again (no job, no step left behind).
fn nodes_idle(c: &Cluster) -> bool {
    let r = c.run(1, &[], &["sinfo", "-h", "-N", "-o", "%T"]);
    r.ok() && !r.stdout.trim().is_empty() && r.stdout.lines().all(|l| l.trim() == "idle")
}

/// No slurmstepd of a job step is left on any node.
fn no_step_daemons(c: &Cluster) -> bool {
    let r = c.run_root(1, &["sh", "-c", "ps -eo args | grep '^slurmstepd' || true"]);
    r.stdout.trim().is_empty()
}

/// The `a1` image in the registry as catalog entry `alpha:1`, then the
/// catalog entries `more`.
fn with_alpha(more: &str) -> Options {
    let img = images(&["a1"]);
    Options::default()
        .copy(&img["a1"], "/opt/containers/ml-frameworks/a1.sif")
        .file(
            CATALOG,
            &format!(
                "version = 1\n{}{more}",
                entry("alpha", "1", "ml-frameworks/a1.sif", "")
            ),
        )
}

/// Every log a job string could reach: both slurmd logs and the metrics log.
fn all_logs(c: &Cluster) -> String {
    format!(
        "{}\n{}\n{}",
        c.slurmd_log(1),
        c.slurmd_log(2),
        c.read(METRICS)
    )
}

/// An image in a user-writable allowed directory is swapped for a FIFO
/// after srun checked it: slurmstepd's open used to block until someone
/// opened the FIFO's other end, scancel did nothing, and the node stayed
/// COMPLETING for everyone.
fn a_fifo_swapped_in_for_an_image_never_blocks_a_node() {
    let c = Cluster::start_with(
        Slurm::V24_11,
        with_alpha("").file(
            CONFIG,
            &format!("[registry]\nallowed_dirs = [\"/opt/containers\", \"{USER_DIR}\"]\n"),
        ),
    );
    c.run_root(
        1,
        &[
            "sh",
            "-c",
            &format!("mkdir -p {USER_DIR} && chmod 1777 {USER_DIR}"),
        ],
    )
    .assert_ok();
    let mine = format!("{USER_DIR}/mine.sif");
    c.run(
        1,
        &[],
        &["cp", "/opt/containers/ml-frameworks/a1.sif", &mine],
    )
    .assert_ok();
    // The image as it is: it runs.
    let r = c.srun(&[
        "-N1",
        &format!("--ml-container={mine}"),
        "/bin/cat",
        "/MARKER",
    ]);
    assert_eq!(r.assert_ok().stdout.trim(), "a1", "{r}");

    // srun resolves and checks the regular file, then waits for the nodes;
    // meanwhile the user swaps in a FIFO that nobody ever opens for writing.
    let holder = c.hold_every_node("5");
    let started = Instant::now();
    let bg = c.spawn_srun(&[
        "-N2",
        "--exclusive",
        &format!("--ml-container={mine}"),
        "/bin/cat",
        "/MARKER",
    ]);
    c.wait_pending_besides(&holder);
    c.run(
        1,
        &[],
        &["sh", "-c", &format!("rm {mine} && mkfifo {mine}")],
    )
    .assert_ok();
    let r = bg.wait();
    let took = started.elapsed();
    r.assert_failed();
    assert!(r.stderr.contains("is not a regular file"), "{r}");
    assert!(r.stderr.contains("mine.sif"), "{r}");
    assert!(!r.stdout.contains("a1"), "{r}");
    // The holder sleeps 5 s; the step itself must fail within seconds.
    assert!(
        took < Duration::from_secs(25),
        "the step took {took:?}: {r}\n{}",
        c.logs()
    );
    assert!(
        wait_for(Duration::from_secs(10), || (nodes_idle(&c)
            && no_step_daemons(&c))
        .then_some(()))
        .is_some(),
        "the nodes did not return to idle:\n{}",
        c.logs()
    );

    // The race itself: the name flips between the regular file and a FIFO
    // all the time (rename(2) is atomic), so checks by path and opens by
    // path see different files. Apptainer, run as the user, may itself open
    // the FIFO and wait: that is the user's own task, which `timeout` and
    // scancel end. What must never happen is root waiting: then scancel
    // did nothing and the node stayed COMPLETING for everyone.
    let swapper = format!(
        "cd {USER_DIR} && cp /opt/containers/ml-frameworks/a1.sif r.sif && mkfifo p && \
         (timeout 120 sh -c 'while [ ! -e stop ]; do ln -f r.sif t1; mv -f t1 mine.sif; \
          ln -f p t2; mv -f t2 mine.sif; done' >/dev/null 2>&1 &)"
    );
    c.run(1, &[], &["sh", "-c", &format!("rm -f {mine} && {swapper}")])
        .assert_ok();
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        let r = c.run(
            1,
            &[],
            &[
                "timeout",
                "10",
                "srun",
                "-N2",
                &format!("--ml-container={mine}"),
                "/bin/cat",
                "/MARKER",
            ],
        );
        assert!(!r.stderr.contains("panicked"), "{r}");
        outcomes.push(r.code);
    }
    c.run(1, &[], &["touch", &format!("{USER_DIR}/stop")])
        .assert_ok();
    c.run(1, &[], &["scancel", "--user", USER]).assert_ok();
    assert!(
        wait_for(Duration::from_secs(10), || (nodes_idle(&c)
            && no_step_daemons(&c))
        .then_some(()))
        .is_some(),
        "the nodes did not return to idle within 10 s of scancel ({outcomes:?}):\n{}",
        c.logs()
    );
    // Another user's job runs on both nodes.
    let r = c.run_as_user2(
        1,
        &[],
        &["srun", "-N2", "--ml-container=alpha", "/bin/cat", "/MARKER"],
    );
    assert_eq!(
        r.assert_ok().stdout.lines().collect::<Vec<_>>(),
        ["a1", "a1"],
        "{r}"
    );
}

/// `ML_CONTAINER_HANDOFF` (srun's pin and argv for the nodes) and Slurm's
/// option variable set by hand in the job environment: srun sees no option
/// and leaves the handoff alone, so the nodes get the forged pin. It used
/// to run a withdrawn image (still under the registry root, but in no
/// catalog entry and no search directory) under a catalog name, hash it,
/// and put the forged name into the logs.
fn a_forged_pin_is_never_believed() {
    let img = images(&["tiny", "withdrawn"]);
    let tiny_sum = slurm_ml_container::integrity::sha256_file(&img["tiny"]).unwrap();
    let withdrawn_size = std::fs::metadata(&img["withdrawn"]).unwrap().len();
    let withdrawn_sum = slurm_ml_container::integrity::sha256_file(&img["withdrawn"]).unwrap();
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default()
            .copy(&img["tiny"], "/opt/containers/ml-frameworks/tiny.sif")
            .copy(&img["withdrawn"], "/opt/containers/withdrawn/old.sif")
            .file(
                CATALOG,
                &format!(
                    "version = 1\n{}",
                    entry(
                        "tiny",
                        "1.0",
                        "ml-frameworks/tiny.sif",
                        &format!("sha256 = \"{tiny_sum}\"")
                    )
                ),
            )
            .file(CONFIG, "[registry]\nverify = \"full\"\n"),
    );
    let handoff = |version: u32, name: &str| {
        format!(
            "{{\"version\":{version},\"pin\":{{\"reference\":\"tiny\",\"source\":\"catalog\",\
             \"name\":\"{name}\",\"tag\":\"1.0\",\
             \"path\":\"/opt/containers/withdrawn/old.sif\",\"size\":{withdrawn_size},\
             \"catalog_size\":null,\"sha256\":\"{withdrawn_sum}\"}},\"srun_argv\":[]}}"
        )
    };
    let huge = "x".repeat(120_000);
    for forged in [
        handoff(1, "tiny"),
        handoff(1, "tiny\\nFORGED-LINE error: all is well"),
        handoff(1, &huge),
        handoff(2, "tiny"),
        "FORGED garbage".to_string(),
    ] {
        let r = c.srun_env(
            &[("ML_CONTAINER_HANDOFF", &forged), (OPTION_ENV, "tiny")],
            &["-N2", "/bin/cat", "/MARKER"],
        );
        r.assert_failed();
        assert!(
            !r.stdout.contains("withdrawn"),
            "the withdrawn image ran: {r}"
        );
        assert!(
            r.stderr.contains("changed after srun chose it")
                || r.stderr
                    .contains("do not set ML_CONTAINER_HANDOFF yourself"),
            "{r}"
        );
        assert!(
            !r.stderr.contains("FORGED") && !r.stderr.contains("xxxxxxxx"),
            "{r}"
        );
    }
    // The real image still runs, by name, verified against the catalog.
    let r = c.srun(&["-N2", "--ml-container=tiny", "/bin/cat", "/MARKER"]);
    assert_eq!(
        r.assert_ok().stdout.lines().collect::<Vec<_>>(),
        ["tiny", "tiny"],
        "{r}"
    );

    let logs = all_logs(&c);
    // Root never read nor hashed the file outside the catalog...
    assert!(!logs.contains("/opt/containers/withdrawn"), "{logs}");
    assert!(!logs.contains(&withdrawn_sum), "{logs}");
    // ... and the only hash on each node was the catalog image's.
    for node in 1..=2 {
        let log = c.slurmd_log(node);
        let hashed: Vec<&str> = log.lines().filter(|l| l.contains("hashed in")).collect();
        assert_eq!(hashed.len(), 1, "n{node}: {hashed:?}");
        assert!(hashed[0].contains("tiny.sif"), "n{node}: {}", hashed[0]);
    }
    // No forged name, no injected line, no 120 KB name in any log.
    assert!(!logs.contains("FORGED"), "{logs}");
    assert!(!logs.contains(&huge[..1000]), "a forged name reached a log");
}

/// `scancel` while a node hashes a large catalog image under verify =
/// "full": the hash used to go on for minutes, the node blocked for others.
fn scancel_during_a_full_hash_frees_the_node() {
    let img = images(&["a1"]);
    let a1_sum = slurm_ml_container::integrity::sha256_file(&img["a1"]).unwrap();
    const BIG: u64 = 40 << 30;
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default()
            .copy(&img["a1"], "/opt/containers/ml-frameworks/a1.sif")
            .file(
                CATALOG,
                &format!(
                    "version = 1\n{}{}",
                    entry(
                        "alpha",
                        "1",
                        "ml-frameworks/a1.sif",
                        &format!("sha256 = \"{a1_sum}\"")
                    ),
                    entry(
                        "big",
                        "1",
                        "ml-frameworks/big.sif",
                        &format!("size = {BIG}\nsha256 = \"{}\"", "0".repeat(64))
                    )
                ),
            )
            .file(CONFIG, "[registry]\nverify = \"full\"\n"),
    );
    // A real SIF grown to 40 GiB with a hole: sound structure, a long hash.
    c.run_root(
        1,
        &[
            "sh",
            "-c",
            "cp /opt/containers/ml-frameworks/a1.sif /opt/containers/ml-frameworks/big.sif && \
             truncate -s 40G /opt/containers/ml-frameworks/big.sif && \
             chmod 644 /opt/containers/ml-frameworks/big.sif",
        ],
    )
    .assert_ok();
    let bg = c.spawn_srun(&["-N1", "-w", "n1", "--ml-container=big", "/bin/true"]);
    // Until the step's slurmstepd exists (it hashes from init_post_opt),
    // then a little longer, well inside the hash.
    wait_for(Duration::from_secs(20), || {
        let q = c.run(1, &[], &["squeue", "-h", "-s", "-o", "%i"]);
        q.stdout.contains(".0").then_some(())
    })
    .unwrap_or_else(|| panic!("the step never started:\n{}", c.logs()));
    std::thread::sleep(Duration::from_secs(2));
    let hashing = c.slurmd_log(1);
    assert!(
        !hashing.contains("image big:1 = "),
        "the hash ended before scancel: the test proves nothing:\n{hashing}"
    );
    let cancelled = Instant::now();
    c.run(1, &[], &["scancel", "--user", USER]).assert_ok();
    let freed = wait_for(Duration::from_secs(30), || {
        (nodes_idle(&c) && no_step_daemons(&c)).then(|| cancelled.elapsed())
    });
    let _ = bg.wait();
    let freed = freed.unwrap_or_else(|| panic!("n1 not freed within 30 s:\n{}", c.logs()));
    assert!(
        freed < Duration::from_secs(10),
        "n1 freed only after {freed:?}:\n{}",
        c.logs()
    );
    let log = c.slurmd_log(1);
    assert!(log.contains("cancelled while image"), "{log}");
    // Another user's job runs there at once.
    let r = c.run_as_user2(
        1,
        &[],
        &[
            "srun",
            "-N1",
            "-w",
            "n1",
            "--ml-container=alpha",
            "/bin/cat",
            "/MARKER",
        ],
    );
    assert_eq!(r.assert_ok().stdout.trim(), "a1", "{r}");
}

/// The report of job `job` step 0 on n1.
fn report(c: &Cluster, job: &str) -> Value {
    let path = c.path(&format!("/var/log/slurm/debug/{job}/0.n1.json"));
    let text = wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(&path).ok()
    })
    .unwrap_or_else(|| panic!("no report for job {job}:\n{}", c.logs()));
    serde_json::from_str(&text).expect("report is JSON")
}

/// A bind source re-pointed during the job at a path only root can
/// see, then exit 255: root's stat in task_exit used to tell an existing
/// path from a missing one in the report.
fn the_report_is_no_bind_source_existence_oracle() {
    let c = Cluster::start_with(Slurm::V24_11, with_alpha(""));
    c.run_root(
        1,
        &[
            "sh",
            "-c",
            "mkdir -p /root/secret && chmod 700 /root && rm -rf /root/nothing",
        ],
    )
    .assert_ok();
    let link = format!("{HOME}/link");
    // A fresh cluster: these are jobs 1 and 2.
    let issues = |target: &str, job: &str| -> String {
        c.run(
            1,
            &[],
            &[
                "sh",
                "-c",
                &format!("mkdir -p {HOME}/real && ln -sfn {HOME}/real {link}"),
            ],
        )
        .assert_ok();
        let r = c.srun(&[
            "-N1",
            "-w",
            "n1",
            "--ml-container=alpha",
            &format!("--ml-container-mounts={link}:/data"),
            "/bin/sh",
            "-c",
            &format!("ln -sfn {target} {link}; exit 255"),
        ]);
        assert_eq!(r.code, Some(255), "{r}");
        let rep = report(&c, job);
        // The one issue about exit 255 (the others name per-job ports).
        rep["issues_found"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|i| i.contains("exited 255"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let secret = issues("/root/secret", "1");
    let nothing = issues("/root/nothing", "2");
    // Asked as the user, both are invisible: the same answer.
    let missing = format!("bind source {link} is missing");
    assert!(secret.contains(&missing), "{secret}");
    assert!(nothing.contains(&missing), "{nothing}");
    assert_eq!(secret, nothing);
}

/// Root-only (0600) files in the registry, named by the catalog, by
/// the scan and by absolute path, reached on the nodes through Slurm's
/// option variable (srun, as the user, refuses them itself): no message
/// carries their bytes, size or sha256.
fn root_only_registry_files_leak_nothing() {
    const SECRET: &str = "SECRET-PW=hunter2-hunter2-hunter2";
    let c = Cluster::start_with(
        Slurm::V24_11,
        with_alpha(&entry(
            "secret",
            "1",
            "ml-frameworks/secret.sif",
            "size = 1",
        ))
        .file(CONFIG, "[registry]\nverify = \"full\"\n"),
    );
    // Text, and a real image, both readable by root only.
    c.run_root(
        1,
        &[
            "sh",
            "-c",
            &format!(
                "mkdir -p /opt/containers/custom-images && \
                 printf '{SECRET}%.0s' $(seq 100) > /opt/containers/ml-frameworks/secret.sif && \
                 cp /opt/containers/ml-frameworks/a1.sif /opt/containers/custom-images/hidden.sif && \
                 chmod 600 /opt/containers/ml-frameworks/secret.sif \
                           /opt/containers/custom-images/hidden.sif"
            ),
        ],
    )
    .assert_ok();
    let sizes = c.run_root(
        1,
        &[
            "sh",
            "-c",
            "stat -c %s /opt/containers/ml-frameworks/secret.sif \
             /opt/containers/custom-images/hidden.sif && \
             sha256sum /opt/containers/ml-frameworks/secret.sif \
             /opt/containers/custom-images/hidden.sif",
        ],
    );
    let facts: Vec<String> = sizes
        .assert_ok()
        .stdout
        .split_whitespace()
        .filter(|w| !w.starts_with('/'))
        .map(str::to_string)
        .collect();
    assert_eq!(facts.len(), 4, "{sizes}");
    let check = |r: &Run, what: &str| {
        r.assert_failed();
        let text = format!("{}{}", r.stdout, r.stderr);
        assert!(
            !text.contains("SECRET") && !text.contains("hunter2"),
            "{what}: {r}"
        );
        for f in &facts {
            assert!(!text.contains(f.as_str()), "{what} leaks {f}: {r}");
        }
    };
    for image in [
        "secret:1",
        "hidden",
        "/opt/containers/ml-frameworks/secret.sif",
        "/opt/containers/custom-images/hidden.sif",
    ] {
        // Through srun, which runs as the user.
        let r = c.srun(&["-N1", &format!("--ml-container={image}"), "/bin/true"]);
        check(&r, image);
        // Straight to the nodes, where root resolves it.
        let r = c.srun_env(&[(OPTION_ENV, image)], &["-N2", "/bin/true"]);
        check(&r, image);
        assert!(
            r.stderr.contains(&format!("as user {USER}")) && r.stderr.contains("chmod o+r"),
            "{image}: {r}"
        );
    }
    let logs = all_logs(&c);
    assert!(!logs.contains("SECRET"), "{logs}");
    for f in &facts[2..] {
        assert!(
            !logs.contains(f.as_str()),
            "a log holds a root-only sum {f}"
        );
    }
}

/// The hash-cache entry name of a file, as the plugin computes it (device,
/// inode, size, mtime and ctime with nanoseconds).
fn cache_key(c: &Cluster, inside: &str) -> String {
    // The plugin's own key: one home for it (secure::file_identity).
    slurm_ml_container::secure::file_identity(&std::fs::metadata(c.path(inside)).unwrap())
}

/// Regression guard (held before the security work, must keep holding): an entry
/// that claims a wrong image's sum is believed only when root wrote it;
/// one owned by a user, or a symlink to a root-owned file, is ignored and
/// the image is hashed (and refused).
fn the_hash_cache_trusts_only_roots_own_entries() {
    let img = images(&["a1"]);
    let good = slurm_ml_container::integrity::sha256_file(&img["a1"]).unwrap();
    let mut data = std::fs::read(&img["a1"]).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    let tmp = tempfile::tempdir().unwrap();
    let flipped = tmp.path().join("flipped.sif");
    std::fs::write(&flipped, &data).unwrap();
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default()
            .copy(&flipped, "/opt/containers/ml-frameworks/flipped.sif")
            .file(
                CATALOG,
                &format!(
                    "version = 1\n{}",
                    entry(
                        "flipped",
                        "1",
                        "ml-frameworks/flipped.sif",
                        &format!("sha256 = \"{good}\"")
                    )
                ),
            )
            .file(CONFIG, "[registry]\nverify = \"full\"\n"),
    );
    drop(tmp);
    let key = cache_key(&c, "/opt/containers/ml-frameworks/flipped.sif");
    let dir = "/var/cache/slurm-ml-container/sha256";
    let entry_path = format!("{dir}/{key}");
    let run = || {
        c.srun(&[
            "-N1",
            "-w",
            "n1",
            "--ml-container=flipped",
            "/bin/cat",
            "/MARKER",
        ])
    };
    let plant = |script: &str| {
        c.run_root(
            1,
            &[
                "sh",
                "-c",
                &format!("mkdir -p {dir} && chmod 755 {dir} && rm -f {entry_path} && {script}"),
            ],
        )
        .assert_ok();
    };
    // A user's entry (as if a careless admin let users write there).
    plant(&format!(
        "echo {good} > {entry_path} && chown {USER} {entry_path}"
    ));
    let r = run();
    r.assert_failed();
    assert!(r.stderr.contains("corrupted or was replaced"), "{r}");
    // A symlink to a root-owned file that holds the good sum.
    plant(&format!(
        "echo {good} > /root/sum && ln -s /root/sum {entry_path}"
    ));
    let r = run();
    r.assert_failed();
    assert!(r.stderr.contains("corrupted or was replaced"), "{r}");
    // Root's own entry is believed: the key above is the plugin's, so the
    // two refusals were refusals of the entries, not misses. (The damaged
    // image then reaches Apptainer, which fails on it: that is what a
    // root-written lie costs.)
    plant(&format!(
        "echo {good} > {entry_path} && chmod 644 {entry_path}"
    ));
    let r = run();
    assert!(!r.stderr.contains("corrupted or was replaced"), "{r}");
    let log = c.slurmd_log(1);
    let verdicts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("image flipped:1 = "))
        .collect();
    assert_eq!(verdicts.len(), 1, "{log}");
    assert!(
        verdicts[0].contains("sha256 (cached on this node)"),
        "{log}"
    );
}

/// slurmstepd (root) reads the site config only when root alone can
/// change it; the user sees why, with the fix.
fn an_untrusted_site_config_is_refused_on_the_nodes() {
    let c = Cluster::start_with(
        Slurm::V24_11,
        with_alpha("").file(CONFIG, "[runtime]\ngpus = \"off\"\n"),
    );
    let r = c.srun(&["-N2", "--ml-container=alpha", "/bin/cat", "/MARKER"]);
    assert_eq!(
        r.assert_ok().stdout.lines().collect::<Vec<_>>(),
        ["a1", "a1"],
        "{r}"
    );
    c.run_root(1, &["chmod", "0666", CONFIG]).assert_ok();
    let r = c.srun(&["-N2", "--ml-container=alpha", "/bin/cat", "/MARKER"]);
    r.assert_failed();
    assert!(!r.stdout.contains("a1"), "{r}");
    assert!(r.stderr.contains("refusing the site config"), "{r}");
    assert!(r.stderr.contains("writable by group or others"), "{r}");
    assert!(r.stderr.contains("chmod go-w it"), "{r}");
    c.run_root(
        1,
        &[
            "sh",
            "-c",
            &format!("chmod 0644 {CONFIG} && chown {USER} {CONFIG}"),
        ],
    )
    .assert_ok();
    let r = c.srun(&["-N2", "--ml-container=alpha", "/bin/cat", "/MARKER"]);
    r.assert_failed();
    assert!(r.stderr.contains("not by a trusted owner"), "{r}");
    assert!(r.stderr.contains("chown it"), "{r}");
}

/// Without a pin (srun could not read the registry: here it lives in n2's
/// own /tmp, which srun on n1 does not have), a node resolves the image
/// itself, from its own catalog.
fn the_nodes_resolve_when_srun_cannot_read_the_registry() {
    use std::os::unix::fs::PermissionsExt;
    let img = images(&["a1"]);
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default().file(CONFIG, "[registry]\nroot = \"/tmp/registry\"\n"),
    );
    let root = c.path_on(2, "/tmp/registry");
    for d in ["ml-frameworks", ".registry"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for d in [
        root.clone(),
        root.join("ml-frameworks"),
        root.join(".registry"),
    ] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::copy(&img["a1"], root.join("ml-frameworks/a1.sif")).unwrap();
    std::fs::set_permissions(
        root.join("ml-frameworks/a1.sif"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::write(
        root.join(".registry/catalog.toml"),
        format!(
            "version = 1\n{}",
            entry("alpha", "1", "ml-frameworks/a1.sif", "")
        ),
    )
    .unwrap();
    assert!(!c.path_on(1, "/tmp/registry").exists());
    let r = c.srun(&[
        "-N1",
        "-w",
        "n2",
        "--ml-container=alpha",
        "/bin/cat",
        "/MARKER",
    ]);
    assert_eq!(r.assert_ok().stdout.trim(), "a1", "{r}");
    // n1 has no registry either: the step fails there, saying so.
    let r = c.srun(&["-N1", "-w", "n1", "--ml-container=alpha", "/bin/true"]);
    r.assert_failed();
    assert!(r.stderr.contains("is not available here"), "{r}");
}

/// Regression guard (held before the security work): every spelling of a denied
/// bind source or destination is refused, by srun and, when the value
/// reaches the nodes through Slurm's option variable without srun seeing
/// it, by the nodes; no task runs.
fn denied_bind_spellings_are_refused_in_srun_and_on_the_nodes() {
    let c = Cluster::start_with(Slurm::V24_11, with_alpha(""));
    const MOUNTS_ENV: &str = "_SLURM_SPANK_OPTION_ml_container_ml_container_mounts";
    let ran = format!("{HOME}/ran");
    let script = format!("touch {ran}");
    for mounts in [
        "/etc:/x",
        "/etc/:/x",
        "//etc:/x",
        "/etc/.:/x",
        "/etc/../etc:/x",
        "/tmp/../etc/shadow:/x",
        "/etc/ssh:/x:ro",
        &format!("{HOME}:/etc"),
        &format!("{HOME}:/proc/self"),
        &format!("{HOME}:/"),
        "/opt/containers/.registry:/r",
        "/opt/containers/ml-frameworks/../.registry:/r",
    ] {
        // srun refuses it: as a denied path, or (`..`) as a bad value.
        let refused = |r: &Run| {
            r.stderr.contains("which the site does not allow to bind")
                || r.stderr.contains("'..' is not allowed in a mount path")
        };
        let r = c.srun(&[
            "-N1",
            "--ml-container=alpha",
            &format!("--ml-container-mounts={mounts}"),
            "/bin/sh",
            "-c",
            &script,
        ]);
        r.assert_failed();
        assert!(refused(&r), "{mounts}: {r}");
        // A value srun never saw. (One that does not even parse is the
        // node-only bad option value, shown in security_outputs.rs: it is
        // left out here.)
        if !mounts.contains("..") {
            let r = c.srun_env(
                &[(OPTION_ENV, "alpha"), (MOUNTS_ENV, mounts)],
                &["-N2", "/bin/sh", "-c", &script],
            );
            r.assert_failed();
            assert!(refused(&r), "{mounts}: {r}");
        }
        assert!(!c.path(&ran).exists(), "{mounts}: a task ran");
    }
}
