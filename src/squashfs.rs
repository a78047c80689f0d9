//! The squashfs superblock: the one home of its format facts, for the SIF
//! check (the primary partition of a SIF image is a squashfs,
//! [`crate::sif`]) and for plain `.sqfs` images (Charliecloud's,
//! [`crate::integrity`]).
//!
//! Layout of a squashfs 4.0 superblock (kernel `fs/squashfs/squashfs_fs.h`,
//! `struct squashfs_super_block`, little-endian): the magic "hsqs"
//! (0x73717368) at 0, `u16 s_major` at 28, `u16 s_minor` at 30,
//! `u64 bytes_used` at 40; 96 bytes in all. Squashfs 3.x and older have
//! another layout (`bytes_used` elsewhere), and no current kernel or
//! squashfuse mounts them, so only major version 4 is accepted.
#![forbid(unsafe_code)]

use std::fmt;

/// Size of a squashfs 4.0 superblock (kernel `struct squashfs_super_block`).
pub const SUPERBLOCK_LEN: u64 = 96;
/// The first four bytes of every squashfs image.
pub const MAGIC: &[u8; 4] = b"hsqs";
/// The only major version Linux and squashfuse mount.
pub const MAJOR: u16 = 4;
/// Offset of `s_major` (u16).
pub const MAJOR_AT: usize = 28;
/// Offset of `s_minor` (u16).
pub const MINOR_AT: usize = 30;
/// Offset of `bytes_used` (u64): how much of the partition or file the
/// file system occupies.
pub const BYTES_USED_AT: usize = 40;
/// Offset of `block_size` (u32), for building examples.
pub const BLOCK_SIZE_AT: usize = 12;

/// A superblock's bytes.
pub type Bytes = [u8; SUPERBLOCK_LEN as usize];

/// What is wrong with a superblock, before its size is compared with the
/// room it has (which the caller knows: a SIF partition or a whole file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SuperblockError {
    /// The bytes do not start with [`MAGIC`].
    Magic { found: [u8; 4] },
    /// A major version other than [`MAJOR`].
    Version { major: u16, minor: u16 },
    /// `bytes_used` is more than the room (`len`) or less than a superblock.
    Size { bytes_used: u64, len: u64 },
}

impl fmt::Display for SuperblockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SuperblockError::Magic { found } => write!(
                f,
                "no squashfs magic \"hsqs\" (found {:02x?}): not a squashfs image; rebuild it",
                found
            ),
            SuperblockError::Version { major, minor } => write!(
                f,
                "squashfs version {major}.{minor}, not 4.x (the only one Linux mounts): \
                 rebuild it with a current mksquashfs"
            ),
            SuperblockError::Size { bytes_used, len } => write!(
                f,
                "squashfs claims {bytes_used} bytes but has room for {len} (and a superblock \
                 alone is {SUPERBLOCK_LEN}): truncated; re-copy it"
            ),
        }
    }
}

impl std::error::Error for SuperblockError {}

/// Whether `head` starts with the squashfs magic (format sniffing).
pub fn has_magic(head: &[u8]) -> bool {
    head.get(..4) == Some(&MAGIC[..])
}

/// Checks a superblock that has `len` bytes of room (the SIF partition or
/// the file it starts): magic, version 4, and `bytes_used` between a
/// superblock and `len`. Returns `bytes_used`.
pub fn check(sb: &Bytes, len: u64) -> Result<u64, SuperblockError> {
    let mut found = [0u8; 4];
    found.copy_from_slice(&sb[..4]);
    if &found != MAGIC {
        return Err(SuperblockError::Magic { found });
    }
    let major = le_u16(sb, MAJOR_AT);
    if major != MAJOR {
        return Err(SuperblockError::Version {
            major,
            minor: le_u16(sb, MINOR_AT),
        });
    }
    let mut used = [0u8; 8];
    used.copy_from_slice(&sb[BYTES_USED_AT..BYTES_USED_AT + 8]);
    let bytes_used = u64::from_le_bytes(used);
    if bytes_used > len || bytes_used < SUPERBLOCK_LEN {
        return Err(SuperblockError::Size { bytes_used, len });
    }
    Ok(bytes_used)
}

/// A sound version-4 superblock saying `bytes_used`, for tests, benchmarks
/// and fuzz seeds (block size 128 KiB, everything else zero).
pub fn example(bytes_used: u64) -> Bytes {
    let mut sb = [0u8; SUPERBLOCK_LEN as usize];
    sb[..4].copy_from_slice(MAGIC);
    sb[BLOCK_SIZE_AT..BLOCK_SIZE_AT + 4].copy_from_slice(&131_072u32.to_le_bytes());
    sb[MAJOR_AT..MAJOR_AT + 2].copy_from_slice(&MAJOR.to_le_bytes());
    sb[BYTES_USED_AT..BYTES_USED_AT + 8].copy_from_slice(&bytes_used.to_le_bytes());
    sb
}

fn le_u16(b: &Bytes, at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sound_superblock_passes_and_says_its_size() {
        assert_eq!(check(&example(4096), 4096), Ok(4096));
        assert!(has_magic(&example(96)));
        assert!(!has_magic(b"hsq"));
    }

    #[test]
    fn magic_version_and_size_are_checked() {
        let mut sb = example(4096);
        sb[0] = b'x';
        assert!(matches!(
            check(&sb, 4096),
            Err(SuperblockError::Magic { .. })
        ));
        let mut sb = example(4096);
        sb[MAJOR_AT..MAJOR_AT + 2].copy_from_slice(&3u16.to_le_bytes());
        sb[MINOR_AT..MINOR_AT + 2].copy_from_slice(&1u16.to_le_bytes());
        let e = check(&sb, 4096).unwrap_err();
        assert_eq!(e, SuperblockError::Version { major: 3, minor: 1 });
        assert!(e
            .to_string()
            .ends_with("rebuild it with a current mksquashfs"));
        assert_eq!(
            check(&example(8192), 4096),
            Err(SuperblockError::Size {
                bytes_used: 8192,
                len: 4096
            })
        );
        assert!(check(&example(95), 4096).is_err());
    }
}
