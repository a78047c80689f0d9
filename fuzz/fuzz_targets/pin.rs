//! The handoff parser (srun's pin and argv for the nodes, `ML_CONTAINER_HANDOFF`)
//! on arbitrary text, as a node receives it in the job environment (which the
//! user controls): it must never panic, and a handoff it accepts must hold
//! only what the node may use: this build's version; a pin, if any, with an
//! absolute printable path within its cap, a printable reference without
//! spaces, catalog-valid name and tag, and a sha256 of 64 lowercase hex
//! digits; an argv within its caps. Whatever it refuses, the message is one
//! short line that echoes nothing of the input. (The target keeps its name,
//! `pin`, for fuzz/run.sh and tests/run.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use slurm_ml_container::catalog::{valid_name, valid_tag};
use slurm_ml_container::handoff::{
    Handoff, MAX_ARGV_ARGS, MAX_ARGV_BYTES, MAX_HANDOFF_BYTES, VERSION,
};
use slurm_ml_container::registry::{MAX_PIN_PATH, MAX_PIN_REFERENCE};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Handoff::decode(&text) {
        Ok(h) => {
            assert!(text.len() <= MAX_HANDOFF_BYTES);
            assert_eq!(h.version, VERSION);
            assert!(h.srun_argv.len() <= MAX_ARGV_ARGS);
            assert!(h.srun_argv.iter().map(String::len).sum::<usize>() <= MAX_ARGV_BYTES);
            if let Some(pin) = &h.pin {
                let path = pin.path.to_str().expect("a UTF-8 path");
                assert!(path.starts_with('/') && path.len() <= MAX_PIN_PATH);
                assert!(!path.chars().any(char::is_control));
                assert!(!pin.reference.is_empty() && pin.reference.len() <= MAX_PIN_REFERENCE);
                assert!(!pin
                    .reference
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control()));
                assert!(pin.name.as_deref().is_none_or(valid_name));
                assert!(pin.tag.as_deref().is_none_or(valid_tag));
                if let Some(s) = &pin.sha256 {
                    assert!(s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
                }
                assert!(pin.mode.is_none(), "the mode is never taken from the job");
                // A pin always confirms itself, and its display name is one line.
                pin.confirms(pin).expect("a pin confirms itself");
                assert!(!pin.display_name().contains('\n'));
            }
            // What a node accepted round-trips.
            let again = h.encode().expect("an accepted handoff encodes");
            assert_eq!(Handoff::decode(&again).expect("re-decode"), h);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "{msg}");
            assert!(msg.len() < 400, "{msg}");
        }
    }
});
