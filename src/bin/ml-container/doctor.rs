//! `doctor`: one line per finding, each with its fix (issue 7; USERS.md
//! #11: say when the installed plugin does not match the running Slurm).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use slurm_ml_container::config::SiteConfig;
use slurm_ml_container::launch;
use slurm_ml_container::probe::{run_with_timeout, CommandProbe};
use slurm_ml_container::registry::Registry;
use slurm_ml_container::secure;
use slurm_ml_container::spank::BUILT_FOR_SLURM;

pub const SNIPPET: &str = "/etc/slurm/plugstack.conf.d/ml-container.conf";

struct Findings {
    problems: usize,
}

impl Findings {
    fn ok(&mut self, what: String) {
        println!("ok      {what}");
    }
    fn problem(&mut self, what: String, fix: &str) {
        self.problems += 1;
        println!("PROBLEM {what}; fix: {fix}");
    }
}

fn major_minor(v: &str) -> Option<String> {
    let mut it = v.split('.');
    Some(format!("{}.{}", it.next()?, it.next()?))
}

pub fn doctor(cfg: &SiteConfig, config_path: &Path) -> ExitCode {
    let mut f = Findings { problems: 0 };
    let t = Duration::from_secs(u64::from(cfg.failure.probe_timeout.max(1)));
    f.ok(format!("config {} is valid", config_path.display()));

    // The runtime.
    let name = launch::runtime_name(cfg.runtime.kind);
    let runtime = launch::runtime_binary(cfg);
    match runtime {
        Some(p) => match run_with_timeout(&p, &["--version"], t) {
            CommandProbe::Ok(v) => f.ok(format!("runtime {} ({v})", p.display())),
            other => f.problem(
                format!(
                    "runtime {} does not answer --version ({other:?})",
                    p.display()
                ),
                "reinstall the runtime",
            ),
        },
        None => f.problem(
            format!("container runtime '{name}' is not installed"),
            "install it on every node, or set runtime.path",
        ),
    }

    // The plugstack snippet and the plugin it loads.
    match fs::read_to_string(SNIPPET) {
        Ok(text) => {
            let so = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.starts_with('#'))
                .find_map(|l| l.split_whitespace().nth(1).map(str::to_string));
            match so {
                Some(so) if Path::new(&so).is_file() => f.ok(format!("{SNIPPET} loads {so}")),
                Some(so) => f.problem(
                    format!("{SNIPPET} names {so}, which does not exist"),
                    "reinstall slurm-ml-container",
                ),
                None => f.problem(
                    format!("{SNIPPET} names no plugin"),
                    "reinstall slurm-ml-container",
                ),
            }
        }
        Err(e) => f.problem(
            format!("{SNIPPET}: {e}"),
            "reinstall slurm-ml-container (it ships the snippet)",
        ),
    }
    // Built for the running Slurm? (Slurm refuses another major.minor.)
    let slurm = ["/usr/sbin/slurmd", "/usr/bin/srun"]
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .map(|p| run_with_timeout(p, &["-V"], t));
    match slurm {
        Some(CommandProbe::Ok(v)) => {
            let running = v.split_whitespace().nth(1).and_then(major_minor);
            if running == major_minor(BUILT_FOR_SLURM) {
                f.ok(format!("built for Slurm {BUILT_FOR_SLURM}, running {v}"));
            } else {
                f.problem(
                    format!("built for Slurm {BUILT_FOR_SLURM} but this node runs {v}: Slurm will refuse the plugin"),
                    "install the slurm-ml-container package built for this Slurm",
                );
            }
        }
        _ => f.problem("no slurmd or srun answers -V here".into(), "install Slurm"),
    }

    // The registry: layout, ownership and modes, entries.
    let root = cfg.registry.root.as_path();
    match fs::metadata(root) {
        Ok(m) if m.mode() & 0o022 != 0 => f.problem(
            format!(
                "registry {} is writable by group or others (mode {:o})",
                root.display(),
                m.mode() & 0o777
            ),
            "chmod 0755 it (ml-container init does)",
        ),
        Ok(_) => f.ok(format!("registry {}", root.display())),
        Err(e) => {
            f.problem(
                format!("registry {}: {e}", root.display()),
                "run 'ml-container init'",
            );
            return finish(f);
        }
    }
    let catalog = root.join(".registry/catalog.toml");
    let owner_ok = secure::check_trusted_file(&catalog, &[0]);
    match owner_ok {
        Ok(_) => f.ok(format!(
            "catalog {} owned and moded safely",
            catalog.display()
        )),
        Err(e) => f.problem(
            format!("catalog: {e}"),
            "chown root and chmod 0644 the catalog and its directory",
        ),
    }
    let opened = Registry::open(&cfg.registry);
    let catalog = opened
        .as_ref()
        .map_err(ToString::to_string)
        .and_then(|reg| reg.catalog().map(|c| (reg, c)).map_err(|e| e.to_string()));
    match catalog {
        Ok((reg, catalog)) => {
            let images = &catalog.images;
            for im in images {
                let p = if im.path.is_absolute() {
                    im.path.clone()
                } else {
                    reg.root().join(&im.path)
                };
                match (fs::metadata(&p), im.size) {
                    (Ok(m), Some(s)) if m.len() != s => f.problem(
                        format!(
                            "{}:{} {} is {} bytes, the catalog says {s}",
                            im.name,
                            im.tag,
                            p.display(),
                            m.len()
                        ),
                        "re-copy the image or re-add it",
                    ),
                    (Ok(_), _) => {}
                    (Err(e), _) => f.problem(
                        format!("{}:{} {}: {e}", im.name, im.tag, p.display()),
                        "restore the file or 'ml-container remove' the entry",
                    ),
                }
            }
            f.ok(format!("{} catalog entries checked", images.len()));
        }
        Err(e) => f.problem(e, "fix the catalog"),
    }
    finish(f)
}

fn finish(f: Findings) -> ExitCode {
    if f.problems > 0 {
        println!("{} problem(s) found", f.problems);
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
