//! `doctor`: one line per finding, each with its fix; among them, when the
//! installed plugin does not match the running Slurm (a plugin loads only
//! in the release it was built for: docs/DESIGN.md, Slurm facts per
//! release).

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
    /// A fact a site must know but that is not a fault of the install.
    fn note(&mut self, what: String) {
        println!("note    {what}");
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

    runtime_policy(&mut f, cfg);
    outputs(&mut f, cfg);

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
            // Speed, not correctness: without a current index every srun
            // and every node parse the whole catalog.
            match slurm_ml_container::catalog_index::status(reg.root(), &[0]) {
                Ok(()) => f.ok("catalog index current".into()),
                Err(e) => f.note(e.to_string()),
            }
            let no_sum = images.iter().filter(|i| i.sha256.is_none()).count();
            if !cfg.registry.node_cache.0.is_empty() && no_sum > 0 {
                f.note(format!(
                    "{no_sum} catalog entries have no sha256: the node cache never holds them \
                     (re-add them with ml-container add, which records it)"
                ));
            }
        }
        Err(e) => f.problem(e, "fix the catalog"),
    }
    node_cache(&mut f, cfg);
    finish(f)
}

/// This node's image cache directory, when one is configured: root's, not
/// writable by others, not a symlink (else every step falls back to the
/// registry, with a line in the slurmd log).
fn node_cache(f: &mut Findings, cfg: &SiteConfig) {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.split('.').next().unwrap_or_default().to_string())
        .unwrap_or_default();
    let Some(dir) = cfg.registry.node_cache.for_host(&host) else {
        return;
    };
    match fs::symlink_metadata(&dir) {
        Err(_) => f.note(format!(
            "node cache {} does not exist yet (the first step creates it, root 0755)",
            dir.display()
        )),
        Ok(m) if !m.file_type().is_dir() => f.problem(
            format!(
                "node cache {} is not a directory (a symlink?)",
                dir.display()
            ),
            "remove it; the first step makes the directory",
        ),
        Ok(m) if m.uid() != 0 || m.mode() & 0o022 != 0 => f.problem(
            format!(
                "node cache {} is owned by uid {} with mode {:04o}: steps will not use it",
                dir.display(),
                m.uid(),
                m.mode() & 0o7777
            ),
            "chown root and chmod 0755 it",
        ),
        Ok(_) => f.ok(format!(
            "node cache {} (at most {})",
            dir.display(),
            cfg.registry.node_cache_max
        )),
    }
}

/// `key = value` lines of apptainer.conf/singularity.conf (`#` comments;
/// a later line wins, except that `bind path` and the like repeat).
fn conf_settings(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect()
}

/// SECURITY.md, "Apptainer settings": which of the settings that make the
/// site's image and bind policy a boundary (rather than a convenience) this
/// node has. Notes, not problems: many sites run Apptainer unprivileged on
/// purpose.
fn runtime_policy(f: &mut Findings, cfg: &SiteConfig) {
    use slurm_ml_container::config::RuntimeKind;
    let (conf, starters, ecl) = match cfg.runtime.kind {
        RuntimeKind::Apptainer => (
            "/etc/apptainer/apptainer.conf",
            [
                "/usr/libexec/apptainer/bin/starter-suid",
                "/usr/lib/x86_64-linux-gnu/apptainer/bin/starter-suid",
            ],
            "/etc/apptainer/ecl.toml",
        ),
        RuntimeKind::Singularity => (
            "/etc/singularity/singularity.conf",
            [
                "/usr/libexec/singularity/bin/starter-suid",
                "/usr/lib/x86_64-linux-gnu/singularity/bin/starter-suid",
            ],
            "/etc/singularity/ecl.toml",
        ),
        RuntimeKind::Charliecloud => {
            f.note(
                "runtime charliecloud is unprivileged: the image and bind policy is a \
                 convenience, not a boundary (SECURITY.md)"
                    .into(),
            );
            return;
        }
    };
    let text = match fs::read_to_string(conf) {
        Ok(t) => t,
        Err(e) => {
            f.note(format!(
                "{conf}: {e}: cannot tell the runtime's policy settings"
            ));
            return;
        }
    };
    let set = conf_settings(&text);
    let get = |k: &str| set.get(k).map(String::as_str).unwrap_or("");
    let suid_starter = starters
        .iter()
        .find(|p| fs::metadata(p).is_ok_and(|m| m.uid() == 0 && m.mode() & 0o4000 != 0));
    let setuid = get("allow setuid").eq_ignore_ascii_case("yes") && suid_starter.is_some();
    f.note(format!(
        "{conf}: setuid mode {} (allow setuid = {}, setuid starter {}){}",
        if setuid { "on" } else { "off" },
        if get("allow setuid").is_empty() {
            "unset"
        } else {
            get("allow setuid")
        },
        suid_starter.map_or("absent".to_string(), |p| p.to_string()),
        if setuid {
            ""
        } else {
            ": the settings below are not enforced, users run any image and bind by hand"
        }
    ));
    for (key, want) in [
        ("limit container paths", "the registry root"),
        ("limit container owners", "root"),
        ("user bind control", "no"),
    ] {
        let v = get(key);
        let v = if v.is_empty() || v.eq_ignore_ascii_case("null") {
            "unset"
        } else {
            v
        };
        f.note(format!("{conf}: {key} = {v} (for a boundary: {want})"));
    }
    let activated = fs::read_to_string(ecl)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|t| t.get("activated").and_then(toml::Value::as_bool))
        .unwrap_or(false);
    f.note(format!(
        "{ecl}: execution control list {} (signed images only: activate it)",
        if activated {
            "activated"
        } else {
            "not activated"
        }
    ));
}

/// The plugin's own outputs: report dir and metrics log owned by root and
/// closed to writes by others; the catalog lock root's alone.
fn outputs(f: &mut Findings, cfg: &SiteConfig) {
    let dir = cfg.failure.report_dir.as_path();
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_dir() && m.uid() == 0 && m.mode() & 0o022 == 0 => {
            f.ok(format!("report dir {}", dir.display()))
        }
        Ok(m) => f.problem(
            format!(
                "report dir {} is not a root-owned directory closed to others (uid {}, mode {:o})",
                dir.display(),
                m.uid(),
                m.mode() & 0o7777
            ),
            "chown root and chmod 0755 it",
        ),
        Err(_) => f.ok(format!(
            "report dir {} (made by the first failure)",
            dir.display()
        )),
    }
    let lock = cfg.registry.root.as_path().join(".registry/catalog.lock");
    if let Ok(m) = fs::symlink_metadata(&lock) {
        if !m.file_type().is_file() || m.mode() & 0o077 != 0 {
            f.problem(
                format!(
                    "{} can be opened by others (mode {:o}): any user could hold the catalog lock",
                    lock.display(),
                    m.mode() & 0o7777
                ),
                "chmod 0600 it (any ml-container add/remove does)",
            );
        }
    }
}

fn finish(f: Findings) -> ExitCode {
    if f.problems > 0 {
        println!("{} problem(s) found", f.problems);
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apptainer_conf_lines() {
        let s = conf_settings(
            "# allow setuid = no\nallow setuid = yes\nlimit container paths = /opt/containers\n\
             User Bind Control = no\nbind path = /etc/hosts\n",
        );
        assert_eq!(s["allow setuid"], "yes");
        assert_eq!(s["limit container paths"], "/opt/containers");
        assert_eq!(s["user bind control"], "no");
        assert!(!s.contains_key("limit container owners"));
    }
}
