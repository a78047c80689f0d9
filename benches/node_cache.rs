//! Node cache benchmark, side by side in one run: what a step
//! on a node pays to get its image ready with `registry.node_cache` set,
//! on the first launch (a miss: copy from the registry, hashing on the
//! way) against later launches (a hit: owner, mode, size and the recorded
//! identity checked), and the bytes the node read to do it; then 8 steps
//! starting at once on an empty cache (one copy, the others wait and reuse
//! it).
//!
//! `cargo bench --bench node_cache` as root (the cache is root's).
//! MLC_BENCH_IMAGE_MB sets the image size (default 512).

#![allow(clippy::unwrap_used)]

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use slurm_ml_container::node_cache::{Cache, Outcome};

/// Bytes this process has read through read(2)/pread(2) so far.
fn rchar() -> u64 {
    fs::read_to_string("/proc/self/io")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("node_cache bench: run as root (the cache must be root's); skipped");
        return;
    }
    let mb: usize = std::env::var("MLC_BENCH_IMAGE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    // The benchmark's own directory (0755, as a registry's), removed on drop.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let image = dir.join("registry-image.sif");
    let mut data = vec![0u8; mb << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    fs::write(&image, &data).unwrap();
    let sum = slurm_ml_container::integrity::sha256_reader(&data[..]).unwrap();
    drop(data);
    let size = (mb as u64) << 20;
    let never = || false;
    let cache_at = |name: &str| Cache {
        dir: dir.join(name),
        max: 4 * size,
    };

    println!("== one step getting a {mb} MiB image ready on a node (page cache warm)");
    println!(
        "{:>22}  {:>10}  {:>22}",
        "", "time", "bytes read by the node"
    );
    let cache = cache_at("cache");
    let src = File::open(&image).unwrap();
    let before = rchar();
    let t = Instant::now();
    let (lease, o) = cache
        .provide(Some(&sum), size, ".sif", &src, &never)
        .unwrap();
    let miss = t.elapsed();
    let miss_bytes = rchar() - before;
    assert!(matches!(o, Outcome::Copied { .. }));
    drop(lease);
    let mut hits: Vec<(Duration, u64)> = (0..20)
        .map(|_| {
            let before = rchar();
            let t = Instant::now();
            let (lease, o) = cache
                .provide(Some(&sum), size, ".sif", &src, &never)
                .unwrap();
            let d = t.elapsed();
            assert_eq!(o, Outcome::Hit);
            drop(lease);
            (d, rchar() - before)
        })
        .collect();
    hits.sort();
    let (hit, hit_bytes) = hits[hits.len() / 2];
    println!(
        "{:>22}  {:>8.1}ms  {:>22}",
        "first launch (miss)",
        ms(miss),
        miss_bytes
    );
    println!(
        "{:>22}  {:>8.3}ms  {:>22}",
        "later launch (hit)",
        ms(hit),
        hit_bytes
    );
    println!(
        "{:>22}  {:>10}  {:>22}",
        "without the cache", "-", "what the runtime reads, every launch"
    );

    println!("\n== 8 steps at once on an empty cache");
    let cache = std::sync::Arc::new(cache_at("cache8"));
    let before = rchar();
    let t = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (cache, image, sum) = (cache.clone(), image.clone(), sum.clone());
            std::thread::spawn(move || {
                let src = File::open(&image).unwrap();
                let never = || false;
                let (_lease, o) = cache
                    .provide(Some(&sum), size, ".sif", &src, &never)
                    .unwrap();
                matches!(o, Outcome::Copied { .. })
            })
        })
        .collect();
    let copied = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|c| *c)
        .count();
    let all = t.elapsed();
    let read = rchar() - before;
    println!(
        "{:>22}  {:>10}  {:>22}",
        "", "time", "bytes read by the node"
    );
    println!(
        "{:>22}  {:>8.1}ms  {:>22}  ({copied} copy)",
        "all 8 ready",
        ms(all),
        read
    );
    let _: PathBuf = image;
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
