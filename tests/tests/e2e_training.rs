//! End-to-end training with real processes: `braid run` starts a coordinator and worker
//! processes on 127.0.0.1. The tests compare numbers: held-out retrieval against chance,
//! fp64 weights across world sizes, and a resumed run against an uninterrupted one.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use braid::data::tokenizer::load_tokenizer;
use braid::trainer::{clip_config, Trainer};
use braid_coordinator::config::JobConfig;
use braid_tests::{
    braid_run, copy_dir, latest_manifest, read_checkpoint, read_latest_checkpoint, read_logs, relative_difference,
    synth_data, with_prefix, BraidOutput, JobFile,
};
use tch::Tensor;

/// Bound on one `braid run` of these tests.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

/// Runs `job` with `workers` worker processes, logging into `log_dir`; asserts the run
/// finished and returns its output.
fn run_to_completion(job: &Path, workers: usize, log_dir: &Path) -> (BraidOutput, serde_json::Value) {
    let out = braid_run(job, workers, log_dir, RUN_TIMEOUT);
    assert!(
        out.status.success(),
        "braid run {} --workers {workers} failed:\n{}\n{}",
        job.display(),
        out.text(),
        read_logs(log_dir)
    );
    let summary = out.summary();
    assert_eq!(summary["finished"], true, "{summary:#}");
    (out, summary)
}

/// The freshly initialised parameters of `job` (`model.<param>`), as a worker builds them.
fn initial_model(job: &Path) -> BTreeMap<String, Tensor> {
    let config = JobConfig::load(job).expect("a valid job file");
    let tokenizer = load_tokenizer(&config.data.tokenizer).expect("the job's tokenizer");
    let clip = clip_config(&config, tokenizer.vocab_size() as i64).expect("a CLIP preset");
    let trainer = Trainer::new(&config, clip, tch::Device::Cpu).expect("a trainer");
    trainer.state().into_iter().filter(|(name, _)| name.starts_with("model.")).collect()
}

/// Asserts that `a` and `b` hold the same `model.*` tensors, each within `tolerance` relative to
/// `a`'s largest magnitude; returns the largest relative difference.
fn assert_models_close(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>, tolerance: f64, what: &str) -> f64 {
    let (a, b) = (with_prefix(a, "model."), with_prefix(b, "model."));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: different parameter names");
    assert!(a.keys().any(|name| name.contains("logit_scale")), "{what}: no logit_scale among {:?}", a.keys());
    let mut worst = 0.0f64;
    for (name, x) in &a {
        let d = relative_difference(x, b[name]);
        assert!(
            d <= tolerance,
            "{what}: {name} differs by {d:e} relative to its largest magnitude (tolerance {tolerance:e})"
        );
        worst = worst.max(d);
    }
    worst
}

/// Asserts that every `model.*` tensor of `trained` differs from `initial`, and that most
/// tensors initialised away from zero moved by more than 1e-3 of their largest magnitude.
fn assert_trained_away_from_initialisation(initial: &BTreeMap<String, Tensor>, trained: &BTreeMap<String, Tensor>) {
    let unchanged: Vec<&String> = initial.iter().filter(|(name, t)| t.equal(&trained[*name])).map(|(n, _)| n).collect();
    assert!(unchanged.is_empty(), "still at their initial values after training: {unchanged:?}");
    let nonzero: Vec<(&String, &Tensor)> =
        initial.iter().filter(|(_, t)| t.abs().max().double_value(&[]) > 0.0).collect();
    let moved = nonzero.iter().filter(|(name, t)| relative_difference(t, &trained[*name]) > 1e-3).count();
    println!("{moved} of {} non-zero parameter tensors moved by more than 1e-3 from initialisation", nonzero.len());
    assert!(moved * 2 > nonzero.len(), "only {moved} of {} parameter tensors moved from initialisation", nonzero.len());
}

#[test]
fn demo_job_learns() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_data(&dir.path().join("data"), 4000, 300, 1000);
    let checkpoints = dir.path().join("checkpoints");
    let job = JobFile {
        eval: Some(data.eval_manifest()),
        global_batch: 128,
        steps: 300,
        lr: 1e-3,
        warmup_steps: 20,
        weight_decay: 0.1,
        workers: 2,
        checkpoint: Some(checkpoints.clone()),
        every_steps: 100,
        keep: 3,
        ..JobFile::new("clip-tiny-demo", &data)
    }
    .write(&dir.path().join("job.toml"));

    let (out, summary) = run_to_completion(&job, 2, &dir.path().join("logs"));
    println!("demo run: {:.1} s\n{summary:#}", out.elapsed.as_secs_f64());
    assert_eq!(summary["steps"], 300, "{summary:#}");
    let listed: Vec<&str> =
        summary["checkpoints"].as_array().expect("checkpoints").iter().filter_map(|c| c.as_str()).collect();
    assert_eq!(listed.len(), 3, "checkpoints every 100 of 300 steps: {listed:?}");
    for (url, step) in listed.iter().zip(["step-000099", "step-000199", "step-000299"]) {
        assert!(url.contains(step), "{url} is not the {step} checkpoint");
    }
    assert_eq!(latest_manifest(&checkpoints), "step-000299/manifest.json");

    let i2t = &summary["eval"]["image_to_text"];
    let (r1, chance) = (i2t["r1"].as_f64().expect("image_to_text.r1"), i2t["chance_r1"].as_f64().expect("chance_r1"));
    println!("held-out image->text R@1 {r1:.4}, chance {chance:.4} ({:.1}x)", r1 / chance);
    assert!(chance > 0.0 && chance < 0.05, "chance R@1 {chance} for 300 held-out samples");
    assert!(r1 >= 10.0 * chance, "image->text R@1 {r1} is below 10x chance ({chance})");
}

#[test]
fn data_parallel_fp64_matches_across_world_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_data(&dir.path().join("data"), 800, 50, 200);
    let base =
        JobFile { seed: 7, precision: "fp64".into(), global_batch: 32, steps: 20, ..JobFile::new("fp64-dp", &data) };
    let mut finals = BTreeMap::new();
    for workers in [1usize, 2, 4] {
        let root = dir.path().join(format!("checkpoints-w{workers}"));
        let job = JobFile { workers, checkpoint: Some(root.clone()), every_steps: 0, ..base.clone() }
            .write(&dir.path().join(format!("job-w{workers}.toml")));
        let (out, _) = run_to_completion(&job, workers, &dir.path().join(format!("logs-w{workers}")));
        println!("W={workers}: {:.1} s", out.elapsed.as_secs_f64());
        assert_eq!(latest_manifest(&root), "step-000019/manifest.json");
        finals.insert(workers, read_latest_checkpoint(&root));
        if workers == 1 {
            assert_trained_away_from_initialisation(&initial_model(&job), &finals[&1]);
        }
    }
    for workers in [2usize, 4] {
        let worst = assert_models_close(&finals[&1], &finals[&workers], 1e-9, &format!("W=1 vs W={workers}"));
        println!("W=1 vs W={workers}: largest relative difference {worst:e}");
    }
}

/// Copies the checkpoint root `full_root` to `root`, drops its step-19 checkpoint, points
/// `latest` at step 9, and runs `job` (which must checkpoint into `root` with `resume = true`)
/// with `workers` workers. Asserts the run resumed instead of training from scratch and
/// returns its final checkpoint.
fn resume_from_step_9(
    full_root: &Path,
    root: &Path,
    job: &Path,
    workers: usize,
    log_dir: &Path,
) -> BTreeMap<String, Tensor> {
    copy_dir(full_root, root);
    std::fs::remove_dir_all(root.join("step-000019")).unwrap();
    std::fs::write(root.join("latest"), "step-000009/manifest.json").unwrap();
    let (out, summary) = run_to_completion(job, workers, log_dir);
    println!("resumed from step 9 with W={workers}: {:.1} s", out.elapsed.as_secs_f64());
    let listed: Vec<&str> =
        summary["checkpoints"].as_array().expect("checkpoints").iter().filter_map(|c| c.as_str()).collect();
    assert!(
        listed.last().is_some_and(|c| c.ends_with("step-000019/manifest.json"))
            && listed
                .iter()
                .all(|c| c.ends_with("step-000009/manifest.json") || c.ends_with("step-000019/manifest.json")),
        "a run resumed after step 9 lists step 9 and commits step 19: {listed:?}"
    );
    let manifest = |root: &Path| std::fs::read_to_string(root.join("step-000009/manifest.json")).unwrap();
    assert_eq!(manifest(full_root), manifest(root), "the resumed run rewrote the step-9 checkpoint");
    let worker_logs = read_logs(log_dir);
    assert!(
        worker_logs.lines().any(|l| l.contains("resumed from") && l.contains("step-000009/manifest.json")),
        "no worker says it resumed from step-000009:\n{worker_logs}"
    );
    assert_eq!(latest_manifest(root), "step-000019/manifest.json");
    read_latest_checkpoint(root)
}

/// The names of the `model.*` and `optim.*` tensors.
fn state_names(tensors: &BTreeMap<String, Tensor>) -> Vec<String> {
    tensors.keys().filter(|n| n.starts_with("model.") || n.starts_with("optim.")).cloned().collect()
}

#[test]
fn resume_is_bitwise_identical() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_data(&dir.path().join("data"), 800, 50, 200);
    let base = JobFile {
        seed: 3,
        precision: "fp64".into(),
        global_batch: 32,
        steps: 20,
        every_steps: 10,
        keep: 3,
        ..JobFile::new("fp64-resume", &data)
    };
    let full_root = dir.path().join("checkpoints-full");
    let job = JobFile { checkpoint: Some(full_root.clone()), workers: 2, resume: false, ..base.clone() }
        .write(&dir.path().join("job-full.toml"));
    let (out, summary) = run_to_completion(&job, 2, &dir.path().join("logs-full"));
    println!("uninterrupted W=2: {:.1} s", out.elapsed.as_secs_f64());
    assert_eq!(summary["checkpoints"].as_array().map(Vec::len), Some(2), "{summary:#}");
    let full = read_latest_checkpoint(&full_root);
    let names = state_names(&full);
    assert!(names.iter().any(|n| n.starts_with("optim.")), "no optimizer state in {names:?}");
    let step9 = read_checkpoint(&full_root, "step-000009/manifest.json");
    let moved = with_prefix(&step9, "model.").iter().filter(|(name, t)| !t.equal(&full[**name])).count();
    assert!(moved > 0, "the step-9 and step-19 checkpoints hold the same model");

    // Same world size: the resumed run repeats the uninterrupted one bit for bit.
    let root = dir.path().join("checkpoints-resumed-w2");
    let job = JobFile { checkpoint: Some(root.clone()), workers: 2, resume: true, ..base.clone() }
        .write(&dir.path().join("job-resumed-w2.toml"));
    let resumed = resume_from_step_9(&full_root, &root, &job, 2, &dir.path().join("logs-resumed-w2"));
    assert_eq!(names, state_names(&resumed), "the resumed checkpoint holds other tensors");
    let different: Vec<&String> = names.iter().filter(|n| !full[*n].equal(&resumed[*n])).collect();
    assert!(different.is_empty(), "the resumed run differs from the uninterrupted one in {different:?}");

    // Another world size: the same samples in the same order, so equal up to the order of
    // floating-point sums.
    let root = dir.path().join("checkpoints-resumed-w1");
    let job = JobFile { checkpoint: Some(root.clone()), workers: 1, resume: true, ..base.clone() }
        .write(&dir.path().join("job-resumed-w1.toml"));
    let resumed = resume_from_step_9(&full_root, &root, &job, 1, &dir.path().join("logs-resumed-w1"));
    assert_eq!(names, state_names(&resumed), "the resumed checkpoint holds other tensors");
    let worst =
        names.iter().map(|n| (relative_difference(&full[n], &resumed[n]), n)).fold((0.0, None), |acc, (d, n)| {
            if d > acc.0 {
                (d, Some(n))
            } else {
                acc
            }
        });
    println!("W=2 uninterrupted vs W=1 resumed: largest relative difference {:e} ({:?})", worst.0, worst.1);
    assert!(
        worst.0 <= 1e-9,
        "resumed at W=1, {:?} differs by {:e} relative to its largest magnitude",
        worst.1,
        worst.0
    );
}
