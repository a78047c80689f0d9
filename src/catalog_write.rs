//! Writing the catalog (SPEC: "Writers (the CLI) replace the catalog
//! atomically under a lock: a reader never sees half a file").
//!
//! Every change takes an exclusive lock on `.registry/catalog.lock`,
//! re-reads the catalog, applies the change, renders it, checks the result
//! parses back to the same entries, writes a temporary file in the same
//! directory, fsyncs it, renames it over the catalog and fsyncs the
//! directory. Readers never lock: rename(2) swaps whole files.
#![forbid(unsafe_code)]

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::catalog::{self, Catalog, CatalogError, Image};

#[derive(Debug)]
pub enum WriteError {
    Io { path: PathBuf, source: io::Error },
    Catalog(CatalogError),
    Duplicate { reference: String },
    NotFound { reference: String },
    Invalid { message: String },
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            WriteError::Catalog(e) => write!(f, "{e}"),
            WriteError::Duplicate { reference } => write!(
                f,
                "{reference} is already in the catalog: remove it first (ml-container remove {reference})"
            ),
            WriteError::NotFound { reference } => write!(
                f,
                "{reference} is not in the catalog ('ml-container list' shows what is)"
            ),
            WriteError::Invalid { message } => write!(f, "{message}"),
        }
    }
}

impl std::error::Error for WriteError {}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WriteError + '_ {
    move |source| WriteError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Inverse of catalog::days_from_civil (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The catalog as TOML text, entries in order.
pub fn render(c: &Catalog) -> String {
    let mut out = String::from(
        "# Written by ml-container; edit with 'ml-container add/remove'.\nversion = 1\n",
    );
    for im in &c.images {
        out.push_str("\n[[image]]\n");
        out.push_str(&format!(
            "name = {}\ntag = {}\n",
            quote(&im.name),
            quote(&im.tag)
        ));
        out.push_str(&format!("path = {}\n", quote(&im.path.to_string_lossy())));
        if let Some(s) = &im.sha256 {
            out.push_str(&format!("sha256 = {}\n", quote(s)));
        }
        if let Some(s) = im.size {
            out.push_str(&format!("size = {s}\n"));
        }
        if im.default {
            out.push_str("default = true\n");
        }
        if !im.aliases.is_empty() {
            let a: Vec<String> = im.aliases.iter().map(|a| quote(a)).collect();
            out.push_str(&format!("aliases = [{}]\n", a.join(", ")));
        }
        if let Some(d) = &im.description {
            out.push_str(&format!("description = {}\n", quote(d)));
        }
        if !im.labels.is_empty() {
            let l: Vec<String> = im
                .labels
                .iter()
                .map(|(k, v)| format!("{} = {}", quote(k), quote(v)))
                .collect();
            out.push_str(&format!("labels = {{ {} }}\n", l.join(", ")));
        }
        if let Some(a) = im.added {
            out.push_str(&format!("added = {}\n", format_rfc3339(a)));
        }
    }
    out
}

/// Holds the registry's catalog lock; dropped, it releases it.
#[derive(Debug)]
pub struct Locked {
    _lock: File,
    path: PathBuf,
    pub catalog: Catalog,
}

/// Takes the lock and reads the current catalog (empty when absent).
pub fn lock(root: &Path) -> Result<Locked, WriteError> {
    let dir = root.join(".registry");
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let lock_path = dir.join("catalog.lock");
    let lock = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;
    let path = root.join(catalog::CATALOG_PATH);
    let catalog = match fs::read_to_string(&path) {
        Ok(text) => Catalog::parse(&path, &text).map_err(WriteError::Catalog)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Catalog::default(),
        Err(e) => return Err(io_err(&path)(e)),
    };
    Ok(Locked {
        _lock: lock,
        path,
        catalog,
    })
}

impl Locked {
    /// Adds `image`; with `default`, the other tags of its name lose theirs.
    pub fn add(&mut self, image: Image) -> Result<(), WriteError> {
        if self.catalog.get(&image.name, &image.tag).is_some() {
            return Err(WriteError::Duplicate {
                reference: image.reference(),
            });
        }
        if image.default {
            for other in self
                .catalog
                .images
                .iter_mut()
                .filter(|i| i.name == image.name)
            {
                other.default = false;
            }
        }
        self.catalog.images.push(image);
        Ok(())
    }

    pub fn remove(&mut self, name: &str, tag: &str) -> Result<Image, WriteError> {
        let idx = self
            .catalog
            .images
            .iter()
            .position(|i| i.name == name && i.tag == tag)
            .ok_or_else(|| WriteError::NotFound {
                reference: format!("{name}:{tag}"),
            })?;
        Ok(self.catalog.images.remove(idx))
    }

    /// Renders, checks and atomically replaces the catalog file.
    pub fn commit(self) -> Result<(), WriteError> {
        let text = render(&self.catalog);
        // What we write must be a valid catalog with the same entries.
        let back = Catalog::parse(&self.path, &text).map_err(|e| WriteError::Invalid {
            message: format!("the change would make the catalog invalid: {e}"),
        })?;
        if back.images.len() != self.catalog.images.len() {
            return Err(WriteError::Invalid {
                message: "internal: the rendered catalog lost entries".to_string(),
            });
        }
        crate::secure::replace_file(&self.path, text.as_bytes(), 0o644, None)
            .map_err(io_err(&self.path))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str, tag: &str, default: bool) -> Image {
        Image {
            name: name.into(),
            tag: tag.into(),
            path: format!("ml-frameworks/{name}-{tag}.sif").into(),
            sha256: Some("ab".repeat(32)),
            size: Some(1048576),
            default,
            aliases: vec![format!("registry.example/{name}:{tag}")],
            description: Some("with \"quotes\" and \\ backslash".into()),
            labels: [("cuda".to_string(), "12.1".to_string())]
                .into_iter()
                .collect(),
            added: Some(1_700_000_000),
            line: 0,
        }
    }

    #[test]
    fn dates() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_868_800), "2000-03-01T00:00:00Z");
        for s in [0i64, 1, 86399, 951_782_400, 1_700_000_000, 4_102_444_800] {
            assert_eq!(catalog::parse_rfc3339(&format_rfc3339(s)), Some(s));
        }
    }

    #[test]
    fn render_round_trips() {
        let c = Catalog {
            images: vec![
                image("a", "1", false),
                image("a", "2", true),
                image("b", "x", false),
            ],
        };
        let back = Catalog::parse(Path::new("/c"), &render(&c)).unwrap();
        assert_eq!(back.images.len(), 3);
        for (x, y) in c.images.iter().zip(&back.images) {
            assert_eq!(
                (&x.name, &x.tag, &x.path, &x.sha256, x.size, x.default),
                (&y.name, &y.tag, &y.path, &y.sha256, y.size, y.default)
            );
            assert_eq!(
                (&x.aliases, &x.description, &x.labels, x.added),
                (&y.aliases, &y.description, &y.labels, y.added)
            );
        }
    }

    #[test]
    fn add_remove_commit() {
        let root = std::env::temp_dir().join(format!("mlc-cw-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let mut l = lock(&root).unwrap();
        l.add(image("a", "1", true)).unwrap();
        l.add(image("a", "2", true)).unwrap();
        assert!(matches!(
            l.add(image("a", "2", false)),
            Err(WriteError::Duplicate { .. })
        ));
        l.commit().unwrap();
        let mut l = lock(&root).unwrap();
        assert_eq!(l.catalog.images.len(), 2);
        assert_eq!(
            l.catalog.default_for("a").map(|i| i.tag.as_str()),
            Some("2")
        );
        l.remove("a", "2").unwrap();
        assert!(matches!(
            l.remove("a", "9"),
            Err(WriteError::NotFound { .. })
        ));
        // An alias colliding with an entry is refused at commit.
        let mut bad = image("c", "1", false);
        bad.aliases = vec!["a:1".into()];
        l.add(bad).unwrap();
        assert!(matches!(l.commit(), Err(WriteError::Invalid { .. })));
        let l = lock(&root).unwrap();
        assert_eq!(l.catalog.images.len(), 2, "a failed commit changed nothing");
        drop(l);
        fs::remove_dir_all(&root).unwrap();
    }
}
