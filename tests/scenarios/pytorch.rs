//! Real PyTorch, end to end. The `pytorch` image is Debian's torch
//! 2.6 (CPU) built by `ml-container build pytorch-debian` (harness
//! `pytorch_image`, cached per recipe); 2 nodes x 2 tasks, Slurm 24.11.
//!
//! `import torch` takes 7-9 s per rank with 4 ranks on 2 cores, so the
//! scenarios are few and each does as much as it can per launch. The
//! payloads end with destroy_process_group() and os._exit() (see
//! examples/ddp.py): torch 2.6 sometimes aborts at interpreter exit after
//! finishing, with or without the plugin.

use crate::harness::pytorch::pytorch_image;
use crate::harness::{Cluster, Options, Run, Slurm, HOME};
use crate::on_slurm_24_11;

on_slurm_24_11!(
    image_built_by_ml_container_build_passed_its_test,
    ddp_over_gloo_with_env_only,
    sbatch_torchrun_c10d_rendezvous,
    two_concurrent_ddp_steps_on_distinct_ports,
    site_env_reaches_torch_and_user_export_wins,
    command_missing_from_the_image_names_image_and_command,
);

const DDP: &str = include_str!("../../examples/ddp.py");
const TORCHRUN: &str = include_str!("../../examples/torchrun.sbatch");

fn cluster(config: &str) -> Cluster {
    let mut o = Options::default()
        .with_pytorch("")
        .file(&format!("{HOME}/ddp.py"), DDP);
    if !config.is_empty() {
        o = o.file("/etc/slurm/ml-container.toml", config);
    }
    start(o)
}

/// The cluster, with the user's home (which staging files into it made
/// root's) handed back to the user, so jobs can write their output there.
fn start(o: Options) -> Cluster {
    let c = Cluster::start_with(Slurm::V24_11, o);
    c.run_root(1, &["chown", "mluser:mluser", HOME]).assert_ok();
    c
}

/// One parsed line of ddp.py's output.
#[derive(Debug)]
struct RankLine {
    rank: usize,
    world: usize,
    local: usize,
    host: String,
    port: String,
    all_reduce: String,
    expected: String,
    identical: String,
    params: String,
}

fn rank_lines(text: &str) -> Vec<RankLine> {
    let mut out: Vec<RankLine> = text
        .lines()
        .filter(|l| l.starts_with("rank "))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (rank, world) = f[1].split_once('/').expect("rank/world");
            let field = |k: &str| {
                let i = f
                    .iter()
                    .position(|x| *x == k)
                    .unwrap_or_else(|| panic!("{k} in {l}"));
                f[i + 1].to_string()
            };
            RankLine {
                rank: rank.parse().expect("rank"),
                world: world.parse().expect("world"),
                local: field("local").parse().expect("local"),
                host: field("host"),
                port: field("port"),
                all_reduce: field("all_reduce"),
                expected: field("expected"),
                identical: field("identical"),
                params: field("params"),
            }
        })
        .collect();
    out.sort_by_key(|r| r.rank);
    out
}

/// Every rank 0..n once, the all_reduce right, the parameters the same
/// string on every rank (not just the script's own verdict).
#[track_caller]
fn assert_trained(lines: &[RankLine], n: usize, ctx: &dyn std::fmt::Display) {
    assert_eq!(lines.len(), n, "{ctx}");
    let want = (n * (n + 1) / 2).to_string();
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l.rank, i, "{ctx}");
        assert_eq!(l.world, n, "{ctx}");
        assert_eq!(l.all_reduce, want, "all_reduce: {ctx}");
        assert_eq!(l.expected, want, "{ctx}");
        assert_eq!(l.identical, "True", "{ctx}");
        assert_eq!(
            l.params, lines[0].params,
            "parameters differ between ranks: {ctx}"
        );
        assert_eq!(l.port, lines[0].port, "{ctx}");
    }
}

/// The image these scenarios use came from `ml-container build
/// pytorch-debian` (run by the harness as a site would): the recipe's %test
/// ran and passed during that build, and the catalog entry it made carries
/// the recipe's labels, which `ml-container show` prints.
fn image_built_by_ml_container_build_passed_its_test() {
    let dir = pytorch_image();
    let log = std::fs::read_to_string(dir.join("build.log")).expect("build.log");
    assert!(log.contains("Running testscript"), "{log}");
    assert!(
        log.contains("torch 2.6.0") && log.contains(": ok"),
        "%test output missing: {log}"
    );
    assert!(
        log.contains("patched 1 TCPStore call(s) in rendezvous.py"),
        "{log}"
    );
    assert!(log.contains("added pytorch:test"), "{log}");
    let show = std::fs::read_to_string(dir.join("show.txt")).expect("show.txt");
    for want in [
        "\"recipe\": \"pytorch-debian\"",
        "\"pytorch\": \"2.6.0\"",
        "\"python\": \"3.13\"",
        "\"mpi\": \"openmpi 5.0\"",
        "\"build_date\": \"20",
        "\"sha256\": ",
    ] {
        assert!(show.contains(want), "{want} not in: {show}");
    }
}

/// (a) `srun -N2 --ntasks-per-node=2 --ml-container=pytorch python3 ddp.py`:
/// DDP over gloo with `init_method="env://"` and nothing else; 4 ranks,
/// ranks 0-1 on n1 and 2-3 on n2, the all_reduce sums 1+2+3+4, and after 5
/// training steps on different data the parameters are identical.
fn ddp_over_gloo_with_env_only() {
    let c = cluster("");
    let r = c.srun(&[
        "-N2",
        "--ntasks-per-node=2",
        "--ml-container=pytorch",
        "python3",
        "ddp.py",
        "5",
    ]);
    r.assert_ok();
    let lines = rank_lines(&r.stdout);
    assert_trained(&lines, 4, &r);
    for l in &lines {
        assert_eq!(l.host, if l.rank < 2 { "n1" } else { "n2" }, "{r}");
        assert_eq!(l.local, l.rank % 2, "{r}");
    }
    // Training moved the parameters off their seeded start: the check is
    // not two untouched copies of the same initialisation.
    let c0 = c.srun(&[
        "-N2",
        "--ntasks-per-node=2",
        "--ml-container=pytorch",
        "python3",
        "ddp.py",
        "0",
    ]);
    c0.assert_ok();
    let untrained = rank_lines(&c0.stdout);
    assert_trained(&untrained, 4, &c0);
    assert_ne!(untrained[0].params, lines[0].params, "{r}\n{c0}");
}

/// (b) `sbatch --ml-container=pytorch` running examples/torchrun.sbatch:
/// one torchrun agent per node, c10d rendezvous at the batch script's
/// `$MASTER_ADDR:$MASTER_PORT`; every worker sees RANK/WORLD_SIZE/
/// LOCAL_RANK/LOCAL_WORLD_SIZE as torchrun defines them (not the plugin's
/// per-agent values) and the DDP run succeeds.
fn sbatch_torchrun_c10d_rendezvous() {
    // One write(2) per line: two workers of a node share the agent's stdout.
    let worker = "import os, socket\n\
        e = os.environ\n\
        os.write(1, ('worker %s %s %s %s %s %s %s\\n' % (e['RANK'], e['WORLD_SIZE'], e['LOCAL_RANK'], \
        e['LOCAL_WORLD_SIZE'], e['GROUP_RANK'], socket.gethostname(), e.get('TORCHELASTIC_RUN_ID'))).encode())\n\
        exec(open('ddp.py').read())\n";
    let c = start(
        Options::default()
            .with_pytorch("")
            .file(&format!("{HOME}/ddp.py"), DDP)
            .file(&format!("{HOME}/worker.py"), worker)
            .file(
                &format!("{HOME}/torchrun.sbatch"),
                &TORCHRUN.replace("ddp.py 5", "worker.py 3"),
            ),
    );
    let r = c.run(
        1,
        &[],
        &["sbatch", "--wait", "--parsable", "torchrun.sbatch"],
    );
    let job = r.stdout.trim().to_string();
    let out = c.read(&format!("{HOME}/torchrun-{job}.out"));
    let ctx = format!("{r}\n---- torchrun-{job}.out:\n{out}");
    assert!(r.ok(), "{ctx}");
    // The rendezvous endpoint is the batch script's, which the plugin set.
    let endpoint = out
        .lines()
        .find_map(|l| l.strip_prefix("rendezvous at "))
        .unwrap_or_else(|| panic!("no endpoint line: {ctx}"));
    let (addr, port) = endpoint.split_once(':').expect("addr:port");
    assert_eq!(addr, "n1", "{ctx}");
    assert!(
        port.parse::<u16>()
            .is_ok_and(|p| (29500..=30499).contains(&p)),
        "{ctx}"
    );
    let mut workers: Vec<Vec<String>> = out
        .lines()
        .filter(|l| l.starts_with("worker "))
        .map(|l| l.split_whitespace().skip(1).map(str::to_string).collect())
        .collect();
    workers.sort();
    assert_eq!(workers.len(), 4, "{ctx}");
    for (i, w) in workers.iter().enumerate() {
        // RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK host run_id
        assert_eq!(w[0], i.to_string(), "{ctx}");
        assert_eq!(w[1], "4", "{ctx}");
        assert_eq!(w[3], "2", "{ctx}");
        assert_eq!(w[6], job, "rdzv id: {ctx}");
    }
    // Two workers per node, local ranks 0 and 1, one group rank per node.
    for host in ["n1", "n2"] {
        let mut local: Vec<&str> = workers
            .iter()
            .filter(|w| w[5] == host)
            .map(|w| w[2].as_str())
            .collect();
        local.sort();
        assert_eq!(local, ["0", "1"], "{host}: {ctx}");
        let groups: std::collections::BTreeSet<&str> = workers
            .iter()
            .filter(|w| w[5] == host)
            .map(|w| w[4].as_str())
            .collect();
        assert_eq!(groups.len(), 1, "{host}: {ctx}");
    }
    assert_trained(&rank_lines(&out), 4, &ctx);
}

/// (c) Two DDP steps of one allocation at once, each on its own
/// MASTER_PORT: both train; the ports differ.
fn two_concurrent_ddp_steps_on_distinct_ports() {
    let c = cluster("");
    let script = "#!/bin/sh\n\
        srun --exact -N2 -n2 --ntasks-per-node=1 -o a.out python3 ddp.py 3 & a=$!\n\
        srun --exact -N2 -n2 --ntasks-per-node=1 -o b.out python3 ddp.py 3 & b=$!\n\
        wait $a; ra=$?; wait $b; rb=$?\n\
        echo \"exit $ra $rb\"\n";
    c.write(&format!("{HOME}/two.sh"), script, 0o755);
    let r = c.run(
        1,
        &[],
        &[
            "sbatch",
            "--wait",
            "--parsable",
            "-N2",
            "--ntasks-per-node=2",
            "--ml-container=pytorch",
            "-o",
            "two.out",
            "two.sh",
        ],
    );
    let a = c.read(&format!("{HOME}/a.out"));
    let b = c.read(&format!("{HOME}/b.out"));
    let top = c.read(&format!("{HOME}/two.out"));
    let ctx = format!("{r}\n---- two.out:\n{top}\n---- a.out:\n{a}\n---- b.out:\n{b}");
    assert!(r.ok(), "{ctx}");
    assert!(top.contains("exit 0 0"), "{ctx}");
    let (la, lb) = (rank_lines(&a), rank_lines(&b));
    assert_trained(&la, 2, &ctx);
    assert_trained(&lb, 2, &ctx);
    assert_ne!(
        la[0].port, lb[0].port,
        "concurrent steps share MASTER_PORT: {ctx}"
    );
}

/// (d) The site config's `[env]`/`[nccl]` values reach torch: gloo reads
/// GLOO_SOCKET_IFNAME, so a site value naming no interface makes
/// init_process_group fail on it; the user's own export (the real
/// interface, eth0) wins and the run trains. NCCL_DEBUG from `[nccl]` is
/// in the task's environment.
fn site_env_reaches_torch_and_user_export_wins() {
    let c = cluster("[nccl]\nNCCL_DEBUG = \"INFO\"\n[env]\nGLOO_SOCKET_IFNAME = \"mlcnone0\"\n");
    let args = [
        "-N2",
        "--ntasks-per-node=1",
        "--ml-container=pytorch",
        "python3",
        "-c",
        "import os, sys; print('env', os.environ['NCCL_DEBUG'], os.environ['GLOO_SOCKET_IFNAME'], flush=True); \
         sys.argv = ['ddp.py', '2']; exec(open('ddp.py').read())",
    ];
    let site = c.srun(&args);
    site.assert_failed();
    assert!(
        site.stdout
            .lines()
            .filter(|l| *l == "env INFO mlcnone0")
            .count()
            == 2,
        "{site}"
    );
    // torch itself read the variable: gloo names the interface it could not use.
    assert!(site.stderr.contains("mlcnone0"), "{site}");
    let user = c.srun_env(&[("GLOO_SOCKET_IFNAME", "eth0")], &args);
    user.assert_ok();
    assert_eq!(
        user.stdout
            .lines()
            .filter(|l| *l == "env INFO eth0")
            .count(),
        2,
        "{user}"
    );
    assert_trained(&rank_lines(&user.stdout), 2, &user);
}

/// (e) `python` is not in Debian's image (only `python3`): the step fails,
/// and the message names the command and the image instead of Apptainer's
/// bare exit 255.
fn command_missing_from_the_image_names_image_and_command() {
    let c = cluster("");
    let r: Run = c.srun(&[
        "-N1",
        "-n1",
        "--ml-container=pytorch",
        "python",
        "-c",
        "pass",
    ]);
    r.assert_failed();
    // Beyond Apptainer's bare `FATAL: "python": executable file not found
    // in $PATH`: one line naming the command and the image, with the name
    // that is there.
    let hint = r
        .stderr
        .lines()
        .find(|l| l.contains("'python' is not in image"))
        .unwrap_or_else(|| panic!("no hint naming the command: {r}"));
    assert!(
        hint.contains("pytorch:test"),
        "the hint does not name the image: {r}"
    );
    assert!(
        hint.contains("python3"),
        "the hint does not offer python3: {r}"
    );
    // The same command that is in the image runs.
    c.srun(&[
        "-N1",
        "-n1",
        "--ml-container=pytorch",
        "python3",
        "-c",
        "pass",
    ])
    .assert_ok();
}
