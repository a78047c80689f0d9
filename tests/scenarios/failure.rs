//! Failure capture: Slurm 24.11 with Apptainer, 2
//! nodes, jobs as `mluser`; reports under the default
//! /var/log/slurm/debug/<job>/<step>.<node>.json.

use std::time::{Duration, Instant};

use serde_json::Value;
use slurm_ml_container::probe;

use crate::harness::{wait_for, Cluster, Options, Run, Slurm};

crate::on_slurm_24_11!(
    the_master_probe_runs_only_while_ranks_still_run,
    diagnose_names_the_rank_that_raised_first,
    the_stderr_passthrough_is_byte_for_byte_and_code_for_code,
    a_torchelastic_error_file_is_in_the_report,
    a_hang_names_the_ranks_still_alive,
    a_successful_step_writes_metrics_and_no_report,
    a_planted_symlink_is_not_followed,
    a_hung_probe_costs_at_most_its_timeout,
    an_oom_kill_is_named_in_the_report,
);
crate::on_apptainer_slurms!(
    a_failed_task_leaves_a_report_on_its_node_and_metrics_lines,
    signals_and_scancel_are_recorded,
    an_oom_kill_in_the_steps_own_cgroup_is_named_exactly,
);

const REPORTS: &str = "/var/log/slurm/debug";
const METRICS: &str = "/var/log/slurm/job_metrics.log";

fn cluster(opts: Options) -> Cluster {
    cluster_on(Slurm::V24_11, opts)
}

fn cluster_on(slurm: Slurm, opts: Options) -> Cluster {
    Cluster::start_with(slurm, opts.with_scan_images(&["demo"]))
}

/// The report of job/step on node, waiting at most `within` for it.
fn report(c: &Cluster, job: u32, node: &str, within: Duration) -> Option<Value> {
    let path = c.path(&format!("{REPORTS}/{job}/0.{node}.json"));
    wait_for(within, || std::fs::read_to_string(&path).ok())
        .map(|text| serde_json::from_str(&text).expect("report is JSON"))
}

/// `sh -c SCRIPT` in the demo image, one task on each of n1 and n2.
fn on_two_nodes(c: &Cluster, script: &str) -> Run {
    c.srun(&["-N2", "-n2", "--ml-container=demo", "/bin/sh", "-c", script])
}

/// `sh -c SCRIPT` in the demo image, one task on n1.
fn on_n1(c: &Cluster, script: &str) -> Run {
    on_n1_with(c, &[], script)
}

/// [`on_n1`] with more srun options (more tasks, memory).
fn on_n1_with(c: &Cluster, srun_args: &[&str], script: &str) -> Run {
    let mut argv = vec!["-N1", "-w", "n1"];
    argv.extend_from_slice(srun_args);
    argv.extend_from_slice(&["--ml-container=demo", "/bin/sh", "-c", script]);
    c.srun(&argv)
}

fn a_failed_task_leaves_a_report_on_its_node_and_metrics_lines(slurm: Slurm) {
    let c = cluster_on(slurm, Options::default());
    // A syslog daemon on the cluster's own /dev/log (failure.syslog is on
    // by default); it forks into the background and lives as long as the
    // cluster.
    c.run_root(1, &["busybox", "syslogd", "-O", "/var/log/syslog.test"])
        .assert_ok();
    let r = on_two_nodes(&c, "[ $RANK = 1 ] && exit 7; exit 0");
    assert_eq!(r.code, Some(7), "{r}");
    let rep = report(&c, 1, "n2", Duration::from_secs(1)).expect("no report on n2 within 1 s");
    assert_eq!(rep["job_id"], 1);
    assert_eq!(rep["node"], "n2");
    assert_eq!(rep["tasks"][0]["rank"], 1, "{rep}");
    assert_eq!(rep["tasks"][0]["exit_code"], 7, "{rep}");
    assert_eq!(rep["image"]["reference"], "demo");
    assert!(rep["image"]["path"].as_str().unwrap().ends_with("demo.sif"));
    assert_eq!(rep["environment"]["MASTER_ADDR"], "n1", "{rep}");
    assert_eq!(rep["environment"]["WORLD_SIZE"], "2", "{rep}");
    assert!(rep["runtime_command"][0]
        .as_str()
        .unwrap()
        .ends_with("apptainer"));
    let issues = rep["issues_found"].to_string();
    assert!(issues.contains("rank 1 exited with code 7"), "{issues}");
    // n1's task succeeded: no report there.
    assert!(report(&c, 1, "n1", Duration::ZERO).is_none());

    let metrics = c.read(METRICS);
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.starts_with("JOB_ID=1 "))
            .count(),
        2,
        "{metrics}"
    );
    assert!(
        metrics.contains("NODE=n2 RANK=1 IMAGE=demo EXIT_CODE=7"),
        "{metrics}"
    );
    // One syslog line for the failed task, none for the one that succeeded.
    let syslog = wait_for(Duration::from_secs(2), || {
        let t = std::fs::read_to_string(c.path("/var/log/syslog.test")).unwrap_or_default();
        t.contains("ml-container").then_some(t)
    })
    .expect("no ml-container line in syslog");
    assert!(
        syslog.contains("ml-container: job 1 step 0 node n2 rank 1 exit code 7 (image demo)"),
        "{syslog}"
    );
    assert_eq!(syslog.matches("ml-container:").count(), 1, "{syslog}");

    // Readable by the job's user (its owner, 0400) and root, not by the
    // job's group; nobody but root adds to the directory.
    let ls = c.run_root(
        1,
        &[
            "stat",
            "-c",
            "%U %G %a",
            &format!("{REPORTS}/1"),
            &format!("{REPORTS}/1/0.n2.json"),
        ],
    );
    assert_eq!(
        ls.assert_ok().stdout,
        "root mluser 750\nmluser root 400\n",
        "{ls}"
    );
    c.run(1, &[], &["cat", &format!("{REPORTS}/1/0.n2.json")])
        .assert_ok();
    c.run(1, &[], &["touch", &format!("{REPORTS}/1/mine")])
        .assert_failed();

    // For a person.
    let d = c.run(1, &[], &["ml-container", "diagnose", "1"]);
    d.assert_ok();
    assert!(d.stdout.contains("job 1 step 0 on n2"), "{d}");
    assert!(d.stdout.contains("exit code 7"), "{d}");
    let none = c.run(1, &[], &["ml-container", "diagnose", "99"]);
    assert_eq!(none.code, Some(1), "{none}");
}

fn signals_and_scancel_are_recorded(slurm: Slurm) {
    let c = cluster_on(slurm, Options::default());
    let r = on_n1(&c, "kill -9 $$");
    r.assert_failed();
    let rep = report(&c, 1, "n1", Duration::from_secs(2)).expect("report of job 1");
    assert_eq!(rep["tasks"][0]["signal"], 9, "{rep}");

    let bg = c.spawn_srun(&[
        "-N1",
        "-w",
        "n2",
        "--ml-container=demo",
        "/bin/sh",
        "-c",
        "sleep 300",
    ]);
    wait_for(Duration::from_secs(30), || {
        let q = c.run(1, &[], &["squeue", "-h", "-t", "R", "-o", "%i"]);
        (q.stdout.trim() == "2").then_some(())
    })
    .expect("job 2 never ran");
    std::thread::sleep(Duration::from_millis(500));
    c.run(1, &[], &["scancel", "2"]).assert_ok();
    bg.wait().assert_failed();
    let rep = report(&c, 2, "n2", Duration::from_secs(10)).expect("report of the cancelled job");
    let sig = rep["tasks"][0]["signal"].as_i64();
    assert!(sig == Some(15) || sig == Some(9), "{rep}");
    assert!(rep["issues_found"].to_string().contains("scancel"), "{rep}");
}

/// The master probe runs at a node's first failure while other
/// tasks of the step still run there, never once every local rank has
/// exited (it could only say "did not answer" about a step that is over).
fn the_master_probe_runs_only_while_ranks_still_run() {
    let c = cluster(Options::default().file(
        "/etc/slurm/ml-container.toml",
        "[failure]\nprobe_timeout = 2\n",
    ));
    // One task per node: rank 1 on n2 fails after rank 0, alone there.
    let r = on_two_nodes(&c, "[ $RANK = 0 ] && exit 3; sleep 1; exit 4");
    r.assert_failed();
    let rep = report(&c, 1, "n2", Duration::from_secs(5)).expect("report on n2");
    assert!(rep["node_state"]["master"].is_null(), "{rep}");
    assert!(
        !rep["issues_found"].to_string().contains("did not answer"),
        "{rep}"
    );
    // Ranks 2 and 3 on n2: rank 2 fails while rank 3 still runs, nobody
    // listens on the master's port.
    let r = c.srun(&[
        "-N2",
        "--ntasks-per-node=2",
        "--ml-container=demo",
        "/bin/sh",
        "-c",
        "[ $RANK = 2 ] && { sleep 1; exit 4; }; [ $RANK = 3 ] && sleep 3; exit 0",
    ]);
    r.assert_failed();
    let rep = report(&c, 2, "n2", Duration::from_secs(5)).expect("report on n2");
    let m = &rep["node_state"]["master"];
    assert_eq!(m["reachable"], false, "{rep}");
    assert!(
        m["when"]
            .as_str()
            .is_some_and(|w| w.contains("when rank 2 failed, with 1 other task(s)")),
        "{rep}"
    );
    let issues = rep["issues_found"].to_string();
    assert!(
        issues.contains("did not answer from n2 when rank 2 failed"),
        "{issues}"
    );
    assert!(
        !rep["recommendations"]
            .to_string()
            .contains("rank 0 probably failed"),
        "{rep}"
    );
}

fn a_successful_step_writes_metrics_and_no_report() {
    let c = cluster(Options::default());
    c.srun(&["-N2", "-n4", "--ml-container=demo", "/bin/true"])
        .assert_ok();
    let metrics = c.read(METRICS);
    let lines: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("JOB_ID=1 "))
        .collect();
    assert_eq!(lines.len(), 4, "{metrics}");
    assert!(
        lines.iter().all(|l| l.contains("EXIT_CODE=0 SIGNAL=-")),
        "{metrics}"
    );
    assert!(!c.path(&format!("{REPORTS}/1")).exists());
}

fn a_planted_symlink_is_not_followed() {
    let c = cluster(Options::default());
    c.run_root(
        1,
        &[
            "sh",
            "-c",
            "echo keep > /etc/planted && mkdir -p /var/log/slurm/debug/1 && \
             ln -s /etc/planted /var/log/slurm/debug/1/0.n1.json",
        ],
    )
    .assert_ok();
    let r = on_n1(&c, "exit 5");
    assert_eq!(r.code, Some(5), "{r}");
    let rep = report(&c, 1, "n1", Duration::from_secs(2)).expect("report");
    assert_eq!(rep["tasks"][0]["exit_code"], 5);
    assert_eq!(c.read("/etc/planted"), "keep\n", "the symlink was followed");
    let kind = c.run_root(1, &["stat", "-c", "%F", "/var/log/slurm/debug/1/0.n1.json"]);
    assert_eq!(kind.assert_ok().stdout.trim(), "regular file");
}

fn a_hung_probe_costs_at_most_its_timeout() {
    let c = cluster(
        Options::default()
            .file(
                "/etc/slurm/ml-container.toml",
                "[failure]\nprobe_timeout = 2\n",
            )
            .file("/usr/local/bin/nvidia-smi", "#!/bin/sh\nexec sleep 1000\n"),
    );
    let t = Instant::now();
    let r = on_n1(&c, "exit 1");
    let took = t.elapsed();
    assert_eq!(r.code, Some(1), "{r}");
    // The probe's 2 s plus the master probe's at most 2 s plus the launch
    // (generous for a loaded 2-core machine): nowhere near the 1000 s hang.
    assert!(took < Duration::from_secs(15), "the step took {took:?}");
    let rep = report(&c, 1, "n1", Duration::from_secs(1)).expect("report");
    assert_eq!(rep["node_state"]["gpus"]["status"], "timed_out", "{rep}");
    let left = c.run_root(1, &["sh", "-c", "pgrep -fx 'sleep 1000' | wc -l"]);
    assert_eq!(left.stdout.trim(), "0", "the hung probe was left running");
}

/// A memory cgroup of the host's (the cluster's /sys is the host's) with a
/// limit, that the job's user may move its own tasks into; removed on drop.
pub(crate) struct MemoryCgroup {
    pub(crate) dir: std::path::PathBuf,
    /// The file whose `oom_kill N` line counts this cgroup's OOM kills.
    events: &'static str,
}

impl MemoryCgroup {
    pub(crate) fn new(limit: &str) -> MemoryCgroup {
        let name = format!("mlc-oom-test-{}", std::process::id());
        // Under cgroup v1, inside the test process's own memory cgroup when
        // it can be (so whatever confines this test run also confines the
        // test's task), else at the hierarchy's root; under cgroup v2 at
        // the root (a v2 cgroup that holds processes cannot delegate its
        // memory controller to a child).
        let own_v1 = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    let mut f = l.splitn(3, ':');
                    let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
                    controllers
                        .split(',')
                        .any(|c| c == "memory")
                        .then(|| format!("/sys/fs/cgroup/memory{path}"))
                })
            });
        let candidates = own_v1
            .into_iter()
            .map(|base| (base, "memory.limit_in_bytes", "memory.oom_control"))
            .chain([
                (
                    "/sys/fs/cgroup/memory".into(),
                    "memory.limit_in_bytes",
                    "memory.oom_control",
                ),
                (
                    "/sys/fs/cgroup/unified".into(),
                    "memory.max",
                    "memory.events",
                ),
                ("/sys/fs/cgroup".into(), "memory.max", "memory.events"),
            ]);
        let mut found = None;
        for (base, limit_file, events) in candidates {
            let dir = std::path::Path::new(&base).join(&name);
            if std::fs::create_dir(&dir).is_ok() {
                if dir.join(limit_file).exists() && dir.join(events).exists() {
                    found = Some((dir, limit_file, events));
                    break;
                }
                let _ = std::fs::remove_dir(&dir);
            }
        }
        let (dir, limit_file, events) =
            found.expect("no memory cgroup hierarchy to make a test cgroup in");
        let cg = MemoryCgroup { dir, events };
        std::fs::write(cg.dir.join(limit_file), limit).expect("set the memory limit");
        // No swap to escape to: the kernel must kill.
        let _ = std::fs::write(cg.dir.join("memory.swappiness"), "0");
        let _ = std::fs::write(cg.dir.join("memory.memsw.limit_in_bytes"), limit);
        let _ = std::fs::write(cg.dir.join("memory.swap.max"), "0");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            cg.dir.join("cgroup.procs"),
            std::fs::Permissions::from_mode(0o666),
        )
        .expect("open cgroup.procs to the job's user");
        cg
    }

    /// The OOM kills inside this cgroup so far.
    pub(crate) fn oom_kills(&self) -> u64 {
        let text = std::fs::read_to_string(self.dir.join(self.events)).expect("read OOM events");
        probe::oom_kill_count(&text)
            .unwrap_or_else(|| panic!("no oom_kill line in {}: {text}", self.events))
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // The cluster is gone by now, but its last processes may still be
        // leaving the cgroup (rmdir says EBUSY until they have).
        let _ = wait_for(Duration::from_secs(5), || {
            std::fs::remove_dir(&self.dir).ok()
        });
    }
}

/// Runs, as job 1 on n1 with `srun_args`, a task that first checks that
/// /proc/self/cgroup matches the shell pattern `cgroup` (exit 3 if not),
/// then doubles a string until the kernel kills it. The doubling stops at
/// 335 MB, so a task that escaped its limit can never drive the whole
/// machine out of memory. Returns the step's report on n1.
/// Ranks other than 0 run `others` instead of doubling, when it is given.
fn oom_killed_step_report(
    c: &Cluster,
    srun_args: &[&str],
    cgroup: &str,
    others: Option<&str>,
) -> (Run, Value) {
    let others = others
        .map(|o| format!("[ \"$RANK\" = 0 ] || {{ {o}; }}; "))
        .unwrap_or_default();
    let payload = format!(
        "case $(cat /proc/self/cgroup) in {cgroup}) ;; \
         *) echo not in the expected memory cgroup >&2; cat /proc/self/cgroup >&2; exit 3;; esac; \
         {others}x=0123456789; i=0; while [ $i -lt 25 ]; do x=$x$x; i=$((i+1)); done"
    );
    let r = on_n1_with(c, srun_args, &payload);
    r.assert_failed();
    assert_ne!(r.code, Some(3), "the task escaped the memory cgroup: {r}");
    let rep = report(c, 1, "n1", Duration::from_secs(2)).expect("report of the OOM-killed step");
    let rank0 = rep["tasks"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["rank"] == 0));
    assert_eq!(rank0.map(|t| &t["signal"]), Some(&Value::from(9)), "{rep}");
    assert!(
        rep["node_state"]["oom_kills_during_step"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{rep}"
    );
    (r, rep)
}

/// A real OOM kill without a cgroup plugin (these clusters' usual setup):
/// the task's TaskProlog moves it into a 128 MB memory cgroup. The step has
/// no cgroup of its own, so the report goes by the node's OOM counter.
fn an_oom_kill_is_named_in_the_report() {
    let cg = MemoryCgroup::new("134217728");
    let procs = cg.dir.join("cgroup.procs");
    let c = cluster(
        Options::default().task_prolog(&format!("echo $SLURM_TASK_PID > {}", procs.display())),
    );
    let (r, rep) = oom_killed_step_report(&c, &[], "*mlc-oom-test-*", None);
    assert!(
        cg.oom_kills() >= 1,
        "no OOM kill inside the test cgroup: {r}"
    );
    assert_eq!(
        rep["node_state"]["step_memory_cgroup"],
        Value::Null,
        "{rep}"
    );
    assert!(
        rep["issues_found"]
            .to_string()
            .contains("rank 0 was killed by SIGKILL while the kernel's OOM killer ran"),
        "{rep}"
    );
}

/// Removes, on drop, the cgroup trees that Slurm's cgroup plugin leaves
/// behind on the host for these nodes (`slurm_nX` in each v1 hierarchy,
/// `nX_slurmstepd.scope` and `nX_slurmd.scope` under cgroup v2): Slurm
/// removes a step's and a job's cgroups, never its own root.
struct SlurmCgroupRoots(Vec<String>);

impl Drop for SlurmCgroupRoots {
    fn drop(&mut self) {
        fn remove_tree(dir: &std::path::Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        remove_tree(&e.path());
                    }
                }
            }
            let _ = wait_for(Duration::from_secs(2), || std::fs::remove_dir(dir).ok());
        }
        let mut bases = vec![std::path::PathBuf::from("/sys/fs/cgroup/system.slice")];
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            bases.extend(hierarchies.flatten().map(|e| e.path()));
        }
        for base in bases {
            for name in &self.0 {
                let dir = base.join(name);
                if dir.is_dir() {
                    remove_tree(&dir);
                }
            }
        }
    }
}

/// A real OOM kill under Slurm's own task/cgroup (ConstrainRAMSpace,
/// `--mem=128M`): Slurm puts slurmstepd and the task into the step's memory
/// cgroup (`.../job_1/step_0`), and the report reads that cgroup's own
/// OOM counter, names the cgroup and says the step ran out of memory
/// without a "most likely".
fn an_oom_kill_in_the_steps_own_cgroup_is_named_exactly(slurm: Slurm) {
    let _roots = SlurmCgroupRoots(
        [
            "slurm_n1",
            "slurm_n2",
            "n1_slurmstepd.scope",
            "n2_slurmstepd.scope",
            "n1_slurmd.scope",
            "n2_slurmd.scope",
        ]
        .map(String::from)
        .to_vec(),
    );
    let c = cluster_on(
        slurm,
        Options::default()
            .file("/etc/slurm/node-extra", "RealMemory=2000")
            .file(
                "/etc/slurm/slurm.conf.extra",
                "TaskPlugin=task/cgroup\nSelectTypeParameters=CR_Core_Memory\n",
            )
            .file(
                "/etc/slurm/cgroup.conf",
                "CgroupPlugin=autodetect\nIgnoreSystemd=yes\nConstrainRAMSpace=yes\n",
            ),
    );
    // Rank 1 waits and is stopped (SIGTERM) when rank 0 dies (srun -K): the
    // report must say so, not call it OOM-killed nor blame scancel.
    let (r, rep) = oom_killed_step_report(
        &c,
        &["-n2", "-K", "--mem=128M"],
        "*/job_1/step_0/*",
        Some("exec sleep 60"),
    );
    let cgroup = rep["node_state"]["step_memory_cgroup"]
        .as_str()
        .unwrap_or_default();
    assert!(
        cgroup.starts_with("/sys/fs/cgroup/") && cgroup.ends_with("/job_1/step_0"),
        "{rep}"
    );
    assert!(
        rep["node_state"]["oom_kills_in_step_cgroup"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{rep}"
    );
    assert!(
        rep["node_state"]["oom_kills_by_local_task"]["0"]
            .as_u64()
            .is_some_and(|n| n >= 1)
            && rep["node_state"]["oom_kills_by_local_task"]["1"] == 0,
        "{rep}"
    );
    let issues = rep["issues_found"].to_string();
    assert!(
        issues.contains("rank 0 was killed by the kernel's OOM killer: the step ran out of memory")
            && issues.contains(cgroup)
            && issues.contains("rank 1 was stopped by SIGTERM after the step ran out of memory"),
        "{rep}"
    );
    // Slurm saw the same OOM kill.
    assert!(r.stderr.contains("oom_kill event"), "{r}");
}

/// A rendezvous of `WORLD_SIZE` ranks over TCP at MASTER_ADDR:MASTER_PORT,
/// as a collective does it: rank 0 serves, every rank then blocks on its
/// peers; rank `FAIL_RANK` raises once the others wait on it. A peer that
/// goes away makes the others fail (rank 0 when a connection closes, the
/// others when rank 0's does), as gloo or NCCL would.
const RING: &str = r#"
import os, select, socket, sys, time
rank = int(os.environ["RANK"]); world = int(os.environ["WORLD_SIZE"])
addr = os.environ["MASTER_ADDR"]; port = int(os.environ["MASTER_PORT"])
fail = int(os.environ.get("FAIL_RANK", "1"))
if rank == 0:
    srv = socket.create_server(("", port))
    conns = []
    while len(conns) < world - 1:
        c, _ = srv.accept()
        if c.recv(2) == b"hi":   # a probe connects and says nothing
            conns.append(c)
        else:
            c.close()
    for c in conns:
        c.sendall(b"go")
    r, _, _ = select.select(conns, [], [])
    r[0].recv(16)
    # A collective notices a lost peer after a while (gloo's and NCCL's
    # timeouts are seconds); without this, rank 0's last words came within
    # a few ms of rank 1's, and ms are all that the order of the launchers'
    # reads can tell apart on a loaded machine.
    time.sleep(0.3)
    sys.exit("rank 0: a peer left the collective")
for i in range(600):
    try:
        s = socket.create_connection((addr, port)); break
    except OSError:
        time.sleep(0.1)
s.sendall(b"hi")
s.recv(2)
if rank == fail:
    time.sleep(2)   # the others now block on their peers
    raise RuntimeError(f"rank {rank} gives up: loss is NaN at step 7")
if not s.recv(16):
    sys.exit(f"rank {rank}: lost the master")
"#;

fn mpi_cluster(config: &str) -> Cluster {
    Cluster::start_with(
        Slurm::V24_11,
        Options::default()
            .copy(
                &crate::harness::mpi_image(),
                "/opt/containers/ml-frameworks/mpi.sqfs",
            )
            .file("/etc/slurm/ml-container.toml", config),
    )
}

/// One rank raises after the others started waiting
/// on it; `diagnose` names it first, with its exception line, and the
/// others as stopped after it; no "did not answer" advice.
fn diagnose_names_the_rank_that_raised_first() {
    let c = mpi_cluster("[failure]\nprobe_timeout = 2\n");
    c.write("/home/mluser/ring.py", RING, 0o644);
    let r = c.srun(&[
        "-N2",
        "-n4",
        "--ml-container=mpi",
        "python3",
        "/home/mluser/ring.py",
    ]);
    r.assert_failed();
    // The traceback still reached the user's stderr.
    assert!(r.stderr.contains("RuntimeError: rank 1 gives up"), "{r}");
    for node in ["n1", "n2"] {
        report(&c, 1, node, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no report on {node}: {}", c.logs()));
    }
    let rep = report(&c, 1, "n1", Duration::ZERO).expect("report");
    let rank1 = rep["tasks"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["rank"] == 1))
        .cloned()
        .expect("rank 1 in n1's report");
    let (start, end) = (
        rank1["started_unix_ms"].as_u64().expect("start time"),
        rank1["ended_unix_ms"].as_u64().expect("end time"),
    );
    assert!(start < end && end - start >= 2000, "{rank1}");
    let tail = rank1["stderr_tail"].to_string();
    assert!(tail.contains("Traceback (most recent call last)"), "{tail}");
    assert!(
        tail.contains("RuntimeError: rank 1 gives up: loss is NaN at step 7"),
        "{tail}"
    );

    let d = c.run(1, &[], &["ml-container", "diagnose", "1"]);
    d.assert_ok();
    if std::env::var_os("MLC_SHOW_DIAGNOSE").is_some() {
        eprintln!("{}", d.stdout);
    }
    let out = &d.stdout;
    assert!(
        out.contains("first to fail: rank 1 on n1: exit code 1"),
        "{d}"
    );
    let first_at = out.find("first to fail").unwrap_or(0);
    let exc = out
        .find("RuntimeError: rank 1 gives up: loss is NaN at step 7")
        .expect("the exception line");
    assert!(exc > first_at, "{d}");
    for rank in [0, 2, 3] {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("rank {rank} on ")))
            .unwrap_or_else(|| panic!("no line for rank {rank}: {d}"));
        assert!(line.contains("stopped after rank 1 failed"), "{line}\n{d}");
    }
    // A master probe made after rank 1 had failed is no issue of its own.
    assert!(
        !out.lines()
            .any(|l| l.contains("issue:") && l.contains("did not answer")),
        "{d}"
    );
    let advice: Vec<&str> = out.lines().filter(|l| l.contains("fix:")).collect();
    assert!(
        advice
            .iter()
            .all(|l| !l.contains("did not answer") && !l.contains("rank 0 probably failed")),
        "{advice:?}\n{d}"
    );
    // The step directories are gone once the step ended.
    let left = c.run_root(1, &["sh", "-c", "ls -A /run/slurm-ml-container | wc -l"]);
    assert_eq!(left.stdout.trim(), "0", "{left}");
}

/// With the stderr tail kept (the default), a step's
/// output is byte for byte, and its exit code or signal the same as the
/// same step run with a hand-written `apptainer exec`.
fn the_stderr_passthrough_is_byte_for_byte_and_code_for_code() {
    let img = crate::harness::images(&["plain"]);
    let sif = "/opt/containers/ml-frameworks/plain.sif";
    let c = Cluster::start_with(Slurm::V24_11, Options::default().copy(&img["plain"], sif));
    // Binary data (every byte value, no newline for 64 KiB at a time) and
    // a 1 MB line, on both streams.
    let mut blob: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    blob.extend(std::iter::repeat_n(b'x', 1 << 20));
    std::fs::write(c.path("/home/mluser/blob"), &blob).expect("write blob");
    let read = |p: &str| std::fs::read(c.path(p)).unwrap_or_default();
    // srun's own lines (which name the job id) may arrive amid the task's
    // stderr when its last line has no newline yet: cut them wherever they
    // are (the payload's bytes never spell "srun: "); our notice is ours.
    let strip = |b: Vec<u8>| -> Vec<u8> {
        let mut out = Vec::with_capacity(b.len());
        let mut rest = &b[..];
        while let Some(at) = rest.windows(6).position(|w| w == b"srun: ") {
            out.extend_from_slice(&rest[..at]);
            let line_end = rest[at..]
                .iter()
                .position(|c| *c == b'\n')
                .map_or(rest.len(), |e| at + e + 1);
            rest = &rest[line_end..];
        }
        out.extend_from_slice(rest);
        out.split_inclusive(|c| *c == b'\n')
            .filter(|l| !l.starts_with(b"ml-container:"))
            .flatten()
            .copied()
            .collect()
    };
    let mut codes: Vec<String> = [0, 1, 2, 77, 126, 127, 128, 200, 254, 255]
        .iter()
        .map(|c| format!("exit {c}"))
        .collect();
    codes.extend(["kill -KILL $$".to_string(), "kill -SEGV $$".to_string()]);
    for (i, end) in codes.iter().enumerate() {
        let payload =
            format!("cat ~/blob >&2; echo >&2; cat ~/blob; echo; echo 'last words {i}' >&2; {end}");
        let run = |tag: &str, argv: &[&str]| {
            let cmd = format!(
                "srun -w n1 {} >/tmp/{tag}.out 2>/tmp/{tag}.err",
                argv.iter()
                    .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            c.run(1, &[], &["sh", "-c", &cmd])
        };
        // When a task dies by SIGKILL right after writing, Slurm may close
        // its output before reading all of it, with the plugin or without
        // (seen on a loaded machine: 0 or ~1 MB of the 1.3 MB arrive, on
        // either side). A pair in which one side lost bytes compares
        // Slurm's race, not the launcher: the pair is run again (at most
        // five times); the assertions below are the same for the last pair.
        let theirs_argv = [
            "apptainer",
            "--quiet",
            "exec",
            sif,
            "/bin/sh",
            "-c",
            &payload,
        ];
        let full = |p: &str| read(p).len() == blob.len() + 1;
        let mut pair;
        let mut tries = 0;
        loop {
            pair = (
                run("ours", &["--ml-container=plain", "/bin/sh", "-c", &payload]),
                run("theirs", &theirs_argv),
            );
            tries += 1;
            if tries == 5 || (full("/tmp/ours.out") && full("/tmp/theirs.out")) {
                break;
            }
        }
        let (ours, theirs) = pair;
        assert_eq!(
            (ours.code, ours.signal),
            (theirs.code, theirs.signal),
            "{end}: {ours}\n{theirs}"
        );
        let (o_out, t_out) = (read("/tmp/ours.out"), read("/tmp/theirs.out"));
        assert_eq!(o_out.len(), blob.len() + 1, "{end}");
        assert!(
            o_out == t_out,
            "{end}: stdout differs ({} and {} bytes)",
            o_out.len(),
            t_out.len()
        );
        let (o_err, t_err) = (strip(read("/tmp/ours.err")), strip(read("/tmp/theirs.err")));
        assert_eq!(o_err.len(), t_err.len(), "{end}: stderr lengths differ");
        assert!(o_err == t_err, "{end}: stderr differs");
        assert!(o_err.starts_with(&blob), "{end}");
    }
    // The failed steps kept their last words for the report (job ids:
    // two per round, ours first).
    let rep = report(&c, 3, "n1", Duration::from_secs(5)).expect("report of `exit 1`");
    let tail = rep["tasks"][0]["stderr_tail"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        tail.last().and_then(|l| l.as_str()),
        Some("last words 1"),
        "{rep}"
    );
    assert!(tail.len() <= 50, "{}", tail.len());
}

/// A worker that records its exception as torch's
/// `@record` does (TorchElastic's error file, the format of
/// torch/distributed/elastic/multiprocessing/errors/error_handler.py):
/// the report carries the structured error. The plugin set the file's
/// path; a path the user set is left alone.
fn a_torchelastic_error_file_is_in_the_report() {
    let c = mpi_cluster("");
    let worker = r#"
import json, os, time, traceback
def train():
    raise ValueError("bad shard 3 in /data/train-00003.tar")
try:
    train()
except ValueError as e:
    with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
        json.dump({"message": {"message": f"{type(e).__name__}: {e}",
                   "extraInfo": {"py_callstack": traceback.format_exc(),
                                 "timestamp": str(int(time.time()))}}}, f)
    print("worker:", os.environ["TORCHELASTIC_ERROR_FILE"])
    raise SystemExit(1)
"#;
    c.write("/home/mluser/worker.py", worker, 0o644);
    let r = c.srun(&[
        "-w",
        "n1",
        "--ml-container=mpi",
        "python3",
        "/home/mluser/worker.py",
    ]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stdout
            .contains("worker: /run/slurm-ml-container/1.0.n1/torch-error.0.json"),
        "{r}"
    );
    let rep = report(&c, 1, "n1", Duration::from_secs(5)).expect("report");
    let e = &rep["tasks"][0]["torch_error"];
    assert_eq!(e["error_type"], "ValueError", "{rep}");
    assert_eq!(
        e["message"], "ValueError: bad shard 3 in /data/train-00003.tar",
        "{rep}"
    );
    assert!(e["traceback"].to_string().contains("in train"), "{rep}");
    assert!(
        e["timestamp"].as_u64().is_some_and(|t| t > 1_600_000_000),
        "{rep}"
    );
    let d = c.run(1, &[], &["ml-container", "diagnose", "1"]);
    assert!(
        d.stdout
            .contains("error (TorchElastic): ValueError: bad shard 3"),
        "{d}"
    );
    // The user's own path wins.
    let r = c.srun_env(
        &[("TORCHELASTIC_ERROR_FILE", "/home/mluser/mine.json")],
        &[
            "-w",
            "n1",
            "--ml-container=mpi",
            "python3",
            "/home/mluser/worker.py",
        ],
    );
    assert!(r.stdout.contains("worker: /home/mluser/mine.json"), "{r}");
    assert!(c.read("/home/mluser/mine.json").contains("bad shard 3"));
    let rep = report(&c, 2, "n1", Duration::from_secs(5)).expect("report");
    assert!(rep["tasks"][0]["torch_error"].is_null(), "{rep}");
}

/// A step that Slurm stops (scancel, time limit) while ranks
/// still run long after another ended: the report names the ranks still
/// alive and how long after the last exit they were stopped.
fn a_hang_names_the_ranks_still_alive() {
    let c = cluster(Options::default());
    let bg = c.spawn_srun(&[
        "-N1",
        "-n2",
        "-w",
        "n1",
        "--ml-container=demo",
        "/bin/sh",
        "-c",
        "[ $RANK = 0 ] && exit 0; sleep 300",
    ]);
    wait_for(Duration::from_secs(30), || {
        let q = c.run(1, &[], &["squeue", "-h", "-t", "R", "-o", "%i"]);
        (q.stdout.trim() == "1").then_some(())
    })
    .expect("job 1 never ran");
    std::thread::sleep(Duration::from_secs(3));
    c.run(1, &[], &["scancel", "1"]).assert_ok();
    bg.wait().assert_failed();
    let rep = report(&c, 1, "n1", Duration::from_secs(10)).expect("report of the cancelled job");
    let issues = rep["issues_found"].to_string();
    assert!(
        issues.contains("rank(s) 1 were still running when Slurm stopped the step")
            && issues.contains("after the last task exit on n1 (rank 0, exit code 0)"),
        "{rep}"
    );
    let d = c.run(1, &[], &["ml-container", "diagnose", "1"]);
    let hang = d
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("hang:"))
        .unwrap_or_else(|| panic!("no hang line: {d}"));
    assert!(hang.contains("rank(s) 1 (n1) were still running"), "{hang}");
    // About the 3 s the test waited before scancel (rank 0 needed a
    // moment to end after the job showed as running).
    let secs: f64 = hang
        .split(" s after the step's last task exit")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no duration in {hang}"));
    assert!((2.0..30.0).contains(&secs), "{hang}");
}

/// With real torch: `torchrun` (the step's one task) runs two
/// workers; worker 1 raises inside `@record`; torchrun's own `@record`
/// copies the worker's error file to the TORCHELASTIC_ERROR_FILE the
/// plugin gave the task, and the report carries it. The PyTorch image is
/// the one `ml-container build pytorch-debian` made (tests/harness/pytorch.rs).
#[test]
fn a_real_torchrun_worker_error_is_in_the_report() {
    let c = Cluster::start_with(Slurm::V24_11, Options::default().with_pytorch(""));
    c.write(
        "/home/mluser/rec.py",
        "import os, time\n\
         from torch.distributed.elastic.multiprocessing.errors import record\n\
         @record\n\
         def main():\n    \
             if int(os.environ['RANK']) == 1:\n        \
                 raise RuntimeError('worker 1: loss is NaN at step 7')\n    \
             time.sleep(3)\n\
         main()\n",
        0o644,
    );
    let r = c.srun_env(
        &[("USE_LIBUV", "0")],
        &[
            "-w",
            "n1",
            "--ml-container=pytorch",
            "torchrun",
            "--standalone",
            "--nproc-per-node=2",
            "/home/mluser/rec.py",
        ],
    );
    assert_eq!(r.code, Some(1), "{r}");
    let rep = report(&c, 1, "n1", Duration::from_secs(10)).expect("report");
    let e = &rep["tasks"][0]["torch_error"];
    assert_eq!(e["error_type"], "RuntimeError", "{rep}");
    assert_eq!(
        e["message"], "RuntimeError: worker 1: loss is NaN at step 7",
        "{rep}"
    );
    assert!(e["traceback"].to_string().contains("in main"), "{rep}");
    let d = c.run(1, &[], &["ml-container", "diagnose", "1"]);
    assert!(
        d.stdout
            .contains("error (TorchElastic): RuntimeError: worker 1: loss is NaN at step 7"),
        "{d}"
    );
}
