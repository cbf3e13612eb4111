//! ALBEF trained data-parallel equals ALBEF trained in one process: W = 1, 2 and 4 ranks
//! (threads joined by the TCP ring), fp64, 20 steps of a 16-sample global batch with momentum
//! encoders, 64-entry queues that wrap around three times, MLM masking and hard negatives drawn
//! over the whole global batch, end with the same parameters, optimizer moments, momentum weights
//! and queue contents (1e-9 relative), and every step draws the same hard negatives.
//! With per-worker negatives the ranks draw from their own batch, so the draws (and the run)
//! depend on W by design; the test checks that they stay inside each rank's slice.

// The shared test helpers; this test uses the ring of threads, the batches and the state
// comparison, not the reference comparison.
#[allow(dead_code)]
mod common;

use std::collections::HashMap;
use std::time::Duration;

use braid::collective::{RingCollective, RingListener};
use braid::data::mlm::MaskingVocab;
use braid::models::albef::AlbefConfig;
use braid::trainer::albef::DrawnNegatives;
use braid::trainer::{DeviceBatch, ModelSpec, Trainer};
use braid_coordinator::config::JobConfig;
use common::{caption_batch, max_relative_difference, on_ring_ranks, trained_and_restored};
use tch::{Device, Kind, Tensor};

const BATCH: i64 = 16;
const CONTEXT: i64 = 10;
const VOCAB: i64 = 40;
const STEPS: u64 = 20;

fn job(hard_negatives: &str) -> JobConfig {
    let text = format!(
        "[job]\nname = \"albef-dp\"\nseed = 5\n[data]\ntrain = \"unused\"\n\
         [model]\nfamily = \"albef\"\nqueue_size = 64\nhard_negatives = \"{hard_negatives}\"\nalpha_ramp_steps = 10\n\
         [train]\nglobal_batch = {BATCH}\nprecision = \"fp64\"\nsteps = {STEPS}\nwarmup_steps = 2\nlr = 1e-3\n"
    );
    JobConfig::parse(&text, "albef-dp").unwrap()
}

fn spec(config: &JobConfig) -> ModelSpec {
    let mut albef = AlbefConfig::preset("tiny", VOCAB, 0, None).unwrap();
    albef.queue_size = config.model.queue_size() as i64;
    // [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
    let vocab = MaskingVocab::new(4, VOCAB as usize, [0, 1, 2, 3]).unwrap();
    ModelSpec::Albef { config: albef, vocab, context_length: CONTEXT }
}

/// Global batch `step` (see [`caption_batch`]).
fn global_batch(step: u64) -> DeviceBatch {
    caption_batch(100 + step, step, BATCH, CONTEXT, VOCAB, 5)
}

/// What a run ends with: rank 0's whole state, and every step's draws of every rank.
struct Run {
    state: HashMap<String, Tensor>,
    negatives: Vec<Vec<DrawnNegatives>>,
    losses: Vec<f64>,
}

fn train(world_size: usize, hard_negatives: &str) -> Run {
    let hard_negatives = hard_negatives.to_string();
    let results = on_ring_ranks(world_size, move |rank, coll| {
        let config = job(&hard_negatives);
        let mut trainer = Trainer::new(&config, spec(&config), Device::Cpu).unwrap();
        let slot = BATCH / world_size as i64;
        let (mut negatives, mut losses) = (Vec::new(), Vec::new());
        for step in 0..STEPS {
            let batch = global_batch(step).narrow(rank as i64 * slot, slot);
            let stats = trainer.train_step(step, &batch, coll).unwrap();
            losses.push(stats.loss);
            negatives.push(trainer.albef().unwrap().last_negatives().to_vec());
        }
        let state: HashMap<String, Tensor> = trainer.state().into_iter().map(|(n, t)| (n, t.copy())).collect();
        (state, negatives, losses)
    });
    // Every step's draws of all ranks, in rank order (each rank's rows follow the previous ones').
    let negatives = (0..STEPS as usize).map(|step| results.iter().flat_map(|(_, n, _)| n[step].clone()).collect()).collect();
    let (state, _, losses) = results.into_iter().next().expect("rank 0");
    Run { state, negatives, losses }
}

#[test]
fn one_two_and_four_ranks_end_equal_with_global_hard_negatives() {
    let single = train(1, "global");
    assert!(single.losses.iter().all(|l| l.is_finite()));
    assert!(
        single.losses[STEPS as usize - 1] < single.losses[0],
        "the loss falls over the run: {:?}",
        single.losses
    );
    assert!(single.negatives.iter().all(|step| step.len() == BATCH as usize));
    for world_size in [2, 4] {
        let run = train(world_size, "global");
        let (worst, name) = max_relative_difference(&single.state, &run.state);
        println!("W={world_size}: largest relative difference {worst:e} ({name})");
        assert!(worst < 1e-9, "W={world_size}: {name} differs by {worst:e} (relative)");
        for key in ["queue.image.features", "queue.text.features", "queue.image.pointer", "momentum.visual.conv1.weight"] {
            assert!(run.state.contains_key(key), "the state holds {key}");
        }
        for (step, (a, b)) in single.negatives.iter().zip(&run.negatives).enumerate() {
            assert_eq!(a, b, "W={world_size} draws other hard negatives than W=1 at step {step}");
        }
        for (a, b) in single.losses.iter().zip(&run.losses) {
            assert!((a - b).abs() <= 1e-9 * a.abs(), "losses {a} vs {b}");
        }
    }
}

#[test]
fn per_worker_hard_negatives_stay_in_the_rank_batch() {
    let run = train(2, "per_worker");
    let slot = (BATCH / 2) as usize;
    for step in &run.negatives {
        for drawn in step {
            let own = (drawn.position % BATCH) as usize;
            for column in [drawn.text, drawn.image].into_iter().flatten() {
                assert!(column < slot, "a per-worker draw indexes its own rank's batch: {drawn:?}");
                assert_ne!(column, own % slot, "a sample is never its own negative: {drawn:?}");
            }
        }
    }
}

#[test]
fn a_restored_state_continues_exactly() {
    // Train 6 steps (the queues wrap), restore the state into a fresh trainer, then train both
    // 4 more steps.
    let config = job("global");
    let (mut trainer, mut restored, mut coll) =
        trained_and_restored(|| Trainer::new(&config, spec(&config), Device::Cpu).unwrap(), global_batch, 6);
    for step in 6..10 {
        let a = trainer.train_step(step, &global_batch(step), &mut coll).unwrap();
        let b = restored.train_step(step, &global_batch(step), &mut coll).unwrap();
        assert_eq!(a.loss, b.loss, "step {step}");
    }
    assert_eq!(restored.replica_digest(), trainer.replica_digest());

    let mut wrong = trainer.state();
    wrong.retain(|(n, _)| n != "queue.image.features");
    let err = restored.load_state(wrong, "a state without its image queue").unwrap_err().to_string();
    assert!(err.contains("queue.image.features") && err.contains("a state without its image queue"), "{err}");
}

#[test]
fn gradients_match_finite_differences() {
    // The step's gradient (leaves, gathered states, summed leaf gradients, backward through the
    // encoders) against central differences of the same loss, fp64, one rank, for parameters on
    // every path: the image encoder, the text encoder, the fusion layers, the heads, the temperature.
    let config = job("global");
    let (listener, endpoint) = RingListener::bind("127.0.0.1:0").unwrap();
    let mut coll = RingCollective::connect(listener, 0, 1, &[endpoint], 1, Duration::from_secs(60)).unwrap();
    let mut trainer = Trainer::new(&config, spec(&config), Device::Cpu).unwrap();
    let batch = global_batch(3);
    let params: HashMap<String, Tensor> = trainer.var_store().variables().into_iter().collect();
    // Step 12 is past the alpha ramp (distillation on). The distillation targets use the
    // temperature without autograd, as ALBEF computes them, so the temperature's gradient is the
    // derivative of the loss only where there are no soft targets: at step 0 (alpha 0).
    let cases = [
        ("visual.conv1.weight", [3i64, 1, 2, 5]),
        ("text.embeddings.word_embeddings.weight", [9, 4, 0, 0]),
        ("text.encoder.layer.0.attention.self.value.weight", [2, 7, 0, 0]),
        ("text.encoder.layer.3.crossattention.self.key.weight", [5, 1, 0, 0]),
        ("itm_head.weight", [1, 11, 0, 0]),
        ("mlm_head.transform.dense.weight", [6, 3, 0, 0]),
        ("vision_proj.weight", [4, 9, 0, 0]),
    ]
    .map(|(name, index)| (12, name, index));
    for (step, name, index) in cases.into_iter().chain([(0, "temp", [0, 0, 0, 0])]) {
        trainer.compute_gradients(step, &batch, &mut coll).unwrap();
        let grads: HashMap<String, Tensor> = trainer.named_grads().into_iter().map(|(n, g)| (n, g.copy())).collect();
        let p = &params[name];
        let at: Vec<i64> = index[..p.dim()].to_vec();
        let original = p.double_value(&at);
        let h = 1e-6;
        let mut loss_at = |value: f64| {
            tch::no_grad(|| {
                let mut target = at.iter().fold(p.shallow_clone(), |t, &i| t.get(i));
                let _ = target.fill_(value);
            });
            trainer.compute_gradients(step, &batch, &mut coll).unwrap().0
        };
        let numeric = (loss_at(original + h) - loss_at(original - h)) / (2.0 * h);
        loss_at(original);
        let analytic = grads[name].double_value(&at);
        let scale = numeric.abs().max(analytic.abs()).max(1e-8);
        println!("{name}{at:?}: analytic {analytic:.9e}, numeric {numeric:.9e}");
        assert!((analytic - numeric).abs() <= 1e-5 * scale + 1e-9, "{name}{at:?}: analytic {analytic:e} vs numeric {numeric:e}");
    }
}

#[test]
fn whole_word_masking_predicts_every_piece_of_a_chosen_word() {
    // Captions `[CLS] w0 w0 w1 w1 w2 w2 [SEP]`: each word is two pieces. With whole-word masking
    // the pieces of a word are predicted together, or neither is.
    let text = format!(
        "[job]\nname = \"wwm\"\nseed = 5\n[data]\ntrain = \"unused\"\n[model]\nfamily = \"albef\"\nqueue_size = 64\nwhole_word_masking = true\nmlm_probability = 0.5\n\
         [train]\nglobal_batch = {BATCH}\nprecision = \"fp64\"\n"
    );
    let config = JobConfig::parse(&text, "wwm").unwrap();
    let trainer = Trainer::new(&config, spec(&config), Device::Cpu).unwrap();
    let mut batch = global_batch(0);
    let words: Vec<i64> = (0..BATCH).flat_map(|_| [-1, 0, 0, 1, 1, 2, 2, -1, -1, -1]).collect();
    batch.word_ids = Some(Tensor::from_slice(&words).view([BATCH, CONTEXT]));
    batch.eot_index = Tensor::full([BATCH], 7, (Kind::Int64, Device::Cpu));
    let labels = trainer.albef().unwrap().mlm_labels(&batch).unwrap();
    let labels: Vec<i64> = Vec::<i64>::try_from(labels.flatten(0, -1)).unwrap();
    let mut chosen_words = 0;
    for row in labels.chunks(CONTEXT as usize) {
        for word in [1, 3, 5] {
            let (a, b) = (row[word] != -100, row[word + 1] != -100);
            assert_eq!(a, b, "the two pieces of a word are predicted together: {row:?}");
            chosen_words += usize::from(a);
        }
        assert!(row[0] == -100 && row[7] == -100, "special tokens are never predicted: {row:?}");
    }
    assert!(chosen_words > 0 && chosen_words < 3 * BATCH as usize, "{chosen_words} of {} words chosen", 3 * BATCH);

    batch.word_ids = None;
    let err = trainer.albef().unwrap().mlm_labels(&batch).unwrap_err().to_string();
    assert!(err.contains("whole_word_masking") && err.contains("word boundaries"), "{err}");
}
