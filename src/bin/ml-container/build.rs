//! `build RECIPE --name N --tag T [--set KEY=VALUE]... [--default]` and
//! `recipes`: images from the shipped Apptainer definition templates
//! (src/recipe.rs, packaging/recipes/).
//!
//! The build runs `apptainer build` as whoever runs the CLI: root at most
//! sites; an unprivileged registry owner (`registry.owner`) where root
//! cannot run Apptainer (then Apptainer runs %post in a root-mapped user
//! namespace). The image is built under a temporary name inside the
//! registry directory, checked, hashed, linked to its final name and added
//! to the catalog under the catalog lock; any failure (a bad variable, the
//! build, `container_build_timeout`) removes what the build wrote and leaves
//! the catalog untouched.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use slurm_ml_container::catalog::{self, Image};
use slurm_ml_container::catalog_write;
use slurm_ml_container::config::{RuntimeKind, SiteConfig};
use slurm_ml_container::integrity;
use slurm_ml_container::recipe::{self, Recipe};
use slurm_ml_container::registry::Registry;

use crate::{fail, usage, Args};

/// Apptainer's cache (base layers, docker blobs) when the recipe keeps
/// `container_build_cache = true`.
const BUILD_CACHE: &str = "/var/cache/slurm-ml-container/build";
/// Without a `container_build_timeout` in the recipe: an hour.
const DEFAULT_TIMEOUT: u64 = 3600;

fn recipe_dir(args: &mut Args) -> PathBuf {
    args.value("--recipes")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(recipe::RECIPE_DIR))
}

/// `recipes [--recipes DIR]`: each recipe, what it is, its variables.
pub fn recipes(args: &mut Args) -> ExitCode {
    let dir = recipe_dir(args);
    let all = recipe::list(&dir);
    if all.is_empty() {
        return fail(&format!(
            "no recipes in {}: install the package, or give --recipes DIR",
            dir.display()
        ));
    }
    let mut code = ExitCode::SUCCESS;
    for (name, _) in all {
        match recipe::load(&dir, &name) {
            Ok(r) => {
                println!("{name}: {}", r.about);
                for v in &r.variables {
                    println!("    {} = {:?}    {}", v.name, v.default, v.doc);
                }
            }
            Err(e) => {
                eprintln!("ml-container: {e}");
                code = ExitCode::from(1);
            }
        }
    }
    code
}

fn runtime_binary(cfg: &SiteConfig) -> Result<PathBuf, String> {
    if let Some(p) = &cfg.runtime.path {
        return Ok(p.as_path().to_path_buf());
    }
    match cfg.runtime.kind {
        RuntimeKind::Apptainer => Ok(PathBuf::from("apptainer")),
        RuntimeKind::Singularity => Ok(PathBuf::from("singularity")),
        RuntimeKind::Charliecloud => Err(
            "runtime.kind = \"charliecloud\" cannot build from a definition file: \
             build on a host with Apptainer (runtime.kind = \"apptainer\")"
                .to_string(),
        ),
    }
}

/// The date for the `build_date` label: RFC 3339, UTC.
fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    catalog_write::format_rfc3339(secs)
}

/// Removes the build's files when dropped, unless disarmed.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = if p.is_dir() {
                fs::remove_dir_all(p)
            } else {
                fs::remove_file(p)
            };
        }
    }
}

/// How the build process ended.
enum Outcome {
    Exited(std::process::ExitStatus),
    TimedOut,
}

/// Runs `cmd` in a process group of its own and waits up to `timeout`;
/// past it, the whole group (Apptainer, its starter, %post's shell and
/// whatever that started) gets SIGTERM, then SIGKILL 5 s later.
fn run_bounded(mut cmd: Command, timeout: Duration) -> std::io::Result<Outcome> {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    cmd.process_group(0);
    let mut child = cmd.spawn()?;
    let pgid = Pid::from_raw(child.id() as i32);
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Outcome::Exited(st));
        }
        if start.elapsed() >= timeout {
            let _ = killpg(pgid, Signal::SIGTERM);
            let grace = Instant::now();
            while grace.elapsed() < Duration::from_secs(5) {
                if child.try_wait()?.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // The group, not just the child: %post's children outlive it.
            let _ = killpg(pgid, Signal::SIGKILL);
            let _ = child.wait();
            return Ok(Outcome::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `build RECIPE --name N --tag T [--set KEY=VALUE]... [--default]
/// [--copy-to DIR] [--recipes DIR] [--dry-run]`
pub fn build(cfg: &SiteConfig, args: &mut Args) -> ExitCode {
    const U: &str = "ml-container build RECIPE --name N --tag T [--set KEY=VALUE]... \
                     [--default] [--copy-to DIR] [--recipes DIR] [--dry-run]";
    // Options before the positional argument: an option's value ("--name
    // pytorch") must not be taken for the recipe.
    let dir = recipe_dir(args);
    let (name, tag) = (args.value("--name"), args.value("--tag"));
    let default = args.flag("--default");
    let dry_run = args.flag("--dry-run");
    let copy_to = args
        .value("--copy-to")
        .unwrap_or_else(|| "ml-frameworks".to_string());
    let set_args = args.values("--set");
    let (Some(recipe_name), Some(name), Some(tag)) = (args.positional(), name, tag) else {
        return usage(U);
    };
    let mut sets = Vec::new();
    for s in set_args {
        match recipe::parse_set(&s) {
            Ok(kv) => sets.push(kv),
            Err(e) => return fail(&e.to_string()),
        }
    }
    if let Some(bad) = args.leftover() {
        return fail(&format!("unexpected argument '{bad}'; usage: {U}"));
    }
    if !catalog::valid_name(&name) || !catalog::valid_tag(&tag) {
        return fail(&format!(
            "'{name}:{tag}' is not a valid name:tag (lowercase name, tag of letters, digits, . _ -)"
        ));
    }
    if copy_to.contains('/') || copy_to.starts_with('.') || copy_to.is_empty() {
        return fail(&format!(
            "--copy-to takes a directory name under {}",
            cfg.registry.root.as_path().display()
        ));
    }
    // Everything about the recipe is checked before anything is written.
    let recipe: Recipe = match recipe::load(&dir, &recipe_name) {
        Ok(r) => r,
        Err(e) => return fail(&e.to_string()),
    };
    let values = match recipe.values(&sets) {
        Ok(v) => v,
        Err(e) => return fail(&e.to_string()),
    };
    let reference = format!("{name}:{tag}");
    let builtins = [
        ("recipe", recipe.name.clone()),
        ("build_date", now_rfc3339()),
        ("image", reference.clone()),
    ];
    let def = match recipe.render(&values, &builtins) {
        Ok(d) => d,
        Err(e) => return fail(&e.to_string()),
    };
    let parsed = match recipe::parse_definition(&def) {
        Ok(p) => p,
        Err(e) => return fail(&format!("recipe {}: {e}", recipe.name)),
    };
    let timeout = match values.get("container_build_timeout") {
        None => DEFAULT_TIMEOUT,
        Some(t) => match t.parse::<u64>() {
            Ok(n) if n > 0 => n,
            _ => {
                return fail(&format!(
                    "container_build_timeout = {t:?}: give a number of seconds, \
                     e.g. --set container_build_timeout=3600"
                ))
            }
        },
    };
    if dry_run {
        print!("{def}");
        return ExitCode::SUCCESS;
    }
    // A localimage base that is not there: say how to make it.
    if let Some((_, from)) = parsed.header.iter().find(|(k, _)| k == "From") {
        let localimage = parsed
            .header
            .first()
            .is_some_and(|(_, v)| v.eq_ignore_ascii_case("localimage"));
        if localimage && !Path::new(from).exists() {
            return fail(&format!(
                "recipe {}: the base {from} does not exist: make it as the recipe's header \
                 says (ml-container recipes), or --set container_image_base=PATH",
                recipe.name
            ));
        }
    }
    let runtime = match runtime_binary(cfg) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let root = cfg.registry.root.as_path();
    if let Ok(reg) = Registry::open(&cfg.registry) {
        if reg.catalog().is_ok_and(|c| c.get(&name, &tag).is_some()) {
            return fail(&format!(
                "{reference} is already in the catalog: 'ml-container remove {reference}' \
                 first, or pick another tag"
            ));
        }
    }
    let rel = PathBuf::from(&copy_to).join(format!("{}-{tag}.sif", name.replace('/', "_")));
    let dest = root.join(&rel);
    if fs::symlink_metadata(&dest).is_ok() {
        return fail(&format!(
            "{} already exists: remove it or pick another tag (build never overwrites an image)",
            dest.display()
        ));
    }
    let target_dir = root.join(&copy_to);
    if let Err(e) = fs::create_dir_all(&target_dir) {
        return fail(&format!("cannot create {}: {e}", target_dir.display()));
    }
    // Hidden temporary names next to the destination: same file system
    // for the final link, and never a name the search directories scan.
    let pid = std::process::id();
    let stem = format!(".{}-{tag}.build-{pid}", name.replace('/', "_"));
    let tmp_sif = target_dir.join(format!("{stem}.sif"));
    let work = target_dir.join(format!("{stem}.d"));
    let mut cleanup = Cleanup(vec![tmp_sif.clone(), work.clone()]);
    let def_path = work.join(format!("{}.def", recipe.name));
    if let Err(e) = fs::create_dir(&work).and_then(|()| fs::write(&def_path, &def)) {
        return fail(&format!("cannot write {}: {e}", def_path.display()));
    }

    let mut cmd = Command::new(&runtime);
    cmd.arg("build");
    // Apptainer's temporary tree (a copy of the base, GBs) next to the
    // image, not in a small /tmp.
    cmd.env("APPTAINER_TMPDIR", &work);
    if values.get("container_build_cache").map(String::as_str) == Some("false") {
        cmd.arg("--disable-cache");
    } else {
        let cache = PathBuf::from(BUILD_CACHE);
        if fs::create_dir_all(&cache).is_ok() {
            cmd.env("APPTAINER_CACHEDIR", &cache);
        }
    }
    cmd.arg(&tmp_sif).arg(&def_path);
    eprintln!(
        "ml-container: building {reference} from recipe {} (timeout {timeout} s): {} build {} {}",
        recipe.name,
        runtime.display(),
        tmp_sif.display(),
        def_path.display()
    );
    let start = Instant::now();
    match run_bounded(cmd, Duration::from_secs(timeout)) {
        Err(e) => {
            return fail(&format!(
                "cannot run {}: {e}; install Apptainer or set runtime.path",
                runtime.display()
            ))
        }
        Ok(Outcome::TimedOut) => {
            return fail(&format!(
                "the build of {reference} (recipe {}) passed container_build_timeout = {timeout} s \
                 and was killed; nothing was added. Raise it: --set container_build_timeout=SECONDS",
                recipe.name
            ))
        }
        Ok(Outcome::Exited(st)) if !st.success() => {
            return fail(&format!(
                "{} build failed ({st}) for {reference} (recipe {}); nothing was added. \
                 Its output is above",
                runtime.display(),
                recipe.name
            ))
        }
        Ok(Outcome::Exited(_)) => {}
    }
    eprintln!(
        "ml-container: built {} in {:.0} s",
        reference,
        start.elapsed().as_secs_f64()
    );
    if let Err(e) = integrity::quick(&tmp_sif, None) {
        return fail(&format!("the built image is not sound: {e}"));
    }
    let (size, sha256) = match crate::registry_cmds::hash_file(&tmp_sif) {
        Ok(x) => x,
        Err(e) => return fail(&format!("cannot hash {}: {e}", tmp_sif.display())),
    };
    // link(2): fails rather than overwrite an image that appeared meanwhile.
    if let Err(e) = fs::hard_link(&tmp_sif, &dest) {
        return fail(&format!("cannot place {}: {e}", dest.display()));
    }
    let mut labels = parsed.labels.clone();
    labels.retain(|k, _| k != "image");
    let image = Image {
        name,
        tag,
        path: rel,
        sha256: Some(sha256),
        size: Some(size),
        default,
        aliases: Vec::new(),
        description: Some(recipe.about.clone()),
        labels,
        added: Some(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        ),
        line: 0,
    };
    let result = catalog_write::lock(root).and_then(|mut l| {
        l.add(image)?;
        l.commit()
    });
    match result {
        Ok(()) => {
            drop(cleanup);
            println!(
                "added {reference} ({size} bytes) from recipe {}",
                recipe.name
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            cleanup.0.push(dest);
            fail(&e.to_string())
        }
    }
}
