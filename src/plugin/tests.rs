//! The callbacks end to end, through the recording host: what srun,
//! slurmstepd and each task do for a job, on the happy path and when
//! something is wrong.

use super::testhost::{serial, Site, TestHost};
use super::*;
use crate::distenv::{self, BATCH_STEP, OWNED_ENV};
use crate::handoff::{Handoff, HANDOFF_ENV};
use crate::launch::{LaunchSpec, LAUNCH_ENV};
use crate::report;

/// A site config that does not parse (line 2), and its plugstack args.
fn bad_config() -> Site {
    let site = Site::new("badcfg");
    std::fs::write(
        site.path("ml-container.toml"),
        "[runtime]\ngpus = \"maybe\"\n",
    )
    .unwrap();
    site
}

/// srun (or sbatch) with `options` on its command line.
fn srun(
    ctx: Context,
    site: &Site,
    options: &[(OptionId, &str)],
) -> (TestHost, Result<(), PluginError>) {
    let mut h = TestHost::new(ctx);
    init(&mut h, &site.args).unwrap();
    for (id, value) in options {
        on_option(*id as i32, Some(value), false).unwrap();
    }
    let r = init_post_opt(&mut h);
    (h, r)
}

/// slurmstepd with `options` (as the node receives them), before its tasks:
/// the outcome of its init_post_opt.
fn stepd(site: &Site, options: &[(OptionId, &str)]) -> Result<(), PluginError> {
    let mut h = TestHost::new(Context::Remote);
    init(&mut h, &site.args).unwrap();
    for (id, value) in options {
        on_option(*id as i32, Some(value), true).unwrap();
    }
    init_post_opt(&mut h)
}

#[test]
fn registers_every_option_where_options_exist() {
    let _g = serial();
    for ctx in [Context::Local, Context::Remote, Context::Allocator] {
        let mut h = TestHost::new(ctx);
        init(&mut h, &[]).unwrap();
        let names: Vec<&str> = OPTIONS.iter().map(|o| o.name).collect();
        assert_eq!(h.registered(), names);
    }
    let mut h = TestHost::new(Context::Slurmd);
    init(&mut h, &[]).unwrap();
    assert!(h.registered().is_empty());
}

#[test]
fn bad_option_fails_in_srun() {
    let _g = serial();
    init(&mut TestHost::new(Context::Local), &[]).unwrap();
    let e = on_option(OptionId::Gpus as i32, Some("bogus"), false).unwrap_err();
    assert!(e.to_string().contains("--ml-container-gpus"));
    assert!(matches!(
        on_option(42, Some("x"), false),
        Err(PluginError::UnknownOption(42))
    ));
}

#[test]
fn state_survives_a_poisoned_lock() {
    let _g = serial();
    let _ = std::thread::spawn(|| {
        let _st = state();
        panic!("poison the lock");
    })
    .join();
    assert!(STATE.is_poisoned());
    init(&mut TestHost::new(Context::Local), &[]).unwrap();
    on_option(OptionId::Dist as i32, Some("off"), false).unwrap();
    assert_eq!(state().options.dist, Some(false));
}

#[test]
fn without_the_image_option_srun_does_nothing() {
    let _g = serial();
    let site = Site::new("noopt");
    let (h, r) = srun(Context::Local, &site, &[]);
    r.unwrap();
    assert!(!h.changed_anything(), "{:?}", h.calls);
    // Another option alone asks for the plugin, and needs an image.
    let (h, r) = srun(Context::Local, &site, &[(OptionId::Gpus, "on")]);
    assert!(matches!(r, Err(PluginError::NoImage)), "{r:?}");
    assert_eq!(h.local_env(HANDOFF_ENV), None);
}

#[test]
fn srun_pins_a_good_image_and_records_its_argv() {
    let _g = serial();
    let site = Site::new("pin");
    let (h, r) = srun(Context::Local, &site, &[(OptionId::Image, "demo")]);
    r.unwrap();
    let handoff = Handoff::decode(h.local_env(HANDOFF_ENV).flatten().unwrap()).unwrap();
    let pin = handoff.pin.unwrap();
    assert_eq!(pin.path, site.image());
    assert_eq!(
        (pin.name.as_deref(), pin.tag.as_deref()),
        (Some("demo"), Some("1"))
    );
    // srun's own argv (here: the test binary's), for the lookup on the node.
    let own: Vec<String> = std::fs::read("/proc/self/cmdline")
        .unwrap()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert_eq!(handoff.srun_argv, own);
    // sbatch checks the image but pins nothing and records nothing.
    let (h, r) = srun(Context::Allocator, &site, &[(OptionId::Image, "demo:1")]);
    r.unwrap();
    assert!(!h.changed_anything(), "{:?}", h.calls);
}

#[test]
fn srun_refuses_an_unknown_image_or_a_denied_bind() {
    let _g = serial();
    let site = Site::new("unknown");
    let (h, r) = srun(Context::Local, &site, &[(OptionId::Image, "demoo")]);
    let e = r.unwrap_err();
    assert!(matches!(e, PluginError::Registry(_)), "{e:?}");
    let e = e.to_string();
    assert!(e.starts_with("unknown image 'demoo'; closest: demo"), "{e}");
    assert_eq!(h.local_env(HANDOFF_ENV), None);
    // In the catalog, but its file is missing: fails here, not on a node.
    let (_, r) = srun(Context::Allocator, &site, &[(OptionId::Image, "gone")]);
    let e = r.unwrap_err().to_string();
    assert!(e.contains("gone-1.sif"), "{e}");
    let (h, r) = srun(
        Context::Local,
        &site,
        &[(OptionId::Image, "demo"), (OptionId::Mounts, "/etc:/x")],
    );
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("'/etc:/x:rw' touches /etc, which the site does not allow"),
        "{e}"
    );
    assert!(!h.changed_anything(), "{:?}", h.calls);
}

#[test]
fn srun_leaves_resolution_to_the_nodes_when_it_cannot_read_the_registry() {
    let _g = serial();
    let site = Site::new("noreg");
    std::fs::rename(site.path("containers"), site.path("elsewhere")).unwrap();
    let mut h = TestHost::new(Context::Local);
    // A handoff left in srun's environment (by the user) is replaced by
    // one without a pin.
    h.env.insert(HANDOFF_ENV.to_string(), "forged".to_string());
    init(&mut h, &site.args).unwrap();
    on_option(OptionId::Image as i32, Some("demo"), false).unwrap();
    init_post_opt(&mut h).unwrap();
    let handoff = Handoff::decode(&h.getenv(HANDOFF_ENV).unwrap()).unwrap();
    assert_eq!(handoff.pin, None);
    assert!(!handoff.srun_argv.is_empty());
}

/// slurmstepd given `handoff` in the job environment: what the task says.
fn stepd_with_handoff(site: &Site, handoff: &str) -> Result<(), PluginError> {
    let mut h = TestHost::new(Context::Remote);
    h.env.insert(HANDOFF_ENV.to_string(), handoff.to_string());
    init(&mut h, &site.args).unwrap();
    on_option(OptionId::Image as i32, Some("demo"), true).unwrap();
    on_option(OptionId::Dist as i32, Some("off"), true).unwrap();
    init_post_opt(&mut h).unwrap();
    let mut t = TestHost::task(0, 0, 1, &["/bin/true"]);
    let r = task_init(&mut t);
    if r.is_err() {
        assert!(t.argv0_set().is_none());
    }
    r
}

#[test]
fn a_node_believes_no_handoff_it_cannot_read() {
    let _g = serial();
    let site = Site::new("handoff");
    // srun's own handoff confirms what the node resolves.
    let (h, r) = srun(Context::Local, &site, &[(OptionId::Image, "demo")]);
    r.unwrap();
    let good = h.local_env(HANDOFF_ENV).flatten().unwrap().to_string();
    stepd_with_handoff(&site, &good).unwrap();
    // Garbage, another version, an unknown field, a forged pin: the step
    // fails as for a forged pin, echoing nothing.
    let mut pin = Handoff::decode(&good).unwrap().pin.unwrap();
    pin.name = Some("demo\nFAKE".to_string());
    let forged = Handoff::new(Some(pin), Vec::new()).encode().unwrap();
    for text in [
        "forged".to_string(),
        good.replace("\"version\":1", "\"version\":2"),
        good.replace("\"version\":1", "\"version\":1,\"extra\":1"),
        forged,
    ] {
        let e = stepd_with_handoff(&site, &text).unwrap_err().to_string();
        assert!(
            e.contains("is invalid (") && e.ends_with("do not set ML_CONTAINER_HANDOFF yourself"),
            "{e}"
        );
        assert!(!e.contains("FAKE") && !e.contains("extra"), "{e}");
    }
}

#[test]
fn broken_config_fails_only_jobs_that_use_the_plugin() {
    let _g = serial();
    let site = bad_config();
    let (h, r) = srun(Context::Local, &site, &[]);
    r.unwrap();
    assert!(!h.changed_anything());
    let (_, r) = srun(Context::Local, &site, &[(OptionId::Image, "pytorch")]);
    let e = r.unwrap_err().to_string();
    assert!(e.contains("ml-container.toml:2"), "{e}");
    assert!(e.contains("runtime.gpus"), "{e}");
}

#[test]
fn broken_config_on_node_is_reported_from_the_task() {
    let _g = serial();
    let site = bad_config();
    stepd(&site, &[(OptionId::Image, "pytorch")]).unwrap();
    let mut t = TestHost::task(0, 0, 1, &["/bin/true"]);
    let e = task_init(&mut t).unwrap_err().to_string();
    assert!(e.contains("runtime.gpus"), "{e}");
    assert!(t.argv0_set().is_none());
}

#[test]
fn a_bad_value_only_the_node_sees_fails_the_task_with_sruns_message() {
    let _g = serial();
    let srun_says = on_option(OptionId::Gpus as i32, Some("bo\ngus"), false)
        .unwrap_err()
        .to_string();
    for (id, value) in [(OptionId::Gpus, "bo\ngus"), (OptionId::Image, "demo\nFAKE")] {
        let mut h = TestHost::new(Context::Remote);
        init(&mut h, &[]).unwrap();
        on_option(id as i32, Some(value), true).unwrap();
        init_post_opt(&mut h).unwrap();
        let e = task_init(&mut h).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        if id == OptionId::Gpus {
            assert_eq!(e, srun_says);
        } else {
            assert!(e.contains("invalid --ml-container='demo\\nFAKE'"), "{e}");
        }
    }
    // A clean job on the next step of the same process is not affected.
    let mut h = TestHost::new(Context::Remote);
    init(&mut h, &[]).unwrap();
    init_post_opt(&mut h).unwrap();
    task_init(&mut h).unwrap();
    assert!(!h.changed_anything());
}

/// The environment slurmstepd gives task 1 of a 2-task step on n1.
fn step_env(t: &mut TestHost) {
    for (k, v) in [
        ("SLURM_JOB_ID", "7"),
        ("SLURM_STEP_ID", "0"),
        ("SLURM_STEP_NODELIST", "n1"),
        ("SLURM_STEP_NUM_TASKS", "2"),
        ("SLURM_STEP_TASKS_PER_NODE", "2"),
        ("SLURM_NODEID", "0"),
        ("SLURM_PROCID", "1"),
        ("SLURM_LOCALID", "1"),
    ] {
        t.env.insert(k.to_string(), v.to_string());
    }
}

#[test]
fn a_task_becomes_the_launcher_of_its_image() {
    let _g = serial();
    let site = Site::new("task");
    stepd(&site, &[(OptionId::Image, "demo")]).unwrap();
    let mut t = TestHost::task(1, 1, 2, &["/usr/bin/python3", "train.py"]);
    step_env(&mut t);
    // srun's argv: the user typed `python3`, srun resolved it on the host.
    let argv = ["srun", "-n2", "python3", "train.py"].map(String::from);
    t.env.insert(
        HANDOFF_ENV.to_string(),
        Handoff::new(None, argv.to_vec()).encode().unwrap(),
    );
    t.env.insert("MASTER_PORT".to_string(), "1234".to_string());
    task_init(&mut t).unwrap();
    assert_eq!(t.argv0_set(), Some(site.launcher().to_str().unwrap()));
    assert_eq!(
        t.argv.as_ref().unwrap()[0],
        site.launcher().to_str().unwrap()
    );
    let spec = LaunchSpec::decode(t.job_env(LAUNCH_ENV).unwrap()).unwrap();
    assert_eq!(spec.prefix[0], site.path("bin/apptainer").to_str().unwrap());
    assert!(
        spec.prefix.contains(&"exec".to_string()),
        "{:?}",
        spec.prefix
    );
    assert!(
        spec.prefix
            .contains(&site.image().to_string_lossy().into_owned()),
        "{:?}",
        spec.prefix
    );
    assert_eq!((spec.command.as_str(), spec.in_image), ("python3", true));
    let label = spec.task.unwrap();
    assert_eq!(
        (label.job, label.rank, label.image.as_str()),
        (7, 1, "demo:1")
    );
    // The distributed environment: ours where the user set nothing, the
    // user's own value kept, and both copied past the image's %environment.
    assert_eq!(t.job_env("RANK"), Some("1"));
    assert_eq!(t.job_env("WORLD_SIZE"), Some("2"));
    assert_eq!(t.job_env("MASTER_ADDR"), Some("n1"));
    assert_eq!(t.job_env("MASTER_PORT"), None);
    assert_eq!(t.job_env("APPTAINERENV_MASTER_PORT"), Some("1234"));
    assert_eq!(t.job_env("APPTAINERENV_RANK"), Some("1"));
}

#[test]
fn a_task_fails_when_the_node_cannot_run_it() {
    let _g = serial();
    let site = Site::new("taskfail");
    let cases: [(&[(OptionId, &str)], &str); 3] = [
        (
            &[
                (OptionId::Image, "demo"),
                (OptionId::Mounts, "/etc/ssl:/ssl"),
            ],
            "'/etc/ssl:/ssl:rw' touches /etc",
        ),
        (&[(OptionId::Image, "gone")], "gone-1.sif"),
        (&[(OptionId::Image, "nosuch")], "unknown image 'nosuch'"),
    ];
    for (options, says) in cases {
        super::reset();
        stepd(&site, options).unwrap();
        let mut t = TestHost::task(0, 0, 1, &["/bin/true"]);
        let e = task_init(&mut t).unwrap_err();
        assert!(matches!(e, PluginError::Node(_)), "{e:?}");
        let e = e.to_string();
        assert!(e.starts_with(&format!("node {}: ", hostname())), "{e}");
        assert!(e.contains(says), "{e}");
        assert!(t.argv0_set().is_none() && t.job_env(LAUNCH_ENV).is_none());
    }
    // The launcher missing on the node.
    super::reset();
    std::fs::remove_file(site.launcher()).unwrap();
    stepd(&site, &[(OptionId::Image, "demo"), (OptionId::Dist, "off")]).unwrap();
    let mut t = TestHost::task(0, 0, 1, &["/bin/true"]);
    let e = task_init(&mut t).unwrap_err().to_string();
    assert!(
        e.contains("the launcher") && e.contains("is missing"),
        "{e}"
    );
    assert!(t.argv0_set().is_none());
}

#[test]
fn a_slurm_error_setting_the_launch_spec_fails_the_task() {
    let _g = serial();
    let site = Site::new("seterr");
    stepd(&site, &[(OptionId::Image, "demo"), (OptionId::Dist, "off")]).unwrap();
    let mut t = TestHost::task(0, 0, 1, &["/bin/true"]);
    t.fail_set_job_env = Some(LAUNCH_ENV);
    let e = task_init(&mut t).unwrap_err();
    assert!(
        matches!(e, PluginError::Host(HostError::Spank { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains(LAUNCH_ENV), "{e}");
    assert!(t.argv0_set().is_none());
}

#[test]
fn the_batch_script_only_gets_the_jobs_master() {
    let _g = serial();
    let site = Site::new("batch");
    let mut h = TestHost::new(Context::Remote);
    h.step_id = Some(BATCH_STEP);
    init(&mut h, &site.args).unwrap();
    on_option(OptionId::Image as i32, Some("demo"), true).unwrap();
    init_post_opt(&mut h).unwrap();
    let mut t = TestHost::task(0, 0, 1, &["/bin/sh", "job.sh"]);
    t.step_id = Some(BATCH_STEP);
    t.env
        .insert("SLURM_JOB_NODELIST".to_string(), "n[3-4]".to_string());
    task_init(&mut t).unwrap();
    assert_eq!(t.job_env("MASTER_ADDR"), Some("n3"));
    assert!(t.job_env("MASTER_PORT").is_some());
    let owned = distenv::owned_pairs(t.job_env(OWNED_ENV).unwrap());
    assert_eq!(owned.len(), 2);
    assert_eq!(owned[0], ("MASTER_ADDR".to_string(), "n3".to_string()));
    assert!(t.job_env("RANK").is_none());
    assert!(t.argv0_set().is_none() && t.job_env(LAUNCH_ENV).is_none());
}

/// slurmstepd has prepared `demo` (distributed environment off, so no
/// master probe); the tasks then end with `statuses`, in order. The job's
/// uid and gid are only given at the end: without them slurmstepd makes no
/// per-step directory under /run, which a unit test must not touch.
fn run_step(site: &Site, statuses: &[i32]) -> Vec<TestHost> {
    stepd(site, &[(OptionId::Image, "demo"), (OptionId::Dist, "off")]).unwrap();
    let n = u32::try_from(statuses.len()).unwrap();
    let mut hosts = Vec::new();
    for (i, status) in statuses.iter().enumerate() {
        let rank = u32::try_from(i).unwrap();
        let mut t = TestHost::task(rank, rank, n, &["/bin/true"]);
        task_post_fork(&mut t).unwrap();
        t.exit_status = Some(*status);
        t.job_ids = Some((1500, 1600));
        task_exit(&mut t).unwrap();
        hosts.push(t);
    }
    hosts
}

#[test]
fn a_failed_task_leaves_a_report_and_metrics_lines() {
    let _g = serial();
    let site = Site::new("exitfail");
    let job_dir = site.report_dir().join("7");
    // Task 0 fails; the report waits for the node's last task.
    stepd(&site, &[(OptionId::Image, "demo"), (OptionId::Dist, "off")]).unwrap();
    let mut t = TestHost::task(0, 0, 2, &["/bin/true"]);
    task_post_fork(&mut t).unwrap();
    t.exit_status = Some(3 << 8);
    t.job_ids = Some((1500, 1600));
    task_exit(&mut t).unwrap();
    assert!(!job_dir.exists());
    let mut t = TestHost::task(1, 1, 2, &["/bin/true"]);
    t.exit_status = Some(0);
    t.job_ids = Some((1500, 1600));
    task_exit(&mut t).unwrap();
    let reports = report::read_job(&site.report_dir(), 7).unwrap();
    assert_eq!(reports.len(), 1, "{reports:?}");
    let (path, rep) = &reports[0];
    assert_eq!(path, &job_dir.join(format!("0.{}.json", hostname())));
    let rep = rep.as_ref().unwrap();
    assert_eq!((rep.job_id, rep.step_id, rep.uid), (7, 0, 1500));
    assert_eq!(rep.image.path, site.image());
    assert_eq!(rep.tasks.len(), 2);
    assert_eq!(rep.tasks[0].exit_code, Some(3));
    assert!(rep.tasks[0].started_unix_ms.is_some() && rep.tasks[0].ended_unix_ms.is_some());
    assert!(
        rep.issues_found
            .iter()
            .any(|i| i == "rank 0 exited with code 3"),
        "{:?}",
        rep.issues_found
    );
    // Dist off: no contract, no master probe, no complaint about either.
    assert!(rep.environment.is_empty() && rep.node_state.master.is_none());
    let metrics = site.metrics();
    let lines: Vec<&str> = metrics.lines().collect();
    assert_eq!(lines.len(), 2, "{metrics}");
    assert!(
        lines[0].starts_with(&format!(
            "JOB_ID=7 STEP_ID=0 NODE={} RANK=0 IMAGE=demo:1 EXIT_CODE=3 ",
            hostname()
        )),
        "{metrics}"
    );
    assert!(
        lines[1].contains("RANK=1 IMAGE=demo:1 EXIT_CODE=0 "),
        "{metrics}"
    );
}

#[test]
fn a_step_that_succeeds_writes_no_report() {
    let _g = serial();
    let site = Site::new("exitok");
    run_step(&site, &[0, 0]);
    assert!(!site.report_dir().join("7").exists());
    assert_eq!(site.metrics().matches("EXIT_CODE=0 ").count(), 2);
    // A step killed by a signal counts as failed.
    super::reset();
    let hosts = run_step(&site, &[libc::SIGSEGV]);
    let reports = report::read_job(&site.report_dir(), 7).unwrap();
    let rep = reports[0].1.as_ref().unwrap();
    assert_eq!(rep.tasks[0].signal, Some(libc::SIGSEGV));
    assert!(
        rep.issues_found
            .iter()
            .any(|i| i.contains("crashed with SIGSEGV")),
        "{:?}",
        rep.issues_found
    );
    // The bind sources were checked as the job's user.
    assert_eq!(hosts[0].as_user_calls.get(), 1);
}

#[test]
fn task_exit_of_a_step_without_the_plugin_does_nothing() {
    let _g = serial();
    let site = Site::new("exitnone");
    let mut h = TestHost::new(Context::Remote);
    init(&mut h, &site.args).unwrap();
    init_post_opt(&mut h).unwrap();
    let mut t = TestHost::task(0, 0, 1, &["/bin/false"]);
    t.exit_status = Some(1 << 8);
    t.job_ids = Some((1500, 1600));
    task_exit(&mut t).unwrap();
    assert!(site.metrics().is_empty());
    assert!(!site.report_dir().exists());
    assert!(!t.changed_anything());
}
