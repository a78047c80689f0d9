//! The pin: a resolved image as srun sends it to the nodes inside the
//! handoff ([`crate::handoff`], in the job environment). A node never
//! believes it: it resolves again from its own catalog and the pin may only
//! confirm ([`Pin::confirms`]).
#![forbid(unsafe_code)]

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::catalog;

use super::text::has_control;
use super::{RegistryError, MAX_PIN_BYTES, MAX_PIN_PATH, MAX_PIN_REFERENCE};

/// The job environment variable in which srun hands the nodes the pin (and
/// the rest of [`crate::handoff::Handoff`]).
pub const HANDOFF_ENV: &str = "ML_CONTAINER_HANDOFF";

/// How a reference was resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Catalog,
    Alias,
    Scan,
    Path,
}

/// A resolved image, also what srun pins for the nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// What the user typed.
    pub reference: String,
    pub source: Source,
    pub name: Option<String>,
    pub tag: Option<String>,
    /// Canonical path of the image file.
    pub path: PathBuf,
    /// The file's size when resolved.
    pub size: u64,
    /// The size the catalog records, if any.
    pub catalog_size: Option<u64>,
    pub sha256: Option<String>,
    /// The file's mode, from `fstat` of the fd that was verified (for the
    /// report; never sent to the nodes).
    #[serde(skip)]
    pub mode: Option<u32>,
}

impl Pin {
    /// Parses a pin as it appears in the handoff (JSON, [`crate::handoff`])
    /// from the job environment, which the user controls: the text is
    /// capped before parsing, unknown fields are refused and every field is
    /// checked ([`Pin::check`]) before anything uses it; no part of a
    /// refused pin is echoed (a reason names the field, never its value).
    pub fn decode(text: &str) -> Result<Pin, RegistryError> {
        if text.len() > MAX_PIN_BYTES {
            return Err(bad_pin("too long"));
        }
        let pin: Pin = serde_json::from_str(text).map_err(|_| bad_pin("not a pin"))?;
        pin.check()?;
        Ok(pin)
    }

    /// The checks a pin from the job environment passes before any use:
    /// an absolute printable path, a printable reference without spaces,
    /// each within its cap, a catalog-valid name and tag, a sha256 of 64
    /// lowercase hex digits.
    pub fn check(&self) -> Result<(), RegistryError> {
        let path = self
            .path
            .to_str()
            .ok_or_else(|| bad_pin("path is not UTF-8"))?;
        if !path.starts_with('/') || path.len() > MAX_PIN_PATH || has_control(path) {
            return Err(bad_pin(
                "path must be absolute, printable, at most 4096 bytes",
            ));
        }
        if self.reference.is_empty()
            || self.reference.len() > MAX_PIN_REFERENCE
            || self
                .reference
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad_pin(
                "reference must be printable, without spaces, at most 1024 bytes",
            ));
        }
        if self
            .name
            .as_deref()
            .is_some_and(|n| !catalog::valid_name(n))
            || self.tag.as_deref().is_some_and(|t| !catalog::valid_tag(t))
        {
            return Err(bad_pin("name or tag is not a catalog name"));
        }
        if self
            .sha256
            .as_deref()
            .is_some_and(|h| !catalog::is_sha256_hex(h))
        {
            return Err(bad_pin("sha256 must be 64 lowercase hex digits"));
        }
        Ok(())
    }

    /// On a node: does srun's pin (`srun`) name exactly what this node
    /// resolved (`self`)? A pin can only confirm, never choose: path, size
    /// and sha256 all come from the node's own resolution.
    pub fn confirms(&self, srun: &Pin) -> Result<(), RegistryError> {
        let what = if srun.reference != self.reference {
            Some("image name")
        } else if srun.path != self.path {
            Some("file")
        } else if srun.size != self.size {
            Some("size")
        } else if srun.sha256 != self.sha256 || srun.catalog_size != self.catalog_size {
            Some("sha256 or size in the catalog")
        } else {
            None
        };
        match what {
            None => Ok(()),
            Some(what) => Err(RegistryError::PinChanged {
                reference: self.reference.clone(),
                path: self.path.clone(),
                what,
            }),
        }
    }

    /// `name:tag` when known, else the reference.
    pub fn display_name(&self) -> String {
        match (&self.name, &self.tag) {
            (Some(n), Some(t)) => format!("{n}:{t}"),
            _ => self.reference.clone(),
        }
    }
}

/// A refused pin: `reason` names the field, never its value.
fn bad_pin(reason: &str) -> RegistryError {
    RegistryError::BadPin {
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::registry::tests::{fixture, CATALOG};

    /// The pin as srun writes it inside the handoff.
    fn json(pin: &Pin) -> String {
        serde_json::to_string(pin).unwrap()
    }
    use crate::registry::Registry;

    /// The node resolves itself; srun's pin only confirms (docs/DESIGN.md,
    /// Decisions).
    #[test]
    fn a_pin_confirms_and_never_chooses() {
        let f = fixture(CATALOG);
        let r = Registry::open(&f.cfg).unwrap();
        let srun = r.resolve("pytorch:2.1").unwrap();
        let back = Pin::decode(&json(&srun)).unwrap();
        assert_eq!(
            back,
            Pin {
                mode: None,
                ..srun.clone()
            }
        );
        // The same resolution on the node: confirmed.
        let node = Registry::open(&f.cfg)
            .unwrap()
            .resolve("pytorch:2.1")
            .unwrap();
        node.confirms(&back).unwrap();
        // A pin naming another file, size or sum is refused; the message
        // names the node's file, never the pin's values.
        for forged in [
            Pin {
                path: f.dir.join("outside/evil.sif"),
                ..back.clone()
            },
            Pin {
                size: 99,
                ..back.clone()
            },
            Pin {
                sha256: Some("a".repeat(64)),
                ..back.clone()
            },
            Pin {
                reference: "pytorch".into(),
                ..back.clone()
            },
        ] {
            let e = node.confirms(&forged).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, RegistryError::PinChanged { .. }), "{msg}");
            assert!(msg.contains("pytorch-2.1.sif"), "{msg}");
            assert!(!msg.contains("evil"), "{msg}");
            assert!(msg.ends_with("submit it again"), "{msg}");
        }
        // The catalog rewritten after srun resolved: the node's own
        // resolution differs, and the pin cannot override it.
        fs::write(
            f.cfg.root.0.join(".registry/catalog.toml"),
            CATALOG.replace("pytorch-2.1.sif", "pytorch-2.2.sif"),
        )
        .unwrap();
        let node = Registry::open(&f.cfg)
            .unwrap()
            .resolve("pytorch:2.1")
            .unwrap();
        assert!(matches!(
            node.confirms(&back),
            Err(RegistryError::PinChanged { what: "file", .. })
        ));
    }

    #[test]
    fn pin_fields_are_checked_before_use() {
        let good = Pin {
            reference: "tiny".into(),
            source: Source::Catalog,
            name: Some("tiny".into()),
            tag: Some("1.0".into()),
            path: PathBuf::from("/opt/containers/tiny.sif"),
            size: 1,
            catalog_size: None,
            sha256: Some("0".repeat(64)),
            mode: None,
        };
        Pin::decode(&json(&good)).unwrap();
        let refused = [
            Pin {
                name: Some("tiny:1.0\nfake log line".into()),
                ..good.clone()
            },
            Pin {
                name: Some("x".repeat(120_000)),
                ..good.clone()
            },
            Pin {
                path: PathBuf::from("relative.sif"),
                ..good.clone()
            },
            Pin {
                path: PathBuf::from("/a\nb.sif"),
                ..good.clone()
            },
            Pin {
                reference: "a b".into(),
                ..good.clone()
            },
            Pin {
                reference: String::new(),
                ..good.clone()
            },
            Pin {
                sha256: Some("Z".repeat(64)),
                ..good.clone()
            },
            Pin {
                sha256: Some("0".repeat(63)),
                ..good.clone()
            },
            Pin {
                tag: Some("-x".into()),
                ..good.clone()
            },
        ];
        for pin in refused {
            assert!(pin.check().is_err(), "{pin:?}");
            let e = Pin::decode(&json(&pin)).unwrap_err().to_string();
            assert!(e.contains("do not set ML_CONTAINER_HANDOFF"), "{e}");
            // The reason never echoes a value from the pin.
            assert!(!e.contains("fake") && !e.contains("xxxx"), "{e}");
            assert!(e.len() < 300, "{e}");
        }
        assert!(Pin::decode("{\"path\": 3}").is_err());
        assert!(Pin::decode(&json(&good).replace("{", "{\"mode\":1,")).is_err());
        assert!(Pin::decode(&" ".repeat(MAX_PIN_BYTES + 1)).is_err());
    }
}
