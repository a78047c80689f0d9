//! The registry subcommands: init, add, remove, list, show, verify.

use std::collections::BTreeMap;
use std::fs;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use slurm_ml_container::catalog::{self, Catalog, Image};
use slurm_ml_container::catalog_write;
use slurm_ml_container::config::SiteConfig;
use slurm_ml_container::integrity;
use slurm_ml_container::registry::Registry;

use crate::{fail, usage, Args};

/// `init`: the registry layout (`ml-frameworks/`, `custom-images/`,
/// `base-images/`, `.registry/`), root:slurm 0755, and an empty catalog.
pub fn init(cfg: &SiteConfig) -> ExitCode {
    let root = cfg.registry.root.as_path();
    let group = nix::unistd::Group::from_name("slurm")
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw());
    for dir in [
        "",
        "ml-frameworks",
        "custom-images",
        "base-images",
        ".registry",
    ] {
        let d = root.join(dir);
        if let Err(e) = fs::create_dir_all(&d)
            .and_then(|()| fs::set_permissions(&d, fs::Permissions::from_mode(0o755)))
            .and_then(|()| std::os::unix::fs::chown(&d, Some(0), group))
        {
            return fail(&format!("cannot prepare {}: {e}", d.display()));
        }
    }
    match catalog_write::lock(root).and_then(|l| l.commit()) {
        Ok(()) => {
            println!("registry ready at {}", root.display());
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string()),
    }
}

/// Counts what passes through, printing a progress line now and then.
struct Progress<R> {
    inner: R,
    /// "hashing", "copying and hashing".
    what: &'static str,
    path: PathBuf,
    total: u64,
    done: u64,
    last: std::time::Instant,
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.last.elapsed().as_millis() > 250 || n == 0 {
            eprint!(
                "\r{} {}: {:3}%",
                self.what,
                self.path.display(),
                self.done * 100 / self.total.max(1)
            );
            if n == 0 {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
            self.last = std::time::Instant::now();
        }
        Ok(n)
    }
}

/// Hands on what it reads, and writes a copy of it to `copy`: copying an
/// image and hashing it is then one pass over a multi-GB file, not two.
struct Tee<R, W> {
    inner: R,
    copy: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// sha256 of what `r` (`total` bytes, from `path`) yields, with a progress
/// line on a terminal for large files (multi-GB images take a while, and
/// a silent minute looks like a hang).
fn sha256_with_progress(
    r: impl Read,
    what: &'static str,
    path: &Path,
    total: u64,
) -> std::io::Result<String> {
    if std::io::stderr().is_terminal() && total > (64 << 20) {
        integrity::sha256_reader(Progress {
            inner: r,
            what,
            path: path.to_path_buf(),
            total,
            done: 0,
            last: std::time::Instant::now(),
        })
    } else {
        integrity::sha256_reader(r)
    }
}

/// sha256 of the file at `path` and its size, with progress.
pub(crate) fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let f = fs::File::open(path)?;
    let size = f.metadata()?.len();
    Ok((size, sha256_with_progress(f, "hashing", path, size)?))
}

/// Copies `src` to `dest` (which must not exist) through `dest.partial`,
/// hashing on the way: (size, sha256). Nothing is overwritten: the final
/// step is link(2), which fails when `dest` exists.
fn copy_and_hash(src: &Path, dest: &Path) -> std::io::Result<(u64, String)> {
    use std::os::unix::fs::OpenOptionsExt;
    let input = fs::File::open(src)?;
    let total = input.metadata()?.len();
    let tmp = dest.with_extension("partial");
    let out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    let result = (|| {
        let mut tee = Tee {
            inner: input,
            copy: std::io::BufWriter::with_capacity(1 << 20, &out),
        };
        let sum = sha256_with_progress(&mut tee, "copying and hashing", src, total)?;
        tee.copy.flush()?;
        drop(tee);
        // The umask may have narrowed create's mode.
        out.set_permissions(fs::Permissions::from_mode(0o644))?;
        out.sync_all()?;
        let size = out.metadata()?.len();
        fs::hard_link(&tmp, dest)?;
        Ok((size, sum))
    })();
    let _ = fs::remove_file(&tmp);
    result
}

/// `add FILE --name N --tag T [--default] [--alias A]... [--description D]
/// [--label K=V]... [--copy-to DIR]`
pub fn add(cfg: &SiteConfig, args: &mut Args) -> ExitCode {
    const U: &str = "ml-container add FILE --name N --tag T [--default] [--alias A]... \
                     [--description D] [--label K=V]... [--copy-to DIR]";
    let Some(file) = args.positional() else {
        return usage(U);
    };
    let (Some(name), Some(tag)) = (args.value("--name"), args.value("--tag")) else {
        return usage(U);
    };
    let default = args.flag("--default");
    let aliases = args.values("--alias");
    let description = args.value("--description");
    let mut labels = BTreeMap::new();
    for l in args.values("--label") {
        match l.split_once('=') {
            Some((k, v)) => {
                labels.insert(k.to_string(), v.to_string());
            }
            None => return usage(U),
        }
    }
    let copy_to = args.value("--copy-to");
    if let Some(bad) = args.leftover() {
        return fail(&format!("unexpected argument '{bad}'; usage: {U}"));
    }
    if !catalog::valid_name(&name) {
        return fail(&format!(
            "'{}' is not a valid image name (lowercase letters, digits, '.', '_', '-', '/', \
             starting with a letter or digit): pass another --name, e.g. '{}'",
            name.escape_default(),
            suggest_name(&name)
        ));
    }
    if !catalog::valid_tag(&tag) {
        return fail(&format!(
            "'{}' is not a valid tag ({}): pass another --tag, e.g. '{}'",
            tag.escape_default(),
            catalog::TAG_RULE,
            suggest_tag(&tag)
        ));
    }
    let src = PathBuf::from(&file);
    if let Err(e) = integrity::quick(&src, None) {
        return fail(&e.to_string());
    }
    let root = cfg.registry.root.as_path();
    let real_root = fs::canonicalize(root).unwrap_or(root.to_path_buf());
    // (path for the catalog, size, sha256, the copy this call made)
    let (stored, size, sha256, copied): (PathBuf, u64, String, Option<PathBuf>) = match &copy_to {
        Some(dir) => {
            if dir.contains('/') || dir == ".." || dir.starts_with('.') {
                return fail(&format!(
                    "--copy-to takes a directory name under {}",
                    root.display()
                ));
            }
            // Refused before a multi-GB copy (and again, authoritatively,
            // under the catalog lock).
            if let Ok(reg) = Registry::open(&cfg.registry) {
                if reg.catalog().is_ok_and(|c| c.get(&name, &tag).is_some()) {
                    return fail(&format!(
                        "{name}:{tag} is already in the catalog: 'ml-container remove \
                         {name}:{tag}' first, or pick another tag"
                    ));
                }
            }
            let ext = src.extension().and_then(|e| e.to_str()).unwrap_or("sif");
            let rel = PathBuf::from(dir).join(format!("{}-{tag}.{ext}", name.replace('/', "_")));
            let dest = root.join(&rel);
            if fs::symlink_metadata(&dest).is_ok() {
                return fail(&format!(
                    "{} already exists: remove it or pick another tag (add never overwrites \
                     an image)",
                    dest.display()
                ));
            }
            let copied =
                fs::create_dir_all(root.join(dir)).and_then(|()| copy_and_hash(&src, &dest));
            match copied {
                Ok((size, sum)) => (rel, size, sum, Some(dest)),
                Err(e) => {
                    return fail(&format!(
                        "cannot copy {} to {}: {e}",
                        src.display(),
                        dest.display()
                    ))
                }
            }
        }
        None => {
            let real = match fs::canonicalize(&src) {
                Ok(p) => p,
                Err(e) => return fail(&format!("{}: {e}", src.display())),
            };
            let stored = match real.strip_prefix(&real_root) {
                Ok(rel) => rel.to_path_buf(),
                Err(_) if cfg.allowed_image_dirs().iter().any(|d| real.starts_with(d)) => {
                    real.clone()
                }
                Err(_) => {
                    return fail(&format!(
                        "{} is outside the registry {}: add --copy-to ml-frameworks to copy it in",
                        src.display(),
                        root.display()
                    ))
                }
            };
            match hash_file(&real) {
                Ok((size, sum)) => (stored, size, sum, None),
                Err(e) => return fail(&format!("cannot hash {}: {e}", real.display())),
            }
        }
    };
    let added = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let image = Image {
        name,
        tag,
        path: stored,
        sha256: Some(sha256),
        size: Some(size),
        default,
        aliases,
        description,
        labels,
        added: Some(added),
        line: 0,
    };
    let reference = image.reference();
    let result = catalog_write::lock(root).and_then(|mut l| {
        l.add(image)?;
        l.commit()
    });
    match result {
        Ok(()) => {
            println!("added {reference} ({size} bytes)");
            ExitCode::SUCCESS
        }
        Err(e) => {
            // The copy this call made is not in the catalog: take it back.
            if let Some(dest) = copied {
                let _ = fs::remove_file(dest);
            }
            fail(&e.to_string())
        }
    }
}

/// `reindex`: checks the catalog strictly and rewrites its index (after a
/// hand edit, or where a write could not index it).
pub fn reindex(cfg: &SiteConfig) -> ExitCode {
    let root = cfg.registry.root.as_path();
    match catalog_write::lock(root).and_then(|l| {
        let n = l.catalog.images.len();
        l.reindex().map(|()| n)
    }) {
        Ok(n) => {
            println!(
                "indexed {n} catalog entries ({})",
                root.join(slurm_ml_container::catalog_index::INDEX_PATH)
                    .display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string()),
    }
}

/// `remove NAME:TAG` (the image file stays).
pub fn remove(cfg: &SiteConfig, args: &mut Args) -> ExitCode {
    let Some(r) = args.positional() else {
        return usage("ml-container remove NAME:TAG");
    };
    let Some((name, tag)) = r.rsplit_once(':') else {
        return usage("ml-container remove NAME:TAG");
    };
    let result = catalog_write::lock(cfg.registry.root.as_path()).and_then(|mut l| {
        let gone = l.remove(name, tag)?;
        l.commit()?;
        Ok(gone)
    });
    match result {
        Ok(gone) => {
            println!(
                "removed {r} (the file {} is left in place)",
                gone.path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string()),
    }
}

/// The registry, with its catalog read (so a broken catalog fails here).
fn open(cfg: &SiteConfig) -> Result<Registry<'_>, ExitCode> {
    let reg = Registry::open(&cfg.registry).map_err(|e| fail(&e.to_string()))?;
    catalog(&reg)?;
    Ok(reg)
}

fn catalog<'r>(reg: &'r Registry<'_>) -> Result<&'r Catalog, ExitCode> {
    reg.catalog().map_err(|e| fail(&e.to_string()))
}

fn entry_json(im: &Image) -> serde_json::Value {
    serde_json::json!({
        "name": im.name, "tag": im.tag, "path": im.path, "sha256": im.sha256,
        "size": im.size, "default": im.default, "aliases": im.aliases,
        "description": im.description, "labels": im.labels,
        "added": im.added.map(catalog_write::format_rfc3339),
    })
}

/// `name` with what a name may not hold replaced: a suggestion for the
/// "not a valid image name" message.
fn suggest_name(name: &str) -> String {
    let s: String = name
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_start_matches(['.', '_', '-']);
    if s.is_empty() {
        "image".to_string()
    } else {
        s.chars().take(128).collect()
    }
}

/// `tag` with what a tag may not hold replaced by '-'.
fn suggest_tag(tag: &str) -> String {
    let s: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_start_matches(['.', '-', '+']);
    if s.is_empty() {
        "latest".to_string()
    } else {
        s.chars().take(128).collect()
    }
}

/// `list [--json]`
pub fn list(cfg: &SiteConfig, args: &mut Args) -> ExitCode {
    let json = args.flag("--json");
    let reg = match open(cfg) {
        Ok(r) => r,
        Err(c) => return c,
    };
    let images = match catalog(&reg) {
        Ok(c) => &c.images,
        Err(code) => return code,
    };
    if json {
        let v: Vec<serde_json::Value> = images.iter().map(entry_json).collect();
        println!("{}", serde_json::Value::Array(v));
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<24} {:<16} {:>3} {:>12}  PATH",
        "NAME", "TAG", "DEF", "SIZE"
    );
    for im in images {
        println!(
            "{:<24} {:<16} {:>3} {:>12}  {}",
            im.name,
            im.tag,
            if im.default { "*" } else { "" },
            im.size.map_or("-".to_string(), |s| s.to_string()),
            im.path.display()
        );
    }
    // A file the catalog names (as `add --copy-to` stores it) is listed
    // once, as the catalog's entry: only files the catalog does not know
    // are scan results.
    let catalogued: Vec<PathBuf> = images
        .iter()
        .map(|i| {
            let p = reg.root().join(&i.path);
            fs::canonicalize(&p).unwrap_or(p)
        })
        .collect();
    for (n, path) in reg.scanned() {
        let real = fs::canonicalize(&path).unwrap_or(path);
        if !catalogued.contains(&real) && !images.iter().any(|i| i.name == n) {
            println!("{n:<24} {:<16} {:>3} {:>12}  (found by scan)", "-", "", "-");
        }
    }
    ExitCode::SUCCESS
}

/// `show IMAGE`: what srun would run for IMAGE.
pub fn show(cfg: &SiteConfig, args: &mut Args) -> ExitCode {
    let Some(r) = args.positional() else {
        return usage("ml-container show IMAGE");
    };
    let reg = match open(cfg) {
        Ok(r) => r,
        Err(c) => return c,
    };
    match reg.resolve(&r) {
        Ok(pin) => {
            println!(
                "{r} -> {} ({} bytes, via {:?})",
                pin.path.display(),
                pin.size,
                pin.source
            );
            if let (Some(n), Some(t)) = (&pin.name, &pin.tag) {
                if let Some(im) = reg.catalog().ok().and_then(|c| c.get(n, t)) {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&entry_json(im)).unwrap_or_default()
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string()),
    }
}

/// `verify [IMAGE | --all]`: structure, size and sha256 of catalog images.
pub fn verify(cfg: &SiteConfig, args: &mut Args) -> ExitCode {
    let all = args.flag("--all");
    let one = args.positional();
    if all == one.is_some() {
        return usage("ml-container verify IMAGE | --all");
    }
    let reg = match open(cfg) {
        Ok(r) => r,
        Err(c) => return c,
    };
    let targets: Vec<Image> = if all {
        match catalog(&reg) {
            Ok(c) => c.images.clone(),
            Err(code) => return code,
        }
    } else {
        let r = one.unwrap_or_default();
        match reg.resolve(&r) {
            Ok(pin) => match (&pin.name, &pin.tag) {
                (Some(n), Some(t)) => reg
                    .catalog()
                    .ok()
                    .and_then(|c| c.get(n, t))
                    .cloned()
                    .into_iter()
                    .collect(),
                _ => vec![Image {
                    name: r.clone(),
                    tag: "-".into(),
                    path: pin.path,
                    sha256: None,
                    size: None,
                    default: false,
                    aliases: vec![],
                    description: None,
                    labels: BTreeMap::new(),
                    added: None,
                    line: 0,
                }],
            },
            Err(e) => return fail(&e.to_string()),
        }
    };
    let mut bad = 0;
    for im in &targets {
        let path = if im.path.is_absolute() {
            im.path.clone()
        } else {
            reg.root().join(&im.path)
        };
        let outcome = integrity::quick(&path, im.size)
            .map_err(|e| e.to_string())
            .and_then(|()| match &im.sha256 {
                Some(want) => {
                    let got = hash_file(&path).map_err(|e| e.to_string())?.1;
                    if &got == want {
                        Ok("sha256 ok")
                    } else {
                        Err(format!(
                            "sha256 is {got}, the catalog says {want}: corrupted or replaced"
                        ))
                    }
                }
                None => Ok("structure ok (no sha256 in the catalog)"),
            });
        match outcome {
            Ok(what) => println!("OK   {}:{} {what}", im.name, im.tag),
            Err(e) => {
                bad += 1;
                println!("FAIL {}:{} {e}", im.name, im.tag);
            }
        }
    }
    if bad > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
