//! The job file (`job.toml`): every key, its default, and validation that reports every
//! problem at once. Unknown keys are an error that names the key.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::{Error, Result};

/// A whole job: what to train, on what data, how, where, and where to keep checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// `[job]`: identity and randomness.
    pub job: JobSection,
    /// `[model]`: which family and preset.
    #[serde(default)]
    pub model: ModelSection,
    /// `[data]`: training and held-out data.
    pub data: DataSection,
    /// `[train]`: optimisation.
    #[serde(default)]
    pub train: TrainSection,
    /// `[cluster]`: membership, rendezvous and collectives.
    #[serde(default)]
    pub cluster: ClusterSection,
    /// `[checkpoint]`: where and when state is saved.
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    /// `[telemetry]`: logs.
    #[serde(default)]
    pub telemetry: TelemetrySection,
    /// `[security]`: the coordinator's bearer token and TLS. Left out of the job file's text
    /// (and its hash) while unset.
    #[serde(default, skip_serializing_if = "SecuritySection::is_unset")]
    pub security: SecuritySection,
}

/// `[job]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    /// Job id; every RPC carries it. Letters, digits, `-`, `_` and `.`.
    pub name: String,
    /// Seed of the data order, augmentation and initialisation. Default 0.
    #[serde(default)]
    pub seed: u64,
}

/// `[model]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Model family. Default `"clip"`.
    #[serde(default = "default_family")]
    pub family: String,
    /// Preset of the family: `tiny`, `vit-b-32`, `vit-b-16`. Default `"tiny"`.
    #[serde(default = "default_preset")]
    pub preset: String,
    /// Use QuickGELU (OpenAI CLIP weights) instead of GELU. Default false.
    #[serde(default)]
    pub quick_gelu: bool,
    /// Weights to start from instead of a random initialisation: a safetensors file in the
    /// family's reference layout (CLIP: open_clip's, as `braid export --format open_clip` writes
    /// it; ALBEF: torchmultimodal's; BLIP: transformers' retrieval or captioning model).
    /// Default: none.
    #[serde(default)]
    pub init_from: Option<String>,
    /// Text context length in tokens. Default: the preset's (`tiny` 32, base presets 77).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<usize>,
    /// ALBEF/BLIP: length of the image and text feature queues, a multiple of the global batch.
    /// Default: the paper's (ALBEF 65,536, BLIP 57,600; `tiny` presets 1,024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<usize>,
    /// ALBEF/BLIP: momentum-encoder coefficient `m` in `theta_m <- m theta_m + (1 - m) theta`.
    /// Default 0.995.
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// ALBEF/BLIP: weight of the momentum model's soft targets in the distilled losses. Default 0.4.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// ALBEF/BLIP: steps over which `alpha` ramps up linearly from 0. Default: one epoch (ALBEF)
    /// or two (BLIP) of the training set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha_ramp_steps: Option<u64>,
    /// ALBEF/BLIP: where ITM hard negatives come from: `per_worker` (each rank's own batch, as
    /// both papers pretrain) or `global` (the whole global batch, independent of the worker
    /// count). Default `per_worker`.
    #[serde(default = "default_hard_negatives")]
    pub hard_negatives: String,
    /// ALBEF: fraction of caption tokens masked for MLM (80% [MASK], 10% random, 10% kept).
    /// Default 0.15.
    #[serde(default = "default_mlm_probability")]
    pub mlm_probability: f64,
    /// ALBEF: mask whole words rather than single WordPiece tokens. Default false.
    #[serde(default)]
    pub whole_word_masking: bool,
}

impl ModelSection {
    /// The feature-queue length ALBEF and BLIP use: `queue_size`, else the preset's default.
    pub fn queue_size(&self) -> usize {
        self.queue_size.unwrap_or(match (self.family.as_str(), self.preset.as_str()) {
            (_, "tiny") => 1024,
            ("blip", _) => 57_600,
            _ => 65_536,
        })
    }

    /// Whether the family has momentum encoders and feature queues.
    pub fn has_momentum(&self) -> bool {
        matches!(self.family.as_str(), "albef" | "blip")
    }
}

/// `[data]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training manifest written by `braid data index`: a path or a `file://`, `s3://`, `gs://`
    /// or `az://` URL.
    pub train: String,
    /// Held-out manifest for `braid eval` and the end-of-run evaluation. Optional.
    #[serde(default)]
    pub eval: Option<String>,
    /// Class names and prompt templates for zero-shot evaluation (`classes.json` as written by
    /// `braid data synth`). Default: `classes.json` in the folder above the eval manifest, if any.
    #[serde(default)]
    pub classes: Option<String>,
    /// Tokenizer: `"clip-bpe"` (open_clip's byte-level BPE) or a path to a Hugging Face
    /// `tokenizer.json`; relative paths are resolved against the job file. Default `"clip-bpe"`.
    #[serde(default = "default_tokenizer")]
    pub tokenizer: String,
    /// Threads that decode and augment images on each worker. Default 2.
    #[serde(default = "default_decode_threads")]
    pub decode_threads: usize,
    /// Batches each worker keeps decoded ahead of training. Default 2.
    #[serde(default = "default_prefetch_batches")]
    pub prefetch_batches: usize,
    /// Random-resized-crop scale range lower bound for training augmentation (1.0 = no crop). Default 0.9.
    #[serde(default = "default_min_crop_scale")]
    pub min_crop_scale: f64,
    /// Samples that may fail to decode before the job stops. Default 100.
    #[serde(default = "default_max_corrupt_samples")]
    pub max_corrupt_samples: u64,
    /// Shards per shuffle window of the global sample order. Default 4.
    #[serde(default = "default_shuffle_window")]
    pub shuffle_window_shards: usize,
}

/// `[train]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Samples per optimizer step across all workers; fixed for the job. Default 64.
    #[serde(default = "default_global_batch")]
    pub global_batch: usize,
    /// Largest per-worker forward batch; a rank's share above it is split into gradient
    /// accumulation micro-batches. Default 0 = no limit.
    #[serde(default)]
    pub max_micro_batch: usize,
    /// Optimizer steps. Default 100.
    #[serde(default = "default_steps")]
    pub steps: u64,
    /// Peak learning rate. Default 5e-4.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Learning rate at the end of the cosine decay. Default 0.
    #[serde(default)]
    pub min_lr: f64,
    /// Linear warmup steps. Default 10.
    #[serde(default = "default_warmup")]
    pub warmup_steps: u64,
    /// Decoupled weight decay (not applied to norms, biases, embeddings, logit scale). Default 0.2.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// AdamW beta1. Default 0.9.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// AdamW beta2. Default 0.98.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// AdamW epsilon. Default 1e-6.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Clip the global gradient norm to this value; 0 disables. Default 1.0.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
    /// `fp32`, `fp64` (exactness tests) or `bf16`. Default `fp32`.
    #[serde(default = "default_precision")]
    pub precision: String,
    /// Intra-op threads per worker for CPU math; 0 = libtorch's default. Default 0.
    #[serde(default)]
    pub threads: usize,
    /// Recompute each transformer block's activations during the backward pass instead of
    /// keeping them: less memory for about one more forward pass of compute. Default false.
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// Capture the training step as a CUDA graph after two eager steps and replay it with one
    /// launch per step, taking the host's per-kernel dispatch cost out of the step time. Applies
    /// to CLIP jobs on a CUDA device with one worker; otherwise steps run eagerly (with a
    /// warning). Default false.
    #[serde(default)]
    pub cuda_graph: bool,
    /// Replica consistency check: after every step S with `(S + 1) % ema_check_every == 0`, and
    /// after the last step, every rank reports a digest of its parameters, momentum encoders
    /// and queues; when they differ the coordinator has every rank take one rank's state by
    /// broadcast. 0 disables. Default 100.
    #[serde(default = "default_ema_check_every")]
    pub ema_check_every: u64,
}

/// `[cluster]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Fewest workers a generation needs. Default 1.
    #[serde(default = "default_one")]
    pub min_workers: usize,
    /// Most workers a generation admits. Default 1 (`braid run --workers N` sets both to N).
    #[serde(default = "default_one")]
    pub max_workers: usize,
    /// Seconds of silence after which a worker is dead. Default 30.
    #[serde(default = "default_heartbeat_timeout")]
    pub heartbeat_timeout_s: f64,
    /// Seconds a rendezvous waits for more than `min_workers` before forming a generation. Default 5.
    #[serde(default = "default_rendezvous_grace")]
    pub rendezvous_grace_s: f64,
    /// Bound on every collective call, in seconds. Default 60.
    #[serde(default = "default_collective_timeout")]
    pub collective_timeout_s: f64,
    /// Gradient all-reduce bucket size in MiB (several tensors are flattened into one bucket
    /// per collective call). Default 25.
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: f64,
    /// Kind of the gradients on the wire: `fp32`, or `bf16` (half the bytes; each bucket is
    /// summed in bf16 by the collective, then widened back to the fp32 gradients). Default `fp32`.
    #[serde(default = "default_reduce_precision")]
    pub reduce_precision: String,
    /// Seconds a coordinator's lease on the job (its journal under the checkpoint root) lasts
    /// without renewal; a second coordinator is refused while it is live. Default 10.
    #[serde(default = "default_coordinator_lease")]
    pub coordinator_lease_s: f64,
    /// `braid run` restarts local worker processes that die, up to this many times in all
    /// (a restarted worker rejoins at the next generation). Default 3.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// Device of each worker: `cpu`, `cuda` (one per local GPU) or `cuda:N`. Default `cpu`.
    #[serde(default = "default_device")]
    pub device: String,
}

/// `[checkpoint]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Where checkpoints go: a path or a `file://`, `s3://`, `gs://` or `az://` URL (credentials
    /// from the usual environment variables). Default: none (no checkpoints).
    #[serde(default)]
    pub url: Option<String>,
    /// Checkpoint every N steps; 0 = only at the end. Default 0.
    #[serde(default)]
    pub every_steps: u64,
    /// Also checkpoint every T minutes of training; 0 = off. Default 0.
    #[serde(default)]
    pub every_minutes: f64,
    /// Committed checkpoints to keep. Default 3.
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Keep every checkpoint whose step + 1 is a multiple of this, beyond `keep`; 0 = none. Default 0.
    #[serde(default)]
    pub keep_every_steps: u64,
    /// Seconds `braid run` and workers have after SIGTERM/SIGINT to checkpoint, commit and
    /// exit 0. Default 120.
    #[serde(default = "default_grace")]
    pub grace_period_s: f64,
    /// Resume from the checkpoint that `latest` points at, if there is one. Default true.
    #[serde(default = "default_true")]
    pub resume: bool,
}

/// `[telemetry]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySection {
    /// `text` or `json` log lines. Default `text`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// Log every N steps. Default 10.
    #[serde(default = "default_log_every")]
    pub log_every_steps: u64,
    /// A folder where every worker appends its sample ledger (`<job>-<worker id>.jsonl`): per
    /// step, the sample keys it contributed and whether the step's update was applied, to audit
    /// exactly-once consumption across failures. Default none.
    #[serde(default)]
    pub sample_ledger: Option<String>,
    /// An OTLP/gRPC endpoint (`http://collector:4317`) the coordinator and every worker send
    /// spans (step phases, coordinator events) and metrics to. Default none: nothing is sent.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Seconds between OTLP metric exports. Default 10.
    #[serde(default = "default_otlp_interval")]
    pub otlp_interval_s: f64,
}

fn default_otlp_interval() -> f64 {
    10.0
}

/// `[security]`: who may call the coordinator. Secrets never sit in the job file: the token
/// comes from a file or the environment, and only paths are given here.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecuritySection {
    /// A file holding the bearer token every RPC and every mutating HTTP call must carry
    /// (`authorization: Bearer <token>`). Unset: the token comes from the environment variable
    /// `BRAID_AUTH_TOKEN` when that is set; otherwise no token is required.
    #[serde(default)]
    pub auth_token_file: Option<String>,
    /// PEM certificate chain the coordinator serves gRPC and HTTP with (TLS). Needs `tls_key`.
    #[serde(default)]
    pub tls_cert: Option<String>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<String>,
    /// PEM CA certificates: when set, every client must present a certificate they signed.
    /// Needs `tls_cert`.
    #[serde(default)]
    pub tls_client_ca: Option<String>,
}

impl SecuritySection {
    /// True when no key is set.
    pub fn is_unset(&self) -> bool {
        self == &Self::default()
    }

    fn validate(&self, p: &mut Vec<String>) {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => p.push("security.tls_cert is set but security.tls_key is not".into()),
            (None, Some(_)) => p.push("security.tls_key is set but security.tls_cert is not".into()),
            _ => {}
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            p.push("security.tls_client_ca needs security.tls_cert and security.tls_key: client certificates are checked over TLS".into());
        }
        for (key, value) in [
            ("auth_token_file", &self.auth_token_file),
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
            ("tls_client_ca", &self.tls_client_ca),
        ] {
            if value.as_deref() == Some("") {
                p.push(format!("security.{key} is empty: give a file path or leave it out"));
            }
        }
    }
}

fn default_family() -> String {
    "clip".into()
}
fn default_preset() -> String {
    "tiny".into()
}
fn default_momentum() -> f64 {
    0.995
}
fn default_alpha() -> f64 {
    0.4
}
fn default_hard_negatives() -> String {
    "per_worker".into()
}
fn default_mlm_probability() -> f64 {
    0.15
}
fn default_tokenizer() -> String {
    "clip-bpe".into()
}
fn default_decode_threads() -> usize {
    2
}
fn default_prefetch_batches() -> usize {
    2
}
fn default_min_crop_scale() -> f64 {
    0.9
}
fn default_max_corrupt_samples() -> u64 {
    100
}
fn default_shuffle_window() -> usize {
    4
}
fn default_global_batch() -> usize {
    64
}
fn default_steps() -> u64 {
    100
}
fn default_lr() -> f64 {
    5e-4
}
fn default_warmup() -> u64 {
    10
}
fn default_weight_decay() -> f64 {
    0.2
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.98
}
fn default_eps() -> f64 {
    1e-6
}
fn default_grad_clip() -> f64 {
    1.0
}
fn default_ema_check_every() -> u64 {
    100
}
fn default_precision() -> String {
    "fp32".into()
}
fn default_one() -> usize {
    1
}
fn default_heartbeat_timeout() -> f64 {
    30.0
}
fn default_rendezvous_grace() -> f64 {
    5.0
}
fn default_collective_timeout() -> f64 {
    60.0
}
fn default_coordinator_lease() -> f64 {
    10.0
}
fn default_max_restarts() -> u32 {
    3
}
fn default_reduce_precision() -> String {
    "fp32".into()
}
fn default_bucket_mb() -> f64 {
    25.0
}
fn default_device() -> String {
    "cpu".into()
}
fn default_keep() -> usize {
    3
}
fn default_grace() -> f64 {
    120.0
}
fn default_true() -> bool {
    true
}
fn default_log_format() -> String {
    "text".into()
}
fn default_log_every() -> u64 {
    10
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            family: default_family(),
            preset: default_preset(),
            quick_gelu: false,
            init_from: None,
            context_length: None,
            queue_size: None,
            momentum: default_momentum(),
            alpha: default_alpha(),
            alpha_ramp_steps: None,
            hard_negatives: default_hard_negatives(),
            mlm_probability: default_mlm_probability(),
            whole_word_masking: false,
        }
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            global_batch: default_global_batch(),
            max_micro_batch: 0,
            steps: default_steps(),
            lr: default_lr(),
            min_lr: 0.0,
            warmup_steps: default_warmup(),
            weight_decay: default_weight_decay(),
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            grad_clip: default_grad_clip(),
            precision: default_precision(),
            threads: 0,
            activation_checkpointing: false,
            cuda_graph: false,
            ema_check_every: default_ema_check_every(),
        }
    }
}

impl ClusterSection {
    /// `bucket_mb` in bytes: the gradient all-reduce and state broadcast bucket size.
    pub fn bucket_bytes(&self) -> usize {
        (self.bucket_mb * (1 << 20) as f64) as usize
    }
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            min_workers: 1,
            max_workers: 1,
            heartbeat_timeout_s: default_heartbeat_timeout(),
            rendezvous_grace_s: default_rendezvous_grace(),
            collective_timeout_s: default_collective_timeout(),
            bucket_mb: default_bucket_mb(),
            reduce_precision: default_reduce_precision(),
            coordinator_lease_s: default_coordinator_lease(),
            max_restarts: default_max_restarts(),
            device: default_device(),
        }
    }
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            url: None,
            every_steps: 0,
            every_minutes: 0.0,
            keep: default_keep(),
            keep_every_steps: 0,
            grace_period_s: default_grace(),
            resume: true,
        }
    }
}

impl Default for TelemetrySection {
    fn default() -> Self {
        Self {
            log_format: default_log_format(),
            log_every_steps: default_log_every(),
            sample_ledger: None,
            otlp_endpoint: None,
            otlp_interval_s: default_otlp_interval(),
        }
    }
}

/// Model families braid can train today.
pub const FAMILIES: &[&str] = &["clip", "albef", "blip"];
/// Presets of the CLIP family.
pub const CLIP_PRESETS: &[&str] = &["tiny", "vit-b-32", "vit-b-16"];
/// Presets of the ALBEF and BLIP families.
pub const MOMENTUM_PRESETS: &[&str] = &["tiny", "base"];
/// Where ITM hard negatives are drawn from (`model.hard_negatives`).
pub const HARD_NEGATIVES: &[&str] = &["per_worker", "global"];

impl JobConfig {
    /// Parses a job file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Config {
            origin: origin.to_string(),
            problems: vec![e.to_string().trim().to_string()],
        })
    }

    /// Reads and parses a job file, resolving relative data paths against its folder, then validates it.
    pub fn load(path: &Path) -> Result<Self> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config { origin: origin.clone(), problems: vec![format!("cannot read: {e}")] })?;
        let mut config = Self::parse(&text, &origin)?;
        let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or_else(|| Path::new("."));
        let base = std::path::absolute(folder).unwrap_or_else(|_| folder.to_path_buf());
        config.resolve_paths(&base);
        config.validate(&origin)?;
        Ok(config)
    }

    /// Makes relative local paths absolute against `base` (the job file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        let resolve = |s: &mut String| {
            if !s.contains("://") && Path::new(s.as_str()).is_relative() {
                *s = base.join(s.as_str()).display().to_string();
            }
        };
        resolve(&mut self.data.train);
        if let Some(eval) = self.data.eval.as_mut() {
            resolve(eval);
        }
        if let Some(classes) = self.data.classes.as_mut() {
            resolve(classes);
        }
        if self.data.tokenizer != "clip-bpe" {
            resolve(&mut self.data.tokenizer);
        }
        if let Some(url) = self.checkpoint.url.as_mut() {
            resolve(url);
        }
        if let Some(init) = self.model.init_from.as_mut() {
            resolve(init);
        }
    }

    /// The checks of the momentum families' keys (ALBEF, BLIP); other families must leave
    /// `queue_size` and `alpha_ramp_steps` unset.
    fn validate_momentum(&self, p: &mut Vec<String>) {
        let m = &self.model;
        if !m.has_momentum() {
            for (key, set) in [("queue_size", m.queue_size.is_some()), ("alpha_ramp_steps", m.alpha_ramp_steps.is_some())] {
                if set {
                    p.push(format!("model.{key} applies to the albef and blip families, not {:?}", m.family));
                }
            }
            return;
        }
        let global_batch = self.train.global_batch;
        if global_batch > 0 {
            let queue = m.queue_size();
            if queue == 0 || !queue.is_multiple_of(global_batch) {
                let below = queue / global_batch * global_batch;
                let hint = if below == 0 { format!("{global_batch}") } else { format!("{below} or {}", below + global_batch) };
                p.push(format!(
                    "model.queue_size = {queue} is not a multiple of train.global_batch = {global_batch}: every step enqueues the \
                     whole global batch, so the queue must hold a whole number of batches (e.g. {hint})"
                ));
            }
        }
        if !(0.0..1.0).contains(&m.momentum) {
            p.push(format!("model.momentum = {}: must be in [0, 1)", m.momentum));
        }
        if !(0.0..=1.0).contains(&m.alpha) {
            p.push(format!("model.alpha = {}: must be in [0, 1]", m.alpha));
        }
        if !HARD_NEGATIVES.contains(&m.hard_negatives.as_str()) {
            p.push(format!("model.hard_negatives = {:?}: choose one of {:?}", m.hard_negatives, HARD_NEGATIVES));
        }
        if !(m.mlm_probability > 0.0 && m.mlm_probability <= 1.0) {
            p.push(format!("model.mlm_probability = {}: must be in (0, 1]", m.mlm_probability));
        }
        if m.quick_gelu {
            p.push(format!("model.quick_gelu applies to the clip family, not {:?}", m.family));
        }
    }

    /// Checks every field and reports all problems together.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let mut p = Vec::new();
        let name_ok = !self.job.name.is_empty()
            && self.job.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            p.push(format!("job.name = {:?}: use letters, digits, '-', '_' and '.'", self.job.name));
        }
        if !FAMILIES.contains(&self.model.family.as_str()) {
            p.push(format!("model.family = {:?}: known families are {:?}", self.model.family, FAMILIES));
        } else if self.model.family == "clip" && !CLIP_PRESETS.contains(&self.model.preset.as_str()) {
            p.push(format!("model.preset = {:?}: CLIP presets are {:?}", self.model.preset, CLIP_PRESETS));
        } else if self.model.has_momentum() && !MOMENTUM_PRESETS.contains(&self.model.preset.as_str()) {
            p.push(format!("model.preset = {:?}: {} presets are {:?}", self.model.preset, self.model.family, MOMENTUM_PRESETS));
        }
        self.validate_momentum(&mut p);
        if self.data.train.is_empty() {
            p.push("data.train is empty: give the manifest written by `braid data index`".into());
        }
        if self.model.context_length == Some(0) {
            p.push("model.context_length = 0: need at least 2 tokens".into());
        }
        if self.data.decode_threads == 0 {
            p.push("data.decode_threads = 0: need at least 1".into());
        }
        if self.data.prefetch_batches == 0 {
            p.push("data.prefetch_batches = 0: need at least 1".into());
        }
        if !(self.data.min_crop_scale > 0.0 && self.data.min_crop_scale <= 1.0) {
            p.push(format!("data.min_crop_scale = {}: must be in (0, 1]", self.data.min_crop_scale));
        }
        if self.data.shuffle_window_shards == 0 {
            p.push("data.shuffle_window_shards = 0: need at least 1".into());
        }
        let t = &self.train;
        if t.global_batch == 0 {
            p.push("train.global_batch = 0: need at least 1".into());
        }
        if t.steps == 0 {
            p.push("train.steps = 0: need at least 1".into());
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            p.push(format!("train.lr = {}: must be positive", t.lr));
        }
        if t.min_lr < 0.0 || t.min_lr > t.lr {
            p.push(format!("train.min_lr = {}: must be in [0, lr]", t.min_lr));
        }
        if t.weight_decay < 0.0 {
            p.push(format!("train.weight_decay = {}: must be >= 0", t.weight_decay));
        }
        for (k, v) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&v) {
                p.push(format!("{k} = {v}: must be in [0, 1)"));
            }
        }
        if t.eps <= 0.0 {
            p.push(format!("train.eps = {}: must be positive", t.eps));
        }
        if t.grad_clip < 0.0 {
            p.push(format!("train.grad_clip = {}: must be >= 0 (0 disables)", t.grad_clip));
        }
        if !["fp32", "fp64", "bf16"].contains(&t.precision.as_str()) {
            p.push(format!("train.precision = {:?}: use fp32, fp64 or bf16", t.precision));
        }
        let c = &self.cluster;
        if c.min_workers == 0 || c.min_workers > c.max_workers {
            p.push(format!(
                "cluster.min_workers = {} and max_workers = {}: need 1 <= min_workers <= max_workers",
                c.min_workers, c.max_workers
            ));
        }
        if t.global_batch > 0 && t.global_batch < c.max_workers {
            p.push(format!(
                "train.global_batch = {} is smaller than cluster.max_workers = {}: every rank needs a sample",
                t.global_batch, c.max_workers
            ));
        }
        for (k, v) in [
            ("cluster.heartbeat_timeout_s", c.heartbeat_timeout_s),
            ("cluster.collective_timeout_s", c.collective_timeout_s),
            ("cluster.coordinator_lease_s", c.coordinator_lease_s),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                p.push(format!("{k} = {v}: must be a positive number of seconds"));
            }
        }
        if !(c.bucket_mb > 0.0 && c.bucket_mb.is_finite()) {
            p.push(format!("cluster.bucket_mb = {}: must be a positive size in MiB", c.bucket_mb));
        }
        if !matches!(c.reduce_precision.as_str(), "fp32" | "bf16") {
            p.push(format!("cluster.reduce_precision = {:?}: use fp32 or bf16", c.reduce_precision));
        }
        if c.reduce_precision == "bf16" && t.precision == "fp64" {
            p.push("cluster.reduce_precision = \"bf16\" with train.precision = \"fp64\": fp64 runs reduce in fp64".into());
        }
        if c.rendezvous_grace_s < 0.0 {
            p.push(format!("cluster.rendezvous_grace_s = {}: must be >= 0", c.rendezvous_grace_s));
        }
        let device_ok = c.device == "cpu"
            || c.device == "cuda"
            || c.device.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok());
        if !device_ok {
            p.push(format!("cluster.device = {:?}: use cpu, cuda or cuda:N", c.device));
        }
        if self.checkpoint.keep == 0 {
            p.push("checkpoint.keep = 0: keep at least 1".into());
        }
        if !(self.checkpoint.every_minutes >= 0.0 && self.checkpoint.every_minutes.is_finite()) {
            p.push(format!("checkpoint.every_minutes = {}: must be >= 0", self.checkpoint.every_minutes));
        }
        if !(self.checkpoint.grace_period_s > 0.0 && self.checkpoint.grace_period_s.is_finite()) {
            p.push(format!("checkpoint.grace_period_s = {}: must be a positive number of seconds", self.checkpoint.grace_period_s));
        }
        if self.checkpoint.every_steps > 0 && self.checkpoint.url.is_none() {
            p.push("checkpoint.every_steps is set but checkpoint.url is not".into());
        }
        if !["text", "json"].contains(&self.telemetry.log_format.as_str()) {
            p.push(format!("telemetry.log_format = {:?}: use text or json", self.telemetry.log_format));
        }
        if let Some(endpoint) = &self.telemetry.otlp_endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                p.push(format!("telemetry.otlp_endpoint = {endpoint:?}: give an http:// or https:// URL (OTLP over gRPC, usually port 4317)"));
            }
        }
        if !(self.telemetry.otlp_interval_s > 0.0 && self.telemetry.otlp_interval_s.is_finite()) {
            p.push(format!("telemetry.otlp_interval_s = {}: must be a positive number of seconds", self.telemetry.otlp_interval_s));
        }
        self.security.validate(&mut p);
        if p.is_empty() {
            Ok(())
        } else {
            Err(Error::Config { origin: origin.to_string(), problems: p })
        }
    }

    /// Serialises back to TOML (sent to workers in the join reply).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a JobConfig always serialises")
    }

    /// Hex sha256 of the canonical TOML form; recorded in checkpoints.
    pub fn hash(&self) -> String {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(self.to_toml().as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[job]\nname = \"t\"\n[data]\ntrain = \"/d/manifest.json\"\n";

    #[test]
    fn defaults_fill_every_section() {
        let c = JobConfig::parse(MINIMAL, "mem").unwrap();
        c.validate("mem").unwrap();
        assert_eq!(c.model.family, "clip");
        assert_eq!(c.train.global_batch, 64);
        assert_eq!(c.cluster.device, "cpu");
        assert_eq!(c.checkpoint.keep, 3);
    }

    #[test]
    fn unknown_key_is_named() {
        let text = format!("{MINIMAL}[train]\nlearning_rate = 0.1\n");
        let err = JobConfig::parse(&text, "job.toml").unwrap_err().to_string();
        assert!(err.contains("learning_rate"), "{err}");
        assert!(err.contains("job.toml"), "{err}");
    }

    #[test]
    fn validation_reports_every_problem() {
        let text = format!("{MINIMAL}[train]\nglobal_batch = 0\nprecision = \"fp8\"\n");
        let err = JobConfig::parse(&text, "j").unwrap().validate("j").unwrap_err().to_string();
        assert!(err.contains("global_batch"), "{err}");
        assert!(err.contains("fp8"), "{err}");
    }

    #[test]
    fn ema_check_every_defaults_to_100_and_0_disables() {
        assert_eq!(JobConfig::parse(MINIMAL, "mem").unwrap().train.ema_check_every, 100);
        let off = JobConfig::parse(&format!("{MINIMAL}[train]\nema_check_every = 0\n"), "mem").unwrap();
        off.validate("mem").unwrap();
        assert_eq!(off.train.ema_check_every, 0);
        let err = JobConfig::parse(&format!("{MINIMAL}[train]\nema_check_every = -5\n"), "j").unwrap_err().to_string();
        assert!(err.contains("ema_check_every"), "{err}");
    }

    #[test]
    fn round_trips_through_toml() {
        let c = JobConfig::parse(MINIMAL, "mem").unwrap();
        let again = JobConfig::parse(&c.to_toml(), "again").unwrap();
        assert_eq!(c, again);
        assert_eq!(c.hash(), again.hash());
    }
}
