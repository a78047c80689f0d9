//! The distributed-training environment (README "The distributed environment").
//!
//! PyTorch's `env://` rendezvous, torchrun and Lightning read MASTER_ADDR,
//! MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE and NODE_RANK.
//! They are derived here from what Slurm tells each task, then the site's
//! `[nccl]` and `[env]` variables follow. A variable the user set is never
//! overwritten. The same code serves the plugin (per task) and
//! `ml-container env` (from the `SLURM_*` variables of its environment).
#![forbid(unsafe_code)]

use std::fmt;
use std::net::ToSocketAddrs;

use crate::config::{AddrKind, PortRange, SiteConfig};
use crate::hostlist::{self, HostlistError};

/// Slurm's step id of a batch script (SLURM_BATCH_SCRIPT, slurm.h).
pub const BATCH_STEP: u32 = 0xffff_fffb;
/// Records which values the plugin itself exported into a batch script, so
/// the script's steps do not mistake them for the user's: a JSON list of
/// `[name, value]` pairs ([`owned_record`], [`owned_pairs`]), the encoding
/// of the srun handoff ([`crate::handoff`]).
pub const OWNED_ENV: &str = "ML_CONTAINER_DIST_SET";
/// A longer [`OWNED_ENV`] record is not read (it holds two short pairs).
pub const MAX_OWNED_RECORD: usize = 16 << 10;

/// What one task knows about its place in the step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskFacts {
    pub job_id: u32,
    pub step_id: u32,
    /// The step's node list (hostlist syntax).
    pub node_list: String,
    pub world_size: u32,
    pub rank: u32,
    pub local_rank: u32,
    pub local_world_size: u32,
    pub node_rank: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DistError {
    Missing {
        var: &'static str,
    },
    Invalid {
        var: String,
        value: String,
    },
    Hostlist {
        list: String,
        source: Box<HostlistError>,
    },
    Resolve {
        host: String,
        reason: String,
    },
}

impl fmt::Display for DistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DistError::Missing { var } => write!(
                f,
                "{var} is not set: the distributed environment needs a Slurm step (or use \
                 --ml-container-dist=off)"
            ),
            DistError::Invalid { var, value } => write!(f, "{var}='{value}' is not valid"),
            DistError::Hostlist { list, source } => {
                write!(f, "node list '{list}': {source}")
            }
            DistError::Resolve { host, reason } => write!(
                f,
                "cannot resolve MASTER_ADDR host '{host}' to an IP address ({reason}); set \
                 distributed.addr = \"hostname\" or fix name resolution"
            ),
        }
    }
}

impl std::error::Error for DistError {}

fn num(get: &dyn Fn(&str) -> Option<String>, var: &'static str) -> Result<u32, DistError> {
    let v = get(var).ok_or(DistError::Missing { var })?;
    v.trim().parse().map_err(|_| DistError::Invalid {
        var: var.to_string(),
        value: v,
    })
}

/// Tasks on node `index` from a `SLURM_STEP_TASKS_PER_NODE` value such as
/// `2(x3),1` (srun(1): "number of tasks per node ... (xN) repetitions").
pub fn tasks_on_node(spec: &str, index: u32) -> Option<u32> {
    let mut seen: u64 = 0;
    for part in spec.split(',') {
        let (count, reps) = match part.split_once("(x") {
            Some((c, r)) => (c, r.strip_suffix(')')?),
            None => (part, "1"),
        };
        let count: u32 = count.trim().parse().ok()?;
        let reps: u64 = reps.trim().parse().ok()?;
        seen = seen.checked_add(reps)?;
        if u64::from(index) < seen {
            return Some(count);
        }
    }
    None
}

impl TaskFacts {
    /// From the `SLURM_*` variables Slurm gives a task (srun(1) "OUTPUT
    /// ENVIRONMENT VARIABLES").
    pub fn from_env(get: &dyn Fn(&str) -> Option<String>) -> Result<TaskFacts, DistError> {
        let job_id = num(get, "SLURM_JOB_ID")?;
        let step_id = match get("SLURM_STEP_ID").or_else(|| get("SLURM_STEPID")) {
            Some(v) => v.trim().parse().map_err(|_| DistError::Invalid {
                var: "SLURM_STEP_ID".into(),
                value: v,
            })?,
            None => BATCH_STEP,
        };
        // A heterogeneous step needs nothing special: Slurm (24.11, seen in
        // tests/scenarios/distributed.rs) gives every component's task the
        // merged SLURM_STEP_NODELIST, SLURM_STEP_NUM_TASKS and
        // SLURM_STEP_TASKS_PER_NODE, and a global SLURM_PROCID/SLURM_NODEID.
        let node_list = get("SLURM_STEP_NODELIST").ok_or(DistError::Missing {
            var: "SLURM_STEP_NODELIST",
        })?;
        let world_size = num(get, "SLURM_STEP_NUM_TASKS")?;
        let node_rank = num(get, "SLURM_NODEID")?;
        let local_world_size = match get("SLURM_STEP_TASKS_PER_NODE") {
            Some(spec) => tasks_on_node(&spec, node_rank).ok_or(DistError::Invalid {
                var: "SLURM_STEP_TASKS_PER_NODE".into(),
                value: spec,
            })?,
            None => 1,
        };
        Ok(TaskFacts {
            job_id,
            step_id,
            node_list,
            world_size,
            rank: num(get, "SLURM_PROCID")?,
            local_rank: num(get, "SLURM_LOCALID")?,
            local_world_size,
            node_rank,
        })
    }
}

/// For `ml-container env`: the facts of task `task` (default: this
/// process's own SLURM_PROCID, else 0), from a step's variables or, in a
/// batch script or an salloc shell, the job's. For `task`, tasks are placed
/// as srun's default block distribution does.
pub fn facts_for(
    get: &dyn Fn(&str) -> Option<String>,
    task: Option<u32>,
) -> Result<TaskFacts, DistError> {
    let tasks_per_node = get("SLURM_STEP_TASKS_PER_NODE").or_else(|| get("SLURM_TASKS_PER_NODE"));
    let placed = match task {
        Some(t) => {
            let spec = tasks_per_node.clone().ok_or(DistError::Missing {
                var: "SLURM_STEP_TASKS_PER_NODE",
            })?;
            Some(place_block(&spec, t).ok_or(DistError::Invalid {
                var: "--task".to_string(),
                value: format!("{t} (the step's tasks per node are '{spec}')"),
            })?)
        }
        None => None,
    };
    let lookup = |k: &str| -> Option<String> {
        match (k, placed) {
            ("SLURM_PROCID", Some((rank, _, _))) => Some(rank.to_string()),
            ("SLURM_NODEID", Some((_, node, _))) => Some(node.to_string()),
            ("SLURM_LOCALID", Some((_, _, local))) => Some(local.to_string()),
            ("SLURM_PROCID" | "SLURM_NODEID" | "SLURM_LOCALID", None) => {
                get(k).or_else(|| Some("0".to_string()))
            }
            ("SLURM_STEP_NODELIST", _) => get(k).or_else(|| get("SLURM_JOB_NODELIST")),
            ("SLURM_STEP_NUM_TASKS", _) => get(k).or_else(|| get("SLURM_NTASKS")),
            ("SLURM_STEP_TASKS_PER_NODE", _) => tasks_per_node.clone(),
            _ => get(k),
        }
    };
    TaskFacts::from_env(&lookup)
}

/// (rank, node index, local index) of global task `task` under block
/// distribution over `spec` (`SLURM_STEP_TASKS_PER_NODE` syntax).
fn place_block(spec: &str, task: u32) -> Option<(u32, u32, u32)> {
    let mut first: u64 = 0;
    let mut node: u32 = 0;
    loop {
        let here = u64::from(tasks_on_node(spec, node)?);
        if u64::from(task) < first + here {
            return Some((task, node, (u64::from(task) - first) as u32));
        }
        first += here;
        node = node.checked_add(1)?;
    }
}

/// `export NAME='value'`, quoted for any POSIX shell.
pub fn shell_export(name: &str, value: &str) -> String {
    format!("export {name}='{}'", value.replace('\'', "'\\''"))
}

/// MASTER_PORT: a function of job and step only, so every node of a step
/// agrees without talking; steps of one job get distinct ports (while the
/// range has room for them), unlike `jobid % N + base` schemes.
pub fn master_port(range: PortRange, job_id: u32, step_id: u32) -> u16 {
    let span = u64::from(range.hi - range.lo) + 1;
    // 131 spreads consecutive jobs over the range; adding the step id keeps
    // the steps of one job apart.
    let slot = (u64::from(job_id) * 131 + u64::from(step_id)) % span;
    range.lo + slot as u16
}

/// MASTER_ADDR: the first host of the node list, as a name or (config
/// `distributed.addr = "ip"`) its address.
pub fn master_addr(node_list: &str, kind: AddrKind) -> Result<String, DistError> {
    let host = hostlist::first_host(node_list).map_err(|source| DistError::Hostlist {
        list: node_list.to_string(),
        source: Box::new(source),
    })?;
    match kind {
        AddrKind::Hostname => Ok(host),
        AddrKind::Ip => {
            let addrs: Vec<_> = (host.as_str(), 0)
                .to_socket_addrs()
                .map_err(|e| DistError::Resolve {
                    host: host.clone(),
                    reason: e.to_string(),
                })?
                .collect();
            addrs
                .iter()
                .find(|a| a.is_ipv4())
                .or(addrs.first())
                .map(|a| a.ip().to_string())
                .ok_or(DistError::Resolve {
                    host,
                    reason: "no address".to_string(),
                })
        }
    }
}

/// The variables for one task, in order: the contract, then `[nccl]`, then
/// `[env]`. Values the user already has are left out by [`to_set`].
pub fn contract(cfg: &SiteConfig, f: &TaskFacts) -> Result<Vec<(String, String)>, DistError> {
    let mut vars = vec![
        (
            "MASTER_ADDR".to_string(),
            master_addr(&f.node_list, cfg.distributed.addr)?,
        ),
        (
            "MASTER_PORT".to_string(),
            master_port(cfg.distributed.port_range, f.job_id, f.step_id).to_string(),
        ),
        ("WORLD_SIZE".to_string(), f.world_size.to_string()),
        ("RANK".to_string(), f.rank.to_string()),
        ("LOCAL_RANK".to_string(), f.local_rank.to_string()),
        (
            "LOCAL_WORLD_SIZE".to_string(),
            f.local_world_size.to_string(),
        ),
        ("NODE_RANK".to_string(), f.node_rank.to_string()),
    ];
    for (k, v) in cfg.nccl.iter().chain(cfg.env.iter()) {
        vars.push((k.0.clone(), v.0.clone()));
    }
    Ok(vars)
}

/// The variables that an elastic launcher defines for each of its workers
/// (torchrun's agent sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and
/// GROUP_RANK for every worker it starts; torch.distributed.run docs,
/// "Environment Variables"). NODE_RANK is among them because torchrun does
/// not replace it: a value of ours would reach the workers and could
/// contradict their GROUP_RANK, which the rendezvous assigns.
pub const PER_WORKER: [&str; 5] = [
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
];

/// Whether a task's command is an elastic launcher that starts and numbers
/// its own workers: `torchrun`, or `python -m torch.distributed.run` (and
/// its deprecated `torch.distributed.launch`). Such a task gets the step's
/// MASTER_ADDR/MASTER_PORT and the site's variables, not [`PER_WORKER`].
pub fn is_elastic_launcher(argv: &[String]) -> bool {
    let Some(first) = argv.first() else {
        return false;
    };
    let base = first.rsplit('/').next().unwrap_or(first);
    if base == "torchrun" {
        return true;
    }
    let is_python = base
        .strip_prefix("python")
        .is_some_and(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'));
    if !is_python {
        return false;
    }
    let module = |m: &str| matches!(m, "torch.distributed.run" | "torch.distributed.launch");
    // The interpreter's own options come before -m; the first argument that
    // is not an option is the script, after which nothing is the python's.
    let mut args = argv[1..].iter();
    while let Some(a) = args.next() {
        if a == "-m" {
            return args.next().is_some_and(|m| module(m));
        }
        if let Some(m) = a.strip_prefix("-m") {
            return module(m);
        }
        if !a.starts_with('-') {
            return false;
        }
    }
    false
}

/// The batch script's share: MASTER_ADDR and MASTER_PORT of the job (for
/// `torchrun --rdzv_endpoint`), from the job's node list.
pub fn batch_contract(
    cfg: &SiteConfig,
    job_id: u32,
    job_node_list: &str,
) -> Result<Vec<(String, String)>, DistError> {
    Ok(vec![
        (
            "MASTER_ADDR".to_string(),
            master_addr(job_node_list, cfg.distributed.addr)?,
        ),
        (
            "MASTER_PORT".to_string(),
            master_port(cfg.distributed.port_range, job_id, BATCH_STEP).to_string(),
        ),
    ])
}

/// Which of `vars` to set, given the current environment: a variable the
/// user set stays. A value the plugin itself put into a batch script (listed
/// in [`OWNED_ENV`] with that very value) is not the user's.
pub fn to_set(
    vars: Vec<(String, String)>,
    get: &dyn Fn(&str) -> Option<String>,
) -> Vec<(String, String)> {
    let owned = get(OWNED_ENV).map(|t| owned_pairs(&t)).unwrap_or_default();
    let ours = |k: &str, v: &str| owned.iter().any(|(ok, ov)| ok == k && ov == v);
    vars.into_iter()
        .filter(|(k, _)| match get(k) {
            None => true,
            Some(current) => ours(k, &current),
        })
        .collect()
}

/// The [`OWNED_ENV`] value recording `vars`: `[["MASTER_ADDR","n1"],...]`.
pub fn owned_record(vars: &[(String, String)]) -> String {
    // A list of string pairs: serde_json cannot fail on it.
    serde_json::to_string(vars).unwrap_or_default()
}

/// The pairs an [`OWNED_ENV`] value records. The environment is the user's:
/// a record over [`MAX_OWNED_RECORD`] or one that does not parse records
/// nothing, so every variable in it counts as the user's.
pub fn owned_pairs(text: &str) -> Vec<(String, String)> {
    if text.len() > MAX_OWNED_RECORD {
        return Vec::new();
    }
    serde_json::from_str(text).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn elastic_launchers_are_told_apart() {
        let v = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        for yes in [
            "torchrun --nproc-per-node 2 train.py",
            "/usr/bin/torchrun train.py",
            "python -m torch.distributed.run train.py",
            "python3 -u -m torch.distributed.launch train.py",
            "/usr/bin/python3.11 -mtorch.distributed.run x.py",
        ] {
            assert!(is_elastic_launcher(&v(yes)), "{yes}");
        }
        for no in [
            "python3 train.py",
            "python3 train.py -m torch.distributed.run",
            "python3 -m torch.distributed.other",
            "python3 -m",
            "torchrunner x",
            "pythonista -m torch.distributed.run",
            "",
        ] {
            assert!(!is_elastic_launcher(&v(no)), "{no}");
        }
        assert!(!is_elastic_launcher(&[]));
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn facts(pairs: &[(&str, &str)]) -> Result<TaskFacts, DistError> {
        let e = env(pairs);
        TaskFacts::from_env(&|k| e.get(k).cloned())
    }

    const STEP: &[(&str, &str)] = &[
        ("SLURM_JOB_ID", "42"),
        ("SLURM_STEP_ID", "3"),
        ("SLURM_STEP_NODELIST", "gpu[07-08]"),
        ("SLURM_STEP_NUM_TASKS", "3"),
        ("SLURM_STEP_TASKS_PER_NODE", "2,1"),
        ("SLURM_NODEID", "1"),
        ("SLURM_PROCID", "2"),
        ("SLURM_LOCALID", "0"),
    ];

    #[test]
    fn facts_from_a_step() {
        let f = facts(STEP).unwrap();
        assert_eq!(f.world_size, 3);
        assert_eq!(f.local_world_size, 1);
        assert_eq!((f.rank, f.local_rank, f.node_rank), (2, 0, 1));
        let vars = contract(&SiteConfig::default(), &f).unwrap();
        assert_eq!(vars[0], ("MASTER_ADDR".to_string(), "gpu07".to_string()));
        assert_eq!(vars.len(), 7);
    }

    #[test]
    fn heterogeneous_step() {
        // What Slurm 24.11 gives task 1 of `srun -n1 : -n2`.
        let f = facts(&[
            ("SLURM_JOB_ID", "7"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_HET_SIZE", "2"),
            ("SLURM_STEP_NODELIST", "n[1-2]"),
            ("SLURM_STEP_NUM_TASKS", "3"),
            ("SLURM_STEP_TASKS_PER_NODE", "1,2"),
            ("SLURM_NODEID", "1"),
            ("SLURM_PROCID", "1"),
            ("SLURM_LOCALID", "0"),
        ])
        .unwrap();
        assert_eq!((f.world_size, f.local_world_size, f.rank), (3, 2, 1));
    }

    #[test]
    fn missing_and_bad_values() {
        assert_eq!(
            facts(&STEP[..2]).unwrap_err(),
            DistError::Missing {
                var: "SLURM_STEP_NODELIST"
            }
        );
        let mut bad = STEP.to_vec();
        bad[5] = ("SLURM_NODEID", "x");
        assert!(matches!(facts(&bad), Err(DistError::Invalid { .. })));
        let mut bad = STEP.to_vec();
        bad[2] = ("SLURM_STEP_NODELIST", "n[1-");
        let f = facts(&bad).unwrap();
        assert!(matches!(
            contract(&SiteConfig::default(), &f),
            Err(DistError::Hostlist { .. })
        ));
    }

    #[test]
    fn tasks_per_node_syntax() {
        assert_eq!(tasks_on_node("2(x3),1", 0), Some(2));
        assert_eq!(tasks_on_node("2(x3),1", 2), Some(2));
        assert_eq!(tasks_on_node("2(x3),1", 3), Some(1));
        assert_eq!(tasks_on_node("2(x3),1", 4), None);
        assert_eq!(tasks_on_node("4", 0), Some(4));
        assert_eq!(tasks_on_node("x", 0), None);
        assert_eq!(tasks_on_node("1(x18446744073709551615),1(x5)", 3), Some(1));
    }

    #[test]
    fn ports_agree_and_differ() {
        let r = PortRange {
            lo: 29500,
            hi: 30499,
        };
        assert_eq!(master_port(r, 42, 0), master_port(r, 42, 0));
        let ports: std::collections::HashSet<u16> =
            (0..100).map(|s| master_port(r, 42, s)).collect();
        assert_eq!(ports.len(), 100, "steps of one job collide");
        for job in [0, 1, u32::MAX] {
            for step in [0, 5, BATCH_STEP, u32::MAX] {
                let p = master_port(r, job, step);
                assert!((r.lo..=r.hi).contains(&p));
            }
        }
        let one = PortRange {
            lo: 40000,
            hi: 40000,
        };
        assert_eq!(master_port(one, 9, 9), 40000);
        let full = PortRange {
            lo: 1024,
            hi: 65535,
        };
        assert!(master_port(full, u32::MAX, u32::MAX) >= 1024);
    }

    #[test]
    fn user_values_win_and_owned_ones_do_not() {
        let vars = vec![
            ("MASTER_ADDR".to_string(), "n1".to_string()),
            ("MASTER_PORT".to_string(), "29600".to_string()),
            ("RANK".to_string(), "0".to_string()),
        ];
        let e = env(&[
            ("MASTER_PORT", "1234"),
            ("MASTER_ADDR", "n1"),
            (
                OWNED_ENV,
                r#"[["MASTER_ADDR","n1"],["MASTER_PORT","29999"]]"#,
            ),
        ]);
        let set = to_set(vars.clone(), &|k| e.get(k).cloned());
        let names: Vec<&str> = set.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["MASTER_ADDR", "RANK"]);
        assert_eq!(owned_record(&set[..1]), r#"[["MASTER_ADDR","n1"]]"#);
        // What the plugin records, it reads back: values with `;`, `=` and
        // quotes included.
        let odd = vec![("A".to_string(), "x=1;B=\"2\"".to_string())];
        assert_eq!(owned_pairs(&owned_record(&odd)), odd);
        // A garbage, oversized or old-style record owns nothing: the
        // user's MASTER_ADDR stays.
        let long = owned_record(&[("MASTER_ADDR".into(), "n1".into())])
            .replace("[[", &format!("[{}[", " ".repeat(MAX_OWNED_RECORD)));
        for record in [
            "MASTER_ADDR=n1",
            "garbage",
            "",
            "{\"MASTER_ADDR\":\"n1\"}",
            "[[\"MASTER_ADDR\"]]",
            "[[\"MASTER_ADDR\",\"n1\",\"x\"]]",
            long.as_str(),
        ] {
            let e = env(&[("MASTER_ADDR", "n1"), (OWNED_ENV, record)]);
            let set = to_set(vars.clone(), &|k| e.get(k).cloned());
            let names: Vec<&str> = set.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(names, ["MASTER_PORT", "RANK"], "{record:?}");
        }
    }

    #[test]
    fn facts_for_a_chosen_task() {
        let e = env(STEP);
        let get = |k: &str| e.get(k).cloned();
        // STEP: tasks per node "2,1": task 1 is node 0 local 1, task 2 node 1.
        let f = facts_for(&get, Some(1)).unwrap();
        assert_eq!(
            (f.rank, f.node_rank, f.local_rank, f.local_world_size),
            (1, 0, 1, 2)
        );
        let f = facts_for(&get, Some(2)).unwrap();
        assert_eq!(
            (f.rank, f.node_rank, f.local_rank, f.local_world_size),
            (2, 1, 0, 1)
        );
        assert!(facts_for(&get, Some(3)).is_err());
        assert_eq!(facts_for(&get, None).unwrap(), facts(STEP).unwrap());
        // A batch script: only the job's variables.
        let job = env(&[
            ("SLURM_JOB_ID", "9"),
            ("SLURM_JOB_NODELIST", "n[3-4]"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_TASKS_PER_NODE", "2(x2)"),
        ]);
        let f = facts_for(&|k| job.get(k).cloned(), Some(3)).unwrap();
        assert_eq!(
            (f.step_id, f.node_rank, f.local_rank, f.world_size),
            (BATCH_STEP, 1, 1, 4)
        );
        assert_eq!(f.node_list, "n[3-4]");
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_export("A", "x y"), "export A='x y'");
        assert_eq!(shell_export("A", "it's"), "export A='it'\\''s'");
    }

    #[test]
    fn ip_addresses() {
        assert_eq!(master_addr("localhost", AddrKind::Ip).unwrap(), "127.0.0.1");
        assert!(master_addr("no-such-host.invalid", AddrKind::Ip).is_err());
    }
}
