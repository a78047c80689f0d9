//! Node state for failure reports: memory, OOM kills,
//! listening ports, whether the master answers, and GPUs through
//! nvidia-smi. Every probe that can block has a timeout: a hung
//! `nvidia-smi` must never hold a step.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// `MemTotal` and `MemAvailable` from /proc/meminfo, in KiB.
pub fn memory_kb(meminfo: &str) -> (Option<u64>, Option<u64>) {
    let field = |name: &str| {
        meminfo.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|r| r.trim_start_matches(':').split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
    };
    (field("MemTotal"), field("MemAvailable"))
}

/// The `oom_kill N` line of /proc/vmstat, memory.oom_control (cgroup v1)
/// or memory.events (cgroup v2): all three name the counter alike.
pub fn oom_kill_count(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

/// The kernel's OOM-kill counter for the whole node (/proc/vmstat
/// `oom_kill`, Linux >= 4.13).
pub fn oom_kills() -> Option<u64> {
    oom_kill_count(&fs::read_to_string("/proc/vmstat").ok()?)
}

/// The memory cgroup of one Slurm step on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepMemoryCgroup {
    /// Its directory, e.g. /sys/fs/cgroup/memory/slurm/uid_1000/job_7/step_0.
    pub dir: PathBuf,
    /// The file whose `oom_kill` line counts the OOM kills in one cgroup,
    /// not below it: cgroup v1 counts a kill only in the killed task's
    /// cgroup (Slurm's task_N, below the step's), v2's memory.events.local
    /// likewise (its memory.events is hierarchical, unless mounted with
    /// memory_localevents: Documentation/admin-guide/cgroup-v2.rst). So the
    /// step's kills are the sum over its cgroup and every cgroup below it.
    pub events: &'static str,
}

/// The memory cgroup of step `job`.`step`, from slurmstepd's
/// /proc/self/cgroup text. task/cgroup attaches slurmstepd to the step's
/// memory cgroup (v1: `.../job_J/step_S`; v2: `.../job_J/step_S/slurm`, the
/// tasks beside it in `.../step_S/user/task_N`), so the step's cgroup is the
/// ancestor named `job_J/step_S`. The v1 `memory` line wins over the v2
/// line (`0::`), which on a hybrid host carries no memory controller.
/// None without a cgroup plugin: then there is no cgroup of the step's own.
pub fn step_memory_cgroup(
    proc_cgroup: &str,
    v2_mount: &Path,
    job: u32,
    step: u32,
) -> Option<StepMemoryCgroup> {
    let mut v1 = None;
    let mut v2 = None;
    for line in proc_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path);
        } else if id == "0" && controllers.is_empty() {
            v2 = Some(path);
        }
    }
    let (base, events, path) = match (v1, v2) {
        (Some(p), _) => (Path::new("/sys/fs/cgroup/memory"), "memory.oom_control", p),
        (None, Some(p)) => (v2_mount, "memory.events.local", p),
        (None, None) => return None,
    };
    let (job, step) = (format!("job_{job}"), format!("step_{step}"));
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let at = parts
        .windows(2)
        .rposition(|w| w[0] == job && w[1] == step)?;
    Some(StepMemoryCgroup {
        dir: parts[..at + 2]
            .iter()
            .fold(base.to_path_buf(), |d, c| d.join(c)),
        events,
    })
}

/// OOM kills in a step's memory cgroup tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepOom {
    /// In the step's cgroup and every cgroup below it.
    pub total: u64,
    /// In each `task_N` cgroup's tree, by local task id N (Slurm names a
    /// task's cgroup after its local id, under v1 and v2 alike).
    pub by_local_task: BTreeMap<u32, u64>,
}

/// The OOM kills counted in `cg` and every cgroup below it (at most 4096
/// cgroups, 8 levels deep: Slurm's step holds one per task). None when the
/// step's own cgroup cannot be read.
pub fn cgroup_tree_oom_kills(cg: &StepMemoryCgroup) -> Option<StepOom> {
    fn walk(
        dir: &Path,
        events: &str,
        depth: u32,
        budget: &mut u32,
        task: Option<u32>,
        acc: &mut StepOom,
    ) -> Option<()> {
        *budget = budget.checked_sub(1)?;
        let kills = oom_kill_count(&fs::read_to_string(dir.join(events)).ok()?)?;
        acc.total += kills;
        if let Some(t) = task {
            *acc.by_local_task.entry(t).or_default() += kills;
        }
        if depth < 8 {
            for entry in fs::read_dir(dir).ok()?.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = entry.file_name();
                    let below = name
                        .to_str()
                        .and_then(|n| n.strip_prefix("task_"))
                        .and_then(|n| n.parse().ok())
                        .or(task);
                    // A task cgroup removed meanwhile counts as none.
                    let _ = walk(&entry.path(), events, depth + 1, budget, below, acc);
                }
            }
        }
        Some(())
    }
    let mut acc = StepOom::default();
    walk(&cg.dir, cg.events, 0, &mut 4096, None, &mut acc)?;
    Some(acc)
}

/// [`step_memory_cgroup`] for this process, and the OOM kills counted in
/// that cgroup's tree so far (the cgroup is made for the step, so: in the
/// step).
pub fn step_oom_kills(job: u32, step: u32) -> Option<(StepMemoryCgroup, StepOom)> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    // cgroup v2 alone is mounted on /sys/fs/cgroup; beside v1 (hybrid) on
    // /sys/fs/cgroup/unified.
    let v2_mount = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        Path::new("/sys/fs/cgroup")
    } else {
        Path::new("/sys/fs/cgroup/unified")
    };
    let cg = step_memory_cgroup(&text, v2_mount, job, step)?;
    let kills = cgroup_tree_oom_kills(&cg)?;
    Some((cg, kills))
}

/// TCP ports in LISTEN state from /proc/net/tcp{,6} text (state 0A).
pub fn listening_ports(tables: &[String]) -> Vec<u16> {
    let mut ports: Vec<u16> = tables
        .iter()
        .flat_map(|t| t.lines().skip(1))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(3) != Some(&"0A") {
                return None;
            }
            let port = f.get(1)?.rsplit(':').next()?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

pub fn read_listening_ports() -> Vec<u16> {
    let tables: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| fs::read_to_string(p).ok())
        .collect();
    listening_ports(&tables)
}

/// Whether `addr:port` accepts a TCP connection within `timeout`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterProbe {
    pub addr: String,
    pub port: u16,
    pub reachable: bool,
    pub error: Option<String>,
    /// When the probe ran: only where it can tell something, at a node's
    /// first failure while other tasks of the step still ran
    /// (docs/DESIGN.md, Decisions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_unix_ms: Option<u64>,
}

/// Whether `addr:port` accepts a TCP connection, the whole probe (name
/// resolution included) within `timeout`. The caller passes the plugin's
/// own MASTER_ADDR:MASTER_PORT (computed from Slurm's step facts and the
/// site config), never a value from the job environment: root connecting
/// wherever a job says would be a port scan from root (docs/DESIGN.md,
/// Decisions).
pub fn probe_master(addr: &str, port: u16, timeout: Duration) -> MasterProbe {
    probe_master_with(addr, port, timeout, |a: String, p: u16| {
        (a.as_str(), p).to_socket_addrs().map(Iterator::collect)
    })
}

/// [`probe_master`] with the name resolution given: glibc's resolver takes
/// no timeout (and allows ~30 s when DNS is down), so it runs in a thread of
/// its own that is abandoned at the deadline; it ends by itself later.
pub fn probe_master_with<R>(addr: &str, port: u16, timeout: Duration, resolve: R) -> MasterProbe
where
    R: FnOnce(String, u16) -> std::io::Result<Vec<SocketAddr>> + Send + 'static,
{
    let deadline = Instant::now() + timeout;
    let resolved: Result<Vec<SocketAddr>, String> = match addr.parse::<IpAddr>() {
        Ok(ip) => Ok(vec![SocketAddr::new(ip, port)]),
        Err(_) => {
            let (tx, rx) = mpsc::sync_channel(1);
            let name = addr.to_string();
            let spawned = std::thread::Builder::new()
                .name("mlc-resolve".into())
                .spawn(move || {
                    let _ = tx.send(resolve(name, port));
                });
            match spawned {
                Err(e) => Err(format!("cannot start the name lookup: {e}")),
                Ok(_) => match rx.recv_timeout(timeout) {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!(
                        "name resolution did not finish within {} ms (failure.probe_timeout)",
                        timeout.as_millis()
                    )),
                },
            }
        }
    };
    let result = resolved.and_then(|addrs| {
        let mut last = "no address".to_string();
        for sa in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                last = format!("no answer within {} ms", timeout.as_millis());
                break;
            }
            match TcpStream::connect_timeout(&sa, left) {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    });
    MasterProbe {
        addr: addr.to_string(),
        port,
        reachable: result.is_ok(),
        error: result.err(),
        when: None,
        at_unix_ms: None,
    }
}

/// The outcome of running a probe program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "detail")]
pub enum CommandProbe {
    Absent,
    Ok(String),
    Failed(String),
    TimedOut(u64),
}

/// Runs `program args` with a deadline; output capped at 64 KiB. A probe
/// still running at the deadline is killed and reaped.
pub fn run_with_timeout(program: &Path, args: &[&str], timeout: Duration) -> CommandProbe {
    if !program.is_file() {
        return CommandProbe::Absent;
    }
    let mut child = match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return CommandProbe::Failed(e.to_string()),
    };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut out = String::new();
                if let Some(stdout) = child.stdout.take() {
                    let _ = stdout.take(64 << 10).read_to_string(&mut out);
                }
                return if status.success() {
                    CommandProbe::Ok(out.trim().to_string())
                } else {
                    CommandProbe::Failed(format!("{status}: {}", out.trim()))
                };
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return CommandProbe::TimedOut(timeout.as_secs());
            }
            // The host may reap children itself (ECHILD).
            Err(e) => return CommandProbe::Failed(e.to_string()),
        }
    }
}

/// nvidia-smi, where installed.
pub fn gpus(timeout: Duration) -> CommandProbe {
    let found = [
        "/usr/bin/nvidia-smi",
        "/usr/local/bin/nvidia-smi",
        "/usr/local/nvidia/bin/nvidia-smi",
    ]
    .iter()
    .map(Path::new)
    .find(|p| p.is_file());
    match found {
        Some(p) => run_with_timeout(
            p,
            &[
                "--query-gpu=index,name,memory.used,memory.total,utilization.gpu",
                "--format=csv,noheader",
            ],
            timeout,
        ),
        None => CommandProbe::Absent,
    }
}

/// Waits for `child` at most `limit`, then kills it. The exit status, or
/// None when it was killed (or could not be waited for). Every bounded
/// wait for a child of ours that need not tell those apart goes here.
pub fn wait_limited(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo() {
        let (t, a) =
            memory_kb("MemTotal:       24105000 kB\nMemFree: 1 kB\nMemAvailable:   20000000 kB\n");
        assert_eq!((t, a), (Some(24105000), Some(20000000)));
        assert_eq!(memory_kb("junk"), (None, None));
    }

    #[test]
    fn ports() {
        let tcp = "  sl  local_address rem_address   st\n\
                   0: 0100007F:1F90 00000000:0000 0A 0\n\
                   1: 0100007F:0016 0100007F:D000 01 0\n\
                   2: 00000000:7334 00000000:0000 0A 0\n"
            .to_string();
        assert_eq!(listening_ports(&[tcp]), vec![0x1F90, 0x7334]);
    }

    #[test]
    fn timeouts_are_enforced() {
        let t = Instant::now();
        let r = run_with_timeout(Path::new("/bin/sleep"), &["30"], Duration::from_millis(300));
        assert_eq!(r, CommandProbe::TimedOut(0));
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(
            matches!(run_with_timeout(Path::new("/bin/echo"), &["hi"], Duration::from_secs(5)), CommandProbe::Ok(s) if s == "hi")
        );
        assert_eq!(
            run_with_timeout(Path::new("/nonexistent"), &[], Duration::from_secs(1)),
            CommandProbe::Absent
        );
        assert!(matches!(
            run_with_timeout(Path::new("/bin/false"), &[], Duration::from_secs(5)),
            CommandProbe::Failed(_)
        ));
    }

    #[test]
    fn oom_kill_lines() {
        assert_eq!(
            oom_kill_count("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"),
            Some(3)
        );
        assert_eq!(
            oom_kill_count("low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\n"),
            Some(1)
        );
        assert_eq!(oom_kill_count("pgfault 12\n"), None);
    }

    #[test]
    fn the_step_cgroup_is_found_in_slurms_layouts() {
        let v2 = Path::new("/sys/fs/cgroup");
        let unified = "0::/system.slice/node1_slurmstepd.scope/job_7/step_0/slurm\n";
        for (text, dir, events) in [
            // cgroup v1 (task/cgroup): slurmstepd sits in the step's cgroup.
            (
                "12:pids:/\n4:memory:/slurm/uid_1500/job_7/step_0\n0::/\n",
                "/sys/fs/cgroup/memory/slurm/uid_1500/job_7/step_0",
                "memory.oom_control",
            ),
            // cgroup v2: slurmstepd in step_S/slurm, the tasks in step_S/user.
            (
                unified,
                "/sys/fs/cgroup/system.slice/node1_slurmstepd.scope/job_7/step_0",
                "memory.events.local",
            ),
        ] {
            let want = StepMemoryCgroup {
                dir: dir.into(),
                events,
            };
            assert_eq!(step_memory_cgroup(text, v2, 7, 0), Some(want), "{text}");
        }
        // Another step's or job's cgroup, and no cgroup plugin: none.
        assert_eq!(step_memory_cgroup(unified, v2, 7, 1), None);
        assert_eq!(step_memory_cgroup(unified, v2, 17, 0), None);
        assert_eq!(
            step_memory_cgroup("4:memory:/system.slice/slurmd.service\n0::/\n", v2, 7, 0),
            None
        );
        assert_eq!(step_memory_cgroup("", v2, 7, 0), None);
        assert_eq!(step_memory_cgroup("garbage\n4:memory\n", v2, 7, 0), None);
    }

    #[test]
    fn oom_kills_are_summed_over_the_steps_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let step = root.join("job_7/step_0");
        for (dir, kills) in [("", 0), ("task_0", 2), ("task_1", 0), ("user/task_2", 1)] {
            let d = step.join(dir);
            fs::create_dir_all(&d).unwrap();
            fs::write(
                d.join("memory.oom_control"),
                format!("under_oom 0\noom_kill {kills}\n"),
            )
            .unwrap();
        }
        // "user" has no such file (not a memory cgroup): its tree is skipped,
        // the rest still counts.
        let cg = StepMemoryCgroup {
            dir: step.clone(),
            events: "memory.oom_control",
        };
        let oom = |total, tasks: &[(u32, u64)]| {
            Some(StepOom {
                total,
                by_local_task: tasks.iter().copied().collect(),
            })
        };
        assert_eq!(cgroup_tree_oom_kills(&cg), oom(2, &[(0, 2), (1, 0)]));
        fs::write(step.join("user/memory.oom_control"), "oom_kill 0\n").unwrap();
        assert_eq!(
            cgroup_tree_oom_kills(&cg),
            oom(3, &[(0, 2), (1, 0), (2, 1)])
        );
        // The step's own file unreadable: unknown, not zero.
        fs::remove_file(step.join("memory.oom_control")).unwrap();
        assert_eq!(cgroup_tree_oom_kills(&cg), None);
    }

    #[test]
    fn master_probe() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(probe_master("127.0.0.1", port, Duration::from_secs(1)).reachable);
        drop(l);
        let p = probe_master("127.0.0.1", port, Duration::from_secs(1));
        assert!(!p.reachable && p.error.is_some());
    }

    #[test]
    fn a_hanging_resolver_costs_at_most_the_timeout() {
        let t = Instant::now();
        let p = probe_master_with("master.example", 1, Duration::from_millis(300), |_, _| {
            std::thread::sleep(Duration::from_secs(30));
            Ok(vec![])
        });
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(!p.reachable);
        assert!(p.error.unwrap().contains("name resolution"));
    }

    /// glibc's real resolver against a name server that never answers, in
    /// a network and mount namespace of this test's own (loopback only):
    /// the probe returns within probe_timeout while a plain lookup is still
    /// waiting. Needs root (unshare); runs the helper below in there.
    #[test]
    fn a_real_dns_hang_is_bounded() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root for its own namespaces");
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let out = Command::new("unshare")
            .args(["--mount", "--net", "--"])
            .arg(exe)
            .args([
                "--exact",
                "probe::tests::dns_hang_helper",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("MLC_DNS_HANG_HELPER", "1")
            .output()
            .unwrap();
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("dns-hang-helper: ok"), "{text}");
    }

    #[test]
    #[ignore = "run by a_real_dns_hang_is_bounded inside its own namespaces"]
    fn dns_hang_helper() {
        if std::env::var_os("MLC_DNS_HANG_HELPER").is_none() {
            return;
        }
        let run = |argv: &[&str]| {
            let st = Command::new(argv[0]).args(&argv[1..]).status().unwrap();
            assert!(st.success(), "{argv:?}");
        };
        run(&["mount", "--make-rprivate", "/"]);
        run(&["ip", "link", "set", "lo", "up"]);
        // A name server that reads queries and never answers.
        let server = std::net::UdpSocket::bind("127.0.0.1:53").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let conf = tmp.path().join("resolv.conf");
        fs::write(
            &conf,
            "nameserver 127.0.0.1\noptions timeout:30 attempts:1\n",
        )
        .unwrap();
        run(&[
            "mount",
            "--bind",
            conf.to_str().unwrap(),
            "/etc/resolv.conf",
        ]);
        let name = "master.mlc-dns-hang.test";
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send((name, 1u16).to_socket_addrs().map(|_| ()));
        });
        let t = Instant::now();
        let p = probe_master(name, 29500, Duration::from_secs(2));
        let took = t.elapsed();
        assert!(!p.reachable, "{p:?}");
        assert!(
            took < Duration::from_millis(2500),
            "the probe took {took:?}"
        );
        assert!(
            p.error
                .as_deref()
                .unwrap_or_default()
                .contains("name resolution"),
            "{p:?}"
        );
        // The resolver really hangs: it asked our server, and a plain
        // lookup started before the probe has still no answer.
        server
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut buf = [0u8; 512];
        assert!(server.recv_from(&mut buf).is_ok(), "no DNS query was sent");
        assert!(
            rx.try_recv().is_err(),
            "the plain lookup finished: the resolver did not hang"
        );
        println!("dns-hang-helper: ok ({took:?})");
    }
}
