//! braid's BERT-style text transformer against `transformers`: the same tiny random weights
//! (written by `transformers` in Python, loaded here by name) must give the same last hidden
//! states and language-model logits within 1e-5 (fp32, eval mode), as a bidirectional encoder
//! with padding and token types (`BertForMaskedLM`), as a causal decoder with and without
//! cross-attention (`BertLMHeadModel`), as BLIP's text model (`BlipTextLMHeadModel`, whose names
//! are BERT's under the same `bert.`/`cls.` prefixes, without token types and with a wider
//! encoder), and split into ALBEF's text and fusion layer ranges.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use braid::models::bert::{BertConfig, BertLmHead, BertModel, EncoderStates};
use tch::{nn, Device, Tensor};

/// Builds the reference models with a fixed seed, perturbs every parameter (so LayerNorm
/// affines and biases matter), and writes `{bert_mlm,bert_decoder,blip_text}.safetensors`
/// (state dicts), `inputs.safetensors` and `outputs.safetensors`.
const REFERENCE: &str = r#"
import sys
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForMaskedLM, BertLMHeadModel
from transformers.models.blip.configuration_blip import BlipTextConfig
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel

out = sys.argv[1]
torch.manual_seed(0)
B, N, M, V, LAYERS, FUSION_FROM = 3, 11, 5, 99, 4, 2
shape = dict(vocab_size=V, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
             intermediate_size=37, max_position_embeddings=64, hidden_act="gelu",
             layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
             pad_token_id=0)


def randomised(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    return model.eval()


def save(model, name):
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, f"{out}/{name}.safetensors")


def padding_mask(lengths, n):
    return (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()


def additive(mask):
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


mask = padding_mask([N, 7, 4], N)
input_ids = torch.randint(1, V, (B, N)) * mask
token_type_ids = torch.randint(0, 2, (B, N))
encoder_mask = padding_mask([M, 3, 1], M)
encoder_states = torch.randn(B, M, 32)
encoder_states_wide = torch.randn(B, M, 48)
outputs = {}

with torch.no_grad():
    mlm = randomised(BertForMaskedLM(BertConfig(**shape, type_vocab_size=2)))
    save(mlm, "bert_mlm")
    h = mlm.bert(input_ids, attention_mask=mask, token_type_ids=token_type_ids).last_hidden_state
    outputs["encoder_padded_token_types"] = h
    outputs["mlm_logits"] = mlm.cls(h)
    outputs["encoder_padded"] = mlm.bert(input_ids, attention_mask=mask).last_hidden_state
    outputs["encoder_unpadded"] = mlm.bert(input_ids).last_hidden_state

    dec = randomised(BertLMHeadModel(BertConfig(**shape, type_vocab_size=2, is_decoder=True, add_cross_attention=True)))
    save(dec, "bert_decoder")
    outputs["decoder_padded"] = dec.bert(input_ids, attention_mask=mask, use_cache=False).last_hidden_state
    outputs["decoder_unpadded"] = dec.bert(input_ids, use_cache=False).last_hidden_state
    h = dec.bert(input_ids, attention_mask=mask, encoder_hidden_states=encoder_states,
                 encoder_attention_mask=encoder_mask, use_cache=False).last_hidden_state
    outputs["decoder_cross"] = h
    outputs["decoder_lm_logits"] = dec.cls(h)

    # ALBEF: text layers (bidirectional, no cross-attention), then fusion layers attending to
    # the masked image tokens, through transformers' own BertLayer modules.
    h = dec.bert.embeddings(input_ids=input_ids)
    for layer in dec.bert.encoder.layer[:FUSION_FROM]:
        h = layer(h, additive(mask))
    outputs["albef_text"] = h
    for layer in dec.bert.encoder.layer[FUSION_FROM:]:
        h = layer(h, additive(mask), encoder_states, encoder_attention_mask=additive(encoder_mask))
    outputs["albef_fusion"] = h

    # BLIP's text model. transformers' BlipTextAttention drops the encoder attention mask on its
    # way to the cross-attention, so only all-ones image masks (BLIP's only use) are comparable.
    blip_config = BlipTextConfig(**shape, encoder_hidden_size=48, bos_token_id=1, sep_token_id=2, eos_token_id=2)
    blip = randomised(BlipTextLMHeadModel(blip_config))
    save(blip, "blip_text")
    outputs["blip_text"] = blip.bert(input_ids, attention_mask=mask, is_decoder=False).last_hidden_state
    outputs["blip_encoder_cross"] = blip.bert(input_ids, attention_mask=mask, encoder_hidden_states=encoder_states_wide,
                                              is_decoder=False).last_hidden_state
    h = blip.bert(input_ids, attention_mask=mask, encoder_hidden_states=encoder_states_wide,
                  is_decoder=True, use_cache=False).last_hidden_state
    outputs["blip_decoder_cross"] = h
    outputs["blip_decoder_lm_logits"] = blip.cls(h)

save_file({"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_type_ids,
           "encoder_mask": encoder_mask, "encoder_states": encoder_states,
           "encoder_states_wide": encoder_states_wide}, f"{out}/inputs.safetensors")
save_file({k: v.contiguous() for k, v in outputs.items()}, f"{out}/outputs.safetensors")
"#;

const TOLERANCE: f64 = 1e-5;

/// The tiny shape the reference script uses; `type_vocab_size`, cross-attention and the
/// encoder width vary by case.
fn tiny(type_vocab_size: i64, cross_attention_from_layer: Option<usize>, encoder_hidden_size: Option<i64>) -> BertConfig {
    BertConfig {
        vocab_size: 99,
        hidden_size: 32,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        intermediate_size: 37,
        max_position_embeddings: 64,
        type_vocab_size,
        cross_attention_from_layer,
        encoder_hidden_size,
        pad_token_id: Some(0),
        layer_norm_eps: 1e-12,
        initializer_range: 0.02,
    }
}

/// The reference run's folder and its inputs and outputs.
struct Reference {
    dir: tempfile::TempDir,
    inputs: HashMap<String, Tensor>,
    outputs: HashMap<String, Tensor>,
}

impl Reference {
    fn run() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("bert_ref.py");
        std::fs::write(&script, REFERENCE).unwrap();
        let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
        let out = Command::new(&python).arg(&script).arg(dir.path()).output().expect("run the venv's python");
        assert!(out.status.success(), "reference script failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let read = |name: &str| -> HashMap<String, Tensor> {
            Tensor::read_safetensors(dir.path().join(name)).unwrap().into_iter().collect()
        };
        let (inputs, outputs) = (read("inputs.safetensors"), read("outputs.safetensors"));
        Self { dir, inputs, outputs }
    }

    fn weights(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.safetensors"))
    }

    fn input(&self, name: &str) -> &Tensor {
        &self.inputs[name]
    }

    /// Max abs difference of `got` from the reference output `name`; fails above [`TOLERANCE`].
    fn check(&self, name: &str, got: &Tensor) -> f64 {
        let expected = &self.outputs[name];
        assert_eq!(got.size(), expected.size(), "{name}: shape");
        let diff = (got - expected).abs().max().double_value(&[]);
        println!("{name}: max abs difference {diff:.3e}");
        assert!(diff < TOLERANCE, "{name}: max abs difference {diff:e} from transformers");
        diff
    }

    /// Fails unless reference outputs `a` and `b` differ clearly (so the case that tells them
    /// apart tests something).
    fn differ(&self, a: &str, b: &str) {
        let gap = (&self.outputs[a] - &self.outputs[b]).abs().max().double_value(&[]);
        assert!(gap > 1e-2, "{a} and {b} differ by only {gap:e}");
    }
}

/// A model with an LM head under `bert.` and `cls.predictions.`, loaded from `weights`.
fn load(config: BertConfig, weights: &Path) -> (nn::VarStore, BertModel, BertLmHead) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let model = BertModel::new(&root / "bert", config);
    let head = BertLmHead::new(&root / "cls" / "predictions", &config);
    vs.load(weights).expect("the transformers state_dict has braid's parameter names");
    vs.freeze();
    (vs, model, head)
}

#[test]
fn hidden_states_and_logits_match_transformers() {
    let r = Reference::run();
    let ids = r.input("input_ids");
    let mask = r.input("attention_mask");
    let image = EncoderStates { states: r.input("encoder_states"), mask: Some(r.input("encoder_mask")) };
    let wide_image = EncoderStates { states: r.input("encoder_states_wide"), mask: None };
    let mut diffs = Vec::new();
    tch::no_grad(|| {
        // (a) bidirectional encoder with padding and token types; (d) its MLM logits.
        let (_vs, bert, head) = load(tiny(2, None, None), &r.weights("bert_mlm"));
        let x = bert.embed(ids, Some(r.input("token_type_ids")));
        let h = bert.forward_layers(&x, 0..4, Some(mask), None, false);
        diffs.push(r.check("encoder_padded_token_types", &h));
        diffs.push(r.check("mlm_logits", &head.forward(&h, bert.embeddings().word_embeddings())));
        diffs.push(r.check("encoder_padded", &bert.forward(ids, Some(mask), None, false)));
        diffs.push(r.check("encoder_unpadded", &bert.forward(ids, None, None, false)));

        // (c) causal decoder, alone and with cross-attention to masked encoder states.
        let (_vs, bert, head) = load(tiny(2, Some(0), None), &r.weights("bert_decoder"));
        diffs.push(r.check("decoder_padded", &bert.forward(ids, Some(mask), None, true)));
        diffs.push(r.check("decoder_unpadded", &bert.forward(ids, None, None, true)));
        let h = bert.forward(ids, Some(mask), Some(image), true);
        diffs.push(r.check("decoder_cross", &h));
        diffs.push(r.check("decoder_lm_logits", &head.forward(&h, bert.embeddings().word_embeddings())));

        // (b) ALBEF's split, bidirectional with masked cross-attention: text encoder = layers
        // 0..2, fusion = layers 2..4 on its output. The reference's cross-attention in layers 0
        // and 1 has no counterpart here and is not loaded.
        let (_vs, bert, _) = load(tiny(2, Some(2), None), &r.weights("bert_decoder"));
        assert!(!bert.layers()[1].has_cross_attention() && bert.layers()[2].has_cross_attention());
        let text = bert.forward_layers(&bert.embed(ids, None), 0..2, Some(mask), None, false);
        diffs.push(r.check("albef_text", &text));
        let fused = bert.forward_layers(&text, 2..4, Some(mask), Some(image), false);
        diffs.push(r.check("albef_fusion", &fused));

        // BLIP's text model: unimodal encoder, image-grounded encoder (bidirectional
        // cross-attention) and image-grounded decoder, with 48-wide encoder states.
        let (_vs, bert, head) = load(tiny(0, Some(0), Some(48)), &r.weights("blip_text"));
        diffs.push(r.check("blip_text", &bert.forward(ids, Some(mask), None, false)));
        diffs.push(r.check("blip_encoder_cross", &bert.forward(ids, Some(mask), Some(wide_image), false)));
        let h = bert.forward(ids, Some(mask), Some(wide_image), true);
        diffs.push(r.check("blip_decoder_cross", &h));
        diffs.push(r.check("blip_decoder_lm_logits", &head.forward(&h, bert.embeddings().word_embeddings())));
    });
    assert_eq!(diffs.len(), r.outputs.len(), "every reference output is compared");
    for (a, b) in [
        ("encoder_padded", "encoder_unpadded"),
        ("encoder_padded", "encoder_padded_token_types"),
        ("decoder_padded", "decoder_unpadded"),
        ("decoder_padded", "decoder_cross"),
        ("blip_text", "blip_encoder_cross"),
        ("blip_encoder_cross", "blip_decoder_cross"),
    ] {
        r.differ(a, b);
    }
}

#[test]
fn presets_validate_and_bad_shapes_are_all_reported() {
    for name in ["tiny", "bert-base", "albef", "blip"] {
        BertConfig::preset(name).unwrap().validate().unwrap();
    }
    assert!(BertConfig::preset("gpt").is_err());
    let bad = BertConfig { hidden_size: 30, cross_attention_from_layer: Some(4), ..tiny(0, None, None) };
    let problems = bad.validate().unwrap_err();
    assert!(problems.contains("not a multiple of num_attention_heads 4"), "{problems}");
    assert!(problems.contains("cross_attention_from_layer 4"), "{problems}");
}

#[test]
fn bf16_forward_keeps_fp32_parameters_and_tracks_fp32() {
    let config = BertConfig::preset("tiny").unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let mut bert = BertModel::new(&vs.root() / "bert", config);
    let head = BertLmHead::new(&vs.root() / "cls" / "predictions", &config);
    let ids = Tensor::randint_low(1, config.vocab_size, [2, 9], (tch::Kind::Int64, Device::Cpu));
    let image = Tensor::randn([2, 5, 32], (tch::Kind::Float, Device::Cpu));
    let encoder = Some(EncoderStates { states: &image, mask: None });
    let fp32 = tch::no_grad(|| bert.forward(&ids, None, encoder, true));
    bert.set_compute_kind(tch::Kind::BFloat16);
    let h = bert.forward(&ids, None, encoder, true);
    assert_eq!(h.kind(), tch::Kind::BFloat16);
    let logits = head.forward(&h, bert.embeddings().word_embeddings());
    assert_eq!(logits.kind(), tch::Kind::BFloat16);
    logits.to_kind(tch::Kind::Float).sum(tch::Kind::Float).backward();
    for (name, p) in vs.variables() {
        assert_eq!(p.kind(), tch::Kind::Float, "{name}");
        assert!(p.grad().defined(), "{name} has no gradient");
    }
    let diff = (h.to_kind(tch::Kind::Float) - fp32).abs().max().double_value(&[]);
    assert!(diff < 0.1, "bf16 hidden states differ from fp32 by {diff}");
}

/// [batch, n]: 1 for the first `lengths[i]` tokens of row i, 0 after.
fn padding_mask(lengths: &[i64], n: i64) -> Tensor {
    let positions = Tensor::arange(n, (tch::Kind::Int64, Device::Cpu)).unsqueeze(0);
    positions.lt_tensor(&Tensor::from_slice(lengths).unsqueeze(1)).to_kind(tch::Kind::Int64)
}

/// On a GPU, fp32 equals the CPU's within 1e-4 (SDPA's CUDA kernels, boolean masks, the
/// unmasked causal path) and bf16 stays within 0.1, with fp32 parameters and finite gradients.
#[test]
fn cuda_matches_cpu_in_fp32_and_tracks_it_in_bf16() {
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: skipped");
        return;
    }
    let cuda = Device::Cuda(0);
    let config = BertConfig::preset("tiny").unwrap();
    let cpu_vs = nn::VarStore::new(Device::Cpu);
    let cpu = BertModel::new(&cpu_vs.root() / "bert", config);
    let mut gpu_vs = nn::VarStore::new(cuda);
    let mut gpu = BertModel::new(&gpu_vs.root() / "bert", config);
    gpu_vs.copy(&cpu_vs).unwrap();

    let ids = Tensor::randint_low(1, config.vocab_size, [3, 13], (tch::Kind::Int64, Device::Cpu));
    let mask = padding_mask(&[13, 8, 3], 13);
    let image = Tensor::randn([3, 7, 32], (tch::Kind::Float, Device::Cpu));
    let image_mask = padding_mask(&[7, 7, 2], 7);
    let (g_ids, g_mask, g_image, g_image_mask) =
        (ids.to_device(cuda), mask.to_device(cuda), image.to_device(cuda), image_mask.to_device(cuda));
    // (name, padded, cross-attention, causal)
    let cases = [
        ("bidirectional, padded", true, false, false),
        ("bidirectional with cross-attention", true, true, false),
        ("causal, padded", true, false, true),
        ("causal, unpadded", false, false, true),
        ("causal with cross-attention", true, true, true),
    ];
    for kind in [tch::Kind::Float, tch::Kind::BFloat16] {
        gpu.set_compute_kind(kind);
        for (name, padded, cross, causal) in cases {
            let (cpu_mask, gpu_mask) = if padded { (Some(&mask), Some(&g_mask)) } else { (None, None) };
            let cpu_image = cross.then_some(EncoderStates { states: &image, mask: Some(&image_mask) });
            let gpu_image = cross.then_some(EncoderStates { states: &g_image, mask: Some(&g_image_mask) });
            let expected = tch::no_grad(|| cpu.forward(&ids, cpu_mask, cpu_image, causal));
            let got = gpu.forward(&g_ids, gpu_mask, gpu_image, causal);
            assert_eq!(got.kind(), kind);
            let diff = (got.to_kind(tch::Kind::Float).to_device(Device::Cpu) - &expected).abs().max().double_value(&[]);
            println!("{kind:?} {name}: max abs difference from CPU fp32 {diff:.3e}");
            let tolerance = if kind == tch::Kind::Float { 1e-4 } else { 0.1 };
            assert!(diff < tolerance, "{kind:?} {name}: {diff:e} from CPU fp32");
            got.to_kind(tch::Kind::Float).square().sum(tch::Kind::Float).backward();
        }
    }
    for (name, p) in gpu_vs.variables() {
        assert_eq!(p.kind(), tch::Kind::Float, "{name}");
        let grad = p.grad();
        assert!(grad.defined() && bool::try_from(grad.isfinite().all()).unwrap(), "{name}: gradient {grad:?}");
    }
}
