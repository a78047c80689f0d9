//! What a first real PyTorch user ran into (issue 16): torch version
//! strings as tags, an image listed twice, log noise, and torchrun's
//! workers inheriting per-task variables they should not. Slurm 24.11 with
//! Apptainer, 2 nodes, jobs as `mluser`.

use crate::harness::{images, Cluster, Options, Slurm, HOME};

crate::on_slurm_24_11!(
    a_torch_version_is_a_tag_and_a_copied_image_is_listed_once,
    one_log_line_for_missing_default_binds_and_no_runtime_info_lines,
    a_torchrun_task_gets_the_master_but_not_per_worker_variables,
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
    let r = c.srun(&["-N1", "--ml-container=quiet", "/bin/true"]);
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
