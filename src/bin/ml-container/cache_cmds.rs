//! The node cache commands: `cache list|prune|fill|check` on a
//! node, and `stage IMAGE --nodes HOSTLIST` / `verify --nodes HOSTLIST`,
//! which run `cache fill` / `cache check` on every node through Slurm
//! itself (one task per node, `srun`), not ssh.
//!
//! The cache is root's, so `stage` must run its tasks as root: run it as
//! root on a submit host (`sudo ml-container stage pytorch --nodes
//! gpu[01-64]`). srun then makes a short allocation of those nodes (root
//! may; add `--srun-arg=--partition=P`, `--srun-arg=--reservation=R` and the
//! like to place it) or, inside an allocation, a step. On a node the task
//! resolves IMAGE from the node's own catalog read, exactly as a job's step
//! does, and copies it as the first step would; a node that already holds
//! it says so. `verify --nodes` needs root only to see entries the same way
//! (the cache is world-readable).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::SystemTime;

use slurm_ml_container::config::SiteConfig;
use slurm_ml_container::hostlist;
use slurm_ml_container::node_cache::{self, Cache, Outcome};
use slurm_ml_container::registry::Registry;
use slurm_ml_container::secure;

use crate::{fail, usage, Args};

/// The srun the node commands run (tests point it elsewhere).
const SRUN_ENV: &str = "ML_CONTAINER_SRUN";

fn node_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.split('.').next().unwrap_or_default().to_string())
        .unwrap_or_else(|| "?".into())
}

fn this_cache(cfg: &SiteConfig) -> Result<Cache, ExitCode> {
    match cfg.registry.node_cache.for_host(&node_name()) {
        Some(dir) => Ok(Cache {
            dir,
            max: cfg.registry.node_cache_max.0,
        }),
        None => Err(fail(
            "registry.node_cache is not set in the site config: set it to a directory on \
             node-local disk (e.g. /var/cache/ml-container/images)",
        )),
    }
}

fn age(t: Option<SystemTime>) -> String {
    match t.and_then(|t| SystemTime::now().duration_since(t).ok()) {
        None => "-".into(),
        Some(d) if d.as_secs() < 120 => format!("{}s", d.as_secs()),
        Some(d) if d.as_secs() < 7200 => format!("{}m", d.as_secs() / 60),
        Some(d) if d.as_secs() < 172_800 => format!("{}h", d.as_secs() / 3600),
        Some(d) => format!("{}d", d.as_secs() / 86400),
    }
}

/// `name:tag` of each catalog entry with sum `sha`.
fn names_for(cfg: &SiteConfig, sha: &str) -> String {
    let names: Vec<String> = Registry::open(&cfg.registry)
        .ok()
        .and_then(|r| {
            r.catalog().ok().map(|c| {
                c.images
                    .iter()
                    .filter(|i| i.sha256.as_deref() == Some(sha))
                    .map(|i| i.reference())
                    .collect()
            })
        })
        .unwrap_or_default();
    if names.is_empty() {
        "(not in the catalog)".into()
    } else {
        names.join(",")
    }
}

/// `cache list|prune|fill|check`.
pub fn cache(cfg: &SiteConfig, args: &mut Args) -> ExitCode {
    const U: &str = "ml-container cache list | prune [--all] | fill IMAGE | check IMAGE|--all";
    match args.positional().as_deref() {
        Some("list") => list(cfg),
        Some("prune") => prune(cfg, args.flag("--all")),
        Some("fill") => match args.positional() {
            Some(image) => fill(cfg, &image),
            None => usage(U),
        },
        Some("check") => {
            let all = args.flag("--all");
            let one = args.positional();
            if all == one.is_some() {
                return usage(U);
            }
            check(cfg, one.as_deref())
        }
        _ => usage(U),
    }
}

fn list(cfg: &SiteConfig) -> ExitCode {
    let cache = match this_cache(cfg) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let entries = cache.list();
    let total: u64 = entries.iter().map(|e| e.size).sum();
    println!(
        "{}: {} images, {total} bytes of {} ({})",
        cache.dir.display(),
        entries.len(),
        cache.max,
        cfg.registry.node_cache_max
    );
    for e in &entries {
        println!(
            "{} {:>14} used {:>5} ago {:<6} {:<7} {}",
            &e.sha256[..16],
            e.size,
            age(e.last_used),
            if e.in_use { "in-use" } else { "idle" },
            if e.valid { "ok" } else { "CHANGED" },
            names_for(cfg, &e.sha256)
        );
    }
    ExitCode::SUCCESS
}

/// Removes the entries no step uses: with `all`, every one; else those
/// changed since they were hashed or no longer in the catalog.
fn prune(cfg: &SiteConfig, all: bool) -> ExitCode {
    let cache = match this_cache(cfg) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let known: Vec<String> = Registry::open(&cfg.registry)
        .ok()
        .and_then(|r| {
            r.catalog()
                .ok()
                .map(|c| c.images.iter().filter_map(|i| i.sha256.clone()).collect())
        })
        .unwrap_or_default();
    let (mut removed, mut kept) = (0, 0);
    for e in cache.list() {
        let wanted = all || !e.valid || !known.contains(&e.sha256);
        if !wanted {
            kept += 1;
            continue;
        }
        match cache.evict(&e.sha256) {
            Ok(true) => {
                removed += 1;
                println!("removed {} ({} bytes)", e.path.display(), e.size);
            }
            Ok(false) => {
                kept += 1;
                println!("kept {} (in use by a step)", e.path.display());
            }
            Err(err) => return fail(&err.to_string()),
        }
    }
    println!("{removed} removed, {kept} kept in {}", cache.dir.display());
    ExitCode::SUCCESS
}

/// On a node, as root: puts IMAGE (resolved from this node's catalog)
/// into this node's cache. One line, starting with the node's name.
fn fill(cfg: &SiteConfig, image: &str) -> ExitCode {
    let node = node_name();
    let cache = match this_cache(cfg) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let reg = match Registry::open(&cfg.registry) {
        Ok(r) => r,
        Err(e) => return fail(&format!("{node}: {e}")),
    };
    let pin = match reg.resolve(image) {
        Ok(p) => p,
        Err(e) => return fail(&format!("{node}: {e}")),
    };
    let (file, _) = match secure::open_regular(&pin.path) {
        Ok(f) => f,
        Err(e) => return fail(&format!("{node}: {e}")),
    };
    let never = || false;
    match cache.provide(
        pin.sha256.as_deref(),
        pin.size,
        node_cache::suffix_of(&pin.path),
        &file,
        &never,
    ) {
        Ok((lease, Outcome::Hit)) => {
            println!(
                "{node}: {} already cached at {}",
                pin.display_name(),
                lease.path.display()
            );
            ExitCode::SUCCESS
        }
        Ok((lease, Outcome::Copied { bytes, millis })) => {
            println!(
                "{node}: {} copied to {} ({bytes} bytes, sha256 ok, {millis} ms)",
                pin.display_name(),
                lease.path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("{node}: {} not cached: {e}", pin.display_name())),
    }
}

/// On a node: one line per image: in the cache (size, sha256 ok, age) or
/// only in the registry (size), or nowhere.
fn check(cfg: &SiteConfig, image: Option<&str>) -> ExitCode {
    let node = node_name();
    let cache = cfg.registry.node_cache.for_host(&node).map(|dir| Cache {
        dir,
        max: cfg.registry.node_cache_max.0,
    });
    let reg = match Registry::open(&cfg.registry) {
        Ok(r) => r,
        Err(e) => return fail(&format!("{node}: {e}")),
    };
    let refs: Vec<String> = match image {
        Some(i) => vec![i.to_string()],
        None => match reg.catalog() {
            Ok(c) => c.images.iter().map(|i| i.reference()).collect(),
            Err(e) => return fail(&format!("{node}: {e}")),
        },
    };
    let mut bad = 0;
    for r in refs {
        let pin = match reg.resolve(&r) {
            Ok(p) => p,
            Err(e) => {
                bad += 1;
                println!("{node}: {r}: not in the registry here: {e}");
                continue;
            }
        };
        let name = pin.display_name();
        let cached = match (&cache, pin.sha256.as_deref()) {
            (Some(c), Some(sha)) => {
                let suffix = node_cache::suffix_of(&pin.path);
                let path = c.entry_path(sha, suffix);
                match std::fs::symlink_metadata(&path) {
                    Err(_) => None,
                    Ok(m) => Some((
                        path.clone(),
                        m.len(),
                        c.valid(sha, suffix, pin.size),
                        c.list()
                            .into_iter()
                            .find(|e| e.sha256 == sha)
                            .and_then(|e| e.last_used)
                            .or_else(|| m.modified().ok()),
                    )),
                }
            }
            _ => None,
        };
        match cached {
            Some((path, size, true, used)) => println!(
                "{node}: {name}: in cache {} size {size} sha256 ok, used {} ago",
                path.display(),
                age(used)
            ),
            Some((path, size, false, _)) => {
                bad += 1;
                println!(
                    "{node}: {name}: in cache {} size {size} CHANGED since hashed (the next \
                     step replaces it; 'ml-container cache prune' removes it)",
                    path.display()
                );
            }
            None => println!(
                "{node}: {name}: in registry only {} size {}{}",
                pin.path.display(),
                pin.size,
                if cache.is_none() {
                    " (no node cache configured)"
                } else if pin.sha256.is_none() {
                    " (no sha256 in the catalog: never cached)"
                } else {
                    ""
                }
            ),
        }
    }
    if bad > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs `ml-container cache ARGS` once on every node of `nodes` through
/// srun, and prints the nodes' lines sorted by node.
fn on_nodes(
    config: Option<&Path>,
    nodes: &str,
    cache_args: &[&str],
    srun_args: &[String],
) -> ExitCode {
    let count = match hostlist::Rules::BUILD.count(nodes) {
        Ok(n) if n > 0 => n,
        Ok(_) => return usage("--nodes HOSTLIST names no node"),
        Err(e) => return fail(&format!("--nodes {nodes}: {e}")),
    };
    let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("ml-container"));
    let srun = std::env::var_os(SRUN_ENV).unwrap_or_else(|| "srun".into());
    let mut cmd = Command::new(srun);
    cmd.arg(format!("--nodelist={nodes}"))
        .arg(format!("--nodes={count}"))
        .arg(format!("--ntasks={count}"))
        .arg("--ntasks-per-node=1")
        .arg("--job-name=ml-container-cache")
        .args(srun_args)
        .arg(me)
        .arg("cache")
        .args(cache_args);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => return fail(&format!("cannot run srun: {e} (is Slurm's srun on PATH?)")),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines: Vec<&str> = stdout.lines().collect();
    lines.sort();
    for l in lines {
        println!("{l}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    for l in stderr.lines() {
        eprintln!("{l}");
    }
    if out.status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `stage IMAGE --nodes HOSTLIST [--srun-arg ARG]...`
pub fn stage(config: Option<&Path>, args: &mut Args) -> ExitCode {
    const U: &str = "ml-container stage IMAGE --nodes HOSTLIST [--srun-arg ARG]...";
    let (Some(nodes), Some(image)) = (args.value("--nodes"), args.positional()) else {
        return usage(U);
    };
    let srun_args = args.values("--srun-arg");
    on_nodes(config, &nodes, &["fill", &image], &srun_args)
}

/// `verify --nodes HOSTLIST (IMAGE | --all) [--srun-arg ARG]...`
pub fn verify_nodes(config: Option<&Path>, nodes: &str, args: &mut Args) -> ExitCode {
    const U: &str = "ml-container verify --nodes HOSTLIST IMAGE|--all [--srun-arg ARG]...";
    let all = args.flag("--all");
    let one = args.positional();
    if all == one.is_some() {
        return usage(U);
    }
    let srun_args = args.values("--srun-arg");
    let image = one.unwrap_or_default();
    let check: Vec<&str> = if all {
        vec!["check", "--all"]
    } else {
        vec!["check", &image]
    };
    on_nodes(config, nodes, &check, &srun_args)
}
