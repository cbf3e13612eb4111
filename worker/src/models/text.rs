//! Causal text transformer (CLIP's text tower): token and position embeddings, masked
//! pre-LN blocks, `ln_final`, pooling at the end-of-text token, `text_projection`.

use tch::nn;
use tch::Tensor;

use super::layers::{cast, layer_norm, Activation, BlockInit, Checkpointed, LayerNorm, Transformer, TransformerShape};

/// Shape of a text tower.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextConfig {
    /// Token vocabulary size.
    pub vocab_size: i64,
    /// Context length in tokens.
    pub context_length: i64,
    /// The transformer stack.
    pub transformer: TransformerShape,
    /// Output embedding size.
    pub output_dim: i64,
}

/// The causal text tower.
#[derive(Debug)]
pub struct TextTransformer {
    token_embedding: nn::Embedding,
    positional_embedding: Tensor,
    transformer: Transformer,
    ln_final: LayerNorm,
    text_projection: Tensor,
    config: TextConfig,
}

impl TextTransformer {
    /// Creates the tower's parameters under `p` (open_clip's top-level text names).
    pub fn new(p: nn::Path, config: TextConfig, activation: Activation) -> Self {
        let width = config.transformer.width;
        let randn = |stdev| nn::Init::Randn { mean: 0.0, stdev };
        let token_embedding = nn::embedding(
            &p / "token_embedding",
            config.vocab_size,
            width,
            nn::EmbeddingConfig { ws_init: randn(0.02), ..Default::default() },
        );
        let positional_embedding = p.var("positional_embedding", &[config.context_length, width], randn(0.01));
        let init = BlockInit::scaled(width, config.transformer.layers);
        let transformer = Transformer::new(&p / "transformer", config.transformer, activation, Some(init));
        let ln_final = layer_norm(&p / "ln_final", width);
        let text_projection = p.var("text_projection", &[width, config.output_dim], randn((width as f64).powf(-0.5)));
        Self { token_embedding, positional_embedding, transformer, ln_final, text_projection, config }
    }

    /// The tower's shape.
    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    /// Token ids [batch, context] and end-of-text positions [batch] to embeddings
    /// [batch, output_dim], computed in `kind`.
    pub fn forward(&self, tokens: &Tensor, eot_index: &Tensor, kind: tch::Kind) -> Tensor {
        let x = self.transformer.forward(&self.embed(tokens, kind), true);
        self.head(&x, eot_index)
    }

    /// [`TextTransformer::forward`] with activation checkpointing of the transformer blocks.
    pub fn forward_checkpointed(&self, tokens: &Tensor, eot_index: &Tensor, kind: tch::Kind) -> Checkpointed<'_> {
        self.transformer.checkpointed(self.embed(tokens, kind), true, |x| self.head(x, eot_index))
    }

    /// Token and position embeddings in `kind`: the blocks' input [batch, context, width].
    fn embed(&self, tokens: &Tensor, kind: tch::Kind) -> Tensor {
        let (_, n) = tokens.size2().expect("tokens are [batch, context]");
        (tokens.apply(&self.token_embedding) + self.positional_embedding.narrow(0, 0, n)).to_kind(kind)
    }

    /// `ln_final`, pooling at the end-of-text token and `text_projection`.
    fn head(&self, x: &Tensor, eot_index: &Tensor) -> Tensor {
        let x = x.apply(&self.ln_final);
        let rows = Tensor::arange(x.size()[0], (tch::Kind::Int64, x.device()));
        let pooled = x.index(&[Some(rows), Some(eot_index.to_device(x.device()))]);
        pooled.matmul(&cast(&self.text_projection, &pooled))
    }
}
