//! Unit tests of `catalog_index.rs`.

use super::*;

fn catalog(n: usize) -> (Catalog, String) {
    let mut text = String::from("version = 1\n");
    for i in 0..n {
        text.push_str(&format!(
            "[[image]]\nname = \"img{i}\"\ntag = \"1.{i}\"\npath = \"ml-frameworks/img{i}.sif\"\n\
             size = {i}\naliases = [\"reg.example/img{i}:v\"]\nadded = 2024-01-01T00:00:00Z\n"
        ));
        if i % 3 == 0 {
            text.push_str(&format!(
                "[[image]]\nname = \"img{i}\"\ntag = \"2.{i}\"\npath = \"/abs/img{i}-2.sif\"\n\
                 sha256 = \"{:064x}\"\nadded = 2024-06-01T00:00:00Z\n",
                i
            ));
        }
    }
    text.push_str(
        "[[image]]\nname = \"nvidia/pytorch\"\ntag = \"24.01\"\npath = \"a.sif\"\n\
         default = true\n[[image]]\nname = \"nvidia/pytorch\"\ntag = \"25.01\"\npath = \"b.sif\"\n\
         added = 2025-01-01T00:00:00Z\n",
    );
    let c = Catalog::parse(Path::new("/c"), &text).unwrap();
    (c, text)
}

/// A registry root with the catalog written and indexed as the CLI does.
fn root(n: usize) -> (tempfile::TempDir, Catalog) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    fs::create_dir_all(dir.join(".registry")).unwrap();
    for d in [&dir, &dir.join(".registry")] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (c, text) = catalog(n);
    secure::replace_file(
        &dir.join(catalog::CATALOG_PATH),
        text.as_bytes(),
        0o644,
        None,
    )
    .unwrap();
    write(&dir, &c, &text).unwrap();
    (tmp, c)
}

fn me() -> Vec<u32> {
    vec![nix::unistd::geteuid().as_raw()]
}

fn opened(root: &Path) -> Result<Index, IndexError> {
    let meta = fs::metadata(root.join(catalog::CATALOG_PATH)).unwrap();
    open(&root.join(INDEX_PATH), &meta, &me())
}

fn expect(c: &Catalog, kind: Kind, key: &str) -> Option<Entry> {
    let im = match kind {
        Kind::NameTag => {
            let (n, t) = key.rsplit_once(':')?;
            c.get(n, t)
        }
        Kind::Alias => c.by_alias(key),
        Kind::Bare => c.default_for(key),
    }?;
    Some(Entry {
        name: im.name.clone(),
        tag: im.tag.clone(),
        path: im.path.clone(),
        sha256: im.sha256.clone(),
        size: im.size,
    })
}

/// Every key the catalog has, and some it has not, answer exactly what
/// the full parse answers.
#[test]
fn answers_what_the_catalog_answers() {
    for n in [0usize, 1, 2, 7, 300] {
        let (dir, c) = root(n);
        let idx = opened(dir.path()).unwrap();
        let mut keys: Vec<(Kind, String)> = Vec::new();
        for im in &c.images {
            keys.push((Kind::NameTag, im.reference()));
            keys.push((Kind::Bare, im.name.clone()));
            keys.extend(im.aliases.iter().map(|a| (Kind::Alias, a.clone())));
            keys.push((Kind::NameTag, format!("{}:nope", im.name)));
            keys.push((Kind::Bare, format!("{}x", im.name)));
            keys.push((Kind::Alias, im.reference()));
        }
        keys.extend([
            (Kind::Bare, String::new()),
            (Kind::Bare, "\u{7f}".into()),
            (Kind::Alias, "zzzz".into()),
            (Kind::NameTag, "0".into()),
        ]);
        for (kind, key) in keys {
            assert_eq!(
                idx.lookup(kind, &key).unwrap(),
                expect(&c, kind, &key),
                "{n} images: {kind:?} {key}"
            );
        }
    }
}

#[test]
fn bare_names_mean_the_default_else_the_newest() {
    let (dir, _) = root(4);
    let idx = opened(dir.path()).unwrap();
    let tag = |k| idx.lookup(Kind::Bare, k).unwrap().map(|e| e.tag);
    assert_eq!(tag("nvidia/pytorch").as_deref(), Some("24.01"));
    assert_eq!(tag("img3").as_deref(), Some("2.3"));
    assert_eq!(tag("img2").as_deref(), Some("1.2"));
}

/// A hand edit (same size, even) makes the index stale; so does a new
/// file in its place.
#[test]
fn a_changed_catalog_makes_the_index_stale() {
    let (dir, _) = root(5);
    let cat = dir.path().join(catalog::CATALOG_PATH);
    let text = fs::read_to_string(&cat).unwrap();
    // In place, same length, same second.
    let f = OpenOptions::new().write(true).open(&cat).unwrap();
    f.write_all_at(b"img9", text.find("img1").unwrap() as u64)
        .unwrap();
    drop(f);
    assert!(matches!(opened(dir.path()), Err(IndexError::Stale)));
    let (dir, _) = root(5);
    let cat = dir.path().join(catalog::CATALOG_PATH);
    let text = fs::read_to_string(&cat).unwrap();
    fs::remove_file(&cat).unwrap();
    fs::write(&cat, text).unwrap();
    assert!(matches!(opened(dir.path()), Err(IndexError::Stale)));
}

/// Damage anywhere is refused or, where it only moves records, costs a
/// miss: never another image.
#[test]
fn damage_never_misresolves() {
    let (dir, c) = root(40);
    let idx_path = dir.path().join(INDEX_PATH);
    let good = fs::read(&idx_path).unwrap();
    let keys: Vec<(Kind, String)> = c
        .images
        .iter()
        .flat_map(|im| {
            [
                (Kind::NameTag, im.reference()),
                (Kind::Bare, im.name.clone()),
            ]
            .into_iter()
            .chain(im.aliases.iter().map(|a| (Kind::Alias, a.clone())))
        })
        .collect();
    let mut refused = 0;
    // Flip one byte at many places (every 7th byte), one at a time.
    for at in (0..good.len()).step_by(7) {
        let mut bad = good.clone();
        bad[at] = match bad[at] {
            b'1' => b'2',
            b'\n' => b'x',
            b'\t' => b' ',
            b => b ^ 0x01,
        };
        fs::write(&idx_path, &bad).unwrap();
        let idx = match opened(dir.path()) {
            Ok(i) => i,
            Err(_) => {
                refused += 1;
                continue;
            }
        };
        for (kind, key) in &keys {
            // A miss or an error sends resolution to the full parse.
            if let Ok(Some(e)) = idx.lookup(*kind, key) {
                assert_eq!(
                    Some(e),
                    expect(&c, *kind, key),
                    "byte {at} damaged: {kind:?} {key} misresolved"
                );
            }
        }
    }
    assert!(refused > 0, "no damage to the header was noticed");
    // Truncated: refused at open.
    secure::replace_file(&idx_path, &good[..good.len() - 10], 0o644, None).unwrap();
    assert!(matches!(
        opened(dir.path()),
        Err(IndexError::Damaged { .. })
    ));
    // A record from another catalog's index (same keys, other identity).
    secure::replace_file(&idx_path, &good, 0o644, None).unwrap();
    assert!(opened(dir.path()).is_ok());
}

#[test]
fn the_index_gets_the_catalogs_trust_checks() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, _) = root(3);
    let idx_path = dir.path().join(INDEX_PATH);
    assert_eq!(
        fs::metadata(&idx_path).unwrap().mode() & 0o777,
        0o644,
        "readable by srun, as the user"
    );
    fs::set_permissions(&idx_path, fs::Permissions::from_mode(0o666)).unwrap();
    assert!(matches!(opened(dir.path()), Err(IndexError::Untrusted(_))));
    fs::set_permissions(&idx_path, fs::Permissions::from_mode(0o644)).unwrap();
    let meta = fs::metadata(dir.path().join(catalog::CATALOG_PATH)).unwrap();
    assert!(matches!(
        open(&idx_path, &meta, &[u32::MAX]),
        Err(IndexError::Untrusted(_))
    ));
    fs::remove_file(&idx_path).unwrap();
    assert!(matches!(opened(dir.path()), Err(IndexError::Missing)));
}

#[test]
fn unindexable_paths_leave_no_index() {
    let (dir, mut c) = root(2);
    c.images[0].path = PathBuf::from("a\tb.sif");
    let text = crate::catalog_write::render(&c);
    let cat = dir.path().join(catalog::CATALOG_PATH);
    secure::replace_file(&cat, text.as_bytes(), 0o644, None).unwrap();
    assert!(write(dir.path(), &c, &text).is_err());
    assert!(!dir.path().join(INDEX_PATH).exists());
}

#[test]
fn a_catalog_edited_during_the_write_is_not_indexed() {
    let (dir, c) = root(2);
    // The writer believes it wrote `text`, but the file says otherwise.
    let text = crate::catalog_write::render(&c);
    assert!(write(dir.path(), &c, &format!("{text}# edited\n")).is_err());
    assert!(!dir.path().join(INDEX_PATH).exists());
}
