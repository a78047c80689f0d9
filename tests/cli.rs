//! The admin CLI on a real registry in a temporary directory:
//! concurrent writers and readers, verify, doctor, exit codes. Runs as root
//! (the CLI chowns the registry to root, as `init` does on a cluster).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use slurm_ml_container::config::{PlugstackArgs, SiteConfig};
use slurm_ml_container::registry::Registry;
use slurm_ml_container::{integrity, sif};

/// A registry and its config under a directory of the test's own,
/// removed on drop.
struct Env {
    dir: PathBuf,
    config: PathBuf,
    _tmp: tempfile::TempDir,
}

/// `{dir}` in `extra_config` stands for the test's directory.
fn env(extra_config: &str) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.join("ml-container.toml");
    fs::write(
        &config,
        format!(
            "[registry]\nroot = \"{}/containers\"\n{}",
            dir.display(),
            extra_config.replace("{dir}", &dir.display().to_string())
        ),
    )
    .unwrap();
    Env {
        dir,
        config,
        _tmp: tmp,
    }
}

fn cli(e: &Env, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ml-container"))
        .args(args)
        .arg("--config")
        .arg(&e.config)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A structurally valid 1 MiB SIF (sparse).
fn sif_file(path: &Path) {
    let f = fs::File::create(path).unwrap();
    f.write_all_at(&sif::example_header(1 << 20), 0).unwrap();
    f.set_len(1 << 20).unwrap();
}

fn root(e: &Env) -> PathBuf {
    e.dir.join("containers")
}

#[test]
fn init_add_list_show_remove() {
    let e = env("");
    let o = cli(&e, &["init"]);
    assert!(o.status.success(), "{}", text(&o));
    for d in ["ml-frameworks", "custom-images", "base-images", ".registry"] {
        let m = fs::metadata(root(&e).join(d)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o755, "{d}");
    }
    let src = e.dir.join("outside.sif");
    sif_file(&src);
    // Outside the registry without --copy-to: refused with the fix.
    let o = cli(
        &e,
        &[
            "add",
            src.to_str().unwrap(),
            "--name",
            "pytorch",
            "--tag",
            "2.1",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("--copy-to"), "{}", text(&o));
    let o = cli(
        &e,
        &[
            "add",
            src.to_str().unwrap(),
            "--name",
            "pytorch",
            "--tag",
            "2.1",
            "--default",
            "--alias",
            "nvcr.io/nvidia/pytorch:24.01-py3",
            "--copy-to",
            "ml-frameworks",
            "--label",
            "cuda=12.1",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let copy = root(&e).join("ml-frameworks/pytorch-2.1.sif");
    assert!(copy.is_file());
    let src_sum = integrity::sha256_file(&src).unwrap();
    assert_eq!(integrity::sha256_file(&copy).unwrap(), src_sum);
    // Duplicates are refused, and another file of the same name:tag does
    // not replace the registry's copy.
    let other = e.dir.join("other.sif");
    sif_file(&other);
    fs::File::options()
        .write(true)
        .open(&other)
        .unwrap()
        .write_all_at(b"different", 600_000)
        .unwrap();
    let add_other = || {
        cli(
            &e,
            &[
                "add",
                other.to_str().unwrap(),
                "--name",
                "pytorch",
                "--tag",
                "2.1",
                "--copy-to",
                "ml-frameworks",
            ],
        )
    };
    let o = add_other();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("already in the catalog"), "{}", text(&o));
    assert_eq!(integrity::sha256_file(&copy).unwrap(), src_sum);

    let o = cli(&e, &["list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["name"], "pytorch");
    assert_eq!(v[0]["size"], 1 << 20);
    // Hashed while copying: the sum of the bytes that were copied.
    assert_eq!(v[0]["sha256"], src_sum.as_str());
    assert_eq!(v[0]["labels"]["cuda"], "12.1");
    let o = cli(&e, &["show", "nvcr.io/nvidia/pytorch:24.01-py3"]);
    assert!(
        o.status.success() && text(&o).contains("pytorch-2.1.sif"),
        "{}",
        text(&o)
    );
    let o = cli(&e, &["show", "pytroch"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("closest: pytorch"), "{}", text(&o));

    let o = cli(&e, &["remove", "pytorch:2.1"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = cli(&e, &["list", "--json"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
    // The removed entry's file stays, and add never overwrites it.
    let o = add_other();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("already exists"), "{}", text(&o));
    assert_eq!(integrity::sha256_file(&copy).unwrap(), src_sum);
    let left: Vec<_> = fs::read_dir(root(&e).join("ml-frameworks"))
        .unwrap()
        .map(|d| d.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, ["pytorch-2.1.sif"], "no partial copy is left behind");
    assert_eq!(cli(&e, &["remove", "pytorch:2.1"]).status.code(), Some(1));
    assert_eq!(cli(&e, &["add"]).status.code(), Some(2));
    let help = cli(&e, &["add", "--help"]);
    assert!(help.status.success(), "{}", text(&help));
    assert!(String::from_utf8_lossy(&help.stdout).starts_with("usage: ml-container add FILE"));
    assert_eq!(cli(&e, &["frobnicate"]).status.code(), Some(2));
}

/// The commands `ml-container --help` lists: the first word of each line
/// of its "commands:" block that starts at the block's indentation.
fn listed_commands() -> Vec<String> {
    let o = Command::new(env!("CARGO_BIN_EXE_ml-container"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    let block = out.split_once("commands:\n").unwrap().1;
    let mut names: Vec<String> = block
        .lines()
        .take_while(|l| !l.is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    names.dedup();
    names
}

/// The CLI's usage lives in one table (main.rs); the man page and the
/// README must name every command in it, so the three cannot drift.
#[test]
fn every_command_is_in_the_man_page_and_the_readme() {
    let commands = listed_commands();
    assert!(commands.len() >= 17, "{commands:?}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let man = fs::read_to_string(root.join("packaging/man/ml-container.8")).unwrap();
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    // Man page: a .TP entry whose tag starts with the command.
    let man_tags: Vec<String> = man
        .split(".TP\n")
        .skip(1)
        .filter_map(|entry| entry.lines().next())
        .filter_map(|tag| {
            let tag = tag.split_once(' ')?.1.trim_start_matches('"');
            tag.split([' ', '"']).next().map(str::to_string)
        })
        .collect();
    for c in &commands {
        assert!(
            man_tags.contains(c),
            "'{c}' is in ml-container --help but not in packaging/man/ml-container.8 \
             (its tags: {man_tags:?}): add a .TP entry"
        );
        assert!(
            readme.contains(&format!("| `ml-container {c}")),
            "'{c}' is in ml-container --help but not in README.md's \"Admin CLI\" table: \
             add a row"
        );
        let help = Command::new(env!("CARGO_BIN_EXE_ml-container"))
            .args([c.as_str(), "--help"])
            .output()
            .unwrap();
        assert!(help.status.success(), "{c} --help: {}", text(&help));
    }
}

#[test]
fn fifty_concurrent_adds_and_a_thousand_resolutions() {
    let e = env("");
    assert!(cli(&e, &["init"]).status.success());
    let frameworks = root(&e).join("ml-frameworks");
    for i in 0..50 {
        sif_file(&frameworks.join(format!("img{i}.sif")));
    }
    let cfg = SiteConfig::load(
        &PlugstackArgs::parse(&[format!("config={}", e.config.display())]).unwrap(),
    )
    .unwrap();
    let cfg = Arc::new(cfg);
    let stop = Arc::new(AtomicBool::new(false));
    let resolutions = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (cfg, stop, n, errors) = (
                cfg.clone(),
                stop.clone(),
                resolutions.clone(),
                errors.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) || n.load(Ordering::SeqCst) < 1000 {
                    match Registry::open(&cfg.registry) {
                        // A name not added yet is fine; a catalog that
                        // does not parse is not.
                        // Through the index or the catalog, a name
                        // means its own image or nothing.
                        Ok(reg) => {
                            if let Ok(pin) = reg.resolve("img0") {
                                if !pin.path.ends_with("ml-frameworks/img0.sif") {
                                    errors
                                        .lock()
                                        .unwrap()
                                        .push(format!("img0 -> {}", pin.path.display()));
                                }
                            }
                        }
                        Err(err) => errors.lock().unwrap().push(err.to_string()),
                    }
                    n.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let writers: Vec<_> = (0..50)
        .map(|i| {
            let file = frameworks.join(format!("img{i}.sif"));
            let config = e.config.clone();
            std::thread::spawn(move || {
                Command::new(env!("CARGO_BIN_EXE_ml-container"))
                    .args([
                        "add",
                        file.to_str().unwrap(),
                        "--name",
                        &format!("img{i}"),
                        "--tag",
                        "1",
                    ])
                    .arg("--config")
                    .arg(&config)
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for w in writers {
        let o = w.join().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        // Each writer indexed the catalog it wrote, under the same lock.
        assert!(
            !String::from_utf8_lossy(&o.stderr).contains("warning"),
            "{}",
            text(&o)
        );
    }
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.join().unwrap();
    }
    let errors = errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} reader errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert!(resolutions.load(Ordering::SeqCst) >= 1000);
    // The last writer's index answers for all 50, and as the full parse.
    let parsed = Registry::open(&cfg.registry).unwrap();
    assert_eq!(parsed.catalog().expect("catalog").images.len(), 50);
    for i in 0..50 {
        for r in [format!("img{i}:1"), format!("img{i}")] {
            let reg = Registry::open(&cfg.registry).unwrap();
            let fast = reg.resolve(&r).unwrap();
            assert_eq!(reg.index_hits(), 1, "{r} was not answered by the index");
            assert_eq!(fast, parsed.resolve(&r).unwrap(), "{r}");
            assert!(fast.path.ends_with(format!("ml-frameworks/img{i}.sif")));
        }
    }
}

#[test]
fn verify_names_the_corrupted_image_and_doctor_flags_problems() {
    let e = env("[runtime]\npath = \"/nonexistent/apptainer\"\n");
    assert!(cli(&e, &["init"]).status.success());
    for name in ["good", "bad"] {
        let f = root(&e).join(format!("ml-frameworks/{name}.sif"));
        sif_file(&f);
        let o = cli(
            &e,
            &["add", f.to_str().unwrap(), "--name", name, "--tag", "1"],
        );
        assert!(o.status.success(), "{}", text(&o));
    }
    let o = cli(&e, &["verify", "--all"]);
    assert!(o.status.success(), "{}", text(&o));
    // One flipped byte in the middle of bad.sif's partition.
    let bad = fs::OpenOptions::new()
        .write(true)
        .open(root(&e).join("ml-frameworks/bad.sif"))
        .unwrap();
    bad.write_all_at(&[0x5a], 700_000).unwrap();
    let o = cli(&e, &["verify", "--all"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("FAIL bad:1") && out.contains("OK   good:1"),
        "{out}"
    );

    let catalog = root(&e).join(".registry/catalog.toml");
    fs::set_permissions(&catalog, fs::Permissions::from_mode(0o666)).unwrap();
    let o = cli(&e, &["doctor"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("PROBLEM catalog") && out.contains("writable by group or others"),
        "{out}"
    );
    assert!(
        out.contains("PROBLEM container runtime 'apptainer' is not installed"),
        "{out}"
    );
}

/// A torch version string is a tag as it is (`2.6.0+debian`); a file that
/// `add --copy-to` put into a search directory is listed once, as the
/// catalog's entry, not again as a scan result; a bad tag's message says
/// what to pass instead.
#[test]
fn plus_in_tags_and_one_line_per_copied_image() {
    let e = env("");
    assert!(cli(&e, &["init"]).status.success());
    let src = e.dir.join("torch.sif");
    sif_file(&src);
    let add = |tag: &str| {
        cli(
            &e,
            &[
                "add",
                src.to_str().unwrap(),
                "--name",
                "pytorch",
                "--tag",
                tag,
                "--default",
                "--copy-to",
                "ml-frameworks",
            ],
        )
    };
    let o = add("2.6.0+debian");
    assert!(o.status.success(), "{}", text(&o));
    assert!(root(&e)
        .join("ml-frameworks/pytorch-2.6.0+debian.sif")
        .is_file());
    // A file the catalog does not name is still a scan result.
    sif_file(&root(&e).join("custom-images/mine.sif"));
    let o = cli(&e, &["list"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", text(&o));
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(
        rows[0].starts_with("pytorch ") && rows[0].contains("2.6.0+debian"),
        "{out}"
    );
    assert!(
        rows[1].starts_with("mine ") && rows[1].contains("(found by scan)"),
        "{out}"
    );
    let o = cli(&e, &["show", "pytorch:2.6.0+debian"]);
    assert!(o.status.success(), "{}", text(&o));

    for (bad, suggestion) in [
        ("2.6 0", "'2.6-0'"),
        ("+cu121", "'cu121'"),
        ("a/b", "'a-b'"),
    ] {
        let o = add(bad);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let t = text(&o);
        assert!(
            t.contains("pass another --tag") && t.contains(suggestion),
            "{bad}: {t}"
        );
    }
}

/// A user holding the catalog lock (an older install's 0644
/// lock file, opened before the CLI closed it) makes `add` fail within its
/// deadline, naming the holder; afterwards no user can open the lock at all.
#[test]
fn a_users_flock_on_the_catalog_lock_fails_add_within_the_deadline_naming_them() {
    let e = env("");
    assert!(cli(&e, &["init"]).status.success());
    let f = root(&e).join("ml-frameworks/a.sif");
    sif_file(&f);
    let lock = root(&e).join(".registry/catalog.lock");
    fs::write(&lock, "").unwrap();
    fs::set_permissions(&lock, fs::Permissions::from_mode(0o644)).unwrap();
    let as_nobody = |args: &[&str]| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .args(args);
        c
    };
    let mut holder = as_nobody(&["flock", "-o", "-s", lock.to_str().unwrap(), "sleep", "10"])
        .spawn()
        .unwrap();
    // Until the user's lock shows in /proc/locks.
    let t = std::time::Instant::now();
    let ino = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&lock).unwrap().ino()
    };
    while !fs::read_to_string("/proc/locks")
        .unwrap()
        .contains(&format!(":{ino} "))
    {
        assert!(t.elapsed().as_secs() < 10, "the user's flock never locked");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let t = std::time::Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_ml-container"))
        .args(["add", f.to_str().unwrap(), "--name", "a", "--tag", "1"])
        .arg("--config")
        .arg(&e.config)
        .env("ML_CONTAINER_LOCK_TIMEOUT", "2")
        .output()
        .unwrap();
    let took = t.elapsed();
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        took < std::time::Duration::from_secs(6),
        "add took {took:?}: {}",
        text(&o)
    );
    let out = text(&o);
    assert!(
        out.contains(&format!("locked by pid {} (flock, uid 65534", holder.id())),
        "{out}"
    );
    // The file is the writer's alone now: the user cannot even open it.
    assert_eq!(
        fs::metadata(&lock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = as_nobody(&["flock", "-n", lock.to_str().unwrap(), "true"])
        .output()
        .unwrap();
    assert!(!again.status.success(), "the user could lock it again");
    let o = cli(
        &e,
        &["add", f.to_str().unwrap(), "--name", "a", "--tag", "1"],
    );
    assert!(o.status.success(), "{}", text(&o));
}

/// Bounded logs: `prune` expires job directories (and those moved aside for
/// a reused job id) and leaves everything else, and symlinks' targets, alone.
#[test]
fn prune_removes_old_job_directories_only() {
    // Inside the test's own directory.
    let e = env("[failure]\nreport_dir = \"{dir}/reports\"\n");
    let reports = e.dir.join("reports");
    fs::create_dir_all(reports.join("17")).unwrap();
    fs::write(reports.join("17/0.n1.json"), "{}").unwrap();
    fs::create_dir_all(reports.join(".stale-17-1-2")).unwrap();
    fs::write(reports.join("README"), "kept").unwrap();
    let outside = e.dir.join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("keep"), "kept").unwrap();
    std::os::unix::fs::symlink(&outside, reports.join("18")).unwrap();
    let o = cli(&e, &["prune"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("0 job directories older than 30 day(s) removed"),
        "{}",
        text(&o)
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let o = cli(&e, &["prune", "--older-than", "0", "--dry-run"]);
    assert!(
        text(&o).contains("3 job directories older than 0 day(s) to remove"),
        "{}",
        text(&o)
    );
    assert!(reports.join("17/0.n1.json").exists());
    let o = cli(&e, &["prune", "--older-than", "0"]);
    assert!(o.status.success(), "{}", text(&o));
    let mut left: Vec<String> = fs::read_dir(&reports)
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["README"]);
    assert_eq!(fs::read_to_string(outside.join("keep")).unwrap(), "kept");
    assert_eq!(
        cli(&e, &["prune", "--older-than", "x"]).status.code(),
        Some(2)
    );
}

/// The index add/remove keep beside the catalog; a hand edit
/// makes it stale (resolution then parses the catalog, and says what the
/// edit says), `doctor` notes it and `reindex` rewrites it.
#[test]
fn a_hand_edited_catalog_is_read_not_its_stale_index() {
    let e = env("");
    assert!(cli(&e, &["init"]).status.success());
    let frameworks = root(&e).join("ml-frameworks");
    for i in 0..3 {
        sif_file(&frameworks.join(format!("img{i}.sif")));
        let o = cli(
            &e,
            &[
                "add",
                frameworks.join(format!("img{i}.sif")).to_str().unwrap(),
                "--name",
                &format!("img{i}"),
                "--tag",
                "1",
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
    }
    let idx = root(&e).join(".registry/catalog.idx");
    let m = fs::metadata(&idx).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o644);
    let o = cli(&e, &["doctor"]);
    assert!(
        text(&o).contains("ok      catalog index current"),
        "{}",
        text(&o)
    );
    let cfg = SiteConfig::load(
        &PlugstackArgs::parse(&[format!("config={}", e.config.display())]).unwrap(),
    )
    .unwrap();
    let reg = Registry::open(&cfg.registry).unwrap();
    assert!(reg.resolve("img1:1").unwrap().path.ends_with("img1.sif"));
    assert_eq!(reg.index_hits(), 1);
    // By hand: img1:1 now points at img2's file (same length).
    let cat = root(&e).join(".registry/catalog.toml");
    let edited = fs::read_to_string(&cat)
        .unwrap()
        .replace("ml-frameworks/img1.sif", "ml-frameworks/img2.sif");
    fs::write(&cat, edited).unwrap();
    let reg = Registry::open(&cfg.registry).unwrap();
    assert!(reg.resolve("img1:1").unwrap().path.ends_with("img2.sif"));
    assert_eq!(reg.index_hits(), 0, "the stale index was used");
    let o = cli(&e, &["doctor"]);
    assert!(
        text(&o).contains("note    the catalog index is stale"),
        "{}",
        text(&o)
    );
    let o = cli(&e, &["reindex"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("indexed 3 catalog entries"),
        "{}",
        text(&o)
    );
    let reg = Registry::open(&cfg.registry).unwrap();
    assert!(reg.resolve("img1:1").unwrap().path.ends_with("img2.sif"));
    assert_eq!(reg.index_hits(), 1);
    // A hand edit that breaks the catalog: reindex refuses, strictly.
    fs::write(&cat, "version = 1\n[[image]]\nname = \"x\"\n").unwrap();
    let o = cli(&e, &["reindex"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("catalog.toml:"), "{}", text(&o));
}

/// This node's cache through the CLI: fill copies once (then
/// says it is there), list and check show it, a changed copy is flagged
/// and pruned, an image without sha256 is never cached.
#[test]
fn cache_fill_list_check_prune_on_a_node() {
    let e = env("");
    let cache_dir = e.dir.join("node-cache/%n");
    fs::write(
        &e.config,
        format!(
            "[registry]\nroot = \"{}/containers\"\nnode_cache = \"{}\"\nnode_cache_max = \"64M\"\n",
            e.dir.display(),
            cache_dir.display()
        ),
    )
    .unwrap();
    assert!(cli(&e, &["init"]).status.success());
    let frameworks = root(&e).join("ml-frameworks");
    sif_file(&frameworks.join("a.sif"));
    let o = cli(
        &e,
        &[
            "add",
            frameworks.join("a.sif").to_str().unwrap(),
            "--name",
            "a",
            "--tag",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    let host = host.split('.').next().unwrap().to_string();
    let o = cli(&e, &["cache", "check", "a"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("{host}: a:1: in registry only")),
        "{}",
        text(&o)
    );
    let o = cli(&e, &["cache", "fill", "a:1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("copied to") && text(&o).contains("sha256 ok"),
        "{}",
        text(&o)
    );
    let o = cli(&e, &["cache", "fill", "a"]);
    assert!(text(&o).contains("already cached"), "{}", text(&o));
    let sum = integrity::sha256_file(&frameworks.join("a.sif")).unwrap();
    let copy = e.dir.join(format!("node-cache/{host}/images/{sum}.sif"));
    assert_eq!(
        fs::read(&copy).unwrap(),
        fs::read(frameworks.join("a.sif")).unwrap()
    );
    let o = cli(&e, &["doctor"]);
    assert!(
        text(&o).contains(&format!(
            "ok      node cache {}",
            e.dir.join("node-cache").join(&host).display()
        )),
        "{}",
        text(&o)
    );
    let o = cli(&e, &["cache", "list"]);
    assert!(text(&o).contains("1 images"), "{}", text(&o));
    assert!(text(&o).contains(" idle   ok      a:1"), "{}", text(&o));
    let o = cli(&e, &["cache", "check", "--all"]);
    assert!(
        text(&o).contains("in cache") && text(&o).contains("sha256 ok"),
        "{}",
        text(&o)
    );
    // Changed behind the cache's back: flagged, and prune removes it.
    let f = fs::OpenOptions::new().write(true).open(&copy).unwrap();
    f.write_all_at(b"x", 4096).unwrap();
    drop(f);
    let o = cli(&e, &["cache", "check", "a"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("CHANGED"), "{}", text(&o));
    let o = cli(&e, &["cache", "prune"]);
    assert!(text(&o).contains("1 removed, 0 kept"), "{}", text(&o));
    assert!(!copy.exists());
    // No sha256 in the catalog: not cached, and said so.
    sif_file(&frameworks.join("b.sif"));
    let cat = root(&e).join(".registry/catalog.toml");
    let mut t = fs::read_to_string(&cat).unwrap();
    t.push_str("\n[[image]]\nname = \"b\"\ntag = \"1\"\npath = \"ml-frameworks/b.sif\"\n");
    fs::write(&cat, t).unwrap();
    let o = cli(&e, &["cache", "fill", "b"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no sha256"), "{}", text(&o));
    // Off: a clear error naming the key.
    let e2 = env("");
    let o = cli(&e2, &["cache", "list"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("registry.node_cache is not set"),
        "{}",
        text(&o)
    );
}

#[test]
fn config_prints_what_it_loaded_refuses_a_bad_key_and_version_names_the_slurm() {
    let e = env("[runtime]\nshare_namespaces = false\nquiet = false\n");
    let o = cli(&e, &["config"]);
    assert!(o.status.success(), "{}", text(&o));
    // What it prints is the configuration as loaded: it parses back, with
    // the file's values over the defaults.
    let printed: SiteConfig = toml::from_str(&String::from_utf8_lossy(&o.stdout)).unwrap();
    assert!(!printed.runtime.share_namespaces && !printed.runtime.quiet);
    assert_eq!(printed.registry.root.as_path(), root(&e));
    assert_eq!(printed.failure, SiteConfig::default().failure);

    let bad = env("[runtime]\nshare_namespace = false\n");
    let o = cli(&bad, &["config"]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("ml-container.toml:4: key 'runtime.share_namespace'"),
        "{}",
        text(&o)
    );

    let o = cli(&e, &["version"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!(
            "ml-container {} (built for Slurm {})",
            env!("CARGO_PKG_VERSION"),
            slurm_ml_container::spank::BUILT_FOR_SLURM
        )
    );
}
