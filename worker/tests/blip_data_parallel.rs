//! BLIP trained data-parallel equals BLIP trained in one process: W = 1, 2 and 4 ranks (threads
//! joined by the TCP ring), fp64, 20 steps of a 16-sample global batch with momentum encoders,
//! 64-entry queues filled five times over, a sample that failed to load every other step,
//! and hard negatives drawn over the whole global batch (negative captions re-encoded from their
//! gathered token ids), end with the same parameters, optimizer moments, momentum weights and
//! queue contents (1e-9 relative), with the same losses and the same drawn negatives at every
//! step. The LM term is checked against label-smoothed cross-entropy written out here on the
//! model's own logits, at W = 1, 2 and 4 (the mean over the global batch's tokens). With
//! per-worker negatives the ranks draw from their own batch, so the draws depend on W by design;
//! the test checks that they stay inside each rank's slice. Also: a restored state continues
//! exactly, bf16 ranks stay replicas with global negatives, and the model spec takes BLIP's
//! special tokens from the tokenizer.

// The shared test helpers; this test uses the ring of threads, the batches and the state
// comparison, not the reference comparison.
#[allow(dead_code)]
mod common;

use std::collections::HashMap;

use braid::models::blip::{Blip, BlipConfig, BlipTokens};
use braid::trainer::blip::{lm_loss_sum, lm_targets, with_first_token, DrawnNegatives};
use braid::trainer::{DeviceBatch, ModelSpec, Trainer};
use braid_coordinator::config::JobConfig;
use common::{caption_batch, max_relative_difference, on_ring_ranks, trained_and_restored};
use tch::{Device, Kind, Tensor};

const BATCH: i64 = 16;
const CONTEXT: i64 = 10;
const VOCAB: i64 = 40;
const STEPS: u64 = 20;
/// [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, [DEC]=5, [ENC]=6, words from 7.
const TOKENS: BlipTokens = BlipTokens { bos_token_id: 5, enc_token_id: 6, sep_token_id: 3, pad_token_id: 0 };
const LABEL_SMOOTHING: f64 = 0.1;

fn job(hard_negatives: &str) -> JobConfig {
    job_in(hard_negatives, "fp64")
}

fn job_in(hard_negatives: &str, precision: &str) -> JobConfig {
    let text = format!(
        "[job]\nname = \"blip-dp\"\nseed = 7\n[data]\ntrain = \"unused\"\n\
         [model]\nfamily = \"blip\"\npreset = \"tiny\"\nqueue_size = 64\nhard_negatives = \"{hard_negatives}\"\nalpha_ramp_steps = 10\n\
         [train]\nglobal_batch = {BATCH}\nprecision = \"{precision}\"\nsteps = {STEPS}\nwarmup_steps = 2\nlr = 1e-3\n"
    );
    JobConfig::parse(&text, "blip-dp").unwrap()
}

fn spec(config: &JobConfig) -> ModelSpec {
    let mut blip = BlipConfig::preset("tiny", VOCAB, TOKENS, Some(CONTEXT)).unwrap();
    blip.queue_size = config.model.queue_size() as i64;
    ModelSpec::Blip { config: blip, context_length: CONTEXT }
}

/// Global batch `step` ([`caption_batch`]; its `[SEP]` 3 and `[PAD]` 0 are `TOKENS'`); at odd
/// steps sample 5 failed to load (zero image and tokens, not valid).
fn global_batch(step: u64) -> DeviceBatch {
    const _: () = assert!(TOKENS.sep_token_id == 3 && TOKENS.pad_token_id == 0);
    let batch = caption_batch(100 + step, step, BATCH, CONTEXT, VOCAB, 7);
    if step % 2 == 1 {
        let _ = batch.tokens.get(5).fill_(0);
        let _ = batch.eot_index.get(5).fill_(0);
        let _ = batch.images.get(5).fill_(0.0);
        let _ = batch.valid.get(5).fill_(0);
    }
    batch
}

/// What a run ends with: rank 0's whole state, every step's draws of every rank, losses and
/// the LM term.
struct Run {
    state: HashMap<String, Tensor>,
    negatives: Vec<Vec<DrawnNegatives>>,
    losses: Vec<f64>,
    lm: Vec<f64>,
}

fn train(world_size: usize, hard_negatives: &str) -> Run {
    let hard_negatives = hard_negatives.to_string();
    let results = on_ring_ranks(world_size, move |rank, coll| {
        let config = job(&hard_negatives);
        let mut trainer = Trainer::new(&config, spec(&config), Device::Cpu).unwrap();
        let slot = BATCH / world_size as i64;
        let (mut negatives, mut losses, mut lm) = (Vec::new(), Vec::new(), Vec::new());
        for step in 0..STEPS {
            let batch = global_batch(step).narrow(rank as i64 * slot, slot);
            let stats = trainer.train_step(step, &batch, coll).unwrap();
            losses.push(stats.loss);
            let names: Vec<&str> = stats.parts.iter().map(|(n, _)| *n).collect();
            assert_eq!(names, ["itc", "itm", "lm"]);
            let parts: f64 = stats.parts.iter().map(|(_, v)| v).sum();
            assert!((parts - stats.loss).abs() <= 1e-12 * stats.loss.abs(), "the parts add up to the loss");
            lm.push(stats.parts[2].1);
            negatives.push(trainer.blip().unwrap().last_negatives().to_vec());
        }
        let state: HashMap<String, Tensor> = trainer.state().into_iter().map(|(n, t)| (n, t.copy())).collect();
        (state, negatives, losses, lm)
    });
    // Every step's draws of all ranks, in rank order (each rank's rows follow the previous ones').
    let negatives = (0..STEPS as usize).map(|step| results.iter().flat_map(|(_, n, _, _)| n[step].clone()).collect()).collect();
    let (state, _, losses, lm) = results.into_iter().next().expect("rank 0");
    Run { state, negatives, losses, lm }
}


/// BLIP's LM loss written out: at every position `i` whose next token is a real token of a
/// valid caption, `(1 - eps) * (-log p_i(y)) + eps * mean_v(-log p_i(v))` with
/// `log p = z - logsumexp(z)`, averaged over those positions (torch's
/// `cross_entropy(label_smoothing=eps)` with padding ignored).
fn label_smoothed_lm(logits: &Tensor, decoder_ids: &Tensor, attention_mask: &Tensor, valid: &Tensor) -> f64 {
    let (b, l, v) = logits.size3().unwrap();
    let z = Vec::<f64>::try_from(logits.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    let ids = Vec::<i64>::try_from(decoder_ids.flatten(0, -1)).unwrap();
    let mask = Vec::<i64>::try_from(attention_mask.flatten(0, -1)).unwrap();
    let valid = Vec::<bool>::try_from(valid).unwrap();
    let (b, l, v) = (b as usize, l as usize, v as usize);
    let (mut sum, mut count) = (0.0, 0usize);
    for row in (0..b).filter(|&r| valid[r]) {
        for i in 0..l - 1 {
            if mask[row * l + i + 1] == 0 {
                continue;
            }
            let z = &z[(row * l + i) * v..(row * l + i + 1) * v];
            let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + z.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            let target = ids[row * l + i + 1] as usize;
            let nll = lse - z[target];
            let uniform = z.iter().map(|x| lse - x).sum::<f64>() / v as f64;
            sum += (1.0 - LABEL_SMOOTHING) * nll + LABEL_SMOOTHING * uniform;
            count += 1;
        }
    }
    sum / count as f64
}

/// The LM loss of `model` on global batch `step`, written out on its logits.
fn expected_lm(model: &Blip, step: u64) -> f64 {
    let batch = global_batch(step);
    let mask = batch.attention_mask();
    let decoder_ids = with_first_token(&batch.tokens, TOKENS.bos_token_id);
    let logits = tch::no_grad(|| model.decoder_logits(&decoder_ids, &mask, &model.encode_image(&batch.images)));
    label_smoothed_lm(&logits, &decoder_ids, &mask, &batch.valid)
}

#[test]
fn one_two_and_four_ranks_end_equal_with_global_hard_negatives() {
    let config = job("global");
    let fresh = Trainer::new(&config, spec(&config), Device::Cpu).unwrap();
    let lm_at_start = expected_lm(&fresh.blip().unwrap().model, 0);
    let single = train(1, "global");
    assert!(single.losses.iter().all(|l| l.is_finite()));
    assert!(single.losses[STEPS as usize - 1] < single.losses[0], "the loss falls over the run: {:?}", single.losses);
    for (step, drawn) in single.negatives.iter().enumerate() {
        let valid = if step % 2 == 1 { BATCH - 1 } else { BATCH };
        assert_eq!(drawn.len(), valid as usize, "step {step}: a draw per valid sample");
        assert!(drawn.iter().all(|d| d.text.is_some() && d.image.is_some()), "BLIP's +1e-4 leaves every sample a negative");
        assert!(drawn.iter().all(|d| d.position % BATCH != 5 || step % 2 == 0), "no draw for the sample that failed to load");
    }
    for world_size in [2, 4] {
        let run = train(world_size, "global");
        let (worst, name) = max_relative_difference(&single.state, &run.state);
        println!("W={world_size}: largest relative difference {worst:e} ({name})");
        assert!(worst < 1e-9, "W={world_size}: {name} differs by {worst:e} (relative)");
        for key in [
            "queue.image.features",
            "queue.text.features",
            "queue.image.valid",
            "queue.text.pointer",
            "momentum.visual.conv1.weight",
            "momentum.text.encoder.layer.0.attention.self.query.weight",
            "momentum.text_proj.weight",
        ] {
            assert!(run.state.contains_key(key), "the state holds {key}");
        }
        for key in ["momentum.text.encoder.layer.0.crossattention.self.query.weight", "momentum.lm_head.bias", "momentum.itm_head.weight"] {
            assert!(!run.state.contains_key(key), "{key} has no momentum copy");
        }
        for (step, (a, b)) in single.negatives.iter().zip(&run.negatives).enumerate() {
            assert_eq!(a, b, "W={world_size} draws other hard negatives than W=1 at step {step}");
        }
        let mut worst_loss: f64 = 0.0;
        for (a, b) in single.losses.iter().zip(&run.losses).chain(single.lm.iter().zip(&run.lm)) {
            worst_loss = worst_loss.max((a - b).abs() / a.abs());
        }
        println!("W={world_size}: largest relative loss difference {worst_loss:e}");
        assert!(worst_loss <= 1e-9, "W={world_size}: losses differ by {worst_loss:e}");
        let d = (run.lm[0] - lm_at_start).abs() / lm_at_start;
        assert!(d < 1e-12, "W={world_size}: LM term {} vs label-smoothed CE written out {lm_at_start} ({d:e})", run.lm[0]);
    }
    let d = (single.lm[0] - lm_at_start).abs() / lm_at_start;
    println!("LM term at step 0: {} vs written out {lm_at_start} ({d:e} relative)", single.lm[0]);
    assert!(d < 1e-12, "W=1: LM term {} vs label-smoothed CE written out {lm_at_start}", single.lm[0]);
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
    assert!(run.losses.iter().all(|l| l.is_finite()));
}

#[test]
fn lm_term_is_label_smoothed_cross_entropy_over_the_caption_tokens() {
    let config = job("per_worker");
    let trainer = Trainer::new(&config, spec(&config), Device::Cpu).unwrap();
    let model = &trainer.blip().unwrap().model;
    for step in [0, 1] {
        let batch = global_batch(step);
        let mask = batch.attention_mask();
        let decoder_ids = with_first_token(&batch.tokens, TOKENS.bos_token_id);
        assert_eq!(Vec::<i64>::try_from(decoder_ids.select(1, 0)).unwrap(), vec![5; BATCH as usize], "[DEC] replaces [CLS]");
        assert_eq!(decoder_ids.narrow(1, 1, CONTEXT - 1), batch.tokens.narrow(1, 1, CONTEXT - 1));
        let logits = tch::no_grad(|| model.decoder_logits(&decoder_ids, &mask, &model.encode_image(&batch.images)));
        let expected = label_smoothed_lm(&logits, &decoder_ids, &mask, &batch.valid);
        let predicted = lm_targets(&mask, &batch.valid);
        let count = predicted.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]);
        let lengths = Vec::<i64>::try_from(&batch.eot_index).unwrap();
        let valid = Vec::<bool>::try_from(&batch.valid).unwrap();
        let tokens: i64 = lengths.iter().zip(&valid).filter(|(_, v)| **v).map(|(eot, _)| eot).sum();
        assert_eq!(count, tokens, "the LM predicts every token after [DEC] up to [SEP] of the valid captions");
        let sum = lm_loss_sum(&logits, &decoder_ids, &predicted, LABEL_SMOOTHING, Kind::Double).double_value(&[]);
        let got = sum / count as f64;
        assert!((got - expected).abs() < 1e-12 * expected, "step {step}: {got} vs {expected}");
        if step == 0 {
            // Every caption valid: the model's own mean (fp32) is the same loss.
            let mean = model.lm_loss(&logits, &decoder_ids, &mask).double_value(&[]);
            assert!((mean - expected).abs() < 1e-5 * expected, "Blip::lm_loss {mean} vs {expected}");
        }
    }
}

#[test]
fn the_model_spec_takes_blip_tokens_from_the_tokenizer() {
    use braid::data::synth::{write_tokenizer_style, TokenizerStyle};
    use braid::data::tokenizer::load_tokenizer;
    let dir = tempfile::tempdir().unwrap();
    let config = |extra: &str| JobConfig::parse(&format!("[job]\nname = \"blip-spec\"\n[data]\ntrain = \"unused\"\n[model]\nfamily = \"blip\"\n{extra}"), "blip-spec").unwrap();

    let bert = dir.path().join("tokenizer-bert.json");
    write_tokenizer_style(&bert, TokenizerStyle::Bert).unwrap();
    let tokenizer = load_tokenizer(&bert.display().to_string()).unwrap();
    let spec = braid::trainer::model_spec(&config("queue_size = 256\nmomentum = 0.99\nalpha = 0.3\n"), tokenizer.as_ref()).unwrap();
    let ModelSpec::Blip { config: blip, context_length } = spec else { panic!("not BLIP: {spec:?}") };
    assert_eq!((blip.bos_token_id, blip.enc_token_id, blip.sep_token_id, blip.pad_token_id), (5, 6, 3, 0));
    assert_eq!((blip.queue_size, blip.momentum, blip.alpha), (256, 0.99, 0.3), "the job's [model] keys apply");
    assert_eq!((context_length, blip.context_length), (32, 32), "tiny's default context");
    assert_eq!(blip.text.vocab_size, tokenizer.vocab_size() as i64);
    let spec = braid::trainer::model_spec(&config("context_length = 12\n"), tokenizer.as_ref()).unwrap();
    assert_eq!((spec.family(), spec.context_length(), spec.image_size()), ("blip", 12, 32));
    assert!(spec.forward_flops_per_sample() > 0.0);
    let err = braid::trainer::model_spec(&config("context_length = 65\n"), tokenizer.as_ref()).unwrap_err().to_string();
    assert!(err.contains("model.context_length") && err.contains("65") && err.contains("64 position embeddings"), "{err}");

    let clip_style = dir.path().join("tokenizer.json");
    write_tokenizer_style(&clip_style, TokenizerStyle::Clip).unwrap();
    let tokenizer = load_tokenizer(&clip_style.display().to_string()).unwrap();
    let err = braid::trainer::model_spec(&config(""), tokenizer.as_ref()).unwrap_err().to_string();
    assert!(err.contains("[DEC], [ENC], [SEP]") && err.contains(&clip_style.display().to_string()), "{err}");
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
        assert_eq!(trainer.blip().unwrap().last_negatives(), restored.blip().unwrap().last_negatives());
    }
    assert_eq!(restored.replica_digest(), trainer.replica_digest());
    assert_eq!(trainer.blip().unwrap().text_queue().pointer, (10 * BATCH) % 64);

    let mut wrong = trainer.state();
    wrong.retain(|(n, _)| n != "momentum.text_proj.weight");
    let err = restored.load_state(wrong, "a state without a momentum tensor").unwrap_err().to_string();
    assert!(err.contains("momentum.text_proj.weight") && err.contains("a state without a momentum tensor"), "{err}");
}

#[test]
fn bf16_ranks_stay_replicas_with_global_negatives() {
    // bf16 compute, fp32 master weights; the negatives' token ids travel as fp32.
    let world_size = 2;
    let results = on_ring_ranks(world_size, move |rank, coll| {
        let config = job_in("global", "bf16");
        let mut trainer = Trainer::new(&config, spec(&config), Device::Cpu).unwrap();
        let slot = BATCH / world_size as i64;
        let losses: Vec<f64> = (0..3)
            .map(|step| {
                let batch = global_batch(step).narrow(rank as i64 * slot, slot);
                let batch = DeviceBatch { images: batch.images.to_kind(Kind::Float), ..batch };
                trainer.train_step(step, &batch, coll).unwrap().loss
            })
            .collect();
        (losses, trainer.replica_digest(), trainer.blip().unwrap().last_negatives().len())
    });
    assert!(results[0].0.iter().all(|l| l.is_finite()), "{:?}", results[0].0);
    assert_eq!(results[0].0, results[1].0, "every rank reports the global loss");
    assert_eq!(results[0].1, results[1].1, "the ranks' parameters, momentum encoders and queues agree");
    assert_eq!(results[0].2 + results[1].2, BATCH as usize, "a draw per sample of the last step");
}

#[test]
fn alpha_ramps_over_two_epochs_unless_configured() {
    let text = format!(
        "[job]\nname = \"blip-alpha\"\n[data]\ntrain = \"unused\"\n[model]\nfamily = \"blip\"\nqueue_size = 64\n\
         [train]\nglobal_batch = {BATCH}\nprecision = \"fp64\"\n"
    );
    let config = JobConfig::parse(&text, "blip-alpha").unwrap();
    let mut trainer = Trainer::new(&config, spec(&config), Device::Cpu).unwrap();
    trainer.set_epoch_steps(10);
    let alpha: Vec<f64> = [0, 10, 20, 30].iter().map(|&s| trainer.blip().unwrap().alpha_at(s)).collect();
    assert_eq!(alpha, [0.0, 0.2, 0.4, 0.4], "BLIP's alpha * min(1, step / (2 * steps per epoch))");
    let configured = job("global");
    let mut trainer = Trainer::new(&configured, spec(&configured), Device::Cpu).unwrap();
    trainer.set_epoch_steps(1000);
    assert_eq!(trainer.blip().unwrap().alpha_at(5), 0.2, "alpha_ramp_steps = 10 wins");
}
