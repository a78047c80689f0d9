//! Where in a TOML text an error lies, for messages that name file, line
//! and key: the one home of these helpers for the site config
//! ([`crate::config`]) and the catalog and registry settings
//! ([`crate::catalog`]).
#![forbid(unsafe_code)]

/// A parser's message on one line (toml's messages span several).
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The byte offset a toml error points at; 0 (the first line) when it
/// points nowhere.
pub fn error_offset(e: &toml::de::Error) -> usize {
    e.span().map_or(0, |s| s.start)
}

/// The 1-based line of byte `offset` (past the end: the last line).
pub fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset.min(text.len()))
        .map_or(1, |t| t.matches('\n').count() + 1)
}

/// Byte offsets of line starts, so that finding the line of each of 10,000
/// catalog entries is a binary search, not a scan from the top each time.
#[derive(Debug)]
pub struct Lines(Vec<usize>);

impl Lines {
    pub fn new(text: &str) -> Lines {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Lines(starts)
    }

    /// The 1-based line of byte `offset`, as [`line_of`] counts it.
    pub fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&start| start <= offset).max(1)
    }
}

/// The 1-based line of byte `offset` and the dotted key written there
/// (`section.key`), found from the text around it.
pub fn locate(text: &str, offset: usize) -> (usize, String) {
    let line_no = line_of(text, offset);
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let section = text
        .lines()
        .take(line_no)
        .filter_map(section_name)
        .last()
        .unwrap_or_default();
    let key = match line.split_once('=') {
        _ if section_name(line).is_some() => section.clone(),
        Some((k, _)) => {
            let k = k.trim().trim_matches('"');
            if section.is_empty() {
                k.to_string()
            } else {
                format!("{section}.{k}")
            }
        }
        None => section.clone(),
    };
    (line_no, key)
}

/// The name of the table a `[section]` line opens; `None` for other lines.
pub fn section_name(line: &str) -> Option<String> {
    let l = line.trim();
    if l.starts_with('[') {
        let inner = l.trim_start_matches('[');
        let end = inner.find(']')?;
        Some(inner[..end].trim().to_string())
    } else {
        None
    }
}

/// The 1-based line where `key` is set in `[section]`, when it is.
pub fn find_key_line(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(s) = section_name(line) {
            current = s;
        } else if current == section {
            if let Some((k, _)) = line.split_once('=') {
                if k.trim().trim_matches('"') == key {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_index_matches_counting() {
        let text = "a\nbb\n\nccc\n";
        let lines = Lines::new(text);
        for offset in 0..=text.len() + 3 {
            assert_eq!(lines.line(offset), line_of(text, offset), "offset {offset}");
        }
    }

    #[test]
    fn locate_names_line_and_dotted_key() {
        let text = "top = 1\n[registry]\nroot = \"/x\"\n[[image]]\n";
        assert_eq!(locate(text, 0), (1, "top".into()));
        assert_eq!(
            locate(text, text.find("root").unwrap_or(0)),
            (3, "registry.root".into())
        );
        assert_eq!(
            locate(text, text.find("[registry]").unwrap_or(0)),
            (2, "registry".into())
        );
        assert_eq!(locate(text, 10_000).0, 5);
        assert_eq!(find_key_line(text, "registry", "root"), Some(3));
        assert_eq!(find_key_line(text, "registry", "top"), None);
        assert_eq!(section_name("[[image]]").as_deref(), Some("image"));
        assert_eq!(one_line("a\n  b\tc "), "a b c");
    }
}
