//! braid's BLIP training step against an independent reference, gradient by gradient.
//!
//! A tiny fp64 BLIP trainer (one rank) trains a few steps, so the queues hold enqueued momentum
//! features, and its momentum weights are then perturbed apart from the online ones, so the
//! distillation targets really differ from the online predictions. One more step's
//! [`Trainer::compute_gradients`] gives braid's gradient of the total loss `ITC + ITM + LM`.
//! Everything that step used is written out: the online weights (as `transformers`'
//! `BlipForImageTextRetrieval` and `BlipForConditionalGeneration` name them, through
//! [`export_transformers`]), the momentum weights (a third retrieval model), the queues before
//! the step, the batch, the hard negatives braid drew, the distillation weight and the label
//! smoothing.
//!
//! The Python reference loads them into the `transformers` models (fp64, eval mode: braid models
//! no dropout) and ties them as BLIP's pretraining does (`tie_encoder_decoder_weights(...,
//! '/attention')`): the captioning model uses the retrieval model's image encoder, text
//! embeddings, cross-attention and feed-forward modules, so only the decoder's self-attention
//! and the LM head are its own, and the LM head's decoder is the word embeddings. It computes the
//! loss of BLIP's `blip_pretrain.py` from the paper's formulas: `loss_ita` on the online features
//! against the momentum features and the queues (soft targets from the momentum similarities,
//! without autograd), `loss_itm` over the `B` positive and `2B` hard-negative pairs through the
//! image-grounded encoder with `[ENC]` first (braid's negatives, indexed as BLIP indexes
//! `image_embeds` and `input_ids`), and `transformers`' own label-smoothed LM loss of
//! `BlipTextLMHeadModel` with `[DEC]` first and padding ignored; the temperature is a leaf of its
//! own (`transformers` keeps none). `torch.autograd.grad` gives the reference gradient of every
//! parameter, which [`import_transformers`] maps back to braid's names. The reference also
//! computes BLIP's hard-negative weights (`softmax(sim[:, :B]) + 1e-4`, diagonal zeroed); braid's
//! hashed uniforms drawn against them must give the negatives braid drew.
//!
//! Every parameter's gradient must agree within `1e-9` of the largest gradient entry of its
//! tensor, plus `1e-12` of the largest gradient entry of the model (for tensors whose exact
//! gradient is zero, such as attention key biases, where both sides hold only rounding noise),
//! and the losses within `1e-12` relative. fp64 rounding over the step stays near `1e-15`
//! relative; a wrong detach, a wrong average or a missing path changes gradients at the percent
//! level. That the bound can fail is checked too: a second reference, with the distillation
//! weight and the label smoothing each moved by `1e-6`, must fail it for the decoder, the LM head
//! and the projections.

// The shared test helpers; this test uses the batches, the ring of one and the reference comparison.
#[allow(dead_code)]
mod common;

use std::collections::HashMap;
use std::path::Path;

use braid::models::blip::{export_transformers, import_transformers, BlipConfig, BlipTokens};
use braid::objectives::itm::{draw, uniform, Direction};
use braid::trainer::{DeviceBatch, ModelSpec, Trainer};
use common::reference::{assert_rows_hold, checked_step, compare, largest_entry, read, run_python};
use common::{caption_batch, single_rank};
use braid_coordinator::config::JobConfig;
use tch::{Device, Tensor};

const BATCH: i64 = 8;
const CONTEXT: i64 = 10;
const VOCAB: i64 = 40;
/// [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, [DEC]=5, [ENC]=6, words from 7.
const TOKENS: BlipTokens = BlipTokens { bos_token_id: 5, enc_token_id: 6, sep_token_id: 3, pad_token_id: 0 };
/// Two global batches: after the warm-up steps it holds momentum features of earlier steps only.
const QUEUE: i64 = 16;
/// Steps trained before the checked one, which is step `WARM_UP`: three quarters into the
/// 4-step ramp of the distillation weight (alpha 0.3 of 0.4).
const WARM_UP: u64 = 3;
/// Tolerance relative to the largest gradient entry of each tensor.
const RELATIVE: f64 = 1e-9;
/// Tolerance relative to the largest gradient entry of the whole model.
const FLOOR: f64 = 1e-12;
/// How far the second reference moves the distillation weight and the label smoothing.
const NUDGE: f64 = 1e-6;

/// Loads braid's tensors into `transformers`' BLIP models tied as in BLIP's pretraining,
/// recomputes the step's loss with braid's inputs and negatives, and writes `grads.safetensors`
/// and `nudged.safetensors` (`retrieval/<key>`, `captioning/<key>` and `temp`) and
/// `losses.safetensors` (the losses and the hard-negative weights).
const REFERENCE: &str = r#"
import sys
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

out = sys.argv[1]
retrieval_state = load_file(f"{out}/retrieval.safetensors")
captioning_state = load_file(f"{out}/captioning.safetensors")
momentum_state = load_file(f"{out}/momentum.safetensors")
x = load_file(f"{out}/inputs.safetensors")
V, W = retrieval_state["text_encoder.embeddings.word_embeddings.weight"].shape
P = retrieval_state["text_encoder.embeddings.position_embeddings.weight"].shape[0]
E, VW = retrieval_state["vision_proj.weight"].shape
PAD, SEP, DEC, ENC = (int(x[k].item()) for k in ("pad", "sep", "dec", "enc"))
alpha, label_smoothing = x["alpha"].item(), x["label_smoothing"].item()
images, ids, mask = x["images"], x["input_ids"], x["attention_mask"]
image_queue, text_queue = x["image_queue"], x["text_queue"]  # [K, E], braid's layout
B = images.shape[0]
torch.set_default_dtype(torch.float64)

config = BlipConfig(
    text_config=dict(vocab_size=V, hidden_size=W, num_hidden_layers=2, num_attention_heads=4, intermediate_size=4 * W,
                     max_position_embeddings=P, hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=PAD, bos_token_id=DEC, sep_token_id=SEP,
                     eos_token_id=SEP, label_smoothing=label_smoothing),
    vision_config=dict(hidden_size=VW, num_hidden_layers=2, num_attention_heads=4, intermediate_size=4 * VW,
                       image_size=32, patch_size=8, hidden_act="gelu", layer_norm_eps=1e-5, attention_dropout=0.0),
    image_text_hidden_size=E,
)
retrieval = BlipForImageTextRetrieval(config).double().eval()
captioning = BlipForConditionalGeneration(config).double().eval()
momentum = BlipForImageTextRetrieval(config).double().eval()
retrieval.load_state_dict(retrieval_state, strict=True)
captioning.load_state_dict(captioning_state, strict=True)
missing, unexpected = momentum.load_state_dict(momentum_state, strict=False)
assert not unexpected and all(".crossattention." in k or k.startswith("itm_head.") for k in missing), (missing, unexpected)
momentum.requires_grad_(False)

# BLIP's sharing: one image encoder; the decoder reuses the encoder's embeddings, cross-attention
# and feed-forward modules and owns only its self-attention and LM head (decoder = word embeddings).
decoder = captioning.text_decoder
captioning.vision_model = retrieval.vision_model
decoder.bert.embeddings = retrieval.text_encoder.embeddings
for d, e in zip(decoder.bert.encoder.layer, retrieval.text_encoder.encoder.layer, strict=True):
    d.crossattention, d.intermediate, d.output = e.crossattention, e.intermediate, e.output
predictions = decoder.cls.predictions
predictions.decoder.weight = retrieval.text_encoder.embeddings.word_embeddings.weight
assert predictions.decoder.bias is predictions.bias
temp = torch.tensor(x["temp"].item(), requires_grad=True)


def features(model, image_embeds, text_embeds):
    return (F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1),
            F.normalize(model.text_proj(text_embeds[:, 0]), dim=-1))


def step_loss(alpha, label_smoothing):
    """blip_pretrain.py's forward: loss_ita + loss_itm + loss_lm."""
    image_embeds = retrieval.vision_model(pixel_values=images).last_hidden_state
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    text_embeds = retrieval.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    image_feat, text_feat = features(retrieval, image_embeds, text_embeds)

    # ITC with momentum distillation against the queues.
    with torch.no_grad():
        image_embeds_m = momentum.vision_model(pixel_values=images).last_hidden_state
        text_embeds_m = momentum.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        image_feat_m, text_feat_m = features(momentum, image_embeds_m, text_embeds_m)
        image_feat_m_all = torch.cat([image_feat_m.t(), image_queue.t()], dim=1)
        text_feat_m_all = torch.cat([text_feat_m.t(), text_queue.t()], dim=1)
        sim_i2t_m = image_feat_m @ text_feat_m_all / temp
        sim_t2i_m = text_feat_m @ image_feat_m_all / temp
        sim_targets = torch.zeros(sim_i2t_m.size())
        sim_targets.fill_diagonal_(1)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_m_all / temp
    sim_t2i = text_feat @ image_feat_m_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    loss_ita = (loss_i2t + loss_t2i) / 2

    # ITM: [ENC] first; one hard negative per direction (braid's draws); CE over the 3B pairs.
    encoder_input_ids = ids.clone()
    encoder_input_ids[:, 0] = ENC
    output_pos = retrieval.text_encoder(input_ids=encoder_input_ids, attention_mask=mask,
                                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
    with torch.no_grad():
        weights_t2i = F.softmax(sim_t2i[:, :B], dim=1) + 1e-4
        weights_t2i.fill_diagonal_(0)
        weights_i2t = F.softmax(sim_i2t[:, :B], dim=1) + 1e-4
        weights_i2t.fill_diagonal_(0)
    image_embeds_neg = image_embeds[x["negatives_image"]]
    text_ids_neg = encoder_input_ids[x["negatives_text"]]
    text_atts_neg = mask[x["negatives_text"]]
    text_ids_all = torch.cat([encoder_input_ids, text_ids_neg], dim=0)
    text_atts_all = torch.cat([mask, text_atts_neg], dim=0)
    image_embeds_all = torch.cat([image_embeds_neg, image_embeds], dim=0)
    image_atts_all = torch.cat([image_atts, image_atts], dim=0)
    output_neg = retrieval.text_encoder(input_ids=text_ids_all, attention_mask=text_atts_all,
                                        encoder_hidden_states=image_embeds_all, encoder_attention_mask=image_atts_all)
    vl_embeddings = torch.cat([output_pos.last_hidden_state[:, 0], output_neg.last_hidden_state[:, 0]], dim=0)
    itm_labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)], dim=0)
    loss_itm = F.cross_entropy(retrieval.itm_head(vl_embeddings), itm_labels)

    # LM: [DEC] first, padding not predicted; transformers' label-smoothed mean over the tokens.
    decoder_input_ids = ids.clone()
    decoder_input_ids[:, 0] = DEC
    decoder_targets = decoder_input_ids.masked_fill(decoder_input_ids == PAD, -100)
    decoder.label_smoothing = label_smoothing
    loss_lm = decoder(input_ids=decoder_input_ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                      encoder_attention_mask=image_atts, labels=decoder_targets, reduction="mean").loss
    return loss_ita, loss_itm, loss_lm, weights_i2t, weights_t2i


named = {f"retrieval/{n}": p for n, p in retrieval.named_parameters()}
named.update({f"captioning/{n}": p for n, p in captioning.named_parameters()})
named["temp"] = temp
unique = list({id(p): p for p in named.values()}.values())


def gradients(loss):
    by_id = {id(p): g for p, g in zip(unique, torch.autograd.grad(loss, unique, allow_unused=True))}
    unused = [n for n, p in named.items() if by_id[id(p)] is None]
    assert not unused, f"no gradient reaches {unused}"
    return {n: by_id[id(p)].detach().clone().contiguous() for n, p in named.items()}


itc, itm, lm, weights_i2t, weights_t2i = step_loss(alpha, label_smoothing)
loss = itc + itm + lm
save_file(gradients(loss), f"{out}/grads.safetensors")
save_file({k: v.detach().reshape(-1).contiguous() for k, v in {"loss": loss, "itc": itc, "itm": itm, "lm": lm}.items()}
          | {"weights_i2t": weights_i2t.contiguous(), "weights_t2i": weights_t2i.contiguous()},
          f"{out}/losses.safetensors")
nudge = x["nudge"].item()
nudged = step_loss(alpha + nudge, label_smoothing + nudge)
save_file(gradients(sum(nudged[:3])), f"{out}/nudged.safetensors")
predicted = int(mask[:, 1:].sum())
print(f"reference loss {loss.item():.15f} (itc {itc.item():.6f}, itm {itm.item():.6f}, lm {lm.item():.6f}), "
      f"{predicted} predicted tokens, {len(unique)} parameters")
"#;

fn job() -> JobConfig {
    let text = format!(
        "[job]\nname = \"blip-grad\"\nseed = 11\n[data]\ntrain = \"unused\"\n\
         [model]\nfamily = \"blip\"\npreset = \"tiny\"\nqueue_size = {QUEUE}\nalpha_ramp_steps = 4\n\
         [train]\nglobal_batch = {BATCH}\nprecision = \"fp64\"\nsteps = 10\nwarmup_steps = 1\nlr = 1e-3\n"
    );
    JobConfig::parse(&text, "blip-grad").unwrap()
}

fn blip_config() -> BlipConfig {
    let mut blip = BlipConfig::preset("tiny", VOCAB, TOKENS, Some(CONTEXT)).unwrap();
    blip.queue_size = QUEUE;
    blip
}

/// Global batch `step` (see [`caption_batch`]; its `[SEP]` 3 and `[PAD]` 0 are `TOKENS`').
fn global_batch(step: u64) -> DeviceBatch {
    const _: () = assert!(TOKENS.sep_token_id == 3 && TOKENS.pad_token_id == 0);
    caption_batch(200 + step, step, BATCH, CONTEXT, VOCAB, 7)
}

/// The reference gradients of `file` under braid's names: the `retrieval/` and `captioning/`
/// keys through [`import_transformers`] (which checks that the tied tensors got one gradient),
/// and `temp`.
fn reference_grads(file: &Path, config: &BlipConfig) -> HashMap<String, Tensor> {
    let grads = read(file);
    let layout = |prefix: &str| -> Vec<(String, Tensor)> {
        grads.iter().filter_map(|(n, g)| n.strip_prefix(prefix).map(|key| (key.to_string(), g.shallow_clone()))).collect()
    };
    let (retrieval, captioning) = (layout("retrieval/"), layout("captioning/"));
    let imported = import_transformers(Some(&retrieval), Some(&captioning), config)
        .expect("the reference's gradients map to braid's names, one gradient per shared tensor");
    let mut by_name: HashMap<String, Tensor> = imported.into_iter().collect();
    by_name.insert("temp".into(), grads["temp"].shallow_clone());
    by_name
}

/// The part of the model a parameter belongs to, for the report.
fn group(name: &str) -> &'static str {
    if name.starts_with("visual.") {
        "image encoder"
    } else if name.starts_with("text.embeddings.") {
        "text embeddings"
    } else if name.contains(".crossattention.") {
        "cross-attention"
    } else if name.starts_with("text.encoder.layer.") && name.contains(".attention.") {
        "encoder self-attention"
    } else if name.starts_with("text.encoder.layer.") {
        "feed-forward"
    } else if name.starts_with("text_decoder.") {
        "decoder self-attention"
    } else if name.starts_with("lm_head.") {
        "lm head"
    } else if name.starts_with("itm_head.") {
        "itm head"
    } else if name.starts_with("vision_proj.") || name.starts_with("text_proj.") {
        "projections"
    } else {
        "temperature"
    }
}

#[test]
fn step_gradients_match_transformers() {
    let config = job();
    let blip = blip_config();
    let spec = ModelSpec::Blip { config: blip, context_length: CONTEXT };
    let mut coll = single_rank();
    let mut trainer = Trainer::new(&config, spec, Device::Cpu).unwrap();

    let checked = checked_step(&mut trainer, &mut coll, global_batch, WARM_UP, QUEUE);
    let (step, batch) = (WARM_UP, global_batch(WARM_UP));
    let (loss, grads, online, momentum) = (checked.loss, &checked.grads, &checked.online, &checked.momentum);
    let family = trainer.blip().unwrap();
    let alpha = family.alpha_at(step);
    assert!(alpha > 0.0 && alpha < blip.alpha, "the checked step is inside the ramp: alpha {alpha}");

    // What the step used: weights, queues, hard negatives.
    let queue = |name: &str| checked.get(name);
    let drawn = family.last_negatives().to_vec();
    assert_eq!(drawn.len(), BATCH as usize);
    let column = |c: Option<usize>| c.expect("BLIP's +1e-4 leaves every sample a negative") as i64;
    let negatives_image: Vec<i64> = drawn.iter().map(|d| column(d.image)).collect();
    let negatives_text: Vec<i64> = drawn.iter().map(|d| column(d.text)).collect();
    let temp = online.iter().find(|(n, _)| n == "temp").expect("the temperature").1.double_value(&[]);

    let dir = tempfile::tempdir().unwrap();
    let contiguous = |list: Vec<(String, Tensor)>| list.into_iter().map(|(n, t)| (n, t.contiguous())).collect::<Vec<_>>();
    let (retrieval, captioning) = export_transformers(online, &blip);
    let (momentum_retrieval, _) = export_transformers(momentum, &blip);
    for (file, tensors) in [("retrieval", retrieval), ("captioning", captioning), ("momentum", momentum_retrieval)] {
        Tensor::write_safetensors(&contiguous(tensors), dir.path().join(format!("{file}.safetensors"))).unwrap();
    }
    let scalar = |v: f64| Tensor::from_slice(&[v]);
    let token = |id: i64| Tensor::from_slice(&[id]);
    let inputs = vec![
        ("images".to_string(), batch.images.shallow_clone()),
        ("input_ids".to_string(), batch.tokens.shallow_clone()),
        ("attention_mask".to_string(), batch.attention_mask()),
        ("image_queue".to_string(), queue("queue.image.features")),
        ("text_queue".to_string(), queue("queue.text.features")),
        ("negatives_image".to_string(), Tensor::from_slice(&negatives_image)),
        ("negatives_text".to_string(), Tensor::from_slice(&negatives_text)),
        ("alpha".to_string(), scalar(alpha)),
        ("label_smoothing".to_string(), scalar(blip.label_smoothing)),
        ("temp".to_string(), scalar(temp)),
        ("nudge".to_string(), scalar(NUDGE)),
        ("pad".to_string(), token(blip.pad_token_id)),
        ("sep".to_string(), token(blip.sep_token_id)),
        ("dec".to_string(), token(blip.bos_token_id)),
        ("enc".to_string(), token(blip.enc_token_id)),
    ];
    Tensor::write_safetensors(&contiguous(inputs), dir.path().join("inputs.safetensors")).unwrap();

    print!("{}", run_python(REFERENCE, "blip_grad_reference.py", dir.path()));
    let losses = read(&dir.path().join("losses.safetensors"));
    let reference_loss = losses["loss"].double_value(&[0]);
    println!("braid loss     {loss:.15} (alpha {alpha}, temp {temp:.6}), difference {:.3e}", (loss - reference_loss).abs());

    // The negatives: braid's hashed uniforms against BLIP's sampling weights give braid's draws.
    for (i, d) in drawn.iter().enumerate() {
        let weights = |name: &str| Vec::<f64>::try_from(losses[name].get(i as i64)).unwrap();
        let position = d.position as u64;
        assert_eq!(d.position, step as i64 * BATCH + i as i64);
        let text = draw(&weights("weights_i2t"), uniform(config.job.seed, step, position, Direction::TextForImage));
        let image = draw(&weights("weights_t2i"), uniform(config.job.seed, step, position, Direction::ImageForText));
        assert_eq!((d.text, d.image), (text, image), "sample {i}: braid's draws against BLIP's weights");
        assert!(d.text != Some(i) && d.image != Some(i), "sample {i} is its own negative: {d:?}");
    }

    let reference = reference_grads(&dir.path().join("grads.safetensors"), &blip);
    let rows = compare(grads, &reference, RELATIVE, FLOOR);
    println!("largest gradient entry of the model {:.3e}", largest_entry(&reference));
    assert_rows_hold(&rows, group);
    assert!((loss - reference_loss).abs() <= 1e-12 * reference_loss.abs(), "loss {loss} vs reference {reference_loss}");

    // The bound can fail: alpha and the label smoothing moved by NUDGE.
    let nudged = compare(grads, &reference_grads(&dir.path().join("nudged.safetensors"), &blip), RELATIVE, FLOOR);
    let failed: Vec<&str> = nudged.iter().filter(|r| !r.holds()).map(|r| r.name.as_str()).collect();
    println!("alpha and label smoothing moved by {NUDGE:e}: {} of {} gradients outside the bound", failed.len(), nudged.len());
    for g in ["decoder self-attention", "lm head", "projections", "temperature"] {
        assert!(failed.iter().any(|n| group(n) == g), "moving alpha and the label smoothing by {NUDGE:e} leaves every {g} gradient inside the bound");
    }
}
