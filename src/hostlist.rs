//! Slurm hostlist expressions (`n[01-04,7],login1`), expanded exactly as
//! `scontrol show hostnames` of the Slurm release this crate is built for
//! does (`MASTER_ADDR` is the first host of the step's node list).
//!
//! The rules differ between releases, so they are a value, [`Rules`]: one
//! per supported release, and [`Rules::BUILD`] (the default of every free
//! function here) chosen at build time from the headers' version
//! (`build.rs`, `SLURM_INCLUDE_DIR`). The plugin, the CLI and the library of
//! one build therefore read node lists as the Slurm they are built for, and
//! every build's unit tests exercise every rule set.
//!
//! What every supported release does (its `src/common/hostlist.c`,
//! `_hostlist_create_bracketed`, `_push_range_list`, `_parse_single_range`;
//! every point below was also checked against `scontrol show hostnames` of
//! 22.05.8, 24.11.5 and 26.05.5, and `tests/hostlist_scontrol.rs` re-checks
//! them on every run):
//!
//! - Elements are separated by `,`, space or tab; a separator inside brackets
//!   does not split (`_next_tok`). Empty elements are skipped (`a,,b` is
//!   `a b`; `""` and `",,,"` are empty lists). Nothing is sorted and nothing
//!   is deduplicated: `a,b,a` is `a b a`, `n[1,1]` is `n1 n1`.
//! - A bracket holds comma-separated items, each `N` or `LO-HI`
//!   (`n[1,3,5-7]`). `LO > HI` is an error (`n[5-1]`), as is an empty item
//!   (`n[]`, `n[1,,2]`).
//! - Zero padding: every number of an item is printed with at least as many
//!   digits as the item's *first* number has characters, leading zeros
//!   included: `n[01-10]` is `n01..n10`, `n[1-010]` is `n1..n10`,
//!   `n[009-10]` is `n009 n010`, `n[09-10]` is `n09 n10`.
//! - An element may hold several bracket groups with text between them
//!   (`rack[1-2]-n[01-04]`).
//! - The cartesian product is NOT simply "leftmost varies slowest":
//!   `_push_range_list` peels the groups off from the right, looping over the
//!   last-but-one group outermost and recursing leftwards, and only then over
//!   the last group. So the last group varies fastest, then the first, the
//!   second, ..., and the last-but-one slowest. With two groups that looks
//!   like plain row order (`rack[1-2]-n[1-2]` is `rack1-n1 rack1-n2 rack2-n1
//!   rack2-n2`); with three, `a[1-2]b[3-4]c[5]` is `a1b3c5 a2b3c5 a1b4c5
//!   a2b4c5`. Text after the last bracket (where a release allows it) does
//!   not change this order.
//! - Limits: one `LO-HI` item may hold at most 65536 hosts (`MAX_RANGE`;
//!   `n[1-65537]` is invalid, so is `n[1-1000000000]`); a bracket group that
//!   is not the last of its element may hold at most 65536 hosts in all
//!   (`MAX_PREFIX_CNT`); a bracket may hold at most 262144 items
//!   (`MAX_RANGES`; Slurm calls `fatal()` beyond it).
//! - Adjacent hosts are merged into one internal range when their prefixes
//!   and paddings agree (`hostlist_push_range`, `_width_equiv`); for the
//!   names accepted here (no blanks, which its `strnatcmp` prefix comparison
//!   would skip) that merge never changes a printed name, so it is not
//!   modelled.
//!
//! Where the releases differ ([`Rules`]):
//!
//! | | 22.05 | 24.11 | 26.05 |
//! |---|---|---|---|
//! | text after the last `]` (`gpu[01-02]-ib`) | invalid | `gpu01-ib gpu02-ib` | as 24.11 |
//! | newline | a character of a name (refused here) | a separator | a separator |
//! | `{` | a character | a character | a hostlist function (refused here) |
//!
//! - Text after the last bracket: 22.05's `_hostlist_create_bracketed`
//!   jumps to its error exit when the character after the last group's `]`
//!   is neither `,` nor the end. From 23.11 on it keeps that text as a
//!   suffix (one-dimensional clusters, all of ours) and `_push_range_list`
//!   hands it to `hostlist_push_hr`, which prints each host as prefix,
//!   padded number, suffix and pushes it as a single host: `n[1-3]x` is
//!   `n1x n2x n3x`, `gpu[001-128]-ib0` is `gpu001-ib0 .. gpu128-ib0`,
//!   `a[1-2]b[3-4]c` follows the order above. A suffix is kept verbatim (it
//!   is never re-read as a number, so `n[1]99999999999999999999` is the one
//!   host `n199999999999999999999`).
//! - Newline: `hostlist_create_dims` passes the separators `"\t, "` to
//!   `_next_tok` in 22.05 and `"\t, \n"` from 23.02 on.
//! - `{`: from 25.05 on, `scontrol show hostnames` builds its list with
//!   `hostlist_create_client`, which sends any list containing `{` to
//!   slurmctld to expand hostlist functions (`feature{gpu}`, slurm.conf(5)).
//!   Only slurmctld knows their value; the node lists Slurm hands to a step
//!   are already expanded, so the 26.05 rules refuse `{` instead of guessing.
//! - Releases between the supported ones ([`Rules::for_version_number`]):
//!   before 23.11 the 22.05 rules (so 23.02 and 23.05 differ on newlines),
//!   23.11 to 24.11 the 24.11 rules, from 25.05 on the 26.05 rules; only
//!   22.05, 24.11 and 26.05 are tested.
//!
//! Conscious differences: where Slurm's answer is an accident of its C code
//! (strtoul quirks, a crash, a saturated number, a bracket silently turned
//! into part of a name), this module returns an error instead:
//!
//! - unbalanced or nested brackets: 22.05 turns `n[1-3` into the host `n]`
//!   (24.11 and 26.05 call it invalid, as we do); every release turns `a]`
//!   into `a]` and `a[[1-2]` into `a[1 a[2`, and 24.11 and 26.05 read
//!   `n[1-2]]` as `n1] n2]`;
//! - items that are not plain digits: Slurm's `strtoul` skips blanks and a
//!   sign and counts them in the padding (`n[1, 3]` is `n1 n03`, `n[+1]` is
//!   `n01`), ignores junk before the `-` (`n[1a-3]` is `n01 n02 n03`), and
//!   reads `n[1-]` as `n1`;
//! - an error in the third-from-last or an earlier bracket group of an
//!   element: `_push_range_list` recurses for those groups and combines the
//!   results with `rc = MAX(rc, rc1)`, so the -1 is lost; Slurm logs the
//!   error and drops the hosts concerned (`z,a[x]b[1]c[2],y` is `z y`,
//!   `a[1-40000,40001-65537]b[1]c[1]` stops after `a40000b1c1`). Errors in
//!   the last two groups do reject the list, in Slurm as here;
//! - numbers above 18446744073709551615: Slurm saturates them
//!   (`n99999999999999999999` becomes `n18446744073709551615`). Ranges
//!   ending at 18446744073709551615 itself are expanded normally here, where
//!   Slurm 22.05 segfaults on the last group's (`n[18446744073709551614-
//!   18446744073709551615]`: `hostrange_empty` takes `hi == ULONG_MAX` for
//!   "empty") and loops forever on an earlier group's (`j <= hi` never
//!   fails), as 24.11 and 26.05 do on a last group followed by a suffix
//!   (`hostlist_push_hr`'s `i <= hi`); `n[0-18446744073709551615]`, whose
//!   size wraps to 0 in Slurm (accepted, no hosts), is "too many hosts in a
//!   range" here;
//! - control characters other than the separators (Slurm copies them into
//!   names, and its prefix comparison ignores `\n\v\f\r`);
//! - host names longer than [`MAX_HOSTNAME_LEN`] bytes, input longer than
//!   [`MAX_INPUT_LEN`] bytes, lists of more than `u64::MAX` hosts (Slurm's
//!   count is a C `int`), and [`expand`] of more than [`MAX_HOSTS`] hosts.
//!
//! Everything is computed from the parsed structure: [`count`],
//! [`first_host`] and [`nth_host`] cost time linear in the length of the text
//! whatever the number of hosts (`n[1-65536][1-65536]` has 2^32 of them); only
//! [`expand`] allocates per host, and it refuses more than [`MAX_HOSTS`].
#![forbid(unsafe_code)]

use std::fmt;
use std::fmt::Write as _;

/// Lists longer than this many bytes are refused before any parsing.
pub const MAX_INPUT_LEN: usize = 1 << 20;
/// [`expand`] refuses lists with more hosts than this; it never allocates
/// for them. [`count`], [`first_host`] and [`nth_host`] have no such limit.
pub const MAX_HOSTS: u64 = 1_000_000;
/// Longest host name accepted (the longest DNS name is 253 bytes). Slurm has
/// no limit; this one bounds what [`expand`] can allocate.
pub const MAX_HOSTNAME_LEN: usize = 255;
/// Most hosts in one `LO-HI` item: Slurm's `MAX_RANGE` (hostlist.c).
pub const MAX_RANGE: u64 = 64 * 1024;
/// Most comma-separated items in one bracket: Slurm's `MAX_RANGES`
/// (hostlist.c; 22.05 calls `fatal()` past it).
pub const MAX_RANGES: usize = 256 * 1024;
/// Most hosts in a bracket group that is not the last of its element:
/// Slurm's `MAX_PREFIX_CNT` (hostlist.h, 64K in 22.05).
pub const MAX_PREFIX_CNT: u64 = 64 * 1024;

/// The Slurm release (major, minor) this crate is built for, as `build.rs`
/// read it from `slurm_version.h` (`SLURM_VERSION_NUMBER`, 0xMMmmpp).
const BUILD_VERSION_NUMBER: u32 = parse_decimal(env!("MLC_SLURM_VERSION_NUMBER"));

/// `s` as a decimal number, at compile time (a malformed value from
/// `build.rs` fails the build).
const fn parse_decimal(s: &str) -> u32 {
    let bytes = s.as_bytes();
    let mut value: u32 = 0;
    let mut i = 0;
    assert!(!bytes.is_empty(), "MLC_SLURM_VERSION_NUMBER is empty");
    while i < bytes.len() {
        assert!(
            bytes[i].is_ascii_digit(),
            "MLC_SLURM_VERSION_NUMBER is not decimal"
        );
        value = value * 10 + (bytes[i] - b'0') as u32;
        i += 1;
    }
    value
}

/// How one Slurm release reads hostlists (module doc: "Where the releases
/// differ"). Every entry point exists as a method here; the free functions
/// use [`Rules::BUILD`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rules {
    /// Slurm 22.05 (and older): nothing after the last bracket.
    V22_05,
    /// Slurm 24.11 (23.11 to 24.11): text after the last bracket, newline
    /// separates.
    V24_11,
    /// Slurm 26.05 (25.05 on): as 24.11, and `{` starts a hostlist function
    /// only slurmctld expands.
    V26_05,
}

impl Rules {
    /// Every rule set, oldest first.
    pub const ALL: [Rules; 3] = [Rules::V22_05, Rules::V24_11, Rules::V26_05];

    /// The rules of the Slurm this crate is built for.
    pub const BUILD: Rules = Rules::for_version_number(BUILD_VERSION_NUMBER);

    /// The rules for a `SLURM_VERSION_NUMBER` (0xMMmmpp): the supported
    /// release's own, and for releases in between those of the change that
    /// brought them (23.11: text after brackets; 25.05: hostlist functions).
    pub const fn for_version_number(version: u32) -> Rules {
        // Compare major.minor only.
        let release = version >> 8;
        if release < 0x170b {
            Rules::V22_05
        } else if release < 0x1905 {
            Rules::V24_11
        } else {
            Rules::V26_05
        }
    }

    /// The release whose `scontrol` these rules were checked against.
    pub fn release(self) -> &'static str {
        match self {
            Rules::V22_05 => "22.05",
            Rules::V24_11 => "24.11",
            Rules::V26_05 => "26.05",
        }
    }

    /// `_hostlist_create_bracketed` keeps text after the last `]` (23.11).
    fn allows_suffix(self) -> bool {
        !matches!(self, Rules::V22_05)
    }

    /// `hostlist_create_dims` separates on newlines too (23.02).
    fn newline_separates(self) -> bool {
        !matches!(self, Rules::V22_05)
    }

    /// `hostlist_create_client` sends lists with `{` to slurmctld (25.05).
    fn has_functions(self) -> bool {
        matches!(self, Rules::V26_05)
    }

    /// Parses and validates the whole list; an error anywhere rejects it
    /// all, as Slurm does.
    pub fn parse(self, list: &str) -> Result<Hostlist<'_>, HostlistError> {
        parse_list(list, self)
    }

    /// The first host of `list`; see [`first_host`].
    pub fn first_host(self, list: &str) -> Result<String, HostlistError> {
        self.parse(list)?.nth(0).ok_or(HostlistError::Empty)
    }

    /// Number of hosts in `list`; see [`count`].
    pub fn count(self, list: &str) -> Result<u64, HostlistError> {
        Ok(self.parse(list)?.count())
    }

    /// Host `n` (from 0) of `list`; see [`nth_host`].
    pub fn nth_host(self, list: &str, n: u64) -> Result<Option<String>, HostlistError> {
        Ok(self.parse(list)?.nth(n))
    }

    /// All hosts of `list`; see [`expand`].
    pub fn expand(self, list: &str) -> Result<Vec<String>, HostlistError> {
        let parsed = self.parse(list)?;
        let count = parsed.count();
        if count > MAX_HOSTS {
            return Err(HostlistError::TooManyHosts {
                count,
                max: MAX_HOSTS,
            });
        }
        // count <= MAX_HOSTS, so it fits in usize on any target we build for.
        let mut hosts = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
        hosts.extend(parsed.hosts());
        Ok(hosts)
    }
}

/// Why a hostlist was refused. Positions (`at`) are byte offsets into the
/// text given; `element` is the comma-separated element concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostlistError {
    /// The text is longer than [`MAX_INPUT_LEN`].
    TooLong { len: usize, max: usize },
    /// A control character (newline, NUL, DEL, ...); tab is a separator.
    ControlCharacter { at: usize, byte: u8 },
    /// A `[` with no `]` after it.
    UnclosedBracket { at: usize, element: String },
    /// A `]` with no `[` before it.
    UnopenedBracket { at: usize, element: String },
    /// A `[` inside brackets.
    NestedBracket { at: usize, element: String },
    /// Text after the last `]` of an element (`n[1-3]x`), under the
    /// 22.05 rules.
    TextAfterBracket {
        at: usize,
        element: String,
        suffix: String,
    },
    /// A `{` under the 26.05 rules: a hostlist function (`feature{gpu}`)
    /// that only slurmctld can expand.
    HostlistFunction { at: usize, element: String },
    /// An item that is not `N` or `LO-HI` in decimal digits (`n[a-b]`,
    /// `n[]`, `n[1,,2]`, `n[1-]`, `n[ 1]`).
    InvalidRange {
        at: usize,
        element: String,
        range: String,
    },
    /// `LO-HI` with `LO > HI` (`n[5-1]`).
    ReversedRange {
        at: usize,
        element: String,
        range: String,
        lo: u64,
        hi: u64,
    },
    /// A number above `u64::MAX`.
    NumberOverflow {
        at: usize,
        element: String,
        number: String,
    },
    /// One `LO-HI` item with more than [`MAX_RANGE`] hosts.
    RangeTooLarge {
        at: usize,
        element: String,
        range: String,
        hosts: u128,
        max: u64,
    },
    /// A bracket group other than an element's last with more than
    /// [`MAX_PREFIX_CNT`] hosts.
    GroupTooLarge {
        at: usize,
        element: String,
        hosts: u64,
        max: u64,
    },
    /// A bracket with more than [`MAX_RANGES`] items.
    TooManyRanges {
        at: usize,
        element: String,
        max: usize,
    },
    /// Host names of an element would be longer than [`MAX_HOSTNAME_LEN`].
    HostnameTooLong {
        at: usize,
        element: String,
        len: usize,
        max: usize,
    },
    /// The list describes more than `u64::MAX` hosts.
    CountOverflow { at: usize, element: String },
    /// [`expand`] of a list with more than [`MAX_HOSTS`] hosts.
    TooManyHosts { count: u64, max: u64 },
    /// [`first_host`] of a list without hosts (`""`, `",,"`).
    Empty,
}

/// At most 60 characters of `s`, for one-line messages.
fn short(s: &str) -> String {
    const KEEP: usize = 57;
    if s.chars().count() <= 60 {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(KEEP).collect();
    out.push_str("...");
    out
}

impl fmt::Display for HostlistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use HostlistError::*;
        match self {
            TooLong { len, max } => write!(
                f,
                "hostlist is {len} bytes, more than the {max}-byte limit: pass a compressed list such as \"n[1-512]\""
            ),
            ControlCharacter { at, byte } => write!(
                f,
                "hostlist has control character 0x{byte:02x} at byte {at}: remove it (separate hosts with commas)"
            ),
            UnclosedBracket { at, element } => write!(
                f,
                "'[' at byte {at} in hostlist element \"{}\" is never closed: add the matching ']', e.g. \"n[1-4]\"",
                short(element)
            ),
            UnopenedBracket { at, element } => write!(
                f,
                "']' at byte {at} in hostlist element \"{}\" closes no '[': remove it or add the '[', e.g. \"n[1-4]\"",
                short(element)
            ),
            NestedBracket { at, element } => write!(
                f,
                "'[' at byte {at} in hostlist element \"{}\" is inside brackets: brackets do not nest, close one group before the next, e.g. \"rack[1-2]-n[1-4]\"",
                short(element)
            ),
            TextAfterBracket { at, element, suffix } => write!(
                f,
                "text \"{}\" at byte {at} follows the last ']' of hostlist element \"{}\": Slurm 22.05 allows nothing after the last bracket group (23.11 and later do), list such hosts one by one, e.g. \"n1x,n2x\"",
                short(suffix),
                short(element)
            ),
            HostlistFunction { at, element } => write!(
                f,
                "'{{' at byte {at} in hostlist element \"{}\" starts a hostlist function, which only slurmctld expands: expand the list first with \"scontrol show hostnames LIST\"",
                short(element)
            ),
            InvalidRange { at, element, range } if range.is_empty() => write!(
                f,
                "empty range at byte {at} in hostlist element \"{}\": put a number or LO-HI between the brackets and commas, e.g. \"n[1-4,7]\"",
                short(element)
            ),
            InvalidRange { at, element, range } => write!(
                f,
                "invalid range \"{}\" at byte {at} in hostlist element \"{}\": write N or LO-HI in decimal digits, no spaces or signs, e.g. \"n[1-4,7]\"",
                short(range),
                short(element)
            ),
            ReversedRange {
                at,
                element,
                range,
                lo,
                hi,
            } => write!(
                f,
                "range \"{}\" at byte {at} in hostlist element \"{}\" runs backwards: put the lower number first, \"{hi}-{lo}\"",
                short(range),
                short(element)
            ),
            NumberOverflow { at, element, number } => write!(
                f,
                "number {} at byte {at} in hostlist element \"{}\" is too large: numbers must be at most {}",
                short(number),
                short(element),
                u64::MAX
            ),
            RangeTooLarge {
                at,
                element,
                range,
                hosts,
                max,
            } => write!(
                f,
                "range \"{}\" at byte {at} in hostlist element \"{}\" has {hosts} hosts, more than Slurm's {max} per range: split it into several ranges, e.g. \"n[1-65536,65537-131072]\"",
                short(range),
                short(element)
            ),
            GroupTooLarge {
                at,
                element,
                hosts,
                max,
            } => write!(
                f,
                "bracket group at byte {at} in hostlist element \"{}\" has {hosts} hosts, more than Slurm's {max} for a group that is not the element's last: make the large group the last one",
                short(element)
            ),
            TooManyRanges { at, element, max } => write!(
                f,
                "bracket at byte {at} in hostlist element \"{}\" has more than Slurm's {max} items: merge consecutive numbers into LO-HI ranges",
                short(element)
            ),
            HostnameTooLong {
                at,
                element,
                len,
                max,
            } => write!(
                f,
                "hostlist element \"{}\" at byte {at} makes host names of {len} bytes, more than {max}: shorten the names or their zero padding",
                short(element)
            ),
            CountOverflow { at, element } => write!(
                f,
                "hostlist has more than {} hosts (element \"{}\" at byte {at}): use fewer or smaller bracket groups",
                u64::MAX,
                short(element)
            ),
            TooManyHosts { count, max } => write!(
                f,
                "hostlist has {count} hosts, more than the {max} that are expanded at once: split the list, or ask for its count or a single host"
            ),
            Empty => write!(
                f,
                "hostlist has no hosts: give at least one host name, e.g. \"n1\""
            ),
        }
    }
}

impl std::error::Error for HostlistError {}

/// One `LO-HI` item; `width` is the character count of `LO` as written
/// (`_parse_single_range`: `range->width = strlen(str)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NumRange {
    lo: u64,
    hi: u64,
    width: usize,
}

impl NumRange {
    fn len(&self) -> u64 {
        // Parsing guarantees lo <= hi and hi - lo < MAX_RANGE.
        self.hi - self.lo + 1
    }
}

/// The items of one bracket, in order, with running totals for lookup.
#[derive(Clone, Debug)]
struct Group {
    ranges: Vec<NumRange>,
    /// `ends[i]`: hosts in `ranges[..=i]`.
    ends: Vec<u64>,
    /// Hosts in the group: the sum of the item sizes.
    total: u64,
    /// How many consecutive hosts of the element share one value of this
    /// group: the product of the totals of the groups that vary faster.
    weight: u64,
}

impl Group {
    /// The `d`-th number of the group (`d < total`) and its padding.
    fn value(&self, d: u64) -> (u64, usize) {
        let i = self.ends.partition_point(|&end| end <= d);
        let r = self.ranges[i];
        let before = self.ends[i] - r.len();
        (r.lo + (d - before), r.width)
    }
}

#[derive(Clone, Debug)]
enum Piece<'a> {
    Text(&'a str),
    /// Index into `Element::groups`.
    Group(usize),
}

/// One comma-separated element: literal text and bracket groups.
#[derive(Clone, Debug)]
struct Element<'a> {
    pieces: Vec<Piece<'a>>,
    groups: Vec<Group>,
    count: u64,
}

impl Element<'_> {
    /// Host `i` (`i < count`) of the element.
    fn host(&self, i: u64) -> String {
        let mut name = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => name.push_str(text),
                Piece::Group(g) => {
                    let group = &self.groups[*g];
                    let (value, width) = group.value((i / group.weight) % group.total);
                    // Slurm prints "%0*lu": zero-padded to `width`.
                    let _ = write!(name, "{value:0width$}");
                }
            }
        }
        name
    }
}

/// A parsed hostlist: answers questions about its hosts without expanding
/// them. It borrows the text it was parsed from.
#[derive(Clone, Debug)]
pub struct Hostlist<'a> {
    elements: Vec<Element<'a>>,
    count: u64,
}

/// The hosts of a [`Hostlist`], in Slurm's order, one name at a time.
#[derive(Clone, Debug)]
pub struct Hosts<'h, 'a> {
    list: &'h Hostlist<'a>,
    element: usize,
    index: u64,
}

impl Iterator for Hosts<'_, '_> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            let element = self.list.elements.get(self.element)?;
            if self.index < element.count {
                let host = element.host(self.index);
                self.index += 1;
                return Some(host);
            }
            self.element += 1;
            self.index = 0;
        }
    }
}

impl<'a> Hostlist<'a> {
    /// Parses and validates the whole list under [`Rules::BUILD`]; an error
    /// anywhere rejects it all, as Slurm does.
    pub fn parse(list: &'a str) -> Result<Self, HostlistError> {
        parse_list(list, Rules::BUILD)
    }

    /// Number of hosts, duplicates included.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Host `n` (from 0) in Slurm's order, `None` past the end.
    pub fn nth(&self, n: u64) -> Option<String> {
        let mut n = n;
        for element in &self.elements {
            if n < element.count {
                return Some(element.host(n));
            }
            n -= element.count;
        }
        None
    }

    /// The hosts in Slurm's order, generated one at a time.
    pub fn hosts(&self) -> Hosts<'_, 'a> {
        Hosts {
            list: self,
            element: 0,
            index: 0,
        }
    }
}

/// The first host of `list` (`MASTER_ADDR`) under [`Rules::BUILD`],
/// in time linear in the length of the text even when the list has
/// billions of hosts. The whole list is validated: Slurm refuses a list if
/// any part of it is bad.
pub fn first_host(list: &str) -> Result<String, HostlistError> {
    Rules::BUILD.first_host(list)
}

/// Number of hosts in `list`, duplicates included, without expanding it.
pub fn count(list: &str) -> Result<u64, HostlistError> {
    Rules::BUILD.count(list)
}

/// Host `n` (from 0) of `list`, `None` past the end, without expanding it.
pub fn nth_host(list: &str, n: u64) -> Result<Option<String>, HostlistError> {
    Rules::BUILD.nth_host(list, n)
}

/// All hosts of `list` in Slurm's order; refuses lists of more than
/// [`MAX_HOSTS`] hosts before allocating for them.
pub fn expand(list: &str) -> Result<Vec<String>, HostlistError> {
    Rules::BUILD.expand(list)
}

/// Element separators: `hostlist_create_dims` passes `"\t, "` to
/// `_next_tok` in 22.05, `"\t, \n"` from 23.02 on.
fn is_separator(b: u8, rules: Rules) -> bool {
    matches!(b, b',' | b' ' | b'\t') || (b == b'\n' && rules.newline_separates())
}

/// The element text around byte `at` for messages: from `start` to the next
/// separator after `at` (or the end).
fn element_text(list: &str, start: usize, at: usize, rules: Rules) -> String {
    let bytes = list.as_bytes();
    let end = (at..bytes.len())
        .find(|&i| is_separator(bytes[i], rules))
        .unwrap_or(bytes.len());
    list[start..end].to_owned()
}

fn parse_list(list: &str, rules: Rules) -> Result<Hostlist<'_>, HostlistError> {
    if list.len() > MAX_INPUT_LEN {
        return Err(HostlistError::TooLong {
            len: list.len(),
            max: MAX_INPUT_LEN,
        });
    }
    let bytes = list.as_bytes();
    if let Some(at) = bytes
        .iter()
        .position(|&b| (b < 0x20 && !is_separator(b, rules)) || b == 0x7f)
    {
        return Err(HostlistError::ControlCharacter {
            at,
            byte: bytes[at],
        });
    }

    let mut elements = Vec::new();
    let mut count: u64 = 0;
    let mut i = 0;
    while i < bytes.len() {
        if is_separator(bytes[i], rules) {
            i += 1;
            continue;
        }
        // One element: up to the next separator outside brackets. With
        // balanced, unnested brackets this is exactly how Slurm's
        // `_next_tok` splits; unbalanced ones are refused here.
        let start = i;
        let mut open: Option<usize> = None;
        while i < bytes.len() {
            match bytes[i] {
                b'{' if rules.has_functions() => {
                    return Err(HostlistError::HostlistFunction {
                        at: i,
                        element: element_text(list, start, i, rules),
                    });
                }
                b'[' if open.is_some() => {
                    return Err(HostlistError::NestedBracket {
                        at: i,
                        element: element_text(list, start, i, rules),
                    });
                }
                b'[' => open = Some(i),
                b']' if open.is_none() => {
                    return Err(HostlistError::UnopenedBracket {
                        at: i,
                        element: element_text(list, start, i, rules),
                    });
                }
                b']' => open = None,
                b if is_separator(b, rules) && open.is_none() => break,
                _ => {}
            }
            i += 1;
        }
        if let Some(at) = open {
            return Err(HostlistError::UnclosedBracket {
                at,
                element: list[start..].to_owned(),
            });
        }
        let element = parse_element(list, start, i, rules)?;
        count = count
            .checked_add(element.count)
            .ok_or_else(|| HostlistError::CountOverflow {
                at: start,
                element: list[start..i].to_owned(),
            })?;
        elements.push(element);
    }
    Ok(Hostlist { elements, count })
}

/// Parses `list[start..end]`, one element with balanced, unnested brackets.
fn parse_element(
    list: &str,
    start: usize,
    end: usize,
    rules: Rules,
) -> Result<Element<'_>, HostlistError> {
    let bytes = list.as_bytes();
    let element = || list[start..end].to_owned();
    let mut pieces = Vec::new();
    let mut groups = Vec::new();
    let mut text_start = start;
    let mut i = start;
    while i < end {
        if bytes[i] != b'[' {
            i += 1;
            continue;
        }
        if text_start < i {
            pieces.push(Piece::Text(&list[text_start..i]));
        }
        let close = (i + 1..end).find(|&j| bytes[j] == b']').ok_or_else(|| {
            HostlistError::UnclosedBracket {
                at: i,
                element: element(),
            }
        })?;
        pieces.push(Piece::Group(groups.len()));
        groups.push(parse_group(list, i + 1, close, start, end)?);
        i = close + 1;
        text_start = i;
    }
    if text_start < end {
        let text = &list[text_start..end];
        if groups.is_empty() {
            check_plain_host(text, text_start, &element)?;
        } else if !rules.allows_suffix() {
            // 22.05's `_hostlist_create_bracketed`: the last ']' must end
            // the token.
            return Err(HostlistError::TextAfterBracket {
                at: text_start,
                element: element(),
                suffix: text.to_owned(),
            });
        }
        // From 23.11 a suffix is printed verbatim after each number
        // (`hostlist_push_hr`), never re-read as a number.
        pieces.push(Piece::Text(text));
    }

    // `_push_range_list` caps every group but the last (those it iterates
    // to build prefixes) at MAX_PREFIX_CNT hosts.
    if let Some((_, prefix_groups)) = groups.split_last() {
        for (g, group) in prefix_groups.iter().enumerate() {
            if group.total > MAX_PREFIX_CNT {
                let at = group_offset(list, start, end, g);
                return Err(HostlistError::GroupTooLarge {
                    at,
                    element: element(),
                    hosts: group.total,
                    max: MAX_PREFIX_CNT,
                });
            }
        }
    }

    let len: usize = pieces
        .iter()
        .map(|piece| match piece {
            Piece::Text(text) => text.len(),
            Piece::Group(g) => groups[*g]
                .ranges
                .iter()
                .map(|r| r.width.max(digits(r.hi)))
                .max()
                .unwrap_or(0),
        })
        .fold(0usize, usize::saturating_add);
    if len > MAX_HOSTNAME_LEN {
        return Err(HostlistError::HostnameTooLong {
            at: start,
            element: element(),
            len,
            max: MAX_HOSTNAME_LEN,
        });
    }

    // Slurm's order (see the module comment): the last group fastest, then
    // the first, the second, ..., the last-but-one slowest.
    let mut count: u64 = 1;
    let n = groups.len();
    let fastest_first = (n.saturating_sub(1)..n).chain(0..n.saturating_sub(1));
    for g in fastest_first {
        let group: &mut Group = &mut groups[g];
        group.weight = count;
        count = count
            .checked_mul(group.total)
            .ok_or_else(|| HostlistError::CountOverflow {
                at: start,
                element: element(),
            })?;
    }
    Ok(Element {
        pieces,
        groups,
        count,
    })
}

/// Byte offset of the `g`-th group's '[' in `list[start..end]`.
fn group_offset(list: &str, start: usize, end: usize, g: usize) -> usize {
    let bytes = list.as_bytes();
    (start..end)
        .filter(|&i| bytes[i] == b'[')
        .nth(g)
        .unwrap_or(start)
}

/// Decimal digits of `v`.
fn digits(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 10 {
        v /= 10;
        n += 1;
    }
    n
}

/// A bracket-less element is one host. Slurm (`hostname_create`) re-reads
/// its trailing digits with `strtoul` and prints them back with their
/// width, which reproduces the text unless they exceed `u64::MAX`, where
/// Slurm saturates; that case is refused.
fn check_plain_host(
    text: &str,
    at: usize,
    element: &dyn Fn() -> String,
) -> Result<(), HostlistError> {
    let trailing = text.bytes().rev().take_while(u8::is_ascii_digit).count();
    let suffix = &text[text.len() - trailing..];
    if !suffix.is_empty() && parse_digits(suffix).is_none() {
        return Err(HostlistError::NumberOverflow {
            at: at + text.len() - trailing,
            element: element(),
            number: suffix.to_owned(),
        });
    }
    Ok(())
}

/// `s` (all ASCII digits) as a number, `None` on overflow.
fn parse_digits(s: &str) -> Option<u64> {
    s.bytes().try_fold(0u64, |acc, b| {
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// The items between `list[open]` and `list[close]` (exclusive), split on
/// commas as `_parse_range_list` does.
fn parse_group(
    list: &str,
    open: usize,
    close: usize,
    start: usize,
    end: usize,
) -> Result<Group, HostlistError> {
    let element = || list[start..end].to_owned();
    let mut ranges = Vec::new();
    let mut ends = Vec::new();
    let mut total: u64 = 0;
    let mut item_start = open;
    loop {
        let item_end = list[item_start..close]
            .find(',')
            .map_or(close, |k| item_start + k);
        if ranges.len() == MAX_RANGES {
            return Err(HostlistError::TooManyRanges {
                at: open - 1,
                element: element(),
                max: MAX_RANGES,
            });
        }
        let range = parse_range(&list[item_start..item_end], item_start, &element)?;
        // At most MAX_RANGES items of at most MAX_RANGE hosts: no overflow.
        total += range.len();
        ranges.push(range);
        ends.push(total);
        if item_end == close {
            break;
        }
        item_start = item_end + 1;
    }
    Ok(Group {
        ranges,
        ends,
        total,
        weight: 1,
    })
}

/// One item, `N` or `LO-HI`, as `_parse_single_range` reads it, except that
/// only plain decimal digits are accepted (no blanks, signs or junk that
/// Slurm's `strtoul` would skip, no trailing `-`).
fn parse_range(
    text: &str,
    at: usize,
    element: &dyn Fn() -> String,
) -> Result<NumRange, HostlistError> {
    let invalid = || HostlistError::InvalidRange {
        at,
        element: element(),
        range: text.to_owned(),
    };
    let (lo_text, hi_text) = match text.split_once('-') {
        Some((lo, hi)) => (lo, Some(hi)),
        None => (text, None),
    };
    let number = |s: &str, offset: usize| -> Result<u64, HostlistError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        parse_digits(s).ok_or_else(|| HostlistError::NumberOverflow {
            at: at + offset,
            element: element(),
            number: s.to_owned(),
        })
    };
    let lo = number(lo_text, 0)?;
    let hi = match hi_text {
        Some(hi_text) => number(hi_text, lo_text.len() + 1)?,
        None => lo,
    };
    if lo > hi {
        return Err(HostlistError::ReversedRange {
            at,
            element: element(),
            range: text.to_owned(),
            lo,
            hi,
        });
    }
    // Slurm: `hi - lo + 1 > MAX_RANGE`, computed without its wrap-around.
    if hi - lo >= MAX_RANGE {
        return Err(HostlistError::RangeTooLarge {
            at,
            element: element(),
            range: text.to_owned(),
            hosts: u128::from(hi - lo) + 1,
            max: MAX_RANGE,
        });
    }
    Ok(NumRange {
        lo,
        hi,
        width: lo_text.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hosts of `list`, the same under every rule set.
    fn ex(list: &str) -> Vec<String> {
        let hosts = ex_with(Rules::V22_05, list);
        for rules in Rules::ALL {
            assert_eq!(ex_with(rules, list), hosts, "{rules:?} on {list:?}");
        }
        hosts
    }

    fn ex_with(rules: Rules, list: &str) -> Vec<String> {
        match rules.expand(list) {
            Ok(hosts) => hosts,
            Err(e) => panic!("{rules:?}.expand({list:?}) failed: {e}"),
        }
    }

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    /// The error `list` gives, the same under every rule set.
    fn err(list: &str) -> HostlistError {
        let e = err_with(Rules::V22_05, list);
        for rules in Rules::ALL {
            assert_eq!(err_with(rules, list), e, "{rules:?} on {list:?}");
        }
        e
    }

    fn err_with(rules: Rules, list: &str) -> HostlistError {
        match rules.expand(list) {
            Ok(hosts) => panic!("{rules:?}.expand({list:?}) should fail, gave {hosts:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn plain_hosts_and_separators() {
        assert_eq!(ex("n1"), words("n1"));
        assert_eq!(ex("a,b,c"), words("a b c"));
        assert_eq!(ex("a b\tc"), words("a b c"));
        assert_eq!(ex(" a, b "), words("a b"));
        assert_eq!(ex("a,,b,"), words("a b"));
        assert_eq!(ex(",a"), words("a"));
        assert_eq!(ex("login.example.org"), words("login.example.org"));
        assert_eq!(ex("n007"), words("n007"));
        assert_eq!(ex("007"), words("007"));
        assert_eq!(ex("nodé1"), words("nodé1"));
    }

    #[test]
    fn empty_lists() {
        for list in ["", ",", ",,,", " ", " , \t"] {
            assert_eq!(ex(list), Vec::<String>::new(), "{list:?}");
            assert_eq!(count(list), Ok(0));
            assert_eq!(nth_host(list, 0), Ok(None));
            assert_eq!(first_host(list), Err(HostlistError::Empty));
        }
    }

    #[test]
    fn no_sorting_no_dedup() {
        assert_eq!(ex("b,a,b"), words("b a b"));
        assert_eq!(ex("n[3,1,1,2]"), words("n3 n1 n1 n2"));
        assert_eq!(ex("n[1-2],n[1-2]"), words("n1 n2 n1 n2"));
    }

    #[test]
    fn ranges_and_lists() {
        assert_eq!(ex("n[1-3]"), words("n1 n2 n3"));
        assert_eq!(ex("n[1,3,5-7]"), words("n1 n3 n5 n6 n7"));
        assert_eq!(ex("n[3]"), words("n3"));
        assert_eq!(ex("n[3-3]"), words("n3"));
        assert_eq!(ex("n[0-2]"), words("n0 n1 n2"));
        assert_eq!(ex("[1-2]"), words("1 2"));
        assert_eq!(ex("n[1-2],m"), words("n1 n2 m"));
    }

    #[test]
    fn zero_padding_follows_the_first_number() {
        assert_eq!(ex("n[01-03]"), words("n01 n02 n03"));
        assert_eq!(ex("n[01-10]").last().map(String::as_str), Some("n10"));
        assert_eq!(ex("n[01-10]").len(), 10);
        assert_eq!(ex("n[1-010]").first().map(String::as_str), Some("n1"));
        assert_eq!(ex("n[1-010]").last().map(String::as_str), Some("n10"));
        assert_eq!(ex("n[009-10]"), words("n009 n010"));
        assert_eq!(ex("n[09-10]"), words("n09 n10"));
        assert_eq!(ex("n[9-10]"), words("n9 n10"));
        assert_eq!(ex("n[01-0002]"), words("n01 n02"));
        assert_eq!(ex("n[00]"), words("n00"));
        assert_eq!(ex("n[1,02,3-4]"), words("n1 n02 n3 n4"));
    }

    #[test]
    fn several_groups_follow_slurms_order() {
        assert_eq!(
            ex("rack[1-2]-n[01-02]"),
            words("rack1-n01 rack1-n02 rack2-n01 rack2-n02")
        );
        assert_eq!(ex("n[1-2][3-4]"), words("n13 n14 n23 n24"));
        assert_eq!(ex("[0-1][0-1]"), words("00 01 10 11"));
        // Three groups: the middle (last-but-one) group is the slowest.
        assert_eq!(ex("n[1-2]-[3-4]-[5]"), words("n1-3-5 n2-3-5 n1-4-5 n2-4-5"));
        // Four: d fastest, then a, b, c slowest (checked with scontrol).
        assert_eq!(
            ex("a[1-2]b[3-4]c[5-6]d[7-8]"),
            words(
                "a1b3c5d7 a1b3c5d8 a2b3c5d7 a2b3c5d8 a1b4c5d7 a1b4c5d8 a2b4c5d7 a2b4c5d8 \
                 a1b3c6d7 a1b3c6d8 a2b3c6d7 a2b3c6d8 a1b4c6d7 a1b4c6d8 a2b4c6d7 a2b4c6d8"
            )
        );
        assert_eq!(
            ex("n[1,2-3]x[1-2,5]"),
            words("n1x1 n1x2 n1x5 n2x1 n2x2 n2x5 n3x1 n3x2 n3x5")
        );
    }

    #[test]
    fn big_numbers() {
        assert_eq!(
            ex("n[18446744073709551614-18446744073709551615]"),
            words("n18446744073709551614 n18446744073709551615")
        );
        assert_eq!(ex("n18446744073709551615"), words("n18446744073709551615"));
        assert_eq!(
            ex("n[4294967295-4294967296]"),
            words("n4294967295 n4294967296")
        );
    }

    #[test]
    fn lazy_queries_on_huge_lists() {
        let list = "n[1-65536][1-65536]";
        assert_eq!(count(list), Ok(1 << 32));
        assert_eq!(first_host(list).as_deref(), Ok("n11"));
        assert_eq!(
            nth_host(list, (1 << 32) - 1),
            Ok(Some("n6553665536".into()))
        );
        assert_eq!(nth_host(list, 1 << 32), Ok(None));
        assert_eq!(nth_host(list, 65536), Ok(Some("n21".into())));
        assert_eq!(
            expand(list),
            Err(HostlistError::TooManyHosts {
                count: 1 << 32,
                max: MAX_HOSTS
            })
        );
        // The last group may be larger than a prefix group.
        let list = "n[1-65536,1-65536]";
        assert_eq!(count(list), Ok(131_072));
        // 100000 items of 65536 hosts (the input cap allows no more).
        let mut big = String::from("n[");
        for i in 0..100_000 {
            if i > 0 {
                big.push(',');
            }
            big.push_str("1-65536");
        }
        big.push(']');
        assert_eq!(count(&big), Ok(100_000 << 16));
        assert_eq!(
            nth_host(&big, (100_000 << 16) - 1),
            Ok(Some("n65536".into()))
        );
        assert_eq!(nth_host(&big, 65_536), Ok(Some("n1".into())));
        // Five groups overflow u64.
        assert!(matches!(
            count("n[1-65536]-[1-65536]-[1-65536]-[1-65536]-[1-65536]"),
            Err(HostlistError::CountOverflow { .. })
        ));
    }

    #[test]
    fn expand_limit() {
        assert_eq!(count("n[1-1000][1-1000]"), Ok(MAX_HOSTS));
        assert_eq!(expand("n[1-1000][1-1000]").map(|h| h.len()), Ok(1_000_000));
        assert!(matches!(
            expand("n[1-1000][1-1000],x"),
            Err(HostlistError::TooManyHosts {
                count: 1_000_001,
                ..
            })
        ));
    }

    #[test]
    fn queries_agree_with_expand() {
        for list in [
            "n[1-3],a[01-02]-b[7,9],x,n[1-2]-[3-4]-[5-6]",
            "a[1-2]b[3-4]c[5-6]d[7-8],[0-1][0-1]",
        ] {
            let hosts = ex(list);
            assert_eq!(count(list), Ok(hosts.len() as u64));
            assert_eq!(first_host(list).as_ref(), Ok(&hosts[0]));
            for (i, host) in hosts.iter().enumerate() {
                assert_eq!(nth_host(list, i as u64).as_ref(), Ok(&Some(host.clone())));
            }
            assert_eq!(nth_host(list, hosts.len() as u64), Ok(None));
        }
    }

    #[test]
    fn slurm_limits() {
        assert_eq!(count("n[1-65536]"), Ok(65_536));
        assert!(matches!(
            err("n[1-65537]"),
            HostlistError::RangeTooLarge { hosts: 65_537, .. }
        ));
        assert!(matches!(
            err("n[1-1000000000]"),
            HostlistError::RangeTooLarge { .. }
        ));
        assert!(matches!(
            count("n[0-18446744073709551615]"),
            Err(HostlistError::RangeTooLarge { .. })
        ));
        assert!(matches!(
            first_host("n[1-1000000000]"),
            Err(HostlistError::RangeTooLarge { .. })
        ));
        // Prefix groups: at most 64K hosts in all.
        assert_eq!(count("n[1-40000,40001-65536]-[1]"), Ok(65_536));
        assert!(matches!(
            err("n[1-40000,40001-65537]-[1]"),
            HostlistError::GroupTooLarge {
                hosts: 65_537,
                at: 1,
                ..
            }
        ));
        // The last group has no such cap.
        assert_eq!(count("n[1-2]-[1-40000,40001-70000]"), Ok(140_000));
        // 256K items per bracket.
        let items = |n: usize| format!("n[{}]", vec!["1"; n].join(","));
        assert_eq!(count(&items(MAX_RANGES)), Ok(MAX_RANGES as u64));
        assert!(matches!(
            count(&items(MAX_RANGES + 1)),
            Err(HostlistError::TooManyRanges { at: 1, .. })
        ));
    }

    #[test]
    fn errors_carry_position_and_text() {
        assert_eq!(
            err("a,n[5-1]"),
            HostlistError::ReversedRange {
                at: 4,
                element: "n[5-1]".into(),
                range: "5-1".into(),
                lo: 5,
                hi: 1
            }
        );
        assert_eq!(
            err_with(Rules::V22_05, "n[1-3]x"),
            HostlistError::TextAfterBracket {
                at: 6,
                element: "n[1-3]x".into(),
                suffix: "x".into()
            }
        );
        assert_eq!(
            err_with(Rules::V22_05, "n[1-2]x[3-4]y"),
            HostlistError::TextAfterBracket {
                at: 12,
                element: "n[1-2]x[3-4]y".into(),
                suffix: "y".into()
            }
        );
        assert_eq!(
            err("ok,n[1-3"),
            HostlistError::UnclosedBracket {
                at: 4,
                element: "n[1-3".into()
            }
        );
        assert_eq!(
            err("n1-3],x"),
            HostlistError::UnopenedBracket {
                at: 4,
                element: "n1-3]".into()
            }
        );
        assert_eq!(
            err("a[[1-2]"),
            HostlistError::NestedBracket {
                at: 2,
                element: "a[[1-2]".into()
            }
        );
        assert_eq!(
            err("n[1-2]]"),
            HostlistError::UnopenedBracket {
                at: 6,
                element: "n[1-2]]".into()
            }
        );
        assert_eq!(
            err_with(Rules::V22_05, "x\ny"),
            HostlistError::ControlCharacter { at: 1, byte: b'\n' }
        );
        assert_eq!(
            err("x\ry"),
            HostlistError::ControlCharacter { at: 1, byte: b'\r' }
        );
        assert_eq!(
            err("n[99999999999999999999]"),
            HostlistError::NumberOverflow {
                at: 2,
                element: "n[99999999999999999999]".into(),
                number: "99999999999999999999".into()
            }
        );
        assert_eq!(
            err("n[1-99999999999999999999]"),
            HostlistError::NumberOverflow {
                at: 4,
                element: "n[1-99999999999999999999]".into(),
                number: "99999999999999999999".into()
            }
        );
        assert_eq!(
            err("n99999999999999999999"),
            HostlistError::NumberOverflow {
                at: 1,
                element: "n99999999999999999999".into(),
                number: "99999999999999999999".into()
            }
        );
    }

    #[test]
    fn invalid_ranges() {
        for (list, range) in [
            ("n[]", ""),
            ("n[1,,2]", ""),
            ("n[1,]", ""),
            ("n[,1]", ""),
            ("n[a-b]", "a-b"),
            ("n[1--2]", "1--2"),
            ("n[-2]", "-2"),
            ("n[1-]", "1-"),
            ("n[1-2-3]", "1-2-3"),
            ("n[0x1]", "0x1"),
            ("n[+1]", "+1"),
            ("n[1a-3]", "1a-3"),
            ("n[1, 3]", " 3"),
            ("n[1 ]", "1 "),
            ("n[1-2\t3]", "1-2\t3"),
        ] {
            match err(list) {
                HostlistError::InvalidRange { range: r, .. } => assert_eq!(r, range, "{list}"),
                e => panic!("{list}: {e:?}"),
            }
        }
    }

    #[test]
    fn limits_on_size() {
        let long = "a".repeat(MAX_INPUT_LEN + 1);
        assert_eq!(
            count(&long),
            Err(HostlistError::TooLong {
                len: MAX_INPUT_LEN + 1,
                max: MAX_INPUT_LEN
            })
        );
        let name = "a".repeat(MAX_HOSTNAME_LEN);
        assert_eq!(count(&name), Ok(1));
        assert!(matches!(
            count(&format!("{name}b")),
            Err(HostlistError::HostnameTooLong { len: 256, .. })
        ));
        let name = "a".repeat(MAX_HOSTNAME_LEN - 3);
        assert_eq!(count(&format!("{name}[1-999]")), Ok(999));
        assert!(matches!(
            count(&format!("{name}[1-1000]")),
            Err(HostlistError::HostnameTooLong { len: 256, .. })
        ));
        assert!(matches!(
            count(&format!("{name}[0001]")),
            Err(HostlistError::HostnameTooLong { len: 256, .. })
        ));
        // Many tiny groups: bounded by the name length, no deep recursion.
        let many = "[1]".repeat(100_000);
        assert!(matches!(
            count(&many),
            Err(HostlistError::HostnameTooLong { .. })
        ));
        // Many elements: linear time.
        let many = "a,".repeat(400_000);
        assert_eq!(count(&many), Ok(400_000));
    }

    #[test]
    fn display_is_one_line_with_a_fix() {
        let errors = [
            err("n[5-1]"),
            err_with(Rules::V22_05, "n[1-3]x"),
            err_with(Rules::V26_05, "feature{gpu}"),
            err("n[1-3"),
            err("n]"),
            err("n[[1]]"),
            err("n[a]"),
            err("n[]"),
            err("n[99999999999999999999]"),
            err("n[1-65537]"),
            err("n[1-65537,1]-[1]"),
            err(&format!("n[{}]", vec!["1"; MAX_RANGES + 1].join(","))),
            err(&"a".repeat(300)),
            err("n[1-65536]-[1-65536]-[1-65536]-[1-65536]-[1-65536]"),
            err("n[1-1000][1-1001]"),
            err("a\u{7f}"),
            err(&"a".repeat(MAX_INPUT_LEN + 1)),
            HostlistError::Empty,
        ];
        for e in errors {
            let text = e.to_string();
            assert!(!text.contains('\n'), "{text}");
            assert!(text.contains(':'), "no fix in {text}");
            assert!(text.len() < 400, "too long: {text}");
        }
    }

    #[test]
    fn rules_follow_the_release() {
        for (version, rules) in [
            (0x16_05_08, Rules::V22_05),
            (0x17_02_00, Rules::V22_05),
            (0x17_0b_00, Rules::V24_11),
            (0x18_0b_05, Rules::V24_11),
            (0x19_05_00, Rules::V26_05),
            (0x1a_05_05, Rules::V26_05),
            (0x1a_0b_00, Rules::V26_05),
        ] {
            assert_eq!(Rules::for_version_number(version), rules, "{version:#x}");
        }
        assert_eq!(
            Rules::BUILD,
            Rules::for_version_number(parse_decimal(env!("MLC_SLURM_VERSION_NUMBER")))
        );
        assert_eq!(Rules::ALL.map(Rules::release), ["22.05", "24.11", "26.05"]);
        // The free functions are the build's rules.
        assert_eq!(first_host("n[1-2]x"), Rules::BUILD.first_host("n[1-2]x"));
    }

    #[test]
    fn text_after_the_last_bracket_from_23_11() {
        for rules in [Rules::V24_11, Rules::V26_05] {
            let ex = |list| ex_with(rules, list);
            assert_eq!(ex("gpu[01-02]-ib"), words("gpu01-ib gpu02-ib"));
            assert_eq!(ex("n[1-3]x"), words("n1x n2x n3x"));
            assert_eq!(ex("login1,n[1-2]-hsn"), words("login1 n1-hsn n2-hsn"));
            let ib = ex("gpu[001-128]-ib0");
            assert_eq!(ib.len(), 128);
            assert_eq!(
                (ib[0].as_str(), ib[127].as_str()),
                ("gpu001-ib0", "gpu128-ib0")
            );
            assert_eq!(
                rules.first_host("gpu[001-128]-ib0").as_deref(),
                Ok("gpu001-ib0")
            );
            assert_eq!(
                ex("rack[1-2]-node[01-02]-hsn"),
                words("rack1-node01-hsn rack1-node02-hsn rack2-node01-hsn rack2-node02-hsn")
            );
            // The suffix does not change the order of several groups.
            assert_eq!(
                ex("a[1-2]b[3-4]c[5]d"),
                words("a1b3c5d a2b3c5d a1b4c5d a2b4c5d")
            );
            assert_eq!(ex("n[1-2]x[3-4]y"), words("n1x3y n1x4y n2x3y n2x4y"));
            // Kept verbatim: never re-read as a number.
            assert_eq!(
                ex("n[1]99999999999999999999"),
                words("n199999999999999999999")
            );
            assert_eq!(
                ex("[1-2].example.org"),
                words("1.example.org 2.example.org")
            );
            assert_eq!(rules.count("n[1-65536][1-65536]-x"), Ok(1 << 32));
            assert_eq!(
                rules.nth_host("n[1-65536][1-65536]-x", (1 << 32) - 1),
                Ok(Some("n6553665536-x".into()))
            );
            // The suffix counts towards the name length.
            let name = "a".repeat(MAX_HOSTNAME_LEN - 2);
            assert_eq!(rules.count(&format!("[1-9]{name}b")), Ok(9));
            assert!(matches!(
                rules.count(&format!("[1-9]{name}bc")),
                Err(HostlistError::HostnameTooLong { len: 256, .. })
            ));
            // Errors stay errors.
            assert!(matches!(
                err_with(rules, "n[5-1]x"),
                HostlistError::ReversedRange { .. }
            ));
            assert!(matches!(
                err_with(rules, "n[1-2]x]"),
                HostlistError::UnopenedBracket { .. }
            ));
        }
        assert!(matches!(
            err_with(Rules::V22_05, "gpu[01-02]-ib"),
            HostlistError::TextAfterBracket { at: 10, .. }
        ));
    }

    #[test]
    fn newline_separates_from_23_02() {
        for rules in [Rules::V24_11, Rules::V26_05] {
            assert_eq!(ex_with(rules, "a\nb,n[1-2]\n"), words("a b n1 n2"));
            assert_eq!(ex_with(rules, "\n"), Vec::<String>::new());
            // Not inside brackets: the item is then invalid.
            assert!(matches!(
                err_with(rules, "n[1,\n2]"),
                HostlistError::InvalidRange { .. }
            ));
            assert!(matches!(
                err_with(rules, "a\rb"),
                HostlistError::ControlCharacter { byte: b'\r', .. }
            ));
        }
        assert!(matches!(
            err_with(Rules::V22_05, "a\nb"),
            HostlistError::ControlCharacter { byte: b'\n', at: 1 }
        ));
    }

    #[test]
    fn hostlist_functions_from_25_05() {
        assert_eq!(
            err_with(Rules::V26_05, "n1,feature{gpu}"),
            HostlistError::HostlistFunction {
                at: 10,
                element: "feature{gpu}".into()
            }
        );
        assert!(matches!(
            err_with(Rules::V26_05, "n[1-2]{"),
            HostlistError::HostlistFunction { at: 6, .. }
        ));
        // Before 25.05 a brace is part of a name.
        for rules in [Rules::V22_05, Rules::V24_11] {
            assert_eq!(ex_with(rules, "feature{gpu}"), words("feature{gpu}"));
        }
    }

    /// SplitMix64: a deterministic PRNG, no crates.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn hostile_inputs_never_panic() {
        for rules in Rules::ALL {
            hostile_inputs_never_panic_with(rules);
        }
    }

    fn hostile_inputs_never_panic_with(rules: Rules) {
        const ALPHABET: &[u8] = b"n0123456789[]-,x{";
        let mut rng = Rng(0x5eed);
        let mut accepted = 0;
        for round in 0..60_000 {
            let len = rng.below(if round % 10 == 0 { 200 } else { 24 });
            let text: String = (0..len)
                .map(|_| ALPHABET[rng.below(ALPHABET.len() as u64) as usize] as char)
                .collect();
            let parsed = rules.parse(&text);
            // All entry points agree on validity and never panic.
            assert_eq!(rules.count(&text).is_ok(), parsed.is_ok(), "{text}");
            let _ = rules.first_host(&text);
            let _ = rules.nth_host(&text, rng.next());
            let Ok(parsed) = parsed else { continue };
            accepted += 1;
            let n = parsed.count();
            assert_eq!(rules.first_host(&text).ok(), parsed.nth(0), "{text}");
            if n <= 5_000 {
                let hosts = rules.expand(&text).unwrap();
                assert_eq!(hosts.len() as u64, n, "{text}");
                let i = rng.below(n.max(1));
                assert_eq!(parsed.nth(i), hosts.get(i as usize).cloned(), "{text}");
                assert!(hosts
                    .iter()
                    .all(|h| !h.is_empty() && h.len() <= MAX_HOSTNAME_LEN));
            } else {
                assert!(parsed.nth(n - 1).is_some(), "{text}");
                assert!(parsed.nth(n).is_none(), "{text}");
            }
        }
        assert!(accepted > 5_000, "{rules:?}: only {accepted} accepted");
    }

    #[test]
    fn hostile_bytes_never_panic() {
        let mut rng = Rng(42);
        for _ in 0..20_000 {
            let len = rng.below(32) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
            let text = String::from_utf8_lossy(&bytes);
            for rules in Rules::ALL {
                let _ = rules.expand(&text).map(|hosts| hosts.len());
                let _ = rules.first_host(&text);
                let _ = rules.count(&text);
            }
        }
    }
}
