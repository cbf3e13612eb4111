//! Model families. Each file reads like its paper's figure; shared blocks live in `layers`.

pub mod albef;
pub mod alignment;
pub mod bert;
pub mod blip;
pub mod clip;
pub mod layers;
pub mod text;
pub mod vit;

/// Errors building or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A preset name the family does not define.
    #[error("unknown {family} preset {preset:?}")]
    UnknownPreset {
        /// Model family.
        family: String,
        /// The preset asked for.
        preset: String,
    },
    /// Weights that do not fit the model.
    #[error("weights {origin}: {reason}")]
    Weights {
        /// Where the weights came from.
        origin: String,
        /// What did not fit.
        reason: String,
    },
}
