//! `ml-container`: the admin CLI (SPEC "Admin CLI").
#![forbid(unsafe_code)]

use std::process::ExitCode;

use slurm_ml_container::config::{PlugstackArgs, SiteConfig};
use slurm_ml_container::distenv;
use slurm_ml_container::report;

const USAGE: &str = "usage: ml-container <command> [args]

commands:
  config [--config PATH]   check the site config and print it as loaded
  diagnose JOBID [--config PATH]
                           show the failure reports of a job
  env [--task N] [--config PATH]
                           print, as export lines, the distributed environment
                           the plugin sets, from the SLURM_* variables here
  version                  print the version and the Slurm it was built for
  help                     this text
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("version") | Some("--version") => {
            println!(
                "ml-container {} (built for Slurm {})",
                env!("CARGO_PKG_VERSION"),
                slurm_ml_container::spank::BUILT_FOR_SLURM
            );
            ExitCode::SUCCESS
        }
        Some("config") => config(&args[1..]),
        Some("env") => env(&args[1..]),
        Some("diagnose") => diagnose(&args[1..]),
        Some("help") | Some("--help") | Some("-h") => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("ml-container: unknown command '{other}'; run 'ml-container help'");
            ExitCode::from(2)
        }
        None => {
            eprint!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn config(args: &[String]) -> ExitCode {
    let mut plug = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--config", Some(p)) => plug.push(format!("config={p}")),
            _ => {
                eprintln!("ml-container config: usage: ml-container config [--config PATH]");
                return ExitCode::from(2);
            }
        }
    }
    let loaded = PlugstackArgs::parse(&plug).and_then(|a| SiteConfig::load(&a));
    match loaded {
        Ok(cfg) => match toml::to_string_pretty(&cfg) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ml-container config: cannot print the config: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("ml-container config: {e}");
            ExitCode::from(1)
        }
    }
}

/// `ml-container env [--task N] [--config PATH]`: the variables the plugin
/// would set for this task (or task N), as `export` lines; for debugging
/// and for batch scripts.
fn env(args: &[String]) -> ExitCode {
    const USAGE: &str = "usage: ml-container env [--task N] [--config PATH]";
    let mut plug = Vec::new();
    let mut task = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--config", Some(p)) => plug.push(format!("config={p}")),
            ("--task", Some(n)) => match n.parse::<u32>() {
                Ok(n) => task = Some(n),
                Err(_) => {
                    eprintln!("ml-container env: --task takes a task number, got '{n}'");
                    return ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("ml-container env: {USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let cfg = match PlugstackArgs::parse(&plug).and_then(|a| SiteConfig::load(&a)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ml-container env: {e}");
            return ExitCode::from(1);
        }
    };
    let get = |k: &str| std::env::var(k).ok();
    let vars = distenv::facts_for(&get, task).and_then(|f| distenv::contract(&cfg, &f));
    match vars {
        Ok(vars) => {
            for (k, v) in vars {
                println!("{}", distenv::shell_export(&k, &v));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ml-container env: {e}");
            ExitCode::from(1)
        }
    }
}

/// `ml-container diagnose JOBID [--config PATH]`: the job's failure
/// reports, for a person. Exit 0 when reports were shown, 1 when there are
/// none (or they cannot be read), 2 on bad usage.
fn diagnose(args: &[String]) -> ExitCode {
    const USAGE: &str = "usage: ml-container diagnose JOBID [--config PATH]";
    let mut plug = Vec::new();
    let mut job = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" => match it.next() {
                Some(p) => plug.push(format!("config={p}")),
                None => {
                    eprintln!("ml-container diagnose: {USAGE}");
                    return ExitCode::from(2);
                }
            },
            other => match other.parse::<u32>() {
                Ok(n) if job.is_none() => job = Some(n),
                _ => {
                    eprintln!("ml-container diagnose: '{other}' is not a job id; {USAGE}");
                    return ExitCode::from(2);
                }
            },
        }
    }
    let Some(job) = job else {
        eprintln!("ml-container diagnose: {USAGE}");
        return ExitCode::from(2);
    };
    let cfg = match PlugstackArgs::parse(&plug).and_then(|a| SiteConfig::load(&a)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ml-container diagnose: {e}");
            return ExitCode::from(1);
        }
    };
    let dir = cfg.failure.report_dir.as_path();
    match report::read_job(dir, job) {
        Ok(reports) if !reports.is_empty() => {
            for (path, r) in reports {
                match r {
                    Ok(r) => print!("{}", report::render(&r)),
                    Err(e) => println!("{}: unreadable report: {e}", path.display()),
                }
            }
            ExitCode::SUCCESS
        }
        Ok(_) => {
            eprintln!(
                "ml-container diagnose: no failure reports for job {job} in {}",
                dir.display()
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!(
                "ml-container diagnose: no failure reports for job {job} in {} ({e})",
                dir.display()
            );
            ExitCode::from(1)
        }
    }
}
