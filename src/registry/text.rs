//! Small helpers on names and paths: escaping a job string for one log
//! line, lexical path normalisation, edit distance for "closest names".
#![forbid(unsafe_code)]

use std::path::{Component, Path, PathBuf};

pub(super) fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// A string from a job, safe for one log line: escaped and capped.
pub fn escaped(s: &str) -> String {
    const CAP: usize = 512;
    let mut out: String = s.chars().take(CAP).flat_map(char::escape_default).collect();
    if s.chars().nth(CAP).is_some() {
        out.push_str("...");
    }
    out
}

/// `a/./b/../c` -> `a/c`, without touching the file system.
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Levenshtein distance, bounded work for long inputs.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().take(256).collect();
    let b: Vec<char> = b.chars().take(256).collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
        assert_eq!(normalize(Path::new("/../..")), PathBuf::from("/"));
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
