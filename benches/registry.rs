//! Registry benchmarks, printed side by side in one run:
//!
//! - resolution (open the registry, resolve a name) with catalogs of 10,
//!   1,000 and 10,000 images, parsing the catalog against looking the name
//!   up in the catalog index, in srun and on a pinned node;
//! - the `quick` integrity check of a 1 MB and a 5 GB (sparse) SIF;
//! - sha256 throughput of `integrity::sha256_file` against `sha256sum` on
//!   the same file.
//!
//! `cargo bench --bench registry`. Figures are medians of several runs;
//! a plain `std::time` harness keeps the dependency list short.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::hint::black_box;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use slurm_ml_container::catalog::Catalog;
use slurm_ml_container::catalog_index;
use slurm_ml_container::config::{AbsPath, RegistryConfig};
use slurm_ml_container::integrity;
use slurm_ml_container::registry::Registry;
use slurm_ml_container::sif;

fn median<F: FnMut()>(runs: usize, mut f: F) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
}

/// The benchmark's own directory (0755, as a registry's), removed on drop.
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn registry_with(dir: &Path, n: usize) -> RegistryConfig {
    let root = dir.join(format!("reg-{n}"));
    fs::create_dir_all(root.join(".registry")).unwrap();
    fs::create_dir_all(root.join("ml-frameworks")).unwrap();
    let mut text = String::from("version = 1\n");
    for i in 0..n {
        text.push_str(&format!(
            "[[image]]\nname = \"image{i}\"\ntag = \"1.{i}\"\npath = \"ml-frameworks/image{i}.sif\"\n\
             sha256 = \"{:064x}\"\nsize = 1048576\naliases = [\"registry.example/ns/image{i}:1.{i}\"]\n\
             labels = {{ cuda = \"12.1\", python = \"3.11\" }}\nadded = 2024-01-01T00:00:00Z\n",
            i
        ));
    }
    fs::write(root.join(".registry/catalog.toml"), &text).unwrap();
    // The index, as `ml-container add` writes it beside the catalog.
    let parsed = Catalog::parse(Path::new("catalog.toml"), &text).unwrap();
    catalog_index::write(&root, &parsed, &text).unwrap();
    fs::write(root.join(format!("ml-frameworks/image{}.sif", n / 2)), b"x").unwrap();
    for d in [&root, &root.join(".registry")] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    RegistryConfig {
        root: AbsPath(root),
        owner: nix::unistd::getuid().as_raw().to_string(),
        ..RegistryConfig::default()
    }
}

fn main() {
    let tmp = scratch();
    let dir = tmp.path().to_path_buf();

    println!("== resolution in srun: open registry + resolve one name (bare name, the default)");
    println!("== and on a node given srun's pin: resolve again from its own catalog + confirm");
    println!("== parse: the whole catalog parsed (no index, or a stale one);");
    println!(
        "== index: .registry/catalog.idx checked against the catalog's identity, then looked up"
    );
    println!(
        "{:>10}  {:>12}  {:>12}  {:>14}  {:>14}",
        "images", "srun parse", "srun index", "node parse", "node index"
    );
    for n in [10usize, 1_000, 10_000] {
        let cfg = registry_with(&dir, n);
        let want = format!("image{}", n / 2);
        let runs = if n >= 10_000 { 5 } else { 20 };
        let fast_runs = 200;
        let parse = median(runs, || {
            let reg = Registry::open(&cfg).unwrap().without_index();
            black_box(reg.resolve(&want).unwrap());
        });
        let index = median(fast_runs, || {
            let reg = Registry::open(&cfg).unwrap();
            black_box(reg.resolve(&want).unwrap());
            assert_eq!(reg.index_hits(), 1, "the index did not answer");
        });
        let pin = Registry::open(&cfg).unwrap().resolve(&want).unwrap();
        let node_parse = median(runs, || {
            let reg = Registry::open(&cfg).unwrap().without_index();
            let mine = reg.resolve(&want).unwrap();
            mine.confirms(black_box(&pin)).unwrap();
        });
        let node_index = median(fast_runs, || {
            let reg = Registry::open(&cfg).unwrap();
            let mine = reg.resolve(&want).unwrap();
            mine.confirms(black_box(&pin)).unwrap();
        });
        println!(
            "{n:>10}  {:>10.3}ms  {:>10.3}ms  {:>12.3}ms  {:>12.3}ms",
            ms(parse),
            ms(index),
            ms(node_parse),
            ms(node_index)
        );
    }

    println!("\n== quick check (size + SIF structure)");
    println!("{:>10}  {:>12}", "image", "median");
    for (label, size) in [("1 MB", 1u64 << 20), ("5 GB sparse", 5u64 << 30)] {
        let path = dir.join(format!("quick-{size}.sif"));
        write_sparse_sif(&path, size);
        let t = median(20, || {
            integrity::quick(black_box(&path), Some(size)).unwrap();
        });
        println!("{label:>10}  {:>10.3}ms", ms(t));
        let _ = fs::remove_file(&path);
    }

    println!("\n== sha256 of the same 512 MiB file (page cache warm)");
    let big = dir.join("hash.bin");
    let mut data = vec![0u8; 512 << 20];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    fs::write(&big, &data).unwrap();
    drop(data);
    let ours_sum = integrity::sha256_file(&big).unwrap();
    let ours = median(3, || {
        black_box(integrity::sha256_file(&big).unwrap());
    });
    let mut theirs_sum = String::new();
    let theirs = median(3, || {
        let out = Command::new("sha256sum").arg(&big).output().unwrap();
        theirs_sum = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
    });
    assert_eq!(ours_sum, theirs_sum, "the two tools disagree");
    let mb = 512.0;
    println!("{:>16}  {:>10}  {:>10}", "", "median", "MiB/s");
    println!(
        "{:>16}  {:>8.1}ms  {:>10.0}",
        "ml-container",
        ms(ours),
        mb / ours.as_secs_f64()
    );
    println!(
        "{:>16}  {:>8.1}ms  {:>10.0}",
        "sha256sum",
        ms(theirs),
        mb / theirs.as_secs_f64()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A structurally valid SIF of `size` bytes whose data partition is a hole.
fn write_sparse_sif(path: &Path, size: u64) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::create(path).unwrap();
    f.write_all_at(&sif::example_header(size), 0).unwrap();
    f.set_len(size).unwrap();
}
