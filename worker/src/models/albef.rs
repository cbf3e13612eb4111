//! ALBEF (Li et al. 2021, "Align before Fuse"): an image encoder and a text encoder aligned by a
//! contrastive loss before a fusion encoder combines them.
//!
//! ```text
//!     image                                                      caption
//!       │                                                           │
//!   patch conv, [CLS], positions                              word, position, token-type
//!   ViT blocks (pre-LN), LayerNorm                            embeddings; BERT layers 0..k
//!       │ image tokens                                              │ text tokens
//!       ├─► L2(vision_proj([CLS])) ─► ITC ◄─ L2(text_proj([CLS])) ◄─┤
//!       │                                                           ▼
//!       └─── cross-attention ───────────────────────────────────► BERT layers k..n (fusion encoder)
//!                                                                   │ fused tokens
//!                                                                   ├─► itm_head([CLS]) ─► ITM
//!                                                                   └─► mlm_head ─► MLM
//! ```
//!
//! - Image encoder: [`VisionTransformer`] in the encoder layout ([`VitConfig::encoder`]: a patch
//!   bias, no `ln_pre`, no projection, LayerNorm epsilon 1e-6), all tokens out.
//! - Text encoder and fusion encoder: one [`BertModel`] whose layers `0..k` have no
//!   cross-attention and whose layers `k..n` attend to the image tokens
//!   (`cross_attention_from_layer = k`).
//! - Heads: `vision_proj` and `text_proj` (width to `embed_dim`) for image-text contrastive
//!   learning (ITC) with a learnable temperature `temp`; `itm_head` (width to 2) on the fused
//!   [CLS] for image-text matching (ITM) with one hard negative per direction; `mlm_head`, BERT's
//!   language-modelling head with its decoder tied to the word embeddings, for masked language
//!   modelling (MLM) conditioned on the image.
//! - Momentum model: a copy of every parameter except `itm_head` and `temp`
//!   ([`Albef::has_momentum`]), updated as `theta_m <- m theta_m + (1 - m) theta`
//!   (`objectives::momentum`), whose features fill the queues (`objectives::queue`) and give the
//!   soft targets of ITC (`objectives::distill`) and MLM.
//! - Objective: ITC with momentum distillation, ITM (cross-entropy over the `B` positive and `2B`
//!   hard-negative pairs, negatives drawn with weights `softmax(sim)` with the positive zeroed)
//!   and MLM with distillation `(1 - alpha) CE(labels) + alpha CE(softmax(logits_m))`.
//!
//! Dropout is not modelled. Parameter names: `visual.*` (open_clip's ViT names), `text.*`
//! (Hugging Face BERT names), `mlm_head.*` (`cls.predictions.*`), `vision_proj.*`, `text_proj.*`,
//! `itm_head.*` and `temp`. [`import_torchmultimodal`] and [`export_torchmultimodal`] translate
//! to and from torchmultimodal's `ALBEFModelWithSimilarity` state dict.

use std::collections::{HashMap, HashSet};

use tch::nn;
use tch::{Kind, Tensor};

use super::alignment::{AlignmentHeads, TEMP_MAX, TEMP_MIN};
use super::bert::{BertConfig, INITIALIZER_RANGE, BertLmHead, BertModel, EncoderStates};
use super::layers::{Activation, TransformerShape};
use super::vit::{VisionTransformer, VitConfig};
use super::ModelError;


/// Shape and pretraining hyperparameters of an ALBEF model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlbefConfig {
    /// Image encoder ([`VitConfig::encoder`]; ALBEF's torchvision ViT uses LayerNorm epsilon 1e-6).
    pub vision: VitConfig,
    /// Text and fusion encoder: layers `0..k` encode the text, layers `k..n` fuse it with the
    /// image (`cross_attention_from_layer = Some(k)`).
    pub text: BertConfig,
    /// Size of the contrastive features (256).
    pub embed_dim: i64,
    /// Initial temperature of the contrastive loss (0.07), learnable, kept in [0.001, 0.5].
    pub temp: f64,
    /// Length of each momentum feature queue (65,536).
    pub queue_size: i64,
    /// Momentum of the momentum model's update (0.995).
    pub momentum: f64,
    /// Weight of the momentum model's soft targets in ITC and MLM (0.4).
    pub alpha: f64,
    /// Fraction of text tokens masked for MLM (0.15).
    pub mlm_probability: f64,
}

impl AlbefConfig {
    /// A named preset:
    /// - `tiny` (CPU tests and the demo): ViT of 2 layers, width 64, 4 heads, patch 8 on 32x32
    ///   images; BERT of width 64, 4 heads, feed-forward 256, 2 text layers and 2 fusion layers,
    ///   initialised with std `64^-1/2`; features of 64; queues of 8; 64 positions unless
    ///   `context_length` is given.
    /// - `base` (the paper's): ViT-B/16 at 256x256 and bert-base split into 6 text and 6 fusion
    ///   layers; features of 256; queues of 65,536; 512 positions unless `context_length` is given.
    ///
    /// `vocab_size` and `pad_token_id` come from the tokenizer; `context_length` sets
    /// `max_position_embeddings`.
    pub fn preset(name: &str, vocab_size: i64, pad_token_id: i64, context_length: Option<i64>) -> Result<Self, ModelError> {
        let shape = |width, layers, heads| TransformerShape { width, layers, heads, mlp_ratio: 4.0, layer_norm_eps: 1e-6 };
        let (vision, text_width, text_heads, intermediate, text_layers, fusion_layers, embed_dim, queue_size, positions) = match name {
            "tiny" => (VitConfig::encoder(32, 8, shape(64, 2, 4)), 64, 4, 256, 2, 2, 64, 8, 64),
            "base" => (VitConfig::encoder(256, 16, shape(768, 12, 12)), 768, 12, 3072, 6, 6, 256, 65536, 512),
            other => return Err(ModelError::UnknownPreset { family: "albef".into(), preset: other.into() }),
        };
        let text = BertConfig {
            vocab_size,
            hidden_size: text_width,
            num_hidden_layers: text_layers + fusion_layers,
            num_attention_heads: text_heads,
            intermediate_size: intermediate,
            max_position_embeddings: context_length.unwrap_or(positions),
            type_vocab_size: 2,
            cross_attention_from_layer: Some(text_layers),
            encoder_hidden_size: None,
            pad_token_id: Some(pad_token_id),
            layer_norm_eps: 1e-12,
            initializer_range: if name == "tiny" { (text_width as f64).powf(-0.5) } else { INITIALIZER_RANGE },
        };
        Ok(Self { vision, text, embed_dim, temp: 0.07, queue_size, momentum: 0.995, alpha: 0.4, mlm_probability: 0.15 })
    }

    /// Every inconsistency, joined by "; ", each naming its field (`vision.*`, `text.*`, ...).
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = vision_problems(&self.vision);
        if let Err(text) = self.text.validate() {
            problems.extend(text.split("; ").map(|p| format!("text.{p}")));
        }
        match self.text.cross_attention_from_layer {
            None => problems.push(
                "text.cross_attention_from_layer is None: ALBEF needs fusion layers with cross-attention to the image".into(),
            ),
            Some(0) => problems.push(
                "text.cross_attention_from_layer is 0: ALBEF needs at least one text layer before the fusion layers".into(),
            ),
            Some(_) => {}
        }
        let image_width = self.vision.transformer.width;
        match self.text.encoder_hidden_size {
            None if self.text.hidden_size != image_width => problems.push(format!(
                "text.hidden_size {} differs from vision.transformer.width {image_width}: the fusion layers' \
                 cross-attention reads the image tokens (set text.encoder_hidden_size to {image_width})",
                self.text.hidden_size
            )),
            Some(width) if width != image_width => problems.push(format!(
                "text.encoder_hidden_size {width} differs from vision.transformer.width {image_width}"
            )),
            _ => {}
        }
        for (name, value) in [("embed_dim", self.embed_dim), ("queue_size", self.queue_size)] {
            if value <= 0 {
                problems.push(format!("{name} is {value}, must be positive"));
            }
        }
        if !(TEMP_MIN..=TEMP_MAX).contains(&self.temp) {
            problems.push(format!("temp is {}, must lie in ALBEF's clamp range [{TEMP_MIN}, {TEMP_MAX}]", self.temp));
        }
        for (name, value) in [("momentum", self.momentum), ("alpha", self.alpha)] {
            if !(0.0..=1.0).contains(&value) {
                problems.push(format!("{name} is {value}, must lie in [0, 1]"));
            }
        }
        if !(self.mlm_probability > 0.0 && self.mlm_probability < 1.0) {
            problems.push(format!("mlm_probability is {}, must lie in (0, 1)", self.mlm_probability));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// `k`, the number of text-encoder layers; layers `k..n` are the fusion encoder.
    pub fn text_layers(&self) -> usize {
        self.text.cross_attention_from_layer.unwrap_or(self.text.num_hidden_layers)
    }

    /// Rough forward FLOPs of one training sample (multiply-adds count 2), for throughput and
    /// MFU, counting the passes that are backpropagated, so that 3x this is the sample's
    /// training cost: the image encoder once; the text encoder twice (the caption and its
    /// masked copy); the fusion encoder four times (the positive pair, the two hard-negative
    /// pairs, the masked caption); the MLM head on the predicted tokens (`mlm_probability` of
    /// the positions: the head runs on those alone); the projections and the ITM head on three pairs. Texts are `max_position_embeddings` tokens
    /// long. Left out: the momentum model's forward passes (no backward: image encoder, text
    /// encoder twice, fusion encoder and MLM head on the masked caption), the loss terms against
    /// the queues, embeddings lookups, LayerNorms, softmaxes and other elementwise work.
    pub fn forward_flops_per_sample(&self) -> f64 {
        let v = &self.vision;
        let image_tokens = v.tokens() as f64;
        let image_width = v.transformer.width as f64;
        let image_hidden = image_width * v.transformer.mlp_ratio;
        let image_layer = 2.0 * image_tokens * (4.0 * image_width * image_width + 2.0 * image_width * image_hidden)
            + 4.0 * image_tokens * image_tokens * image_width;
        let patch = 2.0 * (v.grid() * v.grid()) as f64 * (3 * v.patch_size * v.patch_size) as f64 * image_width;
        let vision = patch + v.transformer.layers as f64 * image_layer;

        let t = &self.text;
        let (l, w, ff) = (t.max_position_embeddings as f64, t.hidden_size as f64, t.intermediate_size as f64);
        let context = t.encoder_hidden_size.unwrap_or(t.hidden_size) as f64;
        let self_layer = 2.0 * l * (4.0 * w * w + 2.0 * w * ff) + 4.0 * l * l * w;
        let cross = 2.0 * l * 2.0 * w * w + 2.0 * image_tokens * 2.0 * context * w + 4.0 * l * image_tokens * w;
        let k = self.text_layers() as f64;
        let text = k * self_layer;
        let fusion = (t.num_hidden_layers as f64 - k) * (self_layer + cross);
        let predicted = self.mlm_probability * l;
        let mlm_head = 2.0 * predicted * w * w + 2.0 * predicted * w * t.vocab_size as f64;
        let heads = 2.0 * self.embed_dim as f64 * (image_width + w) + 3.0 * 2.0 * w * 2.0;
        vision + 2.0 * text + 4.0 * fusion + mlm_head + heads
    }
}

/// Problems of the image encoder's shape, named `vision.*`.
fn vision_problems(v: &VitConfig) -> Vec<String> {
    let mut problems = Vec::new();
    let t = &v.transformer;
    for (name, value) in [
        ("vision.image_size", v.image_size),
        ("vision.patch_size", v.patch_size),
        ("vision.transformer.width", t.width),
        ("vision.transformer.layers", t.layers),
        ("vision.transformer.heads", t.heads),
    ] {
        if value <= 0 {
            problems.push(format!("{name} is {value}, must be positive"));
        }
    }
    if v.image_size > 0 && v.patch_size > 0 && v.image_size % v.patch_size != 0 {
        problems.push(format!("vision.image_size {} is not a multiple of vision.patch_size {}", v.image_size, v.patch_size));
    }
    if t.heads > 0 && t.width % t.heads != 0 {
        problems.push(format!("vision.transformer.width {} is not a multiple of vision.transformer.heads {}", t.width, t.heads));
    }
    if t.mlp_ratio.is_nan() || t.mlp_ratio <= 0.0 {
        problems.push(format!("vision.transformer.mlp_ratio is {}, must be positive", t.mlp_ratio));
    }
    if t.layer_norm_eps.is_nan() || t.layer_norm_eps <= 0.0 {
        problems.push(format!("vision.transformer.layer_norm_eps is {}, must be positive", t.layer_norm_eps));
    }
    if let Some(dim) = v.output_dim {
        problems.push(format!(
            "vision.output_dim is {dim}, must be None: ALBEF projects the image [CLS] with vision_proj outside the tower"
        ));
    }
    problems
}

/// The ALBEF model (online weights; the momentum model is a second instance holding the
/// parameters [`Albef::has_momentum`] names).
#[derive(Debug)]
pub struct Albef {
    /// Image encoder, parameters under `visual.`.
    pub visual: VisionTransformer,
    /// Text encoder (layers `0..k`) and fusion encoder (layers `k..n`), under `text.`.
    pub text: BertModel,
    /// Masked language-modelling head, under `mlm_head.`; its decoder is the text word embeddings.
    pub mlm_head: BertLmHead,
    /// Contrastive projections, temperature and ITM head (`vision_proj`, `text_proj`,
    /// `itm_head`, `temp`).
    pub heads: AlignmentHeads,
    config: AlbefConfig,
    compute: Kind,
}

impl Albef {
    /// Creates the model's parameters under `root`. Panics when `config` fails
    /// [`AlbefConfig::validate`].
    pub fn new(root: &nn::Path, config: AlbefConfig) -> Self {
        if let Err(problems) = config.validate() {
            panic!("invalid ALBEF config: {problems}");
        }
        let image_width = config.vision.transformer.width;
        let text_width = config.text.hidden_size;
        Self {
            visual: VisionTransformer::new(root / "visual", config.vision, Activation::Gelu),
            text: BertModel::new(root / "text", config.text),
            mlm_head: BertLmHead::new(root / "mlm_head", &config.text),
            heads: AlignmentHeads::new(root, image_width, text_width, config.embed_dim, config.temp),
            config,
            compute: Kind::Float,
        }
    }

    /// The model's shape and hyperparameters.
    pub fn config(&self) -> &AlbefConfig {
        &self.config
    }

    /// Sets the kind the encoders and heads compute in: the parameters' own kind, or bf16 (mixed
    /// precision: parameters stay fp32). Every output comes back in this kind.
    pub fn set_compute_kind(&mut self, kind: Kind) {
        self.compute = kind;
        self.text.set_compute_kind(kind);
    }

    /// Images [batch, 3, H, W] to every image token after the final LayerNorm
    /// [batch, tokens, width], [CLS] first.
    pub fn encode_image(&self, images: &Tensor) -> Tensor {
        self.visual.forward_tokens(&images.to_kind(self.compute))
    }

    /// Token ids [batch, L] with their padding mask [batch, L] (non-zero for real tokens) to the
    /// text encoder's output [batch, L, width] (layers `0..k`, no image).
    pub fn encode_text(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        let x = self.text.embed(input_ids, None);
        self.text.forward_layers(&x, 0..self.config.text_layers(), Some(attention_mask), None, false)
    }

    /// The fusion encoder (layers `k..n`): text states [batch, L, width] with their padding mask
    /// attend to themselves and to every image token of `image_states` [batch, T, width];
    /// returns [batch, L, width].
    pub fn fuse(&self, text_states: &Tensor, attention_mask: &Tensor, image_states: &Tensor) -> Tensor {
        let layers = self.config.text_layers()..self.config.text.num_hidden_layers;
        let image = EncoderStates { states: image_states, mask: None };
        self.text.forward_layers(&text_states.to_kind(self.compute), layers, Some(attention_mask), Some(image), false)
    }

    /// The L2-normalised contrastive image feature [batch, embed_dim] of `image_states`
    /// ([`Albef::encode_image`]): `vision_proj` of the [CLS] token.
    pub fn image_feature(&self, image_states: &Tensor) -> Tensor {
        self.heads.image_feature(image_states)
    }

    /// The L2-normalised contrastive text feature [batch, embed_dim] of `text_states`
    /// ([`Albef::encode_text`]): `text_proj` of the [CLS] token.
    pub fn text_feature(&self, text_states: &Tensor) -> Tensor {
        self.heads.text_feature(text_states)
    }

    /// Image-text matching logits [batch, 2] of fused states ([`Albef::fuse`]): `itm_head` of
    /// the [CLS] token; class 1 is "matched".
    pub fn itm_logits(&self, fused: &Tensor) -> Tensor {
        self.heads.itm_logits(fused)
    }

    /// Masked language-modelling logits `[..., vocab]` of fused states `[..., width]` (all of
    /// them `[batch, L, width]`, or the predicted positions' `[R, width]`).
    pub fn mlm_logits(&self, fused: &Tensor) -> Tensor {
        self.mlm_head.forward(fused, self.text.embeddings().word_embeddings())
    }

    /// Keeps the temperature in [0.001, 0.5] (after every optimizer step), in place, without grad.
    pub fn clamp_temp(&self) {
        self.heads.clamp_temp();
    }

    /// Whether the parameter `name` (relative to the model's root, e.g. `visual.conv1.weight`)
    /// has a momentum copy: every parameter except `itm_head.*` and `temp`. ALBEF's momentum
    /// models are the image encoder, `vision_proj`, the text and fusion encoder with its MLM
    /// head, and `text_proj`.
    pub fn has_momentum(name: &str) -> bool {
        !(name == "temp" || name.starts_with("itm_head."))
    }
}


/// Tensors by name, in a state dict's order.
pub type NamedTensors = Vec<(String, Tensor)>;

/// torchmultimodal state-dict keys that hold no parameter braid keeps in the model: the feature
/// queues (braid's `objectives::queue`, laid out `[K, D]`, the transpose of `image_queue` and
/// `text_queue`) and the queue's sample ids and pointer.
const QUEUE_KEYS: [&str; 4] = ["image_queue", "text_queue", "idx_queue", "queue_ptr"];

/// The torchmultimodal module a parameter lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Vision,
    Text,
    Multimodal,
    VisionProj,
    TextProj,
    Temp,
}

impl Part {
    /// The module's key prefix in `ALBEFModelWithSimilarity`'s state dict, online or momentum.
    fn prefix(self, momentum: bool) -> String {
        let m = if momentum { "_m" } else { "" };
        match self {
            Part::Vision => format!("albef_model.vision_encoder{m}.encoder."),
            Part::Text => format!("albef_model.text_encoder{m}."),
            Part::Multimodal => format!("albef_model.multimodal_encoder{m}."),
            Part::VisionProj => format!("vision_proj{m}."),
            Part::TextProj => format!("text_proj{m}."),
            Part::Temp => String::new(),
        }
    }
}

/// One parameter in both layouts.
#[derive(Debug)]
struct KeyPair {
    module: Part,
    /// Key after the module prefix.
    suffix: String,
    /// Another key accepted on import (the feed-forward output layer sits at `model.2` without
    /// dropout and `model.3` with it).
    alias: Option<String>,
    /// braid's name.
    braid: String,
    /// braid's shape.
    shape: Vec<i64>,
    /// torchmultimodal's shape (differs for the class token and the position embeddings).
    tmm_shape: Vec<i64>,
}

impl KeyPair {
    fn key(&self, momentum: bool) -> String {
        format!("{}{}", self.module.prefix(momentum), self.suffix)
    }

    fn alias_key(&self, momentum: bool) -> Option<String> {
        self.alias.as_ref().map(|a| format!("{}{a}", self.module.prefix(momentum)))
    }

    fn has_momentum(&self) -> bool {
        self.module != Part::Temp
    }
}

/// A parameter whose tensor has the same shape in both layouts.
fn same_shape(module: Part, suffix: String, braid: String, shape: Vec<i64>) -> KeyPair {
    KeyPair { module, suffix, alias: None, braid, tmm_shape: shape.clone(), shape }
}

/// The key map for `config`: every braid parameter with a torchmultimodal counterpart (all but
/// `itm_head.*` and `mlm_head.*`).
fn key_map(config: &AlbefConfig) -> Vec<KeyPair> {
    let linear = |output: i64, input: i64| vec![("weight", vec![output, input]), ("bias", vec![output])];
    let norm = |width: i64| vec![("weight", vec![width]), ("bias", vec![width])];
    let mut map = Vec::new();

    let v = &config.vision;
    let (w, p, tokens) = (v.transformer.width, v.patch_size, v.tokens());
    let hidden = (w as f64 * v.transformer.mlp_ratio) as i64;
    let vision = |suffix: &str, braid: &str, shape| same_shape(Part::Vision, suffix.into(), format!("visual.{braid}"), shape);
    map.push(KeyPair { tmm_shape: vec![1, 1, w], ..vision("class_token", "class_embedding", vec![w]) });
    map.push(KeyPair { tmm_shape: vec![1, tokens, w], ..vision("encoder.pos_embedding", "positional_embedding", vec![tokens, w]) });
    map.push(vision("conv_proj.weight", "conv1.weight", vec![w, 3, p, p]));
    map.push(vision("conv_proj.bias", "conv1.bias", vec![w]));
    for i in 0..v.transformer.layers {
        for (tmm_part, braid_part, params) in [
            ("ln_1", "ln_1", norm(w)),
            ("self_attention", "attn", vec![("in_proj_weight", vec![3 * w, w]), ("in_proj_bias", vec![3 * w])]),
            ("self_attention.out_proj", "attn.out_proj", linear(w, w)),
            ("ln_2", "ln_2", norm(w)),
            ("mlp.0", "mlp.c_fc", linear(hidden, w)),
            ("mlp.3", "mlp.c_proj", linear(w, hidden)),
        ] {
            for (param, shape) in params {
                let tmm = format!("encoder.layers.encoder_layer_{i}.{tmm_part}.{param}");
                map.push(vision(&tmm, &format!("transformer.resblocks.{i}.{braid_part}.{param}"), shape));
            }
        }
    }
    for (param, shape) in norm(w) {
        map.push(vision(&format!("encoder.ln.{param}"), &format!("ln_post.{param}"), shape));
    }

    let t = &config.text;
    let tw = t.hidden_size;
    let context = t.encoder_hidden_size.unwrap_or(tw);
    for (table, rows) in [
        ("word_embeddings", t.vocab_size),
        ("position_embeddings", t.max_position_embeddings),
        ("token_type_embeddings", t.type_vocab_size),
    ] {
        let (tmm, braid) = (format!("embeddings.{table}.weight"), format!("text.embeddings.{table}.weight"));
        map.push(same_shape(Part::Text, tmm, braid, vec![rows, tw]));
    }
    for (param, shape) in norm(tw) {
        let (tmm, braid) = (format!("embeddings.layer_norm.{param}"), format!("text.embeddings.LayerNorm.{param}"));
        map.push(same_shape(Part::Text, tmm, braid, shape));
    }
    let k = config.text_layers();
    for i in 0..t.num_hidden_layers {
        let (module, tmm, fusion) = if i < k {
            (Part::Text, format!("encoder.layer.{i}."), false)
        } else {
            (Part::Multimodal, format!("layer.{}.", i - k), true)
        };
        let braid = format!("text.encoder.layer.{i}.");
        let mut parts = vec![
            ("attention.query", "attention.self.query", linear(tw, tw)),
            ("attention.key", "attention.self.key", linear(tw, tw)),
            ("attention.value", "attention.self.value", linear(tw, tw)),
            ("attention.output", "attention.output.dense", linear(tw, tw)),
            ("attention_layernorm", "attention.output.LayerNorm", norm(tw)),
        ];
        if fusion {
            parts.extend([
                ("cross_attention.query", "crossattention.self.query", linear(tw, tw)),
                ("cross_attention.key", "crossattention.self.key", linear(tw, context)),
                ("cross_attention.value", "crossattention.self.value", linear(tw, context)),
                ("cross_attention.output", "crossattention.output.dense", linear(tw, tw)),
                ("cross_attention_layernorm", "crossattention.output.LayerNorm", norm(tw)),
            ]);
        }
        parts.extend([
            ("feedforward.model.0", "intermediate.dense", linear(t.intermediate_size, tw)),
            ("feedforward_layernorm", "output.LayerNorm", norm(tw)),
        ]);
        for (tmm_part, braid_part, params) in parts {
            for (param, shape) in params {
                map.push(same_shape(module, format!("{tmm}{tmm_part}.{param}"), format!("{braid}{braid_part}.{param}"), shape));
            }
        }
        // The feed-forward output layer follows GELU, then a dropout module when the encoder
        // was built with dropout: `bert_text_encoder`'s default 0.1 puts it at `model.3`,
        // `ALBEFMultimodalEncoder`'s 0 at `model.2`.
        let (primary, other) = if fusion { ("model.2", "model.3") } else { ("model.3", "model.2") };
        for (param, shape) in linear(tw, t.intermediate_size) {
            let pair = same_shape(module, format!("{tmm}feedforward.{primary}.{param}"), format!("{braid}output.dense.{param}"), shape);
            map.push(KeyPair { alias: Some(format!("{tmm}feedforward.{other}.{param}")), ..pair });
        }
    }

    for (module, name, input) in [(Part::VisionProj, "vision_proj", w), (Part::TextProj, "text_proj", tw)] {
        for (param, shape) in linear(config.embed_dim, input) {
            map.push(same_shape(module, param.into(), format!("{name}.{param}"), shape));
        }
    }
    map.push(same_shape(Part::Temp, "temp".into(), "temp".into(), vec![]));
    map
}

/// Where the model's layout cannot hold torchmultimodal's ALBEF, why.
fn layout_problems(config: &AlbefConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(invalid) = config.validate() {
        problems.push(format!("invalid config: {invalid}"));
    }
    let v = &config.vision;
    if !v.patch_bias || v.pre_norm {
        problems.push(format!(
            "torchmultimodal's image encoder (torchvision's ViT) has a patch bias and no ln_pre; the config has \
             vision.patch_bias {} and vision.pre_norm {}",
            v.patch_bias, v.pre_norm
        ));
    }
    if config.text.type_vocab_size == 0 {
        problems.push("torchmultimodal's text embeddings have token types; the config has text.type_vocab_size 0".into());
    }
    problems
}

/// Renames torchmultimodal's `ALBEFModelWithSimilarity` state dict (`albef_model.vision_encoder.*`,
/// `albef_model.text_encoder.*`, `albef_model.multimodal_encoder.*`, `vision_proj.*`,
/// `text_proj.*`, `temp`) to braid's names, reshaping the class token (`[1, 1, W]` to `[W]`) and
/// the position embeddings (`[1, T, W]` to `[T, W]`); the other tensors keep their shapes:
///
/// - `albef_model.vision_encoder.encoder.`: `conv_proj` → `visual.conv1`, `class_token` →
///   `visual.class_embedding`, `encoder.pos_embedding` → `visual.positional_embedding`,
///   `encoder.layers.encoder_layer_N.{ln_1, self_attention, ln_2, mlp.0, mlp.3}` →
///   `visual.transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}`, `encoder.ln` →
///   `visual.ln_post`;
/// - `albef_model.text_encoder.`: `embeddings.{word,position,token_type}_embeddings` →
///   `text.embeddings.*`, `embeddings.layer_norm` → `text.embeddings.LayerNorm`, and for layer
///   `N < k`: `encoder.layer.N.attention.{query,key,value}` →
///   `text.encoder.layer.N.attention.self.*`, `attention.output` → `attention.output.dense`,
///   `attention_layernorm` → `attention.output.LayerNorm`, `feedforward.model.0` →
///   `intermediate.dense`, `feedforward.model.3` (or `.2`) → `output.dense`,
///   `feedforward_layernorm` → `output.LayerNorm`;
/// - `albef_model.multimodal_encoder.layer.J.` → `text.encoder.layer.(k+J).`: as the text
///   layers (feed-forward output `model.2`, or `.3`), plus `cross_attention.{query,key,value}` →
///   `crossattention.self.*`, `cross_attention.output` → `crossattention.output.dense`,
///   `cross_attention_layernorm` → `crossattention.output.LayerNorm`;
/// - `vision_proj`, `text_proj`, `temp` keep their names.
///
/// Returns the online tensors and the momentum tensors: the `*_m` modules
/// (`albef_model.vision_encoder_m.*`, ..., `vision_proj_m.*`, `text_proj_m.*`) under the same braid
/// names, for a momentum copy; empty when the state dict has no momentum keys. The queues
/// (`image_queue`, `text_queue`, `idx_queue`, `queue_ptr`) are skipped: braid keeps them in
/// `objectives::queue` as `[K, D]`, the transpose of torchmultimodal's `[D, K]`.
/// torchmultimodal has no ITM or MLM head (they live in its examples, outside the wheel), so
/// `itm_head.*` and `mlm_head.*` (and the momentum `mlm_head.*`) are not in the map: they keep
/// their own initialisation. Errors name every missing, mis-shaped and unexpected key.
pub fn import_torchmultimodal(
    tensors: &[(String, Tensor)],
    config: &AlbefConfig,
) -> Result<(NamedTensors, NamedTensors), ModelError> {
    let weights_error = |reason: String| ModelError::Weights { origin: "torchmultimodal ALBEF state dict".into(), reason };
    let layout = layout_problems(config);
    if !layout.is_empty() {
        return Err(weights_error(layout.join("; ")));
    }
    let by_name: HashMap<&str, &Tensor> = tensors.iter().map(|(name, t)| (name.as_str(), t)).collect();
    let map = key_map(config);
    let with_momentum = map.iter().filter(|pair| pair.has_momentum()).any(|pair| {
        by_name.contains_key(pair.key(true).as_str()) || pair.alias_key(true).is_some_and(|a| by_name.contains_key(a.as_str()))
    });
    let mut used = HashSet::new();
    let mut problems = Vec::new();
    let mut take = |pair: &KeyPair, momentum: bool| -> Option<(String, Tensor)> {
        let key = pair.key(momentum);
        let found = [Some(key.clone()), pair.alias_key(momentum)]
            .into_iter()
            .flatten()
            .find_map(|k| by_name.get(k.as_str()).map(|t| (k, *t)));
        let Some((found_key, t)) = found else {
            problems.push(format!("missing key {key:?} (braid's {})", pair.braid));
            return None;
        };
        used.insert(found_key.clone());
        if t.size() != pair.tmm_shape {
            problems.push(format!(
                "key {found_key:?} has shape {:?}, braid's {} needs {:?}",
                t.size(),
                pair.braid,
                pair.tmm_shape
            ));
            return None;
        }
        Some((pair.braid.clone(), t.reshape(pair.shape.as_slice())))
    };
    let online: Vec<_> = map.iter().filter_map(|pair| take(pair, false)).collect();
    let momentum: Vec<_> = if with_momentum {
        map.iter().filter(|pair| pair.has_momentum()).filter_map(|pair| take(pair, true)).collect()
    } else {
        Vec::new()
    };
    let mut unexpected: Vec<&str> = tensors
        .iter()
        .map(|(name, _)| name.as_str())
        .filter(|name| !used.contains(*name) && !QUEUE_KEYS.contains(name))
        .collect();
    if !unexpected.is_empty() {
        unexpected.sort_unstable();
        let shown = unexpected.iter().take(8).map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", ");
        let more = if unexpected.len() > 8 { format!(" and {} more", unexpected.len() - 8) } else { String::new() };
        problems.push(format!("unexpected keys {shown}{more} (a different number of layers?)"));
    }
    if problems.is_empty() {
        Ok((online, momentum))
    } else {
        Err(weights_error(problems.join("; ")))
    }
}

/// The inverse of [`import_torchmultimodal`]: braid's online tensors (and momentum tensors, as
/// the `*_m` modules) under torchmultimodal's `ALBEFModelWithSimilarity` keys, the class token
/// and position embeddings reshaped back. The text encoder's feed-forward output layer is
/// written as `feedforward.model.3` (`bert_text_encoder` with its default dropout, as
/// torchmultimodal's ALBEF examples build it), the fusion encoder's as `feedforward.model.2`.
/// Tensors without a torchmultimodal name (`itm_head.*`, `mlm_head.*`) are left out, and so are
/// mapped names absent from the input; the queues are not written. The result loads with
/// `load_state_dict(strict=False)`, missing only the queue buffers.
pub fn export_torchmultimodal(
    online: &[(String, Tensor)],
    momentum: Option<&[(String, Tensor)]>,
    config: &AlbefConfig,
) -> Vec<(String, Tensor)> {
    let map = key_map(config);
    let mut exported = Vec::new();
    let mut write = |tensors: &[(String, Tensor)], momentum: bool| {
        let by_name: HashMap<&str, &Tensor> = tensors.iter().map(|(name, t)| (name.as_str(), t)).collect();
        for pair in map.iter().filter(|pair| !momentum || pair.has_momentum()) {
            if let Some(t) = by_name.get(pair.braid.as_str()) {
                let t = if t.size() == pair.shape { t.reshape(pair.tmm_shape.as_slice()) } else { t.shallow_clone() };
                exported.push((pair.key(momentum), t));
            }
        }
    };
    write(online, false);
    if let Some(momentum) = momentum {
        write(momentum, true);
    }
    exported
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn tiny() -> AlbefConfig {
        AlbefConfig::preset("tiny", 99, 0, None).unwrap()
    }

    /// The named variables of a fresh tiny model, in fp32 on the CPU.
    fn fresh(config: AlbefConfig) -> (nn::VarStore, Vec<(String, Tensor)>) {
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = Albef::new(&vs.root(), config);
        let mut named: Vec<_> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        (vs, named)
    }

    fn get<'a>(named: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
        &named.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} missing")).1
    }

    #[test]
    fn presets_validate() {
        for name in ["tiny", "base"] {
            let config = AlbefConfig::preset(name, 30522, 0, None).unwrap();
            config.validate().unwrap();
            assert_eq!(config.text_layers() * 2, config.text.num_hidden_layers, "{name}");
        }
        assert_eq!(AlbefConfig::preset("base", 30522, 0, Some(30)).unwrap().text.max_position_embeddings, 30);
        assert_eq!(AlbefConfig::preset("base", 30522, 0, None).unwrap().text.max_position_embeddings, 512);
        assert!(matches!(AlbefConfig::preset("large", 30522, 0, None), Err(ModelError::UnknownPreset { .. })));
    }

    #[test]
    fn validate_names_every_bad_field() {
        let good = tiny();
        let mut bad = good;
        bad.vision.transformer.width = 48;
        bad.vision.patch_size = 5;
        bad.vision.output_dim = Some(32);
        bad.text.num_attention_heads = 5;
        bad.text.cross_attention_from_layer = None;
        bad.embed_dim = 0;
        bad.temp = 0.9;
        bad.alpha = 1.5;
        bad.mlm_probability = 0.0;
        let problems = bad.validate().unwrap_err();
        for needle in [
            "vision.image_size 32 is not a multiple of vision.patch_size 5",
            "vision.output_dim is 32",
            "text.hidden_size 64 is not a multiple of num_attention_heads 5",
            "text.cross_attention_from_layer is None",
            "text.hidden_size 64 differs from vision.transformer.width 48",
            "embed_dim is 0",
            "temp is 0.9",
            "alpha is 1.5",
            "mlm_probability is 0",
        ] {
            assert!(problems.contains(needle), "{needle:?} not in {problems}");
        }
        let mut wide = good;
        wide.text.encoder_hidden_size = Some(48);
        assert!(wide.validate().unwrap_err().contains("text.encoder_hidden_size 48 differs from vision.transformer.width 64"));
        let mut no_text_layer = good;
        no_text_layer.text.cross_attention_from_layer = Some(0);
        assert!(no_text_layer.validate().unwrap_err().contains("text.cross_attention_from_layer is 0"));
    }

    #[test]
    fn momentum_covers_everything_but_itm_head_and_temp() {
        let (_vs, named) = fresh(tiny());
        let without: Vec<_> = named.iter().map(|(n, _)| n.as_str()).filter(|n| !Albef::has_momentum(n)).collect();
        assert_eq!(without, ["itm_head.bias", "itm_head.weight", "temp"]);
        for name in ["visual.conv1.weight", "text.encoder.layer.1.crossattention.self.key.weight", "mlm_head.bias", "vision_proj.weight"] {
            assert!(Albef::has_momentum(name), "{name}");
        }
    }

    #[test]
    fn temp_starts_at_config_and_clamps() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Albef::new(&vs.root(), tiny());
        assert!((model.heads.temp.double_value(&[]) - 0.07).abs() < 1e-7);
        tch::no_grad(|| {
            let _ = model.heads.temp.shallow_clone().fill_(2.0);
        });
        model.clamp_temp();
        assert_eq!(model.heads.temp.double_value(&[]), 0.5);
        tch::no_grad(|| {
            let _ = model.heads.temp.shallow_clone().fill_(0.0);
        });
        model.clamp_temp();
        assert!((model.heads.temp.double_value(&[]) - 0.001).abs() < 1e-9);
    }

    #[test]
    fn export_then_import_is_the_identity_and_covers_all_but_the_heads() {
        let config = tiny();
        let (_vs, online) = fresh(config);
        let (_vs_m, momentum) = fresh(config);
        let momentum: Vec<_> = momentum.into_iter().filter(|(n, _)| Albef::has_momentum(n)).collect();
        let exported = export_torchmultimodal(&online, Some(&momentum), &config);
        assert!(exported.iter().any(|(k, t)| k == "albef_model.vision_encoder.encoder.class_token" && t.size() == [1, 1, 64]));
        assert!(exported.iter().any(|(k, _)| k == "albef_model.multimodal_encoder_m.layer.0.cross_attention.key.weight"));
        assert!(exported.iter().any(|(k, _)| k == "albef_model.text_encoder.encoder.layer.0.feedforward.model.3.bias"));
        let (back, back_m) = import_torchmultimodal(&exported, &config).unwrap();
        let unmapped: Vec<_> = online
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !back.iter().any(|(b, _)| b == n))
            .collect();
        assert!(unmapped.iter().all(|n| n.starts_with("itm_head.") || n.starts_with("mlm_head.")), "{unmapped:?}");
        assert_eq!(back.len() + unmapped.len(), online.len());
        for (list, original) in [(&back, &online), (&back_m, &momentum)] {
            for (name, t) in list.iter() {
                assert!(t.equal(get(original, name)), "{name}");
            }
        }
        assert_eq!(back_m.len(), back.len() - 1, "every mapped parameter but temp has a momentum copy");

        let online_only = export_torchmultimodal(&online, None, &config);
        let (_, no_momentum) = import_torchmultimodal(&online_only, &config).unwrap();
        assert!(no_momentum.is_empty());
    }

    #[test]
    fn import_names_missing_misshaped_and_unexpected_keys() {
        let config = tiny();
        let (_vs, online) = fresh(config);
        let exported = export_torchmultimodal(&online, None, &config);
        let mut broken: Vec<_> = exported
            .iter()
            .filter(|(k, _)| k != "text_proj.bias")
            .map(|(k, t)| {
                let t = if k == "albef_model.multimodal_encoder.layer.0.cross_attention.key.weight" {
                    Tensor::zeros([64, 48], (Kind::Float, Device::Cpu))
                } else {
                    t.shallow_clone()
                };
                (k.clone(), t)
            })
            .collect();
        broken.push(("albef_model.vision_encoder.encoder.encoder.layers.encoder_layer_2.ln_1.weight".into(), Tensor::zeros([64], (Kind::Float, Device::Cpu))));
        broken.push(("image_queue".into(), Tensor::zeros([32, 8], (Kind::Float, Device::Cpu))));
        let err = import_torchmultimodal(&broken, &config).unwrap_err().to_string();
        assert!(err.contains("missing key \"text_proj.bias\""), "{err}");
        assert!(
            err.contains("key \"albef_model.multimodal_encoder.layer.0.cross_attention.key.weight\" has shape [64, 48]"),
            "{err}"
        );
        assert!(err.contains("unexpected keys \"albef_model.vision_encoder.encoder.encoder.layers.encoder_layer_2.ln_1.weight\""), "{err}");
        assert!(!err.contains("image_queue"), "{err}");
    }

    #[test]
    fn import_accepts_either_feed_forward_index() {
        let config = tiny();
        let (_vs, online) = fresh(config);
        let renamed: Vec<_> = export_torchmultimodal(&online, None, &config)
            .into_iter()
            .map(|(k, t)| (k.replace("feedforward.model.3", "feedforward.model.2"), t))
            .collect();
        let (back, _) = import_torchmultimodal(&renamed, &config).unwrap();
        let name = "text.encoder.layer.0.output.dense.weight";
        assert!(get(&back, name).equal(get(&online, name)));
    }

    #[test]
    fn forward_shapes_and_bf16_outputs() {
        let config = tiny();
        let vs = nn::VarStore::new(Device::Cpu);
        let mut model = Albef::new(&vs.root(), config);
        let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let ids = Tensor::randint_low(1, 99, [2, 7], (Kind::Int64, Device::Cpu));
        let mask = Tensor::ones([2, 7], (Kind::Int64, Device::Cpu));
        for kind in [Kind::Float, Kind::BFloat16] {
            model.set_compute_kind(kind);
            let image = model.encode_image(&images);
            let text = model.encode_text(&ids, &mask);
            let fused = model.fuse(&text, &mask, &image);
            assert_eq!(image.size(), [2, 17, 64]);
            assert_eq!(fused.size(), [2, 7, 64]);
            assert_eq!(model.image_feature(&image).size(), [2, 64]);
            assert_eq!(model.text_feature(&text).size(), [2, 64]);
            assert_eq!(model.itm_logits(&fused).size(), [2, 2]);
            let logits = model.mlm_logits(&fused);
            assert_eq!(logits.size(), [2, 7, 99]);
            assert_eq!(logits.kind(), kind);
        }
        for (name, p) in vs.variables() {
            assert_eq!(p.kind(), Kind::Float, "{name}");
        }
    }

    /// The image encoder's share against the published cost of ViT-B/16 at 224 px (17.58 G
    /// multiply-accumulates as counted by fvcore, patch embedding included), and the text side
    /// growing with the caption length.
    #[test]
    fn flop_count_matches_published_vit_b_16_cost() {
        let mut config = AlbefConfig::preset("base", 30522, 0, Some(30)).unwrap();
        config.vision.image_size = 224;
        let without_vision_blocks = AlbefConfig { vision: VitConfig { transformer: TransformerShape { layers: 0, ..config.vision.transformer }, ..config.vision }, ..config };
        let patch = 2.0 * 196.0 * (3.0 * 16.0 * 16.0) * 768.0;
        let vision = config.forward_flops_per_sample() - without_vision_blocks.forward_flops_per_sample() + patch;
        let published = 2.0 * 17.58e9;
        assert!((vision / published - 1.0).abs() < 0.03, "{vision:e} vs {published:e}");
        let longer = AlbefConfig { text: BertConfig { max_position_embeddings: 60, ..config.text }, ..config };
        assert!(longer.forward_flops_per_sample() > config.forward_flops_per_sample());
    }
}
