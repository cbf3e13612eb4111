//! The heads ALBEF and BLIP put on their encoders: projections of the image and text [CLS]
//! states into the contrastive space, the learnable temperature of the contrastive loss, and the
//! image-text matching head on the fused [CLS] state. Parameter names `vision_proj.*`,
//! `text_proj.*`, `itm_head.*` and `temp` under the model's root, as in both papers' code.

use tch::nn;
use tch::Tensor;

use super::layers::Linear;

/// Lower bound of the temperature (ALBEF and BLIP clamp it after every step).
pub const TEMP_MIN: f64 = 0.001;
/// Upper bound of the temperature.
pub const TEMP_MAX: f64 = 0.5;

/// Contrastive projections, temperature and ITM head.
#[derive(Debug)]
pub struct AlignmentHeads {
    /// Image [CLS] to the contrastive feature space.
    pub vision_proj: Linear,
    /// Text [CLS] to the contrastive feature space.
    pub text_proj: Linear,
    /// Fused [CLS] to the two image-text matching logits (not matched, matched).
    pub itm_head: Linear,
    /// Learnable temperature of the contrastive loss, a scalar.
    pub temp: Tensor,
}

impl AlignmentHeads {
    /// The heads under `root` for image states of `image_width`, text states of `text_width`,
    /// features of `embed_dim` and an initial temperature `temp`.
    pub fn new(root: &nn::Path, image_width: i64, text_width: i64, embed_dim: i64, temp: f64) -> Self {
        Self {
            vision_proj: Linear::new(root / "vision_proj", image_width, embed_dim, None),
            text_proj: Linear::new(root / "text_proj", text_width, embed_dim, None),
            itm_head: Linear::new(root / "itm_head", text_width, 2, None),
            temp: root.var("temp", &[], nn::Init::Const(temp)),
        }
    }

    /// The L2-normalised contrastive image feature [batch, embed_dim]: `vision_proj` of the
    /// [CLS] token of `image_states` [batch, tokens, width].
    pub fn image_feature(&self, image_states: &Tensor) -> Tensor {
        normalize(&image_states.select(1, 0).apply(&self.vision_proj))
    }

    /// The L2-normalised contrastive text feature [batch, embed_dim]: `text_proj` of the first
    /// token of `text_states`.
    pub fn text_feature(&self, text_states: &Tensor) -> Tensor {
        normalize(&text_states.select(1, 0).apply(&self.text_proj))
    }

    /// Image-text matching logits [batch, 2] of fused states: `itm_head` of the first token;
    /// class 1 is "matched".
    pub fn itm_logits(&self, fused: &Tensor) -> Tensor {
        fused.select(1, 0).apply(&self.itm_head)
    }

    /// Keeps the temperature in [`TEMP_MIN`, `TEMP_MAX`] (after every optimizer step), in place,
    /// without grad.
    pub fn clamp_temp(&self) {
        tch::no_grad(|| {
            let mut temp = self.temp.shallow_clone();
            let _ = temp.clamp_(TEMP_MIN, TEMP_MAX);
        });
    }
}

/// Divides each row by its L2 norm (at least 1e-12), as `torch.nn.functional.normalize`.
fn normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1i64], true).clamp_min(1e-12)
}
