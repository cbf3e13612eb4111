//! Portable checkpoints end to end: a CLIP-tiny job trained with CLIP BPE, exported with
//! `braid export` to open_clip's and transformers' layouts, loaded by both libraries in Python,
//! and compared with braid's embeddings from the checkpoint; the exported weights start a fresh
//! trainer bit for bit; `braid checkpoint list/show` describe the root.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use braid::export::init_from_open_clip;
use braid::models::clip::Clip;
use braid::trainer::{clip_config, Trainer};
use braid_coordinator::config::JobConfig;
use braid_tests::{
    braid, braid_run, python, read_checkpoint, read_latest_checkpoint, read_logs, synth_data, with_prefix,
    workspace_root, BraidOutput, JobFile,
};
use tch::{Device, Tensor};

/// Bound on one `braid run`.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound on the other `braid` commands.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// CLIP BPE's vocabulary.
const CLIP_BPE_VOCAB: i64 = 49408;

/// Runs `braid` with `args` and asserts it succeeded.
fn braid_ok<S: AsRef<OsStr>>(args: &[S]) -> BraidOutput {
    let out = braid(args, COMMAND_TIMEOUT);
    let shown: Vec<String> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
    assert!(out.status.success(), "braid {shown:?} failed:\n{}", out.text());
    out
}

/// Runs `braid` with `args` and asserts it failed; returns what it printed.
fn braid_fails<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = braid(args, COMMAND_TIMEOUT);
    let shown: Vec<String> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
    assert!(!out.status.success(), "braid {shown:?} succeeded:\n{}", out.text());
    out.text()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

/// A CLIP-tiny job on synthetic data with CLIP BPE, fp32, one worker, `steps` steps, checkpoints
/// every 5 steps under `root`.
fn job_file(dir: &Path, name: &str, steps: u64, root: &Path) -> (JobFile, PathBuf) {
    let data = synth_data(&dir.join("data"), 320, 32, 160);
    let mut job = JobFile::new(name, &data);
    job.tokenizer = PathBuf::from("clip-bpe");
    job.steps = steps;
    job.warmup_steps = 2;
    job.checkpoint = Some(root.to_path_buf());
    job.every_steps = 5;
    let path = job.write(&dir.join("job.toml"));
    (job, path)
}

/// Trains `job` to completion.
fn train(job: &Path, log_dir: &Path) {
    let out = braid_run(job, 1, log_dir, RUN_TIMEOUT);
    assert!(out.status.success(), "braid run {} failed:\n{}\n{}", job.display(), out.text(), read_logs(log_dir));
    assert_eq!(out.summary()["finished"], true, "{}", out.text());
}

fn read_named(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())).into_iter().collect()
}

/// braid's normalised image and text embeddings of the inputs.
fn embed(model: &Clip, inputs: &HashMap<String, Tensor>) -> (Tensor, Tensor) {
    tch::no_grad(|| (model.encode_image(&inputs["images"]), model.encode_text(&inputs["tokens"], &inputs["eot_index"])))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

#[test]
fn exported_checkpoint_matches_open_clip_transformers_and_init_from() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    let (_, job) = job_file(dir.path(), "export-parity", 10, &root);
    train(&job, &dir.path().join("logs"));

    // (a) open_clip layout: exactly the checkpoint's model tensors without the prefix.
    let open_clip_file = dir.path().join("clip-tiny.safetensors");
    let out =
        braid_ok(&["export", "--checkpoint", s(&root), "--format", "open_clip", "--out", s(&open_clip_file), "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.text()));
    assert_eq!(report["step"], 9, "{report:#}");
    assert_eq!(report["format"], "open_clip");
    let exported = read_named(&open_clip_file);
    let checkpoint = read_latest_checkpoint(&root);
    let model = with_prefix(&checkpoint, "model.");
    assert_eq!(exported.len(), model.len());
    for (name, t) in &model {
        assert!(exported[name.strip_prefix("model.").unwrap()].equal(t), "{name} differs in the export");
    }

    // (c) transformers layout, with the job for heads, activation and tokenizer.
    let hf_dir = dir.path().join("clip-tiny-hf");
    let out = braid_ok(&[
        "export",
        "--checkpoint",
        s(&root),
        "--format",
        "hf",
        "--job",
        s(&job),
        "--out",
        s(&hf_dir),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.text()));
    assert_eq!(report["warnings"], serde_json::json!([]), "CLIP BPE pools where transformers does: {report:#}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hf_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["text_config"]["eos_token_id"], 49407, "{config:#}");
    assert_eq!(config["vision_config"]["hidden_act"], "gelu", "{config:#}");

    let reference = dir.path().join("reference");
    std::fs::create_dir_all(&reference).unwrap();
    let script = workspace_root().join("tests/python/export_ref.py");
    python(&[s(&script), s(&reference), s(&open_clip_file), s(&hf_dir)]);
    let inputs = read_named(&reference.join("inputs.safetensors"));
    let open_clip = read_named(&reference.join("open_clip.safetensors"));
    let hf = read_named(&reference.join("hf.safetensors"));

    let config = JobConfig::load(&job).unwrap();
    let (trained, step) = braid::eval::load_checkpoint(&config, &braid::data::tokenizer::ClipBpe::new(), Some(s(&root)), Device::Cpu).unwrap();
    assert_eq!(step, 9);
    let (image, text) = embed(trained.clip().unwrap(), &inputs);
    for (name, got) in [("image_features", &image), ("text_features", &text)] {
        let d = max_abs_diff(got, &open_clip[name]);
        println!(
            "{name}: braid vs open_clip max |diff| {d:e}, braid vs transformers {:e}",
            max_abs_diff(got, &hf[name])
        );
        assert!(d < 1e-5, "{name}: braid and open_clip differ by {d:e}");
        let d = max_abs_diff(got, &hf[name]);
        assert!(d < 1e-4, "{name}: braid and transformers differ by {d:e}");
    }

    // (b) the exported file starts a differently seeded trainer at exactly the trained model.
    let mut other = config.clone();
    other.job.seed += 1;
    let clip = clip_config(&other, CLIP_BPE_VOCAB).unwrap();
    let mut fresh = Trainer::new(&other, clip, Device::Cpu).unwrap();
    let (before, _) = embed(fresh.clip().unwrap(), &inputs);
    assert!(!before.equal(&image), "a differently seeded model already gives the trained embeddings");
    init_from_open_clip(&mut fresh, s(&open_clip_file)).unwrap();
    let (image_b, text_b) = embed(fresh.clip().unwrap(), &inputs);
    assert!(image_b.equal(&image) && text_b.equal(&text), "init_from does not reproduce the checkpoint's embeddings");
}

#[test]
fn checkpoint_commands_describe_a_root_and_name_missing_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    let (_, job) = job_file(dir.path(), "checkpoint-list", 10, &root);
    train(&job, &dir.path().join("logs"));

    let out = braid_ok(&["checkpoint", "list", s(&root), "--json"]);
    let listing: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.text()));
    let steps: Vec<u64> =
        listing["checkpoints"].as_array().unwrap().iter().map(|c| c["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [4, 9], "{listing:#}");
    assert_eq!(listing["latest"], "step-000009/manifest.json");
    let latest: Vec<bool> =
        listing["checkpoints"].as_array().unwrap().iter().map(|c| c["latest"].as_bool().unwrap()).collect();
    assert_eq!(latest, [false, true]);
    for c in listing["checkpoints"].as_array().unwrap() {
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join(c["manifest"].as_str().unwrap())).unwrap()).unwrap();
        let on_disk: u64 = manifest["parts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| std::fs::metadata(root.join(p["path"].as_str().unwrap())).unwrap().len())
            .sum();
        assert_eq!(c["bytes"].as_u64(), Some(on_disk), "{c:#}");
        assert_eq!(c["world_size"], 1);
    }
    let text = braid_ok(&["checkpoint", "list", s(&root)]).stdout;
    let latest_line =
        text.lines().find(|l| l.contains("<- latest")).unwrap_or_else(|| panic!("no latest mark:\n{text}"));
    assert!(latest_line.trim_start().starts_with("9 "), "{text}");
    assert!(text.lines().any(|l| l.trim_start().starts_with("4 ")), "{text}");

    let out = braid_ok(&["checkpoint", "show", s(&root), "--json"]);
    let manifest: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.text()));
    assert_eq!(manifest["step"], 9);
    assert_eq!(manifest["job"], "checkpoint-list");
    assert_eq!(manifest["config_hash"], JobConfig::load(&job).unwrap().hash());
    let part = &manifest["parts"][0];
    let bytes = std::fs::read(root.join(part["path"].as_str().unwrap())).unwrap();
    assert_eq!(part["sha256"], braid::checkpoint::sha256_hex(&bytes));
    assert_eq!(part["size"].as_u64(), Some(bytes.len() as u64));
    let step4 = root.join("step-000004/manifest.json");
    let text = braid_ok(&["checkpoint", "show", s(&step4)]).stdout;
    for needle in ["step:          4", "world_size:    1", "rank 0", "braid_version:", "config_hash:", "sha256 "] {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }

    // An export of an older step by its manifest holds that step's model.
    let file = dir.path().join("step4.safetensors");
    braid_ok(&["export", "--checkpoint", s(&step4), "--format", "open_clip", "--out", s(&file), "--job", s(&job)]);
    let exported = read_named(&file);
    let step4_tensors = read_checkpoint(&root, "step-000004/manifest.json");
    for (name, t) in with_prefix(&step4_tensors, "model.") {
        assert!(exported[name.strip_prefix("model.").unwrap()].equal(t), "{name}");
    }

    // Missing and empty roots, and hf without the job, are named in the error.
    let missing = dir.path().join("no-such-root");
    for args in [
        vec!["checkpoint", "list", s(&missing)],
        vec!["checkpoint", "show", s(&missing)],
        vec!["export", "--checkpoint", s(&missing), "--format", "open_clip", "--out", s(&file)],
    ] {
        let text = braid_fails(&args);
        assert!(text.contains(s(&missing)) && text.contains("does not exist"), "{args:?}:\n{text}");
    }
    let empty = dir.path().join("empty-root");
    std::fs::create_dir_all(&empty).unwrap();
    for args in [vec!["checkpoint", "list", s(&empty)], vec!["checkpoint", "show", s(&empty)]] {
        let text = braid_fails(&args);
        assert!(text.contains(s(&empty)) && text.contains("no committed checkpoint"), "{args:?}:\n{text}");
    }
    let text = braid_fails(&["export", "--checkpoint", s(&root), "--format", "hf", "--out", s(&dir.path().join("hf"))]);
    assert!(text.contains("--job"), "{text}");
}

/// `[model] init_from` in a job: one step at a negligible learning rate keeps the model at the
/// exported weights (and away from the job seed's own initialisation).
#[test]
fn a_job_starts_from_init_from() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    let (mut job, _) = job_file(dir.path(), "init-from", 1, &root);
    job.lr = 1e-30;
    job.warmup_steps = 0;
    job.weight_decay = 0.0;
    let config = JobConfig::parse(&job.to_toml(), "init-from job").unwrap();
    let mut source_config = config.clone();
    source_config.job.seed = 123;
    let source = Trainer::new(&source_config, clip_config(&config, CLIP_BPE_VOCAB).unwrap(), Device::Cpu).unwrap();
    let weights: Vec<(String, Tensor)> =
        source.state().into_iter().filter_map(|(n, t)| n.strip_prefix("model.").map(|n| (n.to_string(), t))).collect();
    let init = dir.path().join("init.safetensors");
    braid::export::write_open_clip(&weights, s(&init)).unwrap();
    let toml =
        job.to_toml().replace("preset = \"tiny\"\n", &format!("preset = \"tiny\"\ninit_from = {:?}\n", s(&init)));
    let path = dir.path().join("init-from.toml");
    std::fs::write(&path, toml).unwrap();
    train(&path, &dir.path().join("logs"));

    let trained = read_latest_checkpoint(&root);
    for (name, t) in &weights {
        let got = &trained[&format!("model.{name}")];
        let d = max_abs_diff(got, t);
        assert!(d < 1e-20, "{name} moved {d:e} from init_from");
    }
}
