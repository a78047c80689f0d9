#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Differential test: the hostlist rules of each supported Slurm release
//! (`hostlist::Rules`) against that release's own `scontrol show hostnames`:
//! 22.05 on the host (Debian's slurm-client), 24.11 in the cached trixie
//! root and 26.05 in the cached sid root (`tests/cluster/rootfs.sh trixie|sid`,
//! built on first use), run there by chroot in a private mount namespace
//! that binds this test's slurm.conf onto the root's /mnt (the cache is
//! never written). Every test runs once per release.
//!
//! scontrol reads commands from stdin when given no arguments, so thousands
//! of lists are checked in one process: each `show hostnames LIST` is followed
//! by `show hostnames ZZMARKn`, whose one output line closes LIST's output.
//! Invalid lists print `Invalid hostlist: LIST` on stderr. A mismatch is
//! re-checked with a single `scontrol show hostnames LIST` call and reported
//! with both answers.
//!
//! Without scontrol (or the roots) this test fails: it is the only check
//! that the parser agrees with Slurm (install slurm-client; run as root).

use std::collections::HashSet;
use std::io::{ErrorKind, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use slurm_ml_container::hostlist::{HostlistError, Rules};

/// Instantiates a test `fn NAME(rules: Rules)` once per release.
macro_rules! per_release {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::*;
                #[test]
                fn slurm_22_05() {
                    super::$name(Rules::V22_05)
                }
                #[test]
                fn slurm_24_11() {
                    super::$name(Rules::V24_11)
                }
                #[test]
                fn slurm_26_05() {
                    super::$name(Rules::V26_05)
                }
            }
        )*
    };
}

per_release!(
    expand_matches_scontrol_on_valid_lists,
    random_strings_agree_with_scontrol,
    malformed_lists_are_errors_and_scontrol_agrees_or_differs_as_documented,
    whitespace_separators_match_scontrol,
    site_naming_schemes_match_scontrol,
);

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

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

/// What scontrol made of one list.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Slurm {
    Hosts(Vec<String>),
    Invalid,
}

struct Scontrol {
    /// The test's own config directory, removed on drop.
    dir: tempfile::TempDir,
    /// The Debian root holding this release's Slurm; `None`: the host's.
    root: Option<PathBuf>,
}

/// One list on which our parser and scontrol disagree, with what scontrol
/// makes of the list on its own (batching must not be the cause).
fn difference(
    list: &str,
    ours: &impl std::fmt::Debug,
    slurm: &Slurm,
    scontrol: &Scontrol,
) -> String {
    format!(
        "{list:?}:\n  ours:     {ours:?}\n  scontrol: {slurm:?}\n  alone:    {:?}",
        scontrol.single(list)
    )
}

/// The cached root of a release (`tests/cluster/rootfs.sh SUITE`).
fn root(suite: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/cluster/rootfs.sh"
        ))
        .arg(suite)
        .stderr(Stdio::inherit())
        .output()
        .expect("run tests/cluster/rootfs.sh");
    assert!(out.status.success(), "building the {suite} root failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

impl Scontrol {
    /// Writes a minimal slurm.conf (scontrol wants a config source even for
    /// `show hostnames`) and checks that `rules`' release's scontrol runs.
    fn new(rules: Rules) -> Scontrol {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("slurm.conf"),
            "ClusterName=hostlisttest\nSlurmctldHost=localhost\nNodeName=n1\nPartitionName=p Nodes=n1\n",
        )
        .unwrap();
        let root = match rules {
            Rules::V22_05 => None,
            Rules::V24_11 => Some(root("trixie")),
            Rules::V26_05 => Some(root("sid")),
        };
        let scontrol = Scontrol { dir, root };
        let version = match scontrol.command().arg("--version").output() {
            Ok(out) => out,
            Err(e) if e.kind() == ErrorKind::NotFound => panic!(
                "scontrol is not on PATH: this test compares the hostlist parser with Slurm's own; \
                 install it (apt-get install slurm-client) or run tests/install-deps.sh"
            ),
            Err(e) => panic!("cannot run scontrol: {e}"),
        };
        let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
        eprintln!("comparing the {rules:?} rules with {version}");
        // The scontrol of the release these rules are for, not another.
        assert!(
            version.contains(&format!(" {}.", rules.release())),
            "{rules:?} needs Slurm {}'s scontrol, found {version:?}",
            rules.release()
        );
        assert_eq!(
            scontrol.single("n[1-2]"),
            Slurm::Hosts(vec!["n1".into(), "n2".into()]),
            "scontrol show hostnames does not work here; see the stderr above"
        );
        scontrol
    }

    /// `scontrol`, on the host or chrooted into the release's root. A
    /// private mount namespace binds the config directory onto the root's
    /// /mnt, so the cached root is never written.
    fn command(&self) -> Command {
        let mut command = match &self.root {
            None => {
                let mut c = Command::new("scontrol");
                c.env("SLURM_CONF", self.dir.path().join("slurm.conf"));
                c
            }
            Some(root) => {
                let mut c = Command::new("unshare");
                c.args([
                    "--mount",
                    "--",
                    "sh",
                    "-ec",
                    r#"d=$1 r=$2; shift 2; mount --bind "$d" "$r/mnt"; exec chroot "$r" scontrol "$@""#,
                    "sh",
                ])
                .arg(self.dir.path())
                .arg(root)
                .env("SLURM_CONF", "/mnt/slurm.conf");
                c
            }
        };
        command
            .env_remove("SLURM_CLUSTERS")
            .env_remove("SLURM_JOB_NODELIST")
            .env_remove("SLURM_NODELIST");
        command
    }

    /// One `scontrol show hostnames LIST` process.
    fn single(&self, list: &str) -> Slurm {
        let out = self
            .command()
            .args(["show", "hostnames", list])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("Invalid hostlist") {
            return Slurm::Invalid;
        }
        // Not necessarily an empty stderr: Slurm logs errors it then ignores
        // (see `deep_group` below).
        assert!(
            out.status.success(),
            "scontrol show hostnames {list:?}: {}: {stderr}",
            out.status
        );
        Slurm::Hosts(
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect(),
        )
    }

    /// All `lists` through one scontrol process reading stdin.
    fn batch(&self, lists: &[String]) -> Vec<Slurm> {
        let mut input = String::new();
        for (i, list) in lists.iter().enumerate() {
            assert!(
                !list.is_empty() && !list.contains(char::is_whitespace),
                "batch lists are split on whitespace by scontrol: {list:?}"
            );
            input.push_str(&format!(
                "show hostnames {list}\nshow hostnames ZZMARK{i}\n"
            ));
        }
        let mut child = self
            .command()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // Write from a thread: scontrol answers while we are still writing.
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let invalid: HashSet<&str> = stderr
            .lines()
            .filter_map(|line| line.strip_prefix("Invalid hostlist: "))
            .collect();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let mut results = Vec::with_capacity(lists.len());
        let mut hosts = Vec::new();
        for line in stdout.lines() {
            // scontrol echoes each command it reads as "scontrol: COMMAND".
            if line.starts_with("scontrol:") {
                continue;
            }
            if line == format!("ZZMARK{}", results.len()) {
                let list = &lists[results.len()];
                results.push(if hosts.is_empty() && invalid.contains(list.as_str()) {
                    Slurm::Invalid
                } else {
                    Slurm::Hosts(std::mem::take(&mut hosts))
                });
                hosts.clear();
            } else {
                hosts.push(line.to_owned());
            }
        }
        assert_eq!(
            results.len(),
            lists.len(),
            "scontrol stopped after {} of {} lists (next: {:?}); stderr: {}",
            results.len(),
            lists.len(),
            lists.get(results.len()),
            stderr.chars().take(2000).collect::<String>()
        );
        results
    }
}

/// A short host-name-like word.
fn word(rng: &mut Rng) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
    let len = 1 + rng.below(5);
    let mut word: String = (0..len)
        .map(|_| CHARS[rng.below(CHARS.len() as u64) as usize] as char)
        .collect();
    if rng.chance(15) {
        word.push_str(rng.pick(&["-", "_", ".", "-r", "0", "07", "é"]));
    }
    word
}

/// A number with its written form: mostly small, some around powers of ten,
/// some near the top of u64 (but below u64::MAX, where Slurm crashes).
fn number(rng: &mut Rng) -> u64 {
    match rng.below(10) {
        0..=5 => rng.below(20),
        6 => rng.below(1000),
        7 => 10u64.pow(1 + rng.below(18) as u32) - rng.below(3),
        8 => rng.next() / 2,
        _ => u64::MAX - 1 - rng.below(1000),
    }
}

fn padded(rng: &mut Rng, value: u64) -> String {
    if rng.chance(30) {
        let digits = value.to_string().len();
        let width = digits + rng.below(4) as usize;
        format!("{value:0width$}")
    } else {
        value.to_string()
    }
}

/// `[items]` with 1-3 items, each `N` or `LO-HI` with mixed paddings.
fn group(rng: &mut Rng) -> String {
    let items = 1 + rng.below(3);
    let mut out = String::from("[");
    for i in 0..items {
        if i > 0 {
            out.push(',');
        }
        let lo = number(rng);
        out.push_str(&padded(rng, lo));
        if rng.chance(60) {
            let span = if rng.chance(80) {
                rng.below(6)
            } else {
                rng.below(40)
            };
            let hi = lo.saturating_add(span).min(u64::MAX - 1);
            out.push('-');
            out.push_str(&padded(rng, hi));
        }
    }
    out.push(']');
    out
}

/// Naming schemes of real sites; `true`: text after the last bracket, which
/// Slurm accepts from 23.11 on.
const SCHEMES: &[(&str, bool)] = &[
    ("login1,n[1-4]", false),
    ("rack[1-4]-node[01-32]", false),
    ("cn[0001-0100]", false),
    ("r[1-2]c[01-04]n[1-8]", false),
    ("dgx[01-08]-ib[0-1]", false),
    ("gpu[001-128]-ib0", true),
    ("node[01-32]-hsn", true),
    ("gpu[1-2]-ib", true),
    ("nid[00001-00016].cluster.example.org", true),
    ("rack[1-2]-gpu[01-16]-ib", true),
];

/// Text after the last bracket: typical suffixes and random words.
fn suffix(rng: &mut Rng) -> String {
    if rng.chance(50) {
        rng.pick(&[
            "-ib", "-ib0", "x", "-hsn", ".cluster", "5", "-07", "_a", "-", ".",
        ])
        .to_owned()
    } else {
        word(rng)
    }
}

fn element(rng: &mut Rng, previous: Option<&String>, rules: Rules) -> String {
    // From 23.11 on, any element with brackets may end in text.
    let suffixes = rules != Rules::V22_05;
    let with_suffix = |out: String, rng: &mut Rng| {
        if suffixes && rng.chance(40) {
            out + &suffix(rng)
        } else {
            out
        }
    };
    match rng.below(12) {
        0 | 1 => {
            let mut name = word(rng);
            if name.ends_with(|c: char| c.is_ascii_digit()) {
                // Keep the trailing number below u64::MAX (see the
                // malformed-list test for what Slurm does above it).
                name.push('n');
            }
            if rng.chance(60) {
                let value = number(rng);
                name.push_str(&padded(rng, value));
            }
            name
        }
        2..=4 => {
            let out = word(rng) + &group(rng);
            with_suffix(out, rng)
        }
        5..=7 => {
            let groups = 2 + rng.below(3);
            let mut out = if rng.chance(85) {
                word(rng)
            } else {
                String::new()
            };
            for g in 0..groups {
                if g > 0 {
                    out.push_str(rng.pick(&["-", "", "x", "-n", ".", "5"]));
                }
                out.push_str(&group(rng));
            }
            with_suffix(out, rng)
        }
        8 => {
            let out = group(rng);
            with_suffix(out, rng)
        }
        9 | 10 => loop {
            let (scheme, needs_suffix) = SCHEMES[rng.below(SCHEMES.len() as u64) as usize];
            if suffixes || !needs_suffix {
                break scheme.to_owned();
            }
        },
        _ => previous.cloned().unwrap_or_else(|| word(rng)),
    }
}

/// A list valid under `rules` of at most `max_hosts` hosts.
fn valid_list(rng: &mut Rng, max_hosts: u64, rules: Rules) -> String {
    loop {
        let elements = 1 + rng.below(4);
        let mut parts: Vec<String> = Vec::new();
        for _ in 0..elements {
            let e = element(rng, parts.last(), rules);
            parts.push(e);
        }
        let mut list = parts.join(",");
        if rng.chance(5) {
            list = format!(",{list},,");
        }
        let count = rules
            .count(&list)
            .unwrap_or_else(|e| panic!("generated list {list:?} was refused: {e}"));
        if (1..=max_hosts).contains(&count) {
            return list;
        }
    }
}

fn expand_matches_scontrol_on_valid_lists(rules: Rules) {
    let started = Instant::now();
    let scontrol = Scontrol::new(rules);
    let mut rng = Rng(0x0005_1e44);
    let lists: Vec<String> = (0..5_000)
        .map(|_| valid_list(&mut rng, 300, rules))
        .collect();
    let slurm = scontrol.batch(&lists);
    let after_bracket = lists.iter().filter(|l| has_suffix(l)).count();

    let mut failures = Vec::new();
    let mut hosts_compared = 0;
    for (list, slurm) in lists.iter().zip(slurm) {
        let ours = rules.expand(list).map_err(|e| e.to_string());
        let agree = matches!((&ours, &slurm), (Ok(a), Slurm::Hosts(b)) if a == b);
        if agree {
            hosts_compared += ours.as_ref().map_or(0, Vec::len);
            // The lazy queries must agree with the expansion too.
            let hosts = ours.unwrap();
            assert_eq!(rules.count(list), Ok(hosts.len() as u64), "{list}");
            assert_eq!(rules.first_host(list).as_ref(), Ok(&hosts[0]), "{list}");
            let last = hosts.len() as u64 - 1;
            assert_eq!(
                rules.nth_host(list, last),
                Ok(hosts.last().cloned()),
                "{list}"
            );
            continue;
        }
        failures.push(difference(list, &ours, &slurm, &scontrol));
        if failures.len() == 20 {
            break;
        }
    }
    assert!(
        failures.is_empty(),
        "{} lists differ from scontrol:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!(
        "{rules:?}: {} lists ({after_bracket} with text after a bracket), \
         {hosts_compared} hosts identical to scontrol in {:.1?}",
        lists.len(),
        started.elapsed()
    );
    assert!(hosts_compared > 20_000, "too few hosts: {hosts_compared}");
    if rules != Rules::V22_05 {
        assert!(after_bracket >= 1_000, "too few suffixes: {after_bracket}");
    }
}

/// Whether some element of `list` has text after its last `]`.
fn has_suffix(list: &str) -> bool {
    // `tail`: characters since the last ']' of the current element.
    let (mut open, mut tail) = (false, None::<usize>);
    for b in list.bytes().chain([b',']) {
        match b {
            b'[' => open = true,
            b']' => {
                open = false;
                tail = Some(0);
            }
            b',' if !open => {
                if tail.is_some_and(|n| n > 0) {
                    return true;
                }
                tail = None;
            }
            _ => tail = tail.map(|n| n + 1),
        }
    }
    false
}

/// Ranges Slurm accepts only through `strtoul` quirks, refused by us on
/// purpose (see src/hostlist.rs): `1-` (read as `1`) and junk between the
/// first number and the dash (`1n-3`, read as `1-3` padded to 2).
fn strtoul_quirk(range: &str) -> bool {
    let Some((lo, hi)) = range.split_once('-') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let starts_with_digit = lo.bytes().next().is_some_and(|b| b.is_ascii_digit());
    (hi.is_empty() && digits(lo)) || (starts_with_digit && !digits(lo) && digits(hi))
}

/// Whether byte `at` of `list` lies in the third-from-last or an earlier
/// bracket group of its element: Slurm's `_push_range_list` ignores errors
/// there (it recurses for those groups and keeps `MAX(rc, rc1)`, so a -1
/// from the recursion is lost) and silently drops the hosts concerned.
fn deep_group(list: &str, at: usize) -> bool {
    // The element around `at`: separators outside brackets delimit it.
    let (mut start, mut end, mut open) = (0, list.len(), false);
    for (i, b) in list.bytes().enumerate() {
        match b {
            b'[' => open = true,
            b']' => open = false,
            b',' | b' ' | b'\t' if !open && i < at => start = i + 1,
            b',' | b' ' | b'\t' if !open => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let brackets = |s: &str| s.bytes().filter(|&b| b == b'[').count();
    // `at` is in the group opened by the last '[' at or before it.
    brackets(&list[start..=at]) + 2 <= brackets(&list[start..end])
}

/// Where Slurm has an answer and we have an error, the error must be one of
/// the documented differences.
fn documented_difference(list: &str, e: &HostlistError) -> bool {
    match e {
        HostlistError::UnclosedBracket { .. }
        | HostlistError::UnopenedBracket { .. }
        | HostlistError::NestedBracket { .. } => true,
        HostlistError::InvalidRange { range, at, .. } => {
            strtoul_quirk(range) || deep_group(list, *at)
        }
        HostlistError::ReversedRange { at, .. }
        | HostlistError::RangeTooLarge { at, .. }
        | HostlistError::GroupTooLarge { at, .. } => deep_group(list, *at),
        _ => false,
    }
}

fn random_strings_agree_with_scontrol(rules: Rules) {
    const ALPHABET: &[u8] = b"n0123456789[]-,";
    let started = Instant::now();
    let scontrol = Scontrol::new(rules);
    let mut rng = Rng(0xba5e);
    let mut seen = HashSet::new();
    let mut lists = Vec::new();
    while lists.len() < 4_000 {
        // Half the strings are any mix of the alphabet (mostly unbalanced
        // brackets); the other half keep brackets paired so that the range
        // and group rules get exercised too.
        let paired = lists.len() % 2 == 1;
        let len = 1 + rng.below(12);
        let mut list = String::new();
        let mut run = 0;
        let mut open = false;
        while (list.len() as u64) < len {
            let mut c = ALPHABET[rng.below(ALPHABET.len() as u64) as usize];
            if paired {
                if c == b']' && !open {
                    c = b'[';
                } else if c == b'[' && open {
                    c = b']';
                }
            }
            // At most two digits in a row keeps every expansion small
            // (below 10^4 hosts) whatever the brackets do.
            if c.is_ascii_digit() && run == 2 {
                c = b'-';
            }
            run = if c.is_ascii_digit() { run + 1 } else { 0 };
            open = match c {
                b'[' => true,
                b']' => false,
                _ => open,
            };
            list.push(c as char);
        }
        if paired && open {
            list.push(']');
        }
        if seen.insert(list.clone()) {
            lists.push(list);
        }
    }
    let slurm = scontrol.batch(&lists);

    let (mut both_valid, mut both_invalid, mut documented) = (0, 0, 0);
    let mut failures = Vec::new();
    for (list, slurm) in lists.iter().zip(slurm) {
        let ours = rules.expand(list);
        match (&ours, &slurm) {
            (Ok(a), Slurm::Hosts(b)) if a == b => both_valid += 1,
            (Err(_), Slurm::Invalid) => both_invalid += 1,
            (Err(e), Slurm::Hosts(_)) if documented_difference(list, e) => documented += 1,
            _ => failures.push(difference(list, &ours, &slurm, &scontrol)),
        }
        if failures.len() == 20 {
            break;
        }
    }
    assert!(
        failures.is_empty(),
        "{} random strings differ from scontrol:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!(
        "{rules:?}: {} random strings: {both_valid} same hosts, {both_invalid} both invalid, \
         {documented} refused by us on purpose; {:.1?}",
        lists.len(),
        started.elapsed()
    );
    assert!(
        both_valid >= 1_000 && both_invalid >= 500 && documented >= 300,
        "too little coverage"
    );
}

fn malformed_lists_are_errors_and_scontrol_agrees_or_differs_as_documented(rules: Rules) {
    let scontrol = Scontrol::new(rules);
    let hosts = |s: &str| Slurm::Hosts(s.split_whitespace().map(str::to_owned).collect());
    // (list, what scontrol does, which error we give)
    let mut cases = vec![
        ("n[5-1]", Slurm::Invalid, "ReversedRange"),
        ("ok,n[5-1]", Slurm::Invalid, "ReversedRange"),
        ("n[5-1]x", Slurm::Invalid, "ReversedRange"),
        ("n[]", Slurm::Invalid, "InvalidRange"),
        ("n[1,,2]", Slurm::Invalid, "InvalidRange"),
        ("n[a-b]", Slurm::Invalid, "InvalidRange"),
        ("n[1--2]", Slurm::Invalid, "InvalidRange"),
        ("n[1x2]", Slurm::Invalid, "InvalidRange"),
        ("n[1-65537]", Slurm::Invalid, "RangeTooLarge"),
        ("n[1-1000000000]", Slurm::Invalid, "RangeTooLarge"),
        (
            "n[1-40000,40001-65537]-[1]",
            Slurm::Invalid,
            "GroupTooLarge",
        ),
        // Documented differences: Slurm answers, we refuse.
        ("a]", hosts("a]"), "UnopenedBracket"),
        ("x]y[1-2]", hosts("x]y1 x]y2"), "UnopenedBracket"),
        ("a[[1-2]", hosts("a[1 a[2"), "NestedBracket"),
        ("n[1-]", hosts("n1"), "InvalidRange"),
        ("n[1a-3]", hosts("n01 n02 n03"), "InvalidRange"),
        ("n[ 1]", hosts("n01"), "InvalidRange"),
        ("n[1, 3]", hosts("n1 n03"), "InvalidRange"),
        // Errors in the third-from-last or an earlier group: Slurm logs
        // them, drops those hosts and carries on.
        ("z,a[x]b[1]c[2],y", hosts("z y"), "InvalidRange"),
        ("a[5-1]b[1]c[2]", hosts(""), "ReversedRange"),
        ("a[1]b[x]c[2]", Slurm::Invalid, "InvalidRange"),
        (
            "n99999999999999999999",
            hosts("n18446744073709551615"),
            "NumberOverflow",
        ),
    ];
    if rules == Rules::V22_05 {
        cases.extend([
            // `_hostlist_create_bracketed`: nothing after the last ']'.
            ("n[1-3]x", Slurm::Invalid, "TextAfterBracket"),
            ("gpu[01-02]-ib", Slurm::Invalid, "TextAfterBracket"),
            ("n[1-2]x[3-4]y", Slurm::Invalid, "TextAfterBracket"),
            ("n[1-2]]", Slurm::Invalid, "UnopenedBracket"),
            // 22.05 closes an unclosed bracket itself.
            ("n[1-3", hosts("n]"), "UnclosedBracket"),
        ]);
    } else {
        cases.extend([
            // From 23.11 the text after the last ']' is a suffix, even a ']'.
            ("n[1-2]]", hosts("n1] n2]"), "UnopenedBracket"),
            // From 23.02 an unclosed bracket is an error.
            ("n[1-3", Slurm::Invalid, "UnclosedBracket"),
            ("n[1-3,x", Slurm::Invalid, "UnclosedBracket"),
        ]);
    }
    for (list, slurm_says, variant) in cases {
        assert_eq!(scontrol.single(list), slurm_says, "scontrol on {list:?}");
        match rules.expand(list) {
            // The Debug form starts with the variant's name.
            Err(e) => assert!(
                format!("{e:?}").starts_with(&format!("{variant} ")),
                "{list:?}: expected {variant}, got {e:?}"
            ),
            Ok(hosts) => panic!("{list:?} should be an error, gave {hosts:?}"),
        }
        assert!(rules.first_host(list).is_err(), "{list:?}");
        assert!(rules.count(list).is_err(), "{list:?}");
    }
}

fn whitespace_separators_match_scontrol(rules: Rules) {
    let scontrol = Scontrol::new(rules);
    let mut lists = vec![
        "a b",
        "a\tb",
        " n[1-2] , m ",
        "x,\t y",
        "n[01-02]  rack[1-2]-[3-4]-[5]",
    ];
    if rules != Rules::V22_05 {
        // `hostlist_create_dims` separates on newlines from 23.02 on (22.05
        // keeps them in names, refused here as control characters).
        lists.extend(["a\nb", "n[1-2]-ib\nlogin1,\n"]);
    }
    for list in lists {
        let ours = rules.expand(list).unwrap();
        assert_eq!(scontrol.single(list), Slurm::Hosts(ours), "{list:?}");
    }
}

/// Site naming schemes (`gpu[01-02]-ib`, rack and node groups, padded
/// ranges), one `scontrol` call each: identical
/// hosts, or (22.05, text after brackets) invalid on both sides.
fn site_naming_schemes_match_scontrol(rules: Rules) {
    let scontrol = Scontrol::new(rules);
    for (list, needs_suffix) in SCHEMES.iter().copied().chain([
        ("n[1-3]x", true),
        ("a[1-2]b[3-4]c[5]d", true),
        ("n[1]99999999999999999999", true),
        ("login1,gpu[01-02]-ib,n[1-4]", true),
    ]) {
        let slurm = scontrol.single(list);
        match rules.expand(list) {
            Ok(ours) => {
                assert!(!needs_suffix || rules != Rules::V22_05, "{list:?}");
                assert_eq!(slurm, Slurm::Hosts(ours), "{list:?}");
            }
            Err(e) => {
                assert!(needs_suffix && rules == Rules::V22_05, "{list:?}: {e}");
                assert!(matches!(e, HostlistError::TextAfterBracket { .. }), "{e:?}");
                assert_eq!(slurm, Slurm::Invalid, "{list:?}");
            }
        }
    }
}
