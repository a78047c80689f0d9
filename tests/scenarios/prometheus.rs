//! Prometheus: with `failure.prometheus_dir` set, each node keeps
//! `ml-container.prom` for node_exporter's textfile collector. The real
//! `prometheus-node-exporter` (Debian's) serves it over HTTP on a loopback
//! port of the host; `promtool check metrics` (Debian's `prometheus`)
//! checks both the file and what node_exporter serves.
//!
//! The test cluster's nodes share one file system, so both nodes keep one
//! file and one set of counters here (on a real cluster each node has its
//! own): the values are the sums over both nodes, under the lock.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Cluster, Options, Slurm};

crate::on_slurm_24_11!(node_exporter_serves_what_the_jobs_did);

const DIR: &str = "/var/lib/prometheus/node-exporter";

/// node_exporter, killed when dropped.
struct Exporter(Child);

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET /metrics` from 127.0.0.1:port, the body.
fn scrape(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.1 200").then(|| body.to_string()))
}

/// `name{labels}` -> value, for the series whose name starts with `prefix`.
fn samples(text: &str, prefix: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn sum(s: &BTreeMap<String, f64>, name: &str) -> f64 {
    s.iter()
        .filter(|(k, _)| k.split('{').next() == Some(name))
        .map(|(_, v)| v)
        .sum()
}

fn promtool_check(text: &str) {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; tests/install-deps.sh)");
    p.stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = p.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn node_exporter_serves_what_the_jobs_did() {
    let c = Cluster::start_with(
        Slurm::V24_11,
        Options::default().with_scan_images(&["demo"]).file(
            "/etc/slurm/ml-container.toml",
            &format!("[failure]\nprometheus_dir = \"{DIR}\"\n"),
        ),
    );
    c.run_root(1, &["mkdir", "-p", "-m", "0755", DIR])
        .assert_ok();
    let srun = |args: &[&str]| {
        let mut argv = args.to_vec();
        let at = argv.len() - 3;
        argv.insert(at, "--ml-container=demo");
        c.srun(&argv)
    };
    // 1: four tasks, all fine. 2: rank 1 exits 3. 3: SIGKILL. 4: exit 1.
    srun(&["-N2", "-n4", "/bin/sh", "-c", "true"]).assert_ok();
    srun(&[
        "-N2",
        "-n2",
        "/bin/sh",
        "-c",
        "[ $RANK = 1 ] && exit 3; exit 0",
    ])
    .assert_failed();
    srun(&["-w", "n1", "/bin/sh", "-c", "kill -9 $$"]).assert_failed();
    srun(&["-w", "n1", "/bin/sh", "-c", "exit 1"]).assert_failed();

    let file = c.path(&format!("{DIR}/ml-container.prom"));
    // The last node's update may land just after srun returns.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let t = std::fs::read_to_string(&file).unwrap_or_default();
        if sum(&samples(&t, "ml_container_"), "ml_container_steps_total") >= 6.0
            || Instant::now() > deadline
        {
            break t;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    promtool_check(&text);
    let st = c.run_root(
        1,
        &[
            "stat",
            "-c",
            "%U %a %F",
            &format!("{DIR}/ml-container.prom"),
            &format!("{DIR}/.ml-container"),
        ],
    );
    assert_eq!(
        st.assert_ok().stdout,
        "root 644 regular file\nroot 700 directory\n",
        "{st}"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    let _exporter = Exporter(
        Command::new("prometheus-node-exporter")
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .args(["--collector.disable-defaults", "--collector.textfile"])
            .arg(format!(
                "--collector.textfile.directory={}",
                c.path(DIR).display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus-node-exporter (Debian package; tests/install-deps.sh)"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        if let Some(b) = scrape(port) {
            break b;
        }
        assert!(Instant::now() < deadline, "node_exporter never answered");
        std::thread::sleep(Duration::from_millis(100));
    };
    promtool_check(&body);
    let s = samples(&body, "");
    assert_eq!(
        s.get("node_textfile_scrape_error"),
        Some(&0.0),
        "node_exporter could not read the file:\n{body}"
    );
    let ours = samples(&body, "ml_container_");
    assert_eq!(
        sum(&ours, "ml_container_tasks_started_total"),
        8.0,
        "{body}"
    );
    assert_eq!(
        ours.get("ml_container_tasks_started_total{image=\"demo\"}"),
        Some(&8.0),
        "{body}"
    );
    for (class, n) in [
        ("exit_other", 1.0),
        ("signal_SIGKILL", 1.0),
        ("exit_1", 1.0),
    ] {
        assert_eq!(
            ours.get(&format!(
                "ml_container_tasks_failed_total{{exit_class=\"{class}\",image=\"demo\"}}"
            )),
            Some(&n),
            "{class}:\n{body}"
        );
    }
    assert_eq!(sum(&ours, "ml_container_tasks_failed_total"), 3.0, "{body}");
    // Steps per node: job 1 ok on n1 and n2; job 2 ok on n1, failed on
    // n2; jobs 3 and 4 failed on n1.
    assert_eq!(
        ours.get("ml_container_steps_total{image=\"demo\",outcome=\"ok\"}"),
        Some(&3.0),
        "{body}"
    );
    assert_eq!(
        ours.get("ml_container_steps_total{image=\"demo\",outcome=\"failed\"}"),
        Some(&3.0),
        "{body}"
    );
    assert_eq!(
        sum(&ours, "ml_container_step_duration_seconds_count"),
        6.0,
        "{body}"
    );
    assert!(
        sum(&ours, "ml_container_step_duration_seconds_sum") > 0.0,
        "{body}"
    );
    assert_eq!(
        sum(&ours, "ml_container_launch_overhead_seconds_count"),
        6.0,
        "{body}"
    );
    assert_eq!(sum(&ours, "ml_container_oom_kills_total"), 0.0, "{body}");
    // No job id on any series: the labels are image, exit_class, outcome.
    for k in ours.keys() {
        let labels = k.split_once('{').map_or("", |(_, l)| l);
        assert!(
            labels.split(',').filter(|l| !l.is_empty()).all(|l| [
                "image=",
                "exit_class=",
                "outcome="
            ]
            .iter()
            .any(|p| l.starts_with(p))),
            "{k}"
        );
    }
}

/// The Grafana dashboard (packaging/grafana/) is JSON whose every query
/// parses as PromQL (`promtool check rules`, with Grafana's variables
/// given values), over the metric names this plugin writes.
#[test]
fn the_grafana_dashboard_queries_parse_and_use_our_metrics() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/grafana/slurm-ml-container.json"
    );
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    let mut rules = String::from("groups:\n- name: dashboard\n  rules:\n");
    let mut n = 0;
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let e = t["expr"]
                .as_str()
                .expect("expr")
                .replace("$__rate_interval", "5m")
                .replace("$__range", "1d")
                .replace("$image", ".*")
                .replace("$instance", ".*");
            assert!(e.contains("ml_container_"), "{e}");
            n += 1;
            rules.push_str(&format!(
                "  - record: dashboard:q{n}\n    expr: {}\n",
                serde_json::Value::String(e)
            ));
        }
    }
    let file = tempfile::Builder::new()
        .suffix(".yml")
        .tempfile()
        .expect("a temp file for the rules");
    std::fs::write(file.path(), rules).expect("write rules");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(file.path())
        .output()
        .expect("promtool (Debian package prometheus)");
    drop(file);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&format!("SUCCESS: {n} rules found")),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
