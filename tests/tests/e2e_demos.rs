//! The momentum families' example jobs learn: `examples/albef-tiny.toml` (and
//! `examples/blip-tiny.toml` when present) run as written, with 2 worker processes on a smaller
//! synthetic set, and their held-out retrieval, zero-shot and ITM accuracy end well above
//! chance.

use std::path::{Path, PathBuf};
use std::time::Duration;

use braid_tests::{braid_run, read_logs, synth_data, workspace_root};

/// The example job `name`, with its data, tokenizer and checkpoint paths pointed at `data` and
/// `dir`; written to `dir/job.toml`.
fn example_job(name: &str, data: &Path, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(workspace_root().join("examples").join(name)).expect("the example job");
    let text = text
        .replace("../data/synth", &data.display().to_string())
        .replace("../runs/", &format!("{}/runs/", dir.display()));
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs an example and returns the `braid run --json` summary.
fn run_example(name: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_data(&dir.path().join("data"), 4000, 300, 1000);
    let job = example_job(name, &data.dir, dir.path());
    let logs = dir.path().join("logs");
    let out = braid_run(&job, 2, &logs, Duration::from_secs(900));
    assert!(out.status.success(), "braid run {name} failed:\n{}\n{}", out.text(), read_logs(&logs));
    let summary = out.summary();
    println!("{name}: {:.1} s\n{:#}", out.elapsed.as_secs_f64(), summary["eval"]);
    summary
}

fn times_chance(eval: &serde_json::Value, direction: &str) -> f64 {
    let r = &eval[direction];
    r["r1"].as_f64().expect("r1") / r["chance_r1"].as_f64().expect("chance_r1")
}

#[test]
fn albef_example_learns() {
    let summary = run_example("albef-tiny.toml");
    let eval = &summary["eval"];
    for direction in ["image_to_text", "text_to_image"] {
        let x = times_chance(eval, direction);
        assert!(x >= 5.0, "ALBEF {direction} R@1 is {x:.1}x chance, expected at least 5x: {eval:#}");
    }
    let zero_shot = eval["zero_shot_top1"].as_f64().expect("zero-shot accuracy");
    let chance = eval["zero_shot_chance"].as_f64().expect("zero-shot chance");
    assert!(zero_shot >= 5.0 * chance, "ALBEF zero-shot {zero_shot} vs chance {chance}");
    let itm = eval["itm_accuracy"].as_f64().expect("ALBEF reports ITM accuracy");
    assert!(itm >= 0.6, "ALBEF ITM accuracy {itm} against random negatives, chance 0.5");
}

#[test]
fn blip_example_learns_and_captions() {
    let summary = run_example("blip-tiny.toml");
    let eval = &summary["eval"];
    for direction in ["image_to_text", "text_to_image"] {
        let x = times_chance(eval, direction);
        assert!(x >= 10.0, "BLIP {direction} R@1 is {x:.1}x chance, expected at least 10x: {eval:#}");
    }
    let itm = eval["itm_accuracy"].as_f64().expect("BLIP reports ITM accuracy");
    assert!(itm >= 0.6, "BLIP ITM accuracy {itm} against random negatives, chance 0.5");
    let captions = &eval["captions"];
    let (f1, chance) = (captions["word_f1"].as_f64().expect("word F1"), captions["chance_word_f1"].as_f64().expect("chance"));
    assert!(f1 >= chance + 0.1, "BLIP caption word F1 {f1} vs image-blind chance {chance}");
}
