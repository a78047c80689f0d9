//! The registry catalog, `<root>/.registry/catalog.toml`; README "Images: the registry".
//!
//! Strict on purpose: the catalog decides which file a job runs, so a typo
//! must be an error naming the file, the line and the entry, never a silent
//! fallback. Checked: `version = 1`, unknown keys, duplicate `name:tag`, two
//! defaults for one name, malformed sha256, names, tags, aliases and dates,
//! and aliases that collide with other entries.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::tomlpos;

/// The catalog's path under the registry root.
pub const CATALOG_PATH: &str = ".registry/catalog.toml";
/// The registry-wide settings under the registry root (optional).
pub const REGISTRY_CONFIG_PATH: &str = ".registry/config.toml";
/// 10,000 entries take about 3 MB; anything near this is not a catalog.
pub const MAX_CATALOG_BYTES: u64 = 64 << 20;

/// One `[[image]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub name: String,
    pub tag: String,
    /// As written: relative to the registry root, or absolute.
    pub path: PathBuf,
    pub sha256: Option<String>,
    pub size: Option<u64>,
    pub default: bool,
    pub aliases: Vec<String>,
    pub description: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Seconds since the epoch, UTC, for "newest added".
    pub added: Option<i64>,
    /// Where the entry starts in the catalog file (1-based line).
    pub line: usize,
}

impl Image {
    pub fn reference(&self) -> String {
        format!("{}:{}", self.name, self.tag)
    }
}

/// A parsed, consistent catalog.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    pub images: Vec<Image>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogError {
    pub path: PathBuf,
    pub line: usize,
    /// The entry at fault (`#3 pytorch:2.1`), empty for file-level problems.
    pub entry: String,
    pub message: String,
}

impl fmt::Display for CatalogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.path.display(), self.line)?;
        if !self.entry.is_empty() {
            write!(f, "image {}: ", self.entry)?;
        }
        write!(
            f,
            "{}; fix the catalog (ml-container add/remove rewrite it safely)",
            self.message
        )
    }
}

impl std::error::Error for CatalogError {}

/// `.registry/config.toml`: settings the registry's owner controls, next
/// to the catalog they describe. Optional; strict like the catalog.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySettings {
    #[serde(default = "one")]
    version: i64,
    /// Replaces the site config's `registry.search_dirs` for this registry.
    pub search_dirs: Option<Vec<SearchDir>>,
    /// A floor: `full` here makes every node hash this registry's images
    /// even where the site config says `quick`.
    pub verify: Option<crate::config::VerifyLevel>,
}

fn one() -> i64 {
    1
}

/// A directory name under the registry root (no `/`, no `..`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchDir(pub String);

impl<'de> Deserialize<'de> for SearchDir {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() || s.contains('/') || s == "." || s == ".." || s.contains('\0') {
            return Err(serde::de::Error::custom(format!(
                "'{}' is not a directory name under the registry root",
                s.escape_default()
            )));
        }
        Ok(SearchDir(s))
    }
}

impl RegistrySettings {
    pub fn parse(path: &Path, text: &str) -> Result<RegistrySettings, CatalogError> {
        let err = |line, message: String| CatalogError {
            path: path.to_path_buf(),
            line,
            entry: String::new(),
            message,
        };
        let s: RegistrySettings = toml::from_str(text).map_err(|e| {
            let line = tomlpos::line_of(text, tomlpos::error_offset(&e));
            err(line, tomlpos::one_line(e.message()))
        })?;
        if s.version != 1 {
            return Err(err(
                1,
                format!(
                    "unsupported registry config version {} (this plugin reads 1)",
                    s.version
                ),
            ));
        }
        Ok(s)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    version: toml::Spanned<i64>,
    #[serde(default)]
    image: Vec<toml::Spanned<RawImage>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    name: Name,
    tag: Tag,
    path: NonEmpty,
    sha256: Option<Sha256>,
    size: Option<u64>,
    #[serde(default)]
    default: bool,
    #[serde(default)]
    aliases: Vec<Alias>,
    description: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    added: Option<Added>,
}

/// Validating wrappers: a failure inside `Deserialize` carries the span of
/// the value, so the error names the exact line.
macro_rules! checked_string {
    ($ty:ident, $check:expr, $what:expr) => {
        struct $ty(String);
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                let check: fn(&str) -> bool = $check;
                if check(&s) {
                    Ok($ty(s))
                } else {
                    Err(serde::de::Error::custom(format!(
                        "'{}' is not a valid {}",
                        s.escape_default(),
                        $what
                    )))
                }
            }
        }
    };
}

checked_string!(
    Name,
    valid_name,
    "image name (lowercase letters, digits, '.', '_', '-', '/'; starting with a letter or digit)"
);
checked_string!(
    Tag,
    valid_tag,
    "tag (letters, digits, '.', '_', '-', '+'; at most 128, not starting with '.', '-' or '+')"
);
checked_string!(
    Alias,
    valid_alias,
    "alias (a name, name:tag or registry reference without spaces)"
);
checked_string!(Sha256, is_sha256_hex, "sha256 (64 lowercase hex digits)");

/// A sha256 as the catalog, pins and caches write it: 64 lowercase hex
/// digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
checked_string!(NonEmpty, |s| !s.is_empty() && !s.contains('\0'), "path");

/// A name: what users type before the `:`. Slashes are allowed so that
/// `nvidia/pytorch` works, `..` components are not.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-' | b'/')
        })
        && !s.split('/').any(|c| c.is_empty() || c == "." || c == "..")
}

/// A tag: what follows the `:`. `+` is allowed because every PyPI and
/// Debian build of torch carries one in its version (`2.6.0+debian`,
/// `2.1.0+cu121`), and a tag is most often that version; it is a plain
/// character in a file name and in `--ml-container=name:tag`.
pub fn valid_tag(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with(['.', '-', '+'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
}

/// What a valid tag is made of, for error messages.
pub const TAG_RULE: &str = "letters, digits, '.', '_', '-', '+'; at most 128, not starting \
                            with '.', '-' or '+'";

fn valid_alias(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && !s.starts_with('/')
        && s.bytes().all(|b| b.is_ascii_graphic())
        && !s.split(['/', ':']).any(|c| c == "..")
}

/// `added`: a TOML offset date-time or an RFC 3339 string.
struct Added(i64);

impl<'de> Deserialize<'de> for Added {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Date(toml::value::Datetime),
            Text(String),
        }
        let text = match Raw::deserialize(d) {
            Ok(Raw::Date(dt)) => dt.to_string(),
            Ok(Raw::Text(s)) => s,
            Err(_) => {
                return Err(serde::de::Error::custom(
                    "expected an RFC 3339 date-time such as 2024-01-15T10:00:00Z",
                ))
            }
        };
        parse_rfc3339(&text).map(Added).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "'{text}' is not an RFC 3339 date-time such as 2024-01-15T10:00:00Z"
            ))
        })
    }
}

/// Seconds since the epoch for `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) {
        return None;
    }
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(&rest[..1], "+" | "-") && &rest[3..4] == ":" => {
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if rest.starts_with('-') {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    Some(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec - offset)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Catalog {
    /// Parses catalog text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Catalog, CatalogError> {
        let err = |line: usize, entry: String, message: String| CatalogError {
            path: path.to_path_buf(),
            line,
            entry,
            message,
        };
        let raw: RawCatalog = toml::from_str(text).map_err(|e| {
            let offset = tomlpos::error_offset(&e);
            let line = tomlpos::line_of(text, offset);
            // Name the entry whose table holds the error, when there is one.
            let entry = text
                .get(..offset.min(text.len()))
                .map_or(0, |t| t.matches("[[image]]").count());
            let entry = if entry > 0 {
                format!("#{entry}")
            } else {
                String::new()
            };
            err(line, entry, tomlpos::one_line(e.message()))
        })?;
        if *raw.version.get_ref() != 1 {
            return Err(err(
                tomlpos::line_of(text, raw.version.span().start),
                String::new(),
                format!(
                    "unsupported catalog version {} (this plugin reads version 1)",
                    raw.version.get_ref()
                ),
            ));
        }
        let lines = tomlpos::Lines::new(text);
        let mut images = Vec::with_capacity(raw.image.len());
        let mut by_ref: HashMap<String, usize> = HashMap::new();
        let mut default_of: HashMap<String, usize> = HashMap::new();
        for (i, spanned) in raw.image.into_iter().enumerate() {
            let line = lines.line(spanned.span().start);
            let r = spanned.into_inner();
            let image = Image {
                name: r.name.0,
                tag: r.tag.0,
                path: PathBuf::from(r.path.0),
                sha256: r.sha256.map(|s| s.0),
                size: r.size,
                default: r.default,
                aliases: r.aliases.into_iter().map(|a| a.0).collect(),
                description: r.description,
                labels: r.labels,
                added: r.added.map(|a| a.0),
                line,
            };
            let entry = format!("#{} {}", i + 1, image.reference());
            if let Some(&first) = by_ref.get(&image.reference()) {
                return Err(err(
                    line,
                    entry,
                    format!(
                        "duplicate {}: also at line {}",
                        image.reference(),
                        images.get(first).map_or(0, |im: &Image| im.line)
                    ),
                ));
            }
            if image.default {
                if let Some(&first) = default_of.get(&image.name) {
                    return Err(err(
                        line,
                        entry,
                        format!(
                            "second default for '{}': {} at line {} is already the default",
                            image.name,
                            images.get(first).map_or(String::new(), Image::reference),
                            images.get(first).map_or(0, |im: &Image| im.line)
                        ),
                    ));
                }
                default_of.insert(image.name.clone(), i);
            }
            by_ref.insert(image.reference(), i);
            images.push(image);
        }
        // Aliases may not shadow an entry or each other: a reference must
        // mean one image.
        let names: HashMap<&str, usize> = images
            .iter()
            .enumerate()
            .map(|(i, im)| (im.name.as_str(), i))
            .collect();
        let mut aliases: HashMap<&str, usize> = HashMap::new();
        for (i, im) in images.iter().enumerate() {
            for a in &im.aliases {
                let entry = format!("#{} {}", i + 1, im.reference());
                if by_ref.contains_key(a.as_str()) || names.contains_key(a.as_str()) {
                    return Err(err(
                        im.line,
                        entry,
                        format!("alias '{a}' is already the name of a catalog entry"),
                    ));
                }
                if let Some(&other) = aliases.get(a.as_str()) {
                    return Err(err(
                        im.line,
                        entry,
                        format!(
                            "alias '{a}' is also an alias of {} (line {})",
                            images[other].reference(),
                            images[other].line
                        ),
                    ));
                }
                aliases.insert(a, i);
            }
        }
        Ok(Catalog { images })
    }

    /// The entry `name:tag`.
    pub fn get(&self, name: &str, tag: &str) -> Option<&Image> {
        self.images.iter().find(|i| i.name == name && i.tag == tag)
    }

    /// What a bare `name` means: the default tag, else the newest `added`
    /// (entries without a date count as oldest; ties go to the later entry).
    pub fn default_for(&self, name: &str) -> Option<&Image> {
        let tags = self.images.iter().filter(|i| i.name == name);
        tags.clone()
            .find(|i| i.default)
            .or_else(|| tags.max_by_key(|i| i.added.unwrap_or(i64::MIN)))
    }

    /// The entry that lists `reference` among its aliases.
    pub fn by_alias(&self, reference: &str) -> Option<&Image> {
        self.images
            .iter()
            .find(|i| i.aliases.iter().any(|a| a == reference))
    }

    /// Every reference a user could type: names, name:tags and aliases.
    pub fn references(&self) -> impl Iterator<Item = String> + '_ {
        self.images.iter().flat_map(|i| {
            std::iter::once(i.name.clone())
                .chain(std::iter::once(i.reference()))
                .chain(i.aliases.iter().cloned())
        })
    }
}

#[cfg(test)]
mod tests;
