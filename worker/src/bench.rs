//! `braid bench`: training-step throughput of a model preset on synthetic tensors: the full
//! step (forward, loss, backward, gradient reduction, clipping, AdamW and what the family does
//! after the update), timed after warm-up, with the median step time, samples/s, tokens/s and
//! model FLOPs utilisation.
//!
//! CLIP trains on random token ids. ALBEF and BLIP train on BERT-style captions
//! ([`bert_captions`]) with their whole pretraining step: the momentum model's forward passes,
//! distilled ITC against the feature queues, ITM on per-worker hard negatives, ALBEF's MLM with
//! the momentum model's soft labels or BLIP's captioning LM, and after the update the momentum
//! update and the enqueue. `bench/momentum_step.py` times the same step in the reference
//! implementations (`bench/cpu_momentum.sh` compares them).

use std::time::Instant;

use braid_coordinator::config::JobConfig;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::collective::{RingCollective, RingListener};
use crate::data::mlm::MaskingVocab;
use crate::models::albef::AlbefConfig;
use crate::models::bert::BertConfig;
use crate::models::blip::{BlipConfig, BlipTokens};
use crate::models::vit::VitConfig;
use crate::trainer::{clip_config, DeviceBatch, ModelSpec, TrainError, Trainer};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Model family: `clip`, `albef`, `blip`.
    pub family: String,
    /// Preset of the family.
    pub preset: String,
    /// Samples per step.
    pub batch: usize,
    /// Intra-op threads (CPU); 0 keeps libtorch's default.
    pub threads: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed warm-up steps.
    pub warmup: usize,
    /// Device.
    pub device: Device,
    /// `fp32`, `fp64` or `bf16`.
    pub precision: String,
    /// Text vocabulary size (CLIP BPE: 49,408; BERT: 30,522).
    pub vocab_size: i64,
    /// Caption length in tokens; none keeps the preset's (ALBEF and BLIP: `tiny` 32, `base` 30).
    pub context_length: Option<i64>,
    /// ALBEF/BLIP: length of each feature queue, a multiple of `batch`; none takes the job
    /// default (`tiny` 1,024, ALBEF `base` 65,536, BLIP `base` 57,600) rounded up to a multiple
    /// of `batch`.
    pub queue_size: Option<usize>,
    /// Peak dense TFLOP/s of the device for MFU; none leaves MFU out.
    pub peak_tflops: Option<f64>,
    /// Record the loss of every timed step.
    pub record_losses: bool,
    /// Recompute each transformer block's activations in the backward pass.
    pub activation_checkpointing: bool,
    /// Capture the step as a CUDA graph and time its replays (`train.cuda_graph`).
    pub cuda_graph: bool,
    /// Where to write a profiler trace of a few extra steps, if anywhere.
    pub trace: Option<std::path::PathBuf>,
    /// Reference weights to start from (as `[model] init_from` takes them), instead of braid's
    /// initialisation.
    pub init_from: Option<String>,
}

/// Measured throughput.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Implementation measured (`braid`).
    pub r#impl: String,
    /// Model family (left out of the JSON for CLIP, whose output predates the other families).
    #[serde(skip_serializing_if = "is_clip")]
    pub family: String,
    /// Model preset.
    pub preset: String,
    /// Samples per step.
    pub batch: usize,
    /// Threads used.
    pub threads: usize,
    /// Device.
    pub device: String,
    /// Precision.
    pub precision: String,
    /// Median seconds per optimizer step.
    pub step_seconds: f64,
    /// Samples per second at the median step.
    pub samples_per_second: f64,
    /// Text tokens per second at the median step.
    pub tokens_per_second: f64,
    /// Model FLOPs per step (forward and backward, 3x forward).
    pub flops_per_step: f64,
    /// Achieved TFLOP/s.
    pub tflops: f64,
    /// Model FLOPs utilisation against `peak_tflops`, if given.
    pub mfu: Option<f64>,
    /// Most bytes held by tensors during the timed steps (CUDA only; libtorch's caching
    /// allocator, as `torch.cuda.max_memory_allocated`).
    pub peak_memory_bytes: Option<u64>,
    /// Most bytes the caching allocator reserved from the device during the timed steps
    /// (CUDA only; `torch.cuda.max_memory_reserved`).
    pub peak_reserved_bytes: Option<u64>,
    /// Median seconds of the update alone (clipping, AdamW, logit-scale clamp), on the CPU
    /// (on a GPU, timing it would need a wait for the device inside the step).
    pub update_seconds: Option<f64>,
    /// Whether the transformer blocks' activations were recomputed in the backward pass.
    pub activation_checkpointing: bool,
    /// Whether the last timed step was a replay of a captured CUDA graph (the first two steps
    /// after start run eagerly; false when asked for but the capture failed: the log says why).
    pub cuda_graph: bool,
    /// Loss of every timed step, when asked for (to compare precisions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub losses: Option<Vec<f64>>,
    /// ALBEF/BLIP: the loss terms (`itc`, `itm`, `mlm`, ...) of the last timed step.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loss_terms: Vec<(String, f64)>,
    /// ALBEF/BLIP: median CPU seconds (user and system, all threads) per step, which other
    /// processes on a shared machine disturb less than `step_seconds`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    /// ALBEF/BLIP: the model's shape, caption length, vocabulary and queue length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub momentum_shape: Option<MomentumShape>,
}

/// The shape an ALBEF/BLIP benchmark ran, as `bench/momentum_step.py` reports its own (the
/// driver refuses to compare runs whose shapes differ).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MomentumShape {
    /// Input resolution (square).
    pub image_size: i64,
    /// Patch size of the image encoder.
    pub patch_size: i64,
    /// Image encoder width.
    pub vision_width: i64,
    /// Image encoder layers.
    pub vision_layers: i64,
    /// Image encoder heads.
    pub vision_heads: i64,
    /// Text model width.
    pub text_width: i64,
    /// Text model heads.
    pub text_heads: i64,
    /// Text model feed-forward width.
    pub intermediate_size: i64,
    /// Text layers without cross-attention (ALBEF's text encoder; 0 for BLIP's MED).
    pub text_layers: i64,
    /// Text layers with cross-attention to the image (ALBEF's fusion encoder, BLIP's MED).
    pub cross_layers: i64,
    /// Size of the contrastive features.
    pub embed_dim: i64,
    /// Caption length in tokens.
    pub context_length: i64,
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Length of each feature queue.
    pub queue_size: usize,
}

impl MomentumShape {
    fn new(vision: &VitConfig, text: &BertConfig, embed_dim: i64, context_length: i64, queue_size: usize) -> Self {
        let t = &vision.transformer;
        let k = text.cross_attention_from_layer.unwrap_or(text.num_hidden_layers);
        Self {
            image_size: vision.image_size,
            patch_size: vision.patch_size,
            vision_width: t.width,
            vision_layers: t.layers,
            vision_heads: t.heads,
            text_width: text.hidden_size,
            text_heads: text.num_attention_heads,
            intermediate_size: text.intermediate_size,
            text_layers: k as i64,
            cross_layers: text.num_hidden_layers as i64 - k as i64,
            embed_dim,
            context_length,
            vocab_size: text.vocab_size,
            queue_size,
        }
    }
}

fn is_clip(family: &str) -> bool {
    family == "clip"
}

fn bench_config(options: &BenchOptions, queue_size: Option<usize>) -> Result<JobConfig, TrainError> {
    let queue = queue_size.map_or(String::new(), |q| format!("queue_size = {q}\n"));
    let text = format!(
        "[job]\nname = \"bench\"\n[model]\nfamily = \"{}\"\npreset = \"{}\"\n{queue}[data]\ntrain = \"unused\"\n\
         [train]\nglobal_batch = {}\nsteps = {}\nprecision = \"{}\"\nwarmup_steps = 1\nactivation_checkpointing = {}\ncuda_graph = {}\n",
        options.family,
        options.preset,
        options.batch,
        options.steps + options.warmup + TRACED_STEPS,
        options.precision,
        options.activation_checkpointing,
        options.cuda_graph
    );
    let config = JobConfig::parse(&text, "bench").and_then(|c| c.validate("bench options").map(|()| c));
    config.map_err(|e| TrainError::State { origin: "bench options".into(), reason: e.to_string() })
}

/// Reads the parts back and checks they hold exactly `state`.
fn verify_checkpoint(
    store: &crate::checkpoint::CheckpointStore,
    parts: &[crate::checkpoint::PartInfo],
    state: &[(String, Tensor)],
) -> Result<(), Box<dyn std::error::Error>> {
    let mut saved = std::collections::HashMap::new();
    for part in parts {
        saved.extend(store.read_part(part)?);
    }
    for (name, live) in state {
        let copy = saved.get(name).ok_or_else(|| format!("the checkpoint lacks {name}"))?;
        if !copy.equal(&live.to_device(Device::Cpu)) {
            return Err(format!("the checkpoint's {name} differs from the state it was taken of").into());
        }
    }
    Ok(())
}

/// A fixed batch of random images and token sequences (end token last).
fn synthetic_batch(batch: usize, image_size: i64, context: i64, vocab_size: i64, device: Device, kind: Kind) -> DeviceBatch {
    let b = batch as i64;
    crate::trainer::seeded(0, || DeviceBatch {
        images: Tensor::randn([b, 3, image_size, image_size], (Kind::Float, device)).to_kind(kind),
        tokens: Tensor::randint_low(1, vocab_size - 1, [b, context], (Kind::Int64, device)),
        eot_index: Tensor::full([b], context - 1, (Kind::Int64, device)),
        valid: Tensor::ones([b], (Kind::Bool, device)),
        word_ids: None,
        positions: Tensor::arange(b, (Kind::Int64, Device::Cpu)),
    })
}

/// BERT-style special ids of the synthetic captions: `[PAD]` 0, `[UNK]` 1, `[CLS]` 2, `[SEP]` 3,
/// `[MASK]` 4, `[DEC]` 5, `[ENC]` 6 (BLIP's decoder and encoder tokens); words are the ids from 7.
pub const BERT_SPECIAL_IDS: [i64; 7] = [0, 1, 2, 3, 4, 5, 6];
/// `[MASK]` of the synthetic captions.
pub const MASK_ID: i64 = 4;
const FIRST_WORD: i64 = 7;

/// `batch` synthetic captions of `context` tokens: row `i` is `[CLS]`, `n_i` words, `[SEP]`, then
/// `[PAD]`s, with `n_i = lo + (5 i mod (hi - lo + 1))` for `lo = max(1, (context - 2) / 2)` and
/// `hi = context - 2`, and word `j` of row `i` the id `7 + ((131 i + 31 j) mod (vocab_size - 7))`.
/// A pure function of the shape, so `bench/momentum_step.py` builds the same batch. Returns the
/// token ids `[batch, context]` and each row's `[SEP]` position `[batch]`.
pub fn bert_captions(batch: usize, context: i64, vocab_size: i64) -> (Vec<i64>, Vec<i64>) {
    let (lo, hi) = (((context - 2) / 2).max(1), context - 2);
    let words = vocab_size - FIRST_WORD;
    let mut tokens = Vec::with_capacity(batch * context as usize);
    let mut eot = Vec::with_capacity(batch);
    for i in 0..batch as i64 {
        let n = lo + (5 * i) % (hi - lo + 1);
        tokens.push(2);
        tokens.extend((0..n).map(|j| FIRST_WORD + (131 * i + 31 * j) % words));
        tokens.push(3);
        tokens.extend(std::iter::repeat_n(0, (context - 2 - n) as usize));
        eot.push(n + 1);
    }
    (tokens, eot)
}

/// A fixed batch of random images and [`bert_captions`].
fn caption_batch(batch: usize, image_size: i64, context: i64, vocab_size: i64, device: Device, kind: Kind) -> DeviceBatch {
    let b = batch as i64;
    let (tokens, eot) = bert_captions(batch, context, vocab_size);
    let images = crate::trainer::seeded(0, || Tensor::randn([b, 3, image_size, image_size], (Kind::Float, device)));
    DeviceBatch {
        images: images.to_kind(kind),
        tokens: Tensor::from_slice(&tokens).view([b, context]).to_device(device),
        eot_index: Tensor::from_slice(&eot).to_device(device),
        valid: Tensor::ones([b], (Kind::Bool, device)),
        word_ids: None,
        positions: Tensor::arange(b, (Kind::Int64, Device::Cpu)),
    }
}

/// Gives the fixed batch the sample positions of global step `step` (`step * batch` onwards),
/// as a job's data plan would: masking and negative draws hash the positions, so each step
/// masks and draws anew, as in training and in the reference scripts, rather than repeating
/// step 0's.
fn as_step(batch: &mut DeviceBatch, step: usize) {
    let b = batch.len() as i64;
    batch.positions = Tensor::arange_start(step as i64 * b, (step as i64 + 1) * b, (Kind::Int64, Device::Cpu));
}

/// What a benchmark trains: the job, the model, the ALBEF/BLIP shape, and the forward FLOPs
/// of one sample.
struct Setup {
    config: JobConfig,
    spec: ModelSpec,
    momentum_shape: Option<MomentumShape>,
    flops_per_sample: f64,
}

/// The job and model of a benchmark.
fn setup(options: &BenchOptions) -> Result<Setup, TrainError> {
    let invalid = |reason: String| TrainError::State { origin: "bench options".into(), reason };
    match options.family.as_str() {
        "clip" => {
            let config = bench_config(options, None)?;
            let clip = clip_config(&config, options.vocab_size)?;
            Ok(Setup { config, spec: ModelSpec::Clip(clip), momentum_shape: None, flops_per_sample: clip.forward_flops_per_sample() })
        }
        "albef" => {
            if options.vocab_size <= FIRST_WORD {
                return Err(invalid(format!("--vocab-size {} leaves no words after the 7 special ids", options.vocab_size)));
            }
            let queue_size = momentum_queue_size(options, "albef")?;
            let config = bench_config(options, Some(queue_size))?;
            let mut albef = AlbefConfig::preset(&options.preset, options.vocab_size, 0, None)?;
            let default_context = if options.preset == "tiny" { 32 } else { 30 };
            let context_length = options.context_length.unwrap_or(default_context);
            if !(3..=albef.text.max_position_embeddings).contains(&context_length) {
                return Err(invalid(format!(
                    "--context-length {context_length}: albef {} takes 3 to {} tokens",
                    options.preset, albef.text.max_position_embeddings
                )));
            }
            let m = &config.model;
            albef.queue_size = queue_size as i64;
            albef.momentum = m.momentum;
            albef.alpha = m.alpha;
            albef.mlm_probability = m.mlm_probability;
            let special = BERT_SPECIAL_IDS.into_iter().filter(|&id| id != MASK_ID);
            let vocab = MaskingVocab::new(MASK_ID, options.vocab_size as usize, special).map_err(|e| invalid(e.to_string()))?;
            let shape = MomentumShape::new(&albef.vision, &albef.text, albef.embed_dim, context_length, queue_size);
            // `AlbefConfig::forward_flops_per_sample` counts `max_position_embeddings` tokens per
            // caption: count the captions' length instead.
            let mut counted = albef;
            counted.text.max_position_embeddings = context_length;
            let flops_per_sample = counted.forward_flops_per_sample();
            let spec = ModelSpec::Albef { config: albef, vocab, context_length };
            Ok(Setup { config, spec, momentum_shape: Some(shape), flops_per_sample })
        }
        "blip" => {
            if options.vocab_size <= FIRST_WORD {
                return Err(invalid(format!("--vocab-size {} leaves no words after the 7 special ids", options.vocab_size)));
            }
            let queue_size = momentum_queue_size(options, "blip")?;
            let config = bench_config(options, Some(queue_size))?;
            let special = BlipTokens { bos_token_id: 5, enc_token_id: 6, sep_token_id: 3, pad_token_id: 0 };
            let mut blip = BlipConfig::preset(&options.preset, options.vocab_size, special, options.context_length)?;
            let m = &config.model;
            blip.queue_size = queue_size as i64;
            blip.momentum = m.momentum;
            blip.alpha = m.alpha;
            blip.validate().map_err(|problems| invalid(format!("blip {}: {problems}", options.preset)))?;
            let context_length = blip.context_length;
            let shape = MomentumShape::new(&blip.vision, &blip.text, blip.embed_dim, context_length, queue_size);
            let flops_per_sample = blip.forward_flops_per_sample();
            Ok(Setup { config, spec: ModelSpec::Blip { config: blip, context_length }, momentum_shape: Some(shape), flops_per_sample })
        }
        other => Err(invalid(format!("--family {other:?}: braid bench knows clip, albef and blip"))),
    }
}

/// `--queue-size`, checked against the batch, or the job default rounded up to a multiple of it.
fn momentum_queue_size(options: &BenchOptions, family: &str) -> Result<usize, TrainError> {
    let batch = options.batch.max(1);
    match options.queue_size {
        Some(q) if q == 0 || !q.is_multiple_of(batch) => Err(TrainError::State {
            origin: "bench options".into(),
            reason: format!("--queue-size {q} is not a positive multiple of --batch {batch}: every step enqueues the whole batch"),
        }),
        Some(q) => Ok(q),
        None => {
            let section = braid_coordinator::config::ModelSection {
                family: family.into(),
                preset: options.preset.clone(),
                ..Default::default()
            };
            Ok(section.queue_size().div_ceil(batch) * batch)
        }
    }
}

/// Steps recorded by `--trace` after the timed ones.
const TRACED_STEPS: usize = 3;

/// Runs the benchmark.
pub fn run(options: &BenchOptions) -> Result<BenchReport, TrainError> {
    if options.threads > 0 {
        tch::set_num_threads(options.threads as i32);
    }
    let Setup { config, spec, momentum_shape, flops_per_sample } = setup(options)?;
    let (image_size, context) = (spec.image_size(), spec.context_length());
    let mut trainer = Trainer::new(&config, spec, options.device)?;
    if let Some(location) = &options.init_from {
        crate::init_from::init_from(&mut trainer, location)
            .map_err(|e| TrainError::State { origin: location.clone(), reason: e.to_string() })?;
    }
    let (listener, _) = RingListener::bind("127.0.0.1:0")?;
    let mut coll = RingCollective::connect(listener, 0, 1, &["127.0.0.1:0".to_string()], 0, std::time::Duration::from_secs(60))?;

    let device = options.device;
    let kind = trainer.compute_kind();
    let mut batch = if momentum_shape.is_some() {
        caption_batch(options.batch, image_size, context, options.vocab_size, device, kind)
    } else {
        synthetic_batch(options.batch, image_size, context, options.vocab_size, device, kind)
    };
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    for step in 0..options.warmup {
        as_step(&mut batch, step);
        trainer.train_step(step as u64, &batch, &mut coll)?;
    }
    sync();
    crate::cuda_memory::reset_peak(device)?;
    // The update is timed apart only on the CPU: on a GPU that needs a wait for the device
    // between backward and update, which would stall the step being measured.
    let time_update = !device.is_cuda();
    let mut times = Vec::with_capacity(options.steps);
    let mut update_times = Vec::with_capacity(options.steps);
    let mut losses = Vec::with_capacity(options.steps);
    let mut loss_terms = Vec::new();
    let mut cpu_times = Vec::with_capacity(options.steps);
    let mut captured = false;
    for step in 0..options.steps {
        let cpu0 = process_cpu_seconds();
        let t0 = Instant::now();
        let mut t1 = t0;
        as_step(&mut batch, options.warmup + step);
        let stats = trainer.train_step_with((options.warmup + step) as u64, &batch, &mut coll, || {
            if time_update {
                t1 = Instant::now();
            }
        })?;
        captured = trainer.step_is_captured();
        sync();
        times.push(t0.elapsed().as_secs_f64());
        cpu_times.push(process_cpu_seconds() - cpu0);
        update_times.push(t1.elapsed().as_secs_f64());
        losses.push(stats.loss);
        loss_terms = stats.parts.iter().map(|(name, v)| (name.to_string(), *v)).collect();
    }
    let memory = crate::cuda_memory::memory_stats(device)?;
    if let Some(path) = &options.trace {
        let profiler = crate::profiler::Profiler::start(matches!(device, Device::Cuda(_)))?;
        for step in 0..TRACED_STEPS {
            as_step(&mut batch, options.warmup + options.steps + step);
            trainer.train_step((options.warmup + options.steps + step) as u64, &batch, &mut coll)?;
        }
        sync();
        profiler.finish(path)?;
    }
    update_times.sort_by(|a, b| a.total_cmp(b));
    times.sort_by(|a, b| a.total_cmp(b));
    cpu_times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let flops_per_step = 3.0 * flops_per_sample * options.batch as f64;
    let tflops = flops_per_step / median / 1e12;
    Ok(BenchReport {
        r#impl: "braid".into(),
        family: options.family.clone(),
        preset: options.preset.clone(),
        batch: options.batch,
        threads: options.threads,
        device: format!("{:?}", options.device).to_lowercase(),
        precision: options.precision.clone(),
        step_seconds: median,
        samples_per_second: options.batch as f64 / median,
        tokens_per_second: (options.batch as i64 * context) as f64 / median,
        flops_per_step,
        tflops,
        mfu: options.peak_tflops.map(|peak| tflops / peak),
        peak_memory_bytes: memory.map(|m| m.peak_allocated),
        peak_reserved_bytes: memory.map(|m| m.peak_reserved),
        losses: options.record_losses.then_some(losses),
        update_seconds: time_update.then(|| update_times[update_times.len() / 2]),
        activation_checkpointing: options.activation_checkpointing,
        cuda_graph: options.cuda_graph && captured,
        loss_terms,
        cpu_seconds: momentum_shape.map(|_| cpu_times[cpu_times.len() / 2]),
        momentum_shape,
    })
}

/// User and system CPU seconds this process has used so far, all threads together.
fn process_cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a writable rusage; getrusage(RUSAGE_SELF) only fills it in.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return 0.0;
        }
        usage.assume_init()
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let family = if is_clip(&self.family) { String::new() } else { format!("{} ", self.family) };
        write!(
            f,
            "{} {family}{} batch {} on {} ({}, {} threads{}): {:.2} ms/step{}, {:.1} samples/s, {:.0} tokens/s, {:.2} TFLOP/s",
            self.r#impl,
            self.preset,
            self.batch,
            self.device,
            self.precision,
            self.threads,
            if self.cuda_graph { ", CUDA graph" } else { "" },
            1e3 * self.step_seconds,
            self.update_seconds.map_or(String::new(), |u| format!(" ({:.2} ms update)", 1e3 * u)),
            self.samples_per_second,
            self.tokens_per_second,
            self.tflops
        )?;
        if let Some(mfu) = self.mfu {
            write!(f, ", MFU {:.1}%", 100.0 * mfu)?;
        }
        if let (Some(allocated), Some(reserved)) = (self.peak_memory_bytes, self.peak_reserved_bytes) {
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            write!(f, ", peak GPU memory {:.0} MiB allocated / {:.0} MiB reserved", mib(allocated), mib(reserved))?;
        }
        if let Some(cpu) = self.cpu_seconds {
            write!(f, "; {:.2} CPU s/step", cpu)?;
        }
        if let Some(shape) = &self.momentum_shape {
            write!(f, "; context {}, vocabulary {}, queue {}", shape.context_length, shape.vocab_size, shape.queue_size)?;
        }
        if !self.loss_terms.is_empty() {
            let terms: Vec<String> = self.loss_terms.iter().map(|(name, v)| format!("{name} {v:.4}")).collect();
            write!(f, "; last step's loss terms: {}", terms.join(", "))?;
        }
        Ok(())
    }
}

/// What `braid bench --checkpoint-to` measured: the time training is blocked per checkpoint
/// with the asynchronous save against a synchronous save of the same state, and the upload
/// throughput against a plain object-store put of the same bytes.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointBenchReport {
    /// Model preset whose state was saved.
    pub preset: String,
    /// Device the state lived on (GPU state is snapshotted into pinned host memory).
    pub device: String,
    /// Bytes of one checkpoint part (model, AdamW moments, step).
    pub bytes: u64,
    /// Median seconds training is blocked by a synchronous save (snapshot, serialise, upload).
    pub sync_blocked_seconds: f64,
    /// Median seconds training is blocked by the asynchronous save: the submission, plus any
    /// wait for the host copy after the next step's forward and backward.
    pub async_blocked_seconds: f64,
    /// `async_blocked_seconds / sync_blocked_seconds` (target: below 0.05).
    pub blocked_ratio: f64,
    /// Median seconds of the background upload (serialise and write).
    pub upload_seconds: f64,
    /// Median seconds of a plain `put` of the same bytes.
    pub plain_put_seconds: f64,
    /// Upload throughput over plain-put throughput (target: at least 0.8).
    pub throughput_ratio: f64,
}

/// Benchmarks checkpoint saving of a preset's full training state to `url`, `rounds` times.
pub fn run_checkpoint_bench(
    preset: &str,
    url: &str,
    rounds: usize,
    device: Device,
    batch: usize,
) -> Result<CheckpointBenchReport, Box<dyn std::error::Error>> {
    use crate::checkpoint::upload::{snapshot, Uploader};
    use crate::checkpoint::{to_safetensors, CheckpointStore};
    let text = format!("[job]\nname = \"bench\"\n[model]\npreset = \"{preset}\"\n[data]\ntrain = \"unused\"\n");
    let config = JobConfig::parse(&text, "bench")?;
    config.validate("bench options")?;
    let clip = clip_config(&config, 49408)?;
    let mut trainer = Trainer::new(&config, clip, device)?;
    let store = CheckpointStore::open(url)?;
    let (listener, _) = RingListener::bind("127.0.0.1:0")?;
    let mut coll = RingCollective::connect(listener, 0, 1, &["127.0.0.1:0".to_string()], 0, std::time::Duration::from_secs(60))?;
    let synthetic = synthetic_batch(batch, clip.vision.image_size, clip.text.context_length, 49408, device, trainer.compute_kind());
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (mut sync, mut blocked, mut upload, mut plain) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut bytes = 0;
    let uploader = Uploader::new(store.clone());
    // The first round allocates the host buffers; later rounds reuse them as training would.
    for round in 0..rounds.max(1) + 1 {
        let step = round as u64;
        let t0 = Instant::now();
        let parts = store.write_parts(step, &format!("sync-{round}"), 0, &snapshot(&trainer.state()))?;
        sync.push(t0.elapsed().as_secs_f64());
        bytes = parts.iter().map(|p| p.size).sum();

        // Asynchronous: training is blocked for the submission, then, after the next step's
        // forward and backward (which run beside the host copy), until the copy is done.
        let (parts_tx, parts_rx) = std::sync::mpsc::channel();
        let keep_parts = Box::new(move |result: crate::checkpoint::Result<Vec<crate::checkpoint::PartInfo>>, _| {
            let _ = parts_tx.send(result);
        });
        let t0 = Instant::now();
        let copying = uploader.submit(step, &format!("async-{round}"), 0, trainer.state(), keep_parts).ok_or("the uploader is busy")?;
        let submitted = t0.elapsed();
        trainer.compute_gradients(step, &synthetic, &mut coll)?;
        let t1 = Instant::now();
        copying.wait();
        blocked.push((submitted + t1.elapsed()).as_secs_f64());
        // The parameters did not change since the submission: the checkpoint must hold them exactly.
        verify_checkpoint(&store, &parts_rx.recv()??, &trainer.state())?;

        // Upload throughput, alone on the machine like the plain put below.
        let (tx, rx) = std::sync::mpsc::channel();
        let then = Box::new(move |result: crate::checkpoint::Result<Vec<crate::checkpoint::PartInfo>>, took: std::time::Duration| {
            let _ = tx.send((result.map(|p| p.len()), took));
        });
        uploader.submit(step, &format!("upload-{round}"), 0, trainer.state(), then).ok_or("the uploader is busy")?;
        let (result, took) = rx.recv()?;
        result?;
        upload.push(took.as_secs_f64());

        let payload = bytes::Bytes::from(to_safetensors(&trainer.state())?);
        let location = crate::data::store::open(&format!("{}/step-{step:06}/plain-put.safetensors", store.url()))?;
        let t0 = Instant::now();
        crate::data::store::block_on(location.put(payload))??;
        plain.push(t0.elapsed().as_secs_f64());
        let round_dir = braid_coordinator::store::open(store.url())?;
        crate::data::store::block_on(round_dir.delete_folder(&format!("step-{step:06}")))??;
    }
    let skip_first = |v: Vec<f64>| v[1..].to_vec();
    let (sync, blocked, upload, plain) =
        (median(skip_first(sync)), median(skip_first(blocked)), median(skip_first(upload)), median(skip_first(plain)));
    Ok(CheckpointBenchReport {
        preset: preset.to_string(),
        device: format!("{device:?}").to_lowercase(),
        bytes,
        sync_blocked_seconds: sync,
        async_blocked_seconds: blocked,
        blocked_ratio: blocked / sync,
        upload_seconds: upload,
        plain_put_seconds: plain,
        throughput_ratio: plain / upload,
    })
}

impl std::fmt::Display for CheckpointBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = self.bytes as f64 / 1e6;
        writeln!(f, "checkpoint of CLIP {} state on {}: {mb:.0} MB", self.preset, self.device)?;
        writeln!(
            f,
            "training blocked per checkpoint: async {:.3} s vs synchronous {:.3} s ({:.1}%; target < 5%)",
            self.async_blocked_seconds,
            self.sync_blocked_seconds,
            100.0 * self.blocked_ratio
        )?;
        write!(
            f,
            "upload throughput: {:.0} MB/s vs plain object-store put {:.0} MB/s ({:.0}%; target >= 80%)",
            mb / self.upload_seconds,
            mb / self.plain_put_seconds,
            100.0 * self.throughput_ratio
        )
    }
}
