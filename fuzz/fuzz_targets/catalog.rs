//! The catalog parser on arbitrary text: it must never panic, and what it
//! accepts must be consistent (one entry per name:tag, at most one default
//! per name, valid sha256 sums), since resolution relies on that.
#![no_main]

use std::collections::HashSet;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use slurm_ml_container::catalog::Catalog;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = Catalog::parse(Path::new("/fuzz/catalog.toml"), &text) {
        let mut refs = HashSet::new();
        let mut defaults = HashSet::new();
        for im in &c.images {
            assert!(refs.insert(im.reference()), "duplicate {}", im.reference());
            if im.default {
                assert!(defaults.insert(im.name.clone()), "two defaults for {}", im.name);
            }
            if let Some(s) = &im.sha256 {
                assert!(s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()));
            }
            assert!(im.line >= 1);
        }
        for im in &c.images {
            let _ = c.default_for(&im.name);
            for a in &im.aliases {
                assert!(c.by_alias(a).is_some());
            }
        }
    }
});
