//! Vision Transformer image tower: patchify conv, [CLS], learned positions, pre-LN blocks,
//! `ln_post` and a projection of the [CLS] token (open_clip's `VisionTransformer`).
//!
//! The same tower in the layouts of ALBEF (torchvision's `VisionTransformer`) and BLIP
//! (`transformers`' `BlipVisionModel`): a patch conv with a bias, no `ln_pre`, every token through
//! the final LayerNorm and no projection ([`VitConfig::encoder`], [`VisionTransformer::forward_tokens`]).
//! Parameter names stay open_clip's in every layout; the families' key maps translate.

use tch::nn;

use tch::Tensor;

use super::layers::{cast, layer_norm_eps, Activation, Checkpointed, LayerNorm, Transformer, TransformerShape};

/// Shape of a ViT image tower.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VitConfig {
    /// Input resolution (square).
    pub image_size: i64,
    /// Patch size (square).
    pub patch_size: i64,
    /// The transformer stack.
    pub transformer: TransformerShape,
    /// Size of the projected [CLS] embedding ([`VisionTransformer::forward`]); `None` for an
    /// encoder without a projection (ALBEF, BLIP: their projections sit outside the tower).
    pub output_dim: Option<i64>,
    /// Whether the patch conv has a bias (torchvision, BLIP) or not (open_clip).
    pub patch_bias: bool,
    /// Whether a LayerNorm (`ln_pre`) follows the embeddings (open_clip) or not.
    pub pre_norm: bool,
}

impl VitConfig {
    /// open_clip's tower: no patch bias, `ln_pre`, a projection to `output_dim`.
    pub fn open_clip(image_size: i64, patch_size: i64, transformer: TransformerShape, output_dim: i64) -> Self {
        Self { image_size, patch_size, transformer, output_dim: Some(output_dim), patch_bias: false, pre_norm: true }
    }

    /// The image encoder of ALBEF and BLIP: a patch bias, no `ln_pre`, no projection.
    pub fn encoder(image_size: i64, patch_size: i64, transformer: TransformerShape) -> Self {
        Self { image_size, patch_size, transformer, output_dim: None, patch_bias: true, pre_norm: false }
    }

    /// Tokens the blocks see: one per patch and [CLS].
    pub fn tokens(&self) -> i64 {
        self.grid() * self.grid() + 1
    }

    /// Patches per side.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }
}

/// The ViT image tower.
#[derive(Debug)]
pub struct VisionTransformer {
    conv1: Tensor,
    conv1_bias: Option<Tensor>,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: Option<LayerNorm>,
    transformer: Transformer,
    ln_post: LayerNorm,
    proj: Option<Tensor>,
    config: VitConfig,
}

impl VisionTransformer {
    /// Creates the tower's parameters under `p` (open_clip's `visual.*` names).
    pub fn new(p: nn::Path, config: VitConfig, activation: Activation) -> Self {
        let width = config.transformer.width;
        let scale = (width as f64).powf(-0.5);
        let eps = config.transformer.layer_norm_eps;
        let fan_in = 3 * config.patch_size * config.patch_size;
        let conv1 = (&p / "conv1").var(
            "weight",
            &[width, 3, config.patch_size, config.patch_size],
            nn::init::DEFAULT_KAIMING_UNIFORM,
        );
        let bound = 1.0 / (fan_in as f64).sqrt();
        let conv1_bias =
            config.patch_bias.then(|| (&p / "conv1").var("bias", &[width], nn::Init::Uniform { lo: -bound, up: bound }));
        let randn = |stdev| nn::Init::Randn { mean: 0.0, stdev };
        let class_embedding = p.var("class_embedding", &[width], randn(scale));
        let positional_embedding = p.var("positional_embedding", &[config.tokens(), width], randn(scale));
        let ln_pre = config.pre_norm.then(|| layer_norm_eps(&p / "ln_pre", width, eps));
        let transformer = Transformer::new(&p / "transformer", config.transformer, activation, None);
        let ln_post = layer_norm_eps(&p / "ln_post", width, eps);
        let proj = config.output_dim.map(|dim| p.var("proj", &[width, dim], randn(scale)));
        Self { conv1, conv1_bias, class_embedding, positional_embedding, ln_pre, transformer, ln_post, proj, config }
    }

    /// The tower's shape.
    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// Images [batch, 3, H, W] to every token after the final LayerNorm [batch, tokens, width]:
    /// what ALBEF's and BLIP's text side cross-attends to ([CLS] first).
    pub fn forward_tokens(&self, images: &Tensor) -> Tensor {
        self.transformer.forward(&self.embed(images), false).apply(&self.ln_post)
    }

    /// Images [batch, 3, H, W] to embeddings [batch, output_dim] (not normalised); the
    /// final-LayerNorm [CLS] token when the tower has no projection.
    pub fn forward(&self, images: &Tensor) -> Tensor {
        let x = self.transformer.forward(&self.embed(images), false);
        self.head(&x)
    }

    /// [`VisionTransformer::forward`] with activation checkpointing of the transformer blocks.
    pub fn forward_checkpointed(&self, images: &Tensor) -> Checkpointed<'_> {
        self.transformer.checkpointed(self.embed(images), false, |x| self.head(x))
    }

    /// Patch embedding, [CLS], positions and `ln_pre`: the blocks' input [batch, tokens, width].
    fn embed(&self, images: &Tensor) -> Tensor {
        let p = self.config.patch_size;
        let bias = self.conv1_bias.as_ref().map(|b| cast(b, images));
        let x = images.conv2d(&cast(&self.conv1, images), bias, [p, p], [0, 0], [1, 1], 1);
        let (b, w, gh, gw) = x.size4().expect("conv output is 4-D");
        let x = x.reshape([b, w, gh * gw]).permute([0, 2, 1]);
        let cls = self.class_embedding.to_kind(x.kind()).view([1, 1, w]).expand([b, 1, w], true);
        let positions = cast(&self.positional_embedding, &x);
        let x = Tensor::cat(&[cls, x], 1) + positions;
        match &self.ln_pre {
            Some(ln_pre) => x.apply(ln_pre),
            None => x,
        }
    }

    /// `ln_post` and the projection of the [CLS] token.
    fn head(&self, x: &Tensor) -> Tensor {
        let x = x.apply(&self.ln_post);
        let pooled = x.select(1, 0);
        match &self.proj {
            Some(proj) => pooled.matmul(&cast(proj, &pooled)),
            None => pooled,
        }
    }
}
