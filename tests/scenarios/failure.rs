//! Issue 6 (failure capture) acceptance: Slurm 24.11 with Apptainer, 2
//! nodes, jobs as `mluser`; reports under the default
//! /var/log/slurm/debug/<job>/<step>.<node>.json.

use std::time::{Duration, Instant};

use serde_json::Value;
use slurm_ml_container::probe;

use crate::harness::{Cluster, Options, Run, Slurm};

crate::on_slurm_24_11!(
    the_other_ranks_report_an_unreachable_master,
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

/// Polls `f` every 50 ms until it gives a value or `within` has passed.
fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
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
    // job's group (issue 10); nobody but root adds to the directory.
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

fn the_other_ranks_report_an_unreachable_master() {
    let c = cluster(Options::default().file(
        "/etc/slurm/ml-container.toml",
        "[failure]\nprobe_timeout = 2\n",
    ));
    let r = on_two_nodes(&c, "[ $RANK = 0 ] && exit 3; sleep 1; exit 4");
    r.assert_failed();
    let rep = report(&c, 1, "n2", Duration::from_secs(5)).expect("report on n2");
    assert_eq!(rep["node_state"]["master"]["reachable"], false, "{rep}");
    assert!(
        rep["issues_found"].to_string().contains("did not answer"),
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
struct MemoryCgroup {
    dir: std::path::PathBuf,
    /// The file whose `oom_kill N` line counts this cgroup's OOM kills.
    events: &'static str,
}

impl MemoryCgroup {
    fn new(limit: &str) -> MemoryCgroup {
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
    fn oom_kills(&self) -> u64 {
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
