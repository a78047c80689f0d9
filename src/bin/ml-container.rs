//! `ml-container`: the admin CLI (SPEC "Admin CLI").
#![forbid(unsafe_code)]

use std::process::ExitCode;

use slurm_ml_container::config::{PlugstackArgs, SiteConfig};

const USAGE: &str = "usage: ml-container <command> [args]

commands:
  config [--config PATH]   check the site config and print it as loaded
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
