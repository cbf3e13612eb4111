//! `[model] init_from` for ALBEF and BLIP: a model written in the reference layout
//! (torchmultimodal's ALBEF, transformers' BLIP retrieval and captioning models) starts a fresh
//! trainer with exactly its tensors; the heads the layout lacks keep their initialisation, the
//! momentum encoders start as copies of the loaded weights, and a file in another layout is
//! refused with the reason.

use std::collections::HashMap;

use braid::data::mlm::MaskingVocab;
use braid::init_from::init_from;
use braid::models::albef::{export_torchmultimodal, AlbefConfig};
use braid::models::blip::{export_transformers, BlipConfig, BlipTokens};
use braid::trainer::{ModelSpec, Trainer};
use braid_coordinator::config::JobConfig;
use tch::{Device, Tensor};

fn job(family: &str, seed: u64) -> JobConfig {
    let text = format!(
        "[job]\nname = \"init\"\nseed = {seed}\n[data]\ntrain = \"unused\"\n[model]\nfamily = \"{family}\"\nqueue_size = 64\n[train]\nglobal_batch = 16\n"
    );
    JobConfig::parse(&text, "init").unwrap()
}

fn albef(seed: u64) -> Trainer {
    let config = AlbefConfig::preset("tiny", 40, 0, None).unwrap();
    let vocab = MaskingVocab::new(4, 40, [0, 1, 2, 3]).unwrap();
    Trainer::new(&job("albef", seed), ModelSpec::Albef { config, vocab, context_length: 10 }, Device::Cpu).unwrap()
}

fn blip(seed: u64) -> Trainer {
    let tokens = BlipTokens { bos_token_id: 5, enc_token_id: 6, sep_token_id: 3, pad_token_id: 0 };
    let config = BlipConfig::preset("tiny", 40, tokens, Some(10)).unwrap();
    Trainer::new(&job("blip", seed), ModelSpec::Blip { config, context_length: 10 }, Device::Cpu).unwrap()
}

fn model(trainer: &Trainer) -> HashMap<String, Tensor> {
    trainer.state().into_iter().filter_map(|(n, t)| n.strip_prefix("model.").map(|n| (n.to_string(), t.copy()))).collect()
}

fn write(tensors: &[(String, Tensor)], path: &std::path::Path) {
    let named: Vec<(&str, Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t.contiguous())).collect();
    Tensor::write_safetensors(&named, path).unwrap();
}

/// Asserts `target` holds `source`'s tensors except those `kept` names, which stay as `fresh`,
/// and that every momentum tensor equals its live weight.
fn assert_loaded(source: &HashMap<String, Tensor>, fresh: &HashMap<String, Tensor>, target: &Trainer, kept: &[String]) {
    let loaded = model(target);
    for (name, t) in &loaded {
        let expected = if kept.contains(name) { &fresh[name] } else { &source[name] };
        assert!(t.equal(expected), "{name} is not what init_from should leave");
    }
    for (name, t) in target.state() {
        if let Some(live) = name.strip_prefix("momentum.") {
            assert!(t.equal(&loaded[live]), "momentum {live} does not start as the loaded weight");
        }
    }
}

#[test]
fn albef_starts_from_torchmultimodal_weights() {
    let dir = tempfile::tempdir().unwrap();
    let source = albef(1);
    let spec = match source.spec() {
        ModelSpec::Albef { config, .. } => *config,
        _ => unreachable!(),
    };
    let online: Vec<(String, Tensor)> = model(&source).into_iter().collect();
    let path = dir.path().join("albef.safetensors");
    write(&export_torchmultimodal(&online, None, &spec), &path);

    let mut target = albef(2);
    let fresh = model(&target);
    let kept = init_from(&mut target, path.to_str().unwrap()).unwrap();
    assert!(!kept.is_empty() && kept.iter().all(|n| n.starts_with("itm_head.") || n.starts_with("mlm_head.")), "{kept:?}");
    assert_loaded(&model(&source), &fresh, &target, &kept);
}

#[test]
fn blip_starts_from_transformers_retrieval_or_captioning_weights() {
    let dir = tempfile::tempdir().unwrap();
    let source = blip(1);
    let spec = match source.spec() {
        ModelSpec::Blip { config, .. } => *config,
        _ => unreachable!(),
    };
    let params: Vec<(String, Tensor)> = model(&source).into_iter().collect();
    let (retrieval, captioning) = export_transformers(&params, &spec);
    for (name, tensors, lacks) in [("retrieval", retrieval, "lm_head."), ("captioning", captioning, "itm_head.")] {
        let path = dir.path().join(format!("{name}.safetensors"));
        write(&tensors, &path);
        let mut target = blip(2);
        let fresh = model(&target);
        let kept = init_from(&mut target, path.to_str().unwrap()).unwrap();
        assert!(kept.iter().any(|n| n.starts_with(lacks)), "{name}: {kept:?}");
        assert_loaded(&model(&source), &fresh, &target, &kept);
    }
}

#[test]
fn weights_in_another_layout_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.safetensors");
    write(&[("visual.conv1.weight".to_string(), Tensor::zeros([2, 3, 8, 8], (tch::Kind::Float, Device::Cpu)))], &path);
    let err = init_from(&mut blip(2), path.to_str().unwrap()).unwrap_err().to_string();
    assert!(err.contains("clip.safetensors") && err.contains("not a transformers BLIP state dict"), "{err}");
    let err = init_from(&mut albef(2), path.to_str().unwrap()).unwrap_err().to_string();
    assert!(err.contains("clip.safetensors"), "{err}");
}
