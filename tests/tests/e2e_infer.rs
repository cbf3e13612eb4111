//! `braid infer` with real processes: captions, ITM and ITC scores from reference-layout weights
//! (a randomly initialised tiny BLIP saved as transformers' `BlipForConditionalGeneration` and
//! `BlipForImageTextRetrieval` state dicts, a tiny ALBEF as torchmultimodal's), compared with the
//! same model run in this process; the accuracy summary recomputed from the printed ids; bad input
//! refused with a message that names what was wrong.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use braid::data::augment::{self, Transform};
use braid::data::synth::Scene;
use braid::data::tokenizer::{HfTokenizer, TextTokenizer};
use braid::models::albef::{export_torchmultimodal, Albef, AlbefConfig};
use braid::models::blip::{export_transformers, generate_captions, Blip, BlipConfig, BlipTokens, CaptionOptions};
use braid_tests::{braid, braid_run, python, synth_data, BraidOutput, JobFile, SynthData};
use serde_json::Value;
use tch::{nn, Device, Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(120);

/// A synthetic set, a tiny BLIP with its two reference state dicts, and two image files.
struct Fixture {
    _dir: tempfile::TempDir,
    data: SynthData,
    tokenizer: PathBuf,
    _vs: nn::VarStore,
    blip: Blip,
    retrieval: PathBuf,
    captioning: PathBuf,
    png: PathBuf,
    jpeg: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_data(&dir.path().join("data"), 20, 12, 10);
    let tokenizer = data.dir.join("tokenizer-bert.json");
    let hf = HfTokenizer::from_file(&tokenizer).unwrap();
    let id = |t: &str| i64::from(hf.token_to_id(t).unwrap());
    let tokens = BlipTokens { bos_token_id: id("[DEC]"), enc_token_id: id("[ENC]"), sep_token_id: id("[SEP]"), pad_token_id: id("[PAD]") };
    let config = BlipConfig::preset("tiny", hf.vocab_size() as i64, tokens, None).unwrap();
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let blip = Blip::new(&vs.root(), config);
    let params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    let (retrieval_dict, captioning_dict) = export_transformers(&params, &config);
    let retrieval = dir.path().join("blip-retrieval.safetensors");
    let captioning = dir.path().join("blip-captioning.safetensors");
    std::fs::write(&retrieval, braid::checkpoint::to_safetensors(&retrieval_dict).unwrap()).unwrap();
    std::fs::write(&captioning, braid::checkpoint::to_safetensors(&captioning_dict).unwrap()).unwrap();
    let png = dir.path().join("scene.png");
    let jpeg = dir.path().join("scene.jpg");
    Scene::sample(99, 0).render(48).save(&png).unwrap();
    Scene::sample(99, 1).render(40).save(&jpeg).unwrap();
    Fixture { data, tokenizer, _vs: vs, blip, retrieval, captioning, png, jpeg, _dir: dir }
}

impl Fixture {
    /// `braid infer --weights ... --family blip --preset tiny --tokenizer ...` plus `args`.
    fn infer(&self, weights: &[&Path], args: &[&OsStr]) -> BraidOutput {
        let mut all: Vec<&OsStr> = vec![OsStr::new("infer")];
        for w in weights {
            all.extend([OsStr::new("--weights"), w.as_os_str()]);
        }
        all.extend([OsStr::new("--family"), OsStr::new("blip"), OsStr::new("--preset"), OsStr::new("tiny")]);
        all.extend([OsStr::new("--tokenizer"), self.tokenizer.as_os_str()]);
        all.extend(args);
        braid(all, TIMEOUT)
    }

    fn both(&self) -> [&Path; 2] {
        [&self.retrieval, &self.captioning]
    }

    /// The held-out transform of an image file, as a `[1, 3, 32, 32]` batch.
    fn image(&self, path: &Path) -> Tensor {
        let ext = path.extension().unwrap().to_str().unwrap();
        let image = augment::decode(&std::fs::read(path).unwrap(), ext).unwrap();
        Tensor::from_slice(&augment::apply(&image, Transform::Eval, 32, 0, 0)).view([1, 3, 32, 32])
    }

    /// Ids `[1, 32]` and mask of a text, `[CLS]` first.
    fn text(&self, text: &str) -> (Tensor, Tensor) {
        let hf = HfTokenizer::from_file(&self.tokenizer).unwrap();
        let encoded = hf.encode(text, 32);
        let mask: Vec<i64> = (0..32).map(|i| i64::from(i <= encoded.eot_index)).collect();
        (Tensor::from_slice(&encoded.ids).view([1, 32]), Tensor::from_slice(&mask).view([1, 32]))
    }
}

fn json(out: &BraidOutput) -> Value {
    assert!(out.status.success(), "braid infer failed:\n{}", out.text());
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", out.text()))
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

#[test]
fn captions_held_out_images_and_files_with_their_accuracy() {
    let f = fixture();
    let manifest = f.data.eval_manifest();
    let args: Vec<&OsStr> = vec![
        OsStr::new("--task"),
        OsStr::new("caption"),
        OsStr::new("--data"),
        manifest.as_os_str(),
        OsStr::new("--limit"),
        OsStr::new("5"),
        OsStr::new("--image"),
        f.png.as_os_str(),
        OsStr::new("--image"),
        f.jpeg.as_os_str(),
    ];
    let out = f.infer(&f.both(), &args);
    assert!(out.status.success(), "braid infer --task caption failed:\n{}", out.text());
    println!("{}", out.stdout);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("blip tiny from ") && lines[0].contains("BlipForConditionalGeneration"), "{}", out.text());
    assert!(lines[1].starts_with("image") && lines[1].contains("caption") && lines[1].contains("true caption"), "{}", out.text());
    // Header, table header, 5 held-out rows, 2 files, summary, word F1 and chance levels.
    assert_eq!(lines.len(), 1 + 1 + 7 + 2, "{}", out.text());
    assert!(lines[7].starts_with(&f.png.display().to_string()) && lines[8].starts_with(&f.jpeg.display().to_string()));
    let summary = lines[9];
    assert!(summary.starts_with("token accuracy ") && summary.contains("exact match") && summary.contains("greedy, max length 32"), "{summary}");
    assert!(lines[10].starts_with("word F1 ") && lines[10].contains("chance"), "{}", lines[10]);

    let mut json_args = args.clone();
    json_args.push(OsStr::new("--json"));
    let report = json(&f.infer(&f.both(), &json_args));
    let captions = report["captioning"]["captions"].as_array().unwrap();
    assert_eq!(captions.len(), 7);
    // The summary is what the definition gives from the printed ids.
    let sep = f.blip.config().sep_token_id;
    let (mut matched, mut true_tokens, mut exact) = (0, 0, 0);
    for row in &captions[..5] {
        let generated = ids(&row["ids"]);
        assert!(!generated.is_empty() && generated.len() <= 31, "{row}");
        let body: Vec<i64> = generated.iter().copied().take_while(|&id| id != sep).collect();
        let truth = ids(&row["true_ids"]);
        assert!(!truth.is_empty() && row["true_caption"].as_str().is_some_and(|c| !c.is_empty()), "{row}");
        let m = body.iter().zip(&truth).filter(|(a, b)| a == b).count();
        assert_eq!(row["matched_tokens"].as_u64(), Some(m as u64), "{row}");
        matched += m;
        true_tokens += truth.len();
        exact += usize::from(body == truth);
    }
    let accuracy = &report["captioning"]["accuracy"];
    assert_eq!(accuracy["captions"].as_u64(), Some(5));
    assert_eq!(accuracy["matched_tokens"].as_u64(), Some(matched as u64));
    assert_eq!(accuracy["true_tokens"].as_u64(), Some(true_tokens as u64));
    assert_eq!(accuracy["exact_matches"].as_u64(), Some(exact as u64));
    let token_accuracy = report["captioning"]["token_accuracy"].as_f64().unwrap();
    assert!((token_accuracy - matched as f64 / true_tokens as f64).abs() < 1e-12);
    assert!(summary.contains(&format!("({matched}/{true_tokens} true tokens)")), "{summary}");
    // The files' captions are the model's greedy captions of the held-out transform of the files.
    for (row, path) in captions[5..].iter().zip([&f.png, &f.jpeg]) {
        let expected = generate_captions(&f.blip, &f.image(path), &CaptionOptions { max_length: 32, min_length: 0, num_beams: 1 });
        assert_eq!(ids(&row["ids"]), expected[0], "{row}");
        assert!(row["true_caption"].is_null(), "{row}");
    }

    // Beam search: three beams, bounded lengths.
    let beam_args: Vec<&OsStr> = vec![
        OsStr::new("--task"),
        OsStr::new("caption"),
        OsStr::new("--image"),
        f.png.as_os_str(),
        OsStr::new("--beams"),
        OsStr::new("3"),
        OsStr::new("--max-length"),
        OsStr::new("8"),
        OsStr::new("--min-length"),
        OsStr::new("4"),
        OsStr::new("--json"),
    ];
    let report = json(&f.infer(&[&f.captioning], &beam_args));
    let row = &report["captioning"]["captions"][0];
    let expected = generate_captions(&f.blip, &f.image(&f.png), &CaptionOptions { max_length: 8, min_length: 4, num_beams: 3 });
    assert_eq!(ids(&row["ids"]), expected[0], "{row}");
    assert_eq!(report["captioning"]["decoding"], serde_json::json!({"beams": 3, "max_length": 8, "min_length": 4}));
}

#[test]
fn itm_and_itc_scores_match_the_model() {
    let f = fixture();
    let texts = ["a red circle in the top left", "a small blue square"];
    let mut args: Vec<&OsStr> = vec![OsStr::new("--image"), f.png.as_os_str(), OsStr::new("--image"), f.jpeg.as_os_str()];
    for t in &texts {
        args.extend([OsStr::new("--text"), OsStr::new(*t)]);
    }
    for task in ["itm", "itc"] {
        let mut task_args = vec![OsStr::new("--task"), OsStr::new(task)];
        task_args.extend(args.iter().copied());
        let out = f.infer(&f.both(), &task_args);
        assert!(out.status.success(), "braid infer --task {task} failed:\n{}", out.text());
        println!("{}", out.stdout);
        let what = if task == "itm" { "ITM match probability" } else { "ITC cosine similarity" };
        assert!(out.stdout.contains(what) && out.stdout.contains("BlipForImageTextRetrieval"), "{}", out.text());
        assert!(out.stdout.contains(&format!("t2: {}", texts[1])), "{}", out.text());

        task_args.push(OsStr::new("--json"));
        let report = json(&f.infer(&f.both(), &task_args));
        let scores = report["scoring"]["scores"].as_array().unwrap();
        assert_eq!(scores.len(), 2);
        for (i, path) in [&f.png, &f.jpeg].into_iter().enumerate() {
            let image = f.image(path);
            for (j, text) in texts.iter().enumerate() {
                let (ids, mask) = f.text(text);
                let m = &f.blip;
                let expected = tch::no_grad(|| {
                    let states = m.encode_image(&image);
                    if task == "itm" {
                        let enc = Tensor::full([1, 1], m.config().enc_token_id, (Kind::Int64, Device::Cpu));
                        let ids = Tensor::cat(&[enc, ids.narrow(1, 1, 31)], 1);
                        m.itm_logits(&m.encode_multimodal(&ids, &mask, &states)).softmax(-1, Kind::Float).double_value(&[0, 1])
                    } else {
                        let text = m.text_feature(&m.encode_text(&ids, &mask));
                        m.image_feature(&states).matmul(&text.transpose(0, 1)).double_value(&[0, 0])
                    }
                });
                let got = scores[i][j].as_f64().unwrap();
                assert!((got - expected).abs() < 1e-5, "{task} image {i} text {j}: braid infer {got}, in-process {expected}");
            }
        }
    }

    // Held-out images against their own and each other's captions: the top match is reported.
    let manifest = f.data.eval_manifest();
    let out = f.infer(
        &[&f.retrieval],
        &[OsStr::new("--task"), OsStr::new("itc"), OsStr::new("--data"), manifest.as_os_str(), OsStr::new("--limit"), OsStr::new("12")],
    );
    assert!(out.status.success(), "{}", out.text());
    println!("{}", out.stdout);
    assert!(out.stdout.contains("best of 12 texts per image") && out.stdout.contains("own caption"), "{}", out.text());
    let last = out.stdout.lines().last().unwrap();
    assert!(last.starts_with("best text is the image's own caption: ") && last.contains("/12 images; chance"), "{last}");
}

#[test]
fn a_trained_blip_checkpoint_captions_and_scores() {
    let f = fixture();
    let dir = f.data.dir.parent().unwrap().to_path_buf();
    let root = dir.join("checkpoints");
    let job_file = JobFile {
        family: "blip".into(),
        tokenizer: f.tokenizer.clone(),
        eval: Some(f.data.eval_manifest()),
        checkpoint: Some(root.clone()),
        global_batch: 8,
        steps: 3,
        warmup_steps: 1,
        ..JobFile::new("blip-infer", &f.data)
    };
    let job = job_file.write(&dir.join("job.toml"));
    let run = braid_run(&job, 1, &dir.join("logs"), Duration::from_secs(180));
    assert!(run.status.success(), "training the tiny BLIP failed:\n{}", run.text());

    // With no --image or --data, the job's held-out set: --limit samples with their captions.
    let out = braid([OsStr::new("infer"), OsStr::new("--job"), job.as_os_str(), OsStr::new("--task"), OsStr::new("caption"), OsStr::new("--limit"), OsStr::new("4")], TIMEOUT);
    assert!(out.status.success(), "braid infer --job failed:\n{}", out.text());
    println!("{}", out.stdout);
    assert!(out.stdout.starts_with("blip tiny from step 2 of job blip-infer"), "{}", out.text());
    assert_eq!(out.stdout.lines().count(), 1 + 1 + 4 + 2, "{}", out.text());
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[6].starts_with("token accuracy ") && lines[7].starts_with("word F1 "), "{}", out.text());

    // The caption of a file and its ITM scores are those of the checkpoint's model.
    let config = braid_coordinator::config::JobConfig::load(&job).unwrap();
    let tokenizer = HfTokenizer::from_file(&f.tokenizer).unwrap();
    let (trainer, step) = braid::eval::load_checkpoint(&config, &tokenizer, None, Device::Cpu).unwrap();
    assert_eq!(step, 2);
    let model = &trainer.blip().expect("a BLIP job").model;
    let image = f.image(&f.png);
    let expected = generate_captions(model, &image, &CaptionOptions { max_length: 32, min_length: 0, num_beams: 1 });
    let infer = |task: &str, extra: &[&OsStr]| {
        let mut args = vec![OsStr::new("infer"), OsStr::new("--job"), job.as_os_str(), OsStr::new("--task"), OsStr::new(task)];
        args.extend([OsStr::new("--image"), f.png.as_os_str(), OsStr::new("--json")]);
        args.extend(extra);
        json(&braid(args, TIMEOUT))
    };
    let report = infer("caption", &[]);
    assert_eq!(ids(&report["captioning"]["captions"][0]["ids"]), expected[0]);
    let text = "a small red circle on the left";
    let report = infer("itm", &[OsStr::new("--text"), OsStr::new(text)]);
    let (ids, mask) = f.text(text);
    let expected = tch::no_grad(|| {
        let ids = braid::trainer::blip::with_first_token(&ids, model.config().enc_token_id);
        model.itm_logits(&model.encode_multimodal(&ids, &mask, &model.encode_image(&image))).softmax(-1, Kind::Float).double_value(&[0, 1])
    });
    let got = report["scoring"]["scores"][0][0].as_f64().unwrap();
    assert!((got - expected).abs() < 1e-5, "braid infer {got}, in-process {expected}");
}

/// Saves tiny random `BlipForConditionalGeneration` and `BlipForImageTextRetrieval` models in the
/// shape of braid's `tiny` preset with `save_pretrained` (`DIR/cap`, `DIR/ret`), writes a 32x32
/// image `DIR/image.png` (the held-out transform leaves its pixels as they are) and prints, as
/// JSON, transformers' captions (greedy and 3 beams) and ITM and ITC scores of the image with
/// `TEXTS`. Arguments: DIR, the tokenizer.json.
const TRANSFORMERS_REFERENCE: &str = r#"
import json, sys
import numpy as np
import torch
from PIL import Image
from transformers import (BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval,
                          BlipImageProcessor, PreTrainedTokenizerFast)

out, tokenizer_file = sys.argv[1], sys.argv[2]
TEXTS = ["a red circle in the top left", "small blue cross, top"]
tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file)
ids = {t: tok.convert_tokens_to_ids(t) for t in ["[PAD]", "[SEP]", "[DEC]", "[ENC]"]}
config = BlipConfig(
    vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8, layer_norm_eps=1e-5),
    text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, encoder_hidden_size=64,
                     pad_token_id=ids["[PAD]"], bos_token_id=ids["[DEC]"], sep_token_id=ids["[SEP]"],
                     eos_token_id=ids["[SEP]"]),
    projection_dim=64, image_text_hidden_size=64)
torch.manual_seed(0)
models = {}
for name, cls in [("cap", BlipForConditionalGeneration), ("ret", BlipForImageTextRetrieval)]:
    model = cls(config).eval()
    with torch.no_grad():  # wider than the 0.02 initialisation, so that captions are not just [SEP]
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.125)
    model.save_pretrained(f"{out}/{name}")
    models[name] = model
pixels = np.random.RandomState(0).randint(0, 256, (32, 32, 3)).astype(np.uint8)
Image.fromarray(pixels).save(f"{out}/image.png")
processor = BlipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.48145466, 0.4578275, 0.40821073],
                               image_std=[0.26862954, 0.26130258, 0.27577711])
pixel_values = processor(Image.open(f"{out}/image.png").convert("RGB"), return_tensors="pt").pixel_values
result = {}
with torch.no_grad():
    for beams in [1, 3]:
        generated = models["cap"].generate(pixel_values=pixel_values, num_beams=beams, max_length=12, min_length=4)
        result[f"caption_{beams}"] = generated[0].tolist()
    text = tok(TEXTS, padding="max_length", max_length=32, return_tensors="pt")
    itm_ids = text.input_ids.clone()
    itm_ids[:, 0] = ids["[ENC]"]
    images = pixel_values.repeat(len(TEXTS), 1, 1, 1)
    itm = models["ret"](input_ids=itm_ids, attention_mask=text.attention_mask, pixel_values=images, use_itm_head=True)
    result["itm"] = itm.itm_score.softmax(-1)[:, 1].tolist()
    itc = models["ret"](input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=images, use_itm_head=False)
    result["itc"] = itc.itm_score[0].tolist()
print(json.dumps(result))
"#;

#[test]
fn transformers_save_pretrained_weights_give_transformers_captions_and_scores() {
    let f = fixture();
    let dir = f.data.dir.parent().unwrap().join("transformers");
    std::fs::create_dir_all(&dir).unwrap();
    let expected: Value = serde_json::from_str(&python(&["-c", TRANSFORMERS_REFERENCE, dir.to_str().unwrap(), f.tokenizer.to_str().unwrap()])).unwrap();
    let (captioning, retrieval, image) = (dir.join("cap/model.safetensors"), dir.join("ret/model.safetensors"), dir.join("image.png"));
    let texts = ["a red circle in the top left", "small blue cross, top"];
    for beams in ["1", "3"] {
        let args = [
            OsStr::new("--task"),
            OsStr::new("caption"),
            OsStr::new("--image"),
            image.as_os_str(),
            OsStr::new("--beams"),
            OsStr::new(beams),
            OsStr::new("--max-length"),
            OsStr::new("12"),
            OsStr::new("--min-length"),
            OsStr::new("4"),
            OsStr::new("--json"),
        ];
        // Both files given: the captioning one is recognised by its keys.
        let report = json(&f.infer(&[&retrieval, &captioning], &args));
        // transformers returns [DEC] first, braid the ids after it.
        let mut got = vec![f.blip.config().bos_token_id];
        got.extend(ids(&report["captioning"]["captions"][0]["ids"]));
        assert_eq!(got, ids(&expected[format!("caption_{beams}")]), "{beams} beam(s)");
    }
    for task in ["itm", "itc"] {
        let mut args = vec![OsStr::new("--task"), OsStr::new(task), OsStr::new("--image"), image.as_os_str(), OsStr::new("--json")];
        for t in &texts {
            args.extend([OsStr::new("--text"), OsStr::new(*t)]);
        }
        let report = json(&f.infer(&[&captioning, &retrieval], &args));
        let got = report["scoring"]["scores"][0].as_array().unwrap();
        let want = expected[task].as_array().unwrap();
        for (g, w) in got.iter().zip(want) {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!((g - w).abs() < 1e-5, "{task}: braid infer {g}, transformers {w}");
        }
    }
}

#[test]
fn albef_reference_weights_score_itc_but_not_captions() {
    let f = fixture();
    let hf = HfTokenizer::from_file(&f.tokenizer).unwrap();
    let config = AlbefConfig::preset("tiny", hf.vocab_size() as i64, 0, None).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let _albef = Albef::new(&vs.root(), config);
    let params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    let file = f.data.dir.join("albef.safetensors");
    std::fs::write(&file, braid::checkpoint::to_safetensors(&export_torchmultimodal(&params, None, &config)).unwrap()).unwrap();
    let run = |task: &str| {
        braid(
            [
                OsStr::new("infer"),
                OsStr::new("--task"),
                OsStr::new(task),
                OsStr::new("--weights"),
                file.as_os_str(),
                OsStr::new("--family"),
                OsStr::new("albef"),
                OsStr::new("--preset"),
                OsStr::new("tiny"),
                OsStr::new("--tokenizer"),
                f.tokenizer.as_os_str(),
                OsStr::new("--image"),
                f.png.as_os_str(),
                OsStr::new("--text"),
                OsStr::new("a red circle"),
            ],
            TIMEOUT,
        )
    };
    let out = run("itc");
    assert!(out.status.success(), "{}", out.text());
    assert!(out.stdout.starts_with("albef tiny from ") && out.stdout.contains("ITC cosine similarity"), "{}", out.text());
    let out = run("caption");
    assert!(!out.status.success(), "ALBEF captioned:\n{}", out.text());
    assert!(out.stderr.contains("ALBEF has no decoder"), "{}", out.text());
    let out = run("itm");
    assert!(!out.status.success() && out.stderr.contains("has no ITM head"), "{}", out.text());
}

#[test]
fn bad_input_is_named() {
    let f = fixture();
    let missing = f.data.dir.join("no-such-image.png");
    let refuse = |out: BraidOutput, expected: &[&str]| {
        assert!(!out.status.success(), "braid infer accepted bad input:\n{}", out.text());
        assert_eq!(out.status.code(), Some(1), "{}", out.text());
        for e in expected {
            assert!(out.stderr.contains(e), "stderr does not say {e:?}:\n{}", out.text());
        }
    };
    let task = |t: &'static str| [OsStr::new("--task"), OsStr::new(t)];
    let image = |p: &Path| [OsStr::new("--image"), p.as_os_str().to_owned().leak() as &OsStr];

    // A missing image file is named before any model loads.
    refuse(f.infer(&f.both(), &[task("caption"), image(&missing)].concat()), &["no-such-image.png", "no such file"]);
    // Captioning without the captioning state dict.
    refuse(
        f.infer(&[&f.retrieval], &[task("caption"), image(&f.png)].concat()),
        &["--task caption needs captioning weights", "BlipForImageTextRetrieval"],
    );
    // Scoring without the retrieval state dict.
    refuse(
        f.infer(&[&f.captioning], &[&task("itm")[..], &image(&f.png), &[OsStr::new("--text"), OsStr::new("x")]].concat()),
        &["--task itm needs retrieval weights"],
    );
    // A weights file that is not there.
    let nowhere = f.data.dir.join("nowhere.safetensors");
    refuse(f.infer(&[&nowhere], &[task("caption"), image(&f.png)].concat()), &["nowhere.safetensors"]);
    // A captioning state dict with a key braid does not know.
    let mut tensors = braid::checkpoint::from_safetensors(&std::fs::read(&f.captioning).unwrap(), "captioning").unwrap();
    tensors.push(("text_decoder.bert.encoder.layer.9.output.dense.weight".into(), Tensor::zeros([2, 2], (Kind::Float, Device::Cpu))));
    let extra = f.data.dir.join("extra-key.safetensors");
    std::fs::write(&extra, braid::checkpoint::to_safetensors(&tensors).unwrap()).unwrap();
    refuse(
        f.infer(&[&extra], &[task("caption"), image(&f.png)].concat()),
        &["extra-key.safetensors", "unexpected keys", "layer.9.output.dense.weight"],
    );
    // A state dict of another model.
    let tokenizer_as_weights = f.data.dir.join("other.safetensors");
    let other = vec![("conv.weight".to_string(), Tensor::zeros([2], (Kind::Float, Device::Cpu)))];
    std::fs::write(&tokenizer_as_weights, braid::checkpoint::to_safetensors(&other).unwrap()).unwrap();
    refuse(f.infer(&[&tokenizer_as_weights], &[task("caption"), image(&f.png)].concat()), &["not a transformers BLIP state dict"]);
    // Every argument problem at once.
    refuse(
        f.infer(&f.both(), &[&task("caption")[..], &[OsStr::new("--text"), OsStr::new("x"), OsStr::new("--beams"), OsStr::new("0")]].concat()),
        &["no images", "--text is for --task itm and itc", "--beams is 0"],
    );
    // --max-length beyond the position embeddings.
    refuse(
        f.infer(&f.both(), &[&task("caption")[..], &image(&f.png), &[OsStr::new("--max-length"), OsStr::new("65")]].concat()),
        &["--max-length 65 exceeds the 64 position embeddings"],
    );
}
