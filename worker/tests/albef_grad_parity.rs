//! braid's ALBEF training step against an independent reference, gradient by gradient.
//!
//! A tiny fp64 ALBEF trainer (one rank) trains a few steps, so the queues hold enqueued momentum
//! features, and its momentum weights are then perturbed apart from the online ones, so the
//! distillation targets really differ from the online predictions. One more step's
//! [`Trainer::compute_gradients`] gives braid's gradient of the total loss `ITC + ITM + MLM`.
//! Everything that step used is written out: the online and momentum weights (as torchmultimodal
//! names them, through [`export_torchmultimodal`]), the queues before the step, the batch, the
//! masked captions and MLM labels, the hard negatives braid drew and the distillation weight.
//!
//! The Python reference loads them into torchmultimodal's `ALBEFModelWithSimilarity` (fp64,
//! eval mode: braid models no dropout; its `momentum = 1.0` leaves the saved momentum weights as
//! they are), replays braid's hard negatives through `torch.multinomial`, and computes the loss
//! of ALBEF's `Pretrain.py` from the paper's formulas: torchmultimodal's
//! `ImageTextContrastiveLoss` on its similarities against the queues (soft targets from the
//! momentum similarities, without autograd), the ITM cross-entropy over the `B` positive and `2B`
//! hard-negative pairs, and the distilled MLM of ALBEF's `BertForMaskedLM` (Hugging Face's
//! `BertLMPredictionHead` tied to the word embeddings; the momentum head's softmax as soft
//! labels), averaged over the predicted tokens. Its `backward()` gives the reference gradient of
//! every parameter, which [`import_torchmultimodal`] maps back to braid's names.
//!
//! Two places where torchmultimodal rounds to fp32 are kept in fp64 in the reference: the BERT
//! layers' `Fp32LayerNorm` and the `sim_targets` it builds with `.float()` (whose `1 - alpha`
//! would be rounded). Left as they are, they alone put differences of about `1e-7` relative into
//! the gradients.
//!
//! Every parameter's gradient must agree within `1e-9` of the largest gradient entry of its
//! tensor, plus `1e-12` of the largest gradient entry of the model (for tensors whose exact
//! gradient is zero, such as attention key biases, where both sides hold only rounding noise),
//! and the losses within `1e-12` relative. fp64 rounding over the step stays near `1e-15`
//! relative; a wrong detach, a wrong average or a missing path changes gradients at the percent
//! level, and even a distillation weight off by `1e-6` moves most gradients by `1e-6` relative.

// The shared test helpers; this test uses the batches, the ring of one and the reference comparison.
#[allow(dead_code)]
mod common;

use std::collections::HashMap;

use braid::data::mlm::{Masker, MaskingConfig, MaskingInputs, MaskingVocab, IGNORE_INDEX};
use braid::models::albef::{export_torchmultimodal, import_torchmultimodal, AlbefConfig};
use braid::trainer::{DeviceBatch, ModelSpec, Trainer};
use braid_coordinator::config::JobConfig;
use common::reference::{assert_rows_hold, checked_step, compare, largest_entry, read, run_python};
use common::{caption_batch, single_rank};
use tch::{Device, Kind, Tensor};

const BATCH: i64 = 8;
const CONTEXT: i64 = 10;
const VOCAB: i64 = 40;
/// Two global batches: after the warm-up steps it holds momentum features of earlier steps.
const QUEUE: i64 = 16;
/// Steps trained before the checked one, which is step `WARM_UP`: three quarters into the
/// 4-step ramp of the distillation weight (alpha 0.3 of 0.4).
const WARM_UP: u64 = 3;
const MLM_PROBABILITY: f64 = 0.3;
/// Tolerance relative to the largest gradient entry of each tensor.
const RELATIVE: f64 = 1e-9;
/// Tolerance relative to the largest gradient entry of the whole model.
const FLOOR: f64 = 1e-12;

/// Loads braid's tensors into torchmultimodal's ALBEF and the heads, recomputes the step's
/// loss with braid's inputs and negatives, and writes `grads.safetensors` (torchmultimodal's
/// names for its parameters, braid's for the heads) and `losses.safetensors`.
const REFERENCE: &str = r#"
import sys
import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file, save_file
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLMPredictionHead
from torchmultimodal.models.albef.image_encoder import ALBEFVisionEncoder
from torchmultimodal.models.albef.model import ALBEFModel, ALBEFModelWithSimilarity
from torchmultimodal.models.albef.multimodal_encoder import ALBEFMultimodalEncoder
from torchmultimodal.modules.encoders.bert_text_encoder import bert_text_encoder
from torchmultimodal.modules.layers.normalizations import Fp32LayerNorm
from torchmultimodal.modules.losses.albef import ImageTextContrastiveLoss

# The BERT layers' `Fp32LayerNorm` normalises in fp32 (for fp16 training): in this fp64 run it
# would round every text and fusion layer to fp32, so it normalises in the input's kind here.
Fp32LayerNorm.forward = nn.LayerNorm.forward

out = sys.argv[1]
state = load_file(f"{out}/albef.safetensors")
heads = load_file(f"{out}/heads.safetensors")
inputs = load_file(f"{out}/inputs.safetensors")
V, W = state["albef_model.text_encoder.embeddings.word_embeddings.weight"].shape
P = state["albef_model.text_encoder.embeddings.position_embeddings.weight"].shape[0]
E, K = state["image_queue"].shape
B = inputs["images"].shape[0]
alpha = inputs["alpha"].item()
torch.set_default_dtype(torch.float64)

vision = ALBEFVisionEncoder(image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=4,
                            hidden_size=W, mlp_dim=4 * W, layer_norm_eps=1e-6)
text = bert_text_encoder(hidden_size=W, num_hidden_layers=2, num_attention_heads=4, intermediate_size=4 * W,
                         vocab_size=V, max_position_embeddings=P, pad_token_id=0)
fusion = ALBEFMultimodalEncoder(hidden_size=W, num_hidden_layers=2, num_attention_heads=4, intermediate_size=4 * W)
# momentum 1.0: the momentum update inside forward keeps the saved momentum weights.
model = ALBEFModelWithSimilarity(ALBEFModel(vision, text, fusion, momentum=1.0), nn.Linear(W, E), nn.Linear(W, E),
                                 embed_size=E, queue_size=K, temp=0.07).double().eval()
missing, unexpected = model.load_state_dict(state, strict=False)
assert not unexpected and set(missing) <= {"idx_queue", "queue_ptr"}, (missing, unexpected)

head_config = BertConfig(vocab_size=V, hidden_size=W, hidden_act="gelu", layer_norm_eps=1e-12)
itm_head = nn.Linear(W, 2)
mlm_head, mlm_head_m = BertLMPredictionHead(head_config), BertLMPredictionHead(head_config)
head_params = {}
with torch.no_grad():
    for prefix, module in [("itm_head.", itm_head), ("mlm_head.", mlm_head), ("mlm_head_m.", mlm_head_m)]:
        for name, p in module.named_parameters():
            if not name.startswith("decoder."):
                p.copy_(heads[prefix + name])
                head_params[prefix + name] = p
    # The decoders are the word embeddings (tied, so MLM's gradient reaches them) and the bias.
    for head, encoder in [(mlm_head, model.albef_model.text_encoder), (mlm_head_m, model.albef_model.text_encoder_m)]:
        head.decoder.weight = encoder.embeddings.word_embeddings.weight
        head.decoder.bias = head.bias
mlm_head_m.requires_grad_(False)

images, ids, mask = inputs["images"], inputs["input_ids"], inputs["attention_mask"]
masked_ids, labels = inputs["masked_ids"], inputs["labels"]

# braid's hard negatives, replayed: `_neg_embeddings` draws each text's negative image, then
# each image's negative text, one multinomial call each.
drawn = inputs["negatives_image"].tolist() + inputs["negatives_text"].tolist()
calls = []
multinomial = torch.multinomial

def replay(weights, n, *args, **kwargs):
    column = drawn[len(calls)]
    assert weights[column] > 0, f"draw {len(calls)}: column {column} has weight 0 in {weights}"
    calls.append(column)
    return torch.tensor([column])

torch.multinomial = replay
r = model(images, ids, mask, torch.arange(B))
torch.multinomial = multinomial
assert len(calls) == 2 * B, calls
assert torch.equal(r.sim_targets.double(), torch.eye(B, B + K)), "unique ids give one-hot targets"

# ITC with momentum distillation against the queues (the soft targets carry no gradient).
# `sim_targets` comes out in fp32 (`.float()` of the id matches), which would round the one-hot
# weight `1 - alpha` to fp32.
s = r.similarity
itc = ImageTextContrastiveLoss()(s.sim_i2t, s.sim_t2i, s.sim_i2t_m, s.sim_t2i_m, r.sim_targets.double(), alpha=alpha)

# ITM: the B positive pairs, then the B texts with negative images and the B images with
# negative texts; cross-entropy averaged over the 3B pairs.
itm_logits = itm_head(torch.cat([r.multimodal_embeddings[:, 0], r.multimodal_embeddings_neg[:, 0]]))
itm = F.cross_entropy(itm_logits, torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]))

# MLM of the masked captions fused with the images, distilled from the momentum model's
# predictions, averaged over the predicted tokens.
m = model.albef_model(images, masked_ids, mask)
predicted = labels != -100
log_p = F.log_softmax(mlm_head(m.multimodal_embeddings)[predicted], dim=-1)
with torch.no_grad():
    soft = F.softmax(mlm_head_m(m.multimodal_embeddings_m)[predicted], dim=-1)
mlm = (1 - alpha) * F.nll_loss(log_p, labels[predicted]) + alpha * -(soft * log_p).sum(-1).mean()

loss = itc + itm + mlm
loss.backward()

grads = {}
for name, p in list(model.named_parameters()) + [(n, p) for n, p in head_params.items() if not n.startswith("mlm_head_m.")]:
    if p.requires_grad:
        grads[name] = (p.grad if p.grad is not None else torch.zeros_like(p)).contiguous()
save_file(grads, f"{out}/grads.safetensors")
save_file({k: v.detach().reshape(1) for k, v in {"loss": loss, "itc": itc, "itm": itm, "mlm": mlm}.items()},
          f"{out}/losses.safetensors")
print(f"reference loss {loss.item():.15f} (itc {itc.item():.6f}, itm {itm.item():.6f}, mlm {mlm.item():.6f}), "
      f"{int(predicted.sum())} predicted tokens")
"#;

fn job() -> JobConfig {
    let text = format!(
        "[job]\nname = \"albef-grad\"\nseed = 11\n[data]\ntrain = \"unused\"\n\
         [model]\nfamily = \"albef\"\nqueue_size = {QUEUE}\nalpha_ramp_steps = 4\nmlm_probability = {MLM_PROBABILITY}\n\
         [train]\nglobal_batch = {BATCH}\nprecision = \"fp64\"\nsteps = 10\nwarmup_steps = 1\nlr = 1e-3\n"
    );
    JobConfig::parse(&text, "albef-grad").unwrap()
}

/// [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
fn vocab() -> MaskingVocab {
    MaskingVocab::new(4, VOCAB as usize, [0, 1, 2, 3]).unwrap()
}

fn albef_config() -> AlbefConfig {
    let mut albef = AlbefConfig::preset("tiny", VOCAB, 0, None).unwrap();
    albef.queue_size = QUEUE;
    albef.mlm_probability = MLM_PROBABILITY;
    albef
}

/// Global batch `step` (see [`caption_batch`]).
fn global_batch(step: u64) -> DeviceBatch {
    caption_batch(200 + step, step, BATCH, CONTEXT, VOCAB, 5)
}

/// The masked captions and labels of `batch`, as braid's masker makes them for a job with
/// `seed` (the masking is a pure function of the seed and each sample's position).
fn masked(batch: &DeviceBatch, seed: u64) -> (Tensor, Tensor) {
    let masking = MaskingConfig { probability: MLM_PROBABILITY, ..MaskingConfig::default() };
    let masker = Masker::new(masking, vocab(), seed).unwrap();
    let flat = |t: &Tensor| Vec::<i64>::try_from(t.flatten(0, -1)).unwrap();
    let (tokens, mask) = (flat(&batch.tokens), flat(&batch.attention_mask()));
    let positions: Vec<u64> = flat(&batch.positions).iter().map(|&p| p as u64).collect();
    let inputs = MaskingInputs { token_ids: &tokens, attention_mask: &mask, word_ids: None, positions: &positions };
    let out = masker.mask_batch(inputs).unwrap();
    (Tensor::from_slice(&out.input_ids).view([BATCH, CONTEXT]), Tensor::from_slice(&out.labels).view([BATCH, CONTEXT]))
}

/// The part of the model a parameter belongs to, for the report.
fn group(name: &str, text_layers: usize) -> &'static str {
    if name.starts_with("visual.") {
        "image encoder"
    } else if name.starts_with("text.embeddings.") {
        "text embeddings"
    } else if let Some(rest) = name.strip_prefix("text.encoder.layer.") {
        let layer: usize = rest.split('.').next().unwrap().parse().unwrap();
        if layer < text_layers {
            "text encoder"
        } else {
            "fusion encoder"
        }
    } else if name.starts_with("mlm_head.") {
        "mlm head"
    } else if name.starts_with("itm_head.") {
        "itm head"
    } else if name.starts_with("vision_proj.") || name.starts_with("text_proj.") {
        "projections"
    } else {
        "temperature"
    }
}

#[test]
fn step_gradients_match_torchmultimodal() {
    let config = job();
    let albef = albef_config();
    let spec = ModelSpec::Albef { config: albef, vocab: vocab(), context_length: CONTEXT };
    let mut coll = single_rank();
    let mut trainer = Trainer::new(&config, spec, Device::Cpu).unwrap();

    let checked = checked_step(&mut trainer, &mut coll, global_batch, WARM_UP, QUEUE);
    let (step, batch) = (WARM_UP, global_batch(WARM_UP));
    let (loss, grads, online, momentum) = (checked.loss, &checked.grads, &checked.online, &checked.momentum);
    let family = trainer.albef().unwrap();
    let alpha = family.alpha_at(step);
    assert!(alpha > 0.0 && alpha < albef.alpha, "the checked step is inside the ramp: alpha {alpha}");

    // What the step used: weights, queues, masked captions, hard negatives.
    let queue = |name: &str| checked.get(name);
    let (masked_ids, labels) = masked(&batch, config.job.seed);
    assert!(labels.equal(&family.mlm_labels(&batch).unwrap()), "the masking reproduced here is the step's");
    let predicted = labels.ne(IGNORE_INDEX).sum(Kind::Int64).int64_value(&[]);
    assert!(predicted >= BATCH / 2, "only {predicted} predicted tokens");
    let drawn = family.last_negatives();
    assert_eq!(drawn.len(), BATCH as usize);
    let column = |c: Option<usize>| c.expect("every sample has a negative") as i64;
    let negatives_image: Vec<i64> = drawn.iter().map(|d| column(d.image)).collect();
    let negatives_text: Vec<i64> = drawn.iter().map(|d| column(d.text)).collect();

    let dir = tempfile::tempdir().unwrap();
    let mut weights = export_torchmultimodal(online, Some(momentum), &albef);
    weights.push(("image_queue".into(), queue("queue.image.features").transpose(0, 1)));
    weights.push(("text_queue".into(), queue("queue.text.features").transpose(0, 1)));
    let contiguous = |list: Vec<(String, Tensor)>| list.into_iter().map(|(n, t)| (n, t.contiguous())).collect::<Vec<_>>();
    Tensor::write_safetensors(&contiguous(weights), dir.path().join("albef.safetensors")).unwrap();
    let is_head = |n: &str| n.starts_with("itm_head.") || n.starts_with("mlm_head.");
    let mut heads: Vec<(String, Tensor)> = online.iter().filter(|(n, _)| is_head(n)).map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    heads.extend(momentum.iter().filter_map(|(n, t)| n.strip_prefix("mlm_head.").map(|rest| (format!("mlm_head_m.{rest}"), t.shallow_clone()))));
    Tensor::write_safetensors(&contiguous(heads), dir.path().join("heads.safetensors")).unwrap();
    let inputs = vec![
        ("images".to_string(), batch.images.shallow_clone()),
        ("input_ids".to_string(), batch.tokens.shallow_clone()),
        ("attention_mask".to_string(), batch.attention_mask()),
        ("masked_ids".to_string(), masked_ids),
        ("labels".to_string(), labels),
        ("negatives_image".to_string(), Tensor::from_slice(&negatives_image)),
        ("negatives_text".to_string(), Tensor::from_slice(&negatives_text)),
        ("alpha".to_string(), Tensor::from_slice(&[alpha])),
    ];
    Tensor::write_safetensors(&contiguous(inputs), dir.path().join("inputs.safetensors")).unwrap();

    print!("{}", run_python(REFERENCE, "albef_grad_reference.py", dir.path()));
    let losses = read(&dir.path().join("losses.safetensors"));
    let reference_loss = losses["loss"].double_value(&[0]);
    println!("braid loss     {loss:.15} (alpha {alpha}), difference {:.3e}", (loss - reference_loss).abs());

    // The reference's gradients under braid's names.
    let mut reference: Vec<(String, Tensor)> = read(&dir.path().join("grads.safetensors")).into_iter().collect();
    let reference_heads: Vec<(String, Tensor)> = reference.iter().filter(|(n, _)| is_head(n)).map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    reference.retain(|(n, _)| !is_head(n));
    let (mut reference, no_momentum) = import_torchmultimodal(&reference, &albef).expect("the reference's gradients map to braid's names");
    assert!(no_momentum.is_empty(), "the reference has no gradients for momentum weights");
    reference.extend(reference_heads);
    let reference: HashMap<String, Tensor> = reference.into_iter().collect();
    let rows = compare(grads, &reference, RELATIVE, FLOOR);
    println!("largest gradient entry of the model {:.3e}", largest_entry(&reference));
    let text_layers = albef.text_layers();
    assert_rows_hold(&rows, |name| group(name, text_layers));
    assert!((loss - reference_loss).abs() <= 1e-12 * reference_loss.abs(), "loss {loss} vs reference {reference_loss}");
}
