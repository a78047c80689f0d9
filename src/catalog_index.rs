//! The catalog index, `<root>/.registry/catalog.idx`: answers
//! "which image does `name:tag`, an alias or a bare `name` mean" in a few
//! `pread`s instead of parsing the whole catalog (120 ms at 10,000 images).
//!
//! Written by the CLI in the same locked update as the catalog
//! ([`crate::catalog_write`]), atomically (temporary file + rename), mode
//! 0644; read with the same trust checks as the catalog (owner and mode of
//! the file and its directory, opened the one safe way).
//!
//! Layout: one header line, then one line per lookup key, sorted bytewise
//! by key, so a lookup is a binary search over byte offsets (`look(1)`
//! style: read a little at the middle, skip to the next line start):
//!
//! ```text
//! mlc-catalog-index 1 dev=D ino=I size=S mtime=SEC.NSEC ctime=SEC.NSEC records=N bytes=B
//! KEY \t name \t tag \t sha256|- \t size|- \t path \t check
//! ```
//!
//! `KEY` is `r` + `name:tag`, `a` + alias, or `n` + bare name (the entry a
//! bare name means: the default tag, else the newest `added`, computed by
//! [`Catalog::default_for`] when the index is written). `check` is 16 hex
//! digits of the sha256 of the header's catalog identity and the record, so
//! a damaged record, or one from another index, is refused.
//!
//! **Never misread.** The header records the catalog's identity (device,
//! inode, size, mtime, ctime, from `fstat`); a reader compares it with an
//! `fstat` of the catalog it opened through [`secure::open_regular`], and
//! any difference, a damaged header or record, a short file or a key not
//! found sends the reader to the full strict parse, exactly as without an
//! index. A hand edit changes the catalog's ctime, which nobody can set
//! back; the one hole would be an edit in the same tick of the file
//! system's clock as the writer's `fstat`. The writer closes it as git
//! closes its "racily clean" index: it records the identity, waits until
//! the file system's clock has moved past the catalog's ctime (a probe
//! file's ctime says so), then reads the catalog back and compares it with
//! what it wrote. An edit before that read is seen in the bytes; one after
//! it gets a later ctime. A key not found falls back too, so a lost record
//! can only cost time, never choose a scanned `<name>.sif` over a catalog
//! entry.
#![forbid(unsafe_code)]

use std::fmt;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Seek};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::catalog::{self, Catalog, Image};
use crate::secure;

/// The index's path under the registry root.
pub const INDEX_PATH: &str = ".registry/catalog.idx";
const MAGIC: &str = "mlc-catalog-index 1 ";
/// A record longer than this is damage (paths over 4,000 bytes are not
/// indexed: the catalog is then always parsed).
pub const MAX_LINE: usize = 8192;
const MAX_PATH: usize = 4000;
/// First read of a record; most are under 300 bytes.
const CHUNK: usize = 512;

/// What kind of reference a key is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `name:tag`
    NameTag,
    Alias,
    /// A bare name: its default tag, else its newest `added`.
    Bare,
}

impl Kind {
    fn prefix(self) -> char {
        match self {
            Kind::NameTag => 'r',
            Kind::Alias => 'a',
            Kind::Bare => 'n',
        }
    }
}

/// Why the index was not used (the caller then parses the catalog).
#[derive(Debug)]
pub enum IndexError {
    Missing,
    Io {
        path: PathBuf,
        source: io::Error,
    },
    Untrusted(secure::TrustError),
    /// The catalog changed since the index was written.
    Stale,
    /// The index is not what the writer wrote.
    Damaged {
        what: &'static str,
    },
}

impl fmt::Display for IndexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IndexError::Missing => write!(
                f,
                "no catalog index: 'ml-container reindex' (or any add/remove) writes it"
            ),
            IndexError::Io { path, source } => write!(
                f,
                "cannot read the catalog index {}: {source}; 'ml-container reindex' rewrites it",
                path.display()
            ),
            IndexError::Untrusted(e) => write!(f, "refusing the catalog index: {e}"),
            IndexError::Stale => write!(
                f,
                "the catalog index is stale (the catalog changed after it was written, by hand?): \
                 'ml-container reindex' rewrites it"
            ),
            IndexError::Damaged { what } => write!(
                f,
                "the catalog index is damaged ({what}): 'ml-container reindex' rewrites it"
            ),
        }
    }
}

impl std::error::Error for IndexError {}

/// The catalog file's identity, as the index records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Identity {
    pub fn of(m: &Metadata) -> Identity {
        Identity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    fn text(&self) -> String {
        format!(
            "dev={} ino={} size={} mtime={}.{:09} ctime={}.{:09}",
            self.dev, self.ino, self.size, self.mtime.0, self.mtime.1, self.ctime.0, self.ctime.1
        )
    }
}

/// What a record says: enough to pin the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub tag: String,
    pub path: PathBuf,
    pub sha256: Option<String>,
    pub size: Option<u64>,
}

impl Entry {
    /// As a catalog entry (the fields resolution uses; the rest empty).
    pub fn image(&self) -> Image {
        Image {
            name: self.name.clone(),
            tag: self.tag.clone(),
            path: self.path.clone(),
            sha256: self.sha256.clone(),
            size: self.size,
            default: false,
            aliases: Vec::new(),
            description: None,
            labels: Default::default(),
            added: None,
            line: 0,
        }
    }
}

fn check(id: &str, record: &str) -> String {
    let mut h = Sha256::new();
    h.update(id.as_bytes());
    h.update(b"\n");
    h.update(record.as_bytes());
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The index text for `catalog` whose file has identity `id`; `None` when
/// an entry cannot be indexed (a path with a tab, a line break or over
/// 4,000 bytes): the catalog is then always parsed.
pub fn render(catalog: &Catalog, id: &Identity) -> Option<String> {
    let mut records: Vec<(String, &Image)> = Vec::with_capacity(catalog.images.len() * 3);
    for im in &catalog.images {
        let path = im.path.to_str()?;
        if path.len() > MAX_PATH || path.contains(['\t', '\n', '\r']) {
            return None;
        }
        records.push((format!("r{}", im.reference()), im));
        for a in &im.aliases {
            records.push((format!("a{a}"), im));
        }
    }
    let mut names: Vec<&str> = catalog.images.iter().map(|i| i.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    for n in names {
        records.push((format!("n{n}"), catalog.default_for(n)?));
    }
    records.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let idt = id.text();
    let mut body = String::new();
    for (key, im) in &records {
        let record = format!(
            "{key}\t{}\t{}\t{}\t{}\t{}",
            im.name,
            im.tag,
            im.sha256.as_deref().unwrap_or("-"),
            im.size.map_or_else(|| "-".to_string(), |s| s.to_string()),
            im.path.to_string_lossy()
        );
        let c = check(&idt, &record);
        body.push_str(&record);
        body.push('\t');
        body.push_str(&c);
        body.push('\n');
    }
    // The header states the file's total length, which depends on the
    // header's own length: settle it (at most two rounds).
    let mut total = body.len();
    loop {
        let header = format!("{MAGIC}{idt} records={} bytes={total}\n", records.len());
        if header.len() + body.len() == total {
            return Some(header + &body);
        }
        total = header.len() + body.len();
    }
}

/// An index whose header matched the catalog opened next to it.
#[derive(Debug)]
pub struct Index {
    file: File,
    path: PathBuf,
    id: String,
    body: u64,
    end: u64,
}

/// Opens the index at `path` for the catalog whose `fstat` is `catalog`;
/// `trusted` as for the catalog.
pub fn open(path: &Path, catalog: &Metadata, trusted: &[u32]) -> Result<Index, IndexError> {
    let (file, meta) = secure::open_trusted(path, trusted).map_err(|e| match e {
        secure::TrustError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
            IndexError::Missing
        }
        secure::TrustError::Io { path, source } => IndexError::Io { path, source },
        other => IndexError::Untrusted(other),
    })?;
    let mut buf = vec![0u8; CHUNK];
    let n = read_at_full(&file, &mut buf, 0).map_err(|source| IndexError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let head = &buf[..n];
    let nl = head
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(IndexError::Damaged { what: "no header" })?;
    let header = std::str::from_utf8(&head[..nl]).map_err(|_| IndexError::Damaged {
        what: "header not UTF-8",
    })?;
    let rest = header
        .strip_prefix(MAGIC)
        .ok_or(IndexError::Damaged { what: "header" })?;
    let (idt, counts) = rest
        .rsplit_once(" records=")
        .ok_or(IndexError::Damaged { what: "header" })?;
    let bytes: u64 = counts
        .split_once(" bytes=")
        .and_then(|(_, b)| b.parse().ok())
        .ok_or(IndexError::Damaged { what: "header" })?;
    if bytes != meta.len() {
        return Err(IndexError::Damaged {
            what: "length differs from its header",
        });
    }
    if idt != Identity::of(catalog).text() {
        return Err(IndexError::Stale);
    }
    Ok(Index {
        file,
        path: path.to_path_buf(),
        id: idt.to_string(),
        body: nl as u64 + 1,
        end: meta.len(),
    })
}

fn read_at_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl Index {
    fn io(&self) -> impl FnOnce(io::Error) -> IndexError + '_ {
        |source| IndexError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// The line starting at `at` (without its newline).
    fn line_at(&self, at: u64) -> Result<Vec<u8>, IndexError> {
        let mut want = CHUNK;
        loop {
            let len = want.min((self.end - at) as usize);
            let mut buf = vec![0u8; len];
            let n = read_at_full(&self.file, &mut buf, at).map_err(self.io())?;
            buf.truncate(n);
            if let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                buf.truncate(nl);
                return Ok(buf);
            }
            if n < len || len == (self.end - at) as usize || want >= MAX_LINE {
                return Err(IndexError::Damaged {
                    what: "a record without its line end",
                });
            }
            want *= 4;
        }
    }

    /// The start of the first line that begins at or after `at` (> body).
    fn next_start(&self, at: u64) -> Result<u64, IndexError> {
        let from = at - 1;
        let mut want = CHUNK;
        loop {
            let len = want.min((self.end - from) as usize);
            let mut buf = vec![0u8; len];
            let n = read_at_full(&self.file, &mut buf, from).map_err(self.io())?;
            if let Some(nl) = buf[..n].iter().position(|&b| b == b'\n') {
                return Ok(from + nl as u64 + 1);
            }
            if n < len || len == (self.end - from) as usize || want >= MAX_LINE {
                return Ok(self.end);
            }
            want *= 4;
        }
    }

    /// The record for `key` of `kind`: `Ok(None)` when the index has no
    /// such key (the caller then parses the catalog: a lost record must
    /// never mean "not in the catalog").
    pub fn lookup(&self, kind: Kind, key: &str) -> Result<Option<Entry>, IndexError> {
        let target = format!("{}{key}", kind.prefix());
        let target = target.as_bytes();
        let key_of = |line: &[u8]| -> Vec<u8> {
            line.iter().take_while(|&&b| b != b'\t').copied().collect()
        };
        // Invariant: lo is a line start, hi a line start or the end; every
        // line before lo has a key < target, every line from hi >= target.
        let (mut lo, mut hi) = (self.body, self.end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let s = if mid == lo { lo } else { self.next_start(mid)? };
            let at = if s >= hi { lo } else { s };
            let line = self.line_at(at)?;
            if key_of(&line).as_slice() < target {
                lo = at + line.len() as u64 + 1;
            } else {
                hi = at;
            }
        }
        if lo >= self.end {
            return Ok(None);
        }
        let line = self.line_at(lo)?;
        if key_of(&line).as_slice() != target {
            return Ok(None);
        }
        self.parse(&line, target).map(Some)
    }

    fn parse(&self, line: &[u8], target: &[u8]) -> Result<Entry, IndexError> {
        let damaged = |what| IndexError::Damaged { what };
        let line = std::str::from_utf8(line).map_err(|_| damaged("record not UTF-8"))?;
        let (record, sum) = line.rsplit_once('\t').ok_or(damaged("record"))?;
        if check(&self.id, record) != sum {
            return Err(damaged("a record's check"));
        }
        let f: Vec<&str> = record.split('\t').collect();
        let [key, name, tag, sha, size, path] = f.as_slice() else {
            return Err(damaged("record fields"));
        };
        if key.as_bytes() != target
            || !catalog::valid_name(name)
            || !catalog::valid_tag(tag)
            || path.is_empty()
        {
            return Err(damaged("record fields"));
        }
        let sha256 = match *sha {
            "-" => None,
            s if crate::catalog::is_sha256_hex(s) => Some(s.to_string()),
            _ => return Err(damaged("record sha256")),
        };
        let size = match *size {
            "-" => None,
            s => Some(s.parse().map_err(|_| damaged("record size"))?),
        };
        Ok(Entry {
            name: name.to_string(),
            tag: tag.to_string(),
            path: PathBuf::from(path),
            sha256,
            size,
        })
    }
}

/// How long the writer waits for the file system's clock to move past the
/// catalog's ctime (one tick: a few ms).
const TICK_WAIT: Duration = Duration::from_secs(2);

/// Writes the index for `catalog`, which the caller (holding the catalog
/// lock) has just written to `<root>/.registry/catalog.toml` as `text`.
/// Any failure leaves no index (readers then parse the catalog) and is
/// returned for the caller to report.
pub fn write(root: &Path, catalog: &Catalog, text: &str) -> io::Result<()> {
    let index_path = root.join(INDEX_PATH);
    let written = write_inner(root, catalog, text, &index_path);
    if written.is_err() {
        match fs::remove_file(&index_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    written
}

fn write_inner(root: &Path, catalog: &Catalog, text: &str, index_path: &Path) -> io::Result<()> {
    let catalog_path = root.join(catalog::CATALOG_PATH);
    let (mut file, meta) =
        secure::open_regular(&catalog_path).map_err(|e| io::Error::other(e.to_string()))?;
    let id = Identity::of(&meta);
    let Some(index) = render(catalog, &id) else {
        return Err(io::Error::other(
            "an image path has a tab, a line break or over 4,000 bytes: the catalog is not \
             indexed (resolution parses it)",
        ));
    };
    wait_past(&catalog_path, id.ctime)?;
    // After the tick: an edit before this read shows in the bytes, one
    // after it in the ctime.
    file.rewind()?;
    let mut back = Vec::with_capacity(text.len());
    (&mut file)
        .take(catalog::MAX_CATALOG_BYTES)
        .read_to_end(&mut back)?;
    if back != text.as_bytes() || Identity::of(&file.metadata()?) != id {
        return Err(io::Error::other(
            "the catalog changed while its index was written (edited by hand?)",
        ));
    }
    secure::replace_file(index_path, index.as_bytes(), 0o644, None)
}

/// Waits until a change made now in the catalog's directory gets a ctime
/// after `ctime` (the file system's clock ticks coarsely).
fn wait_past(catalog_path: &Path, ctime: (i64, i64)) -> io::Result<()> {
    let dir = catalog_path.parent().unwrap_or(Path::new("/"));
    let probe = dir.join(format!(".catalog.idx.probe.{}", std::process::id()));
    let _ = fs::remove_file(&probe);
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&probe)?;
    let started = Instant::now();
    let outcome = loop {
        if let Err(e) = f.write_all_at(b"x", 0) {
            break Err(e);
        }
        match f.metadata() {
            Ok(m) if (m.ctime(), m.ctime_nsec()) > ctime => break Ok(()),
            Ok(_) if started.elapsed() < TICK_WAIT => std::thread::sleep(Duration::from_millis(1)),
            Ok(_) => break Err(io::Error::other("the file system's clock did not move")),
            Err(e) => break Err(e),
        }
    };
    let _ = fs::remove_file(&probe);
    outcome
}

/// The index state for `doctor`: `Ok(())` when present and current.
pub fn status(root: &Path, trusted: &[u32]) -> Result<(), IndexError> {
    let catalog_path = root.join(catalog::CATALOG_PATH);
    let (_, meta) = secure::open_trusted(&catalog_path, trusted).map_err(|e| match e {
        secure::TrustError::Io { path, source } => IndexError::Io { path, source },
        other => IndexError::Untrusted(other),
    })?;
    open(&root.join(INDEX_PATH), &meta, trusted).map(|_| ())
}

#[cfg(test)]
mod tests;
