//! Portable checkpoints: a committed checkpoint's model written in the layouts other libraries
//! load, open_clip-layout weights read back as a starting point, and the committed checkpoints
//! of a root listed and inspected.
//!
//! - **open_clip**: one safetensors file with open_clip's parameter names (the checkpoint's
//!   `model.*` tensors without the prefix); `open_clip.CLIP(...).load_state_dict(
//!   safetensors.torch.load_file(path))` loads it with `strict=True`. `[model] init_from` reads
//!   the same layout.
//! - **hf**: a folder with `model.safetensors` in the layout of transformers' `CLIPModel` and its
//!   `config.json`, for `CLIPModel.from_pretrained(folder)`. open_clip's fused attention input
//!   projection is split into `q_proj`, `k_proj` and `v_proj`, and the two output projections
//!   (`x @ proj` in open_clip) become the transposed `nn.Linear` weights. The image tower
//!   computes what braid's does. transformers pools the text tower at the first `eos_token_id`
//!   (written from the job's tokenizer), except when that id is 2, where it keeps its legacy rule
//!   and pools at the largest id in the row (as do releases before 4.31); text embeddings
//!   therefore agree in every case only for a tokenizer whose end token has the highest id,
//!   like CLIP BPE. An export that cannot agree says so in [`ExportReport::warnings`].
//!
//! Tensors keep the checkpoint's kind (fp32 master weights for fp32 and bf16 jobs).
//!
//! Listing reads `step-*/manifest.json` below a root, on any backend of the store layer
//! ([`crate::data::store`]): the root's step folders come from a delimiter listing.

use braid_coordinator::commit::CheckpointManifest as CommittedManifest;
use braid_coordinator::config::JobConfig;
use bytes::Bytes;
use serde::Serialize;
use tch::Tensor;
use url::Url;

use crate::checkpoint::{self, CheckpointError, CheckpointStore};
use crate::data::store;
use crate::data::tokenizer::{load_tokenizer, TextTokenizer, TokenizerError};
use crate::models::clip::ClipConfig;
use crate::models::layers::{Activation, TransformerShape};
use crate::models::ModelError;
use crate::trainer::{clip_config, Trainer, TrainError};

/// Prefix of the model's tensors in a checkpoint.
pub const MODEL_PREFIX: &str = "model.";

/// Name of the weights file in a transformers model folder.
pub const HF_WEIGHTS_FILE: &str = "model.safetensors";

/// Name of the configuration file in a transformers model folder.
pub const HF_CONFIG_FILE: &str = "config.json";

/// open_clip's initial logit scale, ln(1 / 0.07), as transformers' config records it.
const LOGIT_SCALE_INIT: f64 = 2.6592;

/// Errors exporting, importing or listing checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The checkpoint root does not exist.
    #[error("no checkpoint root at {url}: the folder does not exist")]
    NoRoot {
        /// The root as given, as a URL.
        url: String,
    },
    /// The root exists but nothing was committed there.
    #[error("no committed checkpoint under {url}: it has no `latest`")]
    NothingCommitted {
        /// The root's URL.
        url: String,
    },
    /// Weights that are not the tensors of the model they are meant for.
    #[error("weights {origin} do not fit the model: {reason}")]
    Weights {
        /// Where the weights came from.
        origin: String,
        /// Every mismatch found.
        reason: String,
    },
    /// A checkpoint part or manifest could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The object store failed.
    #[error(transparent)]
    Store(#[from] crate::data::Error),
    /// The job's tokenizer could not be loaded.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The job's model could not be built.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The weights could not be copied into the model.
    #[error(transparent)]
    Train(#[from] TrainError),
}

/// Result with [`ExportError`].
pub type Result<T, E = ExportError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------------
// Naming a committed checkpoint
// ---------------------------------------------------------------------------------------------

/// A committed checkpoint: its root and its manifest relative to the root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointRef {
    /// The checkpoint root's URL.
    pub root: String,
    /// The manifest, relative to the root (`step-000099/manifest.json`).
    pub manifest: String,
}

impl CheckpointRef {
    /// The manifest's URL.
    pub fn manifest_url(&self) -> String {
        format!("{}/{}", self.root, self.manifest)
    }
}

/// The step a folder name `step-NNNNNN` stands for.
pub fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    (digits.len() >= 6 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// Resolves a checkpoint given as a root (the manifest `latest` points at), a step folder
/// (`.../step-000099`) or a step manifest (`.../step-000099/manifest.json`).
pub fn resolve_checkpoint(location: &str) -> Result<CheckpointRef> {
    let url = store::parse_location(location)?;
    let text = url.as_str().trim_end_matches('/');
    if let Some(step_dir) = text.strip_suffix("/manifest.json") {
        let (root, step) = step_dir.rsplit_once('/').unwrap_or((".", step_dir));
        return Ok(CheckpointRef { root: root.to_string(), manifest: format!("{step}/manifest.json") });
    }
    if let Some((root, last)) = text.rsplit_once('/') {
        if parse_step_dir(last).is_some() {
            return Ok(CheckpointRef { root: root.to_string(), manifest: format!("{last}/manifest.json") });
        }
    }
    let checkpoints = CheckpointStore::open(text)?;
    match checkpoints.latest()? {
        Some(manifest) => Ok(CheckpointRef { root: text.to_string(), manifest }),
        None if local_folder(&url).is_some_and(|dir| !dir.is_dir()) => {
            Err(ExportError::NoRoot { url: text.to_string() })
        }
        None => Err(ExportError::NothingCommitted { url: text.to_string() }),
    }
}

/// The local folder a `file://` URL names.
fn local_folder(url: &Url) -> Option<std::path::PathBuf> {
    (url.scheme() == "file").then(|| url.to_file_path().ok()).flatten()
}

/// Reads a committed checkpoint's model: its step and the `model.*` tensors under their
/// open_clip names (every part's sha256 verified).
pub fn read_model(checkpoint: &CheckpointRef) -> Result<(u64, Vec<(String, Tensor)>)> {
    let checkpoints = CheckpointStore::open(&checkpoint.root)?;
    let (manifest, tensors) = checkpoints.read_checkpoint(&checkpoint.manifest)?;
    let model: Vec<(String, Tensor)> = tensors
        .into_iter()
        .filter_map(|(name, t)| name.strip_prefix(MODEL_PREFIX).map(|n| (n.to_string(), t)))
        .collect();
    if model.is_empty() {
        return Err(ExportError::Weights {
            origin: checkpoint.manifest_url(),
            reason: format!("the checkpoint holds no {MODEL_PREFIX}* tensors"),
        });
    }
    Ok((manifest.step, model))
}

// ---------------------------------------------------------------------------------------------
// The key map
// ---------------------------------------------------------------------------------------------

/// Where an open_clip tensor goes in transformers' `CLIPModel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HfTarget {
    /// The same tensor under another name.
    Same(String),
    /// The transposed matrix: open_clip's `x @ proj` as an `nn.Linear` weight.
    Transposed(String),
    /// The fused attention input projection cut along its first dimension into q, k and v.
    SplitQkv([String; 3]),
}

/// One tensor of CLIP: its open_clip name, its shape, and its place in transformers' layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMapping {
    /// open_clip's (and braid's) parameter name.
    pub open_clip: String,
    /// The tensor's shape.
    pub shape: Vec<i64>,
    /// Its name(s) in transformers' `CLIPModel`.
    pub hf: HfTarget,
}

/// Every tensor of a CLIP model of `config`, in open_clip's order: image tower, text tower,
/// logit scale.
pub fn clip_key_map(config: &ClipConfig) -> Vec<KeyMapping> {
    let mut map = Vec::new();
    let mut add = |open_clip: String, shape: Vec<i64>, hf: HfTarget| map.push(KeyMapping { open_clip, shape, hf });
    let same = |s: String| HfTarget::Same(s);

    let v = &config.vision;
    let vw = v.transformer.width;
    add("visual.class_embedding".into(), vec![vw], same("vision_model.embeddings.class_embedding".into()));
    add(
        "visual.positional_embedding".into(),
        vec![v.grid() * v.grid() + 1, vw],
        same("vision_model.embeddings.position_embedding.weight".into()),
    );
    add("visual.proj".into(), vec![vw, config.embed_dim], HfTarget::Transposed("visual_projection.weight".into()));
    add(
        "visual.conv1.weight".into(),
        vec![vw, 3, v.patch_size, v.patch_size],
        same("vision_model.embeddings.patch_embedding.weight".into()),
    );
    for p in ["weight", "bias"] {
        add(format!("visual.ln_pre.{p}"), vec![vw], same(format!("vision_model.pre_layrnorm.{p}")));
    }
    blocks("visual.transformer", "vision_model.encoder", &v.transformer, &mut add);
    for p in ["weight", "bias"] {
        add(format!("visual.ln_post.{p}"), vec![vw], same(format!("vision_model.post_layernorm.{p}")));
    }

    let t = &config.text;
    let tw = t.transformer.width;
    add(
        "positional_embedding".into(),
        vec![t.context_length, tw],
        same("text_model.embeddings.position_embedding.weight".into()),
    );
    add("text_projection".into(), vec![tw, t.output_dim], HfTarget::Transposed("text_projection.weight".into()));
    add(
        "token_embedding.weight".into(),
        vec![t.vocab_size, tw],
        same("text_model.embeddings.token_embedding.weight".into()),
    );
    blocks("transformer", "text_model.encoder", &t.transformer, &mut add);
    for p in ["weight", "bias"] {
        add(format!("ln_final.{p}"), vec![tw], same(format!("text_model.final_layer_norm.{p}")));
    }

    add("logit_scale".into(), vec![], same("logit_scale".into()));
    map
}

/// The residual blocks of one tower: open_clip's `resblocks.N` to transformers' `layers.N`.
fn blocks(open_clip: &str, hf: &str, shape: &TransformerShape, add: &mut impl FnMut(String, Vec<i64>, HfTarget)) {
    let w = shape.width;
    let hidden = mlp_hidden(shape);
    for i in 0..shape.layers {
        let (o, h) = (format!("{open_clip}.resblocks.{i}"), format!("{hf}.layers.{i}"));
        for p in ["weight", "bias"] {
            add(format!("{o}.ln_1.{p}"), vec![w], HfTarget::Same(format!("{h}.layer_norm1.{p}")));
        }
        add(
            format!("{o}.attn.in_proj_weight"),
            vec![3 * w, w],
            HfTarget::SplitQkv(["q", "k", "v"].map(|x| format!("{h}.self_attn.{x}_proj.weight"))),
        );
        add(
            format!("{o}.attn.in_proj_bias"),
            vec![3 * w],
            HfTarget::SplitQkv(["q", "k", "v"].map(|x| format!("{h}.self_attn.{x}_proj.bias"))),
        );
        add(format!("{o}.attn.out_proj.weight"), vec![w, w], HfTarget::Same(format!("{h}.self_attn.out_proj.weight")));
        add(format!("{o}.attn.out_proj.bias"), vec![w], HfTarget::Same(format!("{h}.self_attn.out_proj.bias")));
        for p in ["weight", "bias"] {
            add(format!("{o}.ln_2.{p}"), vec![w], HfTarget::Same(format!("{h}.layer_norm2.{p}")));
        }
        add(format!("{o}.mlp.c_fc.weight"), vec![hidden, w], HfTarget::Same(format!("{h}.mlp.fc1.weight")));
        add(format!("{o}.mlp.c_fc.bias"), vec![hidden], HfTarget::Same(format!("{h}.mlp.fc1.bias")));
        add(format!("{o}.mlp.c_proj.weight"), vec![w, hidden], HfTarget::Same(format!("{h}.mlp.fc2.weight")));
        add(format!("{o}.mlp.c_proj.bias"), vec![w], HfTarget::Same(format!("{h}.mlp.fc2.bias")));
    }
}

/// Hidden size of a block's MLP, as the model builds it.
fn mlp_hidden(shape: &TransformerShape) -> i64 {
    (shape.width as f64 * shape.mlp_ratio) as i64
}

/// Checks that `weights` are exactly the tensors of a CLIP of `config`, with its shapes;
/// reports every missing, unexpected and misshapen tensor at once.
pub fn check_weights(weights: &[(String, Tensor)], config: &ClipConfig, origin: &str) -> Result<()> {
    let map = clip_key_map(config);
    let given: std::collections::HashMap<&str, &Tensor> = weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut problems = Vec::new();
    for m in &map {
        match given.get(m.open_clip.as_str()) {
            None => problems.push(format!("missing {:?}", m.open_clip)),
            Some(t) if t.size() != m.shape => {
                problems.push(format!("{:?} has shape {:?}, the model needs {:?}", m.open_clip, t.size(), m.shape))
            }
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = map.iter().map(|m| m.open_clip.as_str()).collect();
    let mut unexpected: Vec<&str> = given.keys().copied().filter(|n| !known.contains(n)).collect();
    unexpected.sort_unstable();
    problems.extend(unexpected.iter().map(|n| format!("unexpected {n:?}")));
    if problems.is_empty() {
        return Ok(());
    }
    const SHOWN: usize = 12;
    let mut reason = problems.iter().take(SHOWN).cloned().collect::<Vec<_>>().join("; ");
    if problems.len() > SHOWN {
        reason.push_str(&format!("; and {} more", problems.len() - SHOWN));
    }
    Err(ExportError::Weights { origin: origin.to_string(), reason })
}

// ---------------------------------------------------------------------------------------------
// transformers' layout
// ---------------------------------------------------------------------------------------------

/// Converts open_clip-named weights of a CLIP of `config` to transformers' `CLIPModel` names.
/// The weights must have passed [`check_weights`].
pub fn to_hf(weights: &[(String, Tensor)], config: &ClipConfig) -> Vec<(String, Tensor)> {
    let given: std::collections::HashMap<&str, &Tensor> = weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = Vec::new();
    for m in clip_key_map(config) {
        let t = given[m.open_clip.as_str()];
        match m.hf {
            HfTarget::Same(name) => out.push((name, t.shallow_clone())),
            HfTarget::Transposed(name) => out.push((name, t.transpose(0, 1).contiguous())),
            HfTarget::SplitQkv(names) => {
                for (name, part) in names.into_iter().zip(t.chunk(3, 0)) {
                    out.push((name, part.contiguous()));
                }
            }
        }
    }
    out
}

/// Ids of the text tower's special tokens, under transformers' names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SpecialTokens {
    /// The token every text starts with, if any.
    pub bos_token_id: Option<i64>,
    /// The token every text ends with (where the text tower pools), if any.
    pub eos_token_id: Option<i64>,
    /// The padding id.
    pub pad_token_id: Option<i64>,
}

impl SpecialTokens {
    /// Reads the special tokens off `tokenizer` by encoding two texts that share no word:
    /// a token both start (end) with is the start (end) token.
    pub fn of(tokenizer: &dyn TextTokenizer, context_length: usize) -> Self {
        let a = tokenizer.encode("a", context_length);
        let b = tokenizer.encode("photo", context_length);
        let at = |ids: &[i64], i: usize| ids.get(i).copied();
        let first = at(&a.ids, 0).filter(|id| a.eot_index > 0 && at(&b.ids, 0) == Some(*id));
        let last = at(&a.ids, a.eot_index).filter(|id| at(&b.ids, b.eot_index) == Some(*id));
        let pad = (a.eot_index + 1 < context_length).then(|| at(&a.ids, context_length - 1)).flatten();
        Self { bos_token_id: first, eos_token_id: last, pad_token_id: pad }
    }
}

/// transformers' name of an activation.
fn hf_activation(activation: Activation) -> &'static str {
    match activation {
        Activation::Gelu => "gelu",
        Activation::QuickGelu => "quick_gelu",
    }
}

/// transformers' `CLIPConfig` (`config.json`) of a CLIP of `config`.
pub fn hf_config(config: &ClipConfig, tokens: &SpecialTokens) -> serde_json::Value {
    let act = hf_activation(config.activation);
    let (v, t) = (&config.vision, &config.text);
    serde_json::json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": LOGIT_SCALE_INIT,
        "initializer_factor": 1.0,
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.transformer.width,
            "intermediate_size": mlp_hidden(&t.transformer),
            "num_hidden_layers": t.transformer.layers,
            "num_attention_heads": t.transformer.heads,
            "max_position_embeddings": t.context_length,
            "projection_dim": config.embed_dim,
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "attention_dropout": 0.0,
            "bos_token_id": tokens.bos_token_id,
            "eos_token_id": tokens.eos_token_id,
            "pad_token_id": tokens.pad_token_id,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v.transformer.width,
            "intermediate_size": mlp_hidden(&v.transformer),
            "num_hidden_layers": v.transformer.layers,
            "num_attention_heads": v.transformer.heads,
            "num_channels": 3,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "projection_dim": config.embed_dim,
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "attention_dropout": 0.0,
        },
    })
}

/// Why transformers' text tower would pool elsewhere than braid's with these tokens, if it would.
pub fn hf_text_pooling_warning(tokens: &SpecialTokens, vocab_size: i64) -> Option<String> {
    match tokens.eos_token_id {
        None => Some(
            "the tokenizer ends texts with no fixed end token; transformers pools the text tower at \
             eos_token_id, so its text embeddings will differ from braid's"
                .into(),
        ),
        Some(2) if vocab_size - 1 != 2 => Some(
            "the end token's id is 2, for which transformers pools the text tower at the largest id \
             in each row instead; its text embeddings will differ from braid's (image embeddings agree)"
                .into(),
        ),
        Some(_) => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Export
// ---------------------------------------------------------------------------------------------

/// One file an export wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportedFile {
    /// Its URL.
    pub url: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// `open_clip` or `hf`.
    pub format: String,
    /// The manifest of the exported checkpoint.
    pub checkpoint: String,
    /// Its step.
    pub step: u64,
    /// Tensors written.
    pub tensors: usize,
    /// The files written.
    pub files: Vec<ExportedFile>,
    /// What will not match braid in the target library.
    pub warnings: Vec<String>,
}

/// The CLIP shape of `job` with its tokenizer's vocabulary, and the tokenizer.
fn job_model(job: &JobConfig) -> Result<(ClipConfig, std::sync::Arc<dyn TextTokenizer>)> {
    let tokenizer = load_tokenizer(&job.data.tokenizer)?;
    Ok((clip_config(job, tokenizer.vocab_size() as i64)?, tokenizer))
}

/// Writes `bytes` to a local path or URL, replacing what was there.
pub(crate) fn write_object(location: &str, bytes: Vec<u8>) -> Result<ExportedFile> {
    let target = store::open(location)?;
    let size = bytes.len() as u64;
    store::block_on(target.put(Bytes::from(bytes)))??;
    Ok(ExportedFile { url: target.url().to_string(), bytes: size })
}

/// Writes open_clip-named weights as one safetensors file at `out` (a path or URL).
pub fn write_open_clip(weights: &[(String, Tensor)], out: &str) -> Result<ExportedFile> {
    write_object(out, checkpoint::to_safetensors(weights)?)
}

/// Exports the model of `checkpoint` (a root, step folder or step manifest) in open_clip's
/// layout to the file `out`. With `job`, the tensors are first checked against the job's model.
pub fn export_open_clip(checkpoint: &str, job: Option<&JobConfig>, out: &str) -> Result<ExportReport> {
    let reference = resolve_checkpoint(checkpoint)?;
    let (step, weights) = read_model(&reference)?;
    if let Some(job) = job {
        check_weights(&weights, &job_model(job)?.0, &reference.manifest_url())?;
    }
    let file = write_open_clip(&weights, out)?;
    Ok(ExportReport {
        format: "open_clip".into(),
        checkpoint: reference.manifest_url(),
        step,
        tensors: weights.len(),
        files: vec![file],
        warnings: Vec::new(),
    })
}

/// Exports the model of `checkpoint` (a root, step folder or step manifest) in transformers'
/// `CLIPModel` layout into the folder `out`: `model.safetensors` and `config.json`. The job gives
/// the heads, activation and tokenizer that the tensors do not record.
pub fn export_hf(checkpoint: &str, job: &JobConfig, out: &str) -> Result<ExportReport> {
    let reference = resolve_checkpoint(checkpoint)?;
    let (step, weights) = read_model(&reference)?;
    let (config, tokenizer) = job_model(job)?;
    check_weights(&weights, &config, &reference.manifest_url())?;
    let tokens = SpecialTokens::of(tokenizer.as_ref(), config.text.context_length as usize);
    let hf = to_hf(&weights, &config);
    let folder = out.trim_end_matches('/');
    let json = serde_json::to_vec_pretty(&hf_config(&config, &tokens)).expect("a JSON value always serialises");
    let files = vec![
        write_object(&format!("{folder}/{HF_WEIGHTS_FILE}"), checkpoint::to_safetensors(&hf)?)?,
        write_object(&format!("{folder}/{HF_CONFIG_FILE}"), json)?,
    ];
    Ok(ExportReport {
        format: "hf".into(),
        checkpoint: reference.manifest_url(),
        step,
        tensors: hf.len(),
        files,
        warnings: hf_text_pooling_warning(&tokens, config.text.vocab_size).into_iter().collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Import
// ---------------------------------------------------------------------------------------------

/// Reads open_clip-layout weights (a safetensors file, as `[model] init_from` names it) from a
/// local path or URL.
pub fn load_open_clip_weights(location: &str) -> Result<Vec<(String, Tensor)>> {
    let source = store::open(location)?;
    let bytes = store::block_on(source.read_all())??;
    Ok(checkpoint::from_safetensors(&bytes, source.url())?)
}

/// Starts `trainer` from the open_clip-layout weights at `location` (`[model] init_from`):
/// the file must hold exactly the model's tensors with its shapes; the optimizer state stays
/// fresh.
pub fn init_from_open_clip(trainer: &mut Trainer, location: &str) -> Result<()> {
    let weights = load_open_clip_weights(location)?;
    let clip = trainer.clip().ok_or_else(|| ExportError::Weights {
        origin: location.to_string(),
        reason: format!("open_clip weights start a CLIP model; this job trains {}", trainer.spec().family()),
    })?;
    check_weights(&weights, clip.config(), location)?;
    trainer.load_weights(&weights, location)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Listing and inspecting
// ---------------------------------------------------------------------------------------------

/// One committed checkpoint of a root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointSummary {
    /// Its step.
    pub step: u64,
    /// The committed attempt.
    pub attempt: String,
    /// When it was committed (RFC 3339, UTC).
    pub committed_at: String,
    /// Total bytes of its parts.
    pub bytes: u64,
    /// Ranks that wrote it.
    pub world_size: u32,
    /// Generation those ranks formed.
    pub generation: u64,
    /// Its manifest, relative to the root.
    pub manifest: String,
    /// True for the checkpoint `latest` points at.
    pub latest: bool,
}

/// The committed checkpoints of a root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointListing {
    /// The root's URL.
    pub root: String,
    /// What `latest` holds, if it exists.
    pub latest: Option<String>,
    /// Committed checkpoints by step.
    pub checkpoints: Vec<CheckpointSummary>,
    /// Step folders without a manifest (attempts never committed, or in progress).
    pub uncommitted_steps: Vec<u64>,
}

/// Names of the folders directly below a root, listed through the root's store.
fn folders_below(root: &Url) -> Result<Vec<String>> {
    let url = root.as_str().trim_end_matches('/').to_string();
    if local_folder(root).is_some_and(|dir| !dir.is_dir()) {
        return Err(ExportError::NoRoot { url });
    }
    let location = store::open(&url)?;
    let (objects, prefix) = (location.inner().store(), location.inner().path());
    let listing =
        store::block_on(objects.list_with_delimiter(Some(prefix)))?.map_err(|e| crate::data::Error::store(&url, e))?;
    Ok(listing.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect())
}

/// Reads a committed manifest with every field the coordinator writes.
fn read_committed_manifest(root: &str, manifest: &str) -> Result<CommittedManifest> {
    let location = store::open(&format!("{root}/{manifest}"))?;
    let bytes = store::block_on(location.read_all())??;
    serde_json::from_slice(&bytes)
        .map_err(|e| CheckpointError::Manifest { path: location.url().to_string(), reason: e.to_string() }.into())
}

/// Lists the committed checkpoints under a root (a local path or a URL), oldest first.
pub fn list_checkpoints(root: &str) -> Result<CheckpointListing> {
    let url = store::parse_location(root)?;
    let text = url.as_str().trim_end_matches('/').to_string();
    let mut steps: Vec<(u64, String)> =
        folders_below(&url)?.into_iter().filter_map(|f| parse_step_dir(&f).map(|s| (s, f))).collect();
    steps.sort_unstable();
    let latest = CheckpointStore::open(&text)?.latest()?;
    let mut listing = CheckpointListing {
        root: text.clone(),
        latest: latest.clone(),
        checkpoints: Vec::new(),
        uncommitted_steps: Vec::new(),
    };
    for (step, folder) in steps {
        let manifest = format!("{folder}/manifest.json");
        match read_committed_manifest(&text, &manifest) {
            Ok(m) => listing.checkpoints.push(CheckpointSummary {
                step: m.step,
                attempt: m.attempt,
                committed_at: m.committed_at,
                bytes: m.parts.iter().map(|p| p.size).sum(),
                world_size: m.world_size,
                generation: m.generation,
                latest: latest.as_deref() == Some(manifest.as_str()),
                manifest,
            }),
            Err(ExportError::Store(e)) if e.is_not_found() => listing.uncommitted_steps.push(step),
            Err(e) => return Err(e),
        }
    }
    Ok(listing)
}

/// Reads the manifest of one committed checkpoint, given as for [`resolve_checkpoint`].
pub fn show_checkpoint(location: &str) -> Result<(CheckpointRef, CommittedManifest)> {
    let reference = resolve_checkpoint(location)?;
    let manifest = read_committed_manifest(&reference.root, &reference.manifest)?;
    Ok((reference, manifest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenizer::ClipBpe;
    use tch::{nn, Device, Kind};

    fn tiny(activation: Activation) -> ClipConfig {
        ClipConfig::preset("tiny", 49408, Some(32), activation).unwrap()
    }

    fn job(seed: u64) -> JobConfig {
        let text = format!(
            "[job]\nname = \"export-test\"\nseed = {seed}\n[data]\ntrain = \"/nowhere/manifest.json\"\ntokenizer = \"clip-bpe\"\n"
        );
        JobConfig::parse(&text, "test job").unwrap()
    }

    fn random_weights(config: ClipConfig, seed: i64) -> Vec<(String, Tensor)> {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = crate::models::clip::Clip::new(&vs.root(), config);
        let mut weights: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, t)| (n, t.detach())).collect();
        weights.sort_by(|a, b| a.0.cmp(&b.0));
        weights
    }

    #[test]
    fn key_map_names_every_parameter_of_the_model_with_its_shape() {
        for preset in ["tiny", "vit-b-16"] {
            let config = ClipConfig::preset(preset, 49408, None, Activation::QuickGelu).unwrap();
            let vs = nn::VarStore::new(Device::Cpu);
            let _model = tch::no_grad(|| crate::models::clip::Clip::new(&vs.root(), config));
            let mut model: Vec<(String, Vec<i64>)> = vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
            let mut mapped: Vec<(String, Vec<i64>)> =
                clip_key_map(&config).into_iter().map(|m| (m.open_clip, m.shape)).collect();
            model.sort();
            mapped.sort();
            assert_eq!(mapped, model, "{preset}");
        }
    }

    #[test]
    fn hf_layout_splits_qkv_and_transposes_projections() {
        let config = tiny(Activation::Gelu);
        let weights = random_weights(config, 1);
        check_weights(&weights, &config, "random").unwrap();
        let hf: std::collections::HashMap<String, Tensor> = to_hf(&weights, &config).into_iter().collect();
        let get = |n: &str| &weights.iter().find(|(k, _)| k == n).unwrap().1;
        let in_proj = get("transformer.resblocks.1.attn.in_proj_weight");
        let w = config.text.transformer.width;
        for (i, x) in ["q", "k", "v"].iter().enumerate() {
            let part = &hf[&format!("text_model.encoder.layers.1.self_attn.{x}_proj.weight")];
            assert!(part.equal(&in_proj.narrow(0, i as i64 * w, w)), "{x}_proj");
        }
        assert!(hf["visual_projection.weight"].equal(&get("visual.proj").transpose(0, 1)));
        assert!(hf["text_projection.weight"].equal(&get("text_projection").transpose(0, 1)));
        assert!(hf["vision_model.pre_layrnorm.bias"].equal(get("visual.ln_pre.bias")));
        let elements: usize = weights.iter().map(|(_, t)| t.numel()).sum();
        assert_eq!(hf.values().map(Tensor::numel).sum::<usize>(), elements);
        // 12 tensors per open_clip block become 16 (q/k/v weight and bias).
        assert_eq!(hf.len(), weights.len() + 4 * 4);
    }

    #[test]
    fn weights_that_do_not_fit_are_reported_together() {
        let config = tiny(Activation::Gelu);
        let mut weights = random_weights(config, 2);
        weights.retain(|(n, _)| n != "logit_scale");
        weights.push(("logit_bias".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu))));
        for (n, t) in weights.iter_mut() {
            if n == "visual.proj" {
                *t = Tensor::zeros([64, 32], (Kind::Float, Device::Cpu));
            }
        }
        let err = check_weights(&weights, &config, "file:///w.safetensors").unwrap_err().to_string();
        for needle in [
            "file:///w.safetensors",
            "missing \"logit_scale\"",
            "unexpected \"logit_bias\"",
            "\"visual.proj\" has shape [64, 32]",
        ] {
            assert!(err.contains(needle), "{needle} not in {err}");
        }
    }

    #[test]
    fn hf_config_describes_the_towers_and_clip_bpe_tokens() {
        let config = tiny(Activation::QuickGelu);
        let tokens = SpecialTokens::of(&ClipBpe::new(), 32);
        assert_eq!(
            tokens,
            SpecialTokens { bos_token_id: Some(49406), eos_token_id: Some(49407), pad_token_id: Some(0) }
        );
        assert_eq!(hf_text_pooling_warning(&tokens, 49408), None);
        let c = hf_config(&config, &tokens);
        assert_eq!(c["projection_dim"], 64);
        assert_eq!(c["text_config"]["vocab_size"], 49408);
        assert_eq!(c["text_config"]["max_position_embeddings"], 32);
        assert_eq!(c["text_config"]["intermediate_size"], 256);
        assert_eq!(c["text_config"]["eos_token_id"], 49407);
        assert_eq!(c["vision_config"]["image_size"], 32);
        assert_eq!(c["vision_config"]["patch_size"], 8);
        assert_eq!(c["vision_config"]["num_attention_heads"], 4);
        assert_eq!(c["vision_config"]["hidden_act"], "quick_gelu");
        let legacy = SpecialTokens { bos_token_id: Some(1), eos_token_id: Some(2), pad_token_id: Some(0) };
        assert!(hf_text_pooling_warning(&legacy, 100).is_some_and(|w| w.contains("id is 2")));
    }

    /// Writes a committed manifest like the coordinator's, with one part of `size` bytes.
    fn commit(root: &std::path::Path, step: u64, size: u64) {
        let dir = root.join(format!("step-{step:06}"));
        std::fs::create_dir_all(&dir).unwrap();
        let manifest = serde_json::json!({
            "step": step, "attempt": "a1", "job": "j", "config_hash": "abc", "braid_version": "0.1.0",
            "world_size": 2, "generation": 3, "committed_at": "2025-01-01T00:00:00Z",
            "parts": [{"path": format!("step-{step:06}/attempt-a1/rank-0.safetensors"), "sha256": "00", "size": size, "rank": 0}],
        });
        std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&manifest).unwrap()).unwrap();
    }

    #[test]
    fn checkpoints_resolve_and_list_with_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ckpt");
        let root_s = root.to_str().unwrap();
        let err = resolve_checkpoint(root_s).unwrap_err();
        assert!(matches!(err, ExportError::NoRoot { .. }) && err.to_string().contains(root_s), "{err}");
        let err = list_checkpoints(root_s).unwrap_err();
        assert!(matches!(err, ExportError::NoRoot { .. }) && err.to_string().contains(root_s), "{err}");
        std::fs::create_dir_all(&root).unwrap();
        let err = resolve_checkpoint(root_s).unwrap_err();
        assert!(matches!(err, ExportError::NothingCommitted { .. }) && err.to_string().contains(root_s), "{err}");

        commit(&root, 4, 100);
        commit(&root, 9, 250);
        std::fs::create_dir_all(root.join("step-000014/attempt-b")).unwrap();
        std::fs::write(root.join("latest"), "step-000009/manifest.json").unwrap();
        let got = resolve_checkpoint(root_s).unwrap();
        assert_eq!(got.manifest, "step-000009/manifest.json");
        assert!(got.root.starts_with("file://") && got.root.ends_with("/ckpt"), "{}", got.root);
        let by_manifest = resolve_checkpoint(&format!("{root_s}/step-000004/manifest.json")).unwrap();
        assert_eq!(
            (by_manifest.root.as_str(), by_manifest.manifest.as_str()),
            (got.root.as_str(), "step-000004/manifest.json")
        );
        let by_folder = resolve_checkpoint(&format!("{}/step-000004/", got.root)).unwrap();
        assert_eq!(by_folder, by_manifest);

        let listing = list_checkpoints(root_s).unwrap();
        assert_eq!(listing.latest.as_deref(), Some("step-000009/manifest.json"));
        assert_eq!(
            listing.checkpoints.iter().map(|c| (c.step, c.bytes, c.latest)).collect::<Vec<_>>(),
            [(4, 100, false), (9, 250, true)]
        );
        assert_eq!(listing.uncommitted_steps, [14]);
        let (reference, manifest) = show_checkpoint(root_s).unwrap();
        assert_eq!(
            (reference.manifest.as_str(), manifest.step, manifest.generation),
            ("step-000009/manifest.json", 9, 3)
        );
        let err = show_checkpoint(&format!("{root_s}/step-000014")).unwrap_err().to_string();
        assert!(err.contains("step-000014/manifest.json"), "{err}");
    }

    #[test]
    fn remote_roots_are_listed_through_the_store() {
        let root = "memory://export-listing/runs/ckpt";
        let put = |rel: &str, bytes: Vec<u8>| {
            let location = store::open(&format!("{root}/{rel}")).unwrap();
            store::block_on(location.put(Bytes::from(bytes))).unwrap().unwrap();
        };
        let err = resolve_checkpoint(root).unwrap_err();
        assert!(matches!(err, ExportError::NothingCommitted { .. }) && err.to_string().contains(root), "{err}");
        for step in [19u64, 39] {
            let dir = tempfile::tempdir().unwrap();
            commit(dir.path(), step, 10 * step);
            let rel = format!("step-{step:06}/manifest.json");
            put(&rel, std::fs::read(dir.path().join(&rel)).unwrap());
        }
        put("step-000059/attempt-x/rank-0.safetensors", vec![0]);
        put("latest", b"step-000039/manifest.json".to_vec());
        let listing = list_checkpoints(root).unwrap();
        assert_eq!(listing.root, root);
        let got: Vec<(u64, u64, bool)> = listing.checkpoints.iter().map(|c| (c.step, c.bytes, c.latest)).collect();
        assert_eq!(got, [(19, 190, false), (39, 390, true)]);
        assert_eq!(listing.uncommitted_steps, [59]);
        let (reference, manifest) = show_checkpoint(&format!("{root}/step-000019")).unwrap();
        assert_eq!((reference.root.as_str(), manifest.step), (root, 19));
    }

    #[test]
    fn open_clip_weights_round_trip_into_a_trainer() {
        let config = tiny(Activation::Gelu);
        let source = Trainer::new(&job(7), config, Device::Cpu).unwrap();
        let weights: Vec<(String, Tensor)> = source
            .state()
            .into_iter()
            .filter_map(|(n, t)| n.strip_prefix(MODEL_PREFIX).map(|n| (n.to_string(), t)))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.safetensors");
        write_open_clip(&weights, file.to_str().unwrap()).unwrap();

        let mut target = Trainer::new(&job(8), config, Device::Cpu).unwrap();
        init_from_open_clip(&mut target, file.to_str().unwrap()).unwrap();
        let got: std::collections::HashMap<String, Tensor> = target.state().into_iter().collect();
        for (name, t) in &weights {
            assert!(got[&format!("{MODEL_PREFIX}{name}")].equal(t), "{name}");
        }

        let shorter = ClipConfig::preset("tiny", 49408, Some(16), Activation::Gelu).unwrap();
        let mut wrong = Trainer::new(&job(9), shorter, Device::Cpu).unwrap();
        let err = init_from_open_clip(&mut wrong, file.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("w.safetensors") && err.contains("\"positional_embedding\" has shape [32, 64]"), "{err}");
        let missing = dir.path().join("missing.safetensors");
        let err = init_from_open_clip(&mut wrong, missing.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("missing.safetensors"), "{err}");
    }
}
