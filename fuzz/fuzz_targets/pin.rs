//! The pin parser on arbitrary text, as a node receives it in the job
//! environment (which the user controls): it must never panic, and a pin it
//! accepts must hold only what the node may use: an absolute printable path
//! within its cap, a printable reference without spaces, catalog-valid name
//! and tag, and a sha256 of 64 lowercase hex digits. Whatever it refuses,
//! the message is one short line that echoes nothing of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use slurm_ml_container::catalog::{valid_name, valid_tag};
use slurm_ml_container::registry::{Pin, MAX_PIN_PATH, MAX_PIN_REFERENCE};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Pin::decode(&text) {
        Ok(pin) => {
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
            if let Some(h) = &pin.sha256 {
                assert!(h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
            }
            assert!(pin.mode.is_none(), "the mode is never taken from the pin");
            // What a node accepted round-trips.
            assert_eq!(Pin::decode(&pin.encode()).expect("re-decode"), pin);
            // A pin always confirms itself, and its display name is one line.
            pin.confirms(&pin).expect("a pin confirms itself");
            assert!(!pin.display_name().contains('\n'));
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "{msg}");
            assert!(msg.len() < 400, "{msg}");
        }
    }
});
