//! Strings from a job on their way into a log, syslog, the metrics log or a
//! report's free text. Everything a job hands the plugin
//! (option values, image names, paths, the environment) is untrusted: a raw
//! newline in one would forge a line of the slurmd log, a terminal escape
//! would rewrite an admin's screen, a 100 KB value would bloat every log it
//! reaches. [`escape`] is the one function that makes such a string safe to
//! write: control characters (C0, DEL, C1), the Unicode line and paragraph
//! separators and the bidirectional overrides become visible escapes, and
//! the result is capped.
//!
//! Backslashes are left alone on purpose: escaping them too would double
//! them each time an already escaped message is escaped again (the plugin's
//! log sink escapes every line as a last line of defence). A literal `\n`
//! typed by the user then reads like an escaped newline, which forges no
//! line: the log stays one line per record.
#![forbid(unsafe_code)]

use std::fmt::Write;

/// The cap for one job string inside a log line.
pub const FIELD_CAP: usize = 512;
/// The cap for a whole log line the plugin writes to Slurm's log.
pub const LINE_CAP: usize = 4096;

/// Characters that could break a line or reorder what a reader sees.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
        )
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// `s` with every control or line-breaking character escaped (`\n`, `\r`,
/// `\t`, else `\u{..}`), at most `cap` bytes long; a longer result ends in
/// `...[N more bytes]` (N counts the input left out) within the cap.
pub fn escape(s: &str, cap: usize) -> String {
    const MARK_MAX: usize = 32;
    let mut out = String::with_capacity(s.len().min(cap));
    for (i, c) in s.char_indices() {
        let before = out.len();
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
        if out.len() > cap {
            // Leave room for the marker, cutting at a char boundary of the
            // output (escapes are ASCII, so any boundary of `out` is one).
            let mut keep = cap.saturating_sub(MARK_MAX).min(before);
            while !out.is_char_boundary(keep) {
                keep -= 1;
            }
            let consumed_in = input_offset(s, &out[..keep]).unwrap_or(i);
            out.truncate(keep);
            let _ = write!(out, "...[{} more bytes]", s.len() - consumed_in);
            if out.len() > cap {
                // A cap smaller than the marker: the cap wins.
                let mut k = cap;
                while !out.is_char_boundary(k) {
                    k -= 1;
                }
                out.truncate(k);
            }
            return out;
        }
    }
    out
}

/// How many bytes of `input` the escaped prefix `out_prefix` stands for.
fn input_offset(input: &str, out_prefix: &str) -> Option<usize> {
    let mut produced = 0;
    for (i, c) in input.char_indices() {
        if produced >= out_prefix.len() {
            return Some(i);
        }
        produced += match c {
            '\n' | '\r' | '\t' => 2,
            c if needs_escape(c) => format!("\\u{{{:x}}}", c as u32).len(),
            c => c.len_utf8(),
        };
    }
    Some(input.len())
}

/// [`escape`] with the field cap: for a job string inside a log line.
pub fn field(s: &str) -> String {
    escape(s, FIELD_CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_visible() {
        assert_eq!(field("demo\nFAKE line"), "demo\\nFAKE line");
        assert_eq!(
            field("a\r\tb\u{1b}[2Jc\u{7f}"),
            "a\\r\\tb\\u{1b}[2Jc\\u{7f}"
        );
        assert_eq!(
            field("x\u{2028}y\u{202e}z\u{85}"),
            "x\\u{2028}y\\u{202e}z\\u{85}"
        );
        assert_eq!(field("plain:tag/ü"), "plain:tag/ü");
        // Idempotent: escaping an escaped string changes nothing.
        let once = field("a\nb\u{0}c");
        assert_eq!(field(&once), once);
    }

    #[test]
    fn capped_with_a_marker() {
        let long = "é".repeat(1000);
        let e = escape(&long, 100);
        assert!(e.len() <= 100, "{} bytes", e.len());
        assert!(e.ends_with(" more bytes]"), "{e}");
        let kept = e.split("...[").next().unwrap();
        let more: usize = e
            .rsplit("...[")
            .next()
            .unwrap()
            .trim_end_matches(" more bytes]")
            .parse()
            .unwrap();
        assert_eq!(kept.len() + more, long.len());
        let nl = "\n".repeat(500);
        let e = escape(&nl, 64);
        assert!(e.len() <= 64 && !e.contains('\n'), "{e}");
        assert!(escape("abc", 2).len() <= 2);
        assert_eq!(escape("short", 5), "short");
    }
}
