//! Unit tests of `node_cache.rs`.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The test's own scratch directory (0755, as a node's would be),
/// removed when dropped.
fn scratch() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn image(dir: &Path, name: &str, len: usize, seed: u8) -> (PathBuf, String) {
    let p = dir.join(name);
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
    fs::write(&p, &data).unwrap();
    fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let sum = hex(&Sha256::digest(&data));
    (p, sum)
}

fn never() -> bool {
    false
}

fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn copies_once_then_hits_and_replaces_a_changed_copy() {
    if !running_as_root() {
        return;
    }
    let d = scratch();
    let (src, sum) = image(d.path(), "a.sif", 3 << 20, 7);
    let cache = Cache {
        dir: d.path().join("cache"),
        max: 100 << 20,
    };
    let f = File::open(&src).unwrap();
    let (lease, o) = cache
        .provide(Some(&sum), 3 << 20, ".sif", &f, &never)
        .unwrap();
    assert!(matches!(o, Outcome::Copied { bytes, .. } if bytes == 3 << 20));
    assert_eq!(fs::read(&lease.path).unwrap(), fs::read(&src).unwrap());
    let m = fs::metadata(&lease.path).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o644));
    let (_, o) = cache
        .provide(Some(&sum), 3 << 20, ".sif", &f, &never)
        .unwrap();
    assert_eq!(o, Outcome::Hit);
    // Damage the copy in place (same size): detected, copied again.
    let w = OpenOptions::new().write(true).open(&lease.path).unwrap();
    w.write_all_at(b"evil", 100).unwrap();
    drop(w);
    assert!(!cache.valid(&sum, ".sif", 3 << 20));
    drop(lease);
    let (lease, o) = cache
        .provide(Some(&sum), 3 << 20, ".sif", &f, &never)
        .unwrap();
    assert!(matches!(o, Outcome::Copied { .. }), "{o:?}");
    assert_eq!(fs::read(&lease.path).unwrap(), fs::read(&src).unwrap());
    // A wrong sum in the catalog: nothing cached, an error to log.
    let wrong = "0".repeat(64);
    let e = cache
        .provide(Some(&wrong), 3 << 20, ".sif", &f, &never)
        .unwrap_err();
    assert!(matches!(e, CacheError::Mismatch { .. }), "{e}");
    assert!(!cache.entry_path(&wrong, ".sif").exists());
    let leftovers: Vec<_> = fs::read_dir(cache.images())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "a partial copy was left");
    // No sum: not cached.
    assert!(matches!(
        cache.provide(None, 3 << 20, ".sif", &f, &never),
        Err(CacheError::NoChecksum)
    ));
    // Readable only by some: never copied to a world-readable cache.
    let (secret, ssum) = image(d.path(), "s.sif", 1 << 20, 11);
    fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    assert!(matches!(
        cache.provide(
            Some(&ssum),
            1 << 20,
            ".sif",
            &File::open(&secret).unwrap(),
            &never
        ),
        Err(CacheError::NotPublic)
    ));
    assert!(!cache.entry_path(&ssum, ".sif").exists());
}

/// Many steps at once: exactly one copy, every one gets the image.
#[test]
fn concurrent_steps_copy_once() {
    if !running_as_root() {
        return;
    }
    let d = scratch();
    let (src, sum) = image(d.path(), "a.sif", 8 << 20, 3);
    let cache = Arc::new(Cache {
        dir: d.path().join("cache"),
        max: 100 << 20,
    });
    let copies = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (cache, copies, src, sum) =
                (cache.clone(), copies.clone(), src.clone(), sum.clone());
            std::thread::spawn(move || {
                // Separate open file descriptions, as separate steps have.
                let f = File::open(&src).unwrap();
                let (lease, o) = cache
                    .provide(Some(&sum), 8 << 20, ".sif", &f, &never)
                    .unwrap();
                if matches!(o, Outcome::Copied { .. }) {
                    copies.fetch_add(1, Ordering::SeqCst);
                }
                fs::metadata(&lease.path).unwrap().len()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 8 << 20);
    }
    assert_eq!(copies.load(Ordering::SeqCst), 1);
}

#[test]
fn eviction_keeps_the_cap_and_spares_images_in_use() {
    if !running_as_root() {
        return;
    }
    let d = scratch();
    let cache = Cache {
        dir: d.path().join("cache"),
        max: 5 << 20,
    };
    let imgs: Vec<_> = (0..3)
        .map(|i| image(d.path(), &format!("{i}.sif"), 2 << 20, i as u8 + 2))
        .collect();
    let open = |i: usize| File::open(&imgs[i].0).unwrap();
    let (in_use, _) = cache
        .provide(Some(&imgs[0].1), 2 << 20, ".sif", &open(0), &never)
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let (done, _) = cache
        .provide(Some(&imgs[1].1), 2 << 20, ".sif", &open(1), &never)
        .unwrap();
    drop(done);
    // 0 is older but in use: 1 goes.
    let (_third, _) = cache
        .provide(Some(&imgs[2].1), 2 << 20, ".sif", &open(2), &never)
        .unwrap();
    let left: Vec<String> = cache.list().into_iter().map(|l| l.sha256).collect();
    assert!(
        left.contains(&imgs[0].1) && left.contains(&imgs[2].1),
        "{left:?}"
    );
    assert!(!left.contains(&imgs[1].1));
    let total: u64 = cache.list().iter().map(|l| l.size).sum();
    assert!(total <= cache.max);
    assert!(in_use.path.exists());
    // Both remaining in use: no room for a fourth, nothing removed.
    let (p3, s3) = image(d.path(), "3.sif", 2 << 20, 9);
    let e = cache
        .provide(Some(&s3), 2 << 20, ".sif", &File::open(p3).unwrap(), &never)
        .unwrap_err();
    assert!(matches!(e, CacheError::NoRoom { .. }), "{e}");
    assert_eq!(cache.list().len(), 2);
    // Too large for the cap at all.
    assert!(matches!(
        cache.provide(Some(&s3), 6 << 20, ".sif", &open(0), &never),
        Err(CacheError::TooLarge { .. })
    ));
}

#[test]
fn a_cancelled_copy_leaves_nothing() {
    if !running_as_root() {
        return;
    }
    let d = scratch();
    let (src, sum) = image(d.path(), "a.sif", 20 << 20, 5);
    let cache = Cache {
        dir: d.path().join("cache"),
        max: 100 << 20,
    };
    let asked = AtomicUsize::new(0);
    let cancel_later = || asked.fetch_add(1, Ordering::SeqCst) >= 1;
    let e = cache
        .provide(
            Some(&sum),
            20 << 20,
            ".sif",
            &File::open(&src).unwrap(),
            &cancel_later,
        )
        .unwrap_err();
    assert!(matches!(e, CacheError::Cancelled), "{e}");
    assert_eq!(fs::read_dir(cache.images()).unwrap().count(), 0);
}

#[test]
fn a_read_only_or_foreign_cache_dir_is_an_error_not_a_crash() {
    if !running_as_root() {
        return;
    }
    let d = scratch();
    let (src, sum) = image(d.path(), "a.sif", 1 << 20, 5);
    let dir = d.path().join("cache");
    fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
    let cache = Cache { dir, max: 10 << 20 };
    let e = cache
        .provide(
            Some(&sum),
            1 << 20,
            ".sif",
            &File::open(&src).unwrap(),
            &never,
        )
        .unwrap_err();
    assert!(matches!(e, CacheError::Io { .. }), "{e}");
    // A symlink for the cache directory is refused too.
    let link = d.path().join("link");
    std::os::unix::fs::symlink(d.path().join("elsewhere"), &link).unwrap();
    fs::create_dir_all(d.path().join("elsewhere")).unwrap();
    let cache = Cache {
        dir: link,
        max: 10 << 20,
    };
    assert!(cache
        .provide(
            Some(&sum),
            1 << 20,
            ".sif",
            &File::open(&src).unwrap(),
            &never
        )
        .is_err());
}
