//! Generates the SPANK bindings for the Slurm this build targets.
//!
//! `SLURM_INCLUDE_DIR` names a directory holding `slurm/spank.h` and
//! `slurm/slurm_version.h` (SPEC "build against a given Slurm"); without it the
//! system's headers are used. The plugin must be built once per Slurm release:
//! Slurm refuses a plugin whose `plugin_version` is not its own major.minor.

// A build script reports failure by panicking: expect() is how it says why.
#![allow(clippy::expect_used)]

use std::env;
use std::fs;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=SLURM_INCLUDE_DIR");
    println!("cargo:rerun-if-changed=include/wrapper.h");

    let include = env::var_os("SLURM_INCLUDE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/include"));
    let spank_h = include.join("slurm/spank.h");
    let version_h = include.join("slurm/slurm_version.h");
    for header in [&spank_h, &version_h] {
        if !header.is_file() {
            panic!(
                "{} not found: install Slurm's headers (Debian: libslurm-dev) or set \
                 SLURM_INCLUDE_DIR to a directory holding slurm/spank.h",
                header.display()
            );
        }
        println!("cargo:rerun-if-changed={}", header.display());
    }

    let version_text = fs::read_to_string(&version_h).expect("read slurm_version.h");
    let version = version_text
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next(), w.next()) {
                (Some("#define"), Some("SLURM_VERSION_NUMBER"), Some(v)) => Some(v.to_string()),
                _ => None,
            }
        })
        .expect("SLURM_VERSION_NUMBER in slurm_version.h");
    let version_num =
        u32::from_str_radix(version.trim_start_matches("0x"), 16).expect("hex version number");
    println!("cargo:rustc-env=MLC_SLURM_VERSION_NUMBER={version_num}");
    // Written as Slurm writes it: the minor with two digits (22.05, 26.05),
    // or `ml-container doctor` compares "26.5" with a running "26.05".
    println!(
        "cargo:rustc-env=MLC_SLURM_VERSION={}.{:02}.{}",
        version_num >> 16,
        (version_num >> 8) & 0xff,
        version_num & 0xff
    );
    // src/hostlist.rs picks the release's hostlist rules from the number.

    // rustc links cdylibs with BIND_NOW: every function the plugin calls
    // must exist in the oldest Slurm it is built for. No call is made to
    // what only newer headers declare (spank_prepend_task_argv, 23.11+, is
    // not used: every task runs under ml-container-launch).

    let bindings = bindgen::Builder::default()
        .header("include/wrapper.h")
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_function("spank_.*")
        .allowlist_function("slurm_(error|info|verbose|debug|debug2|spank_log)")
        .allowlist_type("spank_.*")
        .allowlist_var("ESPANK_.*|SLURM_VERSION_NUMBER|S_CTX_.*|S_JOB_.*|S_TASK_.*")
        .allowlist_type("slurm_err_t")
        .prepend_enum_name(false)
        .layout_tests(false)
        .generate()
        .expect("bindgen over include/wrapper.h");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("spank_bindings.rs");
    bindings.write_to_file(&out).expect("write bindings");
}
