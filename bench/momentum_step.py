"""Training-step time of ALBEF and BLIP in their reference implementations, the references that
`braid bench --family albef|blip` is compared with (bench/cpu_momentum.sh).

Same shapes as braid's presets (`--preset tiny|base`), the same synthetic batch (random images,
`braid::bench::bert_captions`: `[CLS] words [SEP]` then padding, [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3
[MASK]=4 [DEC]=5 [ENC]=6), the same queue length, alpha 0.4, momentum 0.995, dropout off (braid
does not model it), AdamW with braid's defaults (lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight
decay 0.2 on matrices), gradient clipping at 1.0, temperature clamp. One step, timed as a whole:

ALBEF (torchmultimodal `ALBEFModelWithSimilarity`, plus the heads and losses it lacks):
  1. MLM masking of the captions (ALBEF's `mask`: 15%, 80/10/10 [MASK]/random/kept, torch ops).
  2. `ALBEFModelWithSimilarity.forward`: online image, text and fusion encoders; inside it, the
     momentum update of the encoders and projections, the momentum image, text AND fusion
     encoders (torchmultimodal also fuses the momentum pair, which ALBEF's pretraining and braid
     do not), similarities against the queues, the enqueue, and the hard negatives (a Python
     loop of `torch.multinomial` per sample, as ALBEF) fused by the online fusion encoder (2B
     pairs).
  3. ITC: `ImageTextContrastiveLoss(alpha)`; ITM: a Linear(width, 2) head, CE over the 3B pairs.
  4. MLM as ALBEF's `BertForMaskedLM` with soft labels: the masked captions through the online
     text and fusion encoders (reusing the step's image embeddings) and `transformers`'
     `BertLMPredictionHead` (decoder tied to the word embeddings); the same through the momentum
     text and fusion encoders and a momentum copy of the head (updated by the momentum rule
     each step) without grad; loss `(1 - alpha) CE + alpha * soft CE` over the masked tokens.
  5. backward of ITC + ITM + MLM, clipping, AdamW, temperature clamp.

BLIP (`transformers` `BlipForImageTextRetrieval` and `BlipForConditionalGeneration`, the
captioning model's image encoder, text embeddings, cross-attention and feed-forward modules
replaced by the retrieval model's, as BLIP's pretraining ties them; momentum copies made with
`copy.deepcopy` and run under no_grad; queues added here since `transformers` has none), BLIP's
`blip_pretrain.forward`:
  1. online image encoder, unimodal text encoder, features; under no_grad the momentum update
     (`param_m = m param_m + (1 - m) param` over every momentum parameter), the momentum image and
     text encoders, distillation targets against the queues; ITC; the enqueue.
  2. ITM: the positive pairs through the image-grounded encoder ([ENC] first), one hard negative
     per direction drawn by `torch.multinomial` per sample from `softmax(sim) + 1e-4` (BLIP's
     smoothing), the 2B negative pairs through the same encoder, `itm_head`, CE over 3B pairs.
  3. LM: the captions ([DEC] first) through the decoder with labels (padding -100) and
     `transformers`' label-smoothed (0.1) CE, mean over predicted tokens.
  4. backward of ITC + ITM + LM, clipping, AdamW, temperature clamp.

Prints one JSON line: the median seconds per step (wall clock, and CPU seconds of all threads,
which other processes on a shared machine disturb less) and the last step's loss terms.
"""
import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

PAD, UNK, CLS, SEP, MASK, DEC, ENC = 0, 1, 2, 3, 4, 5, 6
FIRST_WORD = 7

# (image, patch, vision (width, layers, heads, mlp), text (width, heads, ff, layers without and
# with cross-attention), embed, queue, positions, context) as braid's `AlbefConfig::preset` and
# `BlipConfig::preset` with the job's default queue (`tiny` 1,024); bench/cpu_momentum.sh checks
# that braid's `momentum_shape` equals the one printed here.
ALBEF = {
    "tiny": (32, 8, (64, 2, 4, 256), (64, 4, 256, 2, 2), 64, 1024, 64, 32),
    "base": (256, 16, (768, 12, 12, 3072), (768, 12, 3072, 6, 6), 256, 65536, 512, 30),
}
BLIP = {
    "tiny": (32, 8, (64, 2, 4, 256), (64, 4, 256, 0, 2), 64, 1024, 64, 32),
    "base": (224, 16, (768, 12, 12, 3072), (768, 12, 3072, 0, 12), 256, 57600, 512, 30),
}


def shape_of(preset, context, vocab, queue):
    """The shape in the keys of braid's `MomentumShape`."""
    image, patch, (vw, vl, vh, _), (tw, th, tf, text_layers, cross_layers), embed, _, _, _ = preset
    return {"image_size": image, "patch_size": patch, "vision_width": vw, "vision_layers": vl, "vision_heads": vh,
            "text_width": tw, "text_heads": th, "intermediate_size": tf, "text_layers": text_layers,
            "cross_layers": cross_layers, "embed_dim": embed, "context_length": context, "vocab_size": vocab,
            "queue_size": queue}


def bert_captions(batch, context, vocab):
    """`braid::bench::bert_captions`: the same ids and [SEP] positions."""
    lo, hi = max(1, (context - 2) // 2), context - 2
    tokens = torch.zeros(batch, context, dtype=torch.long)
    eot = torch.zeros(batch, dtype=torch.long)
    for i in range(batch):
        n = lo + (5 * i) % (hi - lo + 1)
        row = [CLS] + [FIRST_WORD + (131 * i + 31 * j) % (vocab - FIRST_WORD) for j in range(n)] + [SEP]
        tokens[i, : len(row)] = torch.tensor(row)
        eot[i] = n + 1
    mask = (torch.arange(context)[None, :] <= eot[:, None]).long()
    return tokens, mask


def mask_tokens(input_ids, vocab, probability):
    """ALBEF's `mask`: choose 15% of the real tokens (special ids never), 80% [MASK], 10% random."""
    input_ids = input_ids.clone()
    labels = input_ids.clone()
    masked = torch.bernoulli(torch.full(input_ids.shape, probability)).bool()
    masked &= input_ids >= FIRST_WORD
    labels[~masked] = -100
    replaced = torch.bernoulli(torch.full(input_ids.shape, 0.8)).bool() & masked
    input_ids[replaced] = MASK
    random = torch.bernoulli(torch.full(input_ids.shape, 0.5)).bool() & masked & ~replaced
    words = torch.randint(FIRST_WORD, vocab, input_ids.shape, dtype=torch.long)
    input_ids[random] = words[random]
    return input_ids, labels


def momentum_update(pairs, m):
    with torch.no_grad():
        for p, p_m in pairs:
            p_m.data.mul_(m).add_(p.data, alpha=1 - m)


def adamw(named, fused):
    decay = [p for n, p in named if p.requires_grad and p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in named if p.requires_grad and not (p.dim() >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": 0.2}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.98), eps=1e-6, fused=fused or None)


def albef_step(args):
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLMPredictionHead
    from torchmultimodal.models.albef.image_encoder import ALBEFVisionEncoder
    from torchmultimodal.models.albef.model import ALBEFModel, ALBEFModelWithSimilarity
    from torchmultimodal.models.albef.multimodal_encoder import ALBEFMultimodalEncoder
    from torchmultimodal.modules.encoders.bert_text_encoder import bert_text_encoder
    from torchmultimodal.modules.losses.albef import ImageTextContrastiveLoss

    image, patch, (vw, vl, vh, vm), (tw, th, tf, text_layers, fusion_layers), embed, queue, positions, context = ALBEF[args.preset]
    queue, context = args.queue or queue, args.context or context
    V, B = args.vocab, args.batch
    vision = ALBEFVisionEncoder(image_size=image, patch_size=patch, num_hidden_layers=vl, num_attention_heads=vh,
                                hidden_size=vw, mlp_dim=vm, layer_norm_eps=1e-6)
    text = bert_text_encoder(hidden_size=tw, num_hidden_layers=text_layers, num_attention_heads=th, intermediate_size=tf,
                             dropout=0.0, vocab_size=V, max_position_embeddings=positions, pad_token_id=PAD)
    fusion = ALBEFMultimodalEncoder(hidden_size=tw, num_hidden_layers=fusion_layers, num_attention_heads=th,
                                    intermediate_size=tf)
    # Word embeddings drawn as braid's (BERT's initializer range; torchmultimodal's default is N(0, 1),
    # whose huge MLM logits would make the loss terms incomparable; the timing is the same).
    nn.init.normal_(text.embeddings.word_embeddings.weight, std=tw ** -0.5 if args.preset == "tiny" else 0.02)
    albef = ALBEFModel(vision, text, fusion, momentum=args.momentum)
    model = ALBEFModelWithSimilarity(albef, nn.Linear(vw, embed), nn.Linear(tw, embed), embed_size=embed,
                                     queue_size=queue, temp=0.07).train()
    head_config = BertConfig(vocab_size=V, hidden_size=tw, hidden_act="gelu", layer_norm_eps=1e-12)
    itm_head = nn.Linear(tw, 2)
    mlm_head = BertLMPredictionHead(head_config)
    mlm_head.decoder.weight = albef.text_encoder.embeddings.word_embeddings.weight
    mlm_head_m = copy.deepcopy(mlm_head)
    mlm_head_m.decoder.weight = albef.text_encoder_m.embeddings.word_embeddings.weight
    for p in mlm_head_m.parameters():
        p.requires_grad_(False)
    # The head's own parameters (its decoder weight is the word embedding, averaged with the
    # text encoder).
    head_pairs = [(p, dict(mlm_head_m.named_parameters())[n]) for n, p in mlm_head.named_parameters()
                  if n != "decoder.weight"]
    named = list(model.named_parameters()) + [("itm_head." + n, p) for n, p in itm_head.named_parameters()] \
        + [("mlm_head." + n, p) for n, p in mlm_head.named_parameters() if n != "decoder.weight"]
    params = [p for _, p in named if p.requires_grad]
    if args.save_init:
        # The initial weights in the layout `braid bench --init-from` (and `[model] init_from`)
        # reads: the model's state dict without its queue buffers; braid keeps its own heads.
        from safetensors.torch import save_file
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
                 if k not in ("image_queue", "text_queue", "idx_queue", "queue_ptr")}
        save_file(state, args.save_init)
    opt = adamw(named, args.fused_adamw)
    itc_loss = ImageTextContrastiveLoss()
    captured = {}
    albef.register_forward_hook(lambda module, inputs, output: captured.__setitem__("albef", output))

    torch.manual_seed(0)
    images = torch.randn(B, 3, image, image)
    tokens, attention = bert_captions(B, context, V)
    itm_labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)])
    alpha = args.alpha

    def step(i):
        opt.zero_grad(set_to_none=True)
        masked_ids, labels = mask_tokens(tokens, V, args.mlm_probability)
        out = model(images, tokens, attention, torch.arange(B) + i * B)
        o = captured["albef"]
        s = out.similarity
        itc = itc_loss(s.sim_i2t, s.sim_t2i, s.sim_i2t_m, s.sim_t2i_m, out.sim_targets, alpha=alpha)
        itm_in = torch.cat([out.multimodal_embeddings[:, 0], out.multimodal_embeddings_neg[:, 0]])
        itm = F.cross_entropy(itm_head(itm_in), itm_labels)
        text_masked = albef.text_encoder(masked_ids, attention).last_hidden_state
        fused = albef.multimodal_encoder(hidden_states=text_masked, attention_mask=attention,
                                         encoder_hidden_states=o.image_embeddings)
        logits = mlm_head(fused)
        with torch.no_grad():
            momentum_update(head_pairs, args.momentum)
            text_masked_m = albef.text_encoder_m(masked_ids, attention).last_hidden_state
            fused_m = albef.multimodal_encoder_m(hidden_states=text_masked_m, attention_mask=attention,
                                                 encoder_hidden_states=o.image_embeddings_m)
            soft = F.softmax(mlm_head_m(fused_m), dim=-1)
        ce = F.cross_entropy(logits.view(-1, V), labels.view(-1))
        distill = -(soft * F.log_softmax(logits, dim=-1)).sum(-1)[labels != -100].mean()
        mlm = (1 - alpha) * ce + alpha * distill
        loss = itc + itm + mlm
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            model.temp.clamp_(0.001, 0.5)
        return {"itc": itc.item(), "itm": itm.item(), "mlm": mlm.item()}

    return step, shape_of(ALBEF[args.preset], context, V, queue)


def blip_step(args):
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

    image, patch, (vw, vl, vh, vm), (tw, th, tf, _, layers), embed, queue, positions, context = BLIP[args.preset]
    queue, context = args.queue or queue, args.context or context
    V, B = args.vocab, args.batch
    config = BlipConfig(
        text_config=dict(vocab_size=V, hidden_size=tw, num_hidden_layers=layers, num_attention_heads=th,
                         intermediate_size=tf, max_position_embeddings=positions, hidden_act="gelu",
                         layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         pad_token_id=PAD, bos_token_id=DEC, sep_token_id=SEP, eos_token_id=SEP,
                         label_smoothing=0.1),
        vision_config=dict(hidden_size=vw, num_hidden_layers=vl, num_attention_heads=vh, intermediate_size=vm,
                           image_size=image, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-5,
                           attention_dropout=0.0),
        image_text_hidden_size=embed,
    )
    retrieval = BlipForImageTextRetrieval(config).train()
    captioning = BlipForConditionalGeneration(config).train()
    # BLIP's sharing: the decoder owns only its self-attention and its LM head's transform.
    captioning.vision_model = retrieval.vision_model
    decoder = captioning.text_decoder
    decoder.bert.embeddings = retrieval.text_encoder.embeddings
    for dec, enc in zip(decoder.bert.encoder.layer, retrieval.text_encoder.encoder.layer):
        dec.crossattention, dec.intermediate, dec.output = enc.crossattention, enc.intermediate, enc.output
    decoder.cls.predictions.decoder.weight = retrieval.text_encoder.embeddings.word_embeddings.weight

    online = nn.ModuleDict({"visual": retrieval.vision_model, "vision_proj": retrieval.vision_proj,
                            "text": retrieval.text_encoder, "text_proj": retrieval.text_proj})
    momentum = copy.deepcopy(online)
    for p in momentum.parameters():
        p.requires_grad_(False)
    pairs = list(zip(online.parameters(), momentum.parameters()))
    temp = nn.Parameter(torch.tensor(0.07))
    named = {}
    for prefix, module in [("retrieval.", retrieval), ("decoder.", decoder)]:
        for n, p in module.named_parameters():
            if all(p is not q for q in named.values()):
                named[prefix + n] = p
    named["temp"] = temp
    named = list(named.items())
    params = [p for _, p in named]
    opt = adamw(named, args.fused_adamw)

    image_queue = F.normalize(torch.randn(embed, queue), dim=0)
    text_queue = F.normalize(torch.randn(embed, queue), dim=0)
    pointer = [0]
    torch.manual_seed(0)
    images = torch.randn(B, 3, image, image)
    tokens, attention = bert_captions(B, context, V)
    alpha = args.alpha

    def features(m, pixels, ids):
        image_embeds = m["visual"](pixels).last_hidden_state
        text_embeds = m["text"](ids, attention_mask=attention).last_hidden_state
        return (image_embeds, F.normalize(m["vision_proj"](image_embeds[:, 0]), dim=-1),
                F.normalize(m["text_proj"](text_embeds[:, 0]), dim=-1))

    def step(i):
        opt.zero_grad(set_to_none=True)
        image_embeds, image_feat, text_feat = features(online, images, tokens)
        with torch.no_grad():
            momentum_update(pairs, args.momentum)
            _, image_feat_m, text_feat_m = features(momentum, images, tokens)
            image_feat_all = torch.cat([image_feat_m.t(), image_queue], dim=1)
            text_feat_all = torch.cat([text_feat_m.t(), text_queue], dim=1)
            sim_targets = torch.zeros(B, B + queue)
            sim_targets.fill_diagonal_(1)
            i2t_targets = alpha * F.softmax(image_feat_m @ text_feat_all / temp, dim=1) + (1 - alpha) * sim_targets
            t2i_targets = alpha * F.softmax(text_feat_m @ image_feat_all / temp, dim=1) + (1 - alpha) * sim_targets
        sim_i2t = image_feat @ text_feat_all / temp
        sim_t2i = text_feat @ image_feat_all / temp
        itc = (-(F.log_softmax(sim_i2t, dim=1) * i2t_targets).sum(1).mean()
               - (F.log_softmax(sim_t2i, dim=1) * t2i_targets).sum(1).mean()) / 2
        with torch.no_grad():
            p = pointer[0]
            image_queue[:, p:p + B] = image_feat_m.T
            text_queue[:, p:p + B] = text_feat_m.T
            pointer[0] = (p + B) % queue

        encoder_ids = tokens.clone()
        encoder_ids[:, 0] = ENC
        text_encoder = retrieval.text_encoder
        positive = text_encoder(encoder_ids, attention_mask=attention, encoder_hidden_states=image_embeds).last_hidden_state
        with torch.no_grad():
            weights_t2i = F.softmax(sim_t2i[:, :B], dim=1) + 1e-4
            weights_t2i.fill_diagonal_(0)
            weights_i2t = F.softmax(sim_i2t[:, :B], dim=1) + 1e-4
            weights_i2t.fill_diagonal_(0)
        image_neg = torch.stack([image_embeds[torch.multinomial(weights_t2i[b], 1).item()] for b in range(B)])
        text_idx = [torch.multinomial(weights_i2t[b], 1).item() for b in range(B)]
        ids_neg, atts_neg = encoder_ids[text_idx], attention[text_idx]
        negative = text_encoder(torch.cat([encoder_ids, ids_neg]), attention_mask=torch.cat([attention, atts_neg]),
                                encoder_hidden_states=torch.cat([image_neg, image_embeds])).last_hidden_state
        itm_logits = retrieval.itm_head(torch.cat([positive[:, 0], negative[:, 0]]))
        itm_labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)])
        itm = F.cross_entropy(itm_logits, itm_labels)

        decoder_ids = tokens.clone()
        decoder_ids[:, 0] = DEC
        lm = decoder(decoder_ids, attention_mask=attention, encoder_hidden_states=image_embeds,
                     labels=decoder_ids.masked_fill(attention == 0, -100)).loss
        loss = itc + itm + lm
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            temp.clamp_(0.001, 0.5)
        return {"itc": itc.item(), "itm": itm.item(), "lm": lm.item()}

    return step, shape_of(BLIP[args.preset], context, V, queue)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, choices=["albef", "blip"])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "base"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--vocab", type=int, help="default: 30522 (albef), 30524 (blip)")
    ap.add_argument("--context", type=int, help="caption length (default: the preset's)")
    ap.add_argument("--queue", type=int, help="queue length, a multiple of --batch (default: the preset's rounded up)")
    ap.add_argument("--alpha", type=float, default=0.4)
    ap.add_argument("--momentum", type=float, default=0.995)
    ap.add_argument("--mlm-probability", type=float, default=0.15)
    ap.add_argument("--fused-adamw", action="store_true", help="torch.optim.AdamW(fused=True) instead of the default")
    ap.add_argument("--trace", help="after the timed steps, profile 3 more and write a Chrome trace here")
    ap.add_argument("--save-init", help="ALBEF: write the initial weights here (safetensors) for `braid bench --init-from`")
    args = ap.parse_args()
    args.vocab = args.vocab or (30522 if args.model == "albef" else 30524)
    if args.queue is None:
        default = (ALBEF if args.model == "albef" else BLIP)[args.preset][5]
        args.queue = -(-default // args.batch) * args.batch
    assert args.queue % args.batch == 0, f"--queue {args.queue} is not a multiple of --batch {args.batch}"

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    step, shape = (albef_step if args.model == "albef" else blip_step)(args)
    for i in range(args.warmup):
        step(i)
    times, cpu_times, terms, every = [], [], {}, []
    for i in range(args.steps):
        cpu0, t0 = time.process_time(), time.perf_counter()
        terms = step(args.warmup + i)
        every.append([[k, v] for k, v in terms.items()])
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - cpu0)
    if args.trace:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            for i in range(3):
                step(args.warmup + args.steps + i)
        prof.export_chrome_trace(args.trace)
    median = statistics.median(times)
    print(json.dumps({
        "impl": "torchmultimodal" if args.model == "albef" else "transformers",
        "family": args.model,
        "preset": args.preset,
        "batch": args.batch,
        "threads": args.threads,
        "device": "cpu",
        "precision": "fp32",
        "step_seconds": median,
        "samples_per_second": args.batch / median,
        "cpu_seconds": statistics.median(cpu_times),
        "loss_terms": [[k, v] for k, v in terms.items()],
        "step_loss_terms": every,
        "momentum_shape": shape,
    }))


if __name__ == "__main__":
    main()
