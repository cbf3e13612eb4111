"""Summarises bench/gpu.sh's outputs into a markdown table (printed)."""
import json
import sys
from pathlib import Path

PEAK_TFLOPS = 989.0  # H100 / H200 SXM dense bf16


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except Exception:
        return None


def peak_mib(path: Path):
    try:
        values = [int(v) for v in path.read_text().split() if v.strip().isdigit()]
        return max(values) if values else None
    except FileNotFoundError:
        return None


def main() -> None:
    out = Path(sys.argv[1])
    print("```")
    print((out / "env.txt").read_text().strip())
    print("```\n")
    check = (out / "check_device.txt").read_text() if (out / "check_device.txt").exists() else "missing"
    print("Device check:\n```\n" + check.strip() + "\n```\n")

    fp32, bf16 = load(out / "tiny_fp32.json"), load(out / "tiny_bf16.json")
    if fp32 and bf16:
        a, b = fp32["losses"], bf16["losses"]
        # Every step's bf16 loss within 5% of the starting loss of the fp32 curve.
        diff = [abs(x - y) for x, y in zip(a, b)]
        close = max(diff) <= 0.05 * a[0]
        print(f"bf16 vs fp32 CLIP-tiny, {len(a)} steps on a fixed batch: loss {a[0]:.3f} -> {a[-1]:.4f} (fp32), "
              f"{b[0]:.3f} -> {b[-1]:.4f} (bf16); largest step-wise difference {max(diff):.4f} "
              f"({100 * max(diff) / a[0]:.2f}% of the initial loss; bound 5%): {'CLOSE' if close else 'NOT CLOSE'}\n")
    run = load(out / "run_gpu.json")
    if run:
        ev = run.get("eval") or {}
        i2t = ev.get("image_to_text", {})
        print(f"braid run on the GPU (1 worker): finished={run['finished']} steps={run['steps']} "
              f"loss={run.get('final_loss')} samples/s={run.get('samples_per_second')} "
              f"held-out R@1 {i2t.get('r1')} (chance {i2t.get('chance_r1')})\n")

    ckpt = out / "checkpoint_bench.txt"
    if ckpt.exists():
        print("Checkpoint benchmark:\n```\n" + ckpt.read_text().strip() + "\n```\n")

    braid, torch = load(out / "b16_braid.json"), load(out / "b16_torch.json")
    if not (braid and torch):
        print("ViT-B/16 comparison: missing output")
        return
    flops = braid["flops_per_step"]
    rows = []
    for name, r, mem in (("braid", braid, out / "b16_braid.mem"), ("PyTorch eager (open_clip)", torch, out / "b16_torch.mem")):
        step = r["step_seconds"]
        mfu = flops / step / (PEAK_TFLOPS * 1e12)
        rows.append((name, r["samples_per_second"], 1e3 * step, 100 * mfu, peak_mib(mem)))
    print(f"CLIP ViT-B/16, batch {braid['batch']}, bf16, one GPU; model FLOPs/step {flops / 1e12:.2f} TFLOP; "
          f"MFU against {PEAK_TFLOPS:.0f} TFLOP/s\n")
    print("| implementation | samples/s | ms/step | MFU | peak GPU memory (MiB, nvidia-smi) |")
    print("|---|---|---|---|---|")
    for name, sps, ms, mfu, mem in rows:
        print(f"| {name} | {sps:.1f} | {ms:.1f} | {mfu:.1f}% | {mem} |")
    print(f"\nratio braid / PyTorch eager samples/s: {rows[0][1] / rows[1][1]:.3f}x")
    ac = load(out / "b16_braid_ac.json")
    if ac:
        step = ac["step_seconds"]
        print(f"\nbraid with activation checkpointing: {ac['samples_per_second']:.1f} samples/s, {1e3 * step:.1f} ms/step, "
              f"MFU {100 * flops / step / (PEAK_TFLOPS * 1e12):.1f}% (model FLOPs, recomputation not counted), "
              f"peak GPU memory {peak_mib(out / 'b16_braid_ac.mem')} MiB")
    for name, label in (("braid", "braid"), ("torch", "PyTorch eager (open_clip)")):
        summary = out / f"trace_{name}.md"
        if summary.exists():
            print(f"\nWhere {label}'s step time goes (3 profiled steps):\n")
            print(summary.read_text().strip())


if __name__ == "__main__":
    main()
