//! A training step's gradients against a Python reference: running the reference script,
//! reading what it wrote, a state whose momentum encoders differ from the online model, and the
//! per-parameter comparison with its report.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use braid::collective::RingCollective;
use braid::trainer::{seeded, DeviceBatch, Trainer};
use tch::{Kind, Tensor};

/// Writes `script` to `dir/name` and runs it with the venv's Python and `dir` as its argument;
/// returns its stdout.
pub fn run_python(script: &str, name: &str, dir: &Path) -> String {
    let path = dir.join(name);
    std::fs::write(&path, script).unwrap();
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let out = Command::new(&python).arg(&path).arg(dir).output().expect("run the venv's python");
    assert!(out.status.success(), "python script failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The tensors of a safetensors file by name.
pub fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

/// The named tensors of `state` under `prefix`, prefix stripped, copied.
pub fn under(state: &[(String, Tensor)], prefix: &str) -> Vec<(String, Tensor)> {
    state.iter().filter_map(|(n, t)| n.strip_prefix(prefix).map(|rest| (rest.to_string(), t.copy()))).collect()
}

/// Moves every momentum weight of `trainer` by `0.02 * N(0, 1)` (a few steps at m = 0.995
/// barely separate them from the online weights, and distillation is then hardly tested).
fn perturb_momentum(trainer: &mut Trainer, seed: u64) {
    let perturbed: Vec<(String, Tensor)> = seeded(seed, || {
        trainer
            .state()
            .into_iter()
            .map(|(n, t)| {
                let t = if n.starts_with("momentum.") { &t + t.randn_like() * 0.02 } else { t.copy() };
                (n, t)
            })
            .collect()
    });
    trainer.load_state(perturbed, "the perturbed state").unwrap();
}

/// The smallest, over the momentum tensors, of the largest difference from the online tensor
/// of the same name.
fn momentum_gap(online: &[(String, Tensor)], momentum: &[(String, Tensor)]) -> f64 {
    let online: HashMap<&str, &Tensor> = online.iter().map(|(n, t)| (n.as_str(), t)).collect();
    momentum.iter().map(|(n, t_m)| (online[n.as_str()] - t_m).abs().max().double_value(&[])).fold(f64::INFINITY, f64::min)
}

/// The step a reference test checks, with what it started from.
pub struct CheckedStep {
    /// The step's global-batch loss.
    pub loss: f64,
    /// Every parameter's gradient.
    pub grads: HashMap<String, Tensor>,
    /// The trainer's whole state before the step (copied).
    pub state: Vec<(String, Tensor)>,
    /// The online weights before the step (`model.*`, prefix stripped).
    pub online: Vec<(String, Tensor)>,
    /// The momentum weights before the step (`momentum.*`, prefix stripped).
    pub momentum: Vec<(String, Tensor)>,
}

impl CheckedStep {
    /// The state tensor `name` before the step.
    pub fn get(&self, name: &str) -> Tensor {
        self.state.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no state tensor {name}")).1.shallow_clone()
    }
}

/// Trains `warm_up` steps of `batch(step)` on one rank so the feature queues (`queue_len`
/// entries) fill, moves the momentum weights away from the online ones
/// ([`perturb_momentum`]), then computes the gradients of step `warm_up`. Checks that the
/// queues are full of valid entries, that every sample of the step counts and that no momentum
/// tensor is within 1e-2 of its online one.
pub fn checked_step(trainer: &mut Trainer, coll: &mut RingCollective, batch: impl Fn(u64) -> DeviceBatch, warm_up: u64, queue_len: i64) -> CheckedStep {
    for step in 0..warm_up {
        trainer.train_step(step, &batch(step), coll).unwrap();
    }
    perturb_momentum(trainer, 17);
    let checked = batch(warm_up);
    let state: Vec<(String, Tensor)> = trainer.state().into_iter().map(|(n, t)| (n, t.copy())).collect();
    let (loss, samples) = trainer.compute_gradients(warm_up, &checked, coll).unwrap();
    assert_eq!(samples, checked.len() as u64, "every sample of the checked step counts");
    let grads = trainer.named_grads().into_iter().map(|(n, g)| (n, g.copy())).collect();
    let (online, momentum) = (under(&state, "model."), under(&state, "momentum."));
    let step = CheckedStep { loss, grads, state, online, momentum };
    assert_eq!(step.get("queue.image.pointer").int64_value(&[]), (warm_up as i64 * checked.len() as i64) % queue_len);
    for side in ["image", "text"] {
        let valid = step.get(&format!("queue.{side}.valid")).to_kind(Kind::Int64);
        assert_eq!(valid.min().int64_value(&[]), 1, "every {side} queue slot is valid");
    }
    let gap = momentum_gap(&step.online, &step.momentum);
    assert!(gap > 1e-2, "a momentum tensor differs from its online one by only {gap:e}");
    step
}

/// One parameter's gradient against the reference's.
#[derive(Debug)]
pub struct GradRow {
    /// Parameter name.
    pub name: String,
    /// Largest absolute difference.
    pub diff: f64,
    /// Largest absolute entry of the reference gradient.
    pub scale: f64,
    /// The allowed difference.
    pub tolerance: f64,
}

impl GradRow {
    /// Within the tolerance (a NaN difference is not).
    pub fn holds(&self) -> bool {
        self.diff <= self.tolerance
    }
}

/// One row per parameter of `grads` against `reference` (which must name the same
/// parameters, with the same shapes), with tolerance `relative * scale + floor * global`, where
/// `global` is the largest entry of any reference gradient: `floor` covers tensors whose exact
/// gradient is zero (attention key biases), where both sides hold only rounding noise.
pub fn compare(grads: &HashMap<String, Tensor>, reference: &HashMap<String, Tensor>, relative: f64, floor: f64) -> Vec<GradRow> {
    let mut names: Vec<&String> = grads.keys().collect();
    names.sort();
    assert_eq!(names.len(), reference.len(), "the reference has a gradient for every parameter and no other");
    let global = largest_entry(reference);
    names
        .iter()
        .map(|name| {
            let expected = reference.get(name.as_str()).unwrap_or_else(|| panic!("no reference gradient for {name}"));
            let got = &grads[name.as_str()];
            assert_eq!(got.size(), expected.size(), "{name}: shape");
            let scale = expected.abs().max().double_value(&[]);
            let diff = (got - expected).abs().max().double_value(&[]);
            GradRow { name: name.to_string(), diff, scale, tolerance: relative * scale + floor * global }
        })
        .collect()
}

/// The largest absolute entry of any of `tensors`.
pub fn largest_entry(tensors: &HashMap<String, Tensor>) -> f64 {
    tensors.values().map(|g| g.abs().max().double_value(&[])).fold(0.0, f64::max)
}

/// Prints the rows by `group` of parameters and the five closest to their bound, then asserts
/// that every row holds.
pub fn assert_rows_hold(rows: &[GradRow], group: impl Fn(&str) -> &'static str) {
    let mut groups: Vec<&str> = rows.iter().map(|r| group(&r.name)).collect();
    groups.sort();
    groups.dedup();
    for g in groups {
        let members: Vec<&GradRow> = rows.iter().filter(|r| group(&r.name) == g).collect();
        let worst = members.iter().max_by(|a, b| a.diff.total_cmp(&b.diff)).unwrap();
        let scale = members.iter().map(|r| r.scale).fold(0.0, f64::max);
        let margin = members.iter().map(|r| r.diff / r.tolerance).fold(0.0, f64::max);
        println!(
            "{g:>22}: {:>3} tensors, max |grad| {scale:.3e}, max abs difference {:.3e} ({}), at most {margin:.1e} of the bound",
            members.len(),
            worst.diff,
            worst.name
        );
    }
    let mut by_margin: Vec<&GradRow> = rows.iter().collect();
    by_margin.sort_by(|a, b| (b.diff / b.tolerance).total_cmp(&(a.diff / a.tolerance)));
    println!("closest to the bound:");
    for r in by_margin.iter().take(5) {
        println!("  {}: difference {:.3e}, max |grad| {:.3e}, bound {:.3e}", r.name, r.diff, r.scale, r.tolerance);
    }
    let failures: Vec<String> = rows
        .iter()
        .filter(|r| !r.holds())
        .map(|r| format!("{}: difference {:e} (max |grad| {:e}, bound {:e})", r.name, r.diff, r.scale, r.tolerance))
        .collect();
    assert!(failures.is_empty(), "{} gradients differ from the reference:\n{}", failures.len(), failures.join("\n"));
}
