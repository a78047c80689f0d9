//! Node state for failure reports (seed 002 §5.5): memory, OOM kills,
//! listening ports, whether the master answers, and GPUs through
//! nvidia-smi. Every probe that can block has a timeout: a hung
//! `nvidia-smi` must never hold a step (issue 6).
#![forbid(unsafe_code)]

use std::fs;
use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::{Command, Stdio};
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

/// The kernel's OOM-kill counter (/proc/vmstat `oom_kill`, Linux >= 4.13).
pub fn oom_kills() -> Option<u64> {
    let text = fs::read_to_string("/proc/vmstat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
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
}

pub fn probe_master(addr: &str, port: u16, timeout: Duration) -> MasterProbe {
    let result = (addr, port)
        .to_socket_addrs()
        .map_err(|e| e.to_string())
        .and_then(|mut it| it.next().ok_or_else(|| "no address".to_string()))
        .and_then(|sa| TcpStream::connect_timeout(&sa, timeout).map_err(|e| e.to_string()));
    MasterProbe {
        addr: addr.to_string(),
        port,
        reachable: result.is_ok(),
        error: result.err(),
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
    fn master_probe() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(probe_master("127.0.0.1", port, Duration::from_secs(1)).reachable);
        drop(l);
        let p = probe_master("127.0.0.1", port, Duration::from_secs(1));
        assert!(!p.reachable && p.error.is_some());
    }
}
