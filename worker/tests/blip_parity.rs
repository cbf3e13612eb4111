//! braid's BLIP against `transformers`: tiny random `BlipForImageTextRetrieval` and
//! `BlipForConditionalGeneration` models whose shared parts (image encoder, text embeddings,
//! cross-attention, feed-forward networks) hold the same weights, as in BLIP's pretraining, are
//! imported into one braid model, which must give the same image embeddings, ITC similarities and
//! features, ITM logits, captioning logits and label-smoothed LM loss within 1e-5 (fp32, eval
//! mode), and the same greedy and beam-search captions as `generate`. braid's own weights,
//! exported, must load into both `transformers` models with `load_state_dict(strict=True)` and
//! reproduce braid's outputs. The key map's round trip and errors, the weight sharing (which
//! parameters each objective reaches), key/value-cached decoding against the full decoder, bf16,
//! `validate`, `has_momentum` and the FLOP count are checked without Python.

use std::cell::Cell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use braid::models::bert::BertConfig;
use braid::models::blip::{
    export_transformers, generate_captions, import_transformers, Blip, BlipConfig, BlipTokens, CaptionOptions,
};
use braid::models::layers::TransformerShape;
use braid::models::vit::VitConfig;
use braid::models::ModelError;
use braid::trainer::seeded;
use tch::{nn, Device, Kind, Tensor};

/// The tiny models, their inputs and the outputs compared, shared by both scripts.
const PRELUDE: &str = r#"
import sys
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

out = sys.argv[1]
PAD, CLS, SEP, DEC, ENC, V = 0, 1, 2, 97, 98, 99
B, N = 3, 9
GENERATE = [(1, 12, 0), (1, 10, 6), (3, 12, 0), (3, 10, 6), (4, 16, 3)]
config = BlipConfig(
    text_config=dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                     max_position_embeddings=64, hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=PAD, bos_token_id=DEC, sep_token_id=SEP,
                     eos_token_id=SEP, label_smoothing=0.1),
    vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192,
                       image_size=32, patch_size=8, hidden_act="gelu", layer_norm_eps=1e-5, attention_dropout=0.0),
    image_text_hidden_size=24,
)


def models():
    retrieval = BlipForImageTextRetrieval(config).eval()
    captioning = BlipForConditionalGeneration(config).eval()
    return retrieval, captioning


def inputs(seed):
    torch.manual_seed(seed)
    lengths = torch.tensor([N, 6, 4])
    mask = (torch.arange(N)[None, :] < lengths[:, None]).long()
    body = torch.randint(3, DEC, (B, N))
    body[torch.arange(B), lengths - 1] = SEP
    body = body * mask
    ids = lambda first: torch.cat([torch.full((B, 1), first), body[:, 1:]], 1)
    return {"pixel_values": torch.randn(B, 3, 32, 32), "attention_mask": mask,
            "text_ids": ids(CLS), "itm_ids": ids(ENC), "decoder_ids": ids(DEC)}


def captions(sequences, max_length):
    # generate returns [DEC] + tokens, padded after [SEP]: keep the tokens up to and including [SEP].
    rows = torch.full((B, max_length), -1)
    for i, s in enumerate(sequences.tolist()):
        assert s[0] == DEC, s
        s = s[1:]
        if SEP in s:
            s = s[: s.index(SEP) + 1]
        rows[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return rows


def outputs(retrieval, captioning, x):
    pixels, mask = x["pixel_values"], x["attention_mask"]
    o = {}
    with torch.no_grad():
        image = retrieval.vision_model(pixels).last_hidden_state
        o["image_embeds"] = image
        o["captioning_image_embeds"] = captioning.vision_model(pixels).last_hidden_state
        text = retrieval.text_encoder(x["text_ids"], attention_mask=mask).last_hidden_state
        o["text_states"] = text
        o["image_feat"] = F.normalize(retrieval.vision_proj(image[:, 0]), dim=-1)
        o["text_feat"] = F.normalize(retrieval.text_proj(text[:, 0]), dim=-1)
        o["itc"] = retrieval(x["text_ids"], pixels, use_itm_head=False, attention_mask=mask).itm_score
        itm = retrieval(x["itm_ids"], pixels, use_itm_head=True, attention_mask=mask)
        o["itm_states"] = itm.question_embeds
        o["itm"] = itm.itm_score
        labels = x["decoder_ids"].masked_fill(mask == 0, -100)
        lm = captioning(pixels, x["decoder_ids"], attention_mask=mask, labels=labels)
        o["caption_logits"] = lm.logits
        o["lm_loss"] = lm.loss
        for beams, max_length, min_length in GENERATE:
            sequences = captioning.generate(pixel_values=pixels, num_beams=beams, max_length=max_length,
                                            min_length=min_length)
            o[f"generate_{beams}_{max_length}_{min_length}"] = captions(sequences, max_length)
    return {k: v.contiguous() for k, v in o.items()}


def save(tensors, name):
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, f"{out}/{name}.safetensors")
"#;

/// Builds both models with random weights perturbed so LayerNorm affines and biases matter,
/// makes the shared parts equal (BLIP's tying), and writes the state dicts, inputs and outputs.
const REFERENCE: &str = r#"
torch.manual_seed(0)
retrieval, captioning = models()


def randomise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "LayerNorm" in name or "layernorm" in name:
                p.copy_((1.0 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))


randomise(retrieval)
randomise(captioning)
with torch.no_grad():
    # Captions that end early and captions that run to max_length.
    captioning.text_decoder.cls.predictions.bias[SEP] -= 0.5
    # BLIP's weight sharing: everything but the decoder's self-attention and LM head is the encoder's.
    captioning.vision_model.load_state_dict(retrieval.vision_model.state_dict())
    captioning.text_decoder.bert.embeddings.load_state_dict(retrieval.text_encoder.embeddings.state_dict())
    for dec, enc in zip(captioning.text_decoder.bert.encoder.layer, retrieval.text_encoder.encoder.layer):
        for part in ("crossattention", "intermediate", "output"):
            getattr(dec, part).load_state_dict(getattr(enc, part).state_dict())
predictions = captioning.text_decoder.cls.predictions
assert predictions.decoder.weight is captioning.text_decoder.bert.embeddings.word_embeddings.weight
save(retrieval.state_dict(), "retrieval")
save(captioning.state_dict(), "captioning")
x = inputs(1)
save(x, "inputs")
save(outputs(retrieval, captioning, x), "outputs")
"#;

/// Loads braid's exported tensors into fresh models, strictly, and writes their outputs.
const EXPORTED: &str = r#"
retrieval, captioning = models()
retrieval.load_state_dict(load_file(f"{out}/retrieval.safetensors"), strict=True)
captioning.load_state_dict(load_file(f"{out}/captioning.safetensors"), strict=True)
predictions = captioning.text_decoder.cls.predictions
assert torch.equal(predictions.decoder.weight, captioning.text_decoder.bert.embeddings.word_embeddings.weight)
x = inputs(2)
save(x, "inputs")
save(outputs(retrieval, captioning, x), "outputs")
"#;

const TOLERANCE: f64 = 1e-5;
const SEP: i64 = 2;

/// The shape and tokens of the Python prelude's models.
fn tiny() -> BlipConfig {
    let vision = VitConfig::encoder(
        32,
        8,
        TransformerShape { width: 48, layers: 2, heads: 4, mlp_ratio: 4.0, layer_norm_eps: 1e-5 },
    );
    let text = BertConfig {
        vocab_size: 99,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 37,
        max_position_embeddings: 64,
        type_vocab_size: 0,
        cross_attention_from_layer: Some(0),
        encoder_hidden_size: Some(48),
        pad_token_id: Some(0),
        layer_norm_eps: 1e-12,
        initializer_range: 0.02,
    };
    let tokens = BlipTokens { bos_token_id: 97, enc_token_id: 98, sep_token_id: SEP, pad_token_id: 0 };
    BlipConfig { vision, text, embed_dim: 24, ..BlipConfig::preset("tiny", 99, tokens, None).unwrap() }
}

/// One run of a Python script in a fresh folder, with its inputs and outputs.
struct Python {
    dir: tempfile::TempDir,
    inputs: HashMap<String, Tensor>,
    outputs: HashMap<String, Tensor>,
    compared: Cell<usize>,
}

impl Python {
    /// Runs `PRELUDE` + `script`; `prepare` writes files into the folder first.
    fn run(script: &str, prepare: impl FnOnce(&Path)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path());
        let path = dir.path().join("blip_ref.py");
        std::fs::write(&path, format!("{PRELUDE}{script}")).unwrap();
        let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
        let out = Command::new(&python).arg(&path).arg(dir.path()).output().expect("run the venv's python");
        assert!(out.status.success(), "python failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let inputs = read(&dir.path().join("inputs.safetensors")).into_iter().collect();
        let outputs = read(&dir.path().join("outputs.safetensors")).into_iter().collect();
        Self { dir, inputs, outputs, compared: Cell::new(0) }
    }

    fn input(&self, name: &str) -> &Tensor {
        &self.inputs[name]
    }

    /// Max abs difference of `got` from the output `name`; fails above [`TOLERANCE`].
    fn check(&self, name: &str, got: &Tensor) -> f64 {
        let expected = &self.outputs[name];
        assert_eq!(got.size(), expected.size(), "{name}: shape");
        let diff = (got.to_kind(Kind::Float) - expected).abs().max().double_value(&[]);
        println!("{name}: max abs difference {diff:.3e}");
        assert!(diff < TOLERANCE, "{name}: max abs difference {diff:e} from transformers");
        self.compared.set(self.compared.get() + 1);
        diff
    }

    /// braid's captions against the `generate_{beams}_{max_length}_{min_length}` outputs; returns
    /// how many ended with [SEP] before max_length and how many ran to it.
    fn check_captions(&self, model: &Blip, images: &Tensor) -> (usize, usize) {
        let (mut early, mut full) = (0, 0);
        let mut names: Vec<&String> = self.outputs.keys().filter(|k| k.starts_with("generate_")).collect();
        names.sort();
        assert!(!names.is_empty());
        for name in names {
            let numbers: Vec<usize> = name["generate_".len()..].split('_').map(|n| n.parse().unwrap()).collect();
            let options = CaptionOptions { num_beams: numbers[0], max_length: numbers[1], min_length: numbers[2] };
            let got = generate_captions(model, images, &options);
            let expected: Vec<Vec<i64>> = rows(&self.outputs[name.as_str()])
                .into_iter()
                .map(|row| row.into_iter().take_while(|&t| t >= 0).collect())
                .collect();
            println!("{name}: {got:?}");
            assert_eq!(got, expected, "{name}: captions differ from transformers' generate");
            self.compared.set(self.compared.get() + 1);
            for caption in &got {
                assert!(caption.len() < options.max_length);
                if caption.last() == Some(&SEP) {
                    assert!(caption.len() + 1 >= options.min_length, "{name}: [SEP] before min_length");
                    early += (caption.len() + 1 < options.max_length) as usize;
                } else {
                    assert_eq!(caption.len() + 1, options.max_length, "{name}: stopped without [SEP]");
                    full += 1;
                }
            }
        }
        (early, full)
    }
}

fn read(path: &Path) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rows(t: &Tensor) -> Vec<Vec<i64>> {
    let n = t.size()[1] as usize;
    Vec::<i64>::try_from(t.reshape([-1])).unwrap().chunks(n).map(<[i64]>::to_vec).collect()
}

/// A model whose every parameter is set from `params` (which must name exactly the model's
/// parameters).
fn load(config: BlipConfig, params: &[(String, Tensor)]) -> (nn::VarStore, Blip) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = Blip::new(&vs.root(), config);
    let variables = vs.variables();
    let given: BTreeSet<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    let wanted: BTreeSet<&str> = variables.keys().map(String::as_str).collect();
    assert_eq!(given, wanted, "imported names are the model's parameters");
    tch::no_grad(|| {
        for (name, t) in params {
            variables[name].shallow_clone().copy_(t);
        }
    });
    vs.freeze();
    (vs, model)
}

/// The model's parameters, sorted by name.
fn named(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<_> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Every output of `model` the Python scripts compute, checked against `python`.
fn check_outputs(python: &Python, model: &Blip) {
    let images = python.input("pixel_values");
    let mask = python.input("attention_mask");
    tch::no_grad(|| {
        let image = model.encode_image(images);
        python.check("image_embeds", &image);
        python.check("captioning_image_embeds", &image);
        let text = model.encode_text(python.input("text_ids"), mask);
        python.check("text_states", &text);
        let (image_feat, text_feat) = (model.image_feature(&image), model.text_feature(&text));
        python.check("image_feat", &image_feat);
        python.check("text_feat", &text_feat);
        python.check("itc", &image_feat.matmul(&text_feat.tr()));
        let multimodal = model.encode_multimodal(python.input("itm_ids"), mask, &image);
        python.check("itm_states", &multimodal);
        python.check("itm", &model.itm_logits(&multimodal));
        let ids = python.input("decoder_ids");
        let logits = model.decoder_logits(ids, mask, &image);
        python.check("caption_logits", &logits);
        python.check("lm_loss", &model.lm_loss(&logits, ids, mask));
    });
    let (early, full) = python.check_captions(model, images);
    assert!(early > 0 && full > 0, "captions ending early ({early}) and at max_length ({full}) are both covered");
    assert_eq!(python.compared.get(), python.outputs.len(), "every Python output is compared");
}

#[test]
fn imported_transformers_models_match_in_every_mode() {
    let python = Python::run(REFERENCE, |_| {});
    let retrieval = read(&python.dir.path().join("retrieval.safetensors"));
    let captioning = read(&python.dir.path().join("captioning.safetensors"));
    let config = tiny();
    let params = import_transformers(Some(&retrieval), Some(&captioning), &config).unwrap();
    let (_vs, model) = load(config, &params);
    check_outputs(&python, &model);
}

#[test]
fn exported_weights_load_strictly_into_transformers_and_match() {
    let config = tiny();
    let (vs, model, _) = perturbed(config, 3);
    // Captions that end early and captions that run to max_length.
    tch::no_grad(|| {
        let _ = vs.variables()["lm_head.bias"].get(SEP).g_add_scalar_(1.0);
    });
    let (retrieval, captioning) = export_transformers(&named(&vs), &config);
    let python = Python::run(EXPORTED, |dir| {
        Tensor::write_safetensors(&retrieval, dir.join("retrieval.safetensors")).unwrap();
        Tensor::write_safetensors(&captioning, dir.join("captioning.safetensors")).unwrap();
    });
    check_outputs(&python, &model);
}

/// A tiny model with every parameter perturbed (the same for one seed, whatever other tests
/// draw meanwhile), and its parameters.
fn perturbed(config: BlipConfig, seed: u64) -> (nn::VarStore, Blip, Vec<(String, Tensor)>) {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = seeded(seed, || {
        let model = Blip::new(&vs.root(), config);
        tch::no_grad(|| {
            for (_, t) in named(&vs) {
                let _ = t.shallow_clone().g_add_(&(t.randn_like() * 0.1));
            }
        });
        model
    });
    let params = named(&vs);
    (vs, model, params)
}

/// Two random 32x32 images.
fn images(seed: u64) -> Tensor {
    seeded(seed, || Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu)))
}

#[test]
fn import_of_export_is_the_identity_and_errors_name_the_keys() {
    let config = tiny();
    let (_vs, _model, params) = perturbed(config, 4);
    let (retrieval, captioning) = export_transformers(&params, &config);
    let by_name =
        |list: &[(String, Tensor)]| list.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect::<HashMap<_, _>>();

    let both = import_transformers(Some(&retrieval), Some(&captioning), &config).unwrap();
    let params_by_name = by_name(&params);
    assert_eq!(both.len(), params.len());
    for (name, t) in &both {
        if name == "temp" {
            assert_eq!(t.double_value(&[]), config.temp as f32 as f64, "transformers has no temperature");
        } else {
            assert!(t.equal(&params_by_name[name]), "{name} changed in the round trip");
        }
    }
    // Each layout alone gives its part of the model.
    let names = |list: Vec<(String, Tensor)>| list.into_iter().map(|(n, _)| n).collect::<BTreeSet<_>>();
    let only_retrieval = names(import_transformers(Some(&retrieval), None, &config).unwrap());
    assert!(
        only_retrieval.contains("temp") && only_retrieval.contains("text.encoder.layer.1.attention.self.query.weight")
    );
    assert!(!only_retrieval.iter().any(|n| n.starts_with("text_decoder.") || n.starts_with("lm_head.")));
    let only_captioning = names(import_transformers(None, Some(&captioning), &config).unwrap());
    assert!(only_captioning.contains("text_decoder.layer.1.attention.self.query.weight"));
    assert!(only_captioning.contains("text.encoder.layer.1.crossattention.self.key.weight"));
    assert!(!only_captioning.iter().any(|n| n.contains(".encoder.layer.0.attention.") || n.starts_with("itm_head.")));
    assert_eq!(only_retrieval.union(&only_captioning).count(), params.len());
    // transformers' save_pretrained drops the tied aliases.
    let untied: Vec<_> = captioning
        .iter()
        .filter(|(k, _)| !k.contains("predictions.decoder."))
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    import_transformers(None, Some(&untied), &config).unwrap();

    let message = |r: Result<Vec<(String, Tensor)>, ModelError>| match r {
        Ok(_) => panic!("import accepted bad weights"),
        Err(e) => e.to_string(),
    };
    let edit = |list: &[(String, Tensor)], key: &str, f: &dyn Fn(&Tensor) -> Option<Tensor>| -> Vec<(String, Tensor)> {
        list.iter()
            .filter_map(
                |(k, t)| if k == key { f(t).map(|t| (k.clone(), t)) } else { Some((k.clone(), t.shallow_clone())) },
            )
            .collect()
    };
    let cross = "text_decoder.bert.encoder.layer.1.crossattention.self.value.weight";
    let shifted = edit(&captioning, cross, &|t| Some(t + 1.0));
    let e = message(import_transformers(Some(&retrieval), Some(&shifted), &config));
    assert!(e.contains(cross) && e.contains("text_encoder.encoder.layer.1.crossattention.self.value.weight"), "{e}");
    assert!(e.contains("share braid's text.encoder.layer.1.crossattention.self.value.weight"), "{e}");
    let tied = edit(&captioning, "text_decoder.cls.predictions.decoder.bias", &|t| Some(t + 1.0));
    let e = message(import_transformers(None, Some(&tied), &config));
    assert!(e.contains("text_decoder.cls.predictions.decoder.bias") && e.contains("tied"), "{e}");
    let missing = edit(&retrieval, "itm_head.bias", &|_| None);
    let mut extra = edit(&missing, "vision_proj.weight", &|t| Some(t.narrow(0, 0, 20)));
    extra.push(("text_encoder.pooler.dense.weight".into(), Tensor::zeros([32, 32], (Kind::Float, Device::Cpu))));
    let e = message(import_transformers(Some(&extra), None, &config));
    assert!(e.contains("\"itm_head.bias\" is missing"), "{e}");
    assert!(e.contains("\"vision_proj.weight\" has shape [20, 48]"), "{e}");
    assert!(e.contains("unexpected keys \"text_encoder.pooler.dense.weight\""), "{e}");
    assert!(message(import_transformers(None, None, &config)).contains("neither"));
}

/// Which parameters each objective reaches (has a gradient from): the decoder (LM) trains the
/// shared blocks, its own self-attention and the LM head but not the encoder's self-attention;
/// the image-grounded encoder (ITM) trains the encoder's self-attention and the cross-attention
/// but not the decoder's; the unimodal encoder (ITC) reaches no cross-attention, and the
/// momentum model holds exactly the towers ITC reads.
#[test]
fn objectives_share_every_block_but_the_self_attention() {
    let config = tiny();
    let images = images(8);
    let ids = Tensor::from_slice(&[97i64, 5, 6, 7, SEP, 97, 8, 9, SEP, 0]).view([2, 5]);
    let mask = ids.ne(0).to_kind(Kind::Int64);
    let reached = |loss: &dyn Fn(&Blip, &Tensor) -> Tensor| -> BTreeSet<String> {
        let (vs, model, _) = perturbed(config, 5);
        loss(&model, &model.encode_image(&images)).backward();
        vs.variables().into_iter().filter(|(_, t)| t.grad().defined()).map(|(name, _)| name).collect()
    };
    let some = |set: &BTreeSet<String>, pattern: &str| set.iter().any(|n| n.contains(pattern));

    let lm = reached(&|model, image| model.lm_loss(&model.decoder_logits(&ids, &mask, image), &ids, &mask));
    for part in [
        "visual.",
        "text.embeddings.",
        ".crossattention.",
        ".intermediate.",
        "text_decoder.layer.1.attention.",
        "lm_head.",
    ] {
        assert!(some(&lm, part), "LM loss does not reach {part}");
    }
    for part in ["text.encoder.layer.0.attention.", "itm_head.", "vision_proj.", "text_proj.", "temp"] {
        assert!(!some(&lm, part), "LM loss reaches {part}");
    }

    let itm = reached(&|model, image| model.itm_logits(&model.encode_multimodal(&ids, &mask, image)).sum(Kind::Float));
    for part in ["visual.", "text.encoder.layer.1.attention.", ".crossattention.", "itm_head."] {
        assert!(some(&itm, part), "ITM does not reach {part}");
    }
    for part in ["text_decoder.", "lm_head.", "vision_proj.", "text_proj.", "temp"] {
        assert!(!some(&itm, part), "ITM reaches {part}");
    }

    let itc = reached(&|model, image| {
        let similarity = model.image_feature(image).matmul(&model.text_feature(&model.encode_text(&ids, &mask)).tr());
        (similarity / &model.heads.temp).sum(Kind::Float)
    });
    let (_vs, _model, params) = perturbed(config, 5);
    let momentum: BTreeSet<String> = params.into_iter().map(|(n, _)| n).filter(|n| Blip::has_momentum(n)).collect();
    let itc_towers: BTreeSet<String> = itc.iter().filter(|n| *n != "temp").cloned().collect();
    assert!(itc.contains("temp") && !some(&itc, ".crossattention."));
    assert_eq!(momentum, itc_towers);
}

#[test]
fn has_momentum_names_blips_momentum_encoders() {
    for name in [
        "visual.conv1.weight",
        "visual.transformer.resblocks.0.attn.in_proj_weight",
        "vision_proj.weight",
        "text_proj.bias",
        "text.embeddings.word_embeddings.weight",
        "text.encoder.layer.0.attention.self.query.weight",
        "text.encoder.layer.3.output.LayerNorm.bias",
    ] {
        assert!(Blip::has_momentum(name), "{name}");
    }
    for name in [
        "text.encoder.layer.0.crossattention.self.key.weight",
        "text_decoder.layer.0.attention.self.query.weight",
        "lm_head.transform.dense.weight",
        "lm_head.bias",
        "itm_head.weight",
        "temp",
    ] {
        assert!(!Blip::has_momentum(name), "{name}");
    }
}

#[test]
fn presets_validate_and_every_problem_is_reported() {
    let tokens = BlipTokens { bos_token_id: 30522, enc_token_id: 30523, sep_token_id: 102, pad_token_id: 0 };
    for name in ["tiny", "base"] {
        BlipConfig::preset(name, 30524, tokens, None).unwrap().validate().unwrap();
    }
    assert!(matches!(BlipConfig::preset("large", 30524, tokens, None), Err(ModelError::UnknownPreset { .. })));
    let good = tiny();
    let bad = BlipConfig {
        vision: VitConfig { output_dim: Some(8), ..good.vision },
        text: BertConfig {
            cross_attention_from_layer: Some(1),
            type_vocab_size: 2,
            encoder_hidden_size: None,
            ..good.text
        },
        temp: 0.7,
        label_smoothing: 1.0,
        enc_token_id: 97,
        sep_token_id: 99,
        context_length: 65,
        ..good
    };
    let problems = bad.validate().unwrap_err();
    for expected in [
        "vision.output_dim is 8",
        "text.cross_attention_from_layer is Some(1), must be Some(0)",
        "text.type_vocab_size is 2",
        "text.hidden_size 32 differs from vision.transformer.width 48",
        "temp is 0.7",
        "label_smoothing is 1",
        "sep_token_id 99 is outside the vocabulary of 99",
        "bos_token_id and enc_token_id are both 97",
        "context_length is 65",
    ] {
        assert!(problems.contains(expected), "{expected:?} not in {problems}");
    }
    let problems = BlipConfig { text: BertConfig { hidden_size: 30, ..good.text }, ..good }.validate().unwrap_err();
    assert!(problems.contains("text.hidden_size 30 is not a multiple of num_attention_heads 4"), "{problems}");
}

/// The momentum model's cost at the base preset: the published forward cost of a ViT-B/16 image
/// tower at 224 px (17.58 G multiply-accumulates, fvcore) plus bert-base over 30 tokens
/// (12 x 30 x (4 x 768^2 + 2 x 768 x 3072) + attention = 2.565 G multiply-accumulates).
#[test]
fn flop_count_matches_published_costs() {
    let tokens = BlipTokens { bos_token_id: 30522, enc_token_id: 30523, sep_token_id: 102, pad_token_id: 0 };
    let config = BlipConfig::preset("base", 30524, tokens, None).unwrap();
    let expected = 2.0 * (17.58e9 + 2.565e9);
    let momentum = config.momentum_flops_per_sample();
    assert!((momentum / expected - 1.0).abs() < 0.03, "{momentum:e} vs {expected:e}");
    let forward = config.forward_flops_per_sample();
    assert!(
        forward > 2.0 * momentum && forward < 3.0 * momentum,
        "{forward:e} against the momentum model's {momentum:e}"
    );
}

#[test]
fn bf16_forward_keeps_fp32_parameters_and_tracks_fp32() {
    let config = tiny();
    let (vs, mut model, _) = perturbed(config, 6);
    let images = images(9);
    let ids = Tensor::from_slice(&[97i64, 5, 6, 7, SEP, 97, 8, 9, SEP, 0]).view([2, 5]);
    let mask = ids.ne(0).to_kind(Kind::Int64);
    let fp32 = tch::no_grad(|| model.decoder_logits(&ids, &mask, &model.encode_image(&images)));
    model.set_compute_kind(Kind::BFloat16);
    let logits = model.decoder_logits(&ids, &mask, &model.encode_image(&images));
    assert_eq!(logits.kind(), Kind::BFloat16);
    let loss = model.lm_loss(&logits, &ids, &mask);
    assert_eq!(loss.kind(), Kind::Float);
    loss.backward();
    for (name, p) in vs.variables() {
        assert_eq!(p.kind(), Kind::Float, "{name}");
    }
    let diff = (logits.to_kind(Kind::Float) - fp32).abs().max().double_value(&[]);
    assert!(diff < 0.1, "bf16 logits differ from fp32 by {diff}");
    let captions = generate_captions(&model, &images, &CaptionOptions { max_length: 6, min_length: 0, num_beams: 2 });
    assert_eq!(captions.len(), 2);
}

/// Key/value-cached decoding (what captioning runs) equals the full causal decoder: a prompt of
/// three tokens at once, then one token at a time, with the cache's rows reordered and dropped
/// in between as a beam search does.
#[test]
fn cached_decoding_equals_the_full_decoder() {
    let config = tiny();
    let (_vs, model, _) = perturbed(config, 7);
    tch::no_grad(|| {
        let images = images(10);
        let image = model.encode_image(&images);
        let ids = Tensor::from_slice(&[97i64, 5, 6, 7, 8, 9, 97, 10, 11, 12, 13, 14]).view([2, 6]);
        let full = model.decoder_logits(&ids, &Tensor::ones([2, 6], (Kind::Int64, Device::Cpu)), &image);
        let logits = |h: &Tensor| model.lm_head.forward(h, model.text.embeddings().word_embeddings());
        let self_attention = Some(model.decoder_self_attention.as_slice());
        let mut cache = model.text.decoding_cache(Some(&image));
        let mut max_diff = 0f64;
        let mut compare = |got: &Tensor, expected: &Tensor| {
            max_diff = max_diff.max((got - expected).abs().max().double_value(&[]));
        };
        let prompt = model.text.decode_cached(&ids.narrow(1, 0, 3), self_attention, &mut cache);
        compare(&logits(&prompt), &full.narrow(1, 0, 3));
        // Rows swapped: row 0 continues sequence 1, row 1 sequence 0.
        let swap = Tensor::from_slice(&[1i64, 0]);
        cache.select(&swap);
        let next = model.text.decode_cached(&ids.index_select(0, &swap).narrow(1, 3, 1), self_attention, &mut cache);
        compare(&logits(&next), &full.index_select(0, &swap).narrow(1, 3, 1));
        // Sequence 1 (row 0) alone, duplicated as two beams.
        cache.select(&Tensor::from_slice(&[0i64, 0]));
        for position in 4..6 {
            let next = model.text.decode_cached(
                &ids.narrow(0, 1, 1).narrow(1, position, 1).repeat([2, 1]),
                self_attention,
                &mut cache,
            );
            compare(&logits(&next), &full.narrow(0, 1, 1).narrow(1, position, 1).repeat([2, 1, 1]));
        }
        assert_eq!(cache.len(), 6);
        println!("cached decoding: max abs difference {max_diff:.3e}");
        assert!(max_diff < TOLERANCE, "cached decoding differs from the full decoder by {max_diff:e}");
    });
}
