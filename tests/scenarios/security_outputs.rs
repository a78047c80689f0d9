//! Security, part 2 (what root writes, logs, locks and probes): Slurm 24.11
//! with Apptainer, 2 nodes, jobs as `mluser`; `mluser2` shares mluser's
//! primary group. Reports under the default /var/log/slurm/debug.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{images, wait_for, Cluster, Options, Run, Slurm};

crate::on_slurm_24_11!(
    a_report_is_the_users_alone_and_a_reused_job_id_starts_afresh,
    planted_symlinks_on_the_report_dir_metrics_log_and_hash_cache_are_not_followed,
    a_bad_option_value_only_the_node_sees_fails_the_step_and_no_newline_reaches_a_log,
    the_master_probe_goes_only_to_the_plugins_own_address,
);

const REPORTS: &str = "/var/log/slurm/debug";
const METRICS: &str = "/var/log/slurm/job_metrics.log";

fn cluster(opts: Options) -> Cluster {
    Cluster::start_with(Slurm::V24_11, opts.with_scan_images(&["demo"]))
}

/// The report of `job` step 0 on `node`, read as root.
fn report(c: &Cluster, job: u32, node: &str) -> Value {
    let path = c.path(&format!("{REPORTS}/{job}/0.{node}.json"));
    let text = wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(&path).ok()
    })
    .unwrap_or_else(|| panic!("no report {}", path.display()));
    serde_json::from_str(&text).expect("report is JSON")
}

/// `sh -c SCRIPT` in the demo image, one task on n1, with `env`.
fn on_n1(c: &Cluster, env: &[(&str, &str)], script: &str) -> Run {
    c.srun_env(
        env,
        &[
            "-N1",
            "-w",
            "n1",
            "--ml-container=demo",
            "/bin/sh",
            "-c",
            script,
        ],
    )
}

/// A report is the job user's alone (the job's group could read every
/// report), a reused job id starts afresh (it inherited the old
/// directory), and cross-user `diagnose`.
fn a_report_is_the_users_alone_and_a_reused_job_id_starts_afresh() {
    let c = cluster(Options::default());
    // Left by an older job 1 (before a MaxJobId wrap or a state loss), as
    // older versions wrote it: no owner record, group-readable.
    c.run_root(
        1,
        &[
            "sh",
            "-c",
            "mkdir -p /var/log/slurm/debug/1 && echo OLD-JOB-SECRET > /var/log/slurm/debug/1/0.n2.json \
             && chmod 0644 /var/log/slurm/debug/1/0.n2.json",
        ],
    )
    .assert_ok();
    let r = on_n1(&c, &[], "exit 5");
    assert_eq!(r.code, Some(5), "{r}");
    let rep = report(&c, 1, "n1");
    assert_eq!(rep["tasks"][0]["exit_code"], 5, "{rep}");
    // The new job's directory holds none of the old one's files; the old
    // directory was moved aside, not deleted, not handed over.
    let ls = c.run_root(1, &["ls", "-A", &format!("{REPORTS}/1")]);
    assert_eq!(ls.assert_ok().stdout, ".owner\n0.n1.json\n", "{ls}");
    let aside = c.run_root(
        1,
        &["sh", "-c", &format!("cat {REPORTS}/.stale-1-*/0.n2.json")],
    );
    assert_eq!(aside.assert_ok().stdout, "OLD-JOB-SECRET\n", "{aside}");

    // The job's user and root only: not the job's group.
    let st = c.run_root(
        1,
        &[
            "stat",
            "-c",
            "%U %G %a",
            &format!("{REPORTS}/1"),
            &format!("{REPORTS}/1/0.n1.json"),
        ],
    );
    assert_eq!(
        st.assert_ok().stdout,
        "root mluser 750\nmluser root 400\n",
        "{st}"
    );
    let file = format!("{REPORTS}/1/0.n1.json");
    c.run(1, &[], &["cat", &file]).assert_ok();
    let other = c.run_as_user2(1, &[], &["cat", &file]);
    other.assert_failed();
    assert!(other.stderr.contains("Permission denied"), "{other}");
    c.run_as_user2(1, &[], &["touch", &format!("{REPORTS}/1/x")])
        .assert_failed();

    // diagnose: the user sees the report, the group-mate gets exit 1 and
    // none of its content.
    let mine = c.run(1, &[], &["ml-container", "diagnose", "1"]);
    mine.assert_ok();
    assert!(mine.stdout.contains("exit code 5"), "{mine}");
    let theirs = c.run_as_user2(1, &[], &["ml-container", "diagnose", "1"]);
    assert_eq!(theirs.code, Some(1), "{theirs}");
    assert!(!theirs.stdout.contains("exit code 5"), "{theirs}");
    assert!(
        theirs
            .stderr
            .contains("readable by the job's user and root only"),
        "{theirs}"
    );
    // Nor the old job's report, which is out of the way.
    assert!(!theirs.stdout.contains("OLD-JOB"), "{theirs}");

    // Job 2, mluser2's, on n1: its own directory and report.
    let r = c.run_as_user2(
        1,
        &[],
        &[
            "srun",
            "-N1",
            "-w",
            "n1",
            "--ml-container=demo",
            "/bin/sh",
            "-c",
            "exit 6",
        ],
    );
    assert_eq!(r.code, Some(6), "{r}");
    let st = c.run_root(
        1,
        &["stat", "-c", "%U %a", &format!("{REPORTS}/2/0.n1.json")],
    );
    assert_eq!(st.assert_ok().stdout, "mluser2 400\n", "{st}");
    c.run(1, &[], &["cat", &format!("{REPORTS}/2/0.n1.json")])
        .assert_failed();
}

/// Regression guards for what held: root's report, metrics and hash-cache
/// writes never follow a symlink planted at their paths.
fn planted_symlinks_on_the_report_dir_metrics_log_and_hash_cache_are_not_followed() {
    let img = images(&["demo"]);
    let sum = slurm_ml_container::integrity::sha256_file(&img["demo"]).expect("hash demo");
    let c = cluster(
        Options::default()
            .file(
                "/opt/containers/.registry/catalog.toml",
                &format!(
                    "version = 1\n[[image]]\nname = \"full\"\ntag = \"1\"\n\
                     path = \"ml-frameworks/demo.sif\"\nsha256 = \"{sum}\"\n"
                ),
            )
            .file(
                "/etc/slurm/ml-container.toml",
                "[registry]\nverify = \"full\"\n",
            ),
    );
    c.run_root(
        1,
        &[
            "sh",
            "-c",
            "mkdir -p /etc/planted-dir /etc/planted-cache /var/log/slurm/debug /var/cache/slurm-ml-container \
             && echo keep > /etc/planted-metrics \
             && ln -s /etc/planted-dir /var/log/slurm/debug/1 \
             && ln -s /etc/planted-metrics /var/log/slurm/job_metrics.log \
             && rm -rf /var/cache/slurm-ml-container/sha256 \
             && ln -s /etc/planted-cache /var/cache/slurm-ml-container/sha256",
        ],
    )
    .assert_ok();
    let r = c.srun(&[
        "-N1",
        "-w",
        "n1",
        "--ml-container=full",
        "/bin/sh",
        "-c",
        "cat /MARKER; exit 5",
    ]);
    assert_eq!(r.code, Some(5), "{r}");
    assert_eq!(r.stdout.trim(), "demo", "{r}");
    let rep = report(&c, 1, "n1");
    assert_eq!(rep["tasks"][0]["exit_code"], 5, "{rep}");
    let kinds = c.run_root(
        1,
        &[
            "stat",
            "-c",
            "%F",
            &format!("{REPORTS}/1"),
            METRICS,
            "/var/cache/slurm-ml-container/sha256",
        ],
    );
    assert_eq!(
        kinds.assert_ok().stdout,
        "directory\nsymbolic link\nsymbolic link\n",
        "{kinds}"
    );
    let planted = c.run_root(
        1,
        &[
            "sh",
            "-c",
            "ls -A /etc/planted-dir /etc/planted-cache; cat /etc/planted-metrics",
        ],
    );
    assert_eq!(
        planted.assert_ok().stdout,
        "/etc/planted-cache:\n\n/etc/planted-dir:\nkeep\n",
        "{planted}"
    );
    let log = c.slurmd_log(1);
    assert!(
        log.contains(&format!("cannot append to {METRICS}")),
        "{log}"
    );
}

/// A bad value reaching only the node fails the step (it was dropped), and
/// no newline in a job string reaches a log (one forged a slurmd log line).
fn a_bad_option_value_only_the_node_sees_fails_the_step_and_no_newline_reaches_a_log() {
    let c = cluster(Options::default());
    // What srun prints for the value given as an option.
    let srun_says = c.srun(&[
        "-N1",
        "--ml-container=demo",
        "--ml-container-gpus=bogus",
        "/bin/true",
    ]);
    srun_says.assert_failed();
    let line = "invalid --ml-container-gpus='bogus': accepted values are auto, on, off";
    assert!(srun_says.stderr.contains(line), "{srun_says}");

    // The same value through the job environment only: srun never sees it,
    // the node does, and the step fails with the same line.
    let r = c.srun_env(
        &[(
            "_SLURM_SPANK_OPTION_ml_container_ml_container_gpus",
            "bogus",
        )],
        &[
            "-N1",
            "-w",
            "n1",
            "--ml-container=demo",
            "/bin/sh",
            "-c",
            "echo RAN",
        ],
    );
    r.assert_failed();
    assert!(r.stderr.contains(line), "{r}");
    assert!(!r.stdout.contains("RAN"), "{r}");
    assert!(
        c.slurmd_log(1)
            .contains("option received on the node is invalid"),
        "{}",
        c.slurmd_log(1)
    );

    // An image name with a newline, only in the job environment: the step
    // fails (it never runs outside the container), and no log line starts
    // with the text after the newline.
    let r = c.srun_env(
        &[(
            "_SLURM_SPANK_OPTION_ml_container_ml_container",
            "demo\nFORGED-LINE error: fake",
        )],
        &["-N2", "-n2", "/bin/sh", "-c", "echo RAN"],
    );
    r.assert_failed();
    assert!(!r.stdout.contains("RAN"), "{r}");
    assert!(
        r.stderr
            .contains("invalid --ml-container='demo\\nFORGED-LINE"),
        "{r}"
    );
    for node in 1..=2 {
        let log = c.slurmd_log(node);
        let forged: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("FORGED-LINE") && !l.contains("demo\\nFORGED-LINE"))
            .collect();
        assert!(
            forged.is_empty(),
            "n{node}: a raw newline reached the log: {forged:?}"
        );
        assert!(log.contains("demo\\nFORGED-LINE"), "n{node}: {log}");
    }
    let metrics = c.read(METRICS);
    assert!(!metrics.contains("FORGED"), "{metrics}");
}

/// The report's probe connects only to the plugin's own
/// MASTER_ADDR:MASTER_PORT, never where the job environment points (here:
/// n2's slurmd port, which would answer).
fn the_master_probe_goes_only_to_the_plugins_own_address() {
    let c = cluster(Options::default().file(
        "/etc/slurm/ml-container.toml",
        "[failure]\nprobe_timeout = 2\n",
    ));
    // Two tasks: the probe runs at the node's first failure while another
    // task of the step still runs.
    let r = c.srun_env(
        &[("MASTER_ADDR", "n2"), ("MASTER_PORT", "6818")],
        &[
            "-N1",
            "-n2",
            "-w",
            "n1",
            "--ml-container=demo",
            "/bin/sh",
            "-c",
            "[ $SLURM_LOCALID = 0 ] && exit 3; sleep 3",
        ],
    );
    assert_eq!(r.code, Some(3), "{r}");
    let rep = report(&c, 1, "n1");
    let master = &rep["node_state"]["master"];
    assert_eq!(master["addr"], "n1", "{rep}");
    assert_ne!(master["port"], 6818, "{rep}");
    assert_eq!(master["reachable"], false, "{rep}");
    // The report still says what the task ran with.
    assert_eq!(rep["environment"]["MASTER_ADDR"], "n2", "{rep}");
    assert_eq!(rep["environment"]["MASTER_PORT"], "6818", "{rep}");

    // doctor says which Apptainer settings make the policy a boundary: the
    // trixie root's Apptainer has no setuid starter.
    let d = c.run_root(1, &["ml-container", "doctor"]);
    for want in [
        "note    /etc/apptainer/apptainer.conf: setuid mode off (allow setuid = yes, setuid starter absent)",
        "apptainer.conf: user bind control = yes (for a boundary: no)",
        "apptainer.conf: limit container paths = unset",
        "/etc/apptainer/ecl.toml: execution control list not activated",
    ] {
        assert!(d.stdout.contains(want), "{want}: {d}");
    }
}
