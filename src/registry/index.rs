//! Resolution through the catalog index (`.registry/catalog.idx`): a
//! lookup instead of parsing a catalog of 10,000 images; anything the index
//! cannot answer safely goes the full way.
#![forbid(unsafe_code)]

use crate::catalog;
use crate::catalog_index::{self, Kind};
use crate::secure;

use super::open::trusted_uids;
use super::{Registry, Source};

impl Registry<'_> {
    /// The catalog entry `reference` names, from the index beside the
    /// catalog, in the order the full resolution uses (`name:tag`, alias,
    /// bare name); `None` sends the caller to the full strict parse: no
    /// index, a stale or damaged one, or a key it does not have (a lost
    /// record costs time, never another image). Used only while the
    /// catalog has not been parsed in this `Registry`.
    pub(super) fn indexed(&self, reference: &str) -> Option<(Source, catalog::Image)> {
        if !self.use_index || self.catalog.get().is_some() {
            return None;
        }
        let trusted = trusted_uids(self.cfg).ok()?;
        let catalog_path = self.root.join(catalog::CATALOG_PATH);
        let (_, meta) = secure::open_trusted(&catalog_path, &trusted).ok()?;
        if meta.len() > catalog::MAX_CATALOG_BYTES {
            return None;
        }
        let index = match catalog_index::open(
            &self.root.join(catalog_index::INDEX_PATH),
            &meta,
            &trusted,
        ) {
            Ok(i) => i,
            Err(catalog_index::IndexError::Missing) => return None,
            Err(e) => {
                log::debug!("{e}");
                return None;
            }
        };
        let mut tries = Vec::with_capacity(3);
        if reference.contains(':') {
            tries.push((Kind::NameTag, Source::Catalog));
        }
        tries.push((Kind::Alias, Source::Alias));
        if !reference.contains(':') {
            tries.push((Kind::Bare, Source::Catalog));
        }
        for (kind, source) in tries {
            match index.lookup(kind, reference) {
                Ok(Some(e)) => {
                    self.index_hits.set(self.index_hits.get() + 1);
                    return Some((source, e.image()));
                }
                Ok(None) => {}
                Err(e) => {
                    log::debug!("{e}");
                    return None;
                }
            }
        }
        None
    }

    /// How many resolutions the index answered (tests, benchmarks).
    pub fn index_hits(&self) -> u32 {
        self.index_hits.get()
    }

    /// Never use the index (benchmarks compare; `doctor` and `verify`
    /// parse the catalog anyway).
    pub fn without_index(mut self) -> Self {
        self.use_index = false;
        self
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use crate::catalog::{self, Catalog};
    use crate::catalog_index;
    use crate::registry::tests::{fixture, Fixture, CATALOG};
    use crate::registry::{Registry, RegistryError};

    /// Writes the index for the fixture's catalog as the CLI does.
    fn index(f: &Fixture) {
        let root = &f.cfg.root.0;
        let text = fs::read_to_string(root.join(catalog::CATALOG_PATH)).unwrap();
        let c = Catalog::parse(Path::new("/c"), &text).unwrap();
        catalog_index::write(root, &c, &text).unwrap();
    }

    /// With an index, every catalog reference resolves without the parse,
    /// to exactly what the parse gives; misses (scan, unknown, bad paths)
    /// still go the full way.
    #[test]
    fn the_index_answers_as_the_catalog_does() {
        let f = fixture(CATALOG);
        index(&f);
        for (reference, from_index) in [
            ("pytorch", true),
            ("pytorch:2.1", true),
            ("pytorch:2.2", true),
            ("nvcr.io/nvidia/pytorch:24.01-py3", true),
            ("scanned", false),
            ("pytorh", false),
            ("pytorch:9.9", false),
        ] {
            let fast = Registry::open(&f.cfg).unwrap();
            let slow = Registry::open(&f.cfg).unwrap().without_index();
            let a = fast.resolve(reference).map_err(|e| e.to_string());
            let b = slow.resolve(reference).map_err(|e| e.to_string());
            assert_eq!(a, b, "{reference}");
            assert_eq!(fast.index_hits(), u32::from(from_index), "{reference}");
            assert_eq!(slow.index_hits(), 0);
        }
        // Index hits take the same checks after the lookup.
        let r = Registry::open(&f.cfg).unwrap();
        assert!(matches!(
            r.resolve("sneaky:1"),
            Err(RegistryError::Outside { .. })
        ));
        assert!(matches!(
            r.resolve("gone:1"),
            Err(RegistryError::Missing { .. })
        ));
        assert_eq!(r.index_hits(), 2);
    }

    /// A catalog edited by hand after the index was written is read, not
    /// the index; so is one the index's own trust checks refuse.
    #[test]
    fn a_stale_or_untrusted_index_is_bypassed() {
        use std::os::unix::fs::PermissionsExt;
        let f = fixture(CATALOG);
        index(&f);
        let cat = f.cfg.root.0.join(catalog::CATALOG_PATH);
        // Same length: only the identity tells.
        let edited = CATALOG.replace("pytorch-2.1.sif", "pytorch-2.2.sif");
        assert_eq!(edited.len(), CATALOG.len());
        fs::write(&cat, &edited).unwrap();
        let r = Registry::open(&f.cfg).unwrap();
        let p = r.resolve("pytorch:2.1").unwrap();
        assert!(p.path.ends_with("pytorch-2.2.sif"), "{}", p.path.display());
        assert_eq!(r.index_hits(), 0);
        index(&f);
        let r = Registry::open(&f.cfg).unwrap();
        r.resolve("pytorch:2.1").unwrap();
        assert_eq!(r.index_hits(), 1);
        let idx = f.cfg.root.0.join(catalog_index::INDEX_PATH);
        fs::set_permissions(&idx, fs::Permissions::from_mode(0o666)).unwrap();
        let r = Registry::open(&f.cfg).unwrap();
        r.resolve("pytorch:2.1").unwrap();
        assert_eq!(r.index_hits(), 0);
        // The catalog's own checks still apply: an untrusted catalog is
        // refused even with a matching index.
        fs::set_permissions(&idx, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(&cat, fs::Permissions::from_mode(0o666)).unwrap();
        let e = Registry::open(&f.cfg)
            .unwrap()
            .resolve("pytorch:2.1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("writable by group or others"), "{e}");
    }
}
