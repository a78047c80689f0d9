//! The foundation on real clusters (the plugin loads, options, validation
//! in srun, site config): Slurm 24.11 (trixie
//! root) and the host's Slurm 22.05, two nodes each, jobs as `mluser`.

use crate::harness::{self, Cluster, Options, Slurm};
use slurm_ml_container::options::OPTIONS;

crate::on_every_slurm!(
    help_lists_every_option,
    bad_value_fails_in_srun_before_launch,
    option_value_reaches_every_node,
    malformed_config_fails_the_job_then_next_job_runs,
    panic_is_contained_in_srun_and_in_the_task,
    valgrind_finds_no_error_in_the_plugin,
);

/// The plugin exports exactly the SPANK symbols it implements (Slurm calls
/// whatever it finds: a stray `slurm_spank_job_prolog` would run in slurmd)
/// and the three plugin_* symbols Slurm requires, on every release's build.
#[test]
fn the_plugin_exports_only_its_callbacks() {
    for slurm in [Slurm::V22_05, Slurm::V24_11, Slurm::V26_05] {
        let so = harness::plugin(slurm, false);
        let out = std::process::Command::new("nm")
            .args(["-D", "--defined-only"])
            .arg(&so)
            .output()
            .expect("run nm (binutils)");
        assert!(out.status.success(), "nm {}", so.display());
        let mut exported: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
            .filter(|s| s.starts_with("slurm_spank_") || s.starts_with("plugin_"))
            .collect();
        exported.sort();
        assert_eq!(
            exported,
            [
                "plugin_name",
                "plugin_type",
                "plugin_version",
                "slurm_spank_init",
                "slurm_spank_init_post_opt",
                "slurm_spank_task_exit",
                "slurm_spank_task_init",
                "slurm_spank_task_post_fork",
            ],
            "{}",
            slurm.name()
        );
    }
}

fn help_lists_every_option(slurm: Slurm) {
    let c = Cluster::start(slurm);
    let help = c.srun(&["--help"]);
    help.assert_ok();
    for spec in OPTIONS {
        let flag = match spec.arginfo {
            Some(arg) => format!("--{}={arg}", spec.name),
            None => format!("--{}", spec.name),
        };
        assert!(
            help.stdout.contains(&flag),
            "srun --help lacks {flag}:\n{help}"
        );
    }
}

fn bad_value_fails_in_srun_before_launch(slurm: Slurm) {
    let c = Cluster::start(slurm);
    let marker = format!("{}/launched", harness::HOME);
    let bad = c.srun(&["-N2", "--ml-container-gpus=bogus", "touch", &marker]);
    bad.assert_failed();
    assert!(bad.stderr.contains("--ml-container-gpus"), "{bad}");
    assert!(bad.stderr.contains("auto, on, off"), "{bad}");
    assert!(bad.stderr.contains("bogus"), "{bad}");
    assert!(
        !c.path(&marker).exists(),
        "a task ran despite the bad option"
    );
    // No job was even allocated: the first job this cluster runs is job 1.
    let next = c.srun(&["-N2", "sh", "-c", "echo job=$SLURM_JOB_ID"]);
    next.assert_ok();
    assert!(next.stdout.lines().all(|l| l == "job=1"), "{next}");

    for (option, value) in [
        ("ml-container-dist", "maybe"),
        ("ml-container-mounts", "relative:/x"),
        ("ml-container-workdir", "not/absolute"),
    ] {
        let r = c.srun(&["-N1", &format!("--{option}={value}"), "true"]);
        r.assert_failed();
        assert!(r.stderr.contains(&format!("--{option}")), "{r}");
    }
}

/// A `--ml-container` step ran: on 24.11 and 26.05 it succeeded; on 22.05 (no
/// Apptainer on the host; execution there is tested with Charliecloud)
/// every task failed with the plugin's explicit node error.
#[track_caller]
fn expect_container_run(slurm: Slurm, r: &harness::Run) {
    match slurm {
        Slurm::V24_11 | Slurm::V26_05 => {
            r.assert_ok();
        }
        Slurm::V22_05 => {
            r.assert_failed();
            assert!(
                r.stderr.contains("runtime 'apptainer' is not installed"),
                "{r}"
            );
            assert!(!r.stderr.contains("configuration error"), "{r}");
        }
    }
}

/// A cluster whose registry holds the `demo` image (found by the scan).
fn with_demo(slurm: Slurm, opts: Options) -> Cluster {
    Cluster::start_with(slurm, opts.with_scan_images(&["demo"]))
}

fn option_value_reaches_every_node(slurm: Slurm) {
    let c = with_demo(slurm, Options::default());
    let r = c.srun(&[
        "-N2",
        "-n2",
        "--ml-container=demo",
        "--ml-container-gpus=off",
        "--ml-container-mounts=/tmp:/in:ro",
        "/bin/true",
    ]);
    expect_container_run(slurm, &r);
    let expect = "options received: image=demo mounts=/tmp:/in:ro gpus=off";
    for node in 1..=2 {
        let log = c.slurmd_log(node);
        let line = log
            .lines()
            .find(|l| l.contains("ml-container: job 1 step 0"))
            .unwrap_or_else(|| panic!("no plugin line in slurmd-n{node}.log:\n{log}"));
        assert!(line.contains(expect), "n{node}: {line}");
        assert!(
            line.contains(&format!("node {}", node - 1)),
            "n{node}: {line}"
        );
    }
}

fn malformed_config_fails_the_job_then_next_job_runs(slurm: Slurm) {
    let c = with_demo(slurm, Options::default());
    let config = "/etc/slurm/ml-container.toml";
    c.write(
        config,
        "[registry]\nroot = \"/opt/containers\"\ngpu_policy = \"on\"\n",
        0o644,
    );
    let r = c.srun(&["-N2", "--ml-container=demo", "/bin/true"]);
    r.assert_failed();
    assert!(r.stderr.contains(&format!("{config}:3")), "{r}");
    assert!(r.stderr.contains("registry.gpu_policy"), "{r}");

    // Jobs that do not ask for the plugin are not affected by its config.
    c.srun(&["-N2", "true"]).assert_ok();

    c.write(config, "[registry]\nroot = \"/opt/containers\"\n", 0o644);
    expect_container_run(slurm, &c.srun(&["-N2", "--ml-container=demo", "/bin/true"]));

    // A type error names its key too.
    c.write(config, "[distributed]\nport_range = \"high\"\n", 0o644);
    let r = c.srun(&["-N1", "--ml-container=demo", "/bin/true"]);
    r.assert_failed();
    assert!(r.stderr.contains(&format!("{config}:2")), "{r}");
    assert!(r.stderr.contains("distributed.port_range"), "{r}");
    c.remove(config);
    expect_container_run(slurm, &c.srun(&["-N2", "--ml-container=demo", "/bin/true"]));
    assert!(c.daemons_alive());
}

fn panic_is_contained_in_srun_and_in_the_task(slurm: Slurm) {
    let c = with_demo(
        slurm,
        Options {
            fault_injection: true,
            ..Options::default()
        },
    );
    // In srun's own context.
    let r = c.srun_env(
        &[("ML_CONTAINER_TEST_PANIC", "init_post_opt")],
        &["-N2", "true"],
    );
    r.assert_failed();
    assert_eq!(r.signal, None, "srun died of a signal: {r}");
    assert_ne!(r.code, Some(134), "srun aborted: {r}");
    assert!(
        r.stderr
            .contains("internal error in slurm_spank_init_post_opt"),
        "{r}"
    );
    assert!(r.stderr.contains("injected panic"), "{r}");

    // In each task's context, on both nodes.
    let r = c.srun_env(
        &[("ML_CONTAINER_TEST_PANIC", "task_init")],
        &["-N2", "-n2", "true"],
    );
    r.assert_failed();
    assert_eq!(r.signal, None, "{r}");
    let logs = format!("{}{}{}", r.stderr, c.slurmd_log(1), c.slurmd_log(2));
    assert!(
        logs.contains("internal error in slurm_spank_task_init"),
        "{r}\n{logs}"
    );
    for node in 1..=2 {
        let log = c.slurmd_log(node);
        assert!(
            !log.contains("Aborted") && !log.contains("core dumped"),
            "n{node}:\n{log}"
        );
    }

    // The daemons keep serving.
    assert!(c.daemons_alive(), "a daemon died");
    let ok = c.srun(&["-N2", "-n2", "hostname"]);
    ok.assert_ok();
    assert_eq!(ok.stdout.lines().count(), 2, "{ok}");
    let cores = c.run_root(
        1,
        &[
            "sh",
            "-c",
            "ls / /var/spool/slurmd/* | grep -c '^core' || true",
        ],
    );
    assert_eq!(cores.stdout.trim(), "0", "core files found: {cores}");
}

fn valgrind_finds_no_error_in_the_plugin(slurm: Slurm) {
    let c = with_demo(slurm, Options::default());
    c.run(1, &[], &["mkdir", "-p", "/tmp/vg"]).assert_ok();
    let vg = [
        "valgrind",
        "--tool=memcheck",
        "--leak-check=full",
        "--errors-for-leak-kinds=definite",
        "--log-file=/tmp/vg/srun.%p.log",
        "srun",
    ];
    let runs: [&[&str]; 3] = [
        &[
            "-N2",
            "--ml-container=demo",
            "--ml-container-mounts=/a:/b:ro",
            "true",
        ],
        &["-N1", "--ml-container-gpus=bogus", "true"],
        &["--help"],
    ];
    let mut outputs = String::new();
    for args in runs {
        let argv: Vec<&str> = vg.iter().chain(args.iter()).copied().collect();
        let r = c.run(1, &[], &argv);
        assert_eq!(r.signal, None, "{r}");
        outputs.push_str(&r.stdout);
        outputs.push_str(&r.stderr);
    }
    // The plugin really ran under memcheck: its help text and its error.
    assert!(
        outputs.contains("--ml-container-gpus=auto|on|off"),
        "{outputs}"
    );
    assert!(
        outputs.contains("invalid --ml-container-gpus='bogus'"),
        "{outputs}"
    );
    let logs = harness::read_matching(&c, "/tmp/vg", "srun.");
    assert!(logs.len() >= 3, "valgrind wrote {} logs", logs.len());
    let mut ours = Vec::new();
    for (name, text) in &logs {
        assert!(
            text.contains("ERROR SUMMARY"),
            "{name} is not a finished memcheck log:\n{text}"
        );
        for block in error_blocks(text) {
            if ["slurm_ml_container", "spank_ml_container", "slurm_spank_"]
                .iter()
                .any(|m| block.contains(m))
            {
                ours.push(format!("{name}:\n{block}"));
            }
        }
    }
    assert!(
        ours.is_empty(),
        "memcheck errors in the plugin:\n{}",
        ours.join("\n\n")
    );
}

/// The error records of a memcheck log: runs of `==PID== ` lines separated
/// by empty ones, skipping the header and the summaries.
fn error_blocks(log: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut cur = Vec::new();
    for line in log.lines() {
        let body = line.split_once("== ").map(|(_, b)| b).unwrap_or("");
        if body.trim().is_empty() {
            if !cur.is_empty() {
                blocks.push(cur.join("\n"));
                cur.clear();
            }
        } else {
            cur.push(body.to_string());
        }
    }
    if !cur.is_empty() {
        blocks.push(cur.join("\n"));
    }
    blocks
        .into_iter()
        .filter(|b| {
            let first = b.lines().next().unwrap_or("");
            !(first.starts_with("Memcheck")
                || first.starts_with("HEAP SUMMARY")
                || first.starts_with("LEAK SUMMARY")
                || first.starts_with("ERROR SUMMARY")
                || first.starts_with("Copyright")
                || first.starts_with("Using Valgrind")
                || first.starts_with("Command:")
                || first.starts_with("Parent PID"))
                && (b.contains("Invalid")
                    || b.contains("uninitialised")
                    || b.contains("definitely lost")
                    || b.contains("Mismatched")
                    || b.contains("overlap")
                    || b.contains("Syscall param"))
        })
        .collect()
}
