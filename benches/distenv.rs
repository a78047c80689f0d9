//! Distributed-environment benchmarks, printed side by side:
//! first host against full expansion of 10, 1,000 and 100,000-node lists,
//! and the per-task environment computation. `cargo bench --bench distenv`.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use slurm_ml_container::config::SiteConfig;
use slurm_ml_container::distenv::{self, TaskFacts};
use slurm_ml_container::hostlist;

fn median<F: FnMut()>(runs: usize, mut f: F) -> Duration {
    let mut t: Vec<Duration> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    t[runs / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    println!("== hostlist: first host vs full expansion");
    println!(
        "{:>8}  {:<28}  {:>12}  {:>12}",
        "nodes", "list", "first_host", "expand"
    );
    for (n, list) in [
        (10, "gpu[01-10]".to_string()),
        (1_000, "rack[1-10]-n[001-100]".to_string()),
        (100_000, "r[1-100]-c[1-10]-n[0001-0100]".to_string()),
    ] {
        assert_eq!(hostlist::count(&list).unwrap(), n);
        let first = median(101, || {
            black_box(hostlist::first_host(black_box(&list)).unwrap());
        });
        let all = median(11, || {
            black_box(hostlist::expand(black_box(&list)).unwrap());
        });
        println!(
            "{n:>8}  {list:<28}  {:>10.2}us  {:>10.0}us",
            us(first),
            us(all)
        );
    }

    println!("\n== per-task environment (facts from SLURM_*, contract, user-set filter)");
    let env: HashMap<String, String> = [
        ("SLURM_JOB_ID", "123456"),
        ("SLURM_STEP_ID", "3"),
        ("SLURM_STEP_NODELIST", "r[1-100]-c[1-10]-n[0001-0100]"),
        ("SLURM_STEP_NUM_TASKS", "800000"),
        ("SLURM_STEP_TASKS_PER_NODE", "8(x100000)"),
        ("SLURM_NODEID", "99999"),
        ("SLURM_PROCID", "799999"),
        ("SLURM_LOCALID", "7"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let cfg = SiteConfig::default();
    let get = |k: &str| env.get(k).cloned();
    let t = median(1001, || {
        let f = TaskFacts::from_env(&get).unwrap();
        let vars = distenv::contract(&cfg, &f).unwrap();
        black_box(distenv::to_set(vars, &get));
    });
    println!(
        "{:>8}  {:<28}  {:>10.2}us",
        "100000",
        "last task of an 800k-task step",
        us(t)
    );
}
