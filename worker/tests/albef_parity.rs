//! braid's ALBEF against torchmultimodal's (`torchmultimodal-nightly`): the same tiny random
//! weights, written by torchmultimodal in Python and loaded here through
//! [`import_torchmultimodal`], must give within 1e-5 (fp32, eval mode):
//!
//! 1. `ALBEFModel`'s image, text and multimodal embeddings, online and momentum;
//! 2. `ALBEFModelWithSimilarity`'s similarities against a known queue, online and momentum, and
//!    `ImageTextContrastiveLoss(alpha=0.4)` computed by braid's `objectives::distill::local_loss`;
//! 3. the hard-negative sampling weights and the multimodal embeddings of the negatives
//!    torchmultimodal drew;
//! 4. ITM and MLM logits and losses, which torchmultimodal has no heads for: the script computes
//!    them with plain torch ops (and `transformers`' `BertLMPredictionHead`) on the reference's
//!    multimodal embeddings, with head weights it writes under braid's names;
//! 5. [`export_torchmultimodal`]'s output loads into a fresh torchmultimodal model
//!    (`load_state_dict(strict=False)` missing only the queue buffers) with every tensor equal to
//!    the original and the same outputs.
//!
//! The momentum weights are perturbed apart from the online ones, and the reference's momentum
//! is 1.0 so its in-forward momentum update leaves them as saved (braid's update rule is tested
//! in `momentum.rs`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use braid::models::albef::{export_torchmultimodal, import_torchmultimodal, Albef, AlbefConfig};
use braid::objectives::distill::{local_loss, MomentumKeys};
use braid::objectives::queue::FeatureQueue;
use tch::{nn, Device, Kind, Tensor};

/// Builds the tiny torchmultimodal ALBEF braid's `tiny` preset describes (vocabulary 99, padding
/// 0, 64 positions): the text encoder through `bert_text_encoder` with its default dropout (as
/// torchmultimodal's examples build it), off in eval mode.
const MODEL: &str = r#"
import sys
import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file, save_file
from torchmultimodal.models.albef.image_encoder import ALBEFVisionEncoder
from torchmultimodal.models.albef.model import ALBEFModel, ALBEFModelWithSimilarity
from torchmultimodal.models.albef.multimodal_encoder import ALBEFMultimodalEncoder
from torchmultimodal.modules.encoders.bert_text_encoder import bert_text_encoder
from torchmultimodal.modules.losses.albef import ImageTextContrastiveLoss

B, L, V, W, E, K, MASK, ALPHA = 4, 12, 99, 64, 64, 8, 98, 0.4


def albef():
    vision = ALBEFVisionEncoder(image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=4,
                                hidden_size=W, mlp_dim=4 * W, layer_norm_eps=1e-6)
    text = bert_text_encoder(hidden_size=W, num_hidden_layers=2, num_attention_heads=4, intermediate_size=4 * W,
                             vocab_size=V, max_position_embeddings=64, pad_token_id=0)
    fusion = ALBEFMultimodalEncoder(hidden_size=W, num_hidden_layers=2, num_attention_heads=4, intermediate_size=4 * W)
    model = ALBEFModel(vision, text, fusion, momentum=1.0)
    return ALBEFModelWithSimilarity(model, nn.Linear(W, E), nn.Linear(W, E), embed_size=E, queue_size=K, temp=0.07).eval()


out = sys.argv[1]
"#;

/// Perturbs every parameter (online and momentum apart), sets the queues, and writes
/// `albef.safetensors` (the state dict), `heads.safetensors` (braid's ITM and MLM heads under
/// braid's names; `mlm_head_m.*` for the momentum MLM head), `inputs.safetensors` (with the
/// negatives torchmultimodal drew) and `outputs.safetensors`.
const REFERENCE: &str = r#"
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLMPredictionHead

torch.manual_seed(0)
model = albef()
with torch.no_grad():
    for name, p in model.named_parameters():
        if name == "temp":
            p.fill_(0.09)
        elif p.dim() == 1 and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        else:
            p.copy_(0.1 * torch.randn_like(p))
    model.image_queue.copy_(F.normalize(torch.randn(E, K), dim=0))
    model.text_queue.copy_(F.normalize(torch.randn(E, K), dim=0))

# braid's heads: an ITM head and an MLM head (online and momentum) whose decoders are the
# online and momentum word embeddings.
head_config = BertConfig(vocab_size=V, hidden_size=W, hidden_act="gelu", layer_norm_eps=1e-12)
itm_head = nn.Linear(W, 2)
mlm_head, mlm_head_m = BertLMPredictionHead(head_config), BertLMPredictionHead(head_config)
heads = {}
with torch.no_grad():
    for prefix, module in [("itm_head.", itm_head), ("mlm_head.", mlm_head), ("mlm_head_m.", mlm_head_m)]:
        for name, p in module.named_parameters():
            if name.startswith("decoder."):
                continue
            p.copy_((1.0 if name.endswith("LayerNorm.weight") else 0.0) + 0.1 * torch.randn_like(p))
            heads[prefix + name] = p.detach().clone()
    for head, encoder in [(mlm_head, model.albef_model.text_encoder), (mlm_head_m, model.albef_model.text_encoder_m)]:
        head.decoder.weight = encoder.embeddings.word_embeddings.weight
        head.decoder.bias = head.bias
save_file(heads, f"{out}/heads.safetensors")
save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, f"{out}/albef.safetensors")

lengths = torch.tensor([L, 9, 5, 7])
mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
input_ids = torch.randint(1, MASK, (B, L)) * mask
images = torch.randn(B, 3, 32, 32)
idx = torch.arange(B)
# MLM: about a third of the real tokens after [CLS] masked, the last of each caption always.
chosen = (torch.rand(B, L) < 0.3) & (mask == 1)
chosen[:, 0] = False
chosen[torch.arange(B), lengths - 1] = True
masked_ids = input_ids.masked_fill(chosen, MASK)
labels = input_ids.masked_fill(~chosen, -100)
outputs = {}

with torch.no_grad():
    o = model.albef_model(images, input_ids, mask)
    for name in ["image_embeddings", "text_embeddings", "multimodal_embeddings"]:
        outputs[name] = getattr(o, name)
        outputs[name + "_m"] = getattr(o, name + "_m")

    drawn = []
    multinomial = torch.multinomial

    def recording_multinomial(weights, n, *args, **kwargs):
        result = multinomial(weights, n, *args, **kwargs)
        drawn.append(int(result.item()))
        return result

    torch.multinomial = recording_multinomial
    r = model(images, input_ids, mask, idx)
    torch.multinomial = multinomial
    assert len(drawn) == 2 * B, drawn
    assert torch.equal(r.sim_targets, torch.eye(B, B + K)), "unique ids give one-hot targets"
    s = r.similarity
    for name in ["sim_i2t", "sim_t2i", "sim_i2t_m", "sim_t2i_m"]:
        outputs[name] = getattr(s, name)
    outputs["itc_loss"] = ImageTextContrastiveLoss()(s.sim_i2t, s.sim_t2i, s.sim_i2t_m, s.sim_t2i_m, r.sim_targets, alpha=ALPHA)
    # The hard-negative sampling weights, as `_neg_embeddings` computes them.
    for direction in ["i2t", "t2i"]:
        outputs["weights_" + direction] = F.softmax(getattr(s, "sim_" + direction)[:, :B], dim=1).fill_diagonal_(0)
    outputs["multimodal_embeddings_neg"] = r.multimodal_embeddings_neg

    itm_in = torch.cat([r.multimodal_embeddings[:, 0], r.multimodal_embeddings_neg[:, 0]])
    outputs["itm_logits"] = itm_head(itm_in)
    itm_labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)])
    outputs["itm_loss"] = F.cross_entropy(outputs["itm_logits"], itm_labels)

    m = model.albef_model(images, masked_ids, mask)
    logits, logits_m = mlm_head(m.multimodal_embeddings), mlm_head_m(m.multimodal_embeddings_m)
    outputs["mlm_logits"], outputs["mlm_logits_m"] = logits, logits_m
    ce = F.cross_entropy(logits.view(-1, V), labels.view(-1))
    distill = -(F.softmax(logits_m, dim=-1) * F.log_softmax(logits, dim=-1)).sum(-1)[labels != -100].mean()
    outputs["mlm_loss"] = (1 - ALPHA) * ce + ALPHA * distill

save_file({"images": images, "input_ids": input_ids, "attention_mask": mask, "masked_ids": masked_ids,
           "labels": labels, "negatives_image": torch.tensor(drawn[:B]), "negatives_text": torch.tensor(drawn[B:])},
          f"{out}/inputs.safetensors")
save_file({k: v.contiguous() for k, v in outputs.items()}, f"{out}/outputs.safetensors")
"#;

/// Loads braid's `exported.safetensors` into a fresh model and checks it against the reference
/// run in the same folder: only the queue buffers missing, nothing unexpected, every tensor
/// equal, the same `ALBEFModel` outputs. Prints the largest output difference.
const EXPORT_CHECK: &str = r#"
model = albef()
reference = load_file(f"{out}/albef.safetensors")
missing, unexpected = model.load_state_dict(load_file(f"{out}/exported.safetensors"), strict=False)
assert not unexpected, f"unexpected keys {unexpected}"
assert set(missing) <= {"image_queue", "text_queue", "idx_queue", "queue_ptr"}, f"missing keys {missing}"
for name, t in model.state_dict().items():
    if name not in missing:
        assert torch.equal(t, reference[name]), name
inputs, outputs = load_file(f"{out}/inputs.safetensors"), load_file(f"{out}/outputs.safetensors")
with torch.no_grad():
    o = model.albef_model(inputs["images"], inputs["input_ids"], inputs["attention_mask"])
diff = max((getattr(o, name) - outputs[name]).abs().max().item()
           for name in ["image_embeddings", "text_embeddings", "multimodal_embeddings",
                        "image_embeddings_m", "text_embeddings_m", "multimodal_embeddings_m"])
assert diff == 0.0, diff
print(f"export round trip: {len(model.state_dict()) - len(missing)} tensors loaded, max abs difference {diff:.3e}")
"#;

const TOLERANCE: f64 = 1e-5;
const BATCH: i64 = 4;
const VOCAB: i64 = 99;
const ALPHA: f64 = 0.4;

/// Runs `script` (after [`MODEL`]) with the venv's Python on `dir`; returns its stdout.
fn python(script: &str, dir: &Path) -> String {
    let path = dir.join("albef_script.py");
    std::fs::write(&path, format!("{MODEL}{script}")).unwrap();
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let out = Command::new(&python).arg(&path).arg(dir).output().expect("run the venv's python");
    assert!(out.status.success(), "python script failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The reference run's folder and its tensors.
struct Reference {
    dir: tempfile::TempDir,
    inputs: HashMap<String, Tensor>,
    outputs: HashMap<String, Tensor>,
}

impl Reference {
    fn run() -> Self {
        let dir = tempfile::tempdir().unwrap();
        python(REFERENCE, dir.path());
        let (inputs, outputs) = (read(&dir.path().join("inputs.safetensors")), read(&dir.path().join("outputs.safetensors")));
        Self { dir, inputs, outputs }
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
        assert!(diff < TOLERANCE, "{name}: max abs difference {diff:e} from the reference");
        diff
    }
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

fn tiny() -> AlbefConfig {
    AlbefConfig::preset("tiny", VOCAB, 0, None).unwrap()
}

/// A model whose parameters are `tensors` (braid names); every parameter must be given unless
/// `partial` allows leaving it at its initialisation.
fn model_with(tensors: &[(String, Tensor)], partial: impl Fn(&str) -> bool) -> (nn::VarStore, Albef) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = Albef::new(&vs.root(), tiny());
    let given: HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            match given.get(name.as_str()) {
                Some(t) => {
                    var.copy_(t);
                }
                None => assert!(partial(&name), "no tensor for {name}"),
            }
        }
    });
    assert!(given.keys().all(|n| vs.variables().contains_key(*n)), "tensors without a parameter");
    vs.freeze();
    (vs, model)
}

/// The heads' tensors of `heads.safetensors` under `prefix`, renamed to `mlm_head.*`/`itm_head.*`.
fn heads(all: &HashMap<String, Tensor>, prefix: &str, rename: &str) -> Vec<(String, Tensor)> {
    all.iter()
        .filter_map(|(k, t)| k.strip_prefix(prefix).map(|rest| (format!("{rename}{rest}"), t.shallow_clone())))
        .collect()
}

/// `softmax(sim[:, :B])` with the diagonal zeroed: the hard-negative sampling weights.
fn negative_weights(sim: &Tensor) -> Tensor {
    let w = sim.narrow(1, 0, BATCH).softmax(1, Kind::Float);
    w * (Tensor::ones([BATCH, BATCH], (Kind::Float, Device::Cpu)) - Tensor::eye(BATCH, (Kind::Float, Device::Cpu)))
}

#[test]
fn albef_matches_torchmultimodal() {
    let r = Reference::run();
    let state: Vec<(String, Tensor)> = read(&r.dir.path().join("albef.safetensors")).into_iter().collect();
    let config = tiny();
    let (online, momentum) = import_torchmultimodal(&state, &config).expect("torchmultimodal's state dict imports");
    let head_tensors = read(&r.dir.path().join("heads.safetensors"));
    let shallow = |list: &[(String, Tensor)]| list.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect::<Vec<_>>();
    let mut online_all = shallow(&online);
    online_all.extend(heads(&head_tensors, "itm_head.", "itm_head."));
    online_all.extend(heads(&head_tensors, "mlm_head.", "mlm_head."));
    let mut momentum_all = shallow(&momentum);
    momentum_all.extend(heads(&head_tensors, "mlm_head_m.", "mlm_head."));
    let (_vs, model) = model_with(&online_all, |_| false);
    let (_vs_m, model_m) = model_with(&momentum_all, |name| !Albef::has_momentum(name));

    let (images, ids, mask) = (r.input("images"), r.input("input_ids"), r.input("attention_mask"));
    let mut diffs = Vec::new();
    tch::no_grad(|| {
        // 1. ALBEFModel: every image token, text encoder, fusion encoder; online and momentum.
        let image = model.encode_image(images);
        let text = model.encode_text(ids, mask);
        let fused = model.fuse(&text, mask, &image);
        let image_m = model_m.encode_image(images);
        let text_m = model_m.encode_text(ids, mask);
        diffs.push(r.check("image_embeddings", &image));
        diffs.push(r.check("text_embeddings", &text));
        diffs.push(r.check("multimodal_embeddings", &fused));
        diffs.push(r.check("image_embeddings_m", &image_m));
        diffs.push(r.check("text_embeddings_m", &text_m));
        diffs.push(r.check("multimodal_embeddings_m", &model_m.fuse(&text_m, mask, &image_m)));

        // 2. Similarities against the batch's momentum features and the queues (braid's
        // layout [K, D], the transpose of torchmultimodal's), and the distilled ITC loss.
        let (image_feat, text_feat) = (model.image_feature(&image), model.text_feature(&text));
        let (image_feat_m, text_feat_m) = (model_m.image_feature(&image_m), model_m.text_feature(&text_m));
        let queue = |key: &str| {
            let features = state.iter().find(|(k, _)| k == key).unwrap().1.transpose(0, 1).contiguous();
            let valid = Tensor::ones([features.size()[0]], (Kind::Bool, Device::Cpu));
            FeatureQueue { features, valid, pointer: 0 }
        };
        let (image_queue, text_queue) = (queue("image_queue"), queue("text_queue"));
        let temp = &model.heads.temp;
        let text_all = Tensor::cat(&[&text_feat_m, &text_queue.features], 0);
        let image_all = Tensor::cat(&[&image_feat_m, &image_queue.features], 0);
        let sim_i2t = image_feat.matmul(&text_all.transpose(0, 1)) / temp;
        let sim_t2i = text_feat.matmul(&image_all.transpose(0, 1)) / temp;
        diffs.push(r.check("sim_i2t", &sim_i2t));
        diffs.push(r.check("sim_t2i", &sim_t2i));
        diffs.push(r.check("sim_i2t_m", &(image_feat_m.matmul(&text_all.transpose(0, 1)) / temp)));
        diffs.push(r.check("sim_t2i_m", &(text_feat_m.matmul(&image_all.transpose(0, 1)) / temp)));
        let valid = Tensor::ones([BATCH], (Kind::Bool, Device::Cpu));
        let keys = MomentumKeys {
            image_all: &image_feat_m,
            text_all: &text_feat_m,
            valid_all: &valid,
            image_queue: &image_queue,
            text_queue: &text_queue,
        };
        diffs.push(r.check("itc_loss", &local_loss(&image_feat, &text_feat, 0..BATCH, &keys, temp, ALPHA)));

        // 3. Hard negatives: the sampling weights, and the fusion of each text with the image
        // torchmultimodal drew for it and of each image with the text drawn for it.
        diffs.push(r.check("weights_i2t", &negative_weights(&sim_i2t)));
        diffs.push(r.check("weights_t2i", &negative_weights(&sim_t2i)));
        let (neg_image, neg_text) = (r.input("negatives_image"), r.input("negatives_text"));
        let fused_neg = model.fuse(
            &Tensor::cat(&[&text, &text.index_select(0, neg_text)], 0),
            &Tensor::cat(&[mask, &mask.index_select(0, neg_text)], 0),
            &Tensor::cat(&[&image.index_select(0, neg_image), &image], 0),
        );
        diffs.push(r.check("multimodal_embeddings_neg", &fused_neg));

        // 4. ITM over the B positive and 2B negative pairs; distilled MLM on the masked caption.
        let itm_logits = model.itm_logits(&Tensor::cat(&[&fused, &fused_neg], 0));
        diffs.push(r.check("itm_logits", &itm_logits));
        let itm_labels = Tensor::cat(
            &[Tensor::ones([BATCH], (Kind::Int64, Device::Cpu)), Tensor::zeros([2 * BATCH], (Kind::Int64, Device::Cpu))],
            0,
        );
        diffs.push(r.check("itm_loss", &itm_logits.log_softmax(1, Kind::Float).nll_loss(&itm_labels)));
        let masked = r.input("masked_ids");
        let logits = model.mlm_logits(&model.fuse(&model.encode_text(masked, mask), mask, &image));
        let text_masked_m = model_m.encode_text(masked, mask);
        let logits_m = model_m.mlm_logits(&model_m.fuse(&text_masked_m, mask, &image_m));
        diffs.push(r.check("mlm_logits", &logits));
        diffs.push(r.check("mlm_logits_m", &logits_m));
        let labels = r.input("labels").view([-1]);
        let chosen = labels.ne(-100);
        let log_p = logits.view([-1, VOCAB]).log_softmax(1, Kind::Float).index(&[Some(&chosen)]);
        let targets = labels.index(&[Some(&chosen)]);
        let ce = log_p.nll_loss(&targets);
        let soft = logits_m.view([-1, VOCAB]).softmax(1, Kind::Float).index(&[Some(&chosen)]);
        let distill = -(soft * &log_p).sum_dim_intlist([1i64].as_slice(), false, Kind::Float).mean(Kind::Float);
        diffs.push(r.check("mlm_loss", &(ce * (1.0 - ALPHA) + distill * ALPHA)));
    });
    assert_eq!(diffs.len(), r.outputs.len(), "every reference output is compared");
    let gap = (&r.outputs["mlm_logits"] - &r.outputs["mlm_logits_m"]).abs().max().double_value(&[]);
    assert!(gap > 1e-2, "online and momentum models differ by only {gap:e}: the momentum case tests nothing");

    // 5. Export: braid's tensors back under torchmultimodal's names, loaded by torchmultimodal.
    let exported = export_torchmultimodal(&online_all, Some(&momentum_all), &config);
    let (back, back_m) = import_torchmultimodal(&exported, &config).unwrap();
    for (list, original) in [(&back, &online), (&back_m, &momentum)] {
        assert_eq!(list.len(), original.len());
        for ((name, t), (original_name, o)) in list.iter().zip(original.iter()) {
            assert_eq!(name, original_name);
            assert!(t.equal(o), "{name} changed in import(export(x))");
        }
    }
    let exported: Vec<(String, Tensor)> = exported.into_iter().map(|(k, t)| (k, t.contiguous())).collect();
    Tensor::write_safetensors(&exported, r.dir.path().join("exported.safetensors")).unwrap();
    print!("{}", python(EXPORT_CHECK, r.dir.path()));
}
