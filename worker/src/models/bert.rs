//! BERT-style text transformer, the text side of ALBEF and BLIP: word, position and (optional)
//! token-type embeddings with LayerNorm, then post-LN layers of self-attention, optional
//! cross-attention to encoder states (image tokens) and a GELU feed-forward network, each
//! sublayer `LayerNorm(x + sublayer(x))`; and the masked/causal language-modelling head whose
//! decoder is tied to the word embeddings.
//!
//! Parameter names are Hugging Face's (`embeddings.word_embeddings.weight`,
//! `encoder.layer.0.attention.self.query.weight`, `encoder.layer.0.crossattention.self.key.weight`,
//! `cls.predictions.transform.dense.weight`, ...) under a root the caller chooses, so
//! `transformers` `BertModel`/`BertForMaskedLM`/`BertLMHeadModel` and `BlipTextModel` weights load
//! by name. Dropout is left out: braid trains these models without it (BLIP's text dropout is 0;
//! ALBEF's 0.1 is not reproduced).
//!
//! Every parameter is fp32; the layers compute in the kind of their input
//! ([`BertModel::set_compute_kind`]), casting the parameters on the way (see `layers::Linear`).

use std::ops::Range;

use tch::nn;
use tch::{Kind, Tensor};

use super::layers::{cast, layer_norm_eps, Activation, LayerNorm, Linear};
use super::ModelError;

/// Standard deviation of BERT's initial weights (`initializer_range`).
pub const INITIALIZER_RANGE: f64 = 0.02;

/// Shape of a BERT-style text transformer (field names follow Hugging Face's `BertConfig`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BertConfig {
    /// Token vocabulary size.
    pub vocab_size: i64,
    /// Model width.
    pub hidden_size: i64,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer (self- and cross-attention).
    pub num_attention_heads: i64,
    /// Hidden size of the feed-forward network.
    pub intermediate_size: i64,
    /// Longest sequence the absolute position embeddings cover.
    pub max_position_embeddings: i64,
    /// Token-type (segment) vocabulary size; 0 for none (BLIP's text model has none).
    pub type_vocab_size: i64,
    /// First layer with cross-attention to encoder states; `None` for a text-only model.
    /// ALBEF: the second half (its fusion layers); BLIP: 0 (every layer).
    pub cross_attention_from_layer: Option<usize>,
    /// Width of the encoder states the cross-attention keys and values read; `None` for
    /// `hidden_size` (BLIP with a ViT-L image encoder: 1024).
    pub encoder_hidden_size: Option<i64>,
    /// Padding token: its embedding starts at zero and gets no gradient, as in `transformers`.
    pub pad_token_id: Option<i64>,
    /// Epsilon of every LayerNorm.
    pub layer_norm_eps: f64,
    /// Standard deviation of the initial weights and embeddings: BERT's 0.02 for the paper
    /// shapes; `width^-1/2` for the `tiny` presets, which train from scratch in a few hundred
    /// steps (at width 64, 0.02 leaves the [CLS] state nearly independent of the caption).
    pub initializer_range: f64,
}

impl BertConfig {
    /// A named preset: `tiny` (CPU tests), `bert-base` (bert-base-uncased, text only), `albef`
    /// (bert-base with cross-attention in layers 6..12, ALBEF's fusion encoder) or `blip`
    /// (BLIP's text model: bert-base with two extra tokens, no token types, cross-attention in
    /// every layer to ViT-B states).
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        let base = Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            cross_attention_from_layer: None,
            encoder_hidden_size: None,
            pad_token_id: Some(0),
            layer_norm_eps: 1e-12,
            initializer_range: INITIALIZER_RANGE,
        };
        match name {
            "tiny" => Ok(Self {
                vocab_size: 99,
                hidden_size: 32,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                intermediate_size: 64,
                max_position_embeddings: 64,
                cross_attention_from_layer: Some(2),
                ..base
            }),
            "bert-base" => Ok(base),
            "albef" => Ok(Self { cross_attention_from_layer: Some(6), ..base }),
            "blip" => Ok(Self { vocab_size: 30524, type_vocab_size: 0, cross_attention_from_layer: Some(0), ..base }),
            other => Err(ModelError::UnknownPreset { family: "bert".into(), preset: other.into() }),
        }
    }

    /// Every inconsistency in the shape, joined by "; ".
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value <= 0 {
                problems.push(format!("{name} is {value}, must be positive"));
            }
        }
        if self.num_attention_heads > 0 && self.hidden_size % self.num_attention_heads != 0 {
            problems.push(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.type_vocab_size < 0 {
            problems.push(format!("type_vocab_size is {}, must be 0 (none) or positive", self.type_vocab_size));
        }
        if let Some(first) = self.cross_attention_from_layer {
            if first >= self.num_hidden_layers {
                problems.push(format!(
                    "cross_attention_from_layer {first} leaves no cross-attention layer in {} layers",
                    self.num_hidden_layers
                ));
            }
        }
        if let Some(width) = self.encoder_hidden_size {
            if width <= 0 {
                problems.push(format!("encoder_hidden_size is {width}, must be positive"));
            }
        }
        if let Some(pad) = self.pad_token_id {
            if pad < 0 || pad >= self.vocab_size {
                problems.push(format!("pad_token_id {pad} is outside the vocabulary of {}", self.vocab_size));
            }
        }
        if self.initializer_range.is_nan() || self.initializer_range <= 0.0 {
            problems.push(format!("initializer_range is {}, must be positive", self.initializer_range));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            problems.push(format!("layer_norm_eps is {}, must be positive", self.layer_norm_eps));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Whether layer `index` has cross-attention.
    pub fn has_cross_attention(&self, index: usize) -> bool {
        self.cross_attention_from_layer.is_some_and(|first| index >= first)
    }
}

/// Encoder states the cross-attention layers attend to (e.g. image tokens) and their mask.
#[derive(Debug, Clone, Copy)]
pub struct EncoderStates<'a> {
    /// [batch, tokens, encoder width].
    pub states: &'a Tensor,
    /// [batch, tokens], non-zero where a token may be attended to; `None` for all tokens.
    pub mask: Option<&'a Tensor>,
}

/// Word, absolute position and optional token-type embeddings, summed and layer-normalised
/// (`transformers` `BertEmbeddings`).
#[derive(Debug)]
pub struct BertEmbeddings {
    word_embeddings: nn::Embedding,
    position_embeddings: nn::Embedding,
    token_type_embeddings: Option<nn::Embedding>,
    layer_norm: LayerNorm,
}

impl BertEmbeddings {
    /// The embeddings under `p` (`word_embeddings`, `position_embeddings`,
    /// `token_type_embeddings`, `LayerNorm`).
    pub fn new(p: nn::Path, config: &BertConfig) -> Self {
        let table = |name: &str, rows: i64, padding_idx: Option<i64>| {
            let embedding = nn::embedding(
                &p / name,
                rows,
                config.hidden_size,
                nn::EmbeddingConfig {
                    ws_init: nn::Init::Randn { mean: 0.0, stdev: config.initializer_range },
                    padding_idx: padding_idx.unwrap_or(-1),
                    ..Default::default()
                },
            );
            if let Some(pad) = padding_idx {
                tch::no_grad(|| {
                    let _ = embedding.ws.get(pad).zero_();
                });
            }
            embedding
        };
        Self {
            word_embeddings: table("word_embeddings", config.vocab_size, config.pad_token_id),
            position_embeddings: table("position_embeddings", config.max_position_embeddings, None),
            token_type_embeddings: (config.type_vocab_size > 0)
                .then(|| table("token_type_embeddings", config.type_vocab_size, None)),
            layer_norm: layer_norm_eps(&p / "LayerNorm", config.hidden_size, config.layer_norm_eps),
        }
    }

    /// Token ids [batch, tokens] (and token types, all 0 when `None`) to [batch, tokens, width],
    /// in the parameters' kind.
    pub fn forward(&self, input_ids: &Tensor, token_type_ids: Option<&Tensor>) -> Tensor {
        self.forward_from(input_ids, token_type_ids, 0)
    }

    /// [`BertEmbeddings::forward`] of tokens at positions `start..start + tokens` (incremental
    /// decoding).
    pub fn forward_from(&self, input_ids: &Tensor, token_type_ids: Option<&Tensor>, start: i64) -> Tensor {
        let (_, n) = input_ids.size2().expect("input ids are [batch, tokens]");
        let max_positions = self.position_embeddings.ws.size()[0];
        assert!(start + n <= max_positions, "{} tokens exceed the {max_positions} position embeddings", start + n);
        let mut x = input_ids.apply(&self.word_embeddings);
        if let Some(types) = &self.token_type_embeddings {
            x = match token_type_ids {
                Some(ids) => x + ids.apply(types),
                None => x + types.ws.get(0),
            };
        }
        (x + self.position_embeddings.ws.narrow(0, start, n)).apply(&self.layer_norm)
    }

    /// The word-embedding table [vocab, width] (the LM head's tied decoder weight).
    pub fn word_embeddings(&self) -> &Tensor {
        &self.word_embeddings.ws
    }
}

/// Multi-head attention with separate query, key and value projections (`self.query`,
/// `self.key`, `self.value`), followed by `output.dense` and the post-LN residual
/// `output.LayerNorm(x + dense(attention))` (`transformers` `BertAttention`).
#[derive(Debug)]
pub struct BertAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    output_dense: Linear,
    output_layer_norm: LayerNorm,
    heads: i64,
}

impl BertAttention {
    /// Attention under `p` whose keys and values read states of width `context_width`
    /// (`hidden_size` for self-attention, the encoder's width for cross-attention).
    pub fn new(p: nn::Path, config: &BertConfig, context_width: i64) -> Self {
        let width = config.hidden_size;
        let linear = |q: nn::Path, input| Linear::new(q, input, width, Some(config.initializer_range));
        Self {
            query: linear(&p / "self" / "query", width),
            key: linear(&p / "self" / "key", context_width),
            value: linear(&p / "self" / "value", context_width),
            output_dense: linear(&p / "output" / "dense", width),
            output_layer_norm: layer_norm_eps(&p / "output" / "LayerNorm", width, config.layer_norm_eps),
            heads: config.num_attention_heads,
        }
    }

    /// `x` [batch, n, width] attends to `context` [batch, m, context width] (`x` itself for
    /// self-attention). `mask`: boolean, broadcastable to [batch, heads, n, m], true where
    /// attention is allowed; `causal` (only without a mask) hides later tokens.
    pub fn forward(&self, x: &Tensor, context: &Tensor, mask: Option<&Tensor>, causal: bool) -> Tensor {
        let (b, n, w) = x.size3().expect("attention input is [batch, tokens, width]");
        let m = context.size()[1];
        let head_dim = w / self.heads;
        let context = cast(context, x);
        let split = |t: Tensor, len: i64| t.view([b, len, self.heads, head_dim]).transpose(1, 2);
        let q = split(x.apply(&self.query), n);
        let k = split(context.apply(&self.key), m);
        let v = split(context.apply(&self.value), m);
        let o = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, None, false);
        let o = o.transpose(1, 2).reshape([b, n, w]).apply(&self.output_dense);
        (o + x).apply(&self.output_layer_norm)
    }

    /// The keys and values of `context` [batch, m, context width], in `like`'s kind, for
    /// [`BertAttention::forward_cached`].
    pub fn key_values(&self, context: &Tensor, like: &Tensor) -> KeyValues {
        let (b, m, _) = context.size3().expect("attention context is [batch, tokens, width]");
        let context = cast(context, like);
        let split = |t: Tensor| t.view([b, m, self.heads, -1]).transpose(1, 2);
        KeyValues { keys: split(context.apply(&self.key)), values: split(context.apply(&self.value)) }
    }

    /// [`BertAttention::forward`] of `x` [batch, n, width] against keys and values computed
    /// before (the encoder states', or the earlier tokens' with this step's appended);
    /// `mask` as there.
    pub fn forward_cached(&self, x: &Tensor, key_values: &KeyValues, mask: Option<&Tensor>) -> Tensor {
        let (b, n, w) = x.size3().expect("attention input is [batch, tokens, width]");
        let q = x.apply(&self.query).view([b, n, self.heads, w / self.heads]).transpose(1, 2);
        let o = Tensor::scaled_dot_product_attention(
            &q,
            &key_values.keys,
            &key_values.values,
            mask,
            0.0,
            false,
            None,
            false,
        );
        let o = o.transpose(1, 2).reshape([b, n, w]).apply(&self.output_dense);
        (o + x).apply(&self.output_layer_norm)
    }
}

/// Keys and values an attention computed, each [batch, heads, tokens, head_dim]: of the encoder
/// states (cross-attention) or of the tokens decoded so far (self-attention).
#[derive(Debug)]
pub struct KeyValues {
    keys: Tensor,
    values: Tensor,
}

impl KeyValues {
    /// These followed by `more` along the tokens.
    fn append(&self, more: KeyValues) -> KeyValues {
        KeyValues {
            keys: Tensor::cat(&[&self.keys, &more.keys], 2),
            values: Tensor::cat(&[&self.values, &more.values], 2),
        }
    }

    /// Rows `rows` of the batch (repeats allowed).
    fn select(&self, rows: &Tensor) -> KeyValues {
        KeyValues { keys: self.keys.index_select(0, rows), values: self.values.index_select(0, rows) }
    }
}

/// One post-LN layer: self-attention, cross-attention when the layer has it and encoder states
/// are given, then the GELU feed-forward network (`intermediate.dense`, `output.dense`,
/// `output.LayerNorm`) (`transformers` `BertLayer`).
#[derive(Debug)]
pub struct BertLayer {
    attention: BertAttention,
    crossattention: Option<BertAttention>,
    intermediate_dense: Linear,
    output_dense: Linear,
    output_layer_norm: LayerNorm,
}

impl BertLayer {
    /// Layer `index` of `config` under `p`.
    pub fn new(p: nn::Path, config: &BertConfig, index: usize) -> Self {
        let width = config.hidden_size;
        let encoder_width = config.encoder_hidden_size.unwrap_or(width);
        Self {
            attention: BertAttention::new(&p / "attention", config, width),
            crossattention: config
                .has_cross_attention(index)
                .then(|| BertAttention::new(&p / "crossattention", config, encoder_width)),
            intermediate_dense: Linear::new(&p / "intermediate" / "dense", width, config.intermediate_size, Some(config.initializer_range)),
            output_dense: Linear::new(&p / "output" / "dense", config.intermediate_size, width, Some(config.initializer_range)),
            output_layer_norm: layer_norm_eps(&p / "output" / "LayerNorm", width, config.layer_norm_eps),
        }
    }

    /// Whether the layer has cross-attention.
    pub fn has_cross_attention(&self) -> bool {
        self.crossattention.is_some()
    }

    /// The layer's self-attention (`attention.*`).
    pub fn self_attention(&self) -> &BertAttention {
        &self.attention
    }

    /// Applies the layer to `x` [batch, n, width] with prepared masks (see [`BertAttention::forward`]),
    /// through `self_attention` in place of the layer's own (BLIP's decoder) when given.
    fn forward(
        &self,
        x: &Tensor,
        self_attention: Option<&BertAttention>,
        self_mask: Option<&Tensor>,
        causal: bool,
        encoder: Option<(&Tensor, Option<&Tensor>)>,
    ) -> Tensor {
        let mut x = self_attention.unwrap_or(&self.attention).forward(x, x, self_mask, causal);
        if let (Some(cross), Some((states, mask))) = (&self.crossattention, encoder) {
            x = cross.forward(&x, states, mask, false);
        }
        self.feed_forward(&x)
    }

    /// One incremental step on the new tokens `x` [batch, n, width]: their keys and values join
    /// `cache`'s, they attend to every cached token (earlier ones only among themselves:
    /// `self_mask`) and to the cached encoder states.
    fn forward_cached(
        &self,
        x: &Tensor,
        self_attention: Option<&BertAttention>,
        self_mask: Option<&Tensor>,
        cache: &mut LayerCache,
    ) -> Tensor {
        let attention = self_attention.unwrap_or(&self.attention);
        let new = attention.key_values(x, x);
        let tokens = match cache.tokens.take() {
            Some(earlier) => earlier.append(new),
            None => new,
        };
        let mut x = attention.forward_cached(x, &tokens, self_mask);
        cache.tokens = Some(tokens);
        if let (Some(cross), Some(encoder)) = (&self.crossattention, &cache.encoder) {
            x = cross.forward_cached(&x, encoder, None);
        }
        self.feed_forward(&x)
    }

    /// The GELU feed-forward network with its post-LN residual.
    fn feed_forward(&self, x: &Tensor) -> Tensor {
        let h = Activation::Gelu.apply(&x.apply(&self.intermediate_dense)).apply(&self.output_dense);
        (h + x).apply(&self.output_layer_norm)
    }
}

/// One layer's keys and values during incremental decoding.
#[derive(Debug)]
struct LayerCache {
    tokens: Option<KeyValues>,
    encoder: Option<KeyValues>,
}

/// The state of incremental (key/value-cached) causal decoding with a [`BertModel`]: per layer
/// the self-attention keys and values of the tokens decoded so far and the cross-attention keys
/// and values of the encoder states ([`BertModel::decoding_cache`], [`BertModel::decode_cached`]).
#[derive(Debug)]
pub struct DecodingCache {
    layers: Vec<LayerCache>,
    length: i64,
}

impl DecodingCache {
    /// Tokens decoded so far.
    pub fn len(&self) -> i64 {
        self.length
    }

    /// Whether no token has been decoded yet.
    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// Keeps rows `rows` of the batch, in that order (repeats allowed): a beam search's
    /// reordering, or dropping finished sequences.
    pub fn select(&mut self, rows: &Tensor) {
        for layer in &mut self.layers {
            layer.tokens = layer.tokens.as_ref().map(|kv| kv.select(rows));
            layer.encoder = layer.encoder.as_ref().map(|kv| kv.select(rows));
        }
    }
}

/// The BERT-style text transformer: embeddings and `encoder.layer.N`.
#[derive(Debug)]
pub struct BertModel {
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    config: BertConfig,
    compute: Kind,
}

impl BertModel {
    /// Creates the model's parameters under `p` (`p / "embeddings"`, `p / "encoder" / "layer" / N`).
    /// Panics when `config` fails [`BertConfig::validate`].
    pub fn new(p: nn::Path, config: BertConfig) -> Self {
        if let Err(problems) = config.validate() {
            panic!("invalid BERT config: {problems}");
        }
        let embeddings = BertEmbeddings::new(&p / "embeddings", &config);
        let layers = (0..config.num_hidden_layers).map(|i| BertLayer::new(&p / "encoder" / "layer" / i, &config, i)).collect();
        Self { embeddings, layers, config, compute: Kind::Float }
    }

    /// The model's shape.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Sets the kind the layers compute in: the parameters' own kind, or bf16 (mixed precision:
    /// parameters stay fp32). Hidden states come back in this kind.
    pub fn set_compute_kind(&mut self, kind: Kind) {
        self.compute = kind;
    }

    /// The embeddings.
    pub fn embeddings(&self) -> &BertEmbeddings {
        &self.embeddings
    }

    /// The layers, in order.
    pub fn layers(&self) -> &[BertLayer] {
        &self.layers
    }

    /// The embedded tokens [batch, tokens, width] in the compute kind: the first layer's input.
    pub fn embed(&self, input_ids: &Tensor, token_type_ids: Option<&Tensor>) -> Tensor {
        self.embeddings.forward(input_ids, token_type_ids).to_kind(self.compute)
    }

    /// Last hidden states [batch, tokens, width] of token ids [batch, tokens] (token types 0).
    /// `attention_mask` [batch, tokens]: non-zero for real tokens, `None` for all.
    /// `encoder`: states the cross-attention layers attend to (skipped when `None`).
    /// `causal`: each token sees only itself and earlier tokens (BLIP's decoder).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, encoder: Option<EncoderStates>, causal: bool) -> Tensor {
        let x = self.embed(input_ids, None);
        self.forward_layers(&x, 0..self.layers.len(), attention_mask, encoder, causal)
    }

    /// Runs `layers` (a range of layer indices) on hidden states `x` [batch, tokens, width].
    /// ALBEF's text encoder is `0..k` without encoder states; its fusion encoder is `k..n` on
    /// the text encoder's output with the image tokens. Masks as in [`BertModel::forward`]; a
    /// token that may attend to nothing (an all-zero mask row) gives undefined output.
    pub fn forward_layers(
        &self,
        x: &Tensor,
        layers: Range<usize>,
        attention_mask: Option<&Tensor>,
        encoder: Option<EncoderStates>,
        causal: bool,
    ) -> Tensor {
        self.run_layers(x, layers, None, attention_mask, encoder, causal)
    }

    /// [`BertModel::forward_layers`] with every layer's self-attention replaced by
    /// `self_attention[i]` (one per layer of the model, indexed like [`BertModel::layers`]); the
    /// cross-attention and feed-forward networks stay the model's. BLIP's decoder is the MED
    /// encoder run this way with its own (causal) self-attention modules.
    pub fn forward_layers_with_self_attention(
        &self,
        x: &Tensor,
        layers: Range<usize>,
        self_attention: &[BertAttention],
        attention_mask: Option<&Tensor>,
        encoder: Option<EncoderStates>,
        causal: bool,
    ) -> Tensor {
        assert_eq!(
            self_attention.len(),
            self.layers.len(),
            "one self-attention per layer of a {}-layer model",
            self.layers.len()
        );
        self.run_layers(x, layers, Some(self_attention), attention_mask, encoder, causal)
    }

    /// Runs `layers` with prepared masks, through `self_attention[i]` for layer `i` when given.
    fn run_layers(
        &self,
        x: &Tensor,
        layers: Range<usize>,
        self_attention: Option<&[BertAttention]>,
        attention_mask: Option<&Tensor>,
        encoder: Option<EncoderStates>,
        causal: bool,
    ) -> Tensor {
        assert!(layers.end <= self.layers.len(), "layers {layers:?} of a {}-layer model", self.layers.len());
        let (_, n, _) = x.size3().expect("hidden states are [batch, tokens, width]");
        let keep_keys = |mask: &Tensor| mask.ne(0).unsqueeze(1).unsqueeze(1);
        // SDPA takes either a mask or `is_causal`: with padding, the causal triangle joins the mask.
        let (self_mask, self_causal) = match (attention_mask, causal) {
            (None, causal) => (None, causal),
            (Some(mask), false) => (Some(keep_keys(mask)), false),
            (Some(mask), true) => {
                let triangle = Tensor::ones([n, n], (Kind::Bool, x.device())).tril(0);
                (Some(keep_keys(mask).logical_and(&triangle)), false)
            }
        };
        let cross_mask = encoder.and_then(|e| e.mask).map(keep_keys);
        let cross = encoder.map(|e| (e.states, cross_mask.as_ref()));
        layers.fold(x.shallow_clone(), |x, i| {
            let attention = self_attention.map(|modules| &modules[i]);
            self.layers[i].forward(&x, attention, self_mask.as_ref(), self_causal, cross)
        })
    }

    /// A cache for [`BertModel::decode_cached`] with the cross-attention keys and values of
    /// `encoder_states` [batch, tokens, encoder width] (computed once, every token attended to;
    /// `None` for a decoder without cross-attention) and no token yet.
    pub fn decoding_cache(&self, encoder_states: Option<&Tensor>) -> DecodingCache {
        let like = Tensor::zeros([0], (self.compute, self.embeddings.word_embeddings.ws.device()));
        let layers = self
            .layers
            .iter()
            .map(|layer| LayerCache {
                tokens: None,
                encoder: layer
                    .crossattention
                    .as_ref()
                    .zip(encoder_states)
                    .map(|(cross, states)| cross.key_values(states, &like)),
            })
            .collect();
        DecodingCache { layers, length: 0 }
    }

    /// Causal decoding of the next tokens `input_ids` [batch, n] (positions `cache.len()..`;
    /// all unpadded) after those in `cache`, through every layer (with `self_attention[i]` in
    /// place of layer `i`'s self-attention when given, as in
    /// [`BertModel::forward_layers_with_self_attention`]) and the cached encoder states; returns
    /// their last hidden states [batch, n, width] and extends `cache`. The same as
    /// [`BertModel::forward`] (causal, without a mask) over all tokens so far, restricted to the
    /// new ones.
    pub fn decode_cached(
        &self,
        input_ids: &Tensor,
        self_attention: Option<&[BertAttention]>,
        cache: &mut DecodingCache,
    ) -> Tensor {
        if let Some(modules) = self_attention {
            assert_eq!(
                modules.len(),
                self.layers.len(),
                "one self-attention per layer of a {}-layer model",
                self.layers.len()
            );
        }
        let x = self.embeddings.forward_from(input_ids, None, cache.length).to_kind(self.compute);
        let n = x.size()[1];
        // The new tokens see every cached token and, among themselves, the earlier ones.
        let self_mask =
            (n > 1).then(|| Tensor::ones([n, cache.length + n], (Kind::Bool, x.device())).tril(cache.length));
        let x = self.layers.iter().zip(&mut cache.layers).enumerate().fold(x, |x, (i, (layer, layer_cache))| {
            layer.forward_cached(&x, self_attention.map(|modules| &modules[i]), self_mask.as_ref(), layer_cache)
        });
        cache.length += n;
        x
    }
}

/// The language-modelling head (`transformers` `BertLMPredictionHead`): `transform.dense`,
/// GELU, `transform.LayerNorm`, then the decoder, whose weight is the word-embedding table and
/// whose bias is `bias`. Serves masked (ALBEF, BLIP's encoder) and causal (BLIP's decoder)
/// language modelling alike.
#[derive(Debug)]
pub struct BertLmHead {
    dense: Linear,
    layer_norm: LayerNorm,
    bias: Tensor,
}

impl BertLmHead {
    /// The head under `p` (Hugging Face's `cls.predictions`).
    pub fn new(p: nn::Path, config: &BertConfig) -> Self {
        let width = config.hidden_size;
        Self {
            dense: Linear::new(&p / "transform" / "dense", width, width, Some(config.initializer_range)),
            layer_norm: layer_norm_eps(&p / "transform" / "LayerNorm", width, config.layer_norm_eps),
            bias: p.var("bias", &[config.vocab_size], nn::Init::Const(0.0)),
        }
    }

    /// Logits [batch, tokens, vocab] of hidden states [batch, tokens, width], in their kind;
    /// `word_embeddings` is the tied decoder weight ([`BertEmbeddings::word_embeddings`]).
    pub fn forward(&self, hidden: &Tensor, word_embeddings: &Tensor) -> Tensor {
        let h = Activation::Gelu.apply(&hidden.apply(&self.dense)).apply(&self.layer_norm);
        h.linear(&cast(word_embeddings, &h), Some(cast(&self.bias, &h)))
    }
}
