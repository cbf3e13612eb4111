//! The cross-worker contrastive loss and its gradient equal a single-process full-batch
//! computation: W ranks (threads joined by the TCP ring) each holding a slice of the batch end
//! with the same loss and summed gradients as one process computing the textbook symmetric
//! InfoNCE over the whole batch, with and without gradient-accumulation micro-batches.

// The shared test helpers; this test uses the ring of threads only.
#[allow(dead_code)]
mod common;

use braid::trainer::{clip_config, seeded, Trainer, DeviceBatch};
use braid_coordinator::config::JobConfig;
use common::on_ring_ranks;
use tch::{Device, Kind, Tensor};

const BATCH: i64 = 12;
const VOCAB: i64 = 50;

fn job(max_micro_batch: usize) -> JobConfig {
    let text = format!(
        "[job]\nname = \"itc\"\nseed = 3\n[data]\ntrain = \"unused\"\n[model]\ncontext_length = 8\n\
         [train]\nglobal_batch = {BATCH}\nprecision = \"fp64\"\nmax_micro_batch = {max_micro_batch}\n"
    );
    JobConfig::parse(&text, "itc").unwrap()
}

/// A deterministic global batch of random images and token sequences.
fn global_batch() -> DeviceBatch {
    seeded(11, || DeviceBatch {
        images: Tensor::randn([BATCH, 3, 32, 32], (Kind::Double, Device::Cpu)),
        tokens: Tensor::randint_low(1, VOCAB, [BATCH, 8], (Kind::Int64, Device::Cpu)),
        eot_index: Tensor::randint_low(2, 8, [BATCH], (Kind::Int64, Device::Cpu)),
        valid: Tensor::ones([BATCH], (Kind::Bool, Device::Cpu)),
        word_ids: None,
        positions: Tensor::arange(BATCH, (Kind::Int64, Device::Cpu)),
    })
}

/// Single process, written out from the paper's formula: mean cross-entropy over rows and
/// columns of `exp(s) * I T^T`, gradients by plain autograd.
fn reference() -> (f64, Vec<(String, Tensor)>) {
    let config = job(0);
    let mut trainer = Trainer::new(&config, clip_config(&config, VOCAB).unwrap(), Device::Cpu).unwrap();
    let batch = global_batch();
    let model = trainer.clip().unwrap();
    let image = model.encode_image(&batch.images);
    let text = model.encode_text(&batch.tokens, &batch.eot_index);
    let logits = image.matmul(&text.transpose(0, 1)) * model.logit_scale.exp();
    let labels = Tensor::arange(BATCH, (Kind::Int64, Device::Cpu));
    let ce = |l: &Tensor| l.log_softmax(1, Kind::Double).nll_loss(&labels);
    let loss = (ce(&logits) + ce(&logits.transpose(0, 1))) / 2.0;
    loss.backward();
    let value = loss.double_value(&[]);
    let grads = trainer.named_grads().into_iter().map(|(n, g)| (n, g.copy())).collect();
    let _ = &mut trainer;
    (value, grads)
}

/// `world_size` threads, each training its slice; returns every rank's loss and gradients.
fn distributed(world_size: usize, max_micro_batch: usize) -> Vec<(f64, Vec<(String, Tensor)>)> {
    on_ring_ranks(world_size, move |rank, coll| {
        let config = job(max_micro_batch);
        let mut trainer = Trainer::new(&config, clip_config(&config, VOCAB).unwrap(), Device::Cpu).unwrap();
        let per_rank = BATCH / world_size as i64;
        let batch = global_batch().narrow(rank as i64 * per_rank, per_rank);
        let (loss, samples) = trainer.compute_gradients(0, &batch, coll).unwrap();
        assert_eq!(samples, BATCH as u64);
        let grads = trainer.named_grads().into_iter().map(|(n, g)| (n, g.copy())).collect();
        (loss, grads)
    })
}

fn assert_matches(world_size: usize, max_micro_batch: usize) {
    let (ref_loss, ref_grads) = reference();
    for (rank, (loss, grads)) in distributed(world_size, max_micro_batch).into_iter().enumerate() {
        assert!((loss - ref_loss).abs() <= 1e-12 * ref_loss.abs(), "W={world_size} rank {rank}: loss {loss} vs {ref_loss}");
        assert_eq!(grads.len(), ref_grads.len());
        for ((name, g), (ref_name, r)) in grads.iter().zip(&ref_grads) {
            assert_eq!(name, ref_name);
            let scale = r.abs().max().double_value(&[]).max(1e-30);
            let diff = (g - r).abs().max().double_value(&[]);
            assert!(diff <= 1e-10 * scale, "W={world_size} rank {rank} {name}: max diff {diff:e} (scale {scale:e})");
            assert!(scale > 1e-12 || name.contains("unused"), "{name} has no gradient in the reference");
        }
    }
}

#[test]
fn two_ranks_equal_one_process() {
    assert_matches(2, 0);
}

#[test]
fn three_ranks_equal_one_process() {
    assert_matches(3, 0);
}

#[test]
fn micro_batches_equal_one_process() {
    assert_matches(2, 4);
}

#[test]
fn one_rank_equals_the_formula() {
    assert_matches(1, 0);
}
