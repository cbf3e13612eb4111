//! `braid export` for the momentum families: a committed checkpoint's model in the layout of
//! their reference implementations, through the same key maps as `[model] init_from`.
//!
//! - ALBEF (`--format torchmultimodal`): one safetensors file that torchmultimodal's
//!   `ALBEFModelWithSimilarity.load_state_dict(..., strict=False)` takes: the online weights and,
//!   under the `*_m` modules, the momentum encoders. torchmultimodal has no ITM or MLM head and
//!   keeps its queues in another layout, so those are not written.
//! - BLIP (`--format transformers`): `retrieval.safetensors` (`BlipForImageTextRetrieval`) and
//!   `captioning.safetensors` (`BlipForConditionalGeneration`, the decoder being the shared
//!   encoder weights with the decoder's own self-attention), each a state dict that
//!   `load_state_dict(..., strict=True)` takes.

use braid_coordinator::config::JobConfig;
use tch::Tensor;

use crate::checkpoint::{self, CheckpointStore};
use crate::data::tokenizer::load_tokenizer;
use crate::export::{resolve_checkpoint, write_object, ExportError, ExportReport, Result, MODEL_PREFIX};
use crate::models::{albef, blip};
use crate::trainer::{model_spec, ModelSpec};

/// Prefix of the momentum encoders' tensors in a checkpoint.
const MOMENTUM_PREFIX: &str = "momentum.";

/// Exports the ALBEF or BLIP model of `checkpoint` (a root, step folder or step manifest),
/// trained by `job`, in its reference layout: a file (ALBEF) or a folder (BLIP) at `out`.
pub fn export_reference(checkpoint: &str, job: &JobConfig, out: &str) -> Result<ExportReport> {
    let reference = resolve_checkpoint(checkpoint)?;
    let store = CheckpointStore::open(&reference.root)?;
    let (manifest, tensors) = store.read_checkpoint(&reference.manifest)?;
    let tokenizer = load_tokenizer(&job.data.tokenizer)?;
    let spec = model_spec(job, tokenizer.as_ref())?;
    let strip = |prefix: &str| -> Vec<(String, Tensor)> {
        tensors.iter().filter_map(|(name, t)| name.strip_prefix(prefix).map(|n| (n.to_string(), t.shallow_clone()))).collect()
    };
    let (online, momentum) = (strip(MODEL_PREFIX), strip(MOMENTUM_PREFIX));
    let (format, files, written) = match &spec {
        ModelSpec::Albef { config, .. } => {
            let exported = albef::export_torchmultimodal(&online, Some(&momentum), config);
            let file = write_object(out, checkpoint::to_safetensors(&exported)?)?;
            ("torchmultimodal", vec![file], exported.len())
        }
        ModelSpec::Blip { config, .. } => {
            let (retrieval, captioning) = blip::export_transformers(&online, config);
            let folder = out.trim_end_matches('/');
            let files = vec![
                write_object(&format!("{folder}/retrieval.safetensors"), checkpoint::to_safetensors(&retrieval)?)?,
                write_object(&format!("{folder}/captioning.safetensors"), checkpoint::to_safetensors(&captioning)?)?,
            ];
            ("transformers", files, retrieval.len() + captioning.len())
        }
        ModelSpec::Clip(_) => {
            return Err(ExportError::Weights {
                origin: reference.manifest_url(),
                reason: "CLIP exports as --format open_clip or hf".into(),
            })
        }
    };
    Ok(ExportReport { format: format.into(), checkpoint: reference.manifest_url(), step: manifest.step, tensors: written, files, warnings: Vec::new() })
}
