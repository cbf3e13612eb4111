//! Checkpoints in S3, end to end: a CLIP job checkpointing into an S3-compatible server (moto,
//! started by the test) is killed with kill -9 mid-run, `braid run` again resumes it from the
//! bucket's `latest`, and its final weights and optimizer moments equal, bit for bit, those of an
//! uninterrupted run. Large objects go up through multipart uploads, the commit's create-only put
//! holds on S3, and the secret key never shows in anything braid prints or logs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use braid::checkpoint::CheckpointStore;
use braid::data::store::block_on;
use braid_coordinator::store;
use braid_tests::{
    braid_run, read_latest_checkpoint, read_logs, spawn_braid_run, synth_data, BraidOutput, JobFile, MotoServer,
};
use tch::Tensor;

/// Bound on one `braid run` of this test.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// The secret key handed to braid; it must never appear in its output or logs.
const SECRET_ACCESS_KEY: &str = "braid-test-secret-7c1e93d0a4";

/// The bucket the test creates.
const BUCKET: &str = "braid-checkpoints";

/// The step a `step-NNNNNN/manifest.json` reference names.
fn step_of(manifest: &str) -> u64 {
    manifest
        .strip_prefix("step-")
        .and_then(|rest| rest.split('/').next())
        .and_then(|step| step.parse().ok())
        .unwrap_or_else(|| panic!("{manifest:?} is not a step-NNNNNN/manifest.json reference"))
}

/// Every tensor of the checkpoint `latest` points at under the S3 root `url`, read and
/// checksum-verified through braid's checkpoint store; returns the manifest reference too.
fn read_latest_s3_checkpoint(url: &str) -> (String, BTreeMap<String, Tensor>) {
    let root = CheckpointStore::open(url).unwrap_or_else(|e| panic!("opening {url}: {e}"));
    let latest = root.latest().unwrap_or_else(|e| panic!("reading {url}/latest: {e}")).expect("a latest checkpoint");
    let (_, tensors) = root.read_checkpoint(&latest).unwrap_or_else(|e| panic!("reading {url}/{latest}: {e}"));
    (latest, tensors.into_iter().collect())
}

/// The names of the `model.*` and `optim.*` tensors.
fn state_names(tensors: &BTreeMap<String, Tensor>) -> Vec<String> {
    tensors.keys().filter(|n| n.starts_with("model.") || n.starts_with("optim.")).cloned().collect()
}

/// Asserts that `out` exited successfully and finished its job.
fn assert_finished(out: &BraidOutput, what: &str, log_dir: &Path) {
    assert!(out.status.success(), "{what} failed:\n{}\n{}", out.text(), read_logs(log_dir));
    let summary = out.summary();
    assert_eq!(summary["finished"], true, "{what}: {summary:#}");
}

/// Writes a 40 MiB object (a multipart upload) and a create-only manifest through braid's store
/// and reads them back.
fn store_round_trip(moto: &MotoServer, url: &str) {
    let root = store::open(url).unwrap_or_else(|e| panic!("opening {url}: {e}"));
    let big: Vec<u8> = (0..40u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    assert!(big.len() > store::MULTIPART_THRESHOLD);
    let started = Instant::now();
    block_on(async {
        root.put("big.bin", big.clone()).await.unwrap();
        let meta = root.head("big.bin").await.unwrap().expect("big.bin exists");
        assert_eq!(meta.size, big.len() as u64);
        assert!(root.get("big.bin").await.unwrap().expect("big.bin exists") == big, "big.bin came back different");
        assert!(root.put_create("manifest.json", "first").await.unwrap());
        assert!(!root.put_create("manifest.json", "second").await.unwrap(), "a create-only put replaced an object");
        assert_eq!(root.get("manifest.json").await.unwrap().unwrap(), "first");
        assert_eq!(root.delete_folder("").await.unwrap(), 2);
        assert!(root.get("big.bin").await.unwrap().is_none());
    })
    .unwrap();
    println!("40 MiB multipart put + get on S3: {:.1} s", started.elapsed().as_secs_f64());
    let log = moto.log();
    let parts =
        log.lines().filter(|l| l.contains("PUT ") && l.contains("big.bin?") && l.contains("partNumber=")).count();
    assert!(log.contains("big.bin?uploads"), "big.bin did not start a multipart upload:\n{log}");
    assert_eq!(parts, 40usize.div_ceil(store::PART_SIZE >> 20), "big.bin went up in {parts} parts:\n{log}");
}

#[test]
fn s3_checkpoints_survive_kill_9_and_resume_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let moto = MotoServer::start(&dir.path().join("moto.log"));
    moto.create_bucket(BUCKET);
    let env = moto.client_env(SECRET_ACCESS_KEY);
    // The test reads the bucket through braid's store, which takes its settings from the
    // environment like braid's processes do; this is the only test of this binary.
    for (key, value) in &env {
        std::env::set_var(key, value);
    }
    store_round_trip(&moto, &format!("s3://{BUCKET}/round-trip"));

    let data = synth_data(&dir.path().join("data"), 800, 50, 200);
    let base = JobFile {
        seed: 5,
        precision: "fp64".into(),
        global_batch: 32,
        steps: 20,
        every_steps: 5,
        keep: 3,
        workers: 2,
        ..JobFile::new("fp64-s3-resume", &data)
    };

    // The reference: the same job, uninterrupted, checkpointing to local disk.
    let local_root = dir.path().join("checkpoints-local");
    let job =
        JobFile { checkpoint: Some(local_root.clone()), ..base.clone() }.write(&dir.path().join("job-local.toml"));
    let log_dir = dir.path().join("logs-local");
    let out = braid_run(&job, 2, &log_dir, RUN_TIMEOUT);
    assert_finished(&out, "the uninterrupted run", &log_dir);
    println!("uninterrupted W=2 to local disk: {:.1} s", out.elapsed.as_secs_f64());
    let reference = read_latest_checkpoint(&local_root);

    // The same job into S3, killed with kill -9 (braid run and its workers) once `latest` in
    // the bucket points at step 9 or later.
    let s3_url = format!("s3://{BUCKET}/job-ckpt");
    let s3_root = CheckpointStore::open(&s3_url).unwrap();
    let job = JobFile { checkpoint: Some(s3_url.clone().into()), resume: false, ..base.clone() }
        .write(&dir.path().join("job-s3.toml"));
    let killed_logs = dir.path().join("logs-killed");
    let mut run = spawn_braid_run(&job, 2, &killed_logs, &env);
    let started = Instant::now();
    let killed_at = loop {
        assert!(
            !run.has_exited(),
            "braid run exited before a checkpoint at step 9 or later was seen:\n{}\n{}",
            run.kill_group().text(),
            read_logs(&killed_logs)
        );
        assert!(started.elapsed() < RUN_TIMEOUT, "no checkpoint at step 9 or later in {RUN_TIMEOUT:?}");
        match s3_root.latest().unwrap() {
            Some(latest) if step_of(&latest) >= 9 => break latest,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let killed = run.kill_group();
    println!("killed braid run and its workers {:.1} s in, with latest at {killed_at}", killed.elapsed.as_secs_f64());
    let latest_after_kill = s3_root.latest().unwrap().expect("latest survives the kill");
    assert!(
        step_of(&latest_after_kill) < 19,
        "the job had already committed its last checkpoint ({latest_after_kill}) when it was killed"
    );

    // `braid run` again, resuming from `latest`.
    let job = JobFile { checkpoint: Some(s3_url.clone().into()), resume: true, ..base.clone() }
        .write(&dir.path().join("job-s3-resume.toml"));
    let resumed_logs = dir.path().join("logs-resumed");
    let resumed = spawn_braid_run(&job, 2, &resumed_logs, &env).wait(RUN_TIMEOUT);
    assert_finished(&resumed, "the resumed run", &resumed_logs);
    println!("resumed from {latest_after_kill} in S3: {:.1} s", resumed.elapsed.as_secs_f64());
    let worker_logs = read_logs(&resumed_logs);
    let resumed_from = format!("{s3_url}/{latest_after_kill}");
    assert!(
        worker_logs.lines().any(|l| l.contains("resumed from") && l.contains(&resumed_from)),
        "no worker says it resumed from {resumed_from}:\n{worker_logs}"
    );

    let (final_manifest, final_state) = read_latest_s3_checkpoint(&s3_url);
    assert_eq!(final_manifest, "step-000019/manifest.json");
    let names = state_names(&reference);
    assert!(names.iter().any(|n| n.starts_with("optim.")), "no optimizer state among {names:?}");
    assert_eq!(names, state_names(&final_state), "the S3 checkpoint holds other tensors");
    let different: Vec<&String> = names.iter().filter(|n| !reference[*n].equal(&final_state[*n])).collect();
    assert!(different.is_empty(), "the killed and resumed run differs from the uninterrupted one in {different:?}");

    for (what, text) in [
        ("the killed run's output", killed.text()),
        ("the killed run's worker logs", read_logs(&killed_logs)),
        ("the resumed run's output", resumed.text()),
        ("the resumed run's worker logs", worker_logs),
    ] {
        assert!(!text.contains(SECRET_ACCESS_KEY), "{what} shows the secret access key:\n{text}");
    }
}
