//! Prometheus scraping a running job: Debian's `prometheus` server (installed by the test
//! command) scrapes the coordinator's `/metrics`, and its query API shows the job's series and
//! that they advance.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use braid_tests::{free_port, read_logs, spawn_logged, synth_data, url_encode, JobFile, KillOnDrop};
use serde_json::Value;

/// The `prometheus` server binary; the test command installs Debian's package.
fn prometheus_bin() -> &'static str {
    let found = Command::new("prometheus").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(
        found.is_ok_and(|s| s.success()),
        "the prometheus server is not installed: ./scripts/setup.sh --test installs Debian's `prometheus` package"
    );
    "prometheus"
}

/// Starts Prometheus scraping `target` every second; its files go under `dir`.
fn start_prometheus(dir: &Path, target: &str, listen: &str) -> KillOnDrop {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: braid\n    \
             metrics_path: /metrics\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new(prometheus_bin())
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address={listen}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting prometheus");
    KillOnDrop(child)
}

/// The result vector of an instant query through Prometheus's HTTP API; empty while it has no
/// samples or is not up yet.
fn query(prometheus: &str, expr: &str) -> Vec<Value> {
    let Ok(response) = braid_tests::http_request(prometheus, "GET", &format!("/api/v1/query?query={}", url_encode(expr)), &[], "")
    else {
        return Vec::new();
    };
    if response.status != 200 {
        return Vec::new();
    }
    let body: Value = serde_json::from_str(&response.body).unwrap_or_else(|e| panic!("{expr}: {e}: {}", response.body));
    assert_eq!(body["status"], "success", "{expr}: {body}");
    body["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The value of a one-sample query result.
fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

#[test]
fn prometheus_scrapes_the_jobs_series_and_sees_them_advance() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_data(&dir.path().join("data"), 400, 20, 100);
    let job = JobFile {
        workers: 2,
        steps: 100_000,
        checkpoint: Some(dir.path().join("ckpt")),
        every_steps: 10,
        ..JobFile::new("prom", &data)
    }
    .write(&dir.path().join("job.toml"));
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let coordinator = format!("127.0.0.1:{}", free_port());
    let spawn = |args: &[&str], log: &str| spawn_logged(&[], args, &logs.join(log));
    let _coordinator = spawn(&["coordinator", "--job", job.to_str().unwrap(), "--listen", &coordinator], "coordinator.log");
    let worker = ["worker", "--coordinator", &coordinator, "--advertise-host", "127.0.0.1"];
    let _workers = [spawn(&worker, "worker-0.log"), spawn(&worker, "worker-1.log")];
    let prometheus = format!("127.0.0.1:{}", free_port());
    let _prometheus = start_prometheus(dir.path(), &coordinator, &prometheus);
    let context = || format!("{}\nprometheus:\n{}", read_logs(&logs), std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default());

    // The coordinator's own exposition first: its content type and a checkpoint's cost.
    let deadline = Instant::now() + Duration::from_secs(120);
    let exposition = loop {
        if let Ok(r) = braid_tests::http_request(&coordinator, "GET", "/metrics", &[], "") {
            if r.body.lines().any(|l| l.starts_with("braid_checkpoint_bytes{")) {
                break r;
            }
        }
        assert!(Instant::now() < deadline, "no checkpoint in /metrics:\n{}", context());
        std::thread::sleep(Duration::from_millis(200));
    };
    let content_type = exposition.headers.iter().find(|(k, _)| k == "content-type").map(|(_, v)| v.as_str());
    assert_eq!(content_type, Some(braid_coordinator::metrics::CONTENT_TYPE));
    for family in ["braid_rank_device_memory_bytes", "braid_rank_device_memory_peak_bytes"] {
        assert!(exposition.body.contains(&format!("# TYPE {family} gauge\n")), "{family} is described:\n{}", exposition.body);
    }

    let step = "braid_step{job_name=\"prom\"}";
    let first = loop {
        if let Some(s) = query(&prometheus, step).first() {
            if value(s) >= 1.0 {
                break value(s);
            }
        }
        assert!(Instant::now() < deadline, "Prometheus has no {step}:\n{}", context());
        std::thread::sleep(Duration::from_millis(500));
    };
    let up = query(&prometheus, "up{job=\"braid\"}");
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(value(&up[0]), 1.0, "the scrape target is down: {up:?}");
    // The job advances between scrapes, as Prometheus stores it.
    let later = loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = query(&prometheus, step).first().map(value).unwrap_or(first);
        if now >= first + 5.0 {
            break now;
        }
        assert!(Instant::now() < deadline, "{step} stayed at {first}:\n{}", context());
    };
    println!("braid_step went from {first} to {later}");
    let increase = query(&prometheus, "max_over_time(braid_step{job_name=\"prom\"}[1m]) - min_over_time(braid_step{job_name=\"prom\"}[1m])");
    assert!(increase.first().is_some_and(|s| value(s) >= 5.0), "{increase:?}");

    for (expr, samples) in [
        ("braid_world_size{job_name=\"prom\"} == 2", 1),
        ("braid_generation{job_name=\"prom\"} == 1", 1),
        ("braid_total_steps{job_name=\"prom\"} == 100000", 1),
        ("braid_loss{job_name=\"prom\"} > 0", 1),
        ("braid_loss_term{job_name=\"prom\",objective=\"itc\"} > 0", 1),
        ("braid_samples_per_second{job_name=\"prom\"} > 0", 1),
        ("braid_learning_rate{job_name=\"prom\"} > 0", 1),
        ("braid_grad_norm{job_name=\"prom\"} > 0", 1),
        ("braid_data_wait_seconds{job_name=\"prom\"} >= 0", 1),
        ("braid_rank_step_seconds{job_name=\"prom\"} > 0", 2),
        ("braid_rank_straggler{job_name=\"prom\"} >= 0", 2),
        ("braid_checkpoints_total{job_name=\"prom\"} >= 1", 1),
        ("braid_checkpoint_bytes{job_name=\"prom\"} > 1000", 1),
        ("braid_checkpoint_seconds{job_name=\"prom\"} > 0", 1),
        ("braid_rejoins_total{job_name=\"prom\"} == 0", 1),
        ("braid_job_finished{job_name=\"prom\"} == 0", 1),
        // The workers train on the CPU: no rank has GPU memory figures.
        ("braid_rank_device_memory_bytes{job_name=\"prom\"}", 0),
        ("braid_rank_device_memory_peak_bytes{job_name=\"prom\"}", 0),
    ] {
        let found = query(&prometheus, expr);
        assert_eq!(found.len(), samples, "{expr}: {found:?}\n{}", exposition.body);
        println!("{expr}: {:?}", found.iter().map(value).collect::<Vec<_>>());
    }
    let ranks: Vec<String> = query(&prometheus, "braid_rank_step_seconds{job_name=\"prom\"}")
        .iter()
        .map(|s| format!("{}/{}", s["metric"]["rank"].as_str().unwrap_or("?"), s["metric"]["worker"].as_str().unwrap_or("?")))
        .collect();
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    assert!(ranks.iter().any(|r| r.starts_with("0/w-")) && ranks.iter().any(|r| r.starts_with("1/w-")), "{ranks:?}");
}
