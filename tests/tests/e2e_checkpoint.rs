//! End-to-end checkpoint safety with real processes: `braid run` crashed at each point of a
//! checkpoint commit (torn part upload, between votes, torn manifest), a corrupt committed part,
//! and SIGTERM preemption. After each, `latest` must point at a complete checkpoint, and the
//! rerun must resume from it and end bit for bit where an uninterrupted run ends.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use braid_coordinator::failpoint::FAILPOINT_ENV;
use braid_tests::{
    differing_bits, latest_manifest, read_latest_checkpoint, read_logs, spawn_braid, spawn_braid_run, state_bits,
    synth_data, verify_checkpoint, BraidOutput, JobFile, SynthData, TensorBits,
};

/// Bound on one `braid run` of these tests, its workers included.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// `[checkpoint] grace_period_s` of every job here.
const GRACE_PERIOD: Duration = Duration::from_secs(30);

/// Worker processes of every run.
const WORKERS: usize = 2;

/// The synthetic dataset of every test (`braid data synth` is deterministic, so every test's
/// copy holds the same bytes as the reference run's).
fn test_data(dir: &Path) -> SynthData {
    synth_data(dir, 400, 10, 100)
}

/// fp64 CLIP-tiny on `data`: 2 workers, 20 steps of global batch 16, a checkpoint every 5 steps
/// (after steps 4, 9, 14, 19) into `root`, all kept, resuming from `latest` when there is one.
fn safety_job(data: &SynthData, root: &Path) -> JobFile {
    JobFile {
        seed: 5,
        precision: "fp64".into(),
        global_batch: 16,
        steps: 20,
        workers: WORKERS,
        checkpoint: Some(root.to_path_buf()),
        every_steps: 5,
        keep: 20,
        resume: true,
        ..JobFile::new("ckpt-safety", data)
    }
}

/// Writes `job` to `path` with `[checkpoint] grace_period_s` set to [`GRACE_PERIOD`] (the
/// `[checkpoint]` section is the last one `JobFile` writes, so the key lands in it).
fn write_job(job: &JobFile, path: &Path) -> PathBuf {
    assert!(job.checkpoint.is_some(), "a job of these tests checkpoints");
    let text = format!("{}grace_period_s = {:?}\n", job.to_toml(), GRACE_PERIOD.as_secs_f64());
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path.to_path_buf()
}

/// Runs `job` with `env` added, logging into `log_dir`, and waits for `braid run` and its workers.
fn run(job: &Path, log_dir: &Path, env: &[(String, String)]) -> BraidOutput {
    let out = spawn_braid_run(job, WORKERS, log_dir, env).wait_for_group(RUN_TIMEOUT);
    println!("braid run {} {env:?}: {:.1} s, {}", job.display(), out.elapsed.as_secs_f64(), out.status);
    out
}

/// Runs `job` to the end; asserts it finished and returns its output and summary.
fn run_to_completion(job: &Path, log_dir: &Path) -> (BraidOutput, serde_json::Value) {
    let out = run(job, log_dir, &[]);
    assert!(out.status.success(), "braid run {} failed:\n{}\n{}", job.display(), out.text(), read_logs(log_dir));
    let summary = out.summary();
    assert_eq!(summary["finished"], true, "{summary:#}");
    (out, summary)
}

/// Runs `job` to the end without `--json`, so that `braid run` logs warnings and errors on its
/// stderr; asserts it finished all `steps` and returns its output.
fn run_text_to_completion(job: &Path, log_dir: &Path, steps: u64) -> BraidOutput {
    let workers = WORKERS.to_string();
    let args = [OsStr::new("run"), job.as_os_str(), OsStr::new("--workers"), OsStr::new(&workers)];
    let args = args.into_iter().chain([OsStr::new("--log-dir"), log_dir.as_os_str()]);
    let out = spawn_braid(args, &[]).wait_for_group(RUN_TIMEOUT);
    println!("braid run {} (text): {:.1} s, {}", job.display(), out.elapsed.as_secs_f64(), out.status);
    assert!(out.status.success(), "braid run {} failed:\n{}\n{}", job.display(), out.text(), read_logs(log_dir));
    let finished = format!("finished: {steps} steps with {WORKERS} workers");
    assert!(out.stdout.contains(&finished), "braid run printed no {finished:?}:\n{}", out.text());
    out
}

/// Asserts that `braid run` logged an ERROR line on its stderr that names `file`.
fn assert_error_names(out: &BraidOutput, file: &str) {
    let named = out.stderr.lines().any(|l| l.contains("ERROR") && l.contains(file));
    assert!(named, "no ERROR line on braid run's stderr names {file}:\n{}", out.text());
}

/// `step-<step:06>/manifest.json`.
fn manifest_of(step: u64) -> String {
    format!("step-{step:06}/manifest.json")
}

/// Asserts that `latest` below `root` points at the checkpoint of `step` and that it is complete.
fn assert_latest_complete(root: &Path, step: u64) {
    assert_eq!(latest_manifest(root), manifest_of(step), "latest of {}", root.display());
    assert_complete(root, step);
}

/// Asserts that the checkpoint of `step` below `root` is complete and holds `step`.
fn assert_complete(root: &Path, step: u64) -> serde_json::Value {
    let manifest = verify_checkpoint(root, &manifest_of(step))
        .unwrap_or_else(|e| panic!("the step-{step} checkpoint is not complete: {e}"));
    assert_eq!(manifest["step"], step, "{manifest:#}");
    manifest
}

/// Whether the checkpoint of `step` below `root` has a manifest set aside as
/// `manifest.bad-<t>.json`.
fn set_aside(root: &Path, step: u64) -> bool {
    let dir = root.join(format!("step-{step:06}"));
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .any(|name| name.starts_with("manifest.bad-") && name.ends_with(".json"))
}

/// Asserts that a worker of the run logged in `log_dir` resumed from the checkpoint of `step`.
fn assert_resumed_from(log_dir: &Path, step: u64) {
    let logs = read_logs(log_dir);
    let wanted = manifest_of(step);
    assert!(
        logs.lines().any(|l| l.contains("resumed from") && l.contains(&wanted)),
        "no worker says it resumed from {wanted}:\n{logs}"
    );
}

/// Asserts that the `model.*` and `optim.*` tensors of the checkpoint `latest` points at below
/// `root` equal `expected` bit for bit.
fn assert_bitwise_equal(root: &Path, expected: &BTreeMap<String, TensorBits>, what: &str) {
    let got = state_bits(&read_latest_checkpoint(root));
    assert!(got.keys().any(|n| n.starts_with("optim.")), "{what}: no optimizer state in {:?}", got.keys());
    let different = differing_bits(expected, &got);
    assert!(different.is_empty(), "{what}: differs from the uninterrupted run in {different:?}");
}

/// The final `model.*` and `optim.*` bits of one uninterrupted run of [`safety_job`], computed once
/// for the whole file.
fn reference() -> &'static BTreeMap<String, TensorBits> {
    static REFERENCE: OnceLock<BTreeMap<String, TensorBits>> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let data = test_data(&dir.path().join("data"));
        let root = dir.path().join("checkpoints");
        let job = write_job(&safety_job(&data, &root), &dir.path().join("job.toml"));
        let (_, summary) = run_to_completion(&job, &dir.path().join("logs"));
        let listed: Vec<&str> =
            summary["checkpoints"].as_array().expect("checkpoints").iter().filter_map(|c| c.as_str()).collect();
        assert_eq!(listed.len(), 4, "checkpoints after steps 4, 9, 14, 19: {listed:?}");
        assert_latest_complete(&root, 19);
        state_bits(&read_latest_checkpoint(&root))
    })
}

/// Crashes a run at `point` while it checkpoints step 9, checks that `latest` still points at
/// the complete step-4 checkpoint, then reruns it to the end and compares with the reference.
fn crash_then_resume(point: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = test_data(&dir.path().join("data"));
    let root = dir.path().join("checkpoints");
    let job = write_job(&safety_job(&data, &root), &dir.path().join("job.toml"));

    let crash_logs = dir.path().join("logs-crashed");
    let env = [(FAILPOINT_ENV.to_string(), format!("{point}@9"))];
    let crashed = run(&job, &crash_logs, &env);
    let said = format!("{}\n{}", crashed.text(), read_logs(&crash_logs));
    assert!(!crashed.status.success(), "braid run with {point}@9 succeeded:\n{said}");
    assert!(
        said.contains(&format!("{FAILPOINT_ENV}: crashing at {point}@9")),
        "the run failed, but not at {point}@9:\n{said}"
    );
    assert_latest_complete(&root, 4);
    let step9 = root.join(manifest_of(9));
    if point == "manifest-write" {
        let torn = verify_checkpoint(&root, &manifest_of(9));
        assert!(torn.is_err(), "the step-9 manifest was to be torn, yet it verifies: {torn:?}");
    } else {
        assert!(!step9.exists(), "{} was written although rank 0 never voted for step 9", step9.display());
    }

    let resumed_logs = dir.path().join("logs-resumed");
    let resumed = run_text_to_completion(&job, &resumed_logs, 20);
    assert_resumed_from(&resumed_logs, 4);
    assert_complete(&root, 9);
    assert_latest_complete(&root, 19);
    if point == "manifest-write" {
        assert_error_names(&resumed, &manifest_of(9));
        assert!(set_aside(&root, 9), "the torn step-9 manifest was not set aside as manifest.bad-<t>.json");
    }
    assert_bitwise_equal(&root, reference(), &format!("resumed after {point}@9"));
}

#[test]
fn crash_during_part_upload_resumes_from_the_previous_checkpoint() {
    crash_then_resume("part-upload");
}

#[test]
fn crash_between_votes_resumes_from_the_previous_checkpoint() {
    crash_then_resume("before-vote");
}

#[test]
fn crash_during_manifest_write_resumes_from_the_previous_checkpoint() {
    crash_then_resume("manifest-write");
}

#[test]
fn corrupt_part_falls_back_to_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = test_data(&dir.path().join("data"));
    let root = dir.path().join("checkpoints");
    let job = write_job(&safety_job(&data, &root), &dir.path().join("job.toml"));
    let (_, summary) = run_to_completion(&job, &dir.path().join("logs-full"));
    assert_eq!(summary["checkpoints"].as_array().map(Vec::len), Some(4), "{summary:#}");
    for step in [4, 9, 14] {
        assert_complete(&root, step);
    }
    assert_latest_complete(&root, 19);
    assert_bitwise_equal(&root, reference(), "a second uninterrupted run");

    let manifest = assert_complete(&root, 19);
    let part = manifest["parts"][0]["path"].as_str().expect("a part's path").to_string();
    let part_path = root.join(&part);
    let mut bytes = std::fs::read(&part_path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&part_path, bytes).unwrap();
    assert!(verify_checkpoint(&root, &manifest_of(19)).is_err(), "flipping a byte of {part} went unnoticed");

    let resumed_logs = dir.path().join("logs-resumed");
    let resumed = run_text_to_completion(&job, &resumed_logs, 20);
    assert_error_names(&resumed, &part);
    assert!(set_aside(&root, 19), "the step-19 manifest was not set aside as manifest.bad-<t>.json");
    assert_resumed_from(&resumed_logs, 14);
    assert_latest_complete(&root, 19);
    assert_bitwise_equal(&root, reference(), "resumed after a corrupt step-19 part");
}

#[test]
fn sigterm_checkpoints_stops_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = test_data(&dir.path().join("data"));
    // Long enough that the signal, sent once step 4 is committed, lands mid-training.
    let steps = 60u64;
    let long_job = |root: &Path| JobFile { steps, ..safety_job(&data, root) };

    let root = dir.path().join("checkpoints");
    let job = write_job(&long_job(&root), &dir.path().join("job.toml"));
    let preempted_logs = dir.path().join("logs-preempted");
    let process = spawn_braid_run(&job, WORKERS, &preempted_logs, &[]);
    let waiting = Instant::now();
    while !std::fs::read_to_string(root.join("latest")).is_ok_and(|t| t.trim().ends_with("manifest.json")) {
        assert!(waiting.elapsed() < RUN_TIMEOUT, "no checkpoint committed in {RUN_TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = process.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
    assert!(kill.success(), "kill -TERM {pid}: {kill}");
    let signalled = Instant::now();
    let out = process.wait_for_group(RUN_TIMEOUT);
    let stopping = signalled.elapsed();
    println!(
        "SIGTERM after {:.1} s; braid run and its workers exited {:.1} s later",
        out.elapsed.as_secs_f64() - stopping.as_secs_f64(),
        stopping.as_secs_f64()
    );
    assert!(
        out.status.success(),
        "braid run did not exit 0 after SIGTERM:\n{}\n{}",
        out.text(),
        read_logs(&preempted_logs)
    );
    assert!(
        stopping <= GRACE_PERIOD + Duration::from_secs(10),
        "braid run took {stopping:?} to stop after SIGTERM (grace period {GRACE_PERIOD:?})"
    );
    let summary = out.summary();
    let step = summary["preempted_after"].as_u64().unwrap_or_else(|| panic!("no preempted_after: {summary:#}"));
    assert_eq!(summary["finished"], false, "{summary:#}");
    assert!(summary["failure"].is_null(), "{summary:#}");
    println!("preempted after step {step}");
    assert!((4..steps - 1).contains(&step), "preempted after step {step}, expected mid-training: {summary:#}");
    assert_latest_complete(&root, step);
    let listed = summary["checkpoints"].as_array().and_then(|c| c.last()).and_then(|c| c.as_str());
    assert!(listed.is_some_and(|c| c.ends_with(&manifest_of(step))), "{summary:#}");

    let resumed_logs = dir.path().join("logs-resumed");
    run_to_completion(&job, &resumed_logs);
    assert_resumed_from(&resumed_logs, step);
    assert_latest_complete(&root, steps - 1);

    let full_root = dir.path().join("checkpoints-uninterrupted");
    let full_job = write_job(&long_job(&full_root), &dir.path().join("job-uninterrupted.toml"));
    run_to_completion(&full_job, &dir.path().join("logs-uninterrupted"));
    assert_latest_complete(&full_root, steps - 1);
    let expected = state_bits(&read_latest_checkpoint(&full_root));
    assert_bitwise_equal(&root, &expected, &format!("resumed after SIGTERM at step {step}"));
}

#[test]
fn json_run_logs_the_checkpoint_it_sets_aside() {
    let dir = tempfile::tempdir().unwrap();
    let data = test_data(&dir.path().join("data"));
    let root = dir.path().join("checkpoints");
    let job = write_job(&safety_job(&data, &root), &dir.path().join("job.toml"));
    let env = [(FAILPOINT_ENV.to_string(), "manifest-write@4".to_string())];
    let crashed = run(&job, &dir.path().join("logs-crashed"), &env);
    assert!(!crashed.status.success(), "braid run with manifest-write@4 succeeded:\n{}", crashed.text());
    assert!(verify_checkpoint(&root, &manifest_of(4)).is_err(), "the step-4 manifest was to be torn");

    let (resumed, _) = run_to_completion(&job, &dir.path().join("logs-resumed"));
    assert!(set_aside(&root, 4), "the torn step-4 manifest was not set aside as manifest.bad-<t>.json");
    assert_error_names(&resumed, &manifest_of(4));
}
