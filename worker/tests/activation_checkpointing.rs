//! Activation checkpointing changes memory, not math: CLIP-tiny trained with every transformer
//! block recomputed in the backward pass ends with the same loss, the same gradient of every
//! parameter and the same parameters after a few steps as plain autograd keeping all
//! activations, with and without gradient-accumulation micro-batches.

use std::time::Duration;

use braid::collective::{RingCollective, RingListener};
use braid::trainer::{clip_config, seeded, Trainer, DeviceBatch};
use braid_coordinator::config::JobConfig;
use tch::{Device, Kind, Tensor};

const BATCH: i64 = 12;
const VOCAB: i64 = 50;

fn job(precision: &str, max_micro_batch: usize, activation_checkpointing: bool) -> JobConfig {
    let text = format!(
        "[job]\nname = \"ckpt\"\nseed = 5\n[data]\ntrain = \"unused\"\n[model]\ncontext_length = 8\n\
         [train]\nglobal_batch = {BATCH}\nprecision = \"{precision}\"\nmax_micro_batch = {max_micro_batch}\n\
         warmup_steps = 1\nsteps = 3\nactivation_checkpointing = {activation_checkpointing}\n"
    );
    let config = JobConfig::parse(&text, "ckpt").unwrap();
    config.validate("ckpt").unwrap();
    config
}

/// A deterministic batch of random images and token sequences in `kind`.
fn batch(kind: Kind) -> DeviceBatch {
    seeded(13, || DeviceBatch {
        images: Tensor::randn([BATCH, 3, 32, 32], (Kind::Double, Device::Cpu)).to_kind(kind),
        tokens: Tensor::randint_low(1, VOCAB, [BATCH, 8], (Kind::Int64, Device::Cpu)),
        eot_index: Tensor::randint_low(2, 8, [BATCH], (Kind::Int64, Device::Cpu)),
        valid: Tensor::ones([BATCH], (Kind::Bool, Device::Cpu)),
        word_ids: None,
        positions: Tensor::arange(BATCH, (Kind::Int64, Device::Cpu)),
    })
}

fn trainer(config: &JobConfig) -> Trainer {
    Trainer::new(config, clip_config(config, VOCAB).unwrap(), Device::Cpu).unwrap()
}

fn single_rank() -> RingCollective {
    let (listener, _) = RingListener::bind("127.0.0.1:0").unwrap();
    RingCollective::connect(listener, 0, 1, &["127.0.0.1:0".to_string()], 0, Duration::from_secs(20)).unwrap()
}

/// The loss and every parameter's gradient after one forward and backward pass.
fn gradients(config: &JobConfig) -> (f64, Vec<(String, Tensor)>) {
    let mut trainer = trainer(config);
    let batch = batch(trainer.compute_kind());
    let (loss, _) = trainer.compute_gradients(0, &batch, &mut single_rank()).unwrap();
    (loss, trainer.named_grads().into_iter().map(|(n, g)| (n, g.copy())).collect())
}

/// Largest `|a - b|` over `max |b|` of each pair of named tensors; checks names, shapes and
/// that the reference `b` is non-zero.
fn max_relative_diff(tensors: &[(String, Tensor)], reference: &[(String, Tensor)]) -> f64 {
    assert_eq!(tensors.len(), reference.len());
    let mut worst = 0.0f64;
    for ((name, t), (ref_name, r)) in tensors.iter().zip(reference) {
        assert_eq!(name, ref_name);
        assert_eq!(t.size(), r.size(), "{name}");
        let scale = r.abs().max().double_value(&[]);
        assert!(scale > 0.0, "{name} is zero in the reference");
        let diff = (t - r).abs().max().double_value(&[]) / scale;
        worst = worst.max(diff);
    }
    worst
}

fn assert_same_gradients(max_micro_batch: usize) {
    let (ref_loss, ref_grads) = gradients(&job("fp64", max_micro_batch, false));
    let (loss, grads) = gradients(&job("fp64", max_micro_batch, true));
    let loss_diff = (loss - ref_loss).abs() / ref_loss.abs();
    let grad_diff = max_relative_diff(&grads, &ref_grads);
    eprintln!("max_micro_batch {max_micro_batch}: loss relative diff {loss_diff:e}, gradient max relative diff {grad_diff:e}");
    assert!(loss_diff <= 1e-12, "loss {loss} vs {ref_loss}");
    assert!(grad_diff <= 1e-12, "gradients differ by {grad_diff:e} relative");
}

#[test]
fn checkpointed_gradients_equal_plain_autograd() {
    assert_same_gradients(0);
}

#[test]
fn checkpointed_gradients_equal_plain_autograd_with_micro_batches() {
    // 12 samples in micro-batches of 5: two full ones and a short one.
    assert_same_gradients(5);
}

/// The checkpointed forward pass keeps no graph through the blocks: plain autograd from its
/// output reaches the head's parameters and nothing before the first block's output.
#[test]
fn checkpointed_forward_keeps_no_graph_through_the_blocks() {
    let config = job("fp64", 0, true);
    let trainer = trainer(&config);
    let batch = batch(Kind::Double);
    let model = trainer.clip().unwrap();
    let image = model.encode_image_checkpointed(&batch.images);
    let text = model.encode_text_checkpointed(&batch.tokens, &batch.eot_index);
    (image.output().sum(Kind::Double) + text.output().sum(Kind::Double)).backward();
    let reached = |g: &Tensor| g.defined() && g.abs().max().double_value(&[]) > 0.0;
    let mut heads = 0;
    for (name, grad) in trainer.named_grads() {
        let head = ["visual.ln_post.", "visual.proj", "ln_final.", "text_projection"].iter().any(|h| name.starts_with(h));
        if head {
            heads += 1;
            assert!(reached(&grad), "{name} is in the head but got no gradient");
        } else {
            assert!(!reached(&grad), "{name} got a gradient through a graph the checkpointed pass should not keep");
        }
    }
    assert_eq!(heads, 6);
}

/// Three fp32 AdamW steps with and without checkpointing end at the same parameters.
#[test]
fn checkpointed_training_steps_equal_plain_steps() {
    let run = |activation_checkpointing: bool| {
        let config = job("fp32", 0, activation_checkpointing);
        let mut trainer = trainer(&config);
        let batch = batch(trainer.compute_kind());
        let mut coll = single_rank();
        let losses: Vec<f64> = (0..3).map(|step| trainer.train_step(step, &batch, &mut coll).unwrap().loss).collect();
        let params: Vec<(String, Tensor)> =
            trainer.state().into_iter().filter(|(n, _)| n.starts_with("model.")).collect();
        (losses, params)
    };
    let (ref_losses, ref_params) = run(false);
    let (losses, params) = run(true);
    let mut max_diff = 0.0f64;
    for ((name, p), (ref_name, r)) in params.iter().zip(&ref_params) {
        assert_eq!(name, ref_name);
        max_diff = max_diff.max((p - r).abs().max().double_value(&[]));
    }
    eprintln!("fp32, 3 steps: losses {losses:?} vs {ref_losses:?}, parameters max abs diff {max_diff:e}");
    assert_eq!(params.len(), ref_params.len());
    assert!(max_diff <= 1e-6, "parameters differ by {max_diff:e} after 3 steps");
    for (l, r) in losses.iter().zip(&ref_losses) {
        assert!((l - r).abs() <= 1e-6 * r.abs(), "loss {l} vs {r}");
    }
}

/// bf16 compute with fp32 master weights: block inputs are saved and recomputed in bf16.
#[test]
fn checkpointed_bf16_gradients_equal_plain_autograd() {
    let (ref_loss, ref_grads) = gradients(&job("bf16", 0, false));
    let (loss, grads) = gradients(&job("bf16", 0, true));
    let grad_diff = max_relative_diff(&grads, &ref_grads);
    eprintln!("bf16: loss {loss} vs {ref_loss}, gradient max relative diff {grad_diff:e}");
    assert!((loss - ref_loss).abs() <= 1e-6 * ref_loss.abs(), "loss {loss} vs {ref_loss}");
    assert!(grad_diff <= 1e-6, "gradients differ by {grad_diff:e} relative");
}

#[test]
fn activation_checkpointing_parses_and_defaults_off() {
    assert!(job("fp32", 0, true).train.activation_checkpointing);
    let plain = JobConfig::parse("[job]\nname = \"p\"\n[data]\ntrain = \"unused\"\n", "plain").unwrap();
    assert!(!plain.train.activation_checkpointing);
}
