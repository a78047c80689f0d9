//! The Debian package: in a clean trixie root (Slurm 24.11,
//! Apptainer), the package alone makes `srun --ml-container=NAME` work; an
//! upgrade keeps an edited config; removing it leaves srun working. The
//! same for the 26.05 package in a clean sid root.

use crate::harness::{build_deb, images, Cluster, Options, Slurm};

crate::on_apptainer_slurms!(the_deb_installs_runs_upgrades_and_removes);

fn the_deb_installs_runs_upgrades_and_removes(slurm: Slurm) {
    let first = build_deb(slurm, "0.1.0");
    let second = build_deb(slurm, "0.1.1");
    let img = images(&["pkgdemo"]);
    let c = Cluster::start_with(
        slurm,
        Options {
            install_plugin: false,
            ..Options::default()
        }
        .copy(&first, "/root/pkg/first.deb")
        .copy(&second, "/root/pkg/second.deb")
        .copy(&img["pkgdemo"], "/root/pkgdemo.sif"),
    );
    let apt = |args: &[&str]| {
        let mut argv = vec![
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "-y",
            "--no-install-recommends",
            "-o",
            "Dpkg::Options::=--force-confold",
        ];
        argv.extend_from_slice(args);
        c.run_root(1, &argv)
    };
    // Without the package the option does not exist.
    c.srun(&["-N1", "--ml-container=pkgdemo", "/bin/true"])
        .assert_failed();

    apt(&["install", "/root/pkg/first.deb"]).assert_ok();
    c.run_root(
        1,
        &[
            "ml-container",
            "add",
            "/root/pkgdemo.sif",
            "--name",
            "pkgdemo",
            "--tag",
            "1",
            "--copy-to",
            "ml-frameworks",
        ],
    )
    .assert_ok();
    let r = c.srun(&[
        "-N2",
        "-n2",
        "--ml-container=pkgdemo",
        "/bin/cat",
        "/MARKER",
    ]);
    assert_eq!(r.assert_ok().stdout, "pkgdemo\npkgdemo\n", "{r}");
    // What the package ships besides the binaries: the recipes (listed by
    // the CLI), the Grafana dashboard, logrotate and tmpfiles snippets.
    let recipes = c.run_root(1, &["ml-container", "recipes"]);
    assert!(
        recipes.assert_ok().stdout.contains("pytorch-debian")
            && recipes.stdout.contains("pytorch-cuda"),
        "{recipes}"
    );
    for shipped in [
        "/usr/share/slurm-ml-container/grafana/slurm-ml-container.json",
        "/etc/logrotate.d/slurm-ml-container",
        "/usr/lib/tmpfiles.d/slurm-ml-container.conf",
    ] {
        assert!(c.path(shipped).is_file(), "{shipped} not installed");
    }
    let doctor = c.run_root(1, &["ml-container", "doctor"]);
    let built_for = format!("built for Slurm {}", slurm.name());
    assert!(doctor.stdout.contains(&built_for), "{doctor}");

    // An edited config survives the upgrade.
    c.write(
        "/etc/slurm/ml-container.toml",
        "[env]\nFROM_SITE = \"edited\"\n",
        0o644,
    );
    apt(&["install", "/root/pkg/second.deb"]).assert_ok();
    let v = c.run_root(
        1,
        &["dpkg-query", "-W", "-f", "${Version}", "slurm-ml-container"],
    );
    assert_eq!(
        v.assert_ok().stdout,
        format!("0.1.1+slurm{}", slurm.name()),
        "{v}"
    );
    assert_eq!(
        c.read("/etc/slurm/ml-container.toml"),
        "[env]\nFROM_SITE = \"edited\"\n"
    );
    let r = c.srun(&[
        "-N1",
        "--ml-container=pkgdemo",
        "/bin/sh",
        "-c",
        "echo $FROM_SITE",
    ]);
    assert_eq!(r.assert_ok().stdout, "edited\n", "{r}");

    // Removed: srun works again without the plugin.
    apt(&["remove", "slurm-ml-container"]).assert_ok();
    let r = c.srun(&["-N2", "-n2", "hostname"]);
    assert_eq!(r.assert_ok().stdout.lines().count(), 2, "{r}");
    assert!(!c
        .path("/etc/slurm/plugstack.conf.d/ml-container.conf")
        .exists());
}
