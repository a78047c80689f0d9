//! `ml-container`: the admin CLI (README "Admin CLI: `ml-container`"). Exit codes: 0 ok,
//! 1 problem found, 2 usage.
#![forbid(unsafe_code)]

mod build;
mod cache_cmds;
mod doctor;
mod registry_cmds;

use std::path::PathBuf;
use std::process::ExitCode;

use slurm_ml_container::config::{PlugstackArgs, SiteConfig};
use slurm_ml_container::distenv;
use slurm_ml_container::report;

/// One command of the CLI: the one home of its usage. `ml-container
/// --help` prints the list, `ml-container COMMAND --help` the command's own
/// usage and `details`; `tests/cli.rs` checks that every command here is in
/// the man page (`packaging/man/ml-container.8`) and the README.
#[derive(Debug)]
struct Command {
    name: &'static str,
    /// Its arguments, one usage form per entry (without `--config PATH`,
    /// which every command takes).
    forms: &'static [&'static str],
    /// One line for the list.
    summary: &'static str,
    /// What `COMMAND --help` says after the usage.
    details: &'static str,
}

/// Every command, in the order `--help` lists them.
const COMMANDS: &[Command] = &[
    Command {
        name: "init",
        forms: &[""],
        summary: "create the registry layout (root:slurm 0755) and catalog",
        details: "Create the registry root and ml-frameworks/, custom-images/, base-images/,\n.registry/ (root:slurm, 0755) and an empty catalog if there is none.",
    },
    Command {
        name: "add",
        forms: &["FILE --name N --tag T [--default] [--alias A]...\n    [--description D] [--label K=V]... [--copy-to DIR]"],
        summary: "validate, hash and add an image to the catalog",
        details: "Check FILE is a sound SIF (or squashfs) image, record its size and sha256,\nand add it to the catalog under a lock (atomic rewrite). FILE must be inside\nthe registry, or --copy-to DIR copies it to <root>/DIR/<name>-<tag>.sif.\n--default makes it what a bare NAME means.",
    },
    Command {
        name: "remove",
        forms: &["NAME:TAG"],
        summary: "remove a catalog entry (the file stays)",
        details: "Remove a catalog entry (atomic rewrite). The image file stays.",
    },
    Command {
        name: "reindex",
        forms: &[""],
        summary: "check the catalog and rewrite its index (after a hand edit)",
        details: "Check the catalog strictly and rewrite .registry/catalog.idx, the index srun\nand the nodes resolve names with (add and remove keep it current; after a\nhand edit of the catalog it is stale and resolution parses the whole catalog).",
    },
    Command {
        name: "list",
        forms: &["[--json]"],
        summary: "the images users can name",
        details: "The catalog's images and the <name>.sif files the scan finds.",
    },
    Command {
        name: "show",
        forms: &["IMAGE"],
        summary: "what --ml-container=IMAGE resolves to",
        details: "What --ml-container=IMAGE resolves to, and its catalog entry.",
    },
    Command {
        name: "verify",
        forms: &[
            "IMAGE | --all",
            "--nodes HOSTLIST IMAGE | --all [--srun-arg ARG]...",
        ],
        summary: "check structure, size and sha256 (--nodes: on each node)",
        details: "Check structure, size and sha256 of catalog images; exit 1 naming each failure.\nWith --nodes: on each node, through srun (one task per node), one line per\nnode and image: in its cache (size, sha256 ok, last use) or only in the\nregistry (size); exit 1 when a node fails or holds a changed copy.",
    },
    Command {
        name: "stage",
        forms: &["IMAGE --nodes HOSTLIST [--srun-arg ARG]..."],
        summary: "fill the node caches (registry.node_cache) through srun",
        details: "Fill the node caches (registry.node_cache) ahead of a big job: runs\n'ml-container cache fill IMAGE' once on every node through srun (as root:\nthe cache is root's; run it with sudo). Each node resolves IMAGE from its\nown catalog read, copies it hashing on the way and checks the catalog's\nsha256. --srun-arg passes options to srun (--partition=P, --reservation=R).",
    },
    Command {
        name: "cache",
        forms: &["list | prune [--all] | fill IMAGE | check IMAGE|--all"],
        summary: "this node's image cache",
        details: "This node's image cache (registry.node_cache): list its images (size,\nlast use, in use by a step, unchanged since hashed); prune removes those\nno step uses that changed or left the catalog (--all: every one not in\nuse); fill copies IMAGE in (as root); check prints one line per image.",
    },
    Command {
        name: "doctor",
        forms: &[""],
        summary: "check config, runtime, plugstack, Slurm, registry",
        details: "Check the config, the runtime, the plugstack line and plugin, the running\nSlurm against the build, registry modes and catalog entries; one line per\nfinding with its fix; exit 1 if any problem.",
    },
    Command {
        name: "diagnose",
        forms: &["JOBID"],
        summary: "show the failure reports of a job",
        details: "Show the failure reports the plugin wrote for a job.",
    },
    Command {
        name: "prune",
        forms: &["[--older-than DAYS] [--dry-run]"],
        summary: "remove failure reports older than DAYS (30) days",
        details: "Remove the job directories under the report dir (failure.report_dir) that\nhave not changed for DAYS days (default 30), including those moved aside\nwhen a job id was reused. --dry-run only lists them. Needs root.",
    },
    Command {
        name: "env",
        forms: &["[--task N]"],
        summary: "the distributed environment the plugin sets, as export lines",
        details: "Print, as export lines, the distributed environment the plugin sets, from\nthe SLURM_* variables here (with --task N: for task N, block distribution).",
    },
    Command {
        name: "config",
        forms: &[""],
        summary: "check the site config and print it as loaded",
        details: "Check the site config and print it as the plugin loads it.",
    },
    Command {
        name: "version",
        forms: &[""],
        summary: "print the version and the Slurm it was built for",
        details: "Print the version and the Slurm release it was built for (a plugin\nloads only in that release).",
    },
    Command {
        name: "build",
        forms: &["RECIPE --name N --tag T [--set KEY=VALUE]... [--default]\n    [--copy-to DIR] [--recipes DIR] [--dry-run]"],
        summary: "build an image from a recipe with apptainer and add it",
        details: "Render RECIPE (a name from 'ml-container recipes', or a path to a .def\ntemplate) with its defaults and the --set values, run 'apptainer build' on\nit (killed after container_build_timeout seconds), then add the image to\nthe catalog with its size and sha256 as <root>/DIR/<name>-<tag>.sif (DIR:\nml-frameworks). A failed build adds nothing. --dry-run prints the rendered\ndefinition.",
    },
    Command {
        name: "recipes",
        forms: &["[--recipes DIR]"],
        summary: "the recipes and their variables with defaults",
        details: "The recipes (default: /usr/share/slurm-ml-container/recipes) and their\nvariables with defaults.",
    },
];

/// Column where the list's summaries start.
const SUMMARY_AT: usize = 27;

/// `ml-container --help`: every command of [`COMMANDS`], one form per line
/// with its summary beside it (below it when the form is long).
fn usage_text() -> String {
    let mut out =
        String::from("usage: ml-container <command> [args] [--config PATH]\n\ncommands:\n");
    for c in COMMANDS {
        for (i, form) in c.forms.iter().enumerate() {
            let line = format!("  {} {}", c.name, form.replace("\n    ", "\n      "));
            let line = line.trim_end();
            let last = i + 1 == c.forms.len();
            if !last {
                out.push_str(line);
                out.push('\n');
            } else if line.contains('\n') || line.len() + 1 > SUMMARY_AT {
                out.push_str(&format!("{line}\n{:SUMMARY_AT$}{}\n", "", c.summary));
            } else {
                out.push_str(&format!("{line:<SUMMARY_AT$}{}\n", c.summary));
            }
        }
    }
    out.push_str(
        "\n--config PATH reads another site config than /etc/slurm/ml-container.toml.\n\
         ml-container COMMAND --help says more about COMMAND.\n\
         Exit codes: 0 ok, 1 problem found, 2 usage.\n",
    );
    out
}

/// `ml-container COMMAND --help`: that command's usage and what it does.
fn command_help(cmd: &str) -> Option<String> {
    let c = COMMANDS.iter().find(|c| c.name == cmd)?;
    let mut out = String::new();
    for (i, form) in c.forms.iter().enumerate() {
        let lead = if i == 0 { "usage:" } else { "      " };
        let form = form.replace("\n    ", "\n       ");
        let line = format!("{lead} ml-container {} {form}", c.name);
        out.push_str(line.trim_end());
        out.push_str(" [--config PATH]\n");
    }
    out.push('\n');
    out.push_str(c.details);
    Some(out)
}

/// A small argument reader: flags and options anywhere, the rest positional.
#[derive(Debug)]
pub struct Args {
    items: Vec<Option<String>>,
}

impl Args {
    fn new(v: &[String]) -> Args {
        Args {
            items: v.iter().cloned().map(Some).collect(),
        }
    }

    pub fn flag(&mut self, name: &str) -> bool {
        let found = self.items.iter().position(|a| a.as_deref() == Some(name));
        if let Some(i) = found {
            self.items[i] = None;
        }
        found.is_some()
    }

    pub fn value(&mut self, name: &str) -> Option<String> {
        let prefix = format!("{name}=");
        for i in 0..self.items.len() {
            match self.items[i].as_deref() {
                Some(a) if a == name => {
                    self.items[i] = None;
                    return self.items.get_mut(i + 1).and_then(Option::take);
                }
                Some(a) if a.starts_with(&prefix) => {
                    return self.items[i].take().map(|a| a[prefix.len()..].to_string());
                }
                _ => {}
            }
        }
        None
    }

    pub fn values(&mut self, name: &str) -> Vec<String> {
        std::iter::from_fn(|| self.value(name)).collect()
    }

    pub fn positional(&mut self) -> Option<String> {
        self.items
            .iter_mut()
            .find(|a| a.as_deref().is_some_and(|s| !s.starts_with("--")))
            .and_then(Option::take)
    }

    pub fn leftover(&self) -> Option<&str> {
        self.items.iter().flatten().next().map(String::as_str)
    }
}

pub fn fail(msg: &str) -> ExitCode {
    eprintln!("ml-container: {msg}");
    ExitCode::from(1)
}

pub fn usage(u: &str) -> ExitCode {
    eprintln!("ml-container: usage: {u}");
    ExitCode::from(2)
}

fn load(config: Option<&str>) -> Result<(SiteConfig, PathBuf), String> {
    let plug: Vec<String> = config.iter().map(|p| format!("config={p}")).collect();
    let args = PlugstackArgs::parse(&plug).map_err(|e| e.to_string())?;
    let path = args.path().to_path_buf();
    SiteConfig::load(&args)
        .map(|c| (c, path))
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = raw.first().cloned() else {
        eprint!("{}", usage_text());
        return ExitCode::from(2);
    };
    match cmd.as_str() {
        "version" | "--version" => {
            println!(
                "ml-container {} (built for Slurm {})",
                env!("CARGO_PKG_VERSION"),
                slurm_ml_container::spank::BUILT_FOR_SLURM
            );
            return ExitCode::SUCCESS;
        }
        "help" | "--help" | "-h" => {
            print!("{}", usage_text());
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let mut args = Args::new(&raw[1..]);
    if args.flag("--help") || args.flag("-h") {
        match command_help(&cmd) {
            Some(help) => println!("{help}"),
            None => print!("{}", usage_text()),
        }
        return ExitCode::SUCCESS;
    }
    let config_arg = args.value("--config");
    let (cfg, cfg_path) = match load(config_arg.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let code = match cmd.as_str() {
        "init" => registry_cmds::init(&cfg),
        "add" => return registry_cmds::add(&cfg, &mut args),
        "remove" => registry_cmds::remove(&cfg, &mut args),
        "reindex" => registry_cmds::reindex(&cfg),
        "list" => registry_cmds::list(&cfg, &mut args),
        "show" => registry_cmds::show(&cfg, &mut args),
        "verify" => match args.value("--nodes") {
            Some(nodes) => cache_cmds::verify_nodes(
                config_arg.as_deref().map(std::path::Path::new),
                &nodes,
                &mut args,
            ),
            None => registry_cmds::verify(&cfg, &mut args),
        },
        "stage" => cache_cmds::stage(config_arg.as_deref().map(std::path::Path::new), &mut args),
        "cache" => cache_cmds::cache(&cfg, &mut args),
        "doctor" => doctor::doctor(&cfg, &cfg_path),
        "config" => config(&cfg),
        "env" => env(&cfg, &mut args),
        "diagnose" => diagnose(&cfg, &mut args),
        "prune" => prune(&cfg, &mut args),
        "build" => return build::build(&cfg, &mut args),
        "recipes" => build::recipes(&mut args),
        other => {
            eprintln!("ml-container: unknown command '{other}'; run 'ml-container help'");
            return ExitCode::from(2);
        }
    };
    if let Some(extra) = args.leftover() {
        eprintln!("ml-container {cmd}: unexpected argument '{extra}'");
        return ExitCode::from(2);
    }
    code
}

/// `config`: the site config as the plugin would load it.
fn config(cfg: &SiteConfig) -> ExitCode {
    match toml::to_string_pretty(cfg) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("cannot print the config: {e}")),
    }
}

/// `env [--task N]`: the variables the plugin would set for this task (or
/// task N), as `export` lines; for debugging and for batch scripts.
fn env(cfg: &SiteConfig, args: &mut Args) -> ExitCode {
    let task = match args.value("--task").map(|n| n.parse::<u32>()) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return usage("ml-container env [--task N]"),
    };
    let get = |k: &str| std::env::var(k).ok();
    match distenv::facts_for(&get, task).and_then(|f| distenv::contract(cfg, &f)) {
        Ok(vars) => {
            for (k, v) in vars {
                println!("{}", distenv::shell_export(&k, &v));
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string()),
    }
}

/// `diagnose JOBID`: the job's failure reports, for a person. Exit 0 when
/// reports were shown, 1 when there are none (or they cannot be read).
fn diagnose(cfg: &SiteConfig, args: &mut Args) -> ExitCode {
    let Some(job) = args.positional().and_then(|j| j.parse::<u32>().ok()) else {
        return usage("ml-container diagnose JOBID");
    };
    let dir = cfg.failure.report_dir.as_path();
    match report::read_job(dir, job) {
        Ok(reports) if !reports.is_empty() => {
            // Only what this user may read is shown; a report that exists
            // but is another user's is not an answer (exit 1).
            let mut readable = Vec::new();
            for (path, r) in reports {
                match r {
                    Ok(r) => readable.push(r),
                    Err(e) => println!("{}: unreadable report: {e}", path.display()),
                }
            }
            let shown = readable.len();
            // Each step: the merged view first (the first rank to fail,
            // then why every other rank ended), then each node's report.
            let mut steps: Vec<u32> = readable.iter().map(|r| r.step_id).collect();
            steps.sort_unstable();
            steps.dedup();
            for step in steps {
                let of_step: Vec<&report::Report> =
                    readable.iter().filter(|r| r.step_id == step).collect();
                let t = report::timeline(&of_step);
                print!("{}", report::render_timeline(&t));
                println!();
                for r in &of_step {
                    let first = t
                        .first
                        .map(|i| (t.ranks[i].task.rank, t.ranks[i].task.failed_at_ms()));
                    print!("{}", report::render_in_job(r, first));
                }
                println!();
            }
            if shown > 0 {
                ExitCode::SUCCESS
            } else {
                fail(&format!(
                    "none of job {job}'s failure reports in {} is readable for you: a report \
                     is readable by the job's user and root only",
                    dir.display()
                ))
            }
        }
        Ok(_) => fail(&format!(
            "no failure reports for job {job} in {}",
            dir.display()
        )),
        Err(e) => fail(&format!(
            "no failure reports for job {job} in {} ({e})",
            dir.display()
        )),
    }
}

/// `prune [--older-than DAYS] [--dry-run]`: removes the job directories
/// (and those moved aside for a reused job id) under the report dir that
/// have not changed for DAYS days (default 30). Never follows a symlink.
fn prune(cfg: &SiteConfig, args: &mut Args) -> ExitCode {
    let days = match args.value("--older-than").map(|d| d.parse::<u64>()) {
        None => 30,
        Some(Ok(d)) => d,
        Some(Err(_)) => return usage("ml-container prune [--older-than DAYS] [--dry-run]"),
    };
    let dry = args.flag("--dry-run");
    let dir = cfg.failure.report_dir.as_path();
    match report::prune(dir, std::time::Duration::from_secs(days * 86400), dry) {
        Ok(removed) => {
            for p in &removed {
                println!(
                    "{} {}",
                    if dry { "would remove" } else { "removed" },
                    p.display()
                );
            }
            println!(
                "{} job director{} older than {days} day(s) {} under {}",
                removed.len(),
                if removed.len() == 1 { "y" } else { "ies" },
                if dry { "to remove" } else { "removed" },
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("cannot prune {}: {e}", dir.display())),
    }
}
