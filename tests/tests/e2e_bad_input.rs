//! Bad input with real processes: each case must end with a non-zero exit (or a refusal) and a
//! message that names what was wrong.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use braid_proto::coordinator_client::CoordinatorClient;
use braid_proto::{Header, JoinRequest, PROTOCOL_VERSION};
use braid_tests::{braid, braid_bin, braid_run, free_port, read_logs, synth_data, JobFile, KillOnDrop, SynthData};

#[test]
fn unknown_config_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = SynthData { dir: dir.path().join("data") };
    let mut text = JobFile::new("bad-key", &data).to_toml();
    text = text.replace("[train]\n", "[train]\nlearning_rate = 1\n");
    let job = dir.path().join("job.toml");
    std::fs::write(&job, text).unwrap();

    let out = braid([OsStr::new("validate"), job.as_os_str()], Duration::from_secs(30));
    assert!(!out.status.success(), "braid validate accepted an unknown key:\n{}", out.text());
    assert!(out.stderr.contains("learning_rate"), "stderr does not name the unknown key:\n{}", out.text());
    assert!(out.stderr.contains(&job.display().to_string()), "stderr does not name the job file:\n{}", out.text());
}

#[test]
fn missing_dataset_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_data(&dir.path().join("data"), 100, 20, 100);
    let missing = dir.path().join("nowhere/train/manifest.json");
    let job = JobFile { train: missing.clone(), workers: 2, ..JobFile::new("missing-data", &data) }
        .write(&dir.path().join("job.toml"));

    let out = braid_run(&job, 2, &dir.path().join("logs"), Duration::from_secs(60));
    println!("missing dataset: exit {} after {:.1} s", out.status, out.elapsed.as_secs_f64());
    assert!(!out.status.success(), "braid run succeeded without its dataset:\n{}", out.text());
    assert!(out.elapsed < Duration::from_secs(15), "took {:?} to notice the missing dataset", out.elapsed);
    assert!(
        out.text().contains(&missing.display().to_string()),
        "the output does not name {}:\n{}",
        missing.display(),
        out.text()
    );
}

#[test]
fn unreachable_coordinator_is_named() {
    let address = format!("127.0.0.1:{}", free_port());
    let out = braid(["worker", "--coordinator", &address, "--connect-timeout", "2"], Duration::from_secs(30));
    println!("unreachable coordinator: exit {} after {:.1} s", out.status, out.elapsed.as_secs_f64());
    assert!(!out.status.success(), "the worker exited cleanly without a coordinator:\n{}", out.text());
    assert!(out.elapsed < Duration::from_secs(10), "took {:?} to give up on the coordinator", out.elapsed);
    assert!(out.stderr.contains("cannot reach coordinator"), "stderr does not say what failed:\n{}", out.text());
    assert!(out.stderr.contains(&address), "stderr does not name {address}:\n{}", out.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_version_mismatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_data(&dir.path().join("data"), 100, 20, 100);
    let job_file = JobFile::new("protocol-check", &data);
    let job = job_file.write(&dir.path().join("job.toml"));
    let address = format!("127.0.0.1:{}", free_port());
    let log_path = dir.path().join("coordinator.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let _coordinator = KillOnDrop(
        Command::new(braid_bin())
            .args([
                OsStr::new("coordinator"),
                OsStr::new("--job"),
                job.as_os_str(),
                OsStr::new("--listen"),
                OsStr::new(&address),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start braid coordinator"),
    );

    let started = Instant::now();
    let mut client = loop {
        match CoordinatorClient::connect(format!("http://{address}")).await {
            Ok(client) => break client,
            Err(_) if started.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!(
                "coordinator at {address} not reachable after 20 s: {e}\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            ),
        }
    };
    let join = |protocol_version: u32| JoinRequest {
        header: Some(Header { job_id: job_file.name.clone(), protocol_version, worker_id: String::new() }),
        hostname: "e2e-test".into(),
        device: "cpu".into(),
        pid: std::process::id(),
    };

    let status = client.join(join(PROTOCOL_VERSION + 1)).await.expect_err("a Join from another protocol version");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("protocol version"), "the refusal does not say why: {:?}", status.message());
    assert!(
        status.message().contains(&(PROTOCOL_VERSION + 1).to_string()),
        "the refusal does not name the peer's version: {:?}",
        status.message()
    );

    let reply = client.join(join(PROTOCOL_VERSION)).await.expect("the same Join at this protocol version");
    assert!(!reply.into_inner().worker_id.is_empty());
}

/// Flips every byte after the PNG signature of the first `count` samples' `png` members in
/// shard `shard` of `data`'s training split; returns the shard's path.
fn corrupt_pngs(data: &SynthData, shard: usize, count: usize) -> std::path::PathBuf {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.train_manifest()).unwrap()).unwrap();
    let entry = &manifest["shards"][shard];
    let path = data.train_manifest().parent().unwrap().join(entry["url"].as_str().expect("a shard url"));
    let mut bytes = std::fs::read(&path).unwrap();
    let samples = entry["samples"].as_array().expect("samples");
    assert!(samples.len() >= count, "shard {shard} has {} samples", samples.len());
    for sample in &samples[..count] {
        let range = &sample["members"]["png"];
        let (offset, len) = (range[0].as_u64().unwrap() as usize, range[1].as_u64().unwrap() as usize);
        bytes[offset + 8..offset + len].iter_mut().for_each(|b| *b ^= 0xff);
    }
    std::fs::write(&path, bytes).unwrap();
    path
}

fn corrupt_shard_job(dir: &Path, data: &SynthData, name: &str, max_corrupt_samples: u64) -> std::path::PathBuf {
    // 13 steps of 32 cover all 400 samples, so every corrupt one is read.
    JobFile { max_corrupt_samples, global_batch: 32, steps: 13, workers: 2, ..JobFile::new(name, data) }
        .write(&dir.join(format!("{name}.toml")))
}

#[test]
fn corrupt_shard_is_skipped_within_the_limit_and_fatal_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_data(&dir.path().join("data"), 400, 20, 100);
    let corrupted = 5;
    let shard = corrupt_pngs(&data, 1, corrupted);
    let shard_name = shard.display().to_string();

    let job = corrupt_shard_job(dir.path(), &data, "corrupt-tolerated", 100);
    let logs = dir.path().join("logs-tolerated");
    let out = braid_run(&job, 2, &logs, Duration::from_secs(120));
    let worker_logs = read_logs(&logs);
    assert!(out.status.success(), "a job within max_corrupt_samples failed:\n{}\n{worker_logs}", out.text());
    let summary = out.summary();
    println!("tolerated: {:.1} s, corrupt_samples {}", out.elapsed.as_secs_f64(), summary["corrupt_samples"]);
    assert_eq!(summary["finished"], true, "{summary:#}");
    assert_eq!(summary["corrupt_samples"], corrupted, "{summary:#}");
    assert!(worker_logs.contains(&shard_name), "the worker logs do not name {shard_name}:\n{worker_logs}");

    let job = corrupt_shard_job(dir.path(), &data, "corrupt-fatal", 0);
    let logs = dir.path().join("logs-fatal");
    let out = braid_run(&job, 2, &logs, Duration::from_secs(120));
    println!("fatal: exit {} after {:.1} s", out.status, out.elapsed.as_secs_f64());
    assert!(!out.status.success(), "a job past max_corrupt_samples = 0 succeeded:\n{}", out.text());
    let summary = out.summary();
    assert_eq!(summary["finished"], false, "{summary:#}");
    assert!(out.text().contains(&shard_name), "the output does not name {shard_name}:\n{}", out.text());
}

/// Every example job file in `examples/` is valid as shipped.
#[test]
fn example_jobs_validate() {
    let examples = braid_tests::workspace_root().join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&examples).expect("examples/ exists") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = std::process::Command::new(braid_tests::braid_bin()).arg("validate").arg(&path).output().unwrap();
            assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
            checked += 1;
        }
    }
    assert!(checked >= 2, "expected the example jobs, found {checked}");
}

/// A fresh start (`resume = false`) on a checkpoint root that already holds committed
/// checkpoints is refused, naming the root, and leaves the checkpoints as they were.
#[test]
fn fresh_start_over_committed_checkpoints_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_data(&dir.path().join("data"), 100, 20, 100);
    let ckpt = dir.path().join("ckpt");
    let first = JobFile { steps: 2, global_batch: 8, workers: 1, checkpoint: Some(ckpt.clone()), ..JobFile::new("fresh", &data) }
        .write(&dir.path().join("job.toml"));
    let out = braid_run(&first, 1, &dir.path().join("logs"), Duration::from_secs(120));
    assert!(out.status.success(), "the first run failed:\n{}", out.text());
    let latest = std::fs::read_to_string(ckpt.join("latest")).unwrap();

    let again = JobFile { steps: 2, global_batch: 8, workers: 1, checkpoint: Some(ckpt.clone()), resume: false, ..JobFile::new("fresh", &data) }
        .write(&dir.path().join("again.toml"));
    let out = braid_run(&again, 1, &dir.path().join("logs2"), Duration::from_secs(60));
    assert!(!out.status.success(), "a fresh start over committed checkpoints succeeded:\n{}", out.text());
    let text = out.text();
    assert!(text.contains("already holds committed checkpoints") && text.contains("resume = true"), "{text}");
    assert_eq!(std::fs::read_to_string(ckpt.join("latest")).unwrap(), latest, "latest changed");
}
