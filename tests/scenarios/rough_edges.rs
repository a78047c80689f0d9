//! What a first real PyTorch user ran into: torch version
//! strings as tags, an image listed twice, log noise, and torchrun's
//! workers inheriting per-task variables they should not. Slurm 24.11 with
//! Apptainer, 2 nodes, jobs as `mluser`.

use crate::harness::{images, Cluster, Options, Slurm, HOME};

crate::on_slurm_24_11!(
    a_torch_version_is_a_tag_and_a_copied_image_is_listed_once,
    one_log_line_for_missing_default_binds_and_no_runtime_info_lines,
    a_torchrun_task_gets_the_master_but_not_per_worker_variables,
    a_failed_task_names_its_report_on_the_users_stderr,
    a_command_missing_from_the_image_is_named_with_the_one_that_is_there,
    the_launcher_is_transparent_to_exit_codes_signals_and_masks,
);

fn a_torch_version_is_a_tag_and_a_copied_image_is_listed_once() {
    let img = images(&["plus"]);
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default().copy(&img["plus"], "/root/plus.sif"),
    );
    c.run_root(
        1,
        &[
            "ml-container",
            "add",
            "/root/plus.sif",
            "--name",
            "pytorch",
            "--tag",
            "2.6.0+debian",
            "--default",
            "--copy-to",
            "ml-frameworks",
        ],
    )
    .assert_ok();
    let list = c.run_root(1, &["ml-container", "list"]);
    list.assert_ok();
    let rows: Vec<&str> = list.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "one image, one row: {list}");
    assert!(!list.stdout.contains("found by scan"), "{list}");
    for image in ["pytorch:2.6.0+debian", "pytorch"] {
        let r = c.srun(&[
            "-N2",
            "-n2",
            &format!("--ml-container={image}"),
            "/bin/cat",
            "/MARKER",
        ]);
        r.assert_ok();
        assert_eq!(r.stdout, "plus\nplus\n", "{r}");
    }
    // A tag that is not valid says what to pass instead.
    let r = c.run_root(
        1,
        &[
            "ml-container",
            "add",
            "/root/plus.sif",
            "--name",
            "pytorch",
            "--tag",
            "2.6 0",
        ],
    );
    r.assert_failed();
    assert!(r.stderr.contains("pass another --tag, e.g. '2.6-0'"), "{r}");
}

/// Each step logs the default binds it skipped in one line per node (the
/// test cluster has none of the config's /shared directories), and with
/// `runtime.quiet` (on by default) Apptainer's INFO lines stay off the
/// tasks' stderr.
fn one_log_line_for_missing_default_binds_and_no_runtime_info_lines() {
    let img = images(&["quiet"]);
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default().copy(&img["quiet"], "/opt/containers/ml-frameworks/quiet.sif"),
    );
    let steps = 3;
    for _ in 0..steps {
        let r = c.srun(&["-N2", "-n4", "--ml-container=quiet", "/bin/true"]);
        r.assert_ok();
        assert!(!r.stderr.contains("INFO:"), "{r}");
    }
    for node in 1..=2 {
        let log = c.slurmd_log(node);
        let skipped = log.matches("default binds skipped").count();
        assert_eq!(skipped, steps, "one line per step on n{node}:\n{log}");
        assert!(
            log.contains("/shared/data, /shared/work, /shared/models"),
            "{log}"
        );
    }
    // The runtime command carries --quiet before exec.
    assert!(
        c.slurmd_log(1).contains("apptainer --quiet exec"),
        "{}",
        c.slurmd_log(1)
    );
    // A site that wants Apptainer's INFO lines back turns it off.
    c.write(
        "/etc/slurm/ml-container.toml",
        "[runtime]\nquiet = false\n",
        0o644,
    );
    let r = c.srun(&["-N1", "-w", "n1", "--ml-container=quiet", "/bin/true"]);
    r.assert_ok();
    assert!(
        c.slurmd_log(1).contains("apptainer exec"),
        "{}",
        c.slurmd_log(1)
    );
}

/// torchrun numbers its own workers (RANK, WORLD_SIZE, LOCAL_RANK,
/// LOCAL_WORLD_SIZE, GROUP_RANK) and leaves NODE_RANK alone: a task whose
/// command is torchrun gets the step's MASTER_ADDR/MASTER_PORT and nothing
/// per worker, so no value of ours reaches its workers. The command here is
/// a stand-in named torchrun that prints what it was given.
fn a_torchrun_task_gets_the_master_but_not_per_worker_variables() {
    let img = images(&["elastic"]);
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default().copy(&img["elastic"], "/opt/containers/ml-frameworks/elastic.sif"),
    );
    let show = "#!/bin/sh\nfor v in MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK \
                LOCAL_WORLD_SIZE NODE_RANK; do eval \"echo $v=\\${$v-unset}\"; done\n";
    c.write(&format!("{HOME}/bin/torchrun"), show, 0o755);
    c.write(&format!("{HOME}/bin/train"), show, 0o755);
    let run = |cmd: &str| {
        let r = c.srun(&[
            "-N2",
            "--ntasks-per-node=1",
            "--ml-container=elastic",
            &format!("--ml-container-mounts={HOME}/bin:/opt/launch"),
            &format!("/opt/launch/{cmd}"),
        ]);
        r.assert_ok();
        r.stdout
    };
    let elastic = run("torchrun");
    assert_eq!(elastic.matches("MASTER_ADDR=n1\n").count(), 2, "{elastic}");
    assert_eq!(elastic.matches("MASTER_PORT=unset").count(), 0, "{elastic}");
    for v in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "NODE_RANK",
    ] {
        assert_eq!(
            elastic.matches(&format!("\n{v}=unset\n")).count(),
            2,
            "{v} set for torchrun:\n{elastic}"
        );
    }
    // Any other command gets the whole contract.
    let plain = run("train");
    assert!(
        plain.contains("NODE_RANK=1\n") && plain.contains("WORLD_SIZE=2\n"),
        "{plain}"
    );
    assert!(!plain.contains("=unset"), "{plain}");
}

/// srun says only "Exited with exit code N"; the failed task itself names
/// the report, on its own stderr, once; a task stopped by Slurm after
/// another failed says nothing; output and exit codes are what they were.
fn a_failed_task_names_its_report_on_the_users_stderr() {
    let img = images(&["notice"]);
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default().copy(&img["notice"], "/opt/containers/ml-frameworks/notice.sif"),
    );
    let r = c.srun(&[
        "-N2",
        "-n2",
        "--ml-container=notice",
        "/bin/sh",
        "-c",
        "if [ $SLURM_PROCID = 1 ]; then echo out; echo err >&2; exit 3; fi",
    ]);
    assert_eq!(r.code, Some(3), "{r}");
    assert_eq!(r.stdout, "out\n", "{r}");
    let job: u32 = c
        .run(1, &[], &["squeue", "-h", "-t", "all", "-o", "%i"])
        .stdout
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .max()
        .expect("a job id");
    let notices: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("ml-container:"))
        .collect();
    assert_eq!(
        notices,
        [format!(
            "ml-container: job {job} step 0 rank 1 (image notice) exited with code 3 on n2; the \
             failure report: ml-container diagnose {job} (on n2)"
        )],
        "{r}"
    );
    assert!(r.stderr.contains("err\n"), "{r}");
    // The same step, rank 1 now sleeping, rank 0 failing under
    // --kill-on-bad-exit: Slurm stops rank 1, which does not claim a failure.
    let r = c.srun(&[
        "-N2",
        "-n2",
        "-K",
        "--ml-container=notice",
        "/bin/sh",
        "-c",
        "if [ $SLURM_PROCID = 0 ]; then exit 5; fi; sleep 30",
    ]);
    r.assert_failed();
    let notices: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("ml-container:"))
        .collect();
    assert_eq!(notices.len(), 1, "{r}");
    assert!(
        notices[0].contains("rank 0 (image notice) exited with code 5 on n1"),
        "{r}"
    );
}

/// `python` in an image that has only `python3`: Apptainer alone says
/// `FATAL: "python": executable file not found in $PATH` and exits 255;
/// the task adds which image and what is there instead.
fn a_command_missing_from_the_image_is_named_with_the_one_that_is_there() {
    let img = images(&["py3"]);
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default().copy(&img["py3"], "/opt/containers/ml-frameworks/py3.sif"),
    );
    let r = c.srun(&["-N1", "--ml-container=py3", "python", "train.py"]);
    assert_eq!(r.code, Some(255), "{r}");
    assert!(
        r.stderr.contains(
            "ml-container: 'python' is not in image py3 (looked up in the image's PATH, not the \
             host's); did you mean python3 (/bin/python3)?"
        ),
        "{r}"
    );
    let r = c.srun(&["-N1", "--ml-container=py3", "python3", "train.py"]);
    r.assert_ok();
    // (the stand-in quotes its arguments)
    assert_eq!(r.stdout, "python3 stand-in \"train.py\"\n", "{r}");
    // A command the image does not have under any name.
    let r = c.srun(&["-N1", "--ml-container=py3", "nvcc"]);
    assert_eq!(r.code, Some(255), "{r}");
    assert!(r.stderr.contains("'nvcc' is not in image py3"), "{r}");
    assert!(r.stderr.contains("give its full path in the image"), "{r}");
    // A payload's own 255 is not mistaken for a missing command.
    let r = c.srun(&["-N1", "--ml-container=py3", "sh", "-c", "exit 255"]);
    assert_eq!(r.code, Some(255), "{r}");
    assert!(!r.stderr.contains("is not in image"), "{r}");
}

/// Every task runs under ml-container-launch: what srun reports (exit code,
/// signal, srun's own lines), the payload's signal dispositions and mask,
/// and its output are those of the same payload under a hand-written
/// `apptainer exec` of the same image.
fn the_launcher_is_transparent_to_exit_codes_signals_and_masks() {
    let img = images(&["plain"]);
    let sif = "/opt/containers/ml-frameworks/plain.sif";
    let c = Cluster::start_with(Slurm::V24_11, Options::default().copy(&img["plain"], sif));
    let strip = |s: &str| -> String {
        s.lines()
            .filter(|l| {
                // Our notice, and srun's lines about waiting for the node
                // (the previous step may still be completing there).
                !l.starts_with("ml-container:")
                    && (!l.starts_with("srun: job ") || l.contains("error"))
            })
            .map(|l| match l.split_once("StepId=") {
                // The job id differs between the two steps.
                Some((head, _)) => format!("{head}StepId=J.S\n"),
                None => format!("{l}\n"),
            })
            .collect()
    };
    for payload in [
        "exit 0",
        "exit 1",
        "exit 255",
        "echo out; echo err >&2; exit 42",
        "grep -E '^Sig(Ign|Blk)' /proc/self/status",
        "kill -SEGV $$",
        "kill -KILL $$",
        "kill -PIPE $$",
        "kill -USR1 $$",
        "kill -ABRT $$",
    ] {
        let ours = c.srun(&["-w", "n1", "--ml-container=plain", "/bin/sh", "-c", payload]);
        let theirs = c.srun(&[
            "-w",
            "n1",
            "apptainer",
            "--quiet",
            "exec",
            sif,
            "/bin/sh",
            "-c",
            payload,
        ]);
        assert_eq!(
            (ours.code, ours.signal),
            (theirs.code, theirs.signal),
            "{payload}:\n{ours}\n{theirs}"
        );
        assert_eq!(ours.stdout, theirs.stdout, "{payload}:\n{ours}\n{theirs}");
        assert_eq!(
            strip(&ours.stderr),
            strip(&theirs.stderr),
            "{payload}:\n{ours}\n{theirs}"
        );
    }
}
