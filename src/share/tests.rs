//! Unit tests of `share.rs`.

use super::*;
use crate::config::RuntimeKind;
use crate::launch::Plan;
use crate::options::Mount;

fn plan(kind: RuntimeKind) -> Plan {
    Plan {
        kind,
        runtime: PathBuf::from("/usr/bin/apptainer"),
        image: PathBuf::from("/opt/containers/a.sif"),
        nv: true,
        binds: vec![Mount {
            src: PathBuf::from("/data"),
            dst: PathBuf::from("/d"),
            read_only: true,
        }],
        workdir: Some(PathBuf::from("/work")),
        writable_tmpfs: true,
        extra_args: vec!["--cleanenv".into()],
        quiet: true,
    }
}

#[test]
fn the_instance_gets_the_mounts_and_each_exec_the_workdir() {
    let dir = Path::new("/run/slurm-ml-container/5.0.n1");
    let s = plan(RuntimeKind::Apptainer)
        .shared(dir, "mlc-5-0", 4)
        .unwrap();
    assert_eq!(
        s.start.join(" "),
        "/usr/bin/apptainer --quiet instance start --nv --writable-tmpfs --bind /data:/d:ro \
         --cleanenv /opt/containers/a.sif mlc-5-0"
    );
    assert_eq!(
        s.exec.join(" "),
        "/usr/bin/apptainer --quiet exec --pwd /work --cleanenv instance://mlc-5-0"
    );
    assert_eq!(
        s.stop.join(" "),
        "/usr/bin/apptainer --quiet instance stop mlc-5-0"
    );
    assert_eq!(s.config_dir(), dir.join("apptainer"));
    assert_eq!(s.tasks, 4);
}

#[test]
fn one_task_charliecloud_and_singularity_run_alone() {
    let dir = Path::new("/x");
    assert!(plan(RuntimeKind::Apptainer).shared(dir, "n", 1).is_none());
    assert!(plan(RuntimeKind::Charliecloud)
        .shared(dir, "n", 4)
        .is_none());
    assert!(plan(RuntimeKind::Singularity).shared(dir, "n", 4).is_none());
}

/// A stand-in runtime: a script that records its calls and, for
/// `instance start`, fails when told to.
fn fake(dir: &Path, fail_start: bool) -> Share {
    use std::os::unix::fs::PermissionsExt;
    let rt = dir.join("rt");
    let log = dir.join("calls");
    std::fs::write(
        &rt,
        format!(
            "#!/bin/sh\necho \"$* $APPTAINER_CONFIGDIR\" >> {}\n\
             case \"$*\" in *'instance start'*) {} ;; esac\nexit 0\n",
            log.display(),
            if fail_start {
                "echo 'FATAL:   no FUSE here' >&2; exit 255"
            } else {
                "sleep 0.2"
            }
        ),
    )
    .unwrap();
    std::fs::set_permissions(&rt, std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = Plan {
        runtime: rt,
        binds: Vec::new(),
        workdir: None,
        extra_args: Vec::new(),
        ..plan(RuntimeKind::Apptainer)
    };
    p.shared(dir, "mlc-1-2", 3).unwrap()
}

fn calls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("calls"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn concurrent_tasks_start_it_once_and_the_last_one_stops_it() {
    let t = tempfile::tempdir().unwrap();
    let s = fake(t.path(), false);
    let joined: Vec<_> = (0..3)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || join(&s, None).map_err(|e| e.to_string()))
        })
        .collect();
    for j in joined {
        assert_eq!(j.join().unwrap().unwrap(), s.exec);
    }
    let c = calls(t.path());
    assert_eq!(c.len(), 1, "{c:?}");
    assert!(c[0].contains("instance start"), "{c:?}");
    let cfg = t.path().join("apptainer");
    assert!(c[0].ends_with(&cfg.display().to_string()), "{c:?}");
    assert!(cfg.is_dir());
    // Tasks end in any order: only the third stops it.
    assert_eq!(leave(&s).unwrap(), Phase::Up);
    assert_eq!(leave(&s).unwrap(), Phase::Up);
    assert_eq!(calls(t.path()).len(), 1);
    assert_eq!(leave(&s).unwrap(), Phase::Stopped);
    let c = calls(t.path());
    assert_eq!(c.len(), 2, "{c:?}");
    assert!(c[1].contains("instance stop mlc-1-2"), "{c:?}");
    let st = State::parse(&std::fs::read(t.path().join(STATE_FILE)).unwrap()).unwrap();
    assert_eq!((st.phase, st.done), (Phase::Stopped, 3));
    // A latecomer (counted twice) does not restart it.
    assert!(matches!(join(&s, None), Err(ShareError::Stopped)));
    assert_eq!(calls(t.path()).len(), 2);
}

#[test]
fn a_failed_start_is_tried_once_and_every_task_runs_alone() {
    let t = tempfile::tempdir().unwrap();
    let s = fake(t.path(), true);
    let e = join(&s, None).unwrap_err().to_string();
    assert!(e.contains("no FUSE here"), "{e}");
    assert!(
        e.ends_with("the task runs in a container of its own"),
        "{e}"
    );
    let e = join(&s, None).unwrap_err().to_string();
    assert!(e.contains("no FUSE here"), "{e}");
    assert_eq!(calls(t.path()).len(), 1, "started once");
    for _ in 0..3 {
        assert_eq!(leave(&s).unwrap(), Phase::Failed);
    }
    // Nothing to stop.
    assert_eq!(calls(t.path()).len(), 1);
}

#[test]
fn a_start_that_hangs_is_bounded() {
    let t = tempfile::tempdir().unwrap();
    let s = fake(t.path(), false);
    let began = Instant::now();
    let (r, _) = run_bounded(
        &s,
        &["/bin/sleep".to_string(), "10".to_string()],
        Duration::from_millis(300),
        None,
    );
    assert!(r.unwrap_err().contains("did not finish within"));
    assert!(began.elapsed() < Duration::from_secs(5));
}

#[test]
fn reasons_are_one_capped_line() {
    let r = reason_from(b"INFO: a\n\nFATAL: b\n", "exit status: 255");
    assert_eq!(r, "exit status: 255: INFO: a / FATAL: b");
    let long = "é".repeat(2000);
    let r = reason_from(long.as_bytes(), "x");
    assert!(
        r.len() <= REASON_CAP + 8 && r.starts_with("..."),
        "{}",
        r.len()
    );
}
