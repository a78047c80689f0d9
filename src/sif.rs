//! SIF image structure checks (`verify = quick`), without Apptainer.
//!
//! A registry image is refused before any task is launched on it when its
//! structure is unsound: a half-copied or hand-edited `.sif` would otherwise
//! fail on every node at mount time, with Apptainer's message instead of ours.
//! The check reads three small regions only, whatever the image size: the
//! 128-byte global header, the descriptor table (at most
//! [`MAX_DESCRIPTORS`] records of 585 bytes) and the 96-byte squashfs
//! superblock of the primary partition. A 5 GB image costs a few KiB of I/O.
//!
//! The input is hostile by assumption (any user may point `--ml-container`
//! at a file in an allowed directory): every offset and length read from the
//! file goes through checked arithmetic, nothing is indexed by a value from
//! the file, and memory use is a fixed stack buffer whatever the header says.
//!
//! Format facts are from the Apptainer SIF library, github.com/apptainer/sif,
//! `pkg/sif/sif.go` (header, constants), `pkg/sif/descriptor.go` (raw
//! descriptor), `pkg/sif/arch.go`, `pkg/sif/create.go` (how the table and the
//! data section are laid out), and were checked against an image built by
//! Apptainer 1.4.5. Go's `encoding/binary` writes the structs packed (no
//! padding), little-endian.
#![forbid(unsafe_code)]

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom};

use crate::squashfs::{self, SuperblockError};

/// Size of the global header (sif.go `header`): launch script 32, magic 10,
/// version 3, arch 3, UUID 16, then eight int64.
pub const HEADER_LEN: u64 = 128;
/// Size of one descriptor (descriptor.go `rawDescriptor`): int32 datatype,
/// bool used, three uint32 ids, seven int64 (offset, size, size with padding,
/// ctime, mtime, and the deprecated but still present uid and gid), name
/// `[128]byte`, extra `[384]byte` = 4+1+12+56+128+384.
pub const DESCRIPTOR_LEN: u64 = 585;
/// Apptainer creates 48 descriptors; no tool creates thousands. Capping the
/// count bounds the work hostile input can ask for.
pub const MAX_DESCRIPTORS: u64 = 4096;
/// Size of a squashfs 4.0 superblock ([`crate::squashfs`], the home of
/// the superblock's format facts).
pub const SQUASHFS_SUPERBLOCK_LEN: u64 = squashfs::SUPERBLOCK_LEN;

// Global header fields (sif.go `header`).
const MAGIC_AT: usize = 32;
const MAGIC: &[u8; 10] = b"SIF_MAGIC\0";
const VERSION_AT: usize = 42;
/// sif.go: `CurrentVersion = version01`, written as "%02d" plus a NUL. It is
/// the only version any Apptainer or Singularity has written.
const VERSION_01: &[u8; 3] = b"01\0";
const ARCH_AT: usize = 45;
const DFREE_AT: usize = 80;
const DTOTAL_AT: usize = 88;
const DESCROFF_AT: usize = 96;
const DESCRLEN_AT: usize = 104;
const DATAOFF_AT: usize = 112;
const DATALEN_AT: usize = 120;

// Descriptor fields (descriptor.go `rawDescriptor`), offsets in the record.
const D_DATATYPE: usize = 0;
const D_USED: usize = 4;
const D_ID: usize = 5;
const D_OFFSET: usize = 17;
const D_SIZE: usize = 25;
const D_EXTRA: usize = 201;
// Partition extra (descriptor.go `partition`): int32 fstype, int32 parttype,
// [3]byte arch.
const P_FSTYPE: usize = D_EXTRA;
const P_PARTTYPE: usize = D_EXTRA + 4;

/// sif.go: `DataPartition`, the fourth of the data types numbered from 0x4001.
const DATA_PARTITION: i32 = 0x4004;
/// sif.go: `FsSquash = 1`.
const FS_SQUASHFS: i32 = 1;
/// sif.go: `FsEncryptedSquashfs = 5` (`apptainer build --encrypt`).
const FS_ENCRYPTED_SQUASHFS: i32 = 5;
/// sif.go: `PartPrimSys = 2` (`PartSystem` is 1).
const PART_PRIMARY_SYSTEM: i32 = 2;

/// Descriptors read per `read_exact` call: a stack buffer of 16 records
/// (9,360 bytes) keeps the syscalls few and the memory fixed.
const DESCRIPTORS_PER_READ: usize = 16;

/// What a sound image looks like, for `ml-container verify` and the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SifSummary {
    /// SIF format version, "01".
    pub version: String,
    /// Architecture of the primary partition as Go names it ("amd64",
    /// "arm64", ...), "unknown" when the header says "00".
    pub arch: String,
    /// Length of the file the checks were made against.
    pub file_len: u64,
    /// Descriptors in use (data objects: definition file, metadata,
    /// partitions, signatures).
    pub descriptors_used: usize,
    /// The primary system partition, the root file system the tasks run in.
    pub primary: PartitionInfo,
}

/// Where the primary system partition lies and how much of it squashfs uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Byte offset of the partition in the file.
    pub offset: u64,
    /// Partition size from its descriptor.
    pub size: u64,
    /// `bytes_used` from the squashfs superblock; at most `size`.
    pub squashfs_bytes_used: u64,
}

/// Why an image is refused. Each variant carries the values that were found,
/// so the one-line message can say what is wrong without a second look.
#[derive(Debug)]
pub enum SifError {
    /// A read failed (or found end of file where the length said there was
    /// data: the file shrank while being read).
    Io { offset: u64, source: io::Error },
    /// The file is shorter than the global header.
    TooShort { file_len: u64 },
    /// No "SIF_MAGIC" at byte 32.
    BadMagic { found: [u8; 10] },
    /// A format version other than "01".
    UnsupportedVersion { found: [u8; 3] },
    /// The header's descriptor count is negative or over [`MAX_DESCRIPTORS`].
    DescriptorCount { dtotal: i64 },
    /// The header's free-descriptor count is negative or over the total.
    FreeCount { dfree: i64, dtotal: i64 },
    /// The descriptor table length is not `dtotal` records.
    DescriptorTableLength {
        descrlen: i64,
        dtotal: i64,
        expected: u64,
    },
    /// The descriptor table overlaps the header or runs past the file end.
    DescriptorTableOutside {
        descroff: i64,
        descrlen: i64,
        file_len: u64,
    },
    /// The data section starts inside the descriptor table, or has a
    /// negative or overflowing length.
    DataSection {
        dataoff: i64,
        datalen: i64,
        table_end: u64,
    },
    /// The file ends before the data the header or a descriptor says it
    /// holds: an interrupted copy.
    Truncated { needed: u64, file_len: u64 },
    /// A used descriptor's object has a negative or overflowing offset or
    /// size, or starts before the data section.
    DescriptorOutside {
        index: u64,
        id: u32,
        offset: i64,
        size: i64,
        dataoff: u64,
    },
    /// The number of used descriptors disagrees with `dtotal - dfree`.
    UsedCount { used: u64, dtotal: i64, dfree: i64 },
    /// No used descriptor is a primary system partition.
    NoPrimaryPartition { descriptors_used: usize },
    /// More than one primary system partition (create.go refuses this).
    MultiplePrimaryPartitions { first_id: u32, second_id: u32 },
    /// The primary partition's file system type is not squashfs.
    PrimaryNotSquashfs { id: u32, fstype: i32 },
    /// The primary partition cannot even hold a squashfs superblock.
    PartitionTooSmall { offset: u64, size: u64 },
    /// The primary partition does not start with the squashfs magic.
    SquashfsMagic { offset: u64, found: [u8; 4] },
    /// A squashfs version other than 4 (the only one Linux mounts).
    SquashfsVersion { offset: u64, major: u16, minor: u16 },
    /// The squashfs claims more bytes than its partition holds, or fewer
    /// than its own superblock.
    SquashfsSize {
        bytes_used: u64,
        partition_size: u64,
    },
}

/// How the messages end: what the user can do about a damaged image.
const REBUILD: &str = "re-copy or rebuild the image";

impl fmt::Display for SifError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SifError::Io { offset, source } => write!(
                f,
                "reading the SIF image at byte {offset} failed: {source}; \
                 check the file system, then {REBUILD} if it persists"
            ),
            SifError::TooShort { file_len } => write!(
                f,
                "file is {file_len} bytes, shorter than the {HEADER_LEN}-byte SIF header: \
                 not a SIF image or an interrupted copy; {REBUILD}"
            ),
            SifError::BadMagic { found } => write!(
                f,
                "no SIF magic at byte {MAGIC_AT} (found \"{}\"): not a SIF image; \
                 build one with `apptainer build IMAGE.sif SOURCE`",
                show(found)
            ),
            SifError::UnsupportedVersion { found } => write!(
                f,
                "SIF format version \"{}\" is not supported (only \"01\"); \
                 rebuild the image with Apptainer",
                show(found)
            ),
            SifError::DescriptorCount { dtotal } => write!(
                f,
                "SIF header declares {dtotal} descriptors (expected 0 to {MAX_DESCRIPTORS}): \
                 corrupt header; {REBUILD}"
            ),
            SifError::FreeCount { dfree, dtotal } => write!(
                f,
                "SIF header declares {dfree} free descriptors out of {dtotal}: \
                 corrupt header; {REBUILD}"
            ),
            SifError::DescriptorTableLength {
                descrlen,
                dtotal,
                expected,
            } => write!(
                f,
                "SIF descriptor table is {descrlen} bytes but {dtotal} descriptors \
                 take {expected}: corrupt header; {REBUILD}"
            ),
            SifError::DescriptorTableOutside {
                descroff,
                descrlen,
                file_len,
            } => write!(
                f,
                "SIF descriptor table ({descrlen} bytes at byte {descroff}) is not \
                 between the header and the end of the {file_len}-byte file: \
                 corrupt or truncated image; {REBUILD}"
            ),
            SifError::DataSection {
                dataoff,
                datalen,
                table_end,
            } => write!(
                f,
                "SIF data section ({datalen} bytes at byte {dataoff}) does not start \
                 after the descriptor table (which ends at byte {table_end}): \
                 corrupt header; {REBUILD}"
            ),
            SifError::Truncated { needed, file_len } => write!(
                f,
                "SIF image is truncated: its data reaches byte {needed} but the file \
                 is {file_len} bytes (an interrupted copy?); {REBUILD}"
            ),
            SifError::DescriptorOutside {
                index,
                id,
                offset,
                size,
                dataoff,
            } => write!(
                f,
                "SIF descriptor {index} (object id {id}) points at {size} bytes at \
                 byte {offset}, outside the data section that starts at byte {dataoff}: \
                 corrupt descriptor; {REBUILD}"
            ),
            SifError::UsedCount {
                used,
                dtotal,
                dfree,
            } => write!(
                f,
                "SIF descriptor table has {used} used descriptors but the header says \
                 {dtotal} total and {dfree} free: corrupt image; {REBUILD}"
            ),
            SifError::NoPrimaryPartition { descriptors_used } => write!(
                f,
                "SIF image has no primary system partition (among {descriptors_used} \
                 objects): nothing to run in; rebuild it with `apptainer build`"
            ),
            SifError::MultiplePrimaryPartitions {
                first_id,
                second_id,
            } => write!(
                f,
                "SIF image has two primary system partitions (objects {first_id} and \
                 {second_id}): corrupt descriptors; {REBUILD}"
            ),
            SifError::PrimaryNotSquashfs { id, fstype } => write!(
                f,
                "SIF primary partition (object {id}) is {} (fstype {fstype}), not \
                 squashfs: only plain squashfs images can run; rebuild it with \
                 `apptainer build`{}",
                fstype_name(*fstype),
                if *fstype == FS_ENCRYPTED_SQUASHFS {
                    " without --encrypt"
                } else {
                    ""
                }
            ),
            SifError::PartitionTooSmall { offset, size } => write!(
                f,
                "SIF primary partition at byte {offset} is {size} bytes, too small for \
                 a squashfs superblock ({SQUASHFS_SUPERBLOCK_LEN} bytes): corrupt image; \
                 {REBUILD}"
            ),
            SifError::SquashfsMagic { offset, found } => write!(
                f,
                "SIF primary partition at byte {offset} does not start with the squashfs \
                 magic \"hsqs\" (found \"{}\"): corrupt image; {REBUILD}",
                show(found)
            ),
            SifError::SquashfsVersion {
                offset,
                major,
                minor,
            } => write!(
                f,
                "squashfs at byte {offset} is version {major}.{minor}, not 4.x (the only \
                 one Linux mounts): corrupt or ancient image; {REBUILD}"
            ),
            SifError::SquashfsSize {
                bytes_used,
                partition_size,
            } => write!(
                f,
                "squashfs says it uses {bytes_used} bytes but its partition is \
                 {partition_size} bytes (and a superblock alone is \
                 {SQUASHFS_SUPERBLOCK_LEN}): corrupt image; {REBUILD}"
            ),
        }
    }
}

impl std::error::Error for SifError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SifError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// sif.go `FSType` names, for the message that refuses a non-squashfs root.
fn fstype_name(fstype: i32) -> &'static str {
    match fstype {
        1 => "squashfs",
        2 => "ext3",
        3 => "an immutable object archive",
        4 => "raw data",
        5 => "encrypted squashfs",
        _ => "an unknown file system",
    }
}

/// Bytes from the file, shown safely on one line: trailing NULs dropped,
/// anything not printable ASCII escaped (so a message never spans lines).
fn show(bytes: &[u8]) -> String {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    bytes
        .get(..end)
        .unwrap_or_default()
        .escape_ascii()
        .to_string()
}

/// arch.go: the two-digit header codes, and the Go names Apptainer prints.
fn arch_name(code: &[u8]) -> String {
    let name = match code {
        b"00\0" => "unknown",
        b"01\0" => "386",
        b"02\0" => "amd64",
        b"03\0" => "arm",
        b"04\0" => "arm64",
        b"05\0" => "ppc64",
        b"06\0" => "ppc64le",
        b"07\0" => "mips",
        b"08\0" => "mipsle",
        b"09\0" => "mips64",
        b"10\0" => "mips64le",
        b"11\0" => "s390x",
        other => return format!("unknown ({})", show(other)),
    };
    name.to_string()
}

// Little-endian field readers. Offsets are this module's constants into
// fixed-size buffers, never values from the file, so the slicing cannot fail
// on any input.
fn le_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_le_bytes(a)
}

fn le_i32(b: &[u8], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn read_at<R: Read + Seek>(r: &mut R, offset: u64, buf: &mut [u8]) -> Result<(), SifError> {
    r.seek(SeekFrom::Start(offset))
        .and_then(|_| r.read_exact(buf))
        .map_err(|source| SifError::Io { offset, source })
}

/// The primary partition as found in the table, before its superblock is read.
struct Primary {
    id: u32,
    fstype: i32,
    offset: u64,
    size: u64,
}

/// Checks the structure of the SIF image `r`, whose length is `file_len`
/// (the catalog's size check is the caller's: pass the length on disk).
///
/// Reads the header, the descriptor table and the primary partition's
/// squashfs superblock, nothing else; never panics and allocates nothing
/// that depends on the input.
pub fn inspect<R: Read + Seek>(r: &mut R, file_len: u64) -> Result<SifSummary, SifError> {
    if file_len < HEADER_LEN {
        return Err(SifError::TooShort { file_len });
    }
    let mut h = [0u8; HEADER_LEN as usize];
    read_at(r, 0, &mut h)?;

    let mut magic = [0u8; 10];
    magic.copy_from_slice(&h[MAGIC_AT..MAGIC_AT + 10]);
    if &magic != MAGIC {
        return Err(SifError::BadMagic { found: magic });
    }
    let mut version = [0u8; 3];
    version.copy_from_slice(&h[VERSION_AT..VERSION_AT + 3]);
    if &version != VERSION_01 {
        return Err(SifError::UnsupportedVersion { found: version });
    }

    let dtotal = le_i64(&h, DTOTAL_AT);
    let dfree = le_i64(&h, DFREE_AT);
    let descroff = le_i64(&h, DESCROFF_AT);
    let descrlen = le_i64(&h, DESCRLEN_AT);
    let dataoff = le_i64(&h, DATAOFF_AT);
    let datalen = le_i64(&h, DATALEN_AT);

    let count = match u64::try_from(dtotal) {
        Ok(n) if n <= MAX_DESCRIPTORS => n,
        _ => return Err(SifError::DescriptorCount { dtotal }),
    };
    if dfree < 0 || dfree > dtotal {
        return Err(SifError::FreeCount { dfree, dtotal });
    }
    // create.go writes the whole table, used or not, and sets the length to
    // dtotal records; any other length means the header was damaged.
    let expected = count * DESCRIPTOR_LEN; // <= 4096 * 585: no overflow
    if u64::try_from(descrlen) != Ok(expected) {
        return Err(SifError::DescriptorTableLength {
            descrlen,
            dtotal,
            expected,
        });
    }
    let table_outside = SifError::DescriptorTableOutside {
        descroff,
        descrlen,
        file_len,
    };
    let table_start = match u64::try_from(descroff) {
        Ok(off) if off >= HEADER_LEN => off,
        _ => return Err(table_outside),
    };
    let table_end = match table_start.checked_add(expected) {
        Some(end) if end <= file_len => end,
        _ => return Err(table_outside),
    };

    // create.go puts the data right after the table (or, before Apptainer,
    // at 32 KiB); it never precedes it.
    let data_section = SifError::DataSection {
        dataoff,
        datalen,
        table_end,
    };
    let (data_start, data_end) = match (u64::try_from(dataoff), u64::try_from(datalen)) {
        (Ok(off), Ok(len)) if off >= table_end => match off.checked_add(len) {
            Some(end) => (off, end),
            None => return Err(data_section),
        },
        _ => return Err(data_section),
    };
    if data_end > file_len {
        return Err(SifError::Truncated {
            needed: data_end,
            file_len,
        });
    }

    let mut used: u64 = 0;
    let mut primary: Option<Primary> = None;
    let mut buf = [0u8; DESCRIPTORS_PER_READ * DESCRIPTOR_LEN as usize];
    let mut index: u64 = 0;
    while index < count {
        // count - index is at most 4096: the cast cannot truncate.
        let n = usize::try_from(count - index)
            .unwrap_or(DESCRIPTORS_PER_READ)
            .min(DESCRIPTORS_PER_READ);
        let chunk = &mut buf[..n * DESCRIPTOR_LEN as usize];
        read_at(r, table_start + index * DESCRIPTOR_LEN, chunk)?;
        for d in chunk.chunks_exact(DESCRIPTOR_LEN as usize) {
            // Go's encoding/binary reads any non-zero byte as true.
            if d[D_USED] != 0 {
                used += 1;
                check_descriptor(d, index, data_start, file_len, &mut primary)?;
            }
            index += 1;
        }
    }

    // dfree <= dtotal was checked above: no underflow.
    if used != count - dfree.unsigned_abs() {
        return Err(SifError::UsedCount {
            used,
            dtotal,
            dfree,
        });
    }
    // used <= 4096.
    let descriptors_used = usize::try_from(used).unwrap_or(usize::MAX);

    let Some(p) = primary else {
        return Err(SifError::NoPrimaryPartition { descriptors_used });
    };
    if p.fstype != FS_SQUASHFS {
        return Err(SifError::PrimaryNotSquashfs {
            id: p.id,
            fstype: p.fstype,
        });
    }
    if p.size < SQUASHFS_SUPERBLOCK_LEN {
        return Err(SifError::PartitionTooSmall {
            offset: p.offset,
            size: p.size,
        });
    }
    let mut sb = [0u8; SQUASHFS_SUPERBLOCK_LEN as usize];
    read_at(r, p.offset, &mut sb)?;
    // Magic, version 4 and size: squashfs::check, shared with plain
    // squashfs images (integrity.rs).
    let bytes_used = squashfs::check(&sb, p.size).map_err(|e| match e {
        SuperblockError::Magic { found } => SifError::SquashfsMagic {
            offset: p.offset,
            found,
        },
        SuperblockError::Version { major, minor } => SifError::SquashfsVersion {
            offset: p.offset,
            major,
            minor,
        },
        SuperblockError::Size { bytes_used, len } => SifError::SquashfsSize {
            bytes_used,
            partition_size: len,
        },
    })?;

    Ok(SifSummary {
        version: show(&version),
        arch: arch_name(&h[ARCH_AT..ARCH_AT + 3]),
        file_len,
        descriptors_used,
        primary: PartitionInfo {
            offset: p.offset,
            size: p.size,
            squashfs_bytes_used: bytes_used,
        },
    })
}

/// Checks one used descriptor `d` (one `DESCRIPTOR_LEN` record): its object
/// lies in the data section and inside the file; a primary system partition
/// is remembered in `primary`.
fn check_descriptor(
    d: &[u8],
    index: u64,
    data_start: u64,
    file_len: u64,
    primary: &mut Option<Primary>,
) -> Result<(), SifError> {
    let id = le_u32(d, D_ID);
    let offset = le_i64(d, D_OFFSET);
    let size = le_i64(d, D_SIZE);
    let outside = SifError::DescriptorOutside {
        index,
        id,
        offset,
        size,
        dataoff: data_start,
    };
    let (start, len) = match (u64::try_from(offset), u64::try_from(size)) {
        (Ok(o), Ok(s)) if o >= data_start => (o, s),
        _ => return Err(outside),
    };
    let Some(end) = start.checked_add(len) else {
        return Err(outside);
    };
    if end > file_len {
        return Err(SifError::Truncated {
            needed: end,
            file_len,
        });
    }
    if le_i32(d, D_DATATYPE) == DATA_PARTITION && le_i32(d, P_PARTTYPE) == PART_PRIMARY_SYSTEM {
        if let Some(first) = primary {
            return Err(SifError::MultiplePrimaryPartitions {
                first_id: first.id,
                second_id: id,
            });
        }
        *primary = Some(Primary {
            id,
            fstype: le_i32(d, P_FSTYPE),
            offset: start,
            size: len,
        });
    }
    Ok(())
}

/// Descriptors in [`example_header`]'s table: Apptainer's default
/// (sif.go `DescrNumEntries`).
const EXAMPLE_DTOTAL: u64 = 48;
/// Where [`example_header`] puts the partition: the first 4 KiB boundary
/// after a 48-entry table at 4096, as Apptainer aligns partitions.
const EXAMPLE_PART_AT: u64 = 32768;

/// The first bytes of a sound SIF image of `file_len` bytes, for tests,
/// benchmarks and fuzz seeds: write them at offset 0 and extend the file to
/// `file_len` (a sparse file will do). The image holds one object, a primary
/// squashfs partition at byte 32768 that runs to the end of the file and
/// whose superblock says it is full; everything after the superblock may be
/// zeros, since [`inspect`] reads no further.
///
/// The returned bytes end with that superblock (32,864 bytes); with a
/// `file_len` under that, the image is refused as too small.
pub fn example_header(file_len: u64) -> Vec<u8> {
    let part_len = file_len.saturating_sub(EXAMPLE_PART_AT);
    let table_len = EXAMPLE_DTOTAL * DESCRIPTOR_LEN;
    let dataoff = 4096 + table_len;
    let mut v = vec![0u8; (EXAMPLE_PART_AT + SQUASHFS_SUPERBLOCK_LEN) as usize];
    let mut put = |at: usize, bytes: &[u8]| v[at..at + bytes.len()].copy_from_slice(bytes);
    // To i64 as the format stores them; lengths over i64::MAX saturate (and
    // such an image is refused, as it should be).
    let i64le = |n: u64| i64::try_from(n).unwrap_or(i64::MAX).to_le_bytes();

    put(0, b"#!/usr/bin/env run-singularity\n");
    put(MAGIC_AT, MAGIC);
    put(VERSION_AT, VERSION_01);
    put(ARCH_AT, b"02\0");
    put(DFREE_AT, &i64le(EXAMPLE_DTOTAL - 1));
    put(DTOTAL_AT, &i64le(EXAMPLE_DTOTAL));
    put(DESCROFF_AT, &i64le(4096));
    put(DESCRLEN_AT, &i64le(table_len));
    put(DATAOFF_AT, &i64le(dataoff));
    put(DATALEN_AT, &i64le(file_len.saturating_sub(dataoff)));

    let d = 4096;
    put(d + D_DATATYPE, &DATA_PARTITION.to_le_bytes());
    put(d + D_USED, &[1]);
    put(d + D_ID, &1u32.to_le_bytes());
    // Object group 1 (sif.go `DescrDefaultGroup`), no link.
    put(d + D_ID + 4, &0xf000_0001u32.to_le_bytes());
    put(d + D_OFFSET, &i64le(EXAMPLE_PART_AT));
    put(d + D_SIZE, &i64le(part_len));
    put(d + D_SIZE + 8, &i64le(file_len.saturating_sub(dataoff)));
    put(d + P_FSTYPE, &FS_SQUASHFS.to_le_bytes());
    put(d + P_PARTTYPE, &PART_PRIMARY_SYSTEM.to_le_bytes());
    put(d + P_PARTTYPE + 4, b"02\0");

    put(EXAMPLE_PART_AT as usize, &squashfs::example(part_len));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// One data object for the test builder.
    struct Obj {
        datatype: i32,
        /// (fstype, parttype) for partitions.
        part: Option<(i32, i32)>,
        data: Vec<u8>,
        /// Alignment of the object's offset, as create.go aligns partitions
        /// to 4 KiB.
        align: u64,
    }

    const DATA_DEFFILE: i32 = 0x4001;
    const DATA_GENERIC_JSON: i32 = 0x4006;
    const TEST_DTOTAL: u64 = 8;
    const DESCROFF: u64 = 4096;
    const DATAOFF: u64 = DESCROFF + TEST_DTOTAL * DESCRIPTOR_LEN;

    /// A squashfs 4.0 superblock claiming `bytes_used`, padded to `len`.
    fn squashfs(bytes_used: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[..4].copy_from_slice(b"hsqs");
        v[12..16].copy_from_slice(&131072u32.to_le_bytes()); // block size
        v[28..30].copy_from_slice(&4u16.to_le_bytes());
        v[40..48].copy_from_slice(&bytes_used.to_le_bytes());
        v
    }

    fn primary(data: Vec<u8>) -> Obj {
        Obj {
            datatype: DATA_PARTITION,
            part: Some((FS_SQUASHFS, PART_PRIMARY_SYSTEM)),
            data,
            align: 4096,
        }
    }

    fn small(datatype: i32, data: &[u8]) -> Obj {
        Obj {
            datatype,
            part: None,
            data: data.to_vec(),
            align: 1,
        }
    }

    /// Lays out an image as Apptainer 1.4 does (header, table of
    /// TEST_DTOTAL descriptors at 4096, data right after the table, objects
    /// aligned), with the layout of /tmp/real.sif as the model.
    fn build(objs: &[Obj]) -> Vec<u8> {
        let mut img = vec![0u8; DATAOFF as usize];
        img[..32].copy_from_slice(b"#!/usr/bin/env run-singularity\n\0");
        img[32..42].copy_from_slice(MAGIC);
        img[42..45].copy_from_slice(VERSION_01);
        img[45..48].copy_from_slice(b"02\0");
        img[48..64].copy_from_slice(&[0x5a; 16]);
        for (i, o) in objs.iter().enumerate() {
            let start = img.len().next_multiple_of(o.align as usize);
            img.resize(start, 0);
            img.extend_from_slice(&o.data);
            let d = (DESCROFF as usize) + i * DESCRIPTOR_LEN as usize;
            img[d..d + 4].copy_from_slice(&o.datatype.to_le_bytes());
            img[d + 4] = 1;
            img[d + 5..d + 9].copy_from_slice(&(i as u32 + 1).to_le_bytes());
            img[d + 9..d + 13].copy_from_slice(&0xf000_0001u32.to_le_bytes());
            img[d + 17..d + 25].copy_from_slice(&(start as i64).to_le_bytes());
            img[d + 25..d + 33].copy_from_slice(&(o.data.len() as i64).to_le_bytes());
            img[d + 33..d + 41].copy_from_slice(&(o.data.len() as i64).to_le_bytes());
            if let Some((fs, pt)) = o.part {
                img[d + 201..d + 205].copy_from_slice(&fs.to_le_bytes());
                img[d + 205..d + 209].copy_from_slice(&pt.to_le_bytes());
                img[d + 209..d + 212].copy_from_slice(b"02\0");
            }
        }
        let datalen = img.len() as u64 - DATAOFF;
        set_i64(&mut img, DFREE_AT, (TEST_DTOTAL - objs.len() as u64) as i64);
        set_i64(&mut img, DTOTAL_AT, TEST_DTOTAL as i64);
        set_i64(&mut img, DESCROFF_AT, DESCROFF as i64);
        set_i64(&mut img, DESCRLEN_AT, (TEST_DTOTAL * DESCRIPTOR_LEN) as i64);
        set_i64(&mut img, DATAOFF_AT, DATAOFF as i64);
        set_i64(&mut img, DATALEN_AT, datalen as i64);
        img
    }

    /// Byte offset of a field of descriptor `i` in a built image.
    fn desc(i: usize, field: usize) -> usize {
        DESCROFF as usize + i * DESCRIPTOR_LEN as usize + field
    }

    /// The image most tests mutate: a definition file, a JSON object and a
    /// 8 KiB primary squashfs partition using 5000 bytes, the partition last
    /// (descriptor 2) and ending the file.
    fn valid() -> Vec<u8> {
        build(&[
            small(DATA_DEFFILE, b"bootstrap: docker\nfrom: busybox\n"),
            small(DATA_GENERIC_JSON, b"{\"labels\":{}}"),
            primary(squashfs(5000, 8192)),
        ])
    }
    const PART: usize = 2;

    fn set_i64(img: &mut [u8], at: usize, v: i64) {
        img[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    fn set_i32(img: &mut [u8], at: usize, v: i32) {
        img[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn check(img: &[u8]) -> Result<SifSummary, SifError> {
        inspect(&mut Cursor::new(img), img.len() as u64)
    }

    fn err(img: &[u8]) -> SifError {
        match check(img) {
            Ok(s) => panic!("accepted a bad image: {s:?}"),
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.contains('\n'), "multi-line message: {msg}");
                e
            }
        }
    }

    fn part_offset(img: &[u8]) -> usize {
        le_i64(img, desc(PART, D_OFFSET)) as usize
    }

    #[test]
    fn valid_image_passes() {
        let img = valid();
        let s = check(&img).unwrap();
        assert_eq!(s.version, "01");
        assert_eq!(s.arch, "amd64");
        assert_eq!(s.file_len, img.len() as u64);
        assert_eq!(s.descriptors_used, 3);
        assert_eq!(s.primary.offset % 4096, 0);
        assert_eq!(s.primary.offset + s.primary.size, img.len() as u64);
        assert_eq!(s.primary.size, 8192);
        assert_eq!(s.primary.squashfs_bytes_used, 5000);
    }

    #[test]
    fn partition_only_image_and_full_table_pass() {
        // Only the primary partition, and a table with no free entry.
        let mut objs: Vec<Obj> = (0..7).map(|_| small(DATA_GENERIC_JSON, b"{}")).collect();
        objs.push(primary(squashfs(4096, 4096)));
        let s = check(&build(&objs)).unwrap();
        assert_eq!(s.descriptors_used, 8);
        let s = check(&build(&[primary(squashfs(96, 96))])).unwrap();
        assert_eq!(s.primary.size, 96);
        // Squashfs may fill its partition exactly.
        check(&build(&[primary(squashfs(8192, 8192))])).unwrap();
    }

    #[test]
    fn file_larger_than_data_section_passes() {
        // Trailing bytes after the data section do not make it unsound.
        let mut img = valid();
        img.extend_from_slice(&[0u8; 100]);
        check(&img).unwrap();
    }

    #[test]
    fn shorter_than_header() {
        let img = valid();
        for len in [0, 1, 64, 127] {
            assert!(matches!(
                err(&img[..len]),
                SifError::TooShort { file_len } if file_len == len as u64
            ));
        }
    }

    #[test]
    fn bad_magic() {
        let mut img = valid();
        img[32..42].copy_from_slice(b"SIF_MAGIK\0");
        assert!(matches!(err(&img), SifError::BadMagic { found } if &found == b"SIF_MAGIK\0"));
        // A squashfs or a tarball is not a SIF.
        let mut img = squashfs(4096, 4096);
        img.resize(200, 0);
        assert!(matches!(err(&img), SifError::BadMagic { .. }));
    }

    #[test]
    fn unsupported_version() {
        for v in [b"02\0", b"00\0", b"01x", b"1\0\0"] {
            let mut img = valid();
            img[42..45].copy_from_slice(v);
            assert!(matches!(err(&img), SifError::UnsupportedVersion { found } if &found == v));
        }
    }

    #[test]
    fn absurd_descriptor_count() {
        for dtotal in [-1, i64::MIN, MAX_DESCRIPTORS as i64 + 1, i64::MAX] {
            let mut img = valid();
            set_i64(&mut img, DTOTAL_AT, dtotal);
            assert!(matches!(err(&img), SifError::DescriptorCount { dtotal: d } if d == dtotal));
        }
    }

    #[test]
    fn free_count_out_of_range() {
        for dfree in [-1, TEST_DTOTAL as i64 + 1] {
            let mut img = valid();
            set_i64(&mut img, DFREE_AT, dfree);
            assert!(matches!(err(&img), SifError::FreeCount { dfree: f, .. } if f == dfree));
        }
    }

    #[test]
    fn descriptor_table_length_mismatch() {
        for descrlen in [0, 585 * 7, 585 * 8 + 1, -585, i64::MAX] {
            let mut img = valid();
            set_i64(&mut img, DESCRLEN_AT, descrlen);
            assert!(matches!(
                err(&img),
                SifError::DescriptorTableLength { descrlen: l, expected: 4680, .. } if l == descrlen
            ));
        }
    }

    #[test]
    fn descriptor_table_outside_file() {
        let len = valid().len() as i64;
        // Overlapping the header, negative, past the end, overflowing.
        for descroff in [0, 127, -4096, len - 100, i64::MAX - 10] {
            let mut img = valid();
            set_i64(&mut img, DESCROFF_AT, descroff);
            assert!(matches!(
                err(&img),
                SifError::DescriptorTableOutside { descroff: o, .. } if o == descroff
            ));
        }
    }

    #[test]
    fn data_section_inconsistent() {
        let table_end = (DESCROFF + TEST_DTOTAL * DESCRIPTOR_LEN) as i64;
        // Data starting inside the table, negative offset or length, overflow.
        for (dataoff, datalen) in [
            (table_end - 1, 10),
            (-1, 10),
            (table_end, -1),
            (table_end, i64::MAX),
        ] {
            let mut img = valid();
            set_i64(&mut img, DATAOFF_AT, dataoff);
            set_i64(&mut img, DATALEN_AT, datalen);
            let e = err(&img);
            let data_section = matches!(e, SifError::DataSection { .. });
            // dataoff + i64::MAX fits in a u64: too long for the file instead.
            let truncated = datalen == i64::MAX && matches!(e, SifError::Truncated { .. });
            assert!(data_section || truncated, "{dataoff} {datalen}: {e}");
        }
    }

    #[test]
    fn data_section_past_end_is_truncation() {
        let mut img = valid();
        let len = img.len() as u64;
        set_i64(&mut img, DATALEN_AT, (len - DATAOFF + 1) as i64);
        assert!(matches!(
            err(&img),
            SifError::Truncated { needed, file_len } if needed == len + 1 && file_len == len
        ));
    }

    #[test]
    fn descriptor_outside_data_section() {
        let len = valid().len() as i64;
        // Negative, inside the table, inside the header, negative size,
        // offset + size overflowing.
        for (offset, size) in [
            (-1, 10),
            (DATAOFF as i64 - 1, 10),
            (0, 128),
            (DATAOFF as i64, -1),
            (len, i64::MAX),
        ] {
            let mut img = valid();
            set_i64(&mut img, desc(0, D_OFFSET), offset);
            set_i64(&mut img, desc(0, D_SIZE), size);
            let e = err(&img);
            let outside = matches!(
                e,
                SifError::DescriptorOutside { index: 0, id: 1, offset: o, size: s, .. }
                    if o == offset && s == size
            );
            // len + i64::MAX does not overflow a u64: past the end instead.
            let truncated = size == i64::MAX && matches!(e, SifError::Truncated { .. });
            assert!(outside || truncated, "{offset} {size}: {e}");
        }
        // The largest offset and size: their sum still fits a u64 (the
        // checked add is for safety), and is far past the end.
        let mut img = valid();
        set_i64(&mut img, desc(1, D_OFFSET), i64::MAX);
        set_i64(&mut img, desc(1, D_SIZE), i64::MAX);
        assert!(matches!(
            err(&img),
            SifError::Truncated { needed, .. } if needed == 2 * (i64::MAX as u64)
        ));
    }

    #[test]
    fn descriptor_past_end_is_truncation() {
        let mut img = valid();
        let len = img.len() as u64;
        set_i64(&mut img, desc(PART, D_SIZE), 8193);
        assert!(matches!(
            err(&img),
            SifError::Truncated { needed, file_len } if needed == len + 1 && file_len == len
        ));
    }

    #[test]
    fn unused_descriptors_are_not_checked() {
        // A free entry's fields mean nothing (delete.go zeroes them, but an
        // old tool may not have): only the used flag is read.
        let mut img = valid();
        let d = desc(5, 0);
        img[d..d + DESCRIPTOR_LEN as usize].fill(0xff);
        img[desc(5, D_USED)] = 0;
        check(&img).unwrap();
    }

    #[test]
    fn used_count_disagrees_with_header() {
        let mut img = valid();
        set_i64(&mut img, DFREE_AT, 4);
        assert!(matches!(
            err(&img),
            SifError::UsedCount {
                used: 3,
                dtotal: 8,
                dfree: 4
            }
        ));
        // A descriptor marked used with any non-zero byte counts as used,
        // as in Go.
        let mut img = valid();
        img[desc(4, D_USED)] = 7;
        set_i64(&mut img, desc(4, D_OFFSET), DATAOFF as i64);
        assert!(matches!(err(&img), SifError::UsedCount { used: 4, .. }));
    }

    #[test]
    fn no_primary_partition() {
        // A system partition that is not the primary one does not count.
        let mut img = valid();
        set_i32(&mut img, desc(PART, P_PARTTYPE), 1);
        assert!(matches!(
            err(&img),
            SifError::NoPrimaryPartition {
                descriptors_used: 3
            }
        ));
        // Nor does an unused one.
        let mut img = valid();
        img[desc(PART, D_USED)] = 0;
        set_i64(&mut img, DFREE_AT, 6);
        assert!(matches!(err(&img), SifError::NoPrimaryPartition { .. }));
        // Nor primary-looking extra on another data type.
        let mut img = valid();
        set_i32(&mut img, desc(PART, D_DATATYPE), DATA_GENERIC_JSON);
        assert!(matches!(err(&img), SifError::NoPrimaryPartition { .. }));
        // An empty table.
        let img = build(&[]);
        assert!(matches!(
            err(&img),
            SifError::NoPrimaryPartition {
                descriptors_used: 0
            }
        ));
    }

    #[test]
    fn two_primary_partitions() {
        let img = build(&[primary(squashfs(4096, 4096)), primary(squashfs(4096, 4096))]);
        assert!(matches!(
            err(&img),
            SifError::MultiplePrimaryPartitions {
                first_id: 1,
                second_id: 2
            }
        ));
    }

    #[test]
    fn primary_not_squashfs() {
        for fstype in [2, 5, 0, -1] {
            let mut img = valid();
            set_i32(&mut img, desc(PART, P_FSTYPE), fstype);
            assert!(matches!(
                err(&img),
                SifError::PrimaryNotSquashfs { id: 3, fstype: f } if f == fstype
            ));
        }
    }

    #[test]
    fn partition_too_small_for_superblock() {
        let img = build(&[primary(squashfs(95, 95))]);
        assert!(matches!(
            err(&img),
            SifError::PartitionTooSmall { size: 95, .. }
        ));
        let mut img = valid();
        set_i64(&mut img, desc(PART, D_SIZE), 0);
        assert!(matches!(
            err(&img),
            SifError::PartitionTooSmall { size: 0, .. }
        ));
    }

    #[test]
    fn partition_without_squashfs_magic() {
        let mut img = valid();
        let at = part_offset(&img);
        img[at..at + 4].copy_from_slice(b"\x7fELF");
        match err(&img) {
            SifError::SquashfsMagic { offset, found } => {
                assert_eq!(offset, at as u64);
                assert_eq!(&found, b"\x7fELF");
            }
            e => panic!("{e}"),
        }
        // Pointing the partition elsewhere finds no magic either.
        let mut img = valid();
        set_i64(&mut img, desc(PART, D_OFFSET), DATAOFF as i64);
        set_i64(&mut img, desc(PART, D_SIZE), 200);
        assert!(matches!(err(&img), SifError::SquashfsMagic { .. }));
    }

    #[test]
    fn squashfs_version_not_4() {
        let mut img = valid();
        let at = part_offset(&img);
        img[at + squashfs::MAJOR_AT..at + squashfs::MAJOR_AT + 2]
            .copy_from_slice(&3u16.to_le_bytes());
        img[at + 30..at + 32].copy_from_slice(&1u16.to_le_bytes());
        assert!(matches!(
            err(&img),
            SifError::SquashfsVersion {
                major: 3,
                minor: 1,
                ..
            }
        ));
    }

    #[test]
    fn squashfs_larger_than_partition() {
        for bytes_used in [8193, u64::MAX, 95, 0] {
            let mut img = valid();
            let at = part_offset(&img);
            img[at + squashfs::BYTES_USED_AT..at + squashfs::BYTES_USED_AT + 8]
                .copy_from_slice(&bytes_used.to_le_bytes());
            assert!(matches!(
                err(&img),
                SifError::SquashfsSize { bytes_used: b, partition_size: 8192 } if b == bytes_used
            ));
        }
    }

    #[test]
    fn length_given_larger_than_data_is_an_io_error() {
        // The caller's length is wrong (file shrank while being read): the
        // reads hit end of file, which is reported, not a panic.
        let img = valid();
        let part = part_offset(&img);
        let short = &img[..part + 50];
        let e = inspect(&mut Cursor::new(short), img.len() as u64).unwrap_err();
        match e {
            SifError::Io { offset, source } => {
                assert_eq!(offset, part as u64);
                assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
            }
            e => panic!("{e}"),
        }
        let e = inspect(&mut Cursor::new(&img[..100]), img.len() as u64).unwrap_err();
        assert!(matches!(e, SifError::Io { offset: 0, .. }));
    }

    #[test]
    fn truncation_anywhere_is_refused() {
        let img = valid();
        let mut points: Vec<usize> = (0..img.len()).step_by(97).collect();
        // Every field boundary of interest, and one byte either side.
        for p in [
            HEADER_LEN as usize,
            DESCROFF as usize,
            DATAOFF as usize,
            part_offset(&img),
            part_offset(&img) + 96,
            img.len(),
        ] {
            points.extend([p.saturating_sub(1), p, p + 1]);
        }
        for len in points.into_iter().filter(|&l| l < img.len()) {
            assert!(check(&img[..len]).is_err(), "accepted a {len}-byte prefix");
        }
    }

    /// xorshift64*: deterministic, dependency-free.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_header_and_table_damage_never_panics() {
        let img = valid();
        let part = part_offset(&img);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut refused = 0;
        for round in 0..20_000 {
            let mut m = img.clone();
            for _ in 0..1 + rng.below(8) {
                // Mostly the header and table, sometimes the superblock.
                let at = if round % 5 == 0 {
                    part + rng.below(96)
                } else {
                    rng.below(DATAOFF as usize)
                };
                m[at] ^= 1 << rng.below(8);
            }
            // Whole random header fields too: the int64 counts and offsets.
            if round % 3 == 0 {
                let field = 64 + 8 * rng.below(8);
                set_i64(&mut m, field, rng.next() as i64);
            }
            match check(&m) {
                Ok(s) => assert!(s.primary.squashfs_bytes_used <= s.primary.size),
                Err(e) => {
                    refused += 1;
                    assert!(!e.to_string().contains('\n'));
                }
            }
        }
        // Most flips land in the all-zero name/extra fields and are harmless;
        // many must still be caught.
        assert!(refused > 1000, "only {refused} refused");
    }

    /// A read-only file of `len` bytes that holds `parts` and zeros elsewhere,
    /// and counts what is read: stands for a multi-gigabyte sparse image.
    struct Sparse {
        len: u64,
        pos: u64,
        parts: Vec<(u64, Vec<u8>)>,
        bytes_read: u64,
    }

    impl Read for Sparse {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = (self.len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
            let out = &mut buf[..n];
            out.fill(0);
            for (start, data) in &self.parts {
                let end = start + data.len() as u64;
                let lo = self.pos.max(*start);
                let hi = (self.pos + n as u64).min(end);
                if lo < hi {
                    out[(lo - self.pos) as usize..(hi - self.pos) as usize]
                        .copy_from_slice(&data[(lo - start) as usize..(hi - start) as usize]);
                }
            }
            self.pos += n as u64;
            self.bytes_read += n as u64;
            Ok(n)
        }
    }

    impl Seek for Sparse {
        fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
            match to {
                SeekFrom::Start(p) => self.pos = p,
                _ => unimplemented!(),
            }
            Ok(self.pos)
        }
    }

    #[test]
    fn five_gigabyte_image_reads_only_a_few_kib() {
        let len: u64 = 5 << 30;
        let mut f = Sparse {
            len,
            pos: 0,
            parts: vec![(0, example_header(len))],
            bytes_read: 0,
        };
        let s = inspect(&mut f, len).unwrap();
        assert_eq!(s.descriptors_used, 1);
        assert_eq!(s.primary.offset, EXAMPLE_PART_AT);
        assert_eq!(s.primary.size, len - EXAMPLE_PART_AT);
        assert_eq!(s.primary.squashfs_bytes_used, len - EXAMPLE_PART_AT);
        let table = EXAMPLE_DTOTAL * DESCRIPTOR_LEN;
        assert_eq!(f.bytes_read, HEADER_LEN + table + SQUASHFS_SUPERBLOCK_LEN);
    }

    #[test]
    fn example_header_sizes() {
        // Written over a file of the stated length (zeros after the bytes).
        let image = |len: u64| {
            let mut v = example_header(len);
            v.resize(len as usize, 0);
            v
        };
        for len in [32_864, 32_865, 1 << 20] {
            let s = check(&image(len)).unwrap();
            assert_eq!(s.file_len, len);
        }
        // Too small for the partition's superblock: refused, not a panic.
        for len in [0, 128, 32_768, 32_863] {
            let img = example_header(len);
            assert!(inspect(&mut Cursor::new(&img), len).is_err());
        }
        // Absurd lengths saturate and are refused.
        let img = example_header(u64::MAX);
        assert!(inspect(&mut Cursor::new(&img), u64::MAX).is_err());
    }

    #[test]
    fn largest_allowed_table_is_read_in_bounded_chunks() {
        // MAX_DESCRIPTORS entries, all free but one: accepted, and the read
        // goes through the fixed buffer.
        let mut img = valid();
        let table = (MAX_DESCRIPTORS * DESCRIPTOR_LEN) as usize;
        let part = part_offset(&img);
        let descs = img[DESCROFF as usize..DATAOFF as usize].to_vec();
        let sb = img[part..part + 8192].to_vec();
        img.truncate(DESCROFF as usize);
        img.extend_from_slice(&descs);
        img.resize(DESCROFF as usize + table, 0);
        let dataoff = img.len();
        img.resize(dataoff.next_multiple_of(4096), 0);
        let new_part = img.len();
        img.extend_from_slice(&sb);
        set_i64(&mut img, DTOTAL_AT, MAX_DESCRIPTORS as i64);
        set_i64(&mut img, DFREE_AT, MAX_DESCRIPTORS as i64 - 3);
        set_i64(&mut img, DESCRLEN_AT, table as i64);
        set_i64(&mut img, DATAOFF_AT, dataoff as i64);
        let datalen = (img.len() - dataoff) as i64;
        set_i64(&mut img, DATALEN_AT, datalen);
        // The two small objects now lie inside the (bigger) table: move them
        // to the data section.
        set_i64(&mut img, desc(0, D_OFFSET), dataoff as i64);
        set_i64(&mut img, desc(1, D_OFFSET), dataoff as i64);
        set_i64(&mut img, desc(PART, D_OFFSET), new_part as i64);
        let s = check(&img).unwrap();
        assert_eq!(s.descriptors_used, 3);
        assert_eq!(s.primary.offset, new_part as u64);
    }

    #[test]
    fn every_message_is_one_line() {
        let io = || io::Error::other("boom");
        let all = [
            SifError::Io {
                offset: 1,
                source: io(),
            },
            SifError::TooShort { file_len: 3 },
            SifError::BadMagic { found: [b'\n'; 10] },
            SifError::UnsupportedVersion { found: *b"\r\n\0" },
            SifError::DescriptorCount { dtotal: -1 },
            SifError::FreeCount {
                dfree: 9,
                dtotal: 8,
            },
            SifError::DescriptorTableLength {
                descrlen: 1,
                dtotal: 8,
                expected: 4680,
            },
            SifError::DescriptorTableOutside {
                descroff: 1,
                descrlen: 2,
                file_len: 3,
            },
            SifError::DataSection {
                dataoff: 1,
                datalen: 2,
                table_end: 3,
            },
            SifError::Truncated {
                needed: 2,
                file_len: 1,
            },
            SifError::DescriptorOutside {
                index: 1,
                id: 2,
                offset: 3,
                size: 4,
                dataoff: 5,
            },
            SifError::UsedCount {
                used: 1,
                dtotal: 2,
                dfree: 3,
            },
            SifError::NoPrimaryPartition {
                descriptors_used: 1,
            },
            SifError::MultiplePrimaryPartitions {
                first_id: 1,
                second_id: 2,
            },
            SifError::PrimaryNotSquashfs { id: 1, fstype: 5 },
            SifError::PartitionTooSmall { offset: 1, size: 2 },
            SifError::SquashfsMagic {
                offset: 1,
                found: *b"\n\n\n\n",
            },
            SifError::SquashfsVersion {
                offset: 1,
                major: 3,
                minor: 0,
            },
            SifError::SquashfsSize {
                bytes_used: 2,
                partition_size: 1,
            },
        ];
        for e in all {
            let msg = e.to_string();
            assert!(!msg.contains('\n') && !msg.contains('\r'), "{msg:?}");
            assert!(msg.len() > 30, "{msg:?}");
        }
        let e = SifError::Io {
            offset: 0,
            source: io(),
        };
        assert!(std::error::Error::source(&e).is_some());
    }

    /// An image built by Apptainer 1.4.5 (busybox), where one is around;
    /// not part of the repository.
    #[test]
    fn real_apptainer_image_if_present() {
        let path = std::path::Path::new("/tmp/real.sif");
        if !path.exists() {
            return;
        }
        let mut file = std::fs::File::open(path).unwrap();
        let len = file.metadata().unwrap().len();
        let s = inspect(&mut file, len).unwrap();
        assert_eq!(s.version, "01");
        assert_eq!(s.arch, "amd64");
        assert!(s.descriptors_used >= 1);
        assert!(s.primary.squashfs_bytes_used <= s.primary.size);
        assert!(s.primary.offset + s.primary.size <= s.file_len);
        // The same image cut short, as an interrupted copy leaves it.
        let bytes = std::fs::read(path).unwrap();
        for len in [bytes.len() - 1, bytes.len() / 2, 4096, 200] {
            assert!(check(&bytes[..len]).is_err(), "accepted {len} bytes");
        }
    }
}
