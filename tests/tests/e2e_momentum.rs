//! Replica consistency end to end (DESIGN.md, "EMA / momentum state"): a 2-worker fp64 job
//! checks its replicas every `ema_check_every = 5` steps (steps 4, 9, 14, 19). A rank whose
//! momentum encoder is corrupted on purpose (`corrupt-momentum` failpoint) is detected at the
//! next check, named by the coordinator, resynchronised from rank 0 by broadcast, and the
//! replicas agree at every later check. Every run is compared with the same job run without
//! the failpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use braid_coordinator::failpoint::FAILPOINT_ENV;
use braid_tests::{
    read_checkpoint, read_logs, spawn_braid_run, synth_data, BraidOutput, JobFile, SynthData, TensorBits,
};

/// Bound on one run of these tests.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// Training samples of the synthetic dataset (20 steps of 32: one epoch).
const TRAIN_SAMPLES: usize = 640;
const STEPS: u64 = 20;
const CHECK_EVERY: u64 = 5;
/// The model family under test: ALBEF keeps momentum encoders and feature queues.
const FAMILY: &str = "albef";

/// The job: 2 workers, fp64, a check every 5 steps and a checkpoint after every check step,
/// so the state at each check can be compared.
fn job(name: &str, data: &SynthData, dir: &Path) -> JobFile {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let tokenizer = if FAMILY == "clip" { data.tokenizer() } else { data.dir.join("tokenizer-bert.json") };
    JobFile {
        seed: 11,
        family: FAMILY.into(),
        tokenizer,
        precision: "fp64".into(),
        global_batch: 32,
        steps: STEPS,
        workers: 2,
        ema_check_every: Some(CHECK_EVERY),
        checkpoint: Some(dir.join("checkpoints")),
        every_steps: CHECK_EVERY,
        keep: 10,
        ..JobFile::new(name, data)
    }
}

/// One finished run: what `braid run` printed (the embedded coordinator's log at info level),
/// its workers' logs and its checkpoints by step.
struct Run {
    out: BraidOutput,
    worker_logs: String,
    checkpoints: BTreeMap<u64, BTreeMap<String, TensorBits>>,
}

impl Run {
    /// The coordinator's and the workers' logs, for failure messages.
    fn text(&self) -> String {
        format!("{}\n--- worker logs\n{}", self.out.text(), self.worker_logs)
    }

    /// The coordinator's lines about the state check of `step`.
    fn check_lines(&self, step: u64) -> Vec<&str> {
        let tag = format!("state check of step {step} ");
        self.out.stderr.lines().filter(|l| l.contains(&tag)).collect()
    }

    /// `|a - b| / |b|` over every floating-point tensor of the checkpoint of `step` whose name
    /// starts with `prefix` taken together (L2 norms), `b` being `other`'s.
    fn relative_norm_difference(&self, other: &Run, step: u64, prefix: &str) -> f64 {
        let tensor =
            |b: &TensorBits| tch::Tensor::from_data_size(&b.bytes, &b.shape, b.kind).to_kind(tch::Kind::Double);
        let theirs = &other.checkpoints[&step];
        let (mut diff, mut norm) = (0.0, 0.0);
        for (name, bits) in
            self.checkpoints[&step].iter().filter(|(n, b)| n.starts_with(prefix) && b.kind == tch::Kind::Double)
        {
            let (a, b) = (tensor(bits), tensor(&theirs[name]));
            diff += (&a - &b).square().sum(tch::Kind::Double).double_value(&[]);
            norm += b.square().sum(tch::Kind::Double).double_value(&[]);
        }
        (diff / norm.max(1e-300)).sqrt()
    }
}

/// Runs `job` with `failpoint` armed (if any) to completion.
fn run(job: &JobFile, dir: &Path, failpoint: Option<&str>) -> Run {
    let path = job.write(&dir.join("job.toml"));
    let logs = dir.join("logs");
    let mut env = vec![("RUST_LOG".to_string(), "info".to_string())];
    if let Some(point) = failpoint {
        env.push((FAILPOINT_ENV.to_string(), point.to_string()));
    }
    let out = spawn_braid_run(&path, 2, &logs, &env).wait_for_group(RUN_TIMEOUT);
    let worker_logs = read_logs(&logs);
    assert!(out.status.success(), "run failed:\n{}\n--- worker logs\n{worker_logs}", out.text());
    assert_eq!(out.summary()["finished"], true, "{}", out.text());
    let root = job.checkpoint.clone().expect("checkpoints");
    let mut checkpoints = BTreeMap::new();
    for step in (CHECK_EVERY - 1..STEPS).step_by(CHECK_EVERY as usize) {
        let tensors = read_checkpoint(&root, &format!("step-{step:06}/manifest.json"));
        checkpoints.insert(step, tensors.iter().map(|(n, t)| (n.clone(), TensorBits::of(t))).collect());
    }
    Run { out, worker_logs, checkpoints }
}

/// The synthetic data and the run without a failpoint, shared by the tests.
struct Reference {
    data: SynthData,
    run: Run,
    root: PathBuf,
}

/// The reference, made by the first test that needs it (the others wait for it), in
/// `<target>/tmp/e2e_momentum` (emptied first; left there afterwards, for inspection).
fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Reference> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e_momentum");
        let _ = std::fs::remove_dir_all(&root);
        let data = synth_data(&root.join("data"), TRAIN_SAMPLES, 20, 160);
        let dir = root.join("reference");
        let run = run(&job("momentum", &data, &dir), &dir, None);
        Reference { data, run, root }
    })
}

/// The first row (index along the first dimension) where two tensors' bits differ.
fn first_differing_row(a: &TensorBits, b: &TensorBits) -> Option<usize> {
    assert_eq!((a.kind, &a.shape), (b.kind, &b.shape), "tensors of different kinds or shapes");
    let row = a.bytes.len() / a.shape[0].max(1) as usize;
    a.bytes.chunks(row).zip(b.bytes.chunks(row)).position(|(x, y)| x != y)
}

/// Names of the tensors whose bits differ between two checkpoints (including names only one holds).
fn differing(a: &BTreeMap<String, TensorBits>, b: &BTreeMap<String, TensorBits>) -> Vec<String> {
    braid_tests::differing_bits(a, b)
}

/// Checks the run's logs: the check of `detected` found rank 1 drifted and ordered a resync
/// from rank 0, both ranks resynchronised before the next step, and every other check step
/// found the replicas equal.
fn assert_detected_once(run: &Run, detected: u64) {
    let text = run.text();
    for step in (CHECK_EVERY - 1..STEPS).step_by(CHECK_EVERY as usize) {
        let lines = run.check_lines(step);
        assert_eq!(lines.len(), 1, "one verdict for the check of step {step}: {lines:#?}\n{text}");
        println!("{}", lines[0]);
        if step == detected {
            assert!(lines[0].contains("replicas disagree"), "step {step}: {}", lines[0]);
            assert!(lines[0].contains("drifted: rank 1 (worker"), "rank 1 named as drifted: {}", lines[0]);
            assert!(lines[0].contains("takes rank 0's state"), "resync from rank 0: {}", lines[0]);
        } else {
            assert!(lines[0].contains("all 2 ranks hold digest"), "step {step}: {}", lines[0]);
        }
    }
    let resynced = format!("resynchronised from rank 0 before step {}", detected + 1);
    assert_eq!(run.worker_logs.matches(&resynced).count(), 2, "both ranks resynchronised once:\n{text}");
    assert_eq!(run.worker_logs.matches("resynchronised from rank").count(), 2, "no other resync:\n{text}");
    assert!(run.worker_logs.contains("digest differed from rank 0's"), "rank 1 logs its drift:\n{text}");
    assert!(run.worker_logs.contains("FAILPOINT corrupt-momentum"), "the corruption was injected:\n{text}");
}

#[test]
fn the_reference_run_checks_every_5_steps_and_never_resyncs() {
    let reference = reference();
    let run = &reference.run;
    for step in (CHECK_EVERY - 1..STEPS).step_by(CHECK_EVERY as usize) {
        let lines = run.check_lines(step);
        assert!(
            lines.len() == 1 && lines[0].contains("all 2 ranks hold digest"),
            "step {step}: {lines:#?}\n{}",
            run.text()
        );
    }
    assert!(!run.worker_logs.contains("resynchronised"), "{}", run.text());
    let checks = run.out.stderr.matches("state check of step").count();
    assert_eq!(checks, (STEPS / CHECK_EVERY) as usize, "checks only at steps 4, 9, 14, 19:\n{}", run.text());
}

#[test]
fn corruption_at_a_check_step_is_resynced_before_it_is_used_and_the_run_is_unchanged() {
    let reference = reference();
    let dir = reference.root.join("at-check");
    let run = run(&job("momentum", &reference.data, &dir), &dir, Some("corrupt-momentum@9#1"));
    assert_detected_once(&run, 9);
    // Rank 1's momentum encoder was corrupted after the update of step 9, digested, found and
    // replaced by rank 0's before step 10 used it: every checkpoint equals the reference's bit
    // for bit, model, optimizer, momentum encoders and queues alike.
    for (step, tensors) in &run.checkpoints {
        let diff = differing(tensors, &reference.run.checkpoints[step]);
        assert!(diff.is_empty(), "checkpoint of step {step} differs from the reference in {diff:?}");
    }
    println!("corrupt-momentum@9#1: detected at step 9, resynchronised before step 10; final state equal bit for bit");
}

#[test]
fn corruption_between_checks_is_detected_within_ema_check_every_steps() {
    let reference = reference();
    let dir = reference.root.join("between-checks");
    let run = run(&job("momentum", &reference.data, &dir), &dir, Some("corrupt-momentum@6#1"));
    // Corrupted after step 6, found at the next check (step 9, within ema_check_every = 5
    // steps); the checks of steps 14 and 19 find the replicas equal again.
    assert_detected_once(&run, 9);
    let before = differing(&run.checkpoints[&4], &reference.run.checkpoints[&4]);
    assert!(before.is_empty(), "the checkpoint of step 4 (before the corruption) differs in {before:?}");
    // What the resync cannot undo: steps 7 to 9 ran with rank 1's corrupted momentum encoder.
    // Its momentum features of those steps entered the all-gathered contrastive targets and
    // the queues of every rank, so the summed gradients, hence rank 0's state (the one every
    // rank took at step 9), differ from the reference's; the resync restores agreement between
    // the replicas, not the computation of those three steps. The footprint starts exactly at
    // rank 1's first queue row of step 7 (rank r enqueues rows [32 s + 16 r, 32 s + 16 r + 16)
    // of step s): every row before it equals the reference's bit for bit.
    for step in [9, 14, 19] {
        let diff = differing(&run.checkpoints[&step], &reference.run.checkpoints[&step]);
        assert!(
            !diff.is_empty(),
            "the checkpoint of step {step} cannot equal the reference after steps 7-9 ran corrupted"
        );
    }
    let last = STEPS - 1;
    for queue in ["queue.image.features", "queue.text.features"] {
        let first = first_differing_row(&run.checkpoints[&last][queue], &reference.run.checkpoints[&last][queue]);
        assert_eq!(first, Some(7 * 32 + 16), "{queue}: first row that differs from the reference");
    }
    // And the size of what it did to the model: measured 2.9e-3 of the parameters' norm
    // (relative L2 over all `model.*` tensors); a replica left drifting, or a resync taking the
    // corrupted rank's state, would not stay this close.
    let worst = run.relative_norm_difference(&reference.run, last, "model.");
    println!("corrupt-momentum@6#1: detected at step 9; final parameters differ by {worst:e} (relative L2) from the reference");
    assert!(worst > 0.0 && worst < 1e-2, "final parameters differ by {worst:e} (relative L2)");
}
