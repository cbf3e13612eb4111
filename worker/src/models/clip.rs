//! CLIP: a ViT image tower and a causal text tower projected into one embedding space, with a
//! learnable logit scale (init ln(1/0.07), clamped to [0, ln 100]).

use tch::nn;
use tch::{Kind, Tensor};

use super::layers::{Activation, Checkpointed, TransformerShape};
use super::text::{TextConfig, TextTransformer};
use super::vit::{VisionTransformer, VitConfig};
use super::ModelError;

/// Upper bound of the logit scale: ln(100).
pub const LOGIT_SCALE_MAX: f64 = 4.605_170_185_988_092;

/// Shape of a CLIP model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipConfig {
    /// Shared embedding size.
    pub embed_dim: i64,
    /// Image tower.
    pub vision: VitConfig,
    /// Text tower.
    pub text: TextConfig,
    /// MLP activation of both towers.
    pub activation: Activation,
}

impl ClipConfig {
    /// A named preset: `tiny` (CPU tests, 32x32 images), `vit-b-32` or `vit-b-16` (224x224).
    /// The vocabulary and context length come from the tokenizer and job.
    pub fn preset(name: &str, vocab_size: i64, context_length: Option<i64>, activation: Activation) -> Result<Self, ModelError> {
        let shape = TransformerShape::new;
        let (embed_dim, image_size, patch_size, vision, text, default_context) = match name {
            "tiny" => (64, 32, 8, shape(64, 2, 4), shape(64, 2, 4), 32),
            "vit-b-32" => (512, 224, 32, shape(768, 12, 12), shape(512, 12, 8), 77),
            "vit-b-16" => (512, 224, 16, shape(768, 12, 12), shape(512, 12, 8), 77),
            other => return Err(ModelError::UnknownPreset { family: "clip".into(), preset: other.into() }),
        };
        Ok(Self {
            embed_dim,
            vision: VitConfig::open_clip(image_size, patch_size, vision, embed_dim),
            text: TextConfig {
                vocab_size,
                context_length: context_length.unwrap_or(default_context),
                transformer: text,
                output_dim: embed_dim,
            },
            activation,
        })
    }

    /// Forward FLOPs per image-text pair (multiply-adds count 2), for throughput and MFU.
    pub fn forward_flops_per_sample(&self) -> f64 {
        let tower = |tokens: i64, t: &TransformerShape| {
            let (n, w) = (tokens as f64, t.width as f64);
            let hidden = w * t.mlp_ratio;
            let per_layer = 2.0 * n * (4.0 * w * w + 2.0 * w * hidden) + 2.0 * 2.0 * n * n * w;
            per_layer * t.layers as f64
        };
        let v = &self.vision;
        let tokens = v.grid() * v.grid() + 1;
        let patch = 2.0 * (v.grid() * v.grid()) as f64 * (3 * v.patch_size * v.patch_size * v.transformer.width) as f64;
        let vision = patch + tower(tokens, &v.transformer) + 2.0 * (v.transformer.width * self.embed_dim) as f64;
        let t = &self.text;
        let text = tower(t.context_length, &t.transformer) + 2.0 * (t.transformer.width * self.embed_dim) as f64;
        vision + text
    }
}

/// The CLIP model. Parameter names are open_clip's (`visual.*`, `token_embedding.weight`, ...).
#[derive(Debug)]
pub struct Clip {
    /// Image tower.
    pub visual: VisionTransformer,
    /// Text tower.
    pub text: TextTransformer,
    /// Learnable log of the logit scale.
    pub logit_scale: Tensor,
    config: ClipConfig,
    compute: Kind,
}

impl Clip {
    /// Creates the model's parameters under `root`.
    pub fn new(root: &nn::Path, config: ClipConfig) -> Self {
        let visual = VisionTransformer::new(root / "visual", config.vision, config.activation);
        let text = TextTransformer::new(root.clone(), config.text, config.activation);
        let logit_scale = root.var("logit_scale", &[], nn::Init::Const((1.0f64 / 0.07).ln()));
        Self { visual, text, logit_scale, config, compute: Kind::Float }
    }

    /// The model's shape.
    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// Sets the kind the towers compute in: the parameters' own kind, or bf16 (mixed
    /// precision: parameters stay fp32, features come back in the parameters' kind).
    pub fn set_compute_kind(&mut self, kind: Kind) {
        self.compute = kind;
    }

    /// L2-normalised image embeddings, in the parameters' kind.
    pub fn encode_image(&self, images: &Tensor) -> Tensor {
        let features = self.visual.forward(&images.to_kind(self.compute));
        normalize(&features.to_kind(self.logit_scale.kind()))
    }

    /// L2-normalised text embeddings, in the parameters' kind.
    pub fn encode_text(&self, tokens: &Tensor, eot_index: &Tensor) -> Tensor {
        let features = self.text.forward(tokens, eot_index, self.compute);
        normalize(&features.to_kind(self.logit_scale.kind()))
    }

    /// [`Clip::encode_image`] with activation checkpointing of the image tower's blocks.
    pub fn encode_image_checkpointed(&self, images: &Tensor) -> Checkpointed<'_> {
        let kind = self.logit_scale.kind();
        self.visual.forward_checkpointed(&images.to_kind(self.compute)).map(|f| normalize(&f.to_kind(kind)))
    }

    /// [`Clip::encode_text`] with activation checkpointing of the text tower's blocks.
    pub fn encode_text_checkpointed(&self, tokens: &Tensor, eot_index: &Tensor) -> Checkpointed<'_> {
        let kind = self.logit_scale.kind();
        self.text.forward_checkpointed(tokens, eot_index, self.compute).map(|f| normalize(&f.to_kind(kind)))
    }

    /// Keeps the logit scale in [0, ln 100] (after every optimizer step).
    pub fn clamp_logit_scale(&self) {
        tch::no_grad(|| {
            let mut s = self.logit_scale.shallow_clone();
            let _ = s.clamp_(0.0, LOGIT_SCALE_MAX);
        });
    }
}

/// Divides each row by its L2 norm.
pub fn normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1], true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Published forward cost of OpenAI's CLIP ViT-B/16 towers at 224 px and 77 tokens
    /// (multiply-accumulates, as counted by fvcore): image 17.58 G, text 2.96 G.
    #[test]
    fn flop_count_matches_published_vit_b_16_cost() {
        let c = ClipConfig::preset("vit-b-16", 49408, None, Activation::QuickGelu).unwrap();
        let published = 2.0 * (17.58e9 + 2.96e9);
        let ours = c.forward_flops_per_sample();
        assert!((ours / published - 1.0).abs() < 0.03, "{ours:e} vs {published:e}");
    }

    /// The same for ViT-B/32: image 4.41 G multiply-accumulates, text 2.96 G.
    #[test]
    fn flop_count_matches_published_vit_b_32_cost() {
        let c = ClipConfig::preset("vit-b-32", 49408, None, Activation::QuickGelu).unwrap();
        let published = 2.0 * (4.41e9 + 2.96e9);
        let ours = c.forward_flops_per_sample();
        assert!((ours / published - 1.0).abs() < 0.03, "{ours:e} vs {published:e}");
    }
}
