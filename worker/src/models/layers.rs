//! Shared transformer blocks: multi-head attention through `scaled_dot_product_attention`,
//! the MLP, and the pre-LN residual block that ViT and the text tower both use.
//! Parameter names follow open_clip's so reference weights load by name.

use tch::nn::{self, Module};
use tch::Tensor;

/// Non-linearity inside the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU.
    Gelu,
    /// `x * sigmoid(1.702 x)`, as in OpenAI's CLIP weights.
    QuickGelu,
}

impl Activation {
    /// Applies the non-linearity.
    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Gelu => x.gelu("none"),
            Activation::QuickGelu => x * (x * 1.702).sigmoid(),
        }
    }
}

/// LayerNorm with open_clip's epsilon (1e-5).
pub fn layer_norm(p: nn::Path, width: i64) -> LayerNorm {
    layer_norm_eps(p, width, 1e-5)
}

/// LayerNorm with epsilon `eps` (BERT's is 1e-12).
pub fn layer_norm_eps(p: nn::Path, width: i64, eps: f64) -> LayerNorm {
    LayerNorm { weight: p.var("weight", &[width], nn::Init::Const(1.0)), bias: p.var("bias", &[width], nn::Init::Const(0.0)), width, eps }
}

/// Initial standard deviations of a transformer's weights (open_clip's `init_parameters`).
#[derive(Debug, Clone, Copy)]
pub struct BlockInit {
    /// Fused q/k/v projection.
    pub attn_std: f64,
    /// Attention output and MLP output projections.
    pub proj_std: f64,
    /// MLP input projection.
    pub fc_std: f64,
}

impl BlockInit {
    /// open_clip's text-tower scheme for a `layers`-deep transformer of `width`.
    pub fn scaled(width: i64, layers: i64) -> Self {
        let w = width as f64;
        Self { attn_std: w.powf(-0.5), proj_std: w.powf(-0.5) * (2.0 * layers as f64).powf(-0.5), fc_std: (2.0 * w).powf(-0.5) }
    }
}

/// A linear layer whose parameters are cast to the input's kind, so a bf16 forward pass runs
/// on fp32 master weights (the cast is differentiable: gradients reach the fp32 tensors).
#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// `output x input` weight and a bias, initialised like `torch.nn.Linear` unless `std` is given
    /// (then normal weights and zero bias).
    pub fn new(p: nn::Path, input: i64, output: i64, std: Option<f64>) -> Self {
        let bound = 1.0 / (input as f64).sqrt();
        let (w_init, b_init) = match std {
            Some(stdev) => (nn::Init::Randn { mean: 0.0, stdev }, nn::Init::Const(0.0)),
            None => (
                nn::init::DEFAULT_KAIMING_UNIFORM,
                nn::Init::Uniform { lo: -bound, up: bound },
            ),
        };
        Self { weight: p.var("weight", &[output, input], w_init), bias: p.var("bias", &[output], b_init) }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&cast(&self.weight, x), Some(cast(&self.bias, x)))
    }
}

/// `t` in the kind of `like` (a no-op when they already agree).
pub fn cast(t: &Tensor, like: &Tensor) -> Tensor {
    if t.kind() == like.kind() {
        t.shallow_clone()
    } else {
        t.to_kind(like.kind())
    }
}

/// LayerNorm over the last dimension, in one kernel in the input's kind: libtorch accumulates
/// the statistics in fp32 for a bf16 input; the affine parameters are cast to the input's kind
/// (the GPU kernel takes no mixed kinds).
#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    width: i64,
    eps: f64,
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.width], Some(cast(&self.weight, x)), Some(cast(&self.bias, x)), self.eps, true)
    }
}

/// Multi-head self-attention with a fused input projection (`in_proj_weight`, `in_proj_bias`).
#[derive(Debug)]
pub struct SelfAttention {
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: Linear,
    heads: i64,
}

impl SelfAttention {
    /// Attention of `width` split into `heads`.
    pub fn new(p: nn::Path, width: i64, heads: i64, init: Option<BlockInit>) -> Self {
        let w_init = match init {
            Some(i) => nn::Init::Randn { mean: 0.0, stdev: i.attn_std },
            None => nn::Init::Uniform { lo: -(6.0 / (4.0 * width as f64)).sqrt(), up: (6.0 / (4.0 * width as f64)).sqrt() },
        };
        let in_proj_weight = p.var("in_proj_weight", &[3 * width, width], w_init);
        let in_proj_bias = p.var("in_proj_bias", &[3 * width], nn::Init::Const(0.0));
        let out_proj = Linear::new(&p / "out_proj", width, width, init.map(|i| i.proj_std));
        Self { in_proj_weight, in_proj_bias, out_proj, heads }
    }

    /// `x`: [batch, tokens, width]; `causal` masks attention to later tokens.
    pub fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let (b, n, w) = x.size3().expect("attention input is [batch, tokens, width]");
        let head_dim = w / self.heads;
        let (weight, bias) = (cast(&self.in_proj_weight, x), cast(&self.in_proj_bias, x));
        // q, k and v from three row blocks of the fused projection, each laid out [batch,
        // tokens, heads, head_dim] and seen as [batch, heads, tokens, head_dim]: the attention
        // kernels take that layout as is, their output and gradients keep it, so neither the
        // output nor the backward needs a copy into or out of one fused [3, ...] tensor.
        let project = |i: i64| {
            x.linear(&weight.narrow(0, i * w, w), Some(bias.narrow(0, i * w, w)))
                .view([b, n, self.heads, head_dim])
                .transpose(1, 2)
        };
        let (q, k, v) = (project(0), project(1), project(2));
        let o = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, causal, None, false);
        o.transpose(1, 2).reshape([b, n, w]).apply(&self.out_proj)
    }
}

/// The transformer MLP: `c_fc`, activation, `c_proj`.
#[derive(Debug)]
pub struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
    activation: Activation,
}

impl Mlp {
    /// An MLP of hidden size `hidden`.
    pub fn new(p: nn::Path, width: i64, hidden: i64, activation: Activation, init: Option<BlockInit>) -> Self {
        Self {
            c_fc: Linear::new(&p / "c_fc", width, hidden, init.map(|i| i.fc_std)),
            c_proj: Linear::new(&p / "c_proj", hidden, width, init.map(|i| i.proj_std)),
            activation,
        }
    }

    /// Applies the MLP.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.activation.apply(&x.apply(&self.c_fc)).apply(&self.c_proj)
    }
}

/// Pre-LN residual block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
#[derive(Debug)]
pub struct ResidualBlock {
    ln_1: LayerNorm,
    attn: SelfAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl ResidualBlock {
    /// A block of `shape.width` with `shape.heads` and an MLP of `mlp_ratio * width`.
    pub fn new(p: nn::Path, shape: &TransformerShape, activation: Activation, init: Option<BlockInit>) -> Self {
        let (width, eps) = (shape.width, shape.layer_norm_eps);
        let hidden = (width as f64 * shape.mlp_ratio) as i64;
        Self {
            ln_1: layer_norm_eps(&p / "ln_1", width, eps),
            attn: SelfAttention::new(&p / "attn", width, shape.heads, init),
            ln_2: layer_norm_eps(&p / "ln_2", width, eps),
            mlp: Mlp::new(&p / "mlp", width, hidden, activation, init),
        }
    }

    /// Applies the block.
    pub fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let x = x + self.attn.forward(&x.apply(&self.ln_1), causal);
        &x + self.mlp.forward(&x.apply(&self.ln_2))
    }
}

/// A stack of residual blocks (`resblocks.N`).
#[derive(Debug)]
pub struct Transformer {
    blocks: Vec<ResidualBlock>,
}

/// Shape of a transformer stack.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransformerShape {
    /// Model width.
    pub width: i64,
    /// Number of blocks.
    pub layers: i64,
    /// Attention heads.
    pub heads: i64,
    /// MLP hidden size over width.
    pub mlp_ratio: f64,
    /// Epsilon of the blocks' LayerNorms (open_clip and BLIP: 1e-5; ALBEF's ViT: 1e-6).
    pub layer_norm_eps: f64,
}

impl TransformerShape {
    /// A shape with an MLP ratio of 4 and open_clip's LayerNorm epsilon (1e-5).
    pub fn new(width: i64, layers: i64, heads: i64) -> Self {
        Self { width, layers, heads, mlp_ratio: 4.0, layer_norm_eps: 1e-5 }
    }
}

impl Transformer {
    /// `shape.layers` blocks under `p / "resblocks"`.
    pub fn new(p: nn::Path, shape: TransformerShape, activation: Activation, init: Option<BlockInit>) -> Self {
        let blocks = (0..shape.layers)
            .map(|i| {
                ResidualBlock::new(&p / "resblocks" / i, &shape, activation, init)
            })
            .collect();
        Self { blocks }
    }

    /// Applies every block in order.
    pub fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        self.blocks.iter().fold(x.shallow_clone(), |x, b| b.forward(&x, causal))
    }

    /// The forward pass with activation checkpointing: `stem` (the blocks' input, with its
    /// graph) goes through every block without recording a graph, keeping only each block's
    /// input; `head` then runs with a graph from a leaf at the last block's output.
    /// [`Checkpointed::backward`] recomputes the blocks one at a time.
    pub fn checkpointed(&self, stem: Tensor, causal: bool, head: impl FnOnce(&Tensor) -> Tensor) -> Checkpointed<'_> {
        let mut block_inputs = Vec::with_capacity(self.blocks.len());
        let last = tch::no_grad(|| {
            self.blocks.iter().fold(stem.detach(), |x, block| {
                let y = block.forward(&x, causal);
                block_inputs.push(x);
                y
            })
        });
        let last = last.set_requires_grad(true);
        let output = head(&last);
        Checkpointed { transformer: self, causal, stem, block_inputs, last, output }
    }
}

/// A tower's forward pass through a [`Transformer`] with activation checkpointing: the graphs
/// of the stem and the head, and the input of every block (in the activations' kind).
#[derive(Debug)]
pub struct Checkpointed<'a> {
    transformer: &'a Transformer,
    causal: bool,
    stem: Tensor,
    block_inputs: Vec<Tensor>,
    last: Tensor,
    output: Tensor,
}

impl Checkpointed<'_> {
    /// The tower's output, attached to the head's graph only.
    pub fn output(&self) -> &Tensor {
        &self.output
    }

    /// Extends the head by `f` (e.g. a projection or normalisation after the tower).
    pub fn map(self, f: impl FnOnce(&Tensor) -> Tensor) -> Self {
        let output = f(&self.output);
        Self { output, ..self }
    }

    /// Sends `grad` (the loss's gradient with respect to [`Checkpointed::output`]) back through
    /// the head, each block in reverse (recomputed from its saved input, which is freed after)
    /// and the stem, accumulating every parameter's gradient as a plain backward pass would.
    pub fn backward(self, grad: &Tensor) {
        let Checkpointed { transformer, causal, stem, mut block_inputs, last, output } = self;
        backward_from(&output, grad);
        drop(output);
        let mut grad = last.grad();
        for block in transformer.blocks.iter().rev() {
            let input = block_inputs.pop().expect("one saved input per block").set_requires_grad(true);
            backward_from(&block.forward(&input, causal), &grad);
            grad = input.grad();
        }
        backward_from(&stem, &grad);
    }
}

/// Backward pass from `output` given the loss's gradient with respect to it, through the
/// surrogate `sum(output * grad)`.
fn backward_from(output: &Tensor, grad: &Tensor) {
    (output * grad.detach()).sum(output.kind()).backward();
}

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.apply(xs)
    }
}
