"""Training-step time of open_clip's CLIP, the reference that `braid bench` is compared with.

Same shapes as braid's presets, random inputs, symmetric InfoNCE (open_clip.ClipLoss), AdamW.
On CUDA: bf16 autocast, fused AdamW; attention runs through scaled_dot_product_attention
inside torch.nn.MultiheadAttention. Prints one JSON line.
"""
import argparse
import json
import statistics
import time

import open_clip
import torch

PRESETS = {
    # embed, image, patch, vision (width, layers, heads), text (width, layers, heads), context
    "tiny": (64, 32, 8, (64, 2, 4), (64, 2, 4), 32),
    "vit-b-32": (512, 224, 32, (768, 12, 12), (512, 12, 8), 77),
    "vit-b-16": (512, 224, 16, (768, 12, 12), (512, 12, 8), 77),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--vocab", type=int, default=49408)
    ap.add_argument("--trace", help="after the timed steps, profile 3 more and write a Chrome trace here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    embed, image, patch, (vw, vl, vh), (tw, tl, th), ctx = PRESETS[args.preset]
    device = torch.device(args.device)
    model = open_clip.CLIP(
        embed,
        vision_cfg=dict(layers=vl, width=vw, head_width=vw // vh, patch_size=patch, image_size=image),
        text_cfg=dict(context_length=ctx, vocab_size=args.vocab, width=tw, heads=th, layers=tl),
    ).to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.2}, {"params": no_decay, "weight_decay": 0.0}],
        lr=5e-4, betas=(0.9, 0.98), eps=1e-6, fused=fused,
    )
    loss_fn = open_clip.ClipLoss()
    images = torch.randn(args.batch, 3, image, image, device=device)
    tokens = torch.randint(1, args.vocab - 1, (args.batch, ctx), device=device)
    tokens[:, -1] = args.vocab - 1
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            image_features, text_features, scale = model(images, tokens)
            loss = loss_fn(image_features, text_features, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.605170185988092)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if args.trace:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                step()
            sync()
        prof.export_chrome_trace(args.trace)
    median = statistics.median(times)
    out = {
        "impl": "open_clip",
        "preset": args.preset,
        "batch": args.batch,
        "threads": args.threads,
        "device": args.device,
        "precision": args.precision,
        "step_seconds": median,
        "samples_per_second": args.batch / median,
    }
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
