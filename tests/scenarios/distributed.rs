//! The distributed environment: Slurm 24.11 with
//! Apptainer, clusters of 2 and 3 nodes, jobs as `mluser`. Every check reads
//! the variables from inside the container.

use std::collections::{BTreeMap, BTreeSet};

use crate::harness::{assert_contract_beats_rank999, mpi_image, Cluster, Options, Slurm, HOME};
use slurm_ml_container::hostlist;

crate::on_slurm_24_11!(
    ranks_rendezvous_with_rank_0_across_nodes,
    concurrent_steps_get_different_ports_and_both_rendezvous,
    user_values_survive_and_the_image_environment_loses,
    dist_off_sets_nothing,
    cli_env_prints_what_the_plugin_sets,
);
crate::on_apptainer_slurms!(
    variables_agree_with_slurm_for_every_layout,
    heterogeneous_step_agrees_with_slurm,
    batch_script_gets_master_addr_and_port,
);

/// Writes `script` to the user's home and runs it with `sbatch --wait`.
fn sbatch_wait(c: &Cluster, name: &str, script: &str, args: &[&str]) {
    let path = format!("{HOME}/{name}");
    c.write(&path, script, 0o755);
    let mut argv = vec!["sbatch", "--wait"];
    argv.extend_from_slice(args);
    argv.push(&path);
    c.run(1, &[], &argv).assert_ok();
}

fn cluster(nodes: usize, images: &[&str]) -> Cluster {
    cluster_on(Slurm::V24_11, nodes, images)
}

fn cluster_on(slurm: Slurm, nodes: usize, images: &[&str]) -> Cluster {
    Cluster::start_with(
        slurm,
        Options {
            nodes,
            ..Options::default()
        }
        .with_scan_images(images),
    )
}

const PROBE: &str = "echo \"$SLURM_PROCID $SLURM_LOCALID $SLURM_NODEID $SLURM_STEP_NODELIST \
                     $RANK $LOCAL_RANK $NODE_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE \
                     $MASTER_ADDR $MASTER_PORT\"";

#[derive(Debug)]
struct Seen {
    procid: String,
    localid: String,
    nodeid: String,
    nodelist: String,
    rank: String,
    local_rank: String,
    node_rank: String,
    world: String,
    local_world: String,
    addr: String,
    port: String,
}

fn parse(stdout: &str) -> Vec<Seen> {
    stdout
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 11, "unexpected probe line '{l}'");
            Seen {
                procid: f[0].into(),
                localid: f[1].into(),
                nodeid: f[2].into(),
                nodelist: f[3].into(),
                rank: f[4].into(),
                local_rank: f[5].into(),
                node_rank: f[6].into(),
                world: f[7].into(),
                local_world: f[8].into(),
                addr: f[9].into(),
                port: f[10].into(),
            }
        })
        .collect()
}

/// Every task's variables agree with Slurm's own and with each other.
fn check_consistent(seen: &[Seen], tasks: usize) {
    assert_eq!(seen.len(), tasks, "{seen:?}");
    let ranks: BTreeSet<&str> = seen.iter().map(|s| s.rank.as_str()).collect();
    assert_eq!(ranks.len(), tasks, "ranks not distinct: {seen:?}");
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for s in seen {
        *per_node.entry(&s.nodeid).or_default() += 1;
    }
    let ports: BTreeSet<&str> = seen.iter().map(|s| s.port.as_str()).collect();
    assert_eq!(
        ports.len(),
        1,
        "MASTER_PORT differs between tasks: {seen:?}"
    );
    let port: u16 = seen[0].port.parse().unwrap();
    assert!((29500..=30499).contains(&port), "port {port}");
    for s in seen {
        assert_eq!(s.rank, s.procid, "{s:?}");
        assert_eq!(s.local_rank, s.localid, "{s:?}");
        assert_eq!(s.node_rank, s.nodeid, "{s:?}");
        assert_eq!(s.world, tasks.to_string(), "{s:?}");
        assert_eq!(
            s.local_world,
            per_node[s.nodeid.as_str()].to_string(),
            "{s:?}"
        );
        assert_eq!(s.addr, hostlist::first_host(&s.nodelist).unwrap(), "{s:?}");
    }
}

fn variables_agree_with_slurm_for_every_layout(slurm: Slurm) {
    for nodes in [2usize, 3] {
        let c = cluster_on(slurm, nodes, &["demo"]);
        let n = nodes.to_string();
        let layouts: Vec<(Vec<&str>, usize)> = vec![
            (vec!["-N", &n, "-n4"], 4),
            (vec!["-N2", "-n3"], 3),
            (vec!["-N", &n, "--ntasks-per-node=2"], 2 * nodes),
            (vec!["-N", &n, "-n5", "-m", "cyclic"], 5),
        ];
        for (layout, tasks) in layouts {
            let mut args = layout.clone();
            args.extend(["--ml-container=demo", "/bin/sh", "-c", PROBE]);
            let r = c.srun(&args);
            r.assert_ok();
            check_consistent(&parse(&r.stdout), tasks);
        }
    }
}

fn heterogeneous_step_agrees_with_slurm(slurm: Slurm) {
    let c = cluster_on(slurm, 2, &["demo"]);
    let r = c.srun(&[
        "-N1",
        "-n1",
        "--ml-container=demo",
        "/bin/sh",
        "-c",
        PROBE,
        ":",
        "-N1",
        "-n2",
        "--ml-container=demo",
        "/bin/sh",
        "-c",
        PROBE,
    ]);
    r.assert_ok();
    let seen = parse(&r.stdout);
    assert_eq!(seen.len(), 3, "{r}");
    let ranks: BTreeSet<&str> = seen.iter().map(|s| s.rank.as_str()).collect();
    assert_eq!(ranks, BTreeSet::from(["0", "1", "2"]), "{r}");
    let ports: BTreeSet<&str> = seen.iter().map(|s| s.port.as_str()).collect();
    assert_eq!(ports.len(), 1, "{r}");
    for s in &seen {
        assert_eq!(s.rank, s.procid, "{s:?}");
        assert_eq!(s.local_rank, s.localid, "{s:?}");
        assert_eq!(s.node_rank, s.nodeid, "{s:?}");
        assert_eq!(s.world, "3", "{s:?}");
        assert_eq!(s.addr, "n1", "{s:?}");
    }
}

/// Rank 0 listens on MASTER_ADDR:MASTER_PORT and prints the one line each
/// other rank sends; the others retry until rank 0 listens. Python's
/// sockets (in the `mpi` image), as a real rendezvous would: every accepted
/// connection is read to its end, so nothing is lost or counted twice.
const RENDEZVOUS: &str = r#"import os, socket, sys, time
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
print("port", port, flush=True)
if rank == 0:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", port))
    s.listen(64)
    s.settimeout(90)
    for _ in range(world - 1):
        c, _ = s.accept()
        c.settimeout(30)
        data = b""
        while True:
            chunk = c.recv(256)
            if not chunk:
                break
            data += chunk
        print(data.decode().strip(), flush=True)
        c.close()
else:
    deadline = time.time() + 90
    while True:
        try:
            c = socket.create_connection((addr, port), timeout=5)
            break
        except OSError:
            if time.time() > deadline:
                sys.exit("rank %d gave up" % rank)
            time.sleep(0.1)
    c.sendall(b"hello from rank %d\n" % rank)
    c.close()
"#;

/// Puts the rendezvous program into the user's home (bound into the
/// container by Apptainer) and returns its path.
fn rendezvous_program(c: &Cluster) -> String {
    let path = format!("{HOME}/rendezvous.py");
    c.write(&path, RENDEZVOUS, 0o644);
    path
}

fn mpi_cluster() -> Cluster {
    Cluster::start_with(
        Slurm::V24_11,
        Options::default().copy(&mpi_image(), "/opt/containers/ml-frameworks/mpi.sqfs"),
    )
}

fn arrivals(stdout: &str) -> Vec<u32> {
    let mut got: Vec<u32> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("hello from rank "))
        .map(|r| r.trim().parse().unwrap())
        .collect();
    got.sort();
    got
}

fn ranks_rendezvous_with_rank_0_across_nodes() {
    let c = mpi_cluster();
    let prog = rendezvous_program(&c);
    let r = c.srun(&["-N2", "-n4", "--ml-container=mpi", "python3", &prog]);
    r.assert_ok();
    assert_eq!(arrivals(&r.stdout), [1, 2, 3], "{r}");
}

fn concurrent_steps_get_different_ports_and_both_rendezvous() {
    let c = mpi_cluster();
    let prog = rendezvous_program(&c);
    let script = format!(
        "#!/bin/sh\n\
         for s in a b; do\n\
           srun -N2 -n2 --overlap python3 {prog} >{HOME}/step-$s.out 2>&1 &\n\
         done\n\
         wait\n"
    );
    sbatch_wait(&c, "steps.sh", &script, &["-N2", "--ml-container=mpi"]);
    let a = c.read(&format!("{HOME}/step-a.out"));
    let b = c.read(&format!("{HOME}/step-b.out"));
    let port = |out: &str| -> BTreeSet<String> {
        out.lines()
            .filter_map(|l| l.strip_prefix("port "))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(port(&a).len(), 1, "{a}");
    assert_eq!(port(&b).len(), 1, "{b}");
    assert_ne!(
        port(&a),
        port(&b),
        "concurrent steps share a port:\n{a}\n{b}"
    );
    assert_eq!(arrivals(&a), [1], "{a}");
    assert_eq!(arrivals(&b), [1], "{b}");
}

fn user_values_survive_and_the_image_environment_loses() {
    let c = cluster(2, &["rank999"]);
    // The image's %environment says RANK=999 and MASTER_PORT=1.
    let r = c.srun(&[
        "-N1",
        "--ml-container-dist=off",
        "--ml-container=rank999",
        "/bin/sh",
        "-c",
        "echo $RANK $MASTER_PORT",
    ]);
    assert_eq!(
        r.assert_ok().stdout.trim(),
        "999 1",
        "the image does not set what the test assumes: {r}"
    );

    assert_contract_beats_rank999(&c);
    let r = c.srun_env(
        &[("MASTER_PORT", "12345"), ("NCCL_DEBUG", "TRACE")],
        &[
            "-N2",
            "-n2",
            "--ml-container=rank999",
            "/bin/sh",
            "-c",
            "echo $MASTER_PORT $RANK $NCCL_DEBUG",
        ],
    );
    r.assert_ok();
    let lines: BTreeSet<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines,
        BTreeSet::from(["12345 0 TRACE", "12345 1 TRACE"]),
        "{r}"
    );
}

fn dist_off_sets_nothing() {
    let c = cluster(2, &["demo"]);
    let probe =
        "echo \"[$MASTER_ADDR][$MASTER_PORT][$RANK][$WORLD_SIZE][$LOCAL_RANK][$NODE_RANK]\"";
    let r = c.srun(&[
        "-N2",
        "-n2",
        "--ml-container-dist=off",
        "--ml-container=demo",
        "/bin/sh",
        "-c",
        probe,
    ]);
    r.assert_ok();
    assert!(r.stdout.lines().all(|l| l == "[][][][][][]"), "{r}");
    assert_eq!(r.stdout.lines().count(), 2, "{r}");
}

fn batch_script_gets_master_addr_and_port(slurm: Slurm) {
    let c = cluster_on(slurm, 2, &["demo"]);
    let script = "#!/bin/sh\n\
                  echo batch $MASTER_ADDR $MASTER_PORT\n\
                  srun -N2 -n2 /bin/sh -c 'echo step $RANK $MASTER_ADDR $MASTER_PORT $(cat /MARKER)'\n";
    let out_file = format!("{HOME}/batch.out");
    sbatch_wait(
        &c,
        "batch.sh",
        script,
        &["-N2", "--ml-container=demo", "-o", &out_file],
    );
    let out = c.read(&out_file);
    let batch: Vec<&str> = out
        .lines()
        .find_map(|l| l.strip_prefix("batch "))
        .unwrap_or_else(|| panic!("no batch line:\n{out}"))
        .split_whitespace()
        .collect();
    assert_eq!(batch.len(), 2, "{out}");
    assert_eq!(batch[0], "n1", "{out}");
    let steps: Vec<Vec<&str>> = out
        .lines()
        .filter_map(|l| l.strip_prefix("step "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(steps.len(), 2, "{out}");
    for s in &steps {
        assert_eq!(s[1], "n1", "{out}");
        assert_eq!(s[3], "demo", "the step did not run in the image: {out}");
        // The step has its own port, not the batch script's.
        assert_ne!(s[2], batch[1], "{out}");
    }
}

/// `export A='x' export B='y'` -> {A: x, B: y}
fn exports(line: &str) -> BTreeMap<String, String> {
    line.split("export ")
        .filter_map(|kv| kv.trim().split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect()
}

const CONTRACT: [&str; 7] = [
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
];

fn cli_env_prints_what_the_plugin_sets() {
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default().with_scan_images(&["demo"]).copy(
            std::path::Path::new(env!("CARGO_BIN_EXE_ml-container")),
            "/usr/local/bin/ml-container",
        ),
    );
    c.run_root(1, &["chmod", "0755", "/usr/local/bin/ml-container"])
        .assert_ok();
    let probe = CONTRACT.map(|k| format!("{k}=${k}")).join(" ");
    // Step 0 runs in the container with the plugin's values; step 1 runs
    // the CLI on the host with step 0's id, so both compute for the same
    // step; the batch script itself asks for task 2.
    let script = format!(
        "#!/bin/sh\n\
         srun -n3 --ml-container=demo /bin/sh -c 'echo export {}' >{HOME}/plugin.out\n\
         srun -n3 /bin/sh -c 'SLURM_STEP_ID=0 ml-container env | tr \"\\n\" \" \"; echo' >{HOME}/cli.out\n\
         ml-container env --task 2 | tr '\\n' ' ' >{HOME}/task2.out\n",
        probe.replace(' ', " export ")
    );
    sbatch_wait(&c, "env.sh", &script, &["-N2", "-n3"]);
    let by_rank = |text: &str| -> BTreeMap<String, BTreeMap<String, String>> {
        text.lines()
            .map(|l| {
                let mut m = exports(l);
                m.retain(|k, _| CONTRACT.contains(&k.as_str()));
                (m.get("RANK").cloned().unwrap_or_default(), m)
            })
            .collect()
    };
    let plugin = by_rank(&c.read(&format!("{HOME}/plugin.out")));
    let cli = by_rank(&c.read(&format!("{HOME}/cli.out")));
    assert_eq!(plugin.len(), 3, "{plugin:?}");
    assert_eq!(plugin, cli, "ml-container env disagrees with the plugin");
    let mut task2 = exports(&c.read(&format!("{HOME}/task2.out")));
    task2.retain(|k, _| CONTRACT.contains(&k.as_str()) && k != "MASTER_PORT");
    let mut rank2 = plugin["2"].clone();
    rank2.remove("MASTER_PORT");
    assert_eq!(task2, rank2, "--task 2 in the batch script");
}
