//! The data flow of a captured step (`train.cuda_graph`), checked on the CPU with
//! [`StepCapture::Rerun`]: each step copies its batch into the captured step's fixed inputs,
//! sets the learning rate and step number the update reads, and runs the captured work, whose
//! results are read back in one copy. CLIP-tiny trained that way, through warm-up, capture and
//! replays, with batches that differ every step, a change of batch shape (which drops the capture)
//! and gradient clipping that engages, takes exactly the steps an eager trainer takes: the same
//! statistics and the same parameters and optimizer moments, bit for bit. A GPU replays the
//! same work from a CUDA graph (`bench/gpu.sh` compares it there).

// The shared test helpers; this test uses the ring of one only.
#[allow(dead_code)]
mod common;

use std::collections::HashMap;

use braid::trainer::{clip_config, seeded, DeviceBatch, StepCapture, StepStats, Trainer, CAPTURE_AFTER_STEPS};
use braid_coordinator::config::JobConfig;
use common::single_rank;
use tch::{Device, Kind, Tensor};

const VOCAB: i64 = 50;
const CONTEXT: i64 = 8;
const STEPS: u64 = 9;

fn job(grad_clip: f64) -> JobConfig {
    let text = format!(
        "[job]\nname = \"capture\"\nseed = 3\n[data]\ntrain = \"unused\"\n[model]\ncontext_length = {CONTEXT}\n\
         [train]\nglobal_batch = 8\nprecision = \"fp32\"\nwarmup_steps = 2\nsteps = {STEPS}\nlr = 5e-3\ngrad_clip = {grad_clip}\n"
    );
    let config = JobConfig::parse(&text, "capture").unwrap();
    config.validate("capture").unwrap();
    config
}

/// Step `step`'s batch: new images and captions every step, some padding rows, and from step 6
/// on a smaller slot (a shape the captured step does not have).
fn batch(step: u64) -> DeviceBatch {
    let size = if step < 6 { 8 } else { 6 };
    seeded(100 + step, || DeviceBatch {
        images: Tensor::randn([size, 3, 32, 32], (Kind::Float, Device::Cpu)),
        tokens: Tensor::randint_low(1, VOCAB, [size, CONTEXT], (Kind::Int64, Device::Cpu)),
        eot_index: Tensor::randint_low(2, CONTEXT, [size], (Kind::Int64, Device::Cpu)),
        valid: Tensor::arange(size, (Kind::Int64, Device::Cpu)).lt(size - (step % 3) as i64),
        word_ids: None,
        positions: Tensor::arange(size, (Kind::Int64, Device::Cpu)),
    })
}

/// Trains `STEPS` steps; returns every step's statistics, whether it ran from the captured
/// step, and the final state.
fn train(config: &JobConfig, capture: StepCapture) -> (Vec<StepStats>, Vec<bool>, HashMap<String, Tensor>) {
    let mut trainer = Trainer::new(config, clip_config(config, VOCAB).unwrap(), Device::Cpu).unwrap();
    trainer.set_step_capture(capture);
    let mut coll = single_rank();
    let mut stats = Vec::new();
    let mut captured = Vec::new();
    for step in 0..STEPS {
        stats.push(trainer.train_step(step, &batch(step), &mut coll).unwrap());
        captured.push(trainer.step_is_captured());
    }
    (stats, captured, trainer.state().into_iter().map(|(n, t)| (n, t.copy())).collect())
}

fn assert_same_training(grad_clip: f64) {
    let config = job(grad_clip);
    let (eager, eager_captured, eager_state) = train(&config, StepCapture::Eager);
    let (rerun, rerun_captured, rerun_state) = train(&config, StepCapture::Rerun);
    assert!(eager_captured.iter().all(|c| !c));
    // Two eager steps, then the capture and its replays until the slot shrinks at step 6, then
    // two eager steps at the new shape and a new capture.
    let after = CAPTURE_AFTER_STEPS as usize;
    let expected: Vec<bool> = (0..STEPS as usize).map(|s| (after..6).contains(&s) || s >= 6 + after).collect();
    assert_eq!(rerun_captured, expected);
    for (step, (a, b)) in eager.iter().zip(&rerun).enumerate() {
        eprintln!("step {step}: loss {:.6} grad norm {:.4} lr {:.2e} samples {}", a.loss, a.grad_norm, a.lr, a.samples);
        assert_eq!(a, b, "step {step}");
    }
    let samples: Vec<u64> = eager.iter().map(|s| s.samples).collect();
    assert_eq!(samples, [8, 7, 6, 8, 7, 6, 6, 5, 4], "valid samples counted on the device");
    assert_eq!(eager_state.len(), rerun_state.len());
    for (name, t) in &eager_state {
        assert!(t.equal(&rerun_state[name]), "{name} differs after training");
    }
}

#[test]
fn captured_steps_train_as_eager_steps() {
    assert_same_training(1.0);
}

/// With a small clipping norm every step is clipped, on the device, with the coefficient the
/// captured step computes without reading the norm on the host.
#[test]
fn captured_steps_clip_as_eager_steps() {
    let (stats, _, _) = train(&job(1e-3), StepCapture::Eager);
    assert!(stats.iter().all(|s| s.grad_norm > 1e-3), "clipping engages on every step");
    assert_same_training(1e-3);
}
