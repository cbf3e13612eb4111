//! `braid status` and the coordinator's `/status` during a real job: why it waits below
//! `min_workers`, then the generation, its members and their progress.

use std::time::{Duration, Instant};

use braid_tests::{braid, read_logs, spawn_logged, synth_data, JobFile};
use serde_json::Value;

/// `braid status --json`; `None` while the coordinator is not listening yet.
fn status(address: &str) -> Option<Value> {
    let out = braid(["status", "--coordinator", address, "--json"], Duration::from_secs(30));
    if !out.status.success() {
        assert!(out.stderr.contains("Connection refused"), "braid status failed:\n{}", out.text());
        return None;
    }
    Some(serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("braid status --json printed no JSON ({e}):\n{}", out.stdout)))
}

#[test]
fn status_shows_why_a_job_waits_then_its_generation_and_members() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_data(&dir.path().join("data"), 400, 20, 100);
    let job = JobFile { workers: 2, steps: 400, rendezvous_grace_s: Some(0.5), ..JobFile::new("status", &data) }
        .write(&dir.path().join("job.toml"));
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let address = format!("127.0.0.1:{}", braid_tests::free_port());
    let spawn = |args: &[&str], log: &str| spawn_logged(&[], args, &logs.join(log));
    let _coordinator = spawn(&["coordinator", "--job", job.to_str().unwrap(), "--listen", &address], "coordinator.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    let worker_args = ["worker", "--coordinator", &address, "--advertise-host", "127.0.0.1"];
    let _first = spawn(&worker_args, "worker-0.log");
    let waiting = loop {
        if let Some(s) = status(&address) {
            if s["members"].as_array().is_some_and(|m| m.len() == 1) && s["waiting_reason"].is_string() {
                break s;
            }
        }
        assert!(Instant::now() < deadline, "no waiting status:\n{}", read_logs(&logs));
        std::thread::sleep(Duration::from_millis(100));
    };
    let reason = waiting["waiting_reason"].as_str().unwrap();
    println!("below min_workers: {reason}");
    assert!(reason.contains("1 of min_workers = 2"), "{waiting:#}");
    assert_eq!(waiting["generation"], 0);

    let _second = spawn(&worker_args, "worker-1.log");
    let training = loop {
        if let Some(s) = status(&address) {
            if s["world_size"] == 2 && s["steps_done"].as_u64().is_some_and(|d| d >= 5) {
                break s;
            }
        }
        assert!(Instant::now() < deadline, "the job did not start training:\n{}", read_logs(&logs));
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("{training:#}");
    assert!(training["waiting_reason"].is_null(), "{training:#}");
    assert_eq!(training["generation"], 1);
    let members = training["members"].as_array().unwrap();
    let ranks: Vec<u64> = members.iter().filter_map(|m| m["rank"].as_u64()).collect();
    assert_eq!(ranks, vec![0, 1], "{training:#}");
    assert!(members.iter().all(|m| m["state"] == "training" && m["straggler"] == false), "{training:#}");
    assert_eq!(training["generation_history"][0]["world_size"], 2);
    assert_eq!(training["rejoins"], 0);

    let text = braid(["status", "--coordinator", &address], Duration::from_secs(30));
    assert!(text.status.success());
    println!("{}", text.stdout);
    assert!(text.stdout.contains("generation 1 with 2 worker(s)") && text.stdout.contains("w-1"), "{}", text.stdout);
}
