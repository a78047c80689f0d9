//! The SIF structure check on arbitrary bytes: it must never panic, and what
//! it accepts must satisfy the invariants its callers rely on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use slurm_ml_container::sif;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    if let Ok(s) = sif::inspect(&mut std::io::Cursor::new(data), len) {
        let p = s.primary;
        assert!(p.squashfs_bytes_used <= p.size);
        assert!(p.squashfs_bytes_used >= sif::SQUASHFS_SUPERBLOCK_LEN);
        assert!(p.offset.checked_add(p.size).is_some_and(|end| end <= len));
        assert!(p.offset >= sif::HEADER_LEN);
        assert!(s.descriptors_used as u64 <= sif::MAX_DESCRIPTORS);
        assert_eq!(
            data.get(p.offset as usize..p.offset as usize + 4),
            Some(&b"hsqs"[..])
        );
    }
});
