"""One rank of the torchrun side of bench/recovery.py: open_clip's CLIP on random tensors, DDP over gloo.

The same shapes as braid's "tiny" preset (bench/open_clip_step.py), AdamW with the same groups,
contrastive loss over the features gathered from every rank (open_clip.ClipLoss, local loss, as
braid's trainer does). Rank 0 saves model + optimizer + step with torch.save every --every steps
(after steps 49, 99, ... like braid) and every rank resumes from that file when torchrun restarts
the group. Rank 0 appends JSON lines to --step-log:
  {"event": "joined", ...}  process group up; unix_ms_process (before `import torch`) and
                             unix_ms_imported (after the imports) say where the start-up went
  {"event": "ready", ...}  process group up, model built, checkpoint loaded; start_step
  {"event": "step", "step": s, "unix_ms": ..., ...}  after each completed optimizer step
"""
import time

STARTED_MS = int(time.time() * 1000)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

IMPORTED_MS = int(time.time() * 1000)

# embed, image, patch, vision (width, layers, heads), text (width, layers, heads), context
TINY = (64, 32, 8, (64, 2, 4), (64, 2, 4), 32)


def now_ms() -> int:
    return int(time.time() * 1000)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt-dir", required=True)
    ap.add_argument("--step-log", required=True, help="JSON-lines file rank 0 appends to")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16, help="per rank")
    ap.add_argument("--every", type=int, default=50, help="checkpoint after every this many steps")
    ap.add_argument("--vocab", type=int, default=49408)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def log(event: dict) -> None:
        if rank == 0:
            event.update(unix_ms=now_ms(), restart=restart, pid=os.getpid())
            with open(args.step_log, "a") as f:
                f.write(json.dumps(event) + "\n")

    log({"event": "joined", "unix_ms_process": STARTED_MS, "unix_ms_imported": IMPORTED_MS})
    torch.manual_seed(args.seed)
    embed, image, patch, (vw, vl, vh), (tw, tl, th), ctx = TINY
    model = open_clip.CLIP(
        embed,
        vision_cfg=dict(layers=vl, width=vw, head_width=vw // vh, patch_size=patch, image_size=image),
        text_cfg=dict(context_length=ctx, vocab_size=args.vocab, width=tw, heads=th, layers=tl),
    ).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.2}, {"params": no_decay, "weight_decay": 0.0}],
        lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
    )
    ckpt_path = os.path.join(args.ckpt_dir, "latest.pt")
    start_step = 0
    if os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_step = state["step"] + 1
    ddp = DistributedDataParallel(model)
    loss_fn = open_clip.ClipLoss(local_loss=True, gather_with_grad=False, rank=rank, world_size=world_size)
    log({"event": "ready", "start_step": start_step})

    for step in range(start_step, args.steps):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * world_size + rank)
        images = torch.randn(args.batch, 3, image, image, generator=g)
        tokens = torch.randint(1, args.vocab - 1, (args.batch, ctx), generator=g)
        tokens[:, -1] = args.vocab - 1
        opt.zero_grad(set_to_none=True)
        image_features, text_features, scale = ddp(images, tokens)
        loss = loss_fn(image_features, text_features, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.605170185988092)
        log({"event": "step", "step": step, "loss": loss.item()})
        if rank == 0 and (step + 1) % args.every == 0:
            os.makedirs(args.ckpt_dir, exist_ok=True)
            tmp = ckpt_path + ".tmp"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, tmp)
            os.replace(tmp, ckpt_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
