//! Every supported Slurm release read as that release reads it: on
//! clusters whose nodes are named with text after the
//! bracket (`NodeName=gpu[1-2]-ib`, which Slurm 24.11 and 26.05 accept and
//! 22.05 does not), a 2-node `--ml-container` step gets `MASTER_ADDR` = the
//! first node and runs, and `ml-container env` built for the same release
//! reads such a list as that release's `scontrol` does. The other scenarios
//! run on 26.05 through `on_apptainer_slurms!` in their own modules.
//!
//! Seen here: Slurm itself never writes such names compressed. sinfo and
//! the steps' `SLURM_*_NODELIST` say `gpu1-ib,gpu2-ib` (each name is a
//! single host to `hostlist_ranged_string`); the bracketed form comes from
//! people: slurm.conf, `srun -w`, scripts, `ml-container env`.

use slurm_ml_container::hostlist::Rules;

use crate::harness::{cli, Cluster, Options, Slurm};

crate::on_apptainer_slurms!(nodes_named_with_a_suffix_get_master_addr_and_run);

fn rules(slurm: Slurm) -> Rules {
    match slurm {
        Slurm::V22_05 => Rules::V22_05,
        Slurm::V24_11 => Rules::V24_11,
        Slurm::V26_05 => Rules::V26_05,
    }
}

fn nodes_named_with_a_suffix_get_master_addr_and_run(slurm: Slurm) {
    let c = Cluster::start_with(
        slurm,
        Options::default()
            // tests/cluster/cluster.sh: node X is gpuX-ib to Slurm, and
            // slurm.conf says NodeName=gpu[1-2]-ib.
            .file("/etc/slurm/node-names", "gpu%d-ib\n")
            .with_scan_images(&["demo"])
            .copy(&cli(slurm), "/usr/local/bin/ml-container"),
    );
    c.run_root(1, &["chmod", "0755", "/usr/local/bin/ml-container"])
        .assert_ok();
    let nodes = c.run(1, &[], &["sinfo", "-h", "-o", "%N"]);
    assert_eq!(nodes.assert_ok().stdout, "gpu1-ib,gpu2-ib\n", "{nodes}");
    let names = c.run(1, &[], &["scontrol", "show", "hostnames", "gpu[1-2]-ib"]);
    let ours = rules(slurm)
        .expand("gpu[1-2]-ib")
        .expect("the release's rules");
    assert_eq!(names.assert_ok().stdout, ours.join("\n") + "\n", "{names}");

    // The nodes asked for in the bracketed form; every task in the image.
    let r = c.srun(&[
        "-N2",
        "-n2",
        "-w",
        "gpu[1-2]-ib",
        "--ml-container=demo",
        "/bin/sh",
        "-c",
        "echo $RANK $MASTER_ADDR $(hostname) $(cat /MARKER)",
    ]);
    let mut lines: Vec<&str> = r.assert_ok().stdout.lines().collect();
    lines.sort_unstable();
    assert_eq!(
        lines,
        ["0 gpu1-ib gpu1-ib demo", "1 gpu1-ib gpu2-ib demo"],
        "{r}"
    );

    // The CLI built for the release reads the bracketed form as its Slurm
    // does (one built with 22.05's rules refuses it), and the list Slurm
    // gave the step.
    let r = c.srun(&[
        "-N2",
        "-n2",
        "/bin/sh",
        "-c",
        "SLURM_STEP_NODELIST='gpu[1-2]-ib' ml-container env; ml-container env",
    ]);
    let masters: Vec<&str> = r
        .assert_ok()
        .stdout
        .lines()
        .filter(|l| l.starts_with("export MASTER_ADDR="))
        .collect();
    assert_eq!(masters, ["export MASTER_ADDR='gpu1-ib'"; 4], "{r}");
}
