#!/usr/bin/env python3
"""Summarises a Chrome trace written by `braid bench --trace` or `bench/open_clip_step.py --trace`.

On a GPU trace: GPU busy time against the traced wall span (how much of the time the GPU had
work), kernel time by class (matrix multiply, attention, normalisation, element-wise, ...) and
the kernels taking the most time. On a CPU-only trace: the operators taking the most time.

Usage: trace_summary.py TRACE.json [--steps N] [--top K] [--markdown]
"""
import argparse
import json
import re
from collections import defaultdict

CLASSES = [
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|sm\d+_.*mma", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|cudnn", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("normalisation", re.compile(r"layer_norm|LayerNorm|norm_", re.I)),
    ("reduction", re.compile(r"reduce|sum_|argmax|max_", re.I)),
    ("copy / cast", re.compile(r"copy|cat|memcpy|memset|transpose|fill", re.I)),
    ("element-wise", re.compile(r"elementwise|vectorized|unrolled|gelu|sigmoid|mul|add", re.I)),
]
GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def kernel_class(name):
    for label, pattern in CLASSES:
        if pattern.search(name):
            return label
    return "other"


def union_length(intervals):
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarise(path, steps, top):
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    lines = [f"trace {path}: {len(events)} events, {len(gpu)} on the GPU"]
    if gpu:
        start = min(e["ts"] for e in gpu)
        stop = max(e["ts"] + e["dur"] for e in gpu)
        busy = union_length([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
        span = stop - start
        lines.append(
            f"GPU span {span / 1e3 / steps:.2f} ms/step, busy {busy / 1e3 / steps:.2f} ms/step "
            f"({100 * busy / span:.1f}%), idle {(span - busy) / 1e3 / steps:.2f} ms/step"
        )
        by_class, by_name, counts = defaultdict(float), defaultdict(float), defaultdict(int)
        for e in gpu:
            by_class[kernel_class(e["name"])] += e["dur"]
            by_name[e["name"]] += e["dur"]
            counts[e["name"]] += 1
        total = sum(by_class.values())
        lines.append("")
        lines.append("| kernel class | ms/step | share |")
        lines.append("|---|---|---|")
        for label, dur in sorted(by_class.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {label} | {dur / 1e3 / steps:.2f} | {100 * dur / total:.1f}% |")
        lines.append(f"| kernel launches per step | {len(gpu) / steps:.0f} | |")
        rows = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    else:
        span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
        lines.append(f"traced span {span / 1e3 / steps:.2f} ms/step (CPU only)")
        by_name, counts = defaultdict(float), defaultdict(int)
        for e in events:
            if e.get("cat") == "cpu_op":
                by_name[e["name"]] += e["dur"]
                counts[e["name"]] += 1
        rows = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    lines.append("")
    lines.append("| ms/step | calls/step | name |")
    lines.append("|---|---|---|")
    for name, dur in rows:
        short = name if len(name) <= 110 else name[:107] + "..."
        lines.append(f"| {dur / 1e3 / steps:.2f} | {counts[name] / steps:.0f} | `{short}` |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--steps", type=int, default=3, help="training steps in the trace")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    print(summarise(args.trace, args.steps, args.top))


if __name__ == "__main__":
    main()
