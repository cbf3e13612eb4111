//! What the data-parallel and reference tests share: ranks as threads joined by the TCP ring,
//! the synthetic caption batches, the comparison of two trainers' states, and (in
//! [`reference`]) the comparison of a training step's gradients with a Python reference.

pub mod reference;

use std::collections::HashMap;
use std::time::Duration;

use braid::collective::{RingCollective, RingListener};
use braid::trainer::{seeded, DeviceBatch};
use tch::{Device, Kind, Tensor};

/// Rank 0 of a ring of one.
pub fn single_rank() -> RingCollective {
    let (listener, endpoint) = RingListener::bind("127.0.0.1:0").unwrap();
    RingCollective::connect(listener, 0, 1, &[endpoint], 1, Duration::from_secs(60)).unwrap()
}

/// A global batch of `batch` samples drawn with libtorch's generator seeded by `seed`: random
/// 32x32 images, and `[CLS]` (2), 3 to 8 words with ids in `first_word..vocab`, `[SEP]` (3),
/// then `[PAD]` (0) up to `context` tokens; every sample valid, positions
/// `step * batch + i`.
pub fn caption_batch(seed: u64, step: u64, batch: i64, context: i64, vocab: i64, first_word: i64) -> DeviceBatch {
    seeded(seed, || {
        let words = Tensor::randint_low(first_word, vocab, [batch, context], (Kind::Int64, Device::Cpu));
        let lengths = Tensor::randint_low(3, 9, [batch], (Kind::Int64, Device::Cpu));
        let index = Tensor::arange(context, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let eot = &lengths + 1;
        let tokens = words
            .masked_fill(&index.eq(0), 2)
            .masked_fill(&index.eq_tensor(&eot.unsqueeze(1)), 3)
            .masked_fill(&index.gt_tensor(&eot.unsqueeze(1)), 0);
        DeviceBatch {
            images: Tensor::randn([batch, 3, 32, 32], (Kind::Double, Device::Cpu)),
            tokens,
            eot_index: eot,
            valid: Tensor::ones([batch], (Kind::Bool, Device::Cpu)),
            word_ids: None,
            positions: Tensor::arange_start(step as i64 * batch, (step as i64 + 1) * batch, (Kind::Int64, Device::Cpu)),
        }
    })
}

/// Runs `rank_main(rank, collective)` on `world_size` threads joined by the TCP ring (one
/// libtorch thread each); returns their results in rank order.
pub fn on_ring_ranks<T, F>(world_size: usize, rank_main: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize, &mut RingCollective) -> T + Send + Sync + 'static,
{
    let rank_main = std::sync::Arc::new(rank_main);
    let listeners: Vec<(RingListener, String)> = (0..world_size).map(|_| RingListener::bind("127.0.0.1:0").unwrap()).collect();
    let endpoints: Vec<String> = listeners.iter().map(|(_, e)| e.clone()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, (listener, _))| {
            let (endpoints, rank_main) = (endpoints.clone(), rank_main.clone());
            std::thread::spawn(move || {
                tch::set_num_threads(1);
                let mut coll = RingCollective::connect(listener, rank, world_size, &endpoints, 1, Duration::from_secs(60)).unwrap();
                rank_main(rank, &mut coll)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Attention key biases shift every score of a query by the same amount, which the softmax
/// ignores: their exact gradient is zero and the computed one is rounding noise, which Adam
/// normalises into full-size steps. They (and their moments and momentum copies) are the one
/// part of the state that depends on summation order, so they are left out of the comparison.
pub fn is_key_bias(name: &str) -> bool {
    name.ends_with("self.key.bias")
}

/// The largest difference between two states, relative to each tensor's largest magnitude in
/// `a`, and the tensor it is in (key biases left out, see [`is_key_bias`]).
pub fn max_relative_difference(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> (f64, String) {
    assert_eq!(a.len(), b.len(), "state sizes differ");
    let mut worst = (0.0, String::new());
    for (name, x) in a.iter().filter(|(name, _)| !is_key_bias(name)) {
        let y = b.get(name).unwrap_or_else(|| panic!("{name} missing"));
        let (x, y) = (x.to_kind(Kind::Double), y.to_kind(Kind::Double));
        let scale = x.abs().max().double_value(&[]).max(1e-12);
        let d = (&x - &y).abs().max().double_value(&[]) / scale;
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    worst
}

/// Trains a trainer from `make` for `steps` steps of `batch(step)` on one rank, then restores
/// its state into a fresh trainer from `make` (the path of a checkpoint resume and of the
/// live-recovery broadcast) and checks the two hash alike. Returns both and the rank's ring.
pub fn trained_and_restored(
    make: impl Fn() -> braid::trainer::Trainer,
    batch: impl Fn(u64) -> braid::trainer::DeviceBatch,
    steps: u64,
) -> (braid::trainer::Trainer, braid::trainer::Trainer, RingCollective) {
    let mut coll = single_rank();
    let mut trainer = make();
    for step in 0..steps {
        trainer.train_step(step, &batch(step), &mut coll).unwrap();
    }
    let saved: Vec<(String, Tensor)> = trainer.state().into_iter().map(|(n, t)| (n, t.copy())).collect();
    assert!(saved.iter().any(|(n, _)| n.starts_with("momentum.")) && saved.iter().any(|(n, _)| n == "queue.text.pointer"));
    let mut restored = make();
    assert_ne!(restored.replica_digest(), trainer.replica_digest());
    restored.load_state(saved, "the saved state").unwrap();
    assert_eq!(restored.replica_digest(), trainer.replica_digest(), "the restored state hashes like the original");
    (trainer, restored, coll)
}
