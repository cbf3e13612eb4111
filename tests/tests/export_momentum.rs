//! `braid export` for ALBEF and BLIP: a trained checkpoint written in torchmultimodal's ALBEF
//! layout loads into `ALBEFModelWithSimilarity` with nothing unexpected and only its queue
//! buffers missing, every tensor equal; a BLIP checkpoint written in transformers' layouts
//! captions through `braid infer --weights` exactly as the checkpoint does through `--job`.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use braid_tests::{braid, braid_run, python, synth_data, JobFile};

const TIMEOUT: Duration = Duration::from_secs(300);

/// Trains `family` for 3 steps with a checkpoint; returns the job file.
fn trained(family: &str, dir: &Path) -> std::path::PathBuf {
    let data = synth_data(&dir.join("data"), 64, 16, 32);
    let job = JobFile {
        family: family.into(),
        tokenizer: data.dir.join("tokenizer-bert.json"),
        eval: Some(data.eval_manifest()),
        checkpoint: Some(dir.join("checkpoints")),
        global_batch: 8,
        steps: 3,
        warmup_steps: 1,
        ..JobFile::new(&format!("{family}-export"), &data)
    }
    .write(&dir.join("job.toml"));
    let run = braid_run(&job, 1, &dir.join("logs"), TIMEOUT);
    assert!(run.status.success(), "training {family} failed:\n{}", run.text());
    job
}

fn export(job: &Path, format: &str, out: &Path) {
    let checkpoints = job.parent().unwrap().join("checkpoints");
    let args = [OsStr::new("export"), OsStr::new("--checkpoint"), checkpoints.as_os_str(), OsStr::new("--format"), OsStr::new(format), OsStr::new("--job"), job.as_os_str(), OsStr::new("--out"), out.as_os_str()];
    let out = braid(args, TIMEOUT);
    assert!(out.status.success(), "braid export --format {format} failed:\n{}", out.text());
}

const LOAD_ALBEF: &str = r#"
import sys
import torch
from torch import nn
from safetensors.torch import load_file
from torchmultimodal.models.albef.image_encoder import ALBEFVisionEncoder
from torchmultimodal.models.albef.model import ALBEFModel, ALBEFModelWithSimilarity
from torchmultimodal.models.albef.multimodal_encoder import ALBEFMultimodalEncoder
from torchmultimodal.modules.encoders.bert_text_encoder import bert_text_encoder

sd = load_file(sys.argv[1])
W = E = 64
V = sd["albef_model.text_encoder.embeddings.word_embeddings.weight"].shape[0]
vision = ALBEFVisionEncoder(image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=4, hidden_size=W, mlp_dim=4 * W, layer_norm_eps=1e-6)
text = bert_text_encoder(hidden_size=W, num_hidden_layers=2, num_attention_heads=4, intermediate_size=4 * W, vocab_size=V, max_position_embeddings=64, pad_token_id=0)
fusion = ALBEFMultimodalEncoder(hidden_size=W, num_hidden_layers=2, num_attention_heads=4, intermediate_size=4 * W)
model = ALBEFModelWithSimilarity(ALBEFModel(vision, text, fusion), nn.Linear(W, E), nn.Linear(W, E), embed_size=E, queue_size=8, temp=0.07)
missing, unexpected = model.load_state_dict(sd, strict=False)
assert sorted(missing) == ["idx_queue", "image_queue", "queue_ptr", "text_queue"], missing
assert not unexpected, unexpected
state = model.state_dict()
assert all(torch.equal(state[k], v) for k, v in sd.items())
assert not torch.equal(state["albef_model.vision_encoder_m.encoder.conv_proj.weight"], state["albef_model.vision_encoder.encoder.conv_proj.weight"]), "momentum weights are their own"
print(len(sd))
"#;

#[test]
fn albef_exports_to_torchmultimodal() {
    let dir = tempfile::tempdir().unwrap();
    let job = trained("albef", dir.path());
    let file = dir.path().join("albef.safetensors");
    export(&job, "torchmultimodal", &file);
    let script = dir.path().join("load.py");
    std::fs::write(&script, LOAD_ALBEF).unwrap();
    let loaded = python(&[script.to_str().unwrap(), file.to_str().unwrap()]);
    println!("torchmultimodal loaded {} tensors", loaded.trim());

    let wrong = braid([OsStr::new("export"), OsStr::new("--checkpoint"), dir.path().join("checkpoints").as_os_str(), OsStr::new("--format"), OsStr::new("transformers"), OsStr::new("--job"), job.as_os_str(), OsStr::new("--out"), dir.path().join("x").as_os_str()], TIMEOUT);
    assert!(!wrong.status.success() && wrong.text().contains("does not fit the job's family albef"), "{}", wrong.text());
}

#[test]
fn blip_exports_to_transformers_and_captions_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let job = trained("blip", dir.path());
    let folder = dir.path().join("blip");
    export(&job, "transformers", &folder);
    let tokenizer = dir.path().join("data/tokenizer-bert.json");
    let manifest = dir.path().join("data/eval/manifest.json");
    let limit = ["--limit", "6", "--max-length", "12", "--task", "caption"];
    let from_job = braid([OsStr::new("infer"), OsStr::new("--job"), job.as_os_str()].into_iter().chain(limit.iter().map(OsStr::new)), TIMEOUT);
    let weights = folder.join("captioning.safetensors");
    let args = [OsStr::new("infer"), OsStr::new("--weights"), weights.as_os_str(), OsStr::new("--family"), OsStr::new("blip"), OsStr::new("--preset"), OsStr::new("tiny"), OsStr::new("--tokenizer"), tokenizer.as_os_str(), OsStr::new("--data"), manifest.as_os_str()];
    let from_weights = braid(args.into_iter().chain(limit.iter().map(OsStr::new)), TIMEOUT);
    assert!(from_job.status.success() && from_weights.status.success(), "{}\n{}", from_job.text(), from_weights.text());
    let table = |s: &str| s.lines().skip(1).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(table(&from_job.stdout), table(&from_weights.stdout), "the exported weights caption as the checkpoint does");
    assert!(folder.join("retrieval.safetensors").exists());
}
