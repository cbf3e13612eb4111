//! Vision Transformer image tower: patchify conv, [CLS], learned positions, pre-LN blocks,
//! `ln_post` and a projection of the [CLS] token (open_clip's `VisionTransformer`).

use tch::nn;

use tch::Tensor;

use super::layers::{cast, layer_norm, Activation, Checkpointed, LayerNorm, Transformer, TransformerShape};

/// Shape of a ViT image tower.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VitConfig {
    /// Input resolution (square).
    pub image_size: i64,
    /// Patch size (square).
    pub patch_size: i64,
    /// The transformer stack.
    pub transformer: TransformerShape,
    /// Output embedding size.
    pub output_dim: i64,
}

impl VitConfig {
    /// Patches per side.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }
}

/// The ViT image tower.
#[derive(Debug)]
pub struct VisionTransformer {
    conv1: Tensor,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    transformer: Transformer,
    ln_post: LayerNorm,
    proj: Tensor,
    config: VitConfig,
}

impl VisionTransformer {
    /// Creates the tower's parameters under `p` (open_clip's `visual.*` names).
    pub fn new(p: nn::Path, config: VitConfig, activation: Activation) -> Self {
        let width = config.transformer.width;
        let scale = (width as f64).powf(-0.5);
        let conv1 = (&p / "conv1").var(
            "weight",
            &[width, 3, config.patch_size, config.patch_size],
            nn::init::DEFAULT_KAIMING_UNIFORM,
        );
        let randn = |stdev| nn::Init::Randn { mean: 0.0, stdev };
        let class_embedding = p.var("class_embedding", &[width], randn(scale));
        let tokens = config.grid() * config.grid() + 1;
        let positional_embedding = p.var("positional_embedding", &[tokens, width], randn(scale));
        let ln_pre = layer_norm(&p / "ln_pre", width);
        let transformer = Transformer::new(&p / "transformer", config.transformer, activation, None);
        let ln_post = layer_norm(&p / "ln_post", width);
        let proj = p.var("proj", &[width, config.output_dim], randn(scale));
        Self { conv1, class_embedding, positional_embedding, ln_pre, transformer, ln_post, proj, config }
    }

    /// The tower's shape.
    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// Images [batch, 3, H, W] to embeddings [batch, output_dim] (not normalised).
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
        let x = images.conv2d(&cast(&self.conv1, images), None::<Tensor>, [p, p], [0, 0], [1, 1], 1);
        let (b, w, gh, gw) = x.size4().expect("conv output is 4-D");
        let x = x.reshape([b, w, gh * gw]).permute([0, 2, 1]);
        let cls = self.class_embedding.to_kind(x.kind()).view([1, 1, w]).expand([b, 1, w], true);
        let positions = cast(&self.positional_embedding, &x);
        let x = Tensor::cat(&[cls, x], 1) + positions;
        x.apply(&self.ln_pre)
    }

    /// `ln_post` and the projection of the [CLS] token.
    fn head(&self, x: &Tensor) -> Tensor {
        let x = x.apply(&self.ln_post);
        let pooled = x.select(1, 0);
        pooled.matmul(&cast(&self.proj, &pooled))
    }
}
