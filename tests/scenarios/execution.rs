//! Every task runs inside the container: Slurm 24.11
//! with Apptainer 1.4.5 (2 nodes), and Slurm 22.05 with Charliecloud, jobs
//! as `mluser`.

use std::time::{Duration, Instant};

use crate::harness::{
    assert_contract_beats_rank999, mpi_image, sqfs_image, Cluster, Options, Slurm, HOME,
};

crate::on_slurm_24_11!(
    commands_are_looked_up_in_the_image,
    bad_setups_fail_clearly_and_fast,
    nv_exactly_when_the_step_has_gpus,
    the_singularity_kind_runs_the_image_with_the_contract,
);
crate::on_apptainer_slurms!(
    task_runs_in_the_image_as_the_user_with_binds_and_stdin,
    exit_codes_and_signals_pass_through,
    task_prolog_and_tmpdir_still_work,
    options_can_come_from_slurms_spank_option_variables,
);

#[test]
fn charliecloud_runs_a_step_on_slurm_22_05() {
    charliecloud_on_22_05()
}

fn cluster(opts: Options) -> Cluster {
    cluster_on(Slurm::V24_11, opts)
}

fn cluster_on(slurm: Slurm, opts: Options) -> Cluster {
    Cluster::start_with(slurm, opts.with_scan_images(&["demo"]))
}

const CONFIG: &str = "/etc/slurm/ml-container.toml";

fn task_runs_in_the_image_as_the_user_with_binds_and_stdin(slurm: Slurm) {
    let c = cluster_on(
        slurm,
        Options::default().file(
            CONFIG,
            "[runtime]\nbinds = [\"/shared/data:/data:ro\", \"/shared/models:/models\"]\n",
        ),
    );
    c.run_root(
        1,
        &[
            "sh",
            "-c",
            "mkdir -p /shared/data && echo site-data > /shared/data/hello",
        ],
    )
    .assert_ok();
    c.run(
        1,
        &[],
        &["sh", "-c", "mkdir -p in out && echo user-in > in/x"],
    )
    .assert_ok();
    let probe = "echo $(cat /MARKER) $(id -u) $(pwd) $(cat /data/hello) $(cat /in/x) \
                 $( (echo no > /in/y) 2>/dev/null && echo in-is-rw || echo in-is-ro) \
                 $(echo yes > /out/z && echo out-is-rw)";
    let r = c.srun(&[
        "-N2",
        "-n2",
        "--ml-container=demo",
        &format!("--ml-container-mounts={HOME}/in:/in:ro,{HOME}/out:/out"),
        "/bin/sh",
        "-c",
        probe,
    ]);
    r.assert_ok();
    let want = format!("demo 1500 {HOME} site-data user-in in-is-ro out-is-rw\n");
    assert_eq!(r.stdout, format!("{want}{want}"), "{r}");
    assert_eq!(c.read(&format!("{HOME}/out/z")), "yes\n");
    // The default bind whose source is absent was skipped, and said so.
    let log = c.slurmd_log(1);
    assert!(
        log.contains(
            "default binds skipped, their sources do not exist on this node: /shared/models"
        ),
        "{log}"
    );
    // The runtime command, as logged.
    assert!(
        log.contains(
            "runtime command: /usr/bin/apptainer --quiet exec --bind /shared/data:/data:ro"
        ),
        "{log}"
    );

    // --ml-container-workdir.
    let r = c.srun(&[
        "-N1",
        "--ml-container=demo",
        &format!("--ml-container-mounts={HOME}/out:/out"),
        "--ml-container-workdir=/out",
        "/bin/pwd",
    ]);
    assert_eq!(r.assert_ok().stdout, "/out\n", "{r}");

    // stdin piped into srun reaches the task.
    let r = c.srun_input(
        &["-N1", "--ml-container=demo", "/bin/cat"],
        "through stdin\n",
    );
    assert_eq!(r.assert_ok().stdout, "through stdin\n", "{r}");
}

fn exit_codes_and_signals_pass_through(slurm: Slurm) {
    let c = cluster_on(slurm, Options::default());
    let r = c.srun(&["-N1", "--ml-container=demo", "/bin/sh", "-c", "exit 7"]);
    assert_eq!(r.code, Some(7), "{r}");

    let r = c.srun(&["-N1", "--ml-container=demo", "/bin/sh", "-c", "kill -9 $$"]);
    r.assert_failed();
    assert!(r.stderr.contains("Killed") || r.code == Some(137), "{r}");

    // scancel delivers SIGTERM to the payload, whose trap leaves a file.
    c.run(1, &[], &["mkdir", "-p", "out"]).assert_ok();
    let trapped = format!("{HOME}/out/trapped");
    let bg = c.spawn_srun(&[
        "-N1",
        "--ml-container=demo",
        &format!("--ml-container-mounts={HOME}/out:/out"),
        "/bin/sh",
        "-c",
        "trap 'echo TERM > /out/trapped; exit 3' TERM; echo started > /out/started; \
         while :; do sleep 0.2; done",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !c.path(&format!("{HOME}/out/started")).exists() {
        assert!(Instant::now() < deadline, "the payload never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    c.run(1, &[], &["scancel", "--user=mluser"]).assert_ok();
    let r = bg.wait();
    r.assert_failed();
    assert_eq!(c.read(&trapped), "TERM\n", "the trap did not run: {r}");
}

fn task_prolog_and_tmpdir_still_work(slurm: Slurm) {
    let c = cluster_on(
        slurm,
        Options::default().task_prolog("echo export FROM_PROLOG=prolog-ran"),
    );
    let tmp = format!("{HOME}/jobtmp");
    let r = c.srun_env(
        &[("TMPDIR", &tmp)],
        &[
            "-N2",
            "-n2",
            "--ml-container=demo",
            "/bin/sh",
            "-c",
            "echo $FROM_PROLOG $(echo ok > $TMPDIR/f.$SLURM_PROCID && cat $TMPDIR/f.$SLURM_PROCID)",
        ],
    );
    r.assert_ok();
    assert_eq!(r.stdout, "prolog-ran ok\nprolog-ran ok\n", "{r}");
}

fn commands_are_looked_up_in_the_image() {
    let c = cluster(Options::default());
    // srun resolves `cat` to the host's /usr/bin/cat, which the busybox
    // image lacks; it has /bin/cat.
    let r = c.srun(&["-N2", "-n2", "--ml-container=demo", "cat", "/MARKER"]);
    assert_eq!(r.assert_ok().stdout, "demo\ndemo\n", "{r}");
    assert!(!c.path("/bin/only-in-image").exists());
    let r = c.srun(&["-N1", "--ml-container=demo", "only-in-image"]);
    assert_eq!(r.assert_ok().stdout, "only in the image\n", "{r}");
    // A path the user typed is used as typed.
    let r = c.srun(&["-N1", "--ml-container=demo", "/usr/bin/cat", "/MARKER"]);
    r.assert_failed();
    // Also with none of the user's environment (--export=NONE, common in
    // batch scripts): no PATH from the host, the contract still set.
    let r = c.srun(&[
        "-N2",
        "-n2",
        "--export=NONE",
        "--ml-container=demo",
        "sh",
        "-c",
        "echo $(cat /MARKER) $WORLD_SIZE",
    ]);
    assert_eq!(r.assert_ok().stdout, "demo 2\ndemo 2\n", "{r}");
    // salloc's options apply to the steps run in its allocation.
    let r = c.run(
        1,
        &[],
        &[
            "salloc",
            "-N2",
            "--ml-container=demo",
            "srun",
            "-N2",
            "cat",
            "/MARKER",
        ],
    );
    let lines: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| !l.starts_with("INFO:"))
        .collect();
    assert_eq!(lines, ["demo", "demo"], "{r}");
}

/// Where no command line can carry `--ml-container` (slurmrestd, wrapper
/// scripts), Slurm itself reads each SPANK option from
/// `SLURM_SPANK__SLURM_SPANK_OPTION_<plugin>_<option>`, non-alphanumerics
/// as `_` (src/common/plugstack.c, spank_process_env_options); the plugin
/// sees the value through the same callback, checks included.
fn options_can_come_from_slurms_spank_option_variables(slurm: Slurm) {
    let c = cluster_on(slurm, Options::default());
    let var = |opt: &str| format!("SLURM_SPANK__SLURM_SPANK_OPTION_ml_container_{opt}");
    let image = var("ml_container");
    let gpus = var("ml_container_gpus");
    let r = c.srun_env(&[(&image, "demo")], &["-N2", "-n2", "cat", "/MARKER"]);
    assert_eq!(r.assert_ok().stdout, "demo\ndemo\n", "{r}");
    // A bad value fails in srun, before any node runs a task.
    let r = c.srun_env(
        &[(&image, "demo"), (&gpus, "bogus")],
        &["-N1", "/bin/sh", "-c", "echo ran"],
    );
    r.assert_failed();
    assert!(!r.stdout.contains("ran"), "{r}");
    assert!(r.stderr.contains("auto, on, off"), "{r}");
    // A job submitted with the variable in its environment (what
    // slurmrestd does): the script's srun steps run in the image.
    let script = format!("{HOME}/env-option.sh");
    let out = format!("{HOME}/env-option.out");
    c.write(&script, "#!/bin/sh\nsrun -N1 cat /MARKER\n", 0o755);
    c.run(
        1,
        &[(&image, "demo")],
        &["sbatch", "--wait", "-N1", "-o", &out, &script],
    )
    .assert_ok();
    // The -o file also holds the task's stderr: Apptainer's INFO lines.
    let text = c.read(&out);
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("INFO:")).collect();
    assert_eq!(lines, ["demo"], "{text}");
}

fn bad_setups_fail_clearly_and_fast() {
    let c = cluster(Options::default());
    let timed = |args: &[&str]| {
        let t = Instant::now();
        let r = c.srun(args);
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "took {:?}: {r}",
            t.elapsed()
        );
        r
    };
    let r = timed(&[
        "-N2",
        "--ml-container=demo",
        "--ml-container-mounts=/etc:/x",
        "/bin/true",
    ]);
    r.assert_failed();
    assert!(
        r.stderr
            .contains("touches /etc, which the site does not allow"),
        "{r}"
    );

    let r = timed(&[
        "-N2",
        "--ml-container=demo",
        &format!("--ml-container-mounts={HOME}/nope:/x"),
        "/bin/true",
    ]);
    r.assert_failed();
    assert!(
        r.stderr.contains(&format!("bind source {HOME}/nope")),
        "{r}"
    );
    assert!(
        r.stderr.contains("node n1") && r.stderr.contains("node n2"),
        "{r}"
    );

    c.run(1, &[], &["mkdir", "-p", "out"]).assert_ok();
    let r = timed(&[
        "-N1",
        "--ml-container=demo",
        &format!("--ml-container-mounts={HOME}/out:/out"),
        "--ml-container-workdir=/out/missing",
        "/bin/true",
    ]);
    r.assert_failed();
    assert!(
        r.stderr
            .contains("--ml-container-workdir /out/missing does not exist"),
        "{r}"
    );

    // An image the user cannot read: refused in srun, naming the file.
    let image = "/opt/containers/ml-frameworks/demo.sif";
    c.run_root(1, &["chmod", "0600", image]).assert_ok();
    let r = timed(&["-N2", "--ml-container=demo", "/bin/true"]);
    r.assert_failed();
    assert!(
        r.stderr.contains(image) && r.stderr.contains("Permission denied"),
        "{r}"
    );
    c.run_root(1, &["chmod", "0644", image]).assert_ok();

    c.write(
        CONFIG,
        "[runtime]\npath = \"/usr/bin/no-such-apptainer\"\n",
        0o644,
    );
    let r = timed(&["-N2", "--ml-container=demo", "/bin/true"]);
    r.assert_failed();
    assert!(
        r.stderr
            .contains("container runtime 'apptainer' is not installed"),
        "{r}"
    );
}

fn nv_exactly_when_the_step_has_gpus() {
    let c = cluster(
        Options::default()
            .file("/etc/slurm/node-gres", "gpu:2")
            // Two fake GPUs per node: any character devices do for Slurm.
            .file(
                "/etc/slurm/gres.conf",
                "NodeName=n[1-2] Name=gpu File=/dev/tty[0-1]\n",
            ),
    );
    let logged = |c: &Cluster| -> Vec<String> {
        c.slurmd_log(1)
            .lines()
            .filter(|l| l.contains("runtime command:"))
            .map(str::to_string)
            .collect()
    };
    // No GPUs; GPUs; GPUs with gpus=off; no GPUs with gpus=on.
    for extra in [
        &[][..],
        &["--gres=gpu:1"][..],
        &["--gres=gpu:1", "--ml-container-gpus=off"][..],
        &["--ml-container-gpus=on"][..],
    ] {
        let mut args = vec!["-N1", "-w", "n1"];
        args.extend_from_slice(extra);
        args.extend(["--ml-container=demo", "/bin/true"]);
        c.srun(&args).assert_ok();
    }
    let lines = logged(&c);
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let nv: Vec<bool> = lines.iter().map(|l| l.contains(" exec --nv ")).collect();
    assert_eq!(nv, [false, true, false, true], "{lines:#?}");
}

/// `kind = "singularity"`: the `singularity` command (Debian's apptainer
/// package provides it; SingularityCE has the same CLI) runs the image, and
/// the contract beats the image's `%environment` (RANK=999, MASTER_PORT=1)
/// through SINGULARITYENV_.
fn the_singularity_kind_runs_the_image_with_the_contract() {
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default()
            .file(CONFIG, "[runtime]\nkind = \"singularity\"\nbinds = []\n")
            .with_scan_images(&["rank999"]),
    );
    assert_contract_beats_rank999(&c);
    let log = c.slurmd_log(1);
    assert!(
        log.contains("runtime command: /usr/bin/singularity --quiet exec"),
        "{log}"
    );
}

fn charliecloud_on_22_05() {
    let img = sqfs_image("chdemo");
    let c = Cluster::start_with(
        Slurm::V22_05,
        Options::default()
            .copy(&img, "/opt/containers/ml-frameworks/chdemo.sqfs")
            .file(CONFIG, "[runtime]\nkind = \"charliecloud\"\nbinds = []\n"),
    );
    // ch-run keeps its SquashFS mount points under /var/tmp/$USER.ch and
    // races creating them when, as in these simulated clusters, all nodes
    // share one /var/tmp; on a real cluster /var/tmp is per node.
    c.run(1, &[], &["mkdir", "-p", "/var/tmp/mluser.ch/mnt"])
        .assert_ok();
    let r = c.srun(&[
        "-N2",
        "-n2",
        "--ml-container=chdemo",
        "/bin/sh",
        "-c",
        "echo $(cat /MARKER) $RANK $WORLD_SIZE $(hostname)",
    ]);
    r.assert_ok();
    let mut lines: Vec<&str> = r.stdout.lines().collect();
    lines.sort();
    assert_eq!(lines, ["chdemo 0 2 n1", "chdemo 1 2 n2"], "{r}");
    // A bare command is looked up in the image there too.
    let r = c.srun(&["-N1", "--ml-container=chdemo", "cat", "/MARKER"]);
    assert_eq!(r.assert_ok().stdout, "chdemo\n", "{r}");
    let r = c.srun(&["-N1", "--ml-container=chdemo", "/bin/sh", "-c", "exit 7"]);
    assert_eq!(r.code, Some(7), "{r}");
}

#[test]
fn mpi_ranks_wire_up_across_nodes_with_pmix() {
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default()
            .copy(&mpi_image(), "/opt/containers/ml-frameworks/mpi.sqfs")
            .file(
                CONFIG,
                // One user namespace per rank: cross-memory attach between ranks
                // of a node fails (apptainer #769), so Open MPI's shared-memory
                // transport must copy instead.
                "[env]\nOMPI_MCA_smsc = \"^cma\"\n",
            ),
    );
    let r = c.srun(&[
        "-N2",
        "-n4",
        "--mpi=pmix",
        "--ml-container=mpi",
        "python3",
        "-c",
        "from mpi4py import MPI; import os; c = MPI.COMM_WORLD; \
         t = c.allreduce(c.Get_rank()); \
         print(c.Get_rank(), c.Get_size(), os.environ['RANK'], t, MPI.Get_processor_name())",
    ]);
    r.assert_ok();
    let mut lines: Vec<Vec<String>> = r
        .stdout
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect();
    lines.sort();
    assert_eq!(lines.len(), 4, "{r}");
    for (i, f) in lines.iter().enumerate() {
        assert_eq!(f[0], i.to_string(), "{r}");
        assert_eq!(f[1], "4", "{r}");
        assert_eq!(f[2], f[0], "MPI rank != RANK: {r}");
        assert_eq!(f[3], "6", "allreduce across the node boundary: {r}");
    }
    let hosts: std::collections::BTreeSet<&str> = lines.iter().map(|f| f[4].as_str()).collect();
    assert_eq!(hosts.len(), 2, "{r}");
    // Slurm's PMIx server directory is bound into the container at the
    // same path, on every node (README: "srun --mpi=pmix wire-up"): the
    // image has no such directory of its own.
    let r = c.srun(&[
        "-N2",
        "-n2",
        "--mpi=pmix",
        "--ml-container=mpi",
        "python3",
        "-c",
        "import os; d = os.environ['PMIX_SERVER_TMPDIR'].rstrip('/'); \
         print(os.uname().nodename, d, os.path.isdir(d))",
    ]);
    r.assert_ok();
    let seen: Vec<Vec<&str>> = r.stdout.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(seen.len(), 2, "{r}");
    for f in seen {
        let (node, dir, inside) = (f[0], f[1], f[2]);
        assert_eq!(inside, "True", "{dir} not in the container on {node}: {r}");
        let log = c.slurmd_log(node[1..].parse().unwrap());
        let bind = format!("--bind {dir}:{dir} ");
        assert!(
            log.lines()
                .any(|l| l.contains("runtime command:") && l.contains(&bind)),
            "no {bind} in {node}'s runtime commands:\n{log}"
        );
    }
}
