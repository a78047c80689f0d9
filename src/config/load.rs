//! Loading the site config: the plugstack line's arguments, the file
//! (read the one safe way), strict parsing with file, line and key in
//! every error, and `section.key=value` overrides.
#![forbid(unsafe_code)]

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::tomlpos;

use super::{AbsPath, SiteConfig, DEFAULT_CONFIG_PATH, MAX_CONFIG_BYTES};

/// Why the configuration could not be used. `Display` is one line.
#[derive(Debug)]
pub enum ConfigError {
    Read {
        path: PathBuf,
        source: io::Error,
    },
    TooLarge {
        path: PathBuf,
        size: u64,
    },
    Parse {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    Argument {
        arg: String,
        message: String,
    },
    /// Read as root, the file (or its directory) could be changed by
    /// someone other than root.
    Untrusted(crate::secure::TrustError),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            ConfigError::TooLarge { path, size } => write!(
                f,
                "{}: {size} bytes is too large for a config (limit {MAX_CONFIG_BYTES})",
                path.display()
            ),
            ConfigError::Parse {
                path,
                line,
                key,
                message,
            } => {
                write!(f, "{}:{line}: ", path.display())?;
                if !key.is_empty() {
                    write!(f, "key '{key}': ")?;
                }
                write!(
                    f,
                    "{message}; fix the file (or remove it to use the defaults)"
                )
            }
            ConfigError::Argument { arg, message } => write!(
                f,
                "plugstack argument '{arg}': {message}; fix the ml-container line in plugstack.conf"
            ),
            ConfigError::Untrusted(e) => write!(f, "refusing the site config: {e}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The arguments of the plugin's plugstack.conf line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlugstackArgs {
    pub config_path: Option<PathBuf>,
    /// `section.key` and the raw value, in the order given.
    pub overrides: Vec<(String, String)>,
}

impl PlugstackArgs {
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<PlugstackArgs, ConfigError> {
        let mut out = PlugstackArgs::default();
        for arg in args {
            let arg = arg.as_ref();
            let Some((key, value)) = arg.split_once('=') else {
                return Err(ConfigError::Argument {
                    arg: arg.to_string(),
                    message: "expected config=PATH or section.key=value".to_string(),
                });
            };
            if key == "config" {
                if !value.starts_with('/') {
                    return Err(ConfigError::Argument {
                        arg: arg.to_string(),
                        message: "the config path must be absolute".to_string(),
                    });
                }
                out.config_path = Some(PathBuf::from(value));
            } else {
                out.overrides.push((key.to_string(), value.to_string()));
            }
        }
        Ok(out)
    }

    pub fn path(&self) -> &Path {
        self.config_path
            .as_deref()
            .unwrap_or(Path::new(DEFAULT_CONFIG_PATH))
    }
}

impl SiteConfig {
    /// Loads the file named by the plugstack arguments (or the default path)
    /// and applies the overrides. A missing file gives the defaults.
    pub fn load(args: &PlugstackArgs) -> Result<SiteConfig, ConfigError> {
        let path = args.path();
        let text = match read_limited(path) {
            Ok(t) => Some(t),
            Err(ConfigError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                None
            }
            Err(e) => return Err(e),
        };
        let config = match text {
            Some(t) => SiteConfig::parse(path, &t)?,
            None => SiteConfig::default(),
        };
        config.with_overrides(&args.overrides)
    }

    /// Parses config text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<SiteConfig, ConfigError> {
        let cfg: SiteConfig = toml::from_str(text).map_err(|e| {
            let (line, key) = match e.span() {
                Some(span) => tomlpos::locate(text, span.start),
                None => (1, String::new()),
            };
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                key,
                message: tomlpos::one_line(e.message()),
            }
        })?;
        cfg.check_nccl().map_err(|(name, message)| {
            let line = tomlpos::find_key_line(text, "nccl", &name).unwrap_or(1);
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                key: format!("nccl.{name}"),
                message,
            }
        })?;
        Ok(cfg)
    }

    /// Applies `section.key=value` overrides. Values are read as TOML when
    /// they parse as such (`29500`, `true`, `["a"]`), else as plain strings.
    pub fn with_overrides(self, overrides: &[(String, String)]) -> Result<SiteConfig, ConfigError> {
        if overrides.is_empty() {
            return Ok(self);
        }
        let arg_err = |k: &str, v: &str, message: String| ConfigError::Argument {
            arg: format!("{k}={v}"),
            message,
        };
        let mut root =
            toml::Value::try_from(&self).map_err(|e| arg_err("", "", format!("internal: {e}")))?;
        for (key, value) in overrides {
            let Some((section, name)) = key.split_once('.') else {
                return Err(arg_err(
                    key,
                    value,
                    "name a key as section.key, e.g. runtime.gpus=off".to_string(),
                ));
            };
            let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.clone()));
            let Some(table) = root.get_mut(section).and_then(toml::Value::as_table_mut) else {
                return Err(arg_err(key, value, format!("unknown section '{section}'")));
            };
            table.insert(name.to_string(), parsed);
            // Check each override alone so the error names the right one.
            root.clone()
                .try_into::<SiteConfig>()
                .map_err(|e| arg_err(key, value, tomlpos::one_line(e.message())))?;
        }
        let cfg: SiteConfig = root
            .try_into()
            .map_err(|e: toml::de::Error| arg_err("", "", tomlpos::one_line(e.message())))?;
        cfg.check_nccl()
            .map_err(|(name, message)| arg_err(&format!("nccl.{name}"), "", message))?;
        Ok(cfg)
    }

    fn check_nccl(&self) -> Result<(), (String, String)> {
        match self.nccl.keys().find(|k| !k.0.starts_with("NCCL_")) {
            Some(k) => Err((
                k.0.clone(),
                format!(
                    "'{}' does not start with NCCL_: put other variables under [env]",
                    k.0
                ),
            )),
            None => Ok(()),
        }
    }

    /// Directories an absolute image path may point into.
    pub fn allowed_image_dirs(&self) -> Vec<&Path> {
        if self.registry.allowed_dirs.is_empty() {
            vec![self.registry.root.as_path()]
        } else {
            self.registry
                .allowed_dirs
                .iter()
                .map(AbsPath::as_path)
                .collect()
        }
    }
}

/// The config's text, opened the one safe way ([`crate::secure`]). As root
/// (slurmstepd, srun run by root, the CLI under sudo) the file decides what
/// root runs, so it must be root's alone: owned by root and not writable
/// by group or others, nor its directory. Other users read it as
/// themselves, which gives them nothing they could not do anyway.
fn read_limited(path: &Path) -> Result<String, ConfigError> {
    use crate::secure::{self, ReadText, TrustError};
    let to_config_err = |e: TrustError| match e {
        TrustError::Io { path, source } => ConfigError::Read { path, source },
        other => ConfigError::Untrusted(other),
    };
    let (file, meta) = if nix::unistd::geteuid().is_root() {
        secure::open_trusted(path, &[0])
    } else {
        std::fs::canonicalize(path)
            .map_err(|source| TrustError::Io {
                path: path.to_path_buf(),
                source,
            })
            .and_then(|real| secure::open_regular(&real))
    }
    .map_err(to_config_err)?;
    match secure::read_limited(file, &meta, path, MAX_CONFIG_BYTES).map_err(to_config_err)? {
        ReadText::Text(t) => Ok(t),
        ReadText::TooLarge(size) => Err(ConfigError::TooLarge {
            path: path.to_path_buf(),
            size,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;

    fn parse(text: &str) -> Result<SiteConfig, ConfigError> {
        SiteConfig::parse(Path::new("/etc/slurm/ml-container.toml"), text)
    }

    #[test]
    fn empty_file_is_defaults() {
        assert_eq!(parse("").unwrap(), SiteConfig::default());
    }

    #[test]
    fn full_file() {
        let cfg = parse(
            r#"
[registry]
root = "/srv/containers"
verify = "full"
allowed_dirs = ["/scratch/images"]

[runtime]
kind = "singularity"
gpus = "off"
binds = ["/lustre/data:/data:ro"]

[distributed]
port_range = [40000, 40099]
addr = "ip"

[nccl]
NCCL_DEBUG = "WARN"
NCCL_IB_DISABLE = 1

[env]
OMP_NUM_THREADS = 4

[failure]
syslog = false
probe_timeout = 2
"#,
        )
        .unwrap();
        assert_eq!(cfg.registry.root.as_path(), Path::new("/srv/containers"));
        assert_eq!(cfg.registry.verify, VerifyLevel::Full);
        assert_eq!(cfg.runtime.kind, RuntimeKind::Singularity);
        assert_eq!(cfg.runtime.gpus, GpuPolicy::Off);
        assert_eq!(
            cfg.distributed.port_range,
            PortRange {
                lo: 40000,
                hi: 40099
            }
        );
        assert_eq!(cfg.distributed.addr, AddrKind::Ip);
        assert_eq!(
            cfg.nccl.get(&EnvName("NCCL_IB_DISABLE".into())),
            Some(&EnvValue("1".into()))
        );
        assert_eq!(
            cfg.env.get(&EnvName("OMP_NUM_THREADS".into())),
            Some(&EnvValue("4".into()))
        );
        assert!(!cfg.failure.syslog);
        assert_eq!(cfg.allowed_image_dirs(), vec![Path::new("/scratch/images")]);
    }

    fn parse_err(text: &str) -> (usize, String, String) {
        match parse(text) {
            Err(ConfigError::Parse {
                line, key, message, ..
            }) => (line, key, message),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn bad_value_names_line_and_key() {
        let (line, key, msg) =
            parse_err("[registry]\nroot = \"/x\"\n\n[runtime]\ngpus = \"maybe\"\n");
        assert_eq!(line, 5);
        assert_eq!(key, "runtime.gpus");
        assert!(msg.contains("maybe"), "{msg}");
    }

    #[test]
    fn node_cache_keys() {
        let p = Path::new("/etc/slurm/ml-container.toml");
        let c = SiteConfig::parse(p, "").unwrap();
        assert_eq!(c.registry.node_cache.for_host("n1"), None);
        assert_eq!(c.registry.node_cache_max, ByteSize(100 << 30));
        let c = SiteConfig::parse(
            p,
            "[registry]\nnode_cache = \"/var/cache/mlc/%n\"\nnode_cache_max = \"200G\"\n",
        )
        .unwrap();
        assert_eq!(
            c.registry.node_cache.for_host("gpu1"),
            Some(PathBuf::from("/var/cache/mlc/gpu1"))
        );
        assert_eq!(c.registry.node_cache_max, ByteSize(200 << 30));
        assert_eq!(c.registry.node_cache_max.to_string(), "200G");
        for (value, n) in [
            ("4096", 4096u64),
            ("512M", 512 << 20),
            ("1t", 1 << 40),
            ("3 KiB", 3072),
        ] {
            assert_eq!(ByteSize::parse(value), Some(ByteSize(n)), "{value}");
        }
        for bad in [
            "node_cache = \"relative\"",
            "node_cache = \"/a/../b\"",
            "node_cache = \"/a/%u\"",
            "node_cache_max = \"12X\"",
            "node_cache_max = \"99999999999T\"",
            "node_cache_max = -1",
        ] {
            let e = SiteConfig::parse(p, &format!("[registry]\n{bad}\n")).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("ml-container.toml:2"), "{bad}: {msg}");
        }
        // The size round-trips through the overrides path (plugstack args).
        let c = SiteConfig::default()
            .with_overrides(&[("registry.node_cache_max".into(), "1G".into())])
            .unwrap();
        assert_eq!(c.registry.node_cache_max, ByteSize(1 << 30));
    }

    #[test]
    fn unknown_key_named() {
        let (line, key, msg) = parse_err("[runtime]\nkind = \"apptainer\"\ngpu = \"on\"\n");
        assert_eq!(line, 3);
        assert_eq!(key, "runtime.gpu");
        assert!(msg.contains("unknown field"), "{msg}");
    }

    #[test]
    fn unknown_section_named() {
        let (line, key, _) = parse_err("[registry]\n\n[runtimes]\nkind = \"x\"\n");
        assert_eq!(line, 3);
        assert_eq!(key, "runtimes");
    }

    #[test]
    fn syntax_error_has_line() {
        let (line, _, _) = parse_err("[registry]\nroot = \"/x\"\nverify = \n");
        assert_eq!(line, 3);
    }

    #[test]
    fn semantic_checks() {
        let (line, key, _) = parse_err("[registry]\nroot = \"relative\"\n");
        assert_eq!((line, key.as_str()), (2, "registry.root"));
        let (line, key, _) = parse_err("[distributed]\nport_range = [30000, 20000]\n");
        assert_eq!((line, key.as_str()), (2, "distributed.port_range"));
        let (_, key, _) = parse_err("[distributed]\nport_range = [80, 90]\n");
        assert_eq!(key, "distributed.port_range");
        let (line, key, _) = parse_err("[nccl]\nNCCL_A = \"1\"\nFOO = \"2\"\n");
        assert_eq!((line, key.as_str()), (3, "nccl.FOO"));
        let (_, key, _) = parse_err("[env]\n\"1BAD\" = \"x\"\n");
        assert_eq!(key, "env.1BAD");
        let (_, key, _) = parse_err("[env]\nX = [1]\n");
        assert_eq!(key, "env.X");
    }

    #[test]
    fn display_is_one_line_with_file_line_key() {
        let e = parse("[runtime]\ngpus = 3\n").unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.starts_with("/etc/slurm/ml-container.toml:2: key 'runtime.gpus'"),
            "{e}"
        );
    }

    #[test]
    fn plugstack_args() {
        let a = PlugstackArgs::parse(&["config=/tmp/x.toml", "runtime.gpus=off"]).unwrap();
        assert_eq!(a.path(), Path::new("/tmp/x.toml"));
        assert_eq!(a.overrides, vec![("runtime.gpus".into(), "off".into())]);
        assert!(PlugstackArgs::parse(&["bogus"]).is_err());
        assert!(PlugstackArgs::parse(&["config=rel.toml"]).is_err());
        assert_eq!(
            PlugstackArgs::parse::<&str>(&[]).unwrap().path(),
            Path::new(DEFAULT_CONFIG_PATH)
        );
    }

    #[test]
    fn overrides_apply_and_fail_clearly() {
        let cfg = SiteConfig::default()
            .with_overrides(&[
                ("runtime.gpus".into(), "off".into()),
                ("distributed.port_range".into(), "[40000, 40010]".into()),
                ("registry.root".into(), "/srv/c".into()),
                ("nccl.NCCL_DEBUG".into(), "INFO".into()),
            ])
            .unwrap();
        assert_eq!(cfg.runtime.gpus, GpuPolicy::Off);
        assert_eq!(cfg.distributed.port_range.lo, 40000);
        assert_eq!(cfg.registry.root.as_path(), Path::new("/srv/c"));
        for (k, v) in [
            ("runtime.gpus", "maybe"),
            ("runtime.nope", "1"),
            ("nosection.x", "1"),
            ("flat", "1"),
            ("nccl.FOO", "1"),
        ] {
            let e = SiteConfig::default()
                .with_overrides(&[(k.into(), v.into())])
                .unwrap_err();
            assert!(matches!(e, ConfigError::Argument { .. }), "{k}: {e}");
            assert!(
                e.to_string()
                    .contains(k.split('.').next_back().unwrap_or(k)),
                "{e}"
            );
        }
    }

    #[test]
    fn load_missing_file_is_default() {
        let args = PlugstackArgs {
            config_path: Some(PathBuf::from("/nonexistent/ml-container.toml")),
            overrides: vec![],
        };
        assert_eq!(SiteConfig::load(&args).unwrap(), SiteConfig::default());
    }

    /// As root, a site config someone else could change is refused, with
    /// the fix; as any other user the same file is read.
    #[test]
    fn root_refuses_an_untrusted_config() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("ml-container.toml");
        std::fs::write(&path, "[runtime]\ngpus = \"off\"\n").unwrap();
        let args = PlugstackArgs {
            config_path: Some(path.clone()),
            overrides: vec![],
        };
        let chmod = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
        chmod(&path, 0o644).unwrap();
        let good = SiteConfig::load(&args);
        chmod(&path, 0o666).unwrap();
        let writable = SiteConfig::load(&args);
        chmod(&path, 0o644).unwrap();
        chmod(&dir, 0o777).unwrap();
        let dir_writable = SiteConfig::load(&args);
        chmod(&dir, 0o755).unwrap();
        assert_eq!(good.unwrap().runtime.gpus, GpuPolicy::Off);
        if nix::unistd::geteuid().is_root() {
            for (what, r) in [("file", writable), ("directory", dir_writable)] {
                let e = r.expect_err(what).to_string();
                assert!(e.starts_with("refusing the site config"), "{what}: {e}");
                assert!(e.ends_with("chmod go-w it"), "{what}: {e}");
            }
        } else {
            assert!(writable.is_ok() && dir_writable.is_ok());
        }
    }

    #[test]
    fn hostile_inputs_do_not_panic() {
        for text in [
            "[",
            "[[registry]]",
            "registry = 1",
            "\u{0}",
            "[registry]\nroot = \"\\u0000\"",
            "[a.b.c.d]\n",
            "x = \"\n",
            "[runtime]\nbinds = [[[]]]",
        ] {
            let _ = parse(text);
        }
    }
}
