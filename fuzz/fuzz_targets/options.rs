//! Option values as a node receives them: Slurm hands slurmstepd whatever
//! the job environment's `_SLURM_SPANK_OPTION_*` variables hold, unchecked
//! by srun (the job environment is the user's). Validation must never panic, whatever is
//! accepted must be what srun would accept (no white space or control
//! characters, bounded, mounts absolute and without `..`), and the error
//! message, which reaches the user's terminal and the slurmd log, must be
//! one bounded line without control characters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use slurm_ml_container::options::{OptionId, UserOptions, MAX_MOUNTS, MAX_VALUE_LEN, OPTIONS};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let id = OPTIONS[usize::from(which) % OPTIONS.len()].id;
    let text = String::from_utf8_lossy(rest);
    // A leading 0xff byte stands for "no value" (Slurm passes NULL).
    let arg = if rest.first() == Some(&0xff) {
        None
    } else {
        Some(text.as_ref())
    };
    let mut o = UserOptions::default();
    match o.apply(id, arg) {
        Ok(()) => {
            if let Some(v) = arg.filter(|v| !v.is_empty()) {
                assert!(v.len() <= MAX_VALUE_LEN);
                assert!(
                    !v.chars().any(|c| c.is_whitespace() || c.is_control()),
                    "{v:?}"
                );
            }
            assert!(o.mounts.len() <= MAX_MOUNTS);
            for m in &o.mounts {
                assert!(m.src.is_absolute() && m.dst.is_absolute(), "{m}");
                assert!(!m.src.components().any(|c| c.as_os_str() == ".."), "{m}");
                assert!(!m.dst.components().any(|c| c.as_os_str() == ".."), "{m}");
            }
            if id == OptionId::Workdir {
                assert!(o.workdir.as_ref().is_some_and(|w| w.is_absolute()));
            }
            let summary = o.summary();
            assert!(!summary.chars().any(char::is_control), "{summary:?}");
        }
        Err(e) => {
            let line = e.to_string();
            assert!(!line.chars().any(char::is_control), "{line:?}");
            assert!(line.len() <= 1024, "{} bytes", line.len());
        }
    }
});
