//! The handoff: everything srun tells the nodes about a step, as one typed
//! value in one environment variable ([`HANDOFF_ENV`]); docs/DESIGN.md
//! "Data flow".
//!
//! srun sets it in its own process environment (`set_local_env`: SPANK's
//! `spank_setenv` works only on the nodes) and Slurm copies that environment
//! into the job's, so slurmstepd on every node reads it back. It carries:
//! - the **pin** ([`Pin`]), when srun could read the registry; a node never
//!   believes it: it resolves the image itself and the pin may only confirm
//!   ([`Pin::confirms`]);
//! - **srun's own argv**, so a node can tell which command the user typed
//!   (srun replaces a bare command name with the host path it found).
//!
//! **Encoding: JSON** (`serde_json`). The value is one line (no newlines
//! in the job environment, so `env` and `scontrol` dumps stay readable), an
//! argv is a plain array of strings (no wrapping of a TOML array into a
//! table to read it back), and the pin can be kept as raw text inside the
//! handoff ([`serde_json::value::RawValue`]) so that its own size cap and
//! field checks ([`Pin::decode`]) apply to exactly its part. The batch
//! script's record of the values the plugin exported
//! ([`crate::distenv::OWNED_ENV`]) uses JSON too: one encoding for every
//! value the plugin hands itself through the environment.
//!
//! **Versioned.** [`VERSION`] is written into every handoff; a node that
//! finds another version, or text it cannot parse, treats the whole value
//! as forged: the step fails as for a forged pin ([`RegistryError::BadPin`]:
//! "do not set ML_CONTAINER_HANDOFF yourself"). There is no compatibility
//! with the two variables this replaced (`ML_CONTAINER_PIN`,
//! `ML_CONTAINER_SRUN_ARGV`) and none is needed: srun and slurmstepd load the
//! same installed plugin, so they always agree on the version.
//!
//! **Hostile input.** The job environment is the user's. [`Handoff::decode`]
//! refuses text over [`MAX_HANDOFF_BYTES`] before parsing, refuses unknown
//! fields, checks the pin's fields with the pin's own caps, and drops an
//! argv over [`MAX_ARGV_ARGS`] or [`MAX_ARGV_BYTES`] (the node then keeps
//! srun's host path for the command lookup, as for an argv srun did not
//! record). No refusal echoes any part of the input.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::registry::{Pin, RegistryError};

/// The job environment variable that carries the handoff to the nodes
/// (defined beside the pin, whose refusal message names it, so that the
/// registry needs nothing from this module).
pub use crate::registry::HANDOFF_ENV;
/// The handoff version this build writes and reads.
pub const VERSION: u32 = 1;
/// The largest handoff text a node parses (a pin is a few hundred bytes,
/// the argv at most [`MAX_ARGV_BYTES`] plus its JSON quoting). Below
/// Linux's limit on one environment string (128 KiB).
pub const MAX_HANDOFF_BYTES: usize = 96 << 10;
/// An argv with more arguments than this is not kept.
pub const MAX_ARGV_ARGS: usize = 4096;
/// An argv longer than this (the arguments' bytes together) is not kept.
pub const MAX_ARGV_BYTES: usize = 64 << 10;

/// What srun hands the nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handoff {
    /// Always [`VERSION`] in a handoff this build wrote or accepted.
    pub version: u32,
    /// srun's resolution, when srun could read the registry.
    pub pin: Option<Pin>,
    /// srun's own argv; empty when it was not recorded or over the caps.
    pub srun_argv: Vec<String>,
}

/// The handoff as written.
#[derive(Serialize)]
struct WireOut<'a> {
    version: u32,
    pin: Option<&'a Pin>,
    srun_argv: &'a [String],
}

/// The handoff as read: the pin stays raw text for [`Pin::decode`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireIn<'a> {
    version: u32,
    #[serde(borrow)]
    pin: Option<&'a RawValue>,
    srun_argv: Vec<String>,
}

/// Only the version, read first so that a handoff of another version is
/// told apart from garbage (its other fields are not looked at).
#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

/// Does `argv` fit the caps?
fn argv_fits(argv: &[String]) -> bool {
    argv.len() <= MAX_ARGV_ARGS && argv.iter().map(String::len).sum::<usize>() <= MAX_ARGV_BYTES
}

impl Handoff {
    /// A handoff of this build's [`VERSION`]; an argv over the caps is
    /// dropped.
    pub fn new(pin: Option<Pin>, srun_argv: Vec<String>) -> Handoff {
        let srun_argv = if argv_fits(&srun_argv) {
            srun_argv
        } else {
            Vec::new()
        };
        Handoff {
            version: VERSION,
            pin,
            srun_argv,
        }
    }

    /// The handoff as an environment value (one line of JSON), always
    /// within [`MAX_HANDOFF_BYTES`]: an argv that would not fit is left out.
    /// Fails only for a pin whose path is not UTF-8 (no node could check
    /// it).
    pub fn encode(&self) -> Result<String, RegistryError> {
        if let Some(pin) = self.pin.as_ref().filter(|p| p.path.to_str().is_none()) {
            return Err(RegistryError::Unsendable {
                reference: pin.reference.clone(),
                path: pin.path.clone(),
            });
        }
        // Strings, numbers and a UTF-8 path: serde_json cannot fail here
        // (and an empty value would be refused by every node).
        let write = |argv: &[String]| {
            serde_json::to_string(&WireOut {
                version: self.version,
                pin: self.pin.as_ref(),
                srun_argv: argv,
            })
            .unwrap_or_default()
        };
        let text = write(&self.srun_argv);
        if text.len() <= MAX_HANDOFF_BYTES {
            return Ok(text);
        }
        Ok(write(&[]))
    }

    /// Parses a handoff from the job environment, which the user controls:
    /// the size is checked before parsing, unknown fields and versions are
    /// refused, the pin is checked by [`Pin::decode`] and an argv over the
    /// caps is dropped. A refusal names what is wrong, never a value.
    pub fn decode(text: &str) -> Result<Handoff, RegistryError> {
        let bad = |reason: String| RegistryError::BadPin { reason };
        if text.len() > MAX_HANDOFF_BYTES {
            return Err(bad("too long".to_string()));
        }
        let not_one = |_| bad("not a handoff".to_string());
        let VersionOnly { version } = serde_json::from_str(text).map_err(not_one)?;
        if version != VERSION {
            return Err(bad(format!(
                "version {version}, this node reads version {VERSION}"
            )));
        }
        let wire: WireIn = serde_json::from_str(text).map_err(not_one)?;
        let pin = wire.pin.map(|raw| Pin::decode(raw.get())).transpose()?;
        let srun_argv = if argv_fits(&wire.srun_argv) {
            wire.srun_argv
        } else {
            Vec::new()
        };
        Ok(Handoff {
            version: wire.version,
            pin,
            srun_argv,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::registry::{Source, MAX_PIN_BYTES};

    fn pin() -> Pin {
        Pin {
            reference: "pytorch:2.1".into(),
            source: Source::Catalog,
            name: Some("pytorch".into()),
            tag: Some("2.1".into()),
            path: PathBuf::from("/opt/containers/pytorch-2.1.sif"),
            size: 1_114_112,
            catalog_size: Some(1_114_112),
            sha256: Some("0123456789abcdef".repeat(4)),
            mode: None,
        }
    }

    fn argv() -> Vec<String> {
        ["srun", "-n2", "python3", "train.py", "--lr=1e-3 x\n\"y\""]
            .map(String::from)
            .to_vec()
    }

    /// The message of a refused handoff: one short line, the fix at the
    /// end, nothing of the input.
    fn refused(text: &str) -> String {
        let e = Handoff::decode(text).unwrap_err();
        assert!(matches!(e, RegistryError::BadPin { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.ends_with("do not set ML_CONTAINER_HANDOFF yourself"),
            "{msg}"
        );
        assert!(!msg.contains('\n') && msg.len() < 300, "{msg}");
        msg
    }

    #[test]
    fn round_trip() {
        for h in [
            Handoff::new(Some(pin()), argv()),
            Handoff::new(None, argv()),
            Handoff::new(Some(pin()), Vec::new()),
            Handoff::new(None, Vec::new()),
        ] {
            let text = h.encode().unwrap();
            assert!(!text.contains('\n'), "{text}");
            assert_eq!(Handoff::decode(&text).unwrap(), h);
        }
        // The pin's mode is never sent.
        let h = Handoff::new(
            Some(Pin {
                mode: Some(0o644),
                ..pin()
            }),
            argv(),
        );
        let back = Handoff::decode(&h.encode().unwrap()).unwrap();
        assert_eq!(back.pin, Some(pin()));
    }

    #[test]
    fn the_argv_is_capped_in_count_and_bytes() {
        let many = vec!["a".to_string(); MAX_ARGV_ARGS + 1];
        let long = vec![
            "a".repeat(MAX_ARGV_BYTES / 2),
            "b".repeat(MAX_ARGV_BYTES / 2 + 1),
        ];
        let fits = vec!["a".to_string(); MAX_ARGV_ARGS];
        let just = vec![
            "a".repeat(MAX_ARGV_BYTES / 2),
            "b".repeat(MAX_ARGV_BYTES / 2),
        ];
        // srun leaves an argv over the caps out, keeps one within.
        assert!(Handoff::new(None, many.clone()).srun_argv.is_empty());
        assert!(Handoff::new(None, long.clone()).srun_argv.is_empty());
        assert_eq!(Handoff::new(None, fits.clone()).srun_argv, fits);
        assert_eq!(Handoff::new(None, just.clone()).srun_argv, just);
        // A node drops an argv over the caps it finds, keeping the pin.
        for over in [many, long] {
            let forged = Handoff {
                version: VERSION,
                pin: Some(pin()),
                srun_argv: over,
            };
            let back = Handoff::decode(&forged.encode().unwrap()).unwrap();
            assert_eq!(back, Handoff::new(Some(pin()), Vec::new()));
        }
        // Within the bytes cap but over the text cap once quoted: srun
        // leaves the argv out rather than writing what a node refuses.
        let quoted = vec!["\u{1}".repeat(MAX_ARGV_BYTES)];
        let h = Handoff::new(Some(pin()), quoted);
        assert!(!h.srun_argv.is_empty());
        let text = h.encode().unwrap();
        assert!(text.len() <= MAX_HANDOFF_BYTES);
        assert_eq!(
            Handoff::decode(&text).unwrap(),
            Handoff::new(Some(pin()), Vec::new())
        );
    }

    #[test]
    fn the_text_is_capped_before_parsing() {
        let padded = format!(
            "{}{}",
            Handoff::new(None, argv()).encode().unwrap(),
            " ".repeat(MAX_HANDOFF_BYTES)
        );
        assert!(refused(&padded).contains("(too long)"));
        // At the cap exactly, whitespace and all, it parses.
        let text = Handoff::new(None, argv()).encode().unwrap();
        let at = format!("{text}{}", " ".repeat(MAX_HANDOFF_BYTES - text.len()));
        Handoff::decode(&at).unwrap();
    }

    #[test]
    fn the_pin_keeps_its_own_cap() {
        let pin_json = serde_json::to_string(&pin()).unwrap();
        let padded = pin_json.replacen('{', &format!("{{{}", " ".repeat(MAX_PIN_BYTES)), 1);
        let text = format!("{{\"version\":1,\"pin\":{padded},\"srun_argv\":[]}}");
        assert!(text.len() < MAX_HANDOFF_BYTES);
        assert!(refused(&text).contains("(too long)"));
    }

    #[test]
    fn unknown_versions_are_refused() {
        for v in [0, 2, u32::MAX] {
            let text = format!("{{\"version\":{v},\"srun_argv\":[],\"future\":true}}");
            let msg = refused(&text);
            assert!(
                msg.contains(&format!("version {v}, this node reads version 1")),
                "{msg}"
            );
        }
        refused("{\"version\":-1,\"srun_argv\":[]}");
        refused("{\"version\":\"1\",\"srun_argv\":[]}");
        refused("{\"srun_argv\":[]}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let msg = refused("{\"version\":1,\"srun_argv\":[],\"secret_field\":1}");
        assert!(
            msg.contains("(not a handoff)") && !msg.contains("secret"),
            "{msg}"
        );
        // In the pin too, the mode included (never taken from the job).
        let mut pin = serde_json::to_value(pin()).unwrap();
        for (k, v) in [("mode", 0o777), ("extra", 1)] {
            let mut p = pin.clone();
            p.as_object_mut().unwrap().insert(k.into(), v.into());
            let text = format!("{{\"version\":1,\"pin\":{p},\"srun_argv\":[]}}");
            let msg = refused(&text);
            assert!(!msg.contains(k), "{msg}");
        }
        // Missing fields of the pin.
        pin.as_object_mut().unwrap().remove("path");
        refused(&format!("{{\"version\":1,\"pin\":{pin},\"srun_argv\":[]}}"));
        // And the argv is required.
        refused("{\"version\":1}");
    }

    #[test]
    fn garbage_is_refused() {
        for text in [
            "",
            "forged",
            "null",
            "[]",
            "1",
            "{",
            "{\"version\":1,\"srun_argv\":[1]}",
            "{\"version\":1,\"srun_argv\":\"srun\"}",
            "{\"version\":1,\"pin\":\"/x.sif\",\"srun_argv\":[]}",
            "{\"version\":1,\"version\":1,\"srun_argv\":[]}",
            "{\"version\":1,\"srun_argv\":[]} trailing",
            // The encoding this replaced.
            "reference = \"tiny\"\npath = \"/x.sif\"",
        ] {
            refused(text);
        }
    }

    #[test]
    fn a_forged_pin_inside_is_refused_without_echo() {
        let forged = [
            Pin {
                name: Some("tiny:1.0\nfake log line".into()),
                ..pin()
            },
            Pin {
                name: Some("x".repeat(5000)),
                ..pin()
            },
            Pin {
                path: PathBuf::from("relative.sif"),
                ..pin()
            },
            Pin {
                path: PathBuf::from("/a\nb.sif"),
                ..pin()
            },
            Pin {
                reference: "a b".into(),
                ..pin()
            },
            Pin {
                reference: String::new(),
                ..pin()
            },
            Pin {
                sha256: Some("Z".repeat(64)),
                ..pin()
            },
            Pin {
                tag: Some("-x".into()),
                ..pin()
            },
        ];
        for p in forged {
            let text = Handoff::new(Some(p), argv()).encode().unwrap();
            let msg = refused(&text);
            assert!(!msg.contains("fake") && !msg.contains("xxxx"), "{msg}");
        }
        // A pin that does not parse as a pin.
        refused("{\"version\":1,\"pin\":{\"path\":3},\"srun_argv\":[]}");
    }

    #[test]
    fn a_path_that_is_not_utf8_cannot_be_handed_over() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let p = Pin {
            path: PathBuf::from(OsStr::from_bytes(b"/opt/\xffx.sif")),
            ..pin()
        };
        let e = Handoff::new(Some(p), argv()).encode().unwrap_err();
        assert!(matches!(e, RegistryError::Unsendable { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("x.sif"), "{msg}");
        assert!(msg.ends_with("rename it"), "{msg}");
    }
}
