//! `braid bench`: training-step throughput of a model preset on synthetic tensors: the full
//! step (forward, contrastive loss, backward, gradient reduction, clipping, AdamW), timed after
//! warm-up, with the median step time, samples/s, tokens/s and model FLOPs utilisation.

use std::time::Instant;

use braid_coordinator::config::JobConfig;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::collective::{RingCollective, RingListener};
use crate::trainer::{clip_config, Trainer, DeviceBatch, TrainError};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Model family (`clip`).
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
    /// Text vocabulary size (CLIP BPE: 49,408).
    pub vocab_size: i64,
    /// Peak dense TFLOP/s of the device for MFU; none leaves MFU out.
    pub peak_tflops: Option<f64>,
    /// Record the loss of every timed step.
    pub record_losses: bool,
    /// Recompute each transformer block's activations in the backward pass.
    pub activation_checkpointing: bool,
    /// Where to write a profiler trace of a few extra steps, if anywhere.
    pub trace: Option<std::path::PathBuf>,
}

/// Measured throughput.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Implementation measured (`braid`).
    pub r#impl: String,
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
    /// Peak device memory in bytes (CUDA only).
    pub peak_memory_bytes: Option<u64>,
    /// Median seconds of the update alone (clipping, AdamW, logit-scale clamp).
    pub update_seconds: f64,
    /// Whether the transformer blocks' activations were recomputed in the backward pass.
    pub activation_checkpointing: bool,
    /// Loss of every timed step, when asked for (to compare precisions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub losses: Option<Vec<f64>>,
}

fn bench_config(options: &BenchOptions) -> Result<JobConfig, TrainError> {
    let text = format!(
        "[job]\nname = \"bench\"\n[model]\nfamily = \"{}\"\npreset = \"{}\"\n[data]\ntrain = \"unused\"\n\
         [train]\nglobal_batch = {}\nsteps = {}\nprecision = \"{}\"\nwarmup_steps = 1\nactivation_checkpointing = {}\n",
        options.family,
        options.preset,
        options.batch,
        options.steps + options.warmup + TRACED_STEPS,
        options.precision,
        options.activation_checkpointing
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
        positions: Tensor::arange(b, (Kind::Int64, Device::Cpu)),
    })
}

/// Steps recorded by `--trace` after the timed ones.
const TRACED_STEPS: usize = 3;

/// Runs the benchmark.
pub fn run(options: &BenchOptions) -> Result<BenchReport, TrainError> {
    if options.threads > 0 {
        tch::set_num_threads(options.threads as i32);
    }
    let config = bench_config(options)?;
    let clip = clip_config(&config, options.vocab_size)?;
    let mut trainer = Trainer::new(&config, clip, options.device)?;
    let (listener, _) = RingListener::bind("127.0.0.1:0")?;
    let mut coll = RingCollective::connect(listener, 0, 1, &["127.0.0.1:0".to_string()], 0, std::time::Duration::from_secs(60))?;

    let device = options.device;
    let context = clip.text.context_length;
    let batch = synthetic_batch(options.batch, clip.vision.image_size, context, options.vocab_size, device, trainer.compute_kind());
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    for step in 0..options.warmup {
        trainer.train_step(step as u64, &batch, &mut coll)?;
    }
    sync();
    let mut times = Vec::with_capacity(options.steps);
    let mut update_times = Vec::with_capacity(options.steps);
    let mut losses = Vec::with_capacity(options.steps);
    for step in 0..options.steps {
        let t0 = Instant::now();
        let (loss, _) = trainer.compute_gradients((options.warmup + step) as u64, &batch, &mut coll)?;
        sync();
        let t1 = Instant::now();
        trainer.apply_update((options.warmup + step) as u64)?;
        sync();
        times.push(t0.elapsed().as_secs_f64());
        update_times.push(t1.elapsed().as_secs_f64());
        losses.push(loss);
    }
    if let Some(path) = &options.trace {
        let profiler = crate::profiler::Profiler::start(matches!(device, Device::Cuda(_)))?;
        for step in 0..TRACED_STEPS {
            trainer.train_step((options.warmup + options.steps + step) as u64, &batch, &mut coll)?;
        }
        sync();
        profiler.finish(path)?;
    }
    update_times.sort_by(|a, b| a.total_cmp(b));
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let flops_per_step = 3.0 * clip.forward_flops_per_sample() * options.batch as f64;
    let tflops = flops_per_step / median / 1e12;
    Ok(BenchReport {
        r#impl: "braid".into(),
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
        peak_memory_bytes: None,
        losses: options.record_losses.then_some(losses),
        update_seconds: update_times[update_times.len() / 2],
        activation_checkpointing: options.activation_checkpointing,
    })
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} batch {} on {} ({}, {} threads): {:.2} ms/step ({:.2} ms update), {:.1} samples/s, {:.0} tokens/s, {:.2} TFLOP/s",
            self.r#impl,
            self.preset,
            self.batch,
            self.device,
            self.precision,
            self.threads,
            1e3 * self.step_seconds,
            1e3 * self.update_seconds,
            self.samples_per_second,
            self.tokens_per_second,
            self.tflops
        )?;
        if let Some(mfu) = self.mfu {
            write!(f, ", MFU {:.1}%", 100.0 * mfu)?;
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
