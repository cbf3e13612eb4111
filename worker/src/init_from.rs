//! `[model] init_from`: starting a job from reference weights instead of a random
//! initialisation, through each family's key map.
//!
//! - CLIP: open_clip's layout (`braid export --format open_clip` writes it); every tensor.
//! - ALBEF: torchmultimodal's `ALBEFModelWithSimilarity` state dict. It has no ITM or MLM head,
//!   so those keep their initialisation.
//! - BLIP: transformers' `BlipForImageTextRetrieval` (encoders, projections, ITM head) or
//!   `BlipForConditionalGeneration` (encoders, decoder, LM head) state dict, told apart by its
//!   keys; the parts the layout does not hold keep their initialisation.
//!
//! The momentum encoders of ALBEF and BLIP start as copies of the loaded weights, as they do
//! after a random initialisation. The optimizer state starts fresh.

use crate::export::{load_open_clip_weights, ExportError};
use crate::infer::{blip_layout, BlipLayout};
use crate::models::{albef, blip};
use crate::trainer::{ModelSpec, TrainError, Trainer};

/// Why reference weights could not start a job.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The weights could not be read, or are not CLIP's.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// The weights do not fit the model.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The weights are not in the family's reference layout.
    #[error("init_from {location}: {reason}")]
    Layout {
        /// The weights file.
        location: String,
        /// What is wrong.
        reason: String,
    },
}

/// Loads the reference weights at `location` into `trainer`; returns the parameters that kept
/// their initialisation (heads the reference layout does not have).
pub fn init_from(trainer: &mut Trainer, location: &str) -> Result<Vec<String>, InitError> {
    let layout = |reason: String| InitError::Layout { location: location.to_string(), reason };
    match trainer.spec().clone() {
        ModelSpec::Clip(_) => {
            crate::export::init_from_open_clip(trainer, location)?;
            Ok(Vec::new())
        }
        ModelSpec::Albef { config, .. } => {
            let tensors = load_open_clip_weights(location)?;
            let (online, _momentum) = albef::import_torchmultimodal(&tensors, &config).map_err(|e| layout(e.to_string()))?;
            let heads = |name: &str| name.starts_with("itm_head.") || name.starts_with("mlm_head.");
            Ok(trainer.load_partial_weights(&online, heads, location)?)
        }
        ModelSpec::Blip { config, .. } => {
            let tensors = load_open_clip_weights(location)?;
            let keys: Vec<&str> = tensors.iter().map(|(k, _)| k.as_str()).collect();
            let (retrieval, captioning) = match blip_layout(&keys).map_err(layout)? {
                BlipLayout::Retrieval => (Some(tensors.as_slice()), None),
                BlipLayout::Captioning => (None, Some(tensors.as_slice())),
            };
            let params = blip::import_transformers(retrieval, captioning, &config).map_err(|e| layout(e.to_string()))?;
            let from_retrieval = retrieval.is_some();
            // Retrieval weights lack the decoder's self-attention and the LM head; captioning
            // weights lack the encoder's self-attention, the projections, the ITM head and temp.
            let absent = move |name: &str| {
                if from_retrieval {
                    name.starts_with("text_decoder.") || name.starts_with("lm_head.")
                } else {
                    name.contains(".attention.") && name.starts_with("text.encoder.")
                        || ["vision_proj.", "text_proj.", "itm_head."].iter().any(|p| name.starts_with(p))
                        || name == "temp"
                }
            };
            Ok(trainer.load_partial_weights(&params, absent, location)?)
        }
    }
}
