//! The user options (README "User options (srun, salloc, sbatch)"): their table (names, argument
//! names, help text) and the validation of their values.
//!
//! Validation is the same code in every context. In srun, sbatch and salloc a
//! bad value fails the command before anything is allocated or launched; on
//! the nodes the values arrive already checked, and are checked again because
//! the environment that carries them from sbatch to its steps can be edited.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::PathBuf;

use crate::config::GpuPolicy;
use crate::jobtext;

/// An option value inside an error message: escaped and capped, since the
/// message reaches the user's terminal and the slurmd log.
fn field(value: &str) -> String {
    jobtext::escape(value, 256)
}

/// The longest option value accepted; SPANK passes values through the job
/// environment, and nothing legitimate comes near this.
pub const MAX_VALUE_LEN: usize = 4096;
/// At most this many `--ml-container-mounts` entries.
pub const MAX_MOUNTS: usize = 64;

/// Which option a SPANK callback is about. The discriminant is the `val`
/// registered with Slurm, so the callback can tell the options apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionId {
    Image = 0,
    Mounts = 1,
    Workdir = 2,
    Gpus = 3,
    Dist = 4,
    WritableTmpfs = 5,
}

/// One row of the option table registered with `spank_option_register`.
#[derive(Debug)]
pub struct OptionSpec {
    pub id: OptionId,
    /// Long option name without the leading `--` (SPANK_OPTION_MAXLEN is 75).
    pub name: &'static str,
    /// One-word name of the argument, `None` for a flag.
    pub arginfo: Option<&'static str>,
    pub usage: &'static str,
}

pub const GPU_CHOICES: &[&str] = &["auto", "on", "off"];
pub const DIST_CHOICES: &[&str] = &["on", "off"];

/// Every user option, in `srun --help` order.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        id: OptionId::Image,
        name: "ml-container",
        arginfo: Some("IMAGE"),
        usage: "Run each task in IMAGE from the site registry: name, name:tag, a catalog \
                reference (e.g. nvcr.io/nvidia/pytorch:24.01-py3) or an absolute path to \
                an allowed .sif. List images with 'ml-container list'.",
    },
    OptionSpec {
        id: OptionId::Mounts,
        name: "ml-container-mounts",
        arginfo: Some("SRC[:DST[:ro|rw]][,...]"),
        usage: "Extra bind mounts into the container (absolute paths; default rw).",
    },
    OptionSpec {
        id: OptionId::Workdir,
        name: "ml-container-workdir",
        arginfo: Some("DIR"),
        usage: "Working directory inside the container (default: the submit directory).",
    },
    OptionSpec {
        id: OptionId::Gpus,
        name: "ml-container-gpus",
        arginfo: Some("auto|on|off"),
        usage: "Pass GPUs into the container (--nv): when the step has GPUs (auto, \
                default), always (on) or never (off).",
    },
    OptionSpec {
        id: OptionId::Dist,
        name: "ml-container-dist",
        arginfo: Some("on|off"),
        usage: "Set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK ... for \
                PyTorch distributed training (default on).",
    },
    OptionSpec {
        id: OptionId::WritableTmpfs,
        name: "ml-container-writable-tmpfs",
        arginfo: None,
        usage: "Give the container a writable tmpfs overlay.",
    },
];

impl OptionId {
    /// The option for a `val` Slurm hands back to a callback.
    pub fn from_val(val: i32) -> Option<OptionId> {
        OPTIONS.iter().map(|o| o.id).find(|id| *id as i32 == val)
    }

    pub fn spec(self) -> &'static OptionSpec {
        // The table holds every variant; the fallback keeps this total
        // without an unwrap on a path srun runs.
        OPTIONS.iter().find(|o| o.id == self).unwrap_or(&OPTIONS[0])
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }
}

/// A bind mount in pyxis syntax, `SRC[:DST[:ro|rw]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub src: PathBuf,
    pub dst: PathBuf,
    pub read_only: bool,
}

impl fmt::Display for Mount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}",
            self.src.display(),
            self.dst.display(),
            if self.read_only { "ro" } else { "rw" }
        )
    }
}

/// What the user asked for, as received by this process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserOptions {
    pub image: Option<String>,
    pub mounts: Vec<Mount>,
    pub workdir: Option<PathBuf>,
    pub gpus: Option<GpuPolicy>,
    pub dist: Option<bool>,
    pub writable_tmpfs: bool,
}

/// A rejected option value; `Display` is the one-line message the user sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionError {
    MissingValue {
        option: &'static str,
        arginfo: &'static str,
    },
    UnexpectedValue {
        option: &'static str,
        value: String,
    },
    Choice {
        option: &'static str,
        value: String,
        accepted: &'static [&'static str],
    },
    TooLong {
        option: &'static str,
        len: usize,
    },
    BadCharacter {
        option: &'static str,
        value: String,
    },
    NotAbsolute {
        option: &'static str,
        value: String,
    },
    BadMount {
        entry: String,
        reason: &'static str,
    },
    TooManyMounts {
        count: usize,
    },
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionError::MissingValue { option, arginfo } => {
                write!(f, "--{option} needs a value: use --{option}={arginfo}")
            }
            OptionError::UnexpectedValue { option, value } => {
                write!(
                    f,
                    "--{option} takes no value, got '{}': use plain --{option}",
                    field(value)
                )
            }
            OptionError::Choice {
                option,
                value,
                accepted,
            } => write!(
                f,
                "invalid --{option}='{}': accepted values are {}",
                field(value),
                accepted.join(", ")
            ),
            OptionError::TooLong { option, len } => write!(
                f,
                "--{option} value is {len} bytes long, the limit is {MAX_VALUE_LEN}: shorten it"
            ),
            OptionError::BadCharacter { option, value } => write!(
                f,
                "invalid --{option}='{}': white space and control characters are not allowed",
                field(value)
            ),
            OptionError::NotAbsolute { option, value } => write!(
                f,
                "invalid --{option}='{}': give an absolute path (starting with /)",
                field(value)
            ),
            OptionError::BadMount { entry, reason } => write!(
                f,
                "invalid --ml-container-mounts entry '{}': {reason}; the syntax is \
                 SRC[:DST[:ro|rw]] with absolute paths, entries separated by commas",
                field(entry)
            ),
            OptionError::TooManyMounts { count } => write!(
                f,
                "--ml-container-mounts has {count} entries, the limit is {MAX_MOUNTS}: \
                 bind a common parent directory instead"
            ),
        }
    }
}

impl std::error::Error for OptionError {}

impl UserOptions {
    /// Whether the user asked for the plugin at all. Only then may a problem
    /// of the plugin (its config, say) fail the job.
    pub fn any(&self) -> bool {
        *self != UserOptions::default()
    }

    /// Records one option occurrence. A later occurrence replaces an earlier
    /// one, as for srun's own options.
    pub fn apply(&mut self, id: OptionId, arg: Option<&str>) -> Result<(), OptionError> {
        let option = id.name();
        let spec = id.spec();
        let arg = match (spec.arginfo, arg) {
            (None, None) => None,
            // Slurm passes "" or no argument for flags depending on version.
            (None, Some("")) => None,
            (None, Some(v)) => {
                return Err(OptionError::UnexpectedValue {
                    option,
                    value: v.to_string(),
                })
            }
            (Some(arginfo), None) | (Some(arginfo), Some("")) => {
                return Err(OptionError::MissingValue { option, arginfo })
            }
            (Some(_), Some(v)) => Some(checked_text(option, v)?),
        };
        match (id, arg) {
            (OptionId::Image, Some(v)) => self.image = Some(v.to_string()),
            (OptionId::Mounts, Some(v)) => self.mounts = parse_mounts(v)?,
            (OptionId::Workdir, Some(v)) => self.workdir = Some(absolute(option, v)?),
            (OptionId::Gpus, Some(v)) => {
                self.gpus = Some(match v {
                    "auto" => GpuPolicy::Auto,
                    "on" => GpuPolicy::On,
                    "off" => GpuPolicy::Off,
                    _ => return Err(choice(option, v, GPU_CHOICES)),
                })
            }
            (OptionId::Dist, Some(v)) => {
                self.dist = Some(match v {
                    "on" => true,
                    "off" => false,
                    _ => return Err(choice(option, v, DIST_CHOICES)),
                })
            }
            (OptionId::WritableTmpfs, _) => self.writable_tmpfs = true,
            // Options with an argument always reach here with Some.
            (_, None) => {}
        }
        Ok(())
    }

    /// A short, stable description for log lines; every value escaped.
    pub fn summary(&self) -> String {
        jobtext::field(&self.summary_raw())
    }

    fn summary_raw(&self) -> String {
        let mut parts = Vec::new();
        if let Some(image) = &self.image {
            parts.push(format!("image={image}"));
        }
        if !self.mounts.is_empty() {
            let m: Vec<String> = self.mounts.iter().map(Mount::to_string).collect();
            parts.push(format!("mounts={}", m.join(",")));
        }
        if let Some(w) = &self.workdir {
            parts.push(format!("workdir={}", w.display()));
        }
        if let Some(g) = self.gpus {
            parts.push(format!("gpus={g}"));
        }
        if let Some(d) = self.dist {
            parts.push(format!("dist={}", if d { "on" } else { "off" }));
        }
        if self.writable_tmpfs {
            parts.push("writable-tmpfs".to_string());
        }
        parts.join(" ")
    }
}

fn choice(option: &'static str, value: &str, accepted: &'static [&'static str]) -> OptionError {
    OptionError::Choice {
        option,
        value: value.to_string(),
        accepted,
    }
}

fn checked_text<'a>(option: &'static str, v: &'a str) -> Result<&'a str, OptionError> {
    if v.len() > MAX_VALUE_LEN {
        return Err(OptionError::TooLong {
            option,
            len: v.len(),
        });
    }
    if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(OptionError::BadCharacter {
            option,
            value: v.to_string(),
        });
    }
    Ok(v)
}

fn absolute(option: &'static str, v: &str) -> Result<PathBuf, OptionError> {
    if v.starts_with('/') {
        Ok(PathBuf::from(v))
    } else {
        Err(OptionError::NotAbsolute {
            option,
            value: v.to_string(),
        })
    }
}

/// Parses `SRC[:DST[:ro|rw]][,...]` (the pyxis `--container-mounts` syntax).
pub fn parse_mounts(v: &str) -> Result<Vec<Mount>, OptionError> {
    let entries: Vec<&str> = v.split(',').collect();
    if entries.len() > MAX_MOUNTS {
        return Err(OptionError::TooManyMounts {
            count: entries.len(),
        });
    }
    entries.into_iter().map(parse_mount).collect()
}

fn parse_mount(entry: &str) -> Result<Mount, OptionError> {
    let bad = |reason| OptionError::BadMount {
        entry: entry.to_string(),
        reason,
    };
    if entry.is_empty() {
        return Err(bad("empty entry"));
    }
    let mut fields = entry.split(':');
    let src = fields.next().unwrap_or_default();
    let dst = fields.next();
    let flags = fields.next();
    if fields.next().is_some() {
        return Err(bad("too many ':' fields"));
    }
    let read_only = match flags {
        None | Some("rw") => false,
        Some("ro") => true,
        Some(_) => return Err(bad("the flag must be ro or rw")),
    };
    let dst = match dst {
        None => src,
        Some("") => return Err(bad("empty destination")),
        Some(d) => d,
    };
    if src.is_empty() {
        return Err(bad("empty source"));
    }
    if !src.starts_with('/') || !dst.starts_with('/') {
        return Err(bad("source and destination must be absolute paths"));
    }
    if src.split('/').any(|c| c == "..") || dst.split('/').any(|c| c == "..") {
        return Err(bad("'..' is not allowed in a mount path"));
    }
    Ok(Mount {
        src: PathBuf::from(src),
        dst: PathBuf::from(dst),
        read_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(id: OptionId, v: Option<&str>) -> Result<UserOptions, OptionError> {
        let mut o = UserOptions::default();
        o.apply(id, v).map(|()| o)
    }

    #[test]
    fn option_vals_round_trip() {
        for spec in OPTIONS {
            assert_eq!(OptionId::from_val(spec.id as i32), Some(spec.id));
            assert!(spec.name.len() <= 75, "SPANK_OPTION_MAXLEN");
        }
        assert_eq!(OptionId::from_val(99), None);
    }

    #[test]
    fn gpus_choices() {
        assert_eq!(
            apply(OptionId::Gpus, Some("on")).map(|o| o.gpus),
            Ok(Some(GpuPolicy::On))
        );
        let err = apply(OptionId::Gpus, Some("bogus"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--ml-container-gpus"), "{err}");
        assert!(err.contains("auto, on, off"), "{err}");
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn dist_choices() {
        assert_eq!(
            apply(OptionId::Dist, Some("off")).map(|o| o.dist),
            Ok(Some(false))
        );
        assert!(apply(OptionId::Dist, Some("yes")).is_err());
    }

    #[test]
    fn flag_takes_no_value() {
        assert!(apply(OptionId::WritableTmpfs, None).is_ok_and(|o| o.writable_tmpfs));
        assert!(apply(OptionId::WritableTmpfs, Some("x")).is_err());
    }

    #[test]
    fn values_required_and_clean() {
        assert!(matches!(
            apply(OptionId::Image, Some("")),
            Err(OptionError::MissingValue { .. })
        ));
        assert!(matches!(
            apply(OptionId::Image, Some("py torch")),
            Err(OptionError::BadCharacter { .. })
        ));
        let long = "a".repeat(MAX_VALUE_LEN + 1);
        assert!(matches!(
            apply(OptionId::Image, Some(&long)),
            Err(OptionError::TooLong { .. })
        ));
        assert!(apply(OptionId::Image, Some("nvcr.io/nvidia/pytorch:24.01-py3")).is_ok());
    }

    #[test]
    fn workdir_must_be_absolute() {
        assert!(apply(OptionId::Workdir, Some("rel/dir")).is_err());
        assert_eq!(
            apply(OptionId::Workdir, Some("/w")).map(|o| o.workdir),
            Ok(Some(PathBuf::from("/w")))
        );
    }

    #[test]
    fn mounts_pyxis_syntax() {
        let m = parse_mounts("/a,/b:/c,/d:/e:ro,/f:/g:rw").unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].dst, PathBuf::from("/a"));
        assert_eq!(m[1].dst, PathBuf::from("/c"));
        assert!(m[2].read_only);
        assert!(!m[3].read_only);
        for bad in [
            "",
            "/a,",
            "a:/b",
            "/a:b",
            "/a:/b:rx",
            "/a:/b:ro:x",
            "/a:",
            "/../etc:/x",
            ":/x",
        ] {
            assert!(parse_mounts(bad).is_err(), "{bad:?} accepted");
        }
        let many = vec!["/a"; MAX_MOUNTS + 1].join(",");
        assert!(matches!(
            parse_mounts(&many),
            Err(OptionError::TooManyMounts { .. })
        ));
    }

    #[test]
    fn any_and_summary() {
        let mut o = UserOptions::default();
        assert!(!o.any());
        o.apply(OptionId::Gpus, Some("off")).unwrap();
        o.apply(OptionId::Image, Some("pytorch:2.1")).unwrap();
        assert!(o.any());
        assert_eq!(o.summary(), "image=pytorch:2.1 gpus=off");
    }
}
