//! BLIP (Li et al. 2022, "Bootstrapping Language-Image Pre-training"): an image encoder and a
//! multimodal mixture of encoder-decoder (MED) text model trained with three objectives, one per
//! mode of the MED.
//!
//! ```text
//! [CLS] text ─► E ─► N x ( SA ──────► FF ) ─► [CLS] ─► text_proj ─► L2 norm ─► text feature ─┐
//!                                                                                            ├─ ITC
//! image ─► ViT ─► image tokens ──┬─► [CLS] ─► vision_proj ─► L2 norm ─► image feature ───────┘
//!                                │
//! [ENC] text ─► E ─► N x ( SA ─► CA ─► FF ) ─► [ENC] ─► itm_head ─► ITM
//!                                │
//! [DEC] text ─► E ─► N x ( SA'─► CA ─► FF ) ─► every token ─► lm_head ─► LM
//!
//! ViT:  patch conv, [CLS], positions, pre-LN blocks, LayerNorm
//! E:    word and position embeddings, LayerNorm      SA:  bidirectional self-attention
//! SA':  the decoder's causal self-attention          CA:  cross-attention to the image tokens
//! FF:   feed-forward network                         the same letters hold the same weights
//! ```
//!
//! - Image encoder: [`VisionTransformer`] in the encoder layout ([`VitConfig::encoder`]: a patch
//!   bias, no `ln_pre`, no projection, LayerNorm epsilon 1e-5 as in `transformers`), every token
//!   out.
//! - Unimodal text encoder ([`Blip::encode_text`]): the MED without cross-attention, `[CLS]` first;
//!   its `[CLS]` through `text_proj` is the text feature of image-text contrastive learning (ITC,
//!   with a learnable temperature `temp`, momentum distillation and feature queues).
//! - Image-grounded text encoder ([`Blip::encode_multimodal`]): the same layers with
//!   cross-attention to every image token, `[ENC]` first; its `[ENC]` through `itm_head` gives the
//!   image-text matching logits (ITM, with hard negatives).
//! - Image-grounded text decoder ([`Blip::decoder_logits`]): the same embeddings, cross-attention
//!   and feed-forward networks, but its own causal self-attention in every layer, `[DEC]` first;
//!   `lm_head` (decoder tied to the word embeddings) gives next-token logits for language
//!   modelling (LM, cross-entropy with label smoothing 0.1, [`Blip::lm_loss`]) and captioning
//!   ([`generate_captions`]).
//! - Weight sharing as in BLIP's pretraining (`tie_encoder_decoder_weights(..., '/attention')`):
//!   one [`BertModel`] holds the embeddings, self-attention, cross-attention and feed-forward
//!   networks of the encoder; the decoder adds only its self-attention modules (and `lm_head`).
//! - Momentum model: a copy of the image encoder, `vision_proj`, the text encoder and `text_proj`
//!   ([`Blip::has_momentum`]), updated as `theta_m <- m theta_m + (1 - m) theta`
//!   (`objectives::momentum`), whose features fill the queues (`objectives::queue`) and give the
//!   soft targets of ITC (`objectives::distill`).
//! - Objective: ITC + ITM + LM, unweighted.
//!
//! Dropout is not modelled. Parameter names: `visual.*` (open_clip's ViT names), `text.*`
//! (Hugging Face BERT names: `text.embeddings.*`, `text.encoder.layer.N.{attention,
//! crossattention, intermediate, output}.*`), `text_decoder.layer.N.attention.*` (the decoder's
//! self-attention, BERT names), `lm_head.*` (`cls.predictions.*`), `vision_proj.*`, `text_proj.*`,
//! `itm_head.*` and `temp`. [`import_transformers`] and [`export_transformers`] translate to and
//! from `transformers`' `BlipForImageTextRetrieval` and `BlipForConditionalGeneration`.

use std::collections::{BTreeMap, HashMap, HashSet};

use tch::nn;
use tch::{Device, Kind, Reduction, Tensor};

use super::albef::NamedTensors;
use super::alignment::{AlignmentHeads, TEMP_MAX, TEMP_MIN};
use super::bert::{BertAttention, BertConfig, INITIALIZER_RANGE, BertLmHead, BertModel, DecodingCache, EncoderStates};
use super::layers::{Activation, TransformerShape};
use super::vit::{VisionTransformer, VitConfig};
use super::ModelError;


/// The special tokens BLIP adds to or takes from its BERT tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlipTokens {
    /// `[DEC]`, the decoder's first token (the tokenizer's `bos_token`; 30522 for bert-base-uncased).
    pub bos_token_id: i64,
    /// `[ENC]`, the image-grounded encoder's first token (30523 for bert-base-uncased).
    pub enc_token_id: i64,
    /// `[SEP]`, the end of a caption (102).
    pub sep_token_id: i64,
    /// `[PAD]` (0).
    pub pad_token_id: i64,
}

/// Shape and pretraining hyperparameters of a BLIP model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlipConfig {
    /// Image encoder ([`VitConfig::encoder`], LayerNorm epsilon 1e-5).
    pub vision: VitConfig,
    /// The MED text model: cross-attention in every layer (`cross_attention_from_layer =
    /// Some(0)`), no token types, keys and values of the cross-attention reading the image width.
    pub text: BertConfig,
    /// Size of the contrastive features (256).
    pub embed_dim: i64,
    /// Initial temperature of the contrastive loss (0.07), learnable, kept in [0.001, 0.5].
    pub temp: f64,
    /// Length of each momentum feature queue (57,600).
    pub queue_size: i64,
    /// Momentum of the momentum model's update (0.995).
    pub momentum: f64,
    /// Weight of the momentum model's soft targets in ITC (0.4).
    pub alpha: f64,
    /// Label smoothing of the LM loss (0.1).
    pub label_smoothing: f64,
    /// `[DEC]`: the decoder's first token.
    pub bos_token_id: i64,
    /// `[ENC]`: the image-grounded encoder's first token.
    pub enc_token_id: i64,
    /// `[SEP]`: the end of a caption.
    pub sep_token_id: i64,
    /// `[PAD]`.
    pub pad_token_id: i64,
    /// Text tokens per sample (BLIP's pretraining: 30), for [`BlipConfig::forward_flops_per_sample`];
    /// at most `text.max_position_embeddings`.
    pub context_length: i64,
}

impl BlipConfig {
    /// A named preset:
    /// - `tiny` (CPU tests and the demo): ViT of 2 layers, width 64, 4 heads, patch 8 on 32x32
    ///   images; MED of 2 layers, width 64, 4 heads, feed-forward 256, 64 positions; features of
    ///   64; queues of 64; 32 text tokens unless `context_length` is given.
    /// - `base` (the paper's ViT-B): ViT-B/16 at 224x224 and the bert-base MED (12 layers, width
    ///   768, 512 positions as in the checkpoints); features of 256; queues of 57,600; 30 text
    ///   tokens unless `context_length` is given.
    ///
    /// `vocab_size` (including `[DEC]` and `[ENC]`) and `special` come from the tokenizer.
    pub fn preset(
        name: &str,
        vocab_size: i64,
        special: BlipTokens,
        context_length: Option<i64>,
    ) -> Result<Self, ModelError> {
        let shape =
            |width, layers, heads| TransformerShape { width, layers, heads, mlp_ratio: 4.0, layer_norm_eps: 1e-5 };
        let (vision, width, layers, heads, intermediate, positions, embed_dim, queue_size, context) = match name {
            "tiny" => (VitConfig::encoder(32, 8, shape(64, 2, 4)), 64, 2, 4, 256, 64, 64, 64, 32),
            "base" => (VitConfig::encoder(224, 16, shape(768, 12, 12)), 768, 12, 12, 3072, 512, 256, 57600, 30),
            other => return Err(ModelError::UnknownPreset { family: "blip".into(), preset: other.into() }),
        };
        let text = BertConfig {
            vocab_size,
            hidden_size: width,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: intermediate,
            max_position_embeddings: positions,
            type_vocab_size: 0,
            cross_attention_from_layer: Some(0),
            encoder_hidden_size: (vision.transformer.width != width).then_some(vision.transformer.width),
            pad_token_id: Some(special.pad_token_id),
            layer_norm_eps: 1e-12,
            initializer_range: if name == "tiny" { (width as f64).powf(-0.5) } else { INITIALIZER_RANGE },
        };
        Ok(Self {
            vision,
            text,
            embed_dim,
            temp: 0.07,
            queue_size,
            momentum: 0.995,
            alpha: 0.4,
            label_smoothing: 0.1,
            bos_token_id: special.bos_token_id,
            enc_token_id: special.enc_token_id,
            sep_token_id: special.sep_token_id,
            pad_token_id: special.pad_token_id,
            context_length: context_length.unwrap_or(context),
        })
    }

    /// Every inconsistency, joined by "; ", each naming its field (`vision.*`, `text.*`, ...).
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = vision_problems(&self.vision);
        if let Err(text) = self.text.validate() {
            problems.extend(text.split("; ").map(|p| format!("text.{p}")));
        }
        if self.text.cross_attention_from_layer != Some(0) {
            problems.push(format!(
                "text.cross_attention_from_layer is {:?}, must be Some(0): every MED layer has cross-attention",
                self.text.cross_attention_from_layer
            ));
        }
        if self.text.type_vocab_size != 0 {
            problems.push(format!(
                "text.type_vocab_size is {}, must be 0: BLIP's text model has no token types",
                self.text.type_vocab_size
            ));
        }
        let image_width = self.vision.transformer.width;
        match self.text.encoder_hidden_size {
            None if self.text.hidden_size != image_width => problems.push(format!(
                "text.hidden_size {} differs from vision.transformer.width {image_width}: the cross-attention reads \
                 the image tokens (set text.encoder_hidden_size to {image_width})",
                self.text.hidden_size
            )),
            Some(width) if width != image_width => problems
                .push(format!("text.encoder_hidden_size {width} differs from vision.transformer.width {image_width}")),
            _ => {}
        }
        for (name, value) in [("embed_dim", self.embed_dim), ("queue_size", self.queue_size)] {
            if value <= 0 {
                problems.push(format!("{name} is {value}, must be positive"));
            }
        }
        if !(TEMP_MIN..=TEMP_MAX).contains(&self.temp) {
            problems.push(format!("temp is {}, must lie in BLIP's clamp range [{TEMP_MIN}, {TEMP_MAX}]", self.temp));
        }
        for (name, value) in [("momentum", self.momentum), ("alpha", self.alpha)] {
            if !(0.0..=1.0).contains(&value) {
                problems.push(format!("{name} is {value}, must lie in [0, 1]"));
            }
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            problems.push(format!("label_smoothing is {}, must lie in [0, 1)", self.label_smoothing));
        }
        let tokens = [
            ("bos_token_id", self.bos_token_id),
            ("enc_token_id", self.enc_token_id),
            ("sep_token_id", self.sep_token_id),
            ("pad_token_id", self.pad_token_id),
        ];
        for (name, id) in tokens {
            if id < 0 || id >= self.text.vocab_size {
                problems.push(format!("{name} {id} is outside the vocabulary of {}", self.text.vocab_size));
            }
        }
        for (i, (a, x)) in tokens.iter().enumerate() {
            for (b, y) in &tokens[i + 1..] {
                if x == y {
                    problems.push(format!("{a} and {b} are both {x}: the special tokens must differ"));
                }
            }
        }
        if self.text.pad_token_id != Some(self.pad_token_id) {
            problems.push(format!(
                "pad_token_id {} differs from text.pad_token_id {:?}",
                self.pad_token_id, self.text.pad_token_id
            ));
        }
        if self.context_length < 2 || self.context_length > self.text.max_position_embeddings {
            problems.push(format!(
                "context_length is {}, must lie in [2, text.max_position_embeddings {}]",
                self.context_length, self.text.max_position_embeddings
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Rough forward FLOPs of one pretraining sample (multiply-adds count 2), for throughput and
    /// MFU, counting the passes that are backpropagated, so that 3x this is the sample's training
    /// cost: the image encoder once; the unimodal text encoder once; the image-grounded encoder
    /// three times (the positive pair and the two hard-negative pairs); the decoder once with the
    /// LM head at the `context_length - 1` positions that can predict a next token (at most: the
    /// head skips padding); the projections and the ITM head. Texts are `context_length`
    /// tokens long. Left out: the momentum model ([`BlipConfig::momentum_flops_per_sample`]), the
    /// loss terms against the queues, embedding lookups, LayerNorms, softmaxes and other
    /// elementwise work.
    pub fn forward_flops_per_sample(&self) -> f64 {
        let t = &self.text;
        let w = t.hidden_size as f64;
        let image_width = self.vision.transformer.width as f64;
        let l = self.context_length as f64;
        let lm_head = 2.0 * (l - 1.0) * w * w + 2.0 * (l - 1.0) * w * t.vocab_size as f64;
        let heads = 2.0 * self.embed_dim as f64 * (image_width + w) + 3.0 * 2.0 * w * 2.0;
        self.image_encoder_flops() + self.text_flops(false) + 4.0 * self.text_flops(true) + lm_head + heads
    }

    /// Forward FLOPs of the momentum model per sample (no backward): the image encoder, the
    /// unimodal text encoder and both projections, counted as in
    /// [`BlipConfig::forward_flops_per_sample`].
    pub fn momentum_flops_per_sample(&self) -> f64 {
        let projections = 2.0 * self.embed_dim as f64 * (self.vision.transformer.width + self.text.hidden_size) as f64;
        self.image_encoder_flops() + self.text_flops(false) + projections
    }

    /// One pass of the image encoder.
    fn image_encoder_flops(&self) -> f64 {
        let v = &self.vision;
        let (n, w) = (v.tokens() as f64, v.transformer.width as f64);
        let hidden = w * v.transformer.mlp_ratio;
        let layer = 2.0 * n * (4.0 * w * w + 2.0 * w * hidden) + 4.0 * n * n * w;
        let patch = 2.0 * (v.grid() * v.grid()) as f64 * (3 * v.patch_size * v.patch_size) as f64 * w;
        patch + v.transformer.layers as f64 * layer
    }

    /// One pass of the MED over `context_length` tokens, with cross-attention to every image
    /// token when `cross` (the decoder costs what the image-grounded encoder costs).
    fn text_flops(&self, cross: bool) -> f64 {
        let t = &self.text;
        let (l, w, ff) = (self.context_length as f64, t.hidden_size as f64, t.intermediate_size as f64);
        let context = t.encoder_hidden_size.unwrap_or(t.hidden_size) as f64;
        let image_tokens = self.vision.tokens() as f64;
        let layer = 2.0 * l * (4.0 * w * w + 2.0 * w * ff) + 4.0 * l * l * w;
        let cross_attention =
            2.0 * l * 2.0 * w * w + 2.0 * image_tokens * 2.0 * context * w + 4.0 * l * image_tokens * w;
        t.num_hidden_layers as f64 * (layer + if cross { cross_attention } else { 0.0 })
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
        problems.push(format!(
            "vision.image_size {} is not a multiple of vision.patch_size {}",
            v.image_size, v.patch_size
        ));
    }
    if t.heads > 0 && t.width % t.heads != 0 {
        problems.push(format!(
            "vision.transformer.width {} is not a multiple of vision.transformer.heads {}",
            t.width, t.heads
        ));
    }
    if t.mlp_ratio.is_nan() || t.mlp_ratio <= 0.0 {
        problems.push(format!("vision.transformer.mlp_ratio is {}, must be positive", t.mlp_ratio));
    }
    if t.layer_norm_eps.is_nan() || t.layer_norm_eps <= 0.0 {
        problems.push(format!("vision.transformer.layer_norm_eps is {}, must be positive", t.layer_norm_eps));
    }
    if let Some(dim) = v.output_dim {
        problems.push(format!(
            "vision.output_dim is {dim}, must be None: BLIP projects the image [CLS] with vision_proj outside the tower"
        ));
    }
    if !v.patch_bias || v.pre_norm {
        problems.push(format!(
            "vision has patch_bias {} and pre_norm {}: BLIP's image encoder has a patch bias and no ln_pre",
            v.patch_bias, v.pre_norm
        ));
    }
    problems
}

/// The BLIP model (online weights; the momentum model is a second instance holding the
/// parameters [`Blip::has_momentum`] names).
#[derive(Debug)]
pub struct Blip {
    /// Image encoder, parameters under `visual.`.
    pub visual: VisionTransformer,
    /// The MED shared by the three modes (embeddings; per layer the encoder's self-attention,
    /// the cross-attention and the feed-forward network), under `text.`.
    pub text: BertModel,
    /// The decoder's causal self-attention, one per layer, under `text_decoder.layer.N.attention.`.
    pub decoder_self_attention: Vec<BertAttention>,
    /// Language-modelling head of the decoder, under `lm_head.`; its decoder weight is the text
    /// word embeddings.
    pub lm_head: BertLmHead,
    /// Contrastive projections, temperature and ITM head (`vision_proj`, `text_proj`,
    /// `itm_head` on the image-grounded `[ENC]` state, `temp`).
    pub heads: AlignmentHeads,
    config: BlipConfig,
    compute: Kind,
}

impl Blip {
    /// Creates the model's parameters under `root`. Panics when `config` fails
    /// [`BlipConfig::validate`].
    pub fn new(root: &nn::Path, config: BlipConfig) -> Self {
        if let Err(problems) = config.validate() {
            panic!("invalid BLIP config: {problems}");
        }
        let image_width = config.vision.transformer.width;
        let text_width = config.text.hidden_size;
        let decoder = root / "text_decoder" / "layer";
        Self {
            visual: VisionTransformer::new(root / "visual", config.vision, Activation::Gelu),
            text: BertModel::new(root / "text", config.text),
            decoder_self_attention: (0..config.text.num_hidden_layers)
                .map(|i| BertAttention::new(&decoder / i / "attention", &config.text, text_width))
                .collect(),
            lm_head: BertLmHead::new(root / "lm_head", &config.text),
            heads: AlignmentHeads::new(root, image_width, text_width, config.embed_dim, config.temp),
            config,
            compute: Kind::Float,
        }
    }

    /// The model's shape and hyperparameters.
    pub fn config(&self) -> &BlipConfig {
        &self.config
    }

    /// Sets the kind the encoders, the decoder and the heads compute in: the parameters' own
    /// kind, or bf16 (mixed precision: parameters stay fp32). Every output comes back in this
    /// kind except [`Blip::lm_loss`] (fp32).
    pub fn set_compute_kind(&mut self, kind: Kind) {
        self.compute = kind;
        self.text.set_compute_kind(kind);
    }

    /// Images [batch, 3, H, W] to every image token after the final LayerNorm
    /// [batch, tokens, width], `[CLS]` first.
    pub fn encode_image(&self, images: &Tensor) -> Tensor {
        self.visual.forward_tokens(&images.to_kind(self.compute))
    }

    /// The unimodal text encoder: token ids [batch, L] (`[CLS]` first) with their padding mask
    /// [batch, L] (non-zero for real tokens) to [batch, L, width], without the image.
    pub fn encode_text(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        self.text.forward(input_ids, Some(attention_mask), None, false)
    }

    /// The image-grounded text encoder: token ids [batch, L] (the caller puts `[ENC]` first) with
    /// their padding mask attend to themselves (bidirectionally) and to every token of
    /// `image_states` [batch, T, image width]; returns [batch, L, width].
    pub fn encode_multimodal(&self, input_ids: &Tensor, attention_mask: &Tensor, image_states: &Tensor) -> Tensor {
        let image = EncoderStates { states: image_states, mask: None };
        self.text.forward(input_ids, Some(attention_mask), Some(image), false)
    }

    /// The image-grounded text decoder with the LM head: token ids [batch, L] (the caller puts
    /// `[DEC]` first) with their padding mask attend causally to themselves and to every token of
    /// `image_states`; returns next-token logits [batch, L, vocab] (position `i` predicts token
    /// `i + 1`).
    pub fn decoder_logits(&self, input_ids: &Tensor, attention_mask: &Tensor, image_states: &Tensor) -> Tensor {
        self.lm_logits(&self.decode(input_ids, attention_mask, image_states))
    }

    /// The image-grounded text decoder without the LM head: [batch, L, width] states (see
    /// [`Blip::decoder_logits`]).
    pub fn decode(&self, input_ids: &Tensor, attention_mask: &Tensor, image_states: &Tensor) -> Tensor {
        let image = EncoderStates { states: image_states, mask: None };
        let x = self.text.embed(input_ids, None);
        let layers = 0..self.config.text.num_hidden_layers;
        self.text.forward_layers_with_self_attention(
            &x,
            layers,
            &self.decoder_self_attention,
            Some(attention_mask),
            Some(image),
            true,
        )
    }

    /// The LM head: next-token logits `[..., vocab]` of decoder states `[..., width]`
    /// ([`Blip::decode`], or the predicted positions' rows of them).
    pub fn lm_logits(&self, states: &Tensor) -> Tensor {
        self.lm_head.forward(states, self.text.embeddings().word_embeddings())
    }

    /// The L2-normalised contrastive image feature [batch, embed_dim] of `image_states`
    /// ([`Blip::encode_image`]): `vision_proj` of the `[CLS]` token.
    pub fn image_feature(&self, image_states: &Tensor) -> Tensor {
        self.heads.image_feature(image_states)
    }

    /// The L2-normalised contrastive text feature [batch, embed_dim] of `text_states`
    /// ([`Blip::encode_text`]): `text_proj` of the `[CLS]` token.
    pub fn text_feature(&self, text_states: &Tensor) -> Tensor {
        self.heads.text_feature(text_states)
    }

    /// Image-text matching logits [batch, 2] of image-grounded states
    /// ([`Blip::encode_multimodal`]): `itm_head` of the `[ENC]` token; class 1 is "matched".
    pub fn itm_logits(&self, multimodal_states: &Tensor) -> Tensor {
        self.heads.itm_logits(multimodal_states)
    }

    /// BLIP's LM loss (fp32 scalar): the mean over every predicted real token of the
    /// cross-entropy with label smoothing `config.label_smoothing` of `logits`
    /// ([`Blip::decoder_logits`]) at position `i` against token `i + 1` of `input_ids`; padding
    /// (`attention_mask` 0) is not predicted. As `BlipTextLMHeadModel`'s loss with labels
    /// `input_ids` with padding set to -100.
    pub fn lm_loss(&self, logits: &Tensor, input_ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        let (b, l, v) = logits.size3().expect("logits are [batch, tokens, vocab]");
        let targets = input_ids.narrow(1, 1, l - 1);
        let predicted = attention_mask.narrow(1, 1, l - 1).ne(0);
        let labels = targets.masked_fill(&predicted.logical_not(), IGNORE_INDEX);
        let logits = logits.narrow(1, 0, l - 1).to_kind(Kind::Float).reshape([b * (l - 1), v]);
        logits.cross_entropy_loss::<Tensor>(
            &labels.reshape([-1]),
            None,
            Reduction::Mean,
            IGNORE_INDEX,
            self.config.label_smoothing,
        )
    }

    /// Keeps the temperature in [0.001, 0.5] (after every optimizer step), in place, without grad.
    pub fn clamp_temp(&self) {
        self.heads.clamp_temp();
    }

    /// Whether the parameter `name` (relative to the model's root, e.g. `visual.conv1.weight`)
    /// has a momentum copy. BLIP's momentum models are the image encoder, `vision_proj`, the
    /// text encoder and `text_proj`; the momentum text encoder only ever runs unimodally (ITC),
    /// so its cross-attention, whose average would never be read, is left out. Not in the
    /// momentum model: the decoder's self-attention, `lm_head`, `itm_head` and `temp`.
    pub fn has_momentum(name: &str) -> bool {
        ["visual.", "vision_proj.", "text_proj."].iter().any(|p| name.starts_with(p))
            || (name.starts_with("text.") && !name.contains(".crossattention."))
    }
}

/// Label of a position that is not predicted (`torch.nn.CrossEntropyLoss`'s `ignore_index`).
const IGNORE_INDEX: i64 = -100;


/// How [`generate_captions`] decodes. Lengths count the `[DEC]` token, as `transformers`'
/// `generate(max_length=..., min_length=...)` and BLIP's `generate` do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptionOptions {
    /// Longest sequence, `[DEC]` included: at most `max_length - 1` tokens are generated (at least 2).
    pub max_length: usize,
    /// `[SEP]` cannot end a sequence shorter than this, `[DEC]` included (0 or 1: no minimum).
    pub min_length: usize,
    /// 1 for greedy decoding, more for beam search with this many beams.
    pub num_beams: usize,
}

/// Captions of `images` [batch, 3, H, W]: the decoder, starting from `[DEC]`, extended greedily
/// (`num_beams` 1) or by beam search until `[SEP]` (per sequence) or `max_length`, without
/// autograd, in the model's compute kind (log-probabilities in fp32). Returns each image's
/// token ids after `[DEC]`, up to and including the `[SEP]` that ended the caption (a caption
/// that reached `max_length` has no `[SEP]`).
///
/// The search is `transformers`' `generate` with its defaults (as
/// `BlipForConditionalGeneration.generate(pixel_values, num_beams=k, max_length=..., min_length=...)`):
/// greedy takes the arg-max token; beam search keeps `num_beams` running beams scored by their
/// summed log-probabilities, considers the best `2 * num_beams` continuations at every step, files
/// a continuation that ends in `[SEP]` (or reaches `max_length`) among the `num_beams` best
/// finished captions when it ranks among the first `num_beams`, scoring it by its summed
/// log-probability over its generated length (length penalty 1), and stops an image once the
/// best running beam's score over the current length cannot beat the worst of `num_beams`
/// finished captions. Each step runs the decoder on the new tokens only, with the keys and
/// values of the earlier tokens and of the image tokens cached ([`BertModel::decode_cached`]).
pub fn generate_captions(model: &Blip, images: &Tensor, options: &CaptionOptions) -> Vec<Vec<i64>> {
    let config = model.config();
    assert!(options.max_length >= 2, "max_length {} leaves no token to generate after [DEC]", options.max_length);
    assert!(
        options.max_length as i64 <= config.text.max_position_embeddings,
        "max_length {} exceeds the {} position embeddings",
        options.max_length,
        config.text.max_position_embeddings
    );
    assert!(options.num_beams >= 1, "num_beams is 0");
    assert!(
        2 * options.num_beams as i64 <= config.text.vocab_size,
        "{} beams need a vocabulary of at least {} tokens",
        options.num_beams,
        2 * options.num_beams
    );
    tch::no_grad(|| {
        let image_states = model.encode_image(images);
        if options.num_beams == 1 {
            greedy(model, &image_states, options)
        } else {
            beam_search(model, &image_states, options)
        }
    })
}

/// Next-token logits [sequences, vocab] in fp32 after the sequences in `cache` extended by
/// `tokens` (one per sequence), which join the cache.
fn next_token_logits(model: &Blip, tokens: &[i64], cache: &mut DecodingCache) -> Tensor {
    let device = model.heads.temp.device();
    let ids = Tensor::from_slice(tokens).view([tokens.len() as i64, 1]).to_device(device);
    let h = model.text.decode_cached(&ids, Some(&model.decoder_self_attention), cache).select(1, 0);
    model.lm_head.forward(&h, model.text.embeddings().word_embeddings()).to_kind(Kind::Float)
}

/// Rows `rows` of a batch, as an index tensor on `device`.
fn row_index(rows: &[i64], device: Device) -> Tensor {
    Tensor::from_slice(rows).to_device(device)
}

/// `scores` [sequences, vocab] (logits, or log-probabilities as they are, not renormalised) with
/// `[SEP]` made impossible while the sequences, of `length` tokens, are shorter than `min_length`
/// (`transformers`' `MinLengthLogitsProcessor`).
fn forbid_sep_before(scores: Tensor, length: usize, min_length: usize, sep: i64) -> Tensor {
    if length >= min_length {
        return scores;
    }
    let sep = Tensor::from_slice(&[sep]).to_device(scores.device());
    scores.index_fill(1, &sep, f64::NEG_INFINITY)
}

/// Greedy decoding of every image of `image_states`.
fn greedy(model: &Blip, image_states: &Tensor, options: &CaptionOptions) -> Vec<Vec<i64>> {
    let (bos, sep) = (model.config().bos_token_id, model.config().sep_token_id);
    let batch = image_states.size()[0] as usize;
    let mut cache = model.text.decoding_cache(Some(image_states));
    let mut sequences = vec![vec![bos]; batch];
    // The images still decoding, in the cache's row order.
    let mut open: Vec<usize> = (0..batch).collect();
    for length in 1..options.max_length {
        let last: Vec<i64> = open.iter().map(|&i| sequences[i][length - 1]).collect();
        let logits = forbid_sep_before(next_token_logits(model, &last, &mut cache), length, options.min_length, sep);
        let next = Vec::<i64>::try_from(logits.argmax(-1, false).to_device(Device::Cpu)).expect("token ids");
        for (&i, token) in open.iter().zip(next) {
            sequences[i].push(token);
        }
        let still: Vec<i64> =
            (0..open.len()).filter(|&r| sequences[open[r]][length] != sep).map(|r| r as i64).collect();
        if still.is_empty() {
            break;
        }
        if still.len() < open.len() {
            cache.select(&row_index(&still, image_states.device()));
            open = still.iter().map(|&r| open[r as usize]).collect();
        }
    }
    sequences.into_iter().map(|s| s[1..].to_vec()).collect()
}

/// Score of a beam that may not continue or a slot without a finished caption
/// (`transformers`' -1e9).
const EXCLUDED: f32 = -1.0e9;

/// One image's beam search: running beams (tokens after `[DEC]`) with their summed
/// log-probabilities, the best finished captions with their length-normalised scores (best
/// first), and whether a running beam may still beat the finished ones.
#[derive(Debug)]
struct Beams {
    running: Vec<Vec<i64>>,
    running_scores: Vec<f32>,
    finished: Vec<(f32, Vec<i64>)>,
    open: bool,
    done: bool,
}

impl Beams {
    /// One step from the top `2 * k` continuations of all running beams, best first:
    /// `(summed log-probability, beam, token)`. `generated` counts the tokens after `[DEC]`
    /// including the new one; `at_max_length` says whether the new token reaches `max_length`.
    /// Returns the beam each new running beam continues.
    fn step(
        &mut self,
        candidates: &[(f32, usize, i64)],
        generated: usize,
        at_max_length: bool,
        sep: i64,
    ) -> Vec<usize> {
        let k = self.running.len();
        let extend = |beam: usize, token: i64| {
            let mut sequence = self.running[beam].clone();
            sequence.push(token);
            sequence
        };
        let hits: Vec<bool> = candidates.iter().map(|&(_, _, token)| at_max_length || token == sep).collect();
        // Finished captions: continuations among the first k that end here, while improvement is possible.
        if self.open {
            let mut merged = std::mem::take(&mut self.finished);
            for (c, &(score, beam, token)) in candidates.iter().enumerate().take(k) {
                if hits[c] {
                    merged.push((score / generated as f32, extend(beam, token)));
                }
            }
            merged.sort_by(|a, b| b.0.total_cmp(&a.0));
            merged.truncate(k);
            self.finished = merged;
        }
        // Running beams: the best k continuations that do not end here.
        let mut order: Vec<(f32, usize)> = candidates
            .iter()
            .zip(&hits)
            .enumerate()
            .map(|(c, (&(score, _, _), &hit))| (if hit { score + EXCLUDED } else { score }, c))
            .collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0));
        let sources: Vec<usize> = order[..k].iter().map(|&(_, c)| candidates[c].1).collect();
        self.running = order[..k].iter().map(|&(_, c)| extend(candidates[c].1, candidates[c].2)).collect();
        self.running_scores = order[..k].iter().map(|&(score, _)| score).collect();
        // Stop when the best running beam, at the current length, cannot beat the worst finished caption.
        if self.finished.len() == k {
            let worst = self.finished[k - 1].0;
            self.open &= self.running_scores[0] / generated as f32 > worst;
        }
        self.done = !self.open || hits.iter().all(|&h| h);
        sources
    }
}

/// Beam search over every image of `image_states`.
fn beam_search(model: &Blip, image_states: &Tensor, options: &CaptionOptions) -> Vec<Vec<i64>> {
    let (bos, sep) = (model.config().bos_token_id, model.config().sep_token_id);
    let k = options.num_beams;
    let batch = image_states.size()[0] as usize;
    let device = image_states.device();
    let mut first_scores = vec![EXCLUDED; k];
    first_scores[0] = 0.0;
    let mut beams: Vec<Beams> = (0..batch)
        .map(|_| Beams {
            running: vec![Vec::new(); k],
            running_scores: first_scores.clone(),
            finished: Vec::new(),
            open: true,
            done: false,
        })
        .collect();
    // Row `j * k + b` of the cache is beam `b` of the `j`-th image still searching.
    let every_beam: Vec<i64> = (0..batch as i64).flat_map(|i| std::iter::repeat_n(i, k)).collect();
    let mut cache = model.text.decoding_cache(Some(&image_states.index_select(0, &row_index(&every_beam, device))));
    let mut open: Vec<usize> = (0..batch).collect();
    for length in 1..options.max_length {
        let last: Vec<i64> =
            open.iter().flat_map(|&i| beams[i].running.iter().map(|s| s.last().copied().unwrap_or(bos))).collect();
        let scores: Vec<f32> = open.iter().flat_map(|&i| beams[i].running_scores.iter().copied()).collect();
        let logits = next_token_logits(model, &last, &mut cache);
        let vocab = logits.size()[1];
        let log_probs = forbid_sep_before(logits.log_softmax(-1, Kind::Float), length, options.min_length, sep);
        let summed = log_probs + Tensor::from_slice(&scores).to_device(device).unsqueeze(1);
        let (values, indices) = summed.view([open.len() as i64, k as i64 * vocab]).topk(2 * k as i64, -1, true, true);
        let values = Vec::<f32>::try_from(values.to_device(Device::Cpu).reshape([-1])).expect("fp32 scores");
        let indices = Vec::<i64>::try_from(indices.to_device(Device::Cpu).reshape([-1])).expect("indices");
        let mut rows = Vec::new();
        for (j, &i) in open.iter().enumerate() {
            let candidates: Vec<(f32, usize, i64)> = (2 * k * j..2 * k * (j + 1))
                .map(|c| (values[c], (indices[c] / vocab) as usize, indices[c] % vocab))
                .collect();
            let sources = beams[i].step(&candidates, length, length + 1 >= options.max_length, sep);
            if !beams[i].done {
                rows.extend(sources.into_iter().map(|b| (j * k + b) as i64));
            }
        }
        open.retain(|&i| !beams[i].done);
        if open.is_empty() {
            break;
        }
        cache.select(&row_index(&rows, device));
    }
    beams.into_iter().map(|b| b.finished.into_iter().next().expect("a finished caption by max_length").1).collect()
}

/// One parameter in a `transformers` layout: its key and shape there, braid's name and shape,
/// and whether it is a tied alias (`cls.predictions.decoder.*`) of another key.
#[derive(Debug)]
struct KeyPair {
    key: String,
    key_shape: Vec<i64>,
    braid: String,
    shape: Vec<i64>,
    tied: bool,
}

/// The `transformers` model a key map describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `BlipForImageTextRetrieval`.
    Retrieval,
    /// `BlipForConditionalGeneration`.
    Captioning,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Retrieval => "BlipForImageTextRetrieval",
            Layout::Captioning => "BlipForConditionalGeneration",
        }
    }
}

/// The key map of `layout` for `config`.
fn key_map(config: &BlipConfig, layout: Layout) -> Vec<KeyPair> {
    let mut map = Vec::new();
    let mut pair = |key: String, braid: String, shape: Vec<i64>| {
        map.push(KeyPair { key, key_shape: shape.clone(), braid, shape, tied: false });
    };
    let v = &config.vision;
    let w = v.transformer.width;
    let hidden = (w as f64 * v.transformer.mlp_ratio) as i64;
    pair(
        "vision_model.embeddings.patch_embedding.weight".into(),
        "visual.conv1.weight".into(),
        vec![w, 3, v.patch_size, v.patch_size],
    );
    pair("vision_model.embeddings.patch_embedding.bias".into(), "visual.conv1.bias".into(), vec![w]);
    for i in 0..v.transformer.layers {
        let (hf, braid) = (format!("vision_model.encoder.layers.{i}."), format!("visual.transformer.resblocks.{i}."));
        for (hf_name, braid_name, shape) in [
            ("self_attn.qkv.weight", "attn.in_proj_weight", vec![3 * w, w]),
            ("self_attn.qkv.bias", "attn.in_proj_bias", vec![3 * w]),
            ("self_attn.projection.weight", "attn.out_proj.weight", vec![w, w]),
            ("self_attn.projection.bias", "attn.out_proj.bias", vec![w]),
            ("layer_norm1.weight", "ln_1.weight", vec![w]),
            ("layer_norm1.bias", "ln_1.bias", vec![w]),
            ("mlp.fc1.weight", "mlp.c_fc.weight", vec![hidden, w]),
            ("mlp.fc1.bias", "mlp.c_fc.bias", vec![hidden]),
            ("mlp.fc2.weight", "mlp.c_proj.weight", vec![w, hidden]),
            ("mlp.fc2.bias", "mlp.c_proj.bias", vec![w]),
            ("layer_norm2.weight", "ln_2.weight", vec![w]),
            ("layer_norm2.bias", "ln_2.bias", vec![w]),
        ] {
            pair(format!("{hf}{hf_name}"), format!("{braid}{braid_name}"), shape);
        }
    }
    pair("vision_model.post_layernorm.weight".into(), "visual.ln_post.weight".into(), vec![w]);
    pair("vision_model.post_layernorm.bias".into(), "visual.ln_post.bias".into(), vec![w]);

    let t = &config.text;
    let d = t.hidden_size;
    let image = t.encoder_hidden_size.unwrap_or(d);
    let attention = |hf: &str, braid: &str, context: i64| {
        [
            ("self.query.weight", vec![d, d]),
            ("self.query.bias", vec![d]),
            ("self.key.weight", vec![d, context]),
            ("self.key.bias", vec![d]),
            ("self.value.weight", vec![d, context]),
            ("self.value.bias", vec![d]),
            ("output.dense.weight", vec![d, d]),
            ("output.dense.bias", vec![d]),
            ("output.LayerNorm.weight", vec![d]),
            ("output.LayerNorm.bias", vec![d]),
        ]
        .map(|(name, shape)| (format!("{hf}{name}"), format!("{braid}{name}"), shape))
    };
    let text_root = match layout {
        Layout::Retrieval => "text_encoder.",
        Layout::Captioning => "text_decoder.bert.",
    };
    for (name, shape) in [
        ("word_embeddings.weight", vec![t.vocab_size, d]),
        ("position_embeddings.weight", vec![t.max_position_embeddings, d]),
        ("LayerNorm.weight", vec![d]),
        ("LayerNorm.bias", vec![d]),
    ] {
        pair(format!("{text_root}embeddings.{name}"), format!("text.embeddings.{name}"), shape);
    }
    let ff = t.intermediate_size;
    for i in 0..t.num_hidden_layers {
        let (hf, braid) = (format!("{text_root}encoder.layer.{i}."), format!("text.encoder.layer.{i}."));
        let self_attention = match layout {
            Layout::Retrieval => format!("{braid}attention."),
            Layout::Captioning => format!("text_decoder.layer.{i}.attention."),
        };
        for (key, name, shape) in attention(&format!("{hf}attention."), &self_attention, d)
            .into_iter()
            .chain(attention(&format!("{hf}crossattention."), &format!("{braid}crossattention."), image))
        {
            pair(key, name, shape);
        }
        for (name, shape) in [
            ("intermediate.dense.weight", vec![ff, d]),
            ("intermediate.dense.bias", vec![ff]),
            ("output.dense.weight", vec![d, ff]),
            ("output.dense.bias", vec![d]),
            ("output.LayerNorm.weight", vec![d]),
            ("output.LayerNorm.bias", vec![d]),
        ] {
            pair(format!("{hf}{name}"), format!("{braid}{name}"), shape);
        }
    }
    match layout {
        Layout::Retrieval => {
            let e = config.embed_dim;
            for (name, shape) in [
                ("vision_proj.weight", vec![e, w]),
                ("vision_proj.bias", vec![e]),
                ("text_proj.weight", vec![e, d]),
                ("text_proj.bias", vec![e]),
                ("itm_head.weight", vec![2, d]),
                ("itm_head.bias", vec![2]),
            ] {
                pair(name.into(), name.into(), shape);
            }
        }
        Layout::Captioning => {
            for (name, shape) in [
                ("bias", vec![t.vocab_size]),
                ("transform.dense.weight", vec![d, d]),
                ("transform.dense.bias", vec![d]),
                ("transform.LayerNorm.weight", vec![d]),
                ("transform.LayerNorm.bias", vec![d]),
            ] {
                pair(format!("text_decoder.cls.predictions.{name}"), format!("lm_head.{name}"), shape);
            }
        }
    }
    // The two tensors whose shapes differ between the layouts, and the LM head's tied aliases.
    let embeddings = KeyPair {
        key: "vision_model.embeddings.class_embedding".into(),
        key_shape: vec![1, 1, w],
        braid: "visual.class_embedding".into(),
        shape: vec![w],
        tied: false,
    };
    let positions = KeyPair {
        key: "vision_model.embeddings.position_embedding".into(),
        key_shape: vec![1, v.tokens(), w],
        braid: "visual.positional_embedding".into(),
        shape: vec![v.tokens(), w],
        tied: false,
    };
    map.splice(0..0, [embeddings, positions]);
    if layout == Layout::Captioning {
        map.push(KeyPair {
            key: "text_decoder.cls.predictions.decoder.weight".into(),
            key_shape: vec![t.vocab_size, d],
            braid: "text.embeddings.word_embeddings.weight".into(),
            shape: vec![t.vocab_size, d],
            tied: true,
        });
        map.push(KeyPair {
            key: "text_decoder.cls.predictions.decoder.bias".into(),
            key_shape: vec![t.vocab_size],
            braid: "lm_head.bias".into(),
            shape: vec![t.vocab_size],
            tied: true,
        });
    }
    map
}

/// braid's parameters from `transformers` state dicts (e.g. read from `model.safetensors`):
/// `retrieval` from `BlipForImageTextRetrieval`, `captioning` from
/// `BlipForConditionalGeneration`, either or both. The key map (the class and position
/// embeddings are reshaped from `[1, 1, W]` and `[1, T, W]`; every other tensor keeps its shape):
///
/// | transformers | braid |
/// |---|---|
/// | `vision_model.embeddings.{patch_embedding, class_embedding, position_embedding}` | `visual.{conv1, class_embedding, positional_embedding}` |
/// | `vision_model.encoder.layers.N.{self_attn.qkv, self_attn.projection, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}` | `visual.transformer.resblocks.N.{attn.in_proj_*, attn.out_proj, ln_1, mlp.c_fc, mlp.c_proj, ln_2}` |
/// | `vision_model.post_layernorm` | `visual.ln_post` |
/// | `text_encoder.embeddings.*`, `text_decoder.bert.embeddings.*` | `text.embeddings.*` |
/// | `text_encoder.encoder.layer.N.attention.*` | `text.encoder.layer.N.attention.*` |
/// | `text_decoder.bert.encoder.layer.N.attention.*` | `text_decoder.layer.N.attention.*` |
/// | `text_encoder.encoder.layer.N.{crossattention, intermediate, output}.*`, the same under `text_decoder.bert.` | `text.encoder.layer.N.{crossattention, intermediate, output}.*` |
/// | `vision_proj`, `text_proj`, `itm_head` | `vision_proj`, `text_proj`, `itm_head` |
/// | `text_decoder.cls.predictions.{bias, transform.*}` | `lm_head.{bias, transform.*}` |
///
/// `text_decoder.cls.predictions.decoder.{weight, bias}` are tied aliases of the word
/// embeddings and `predictions.bias`: optional, and when present they must equal them. Keys
/// ending in `position_ids` (buffers of older checkpoints) are skipped. BLIP shares the image
/// encoder and every text block except the self-attention between its encoder and decoder, so
/// when both layouts are given their shared tensors must be equal (transformers' published
/// retrieval and captioning checkpoints were fine-tuned apart and are not). `transformers` keeps
/// no temperature: with `retrieval`, `temp` is `config.temp`.
///
/// Returns braid's names and tensors, sorted by name: every parameter with `retrieval` and
/// `captioning` together; with `retrieval` alone everything but the decoder's self-attention
/// and `lm_head`; with `captioning` alone the image encoder, the text embeddings,
/// cross-attention and feed-forward networks, the decoder's self-attention and `lm_head`.
/// Errors name every missing, mis-shaped, unexpected and inconsistent key.
pub fn import_transformers(
    retrieval: Option<&[(String, Tensor)]>,
    captioning: Option<&[(String, Tensor)]>,
    config: &BlipConfig,
) -> Result<Vec<(String, Tensor)>, ModelError> {
    let weights_error = |reason: String| ModelError::Weights { origin: "transformers BLIP state dicts".into(), reason };
    if let Err(problems) = config.validate() {
        return Err(weights_error(format!("invalid config: {problems}")));
    }
    if retrieval.is_none() && captioning.is_none() {
        return Err(weights_error("neither a retrieval nor a captioning state dict given".into()));
    }
    let mut imported: BTreeMap<String, (Tensor, String)> = BTreeMap::new();
    let mut aliases: Vec<(String, String, Tensor)> = Vec::new();
    let mut problems = Vec::new();
    for (layout, tensors) in [(Layout::Retrieval, retrieval), (Layout::Captioning, captioning)] {
        let Some(tensors) = tensors else { continue };
        let map = key_map(config, layout);
        let by_key: HashMap<&str, &KeyPair> = map.iter().map(|p| (p.key.as_str(), p)).collect();
        let mut seen = HashSet::new();
        let mut unexpected = Vec::new();
        for (key, t) in tensors {
            let Some(pair) = by_key.get(key.as_str()) else {
                if !key.ends_with("position_ids") {
                    unexpected.push(format!("{key:?}"));
                }
                continue;
            };
            seen.insert(key.as_str());
            if t.size() != pair.key_shape {
                problems.push(format!(
                    "{} key {key:?} has shape {:?}, braid's {} needs {:?}",
                    layout.name(),
                    t.size(),
                    pair.braid,
                    pair.key_shape
                ));
                continue;
            }
            let t = t.detach().reshape(pair.shape.as_slice());
            if pair.tied {
                aliases.push((format!("{} key {key:?}", layout.name()), pair.braid.clone(), t));
                continue;
            }
            match imported.get(&pair.braid) {
                Some((first, source)) if !same_values(first, &t) => problems.push(format!(
                    "{} key {key:?} differs from {source}: BLIP's encoder and decoder share braid's {}",
                    layout.name(),
                    pair.braid
                )),
                Some(_) => {}
                None => {
                    imported.insert(pair.braid.clone(), (t, format!("{} key {key:?}", layout.name())));
                }
            }
        }
        for pair in map.iter().filter(|p| !p.tied && !seen.contains(p.key.as_str())) {
            problems.push(format!("{} key {:?} is missing (braid's {})", layout.name(), pair.key, pair.braid));
        }
        if !unexpected.is_empty() {
            let shown = unexpected.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
            let more = if unexpected.len() > 8 { format!(" and {} more", unexpected.len() - 8) } else { String::new() };
            problems
                .push(format!("{} has unexpected keys {shown}{more} (a different number of layers?)", layout.name()));
        }
    }
    for (source, braid, t) in aliases {
        if let Some((tied_to, tied_source)) = imported.get(&braid) {
            if !same_values(tied_to, &t) {
                problems.push(format!("{source} differs from {tied_source}, which it is tied to"));
            }
        }
    }
    if retrieval.is_some() {
        imported.insert("temp".into(), (Tensor::from(config.temp as f32), "config.temp".into()));
    }
    if problems.is_empty() {
        Ok(imported.into_iter().map(|(name, (t, _))| (name, t)).collect())
    } else {
        Err(weights_error(problems.join("; ")))
    }
}

/// Whether two tensors of one shape hold the same values.
fn same_values(a: &Tensor, b: &Tensor) -> bool {
    a.equal(&b.to_kind(a.kind()).to_device(a.device()))
}

/// The inverse of [`import_transformers`]: braid's parameters (as [`nn::VarStore::variables`]
/// names them) under the keys of `BlipForImageTextRetrieval` and of
/// `BlipForConditionalGeneration`, the class and position embeddings reshaped back. The
/// captioning model gets the shared tensors (image encoder, text embeddings, cross-attention,
/// feed-forward networks) and the decoder's self-attention as its `text_decoder.bert.*`, and
/// `lm_head` as `text_decoder.cls.predictions.*` with the tied `decoder.weight` (the word
/// embeddings) and `decoder.bias`, so both results load with `load_state_dict(strict=True)`.
/// `temp` and names outside the map are left out, and so are mapped names absent from
/// `params`. The tensors share storage with `params`.
pub fn export_transformers(params: &[(String, Tensor)], config: &BlipConfig) -> (NamedTensors, NamedTensors) {
    let by_name: HashMap<&str, &Tensor> = params.iter().map(|(name, t)| (name.as_str(), t)).collect();
    let export = |layout| {
        key_map(config, layout)
            .into_iter()
            .filter_map(|pair| {
                by_name.get(pair.braid.as_str()).map(|t| (pair.key, t.detach().reshape(pair.key_shape.as_slice())))
            })
            .collect()
    };
    (export(Layout::Retrieval), export(Layout::Captioning))
}
