#!/usr/bin/env bash
# GPU checks and the CLIP ViT-B/16 comparison, in one run on one GPU:
#   1. braid check-device: CUDA in libtorch, NCCL, one-rank NCCL collectives vs CPU results;
#   2. CLIP-tiny trained in bf16 and fp32 on the same fixed batch: the loss curves must be close;
#      and trained from a captured CUDA graph (--cuda-graph): its curve must follow the eager one;
#   3. an end-to-end `braid run` of CLIP-tiny on the GPU (one worker, NCCL engine), eagerly and
#      with `train.cuda_graph = true`;
#   4. CLIP ViT-B/16, batch 256, bf16: braid (eager and CUDA graph) vs open_clip in PyTorch eager
#      (autocast bf16, scaled_dot_product_attention, fused AdamW), with samples/s, MFU, peak GPU
#      memory, ratio;
#   5. the checkpoint benchmark on the ViT-B/16 state held on the GPU;
#   6. where the step time goes: profiler traces of 3 ViT-B/16 steps of braid and of the
#      reference, summarised by bench/trace_summary.py; and braid with activation checkpointing.
# Usage: bench/gpu.sh [BRAID_BINARY] ; PYTHON= picks the interpreter that has torch (and
# open_clip); OUT= the output folder (default bench/out). Prints a table, writes table.md.
set -uo pipefail
cd "$(dirname "$0")/.."
BRAID=${1:-target/release/braid}
PY=${PYTHON:-python3}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
TORCH_LIB=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
export LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}"
STEPS=${STEPS:-20} WARMUP=${WARMUP:-5} BATCH=${BATCH:-256}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
  "$PY" -c "import torch; print('torch:', torch.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/env.txt"

echo "== 1. device check"
timeout 60 "$BRAID" check-device --device cuda:0 | tee "$OUT/check_device.txt"
echo "check-device exit: ${PIPESTATUS[0]}" | tee -a "$OUT/check_device.txt"

echo "== 2. bf16 vs fp32 loss curves (CLIP-tiny, fixed batch)"
for p in fp32 bf16; do
  timeout 60 "$BRAID" bench --preset tiny --device cuda:0 --precision "$p" --batch 128 --steps 150 --warmup 0 \
    --losses --json > "$OUT/tiny_$p.json" || echo "tiny $p bench failed"
done
timeout 60 "$BRAID" bench --preset tiny --device cuda:0 --precision fp32 --batch 128 --steps 150 --warmup 0 \
  --losses --cuda-graph --json > "$OUT/tiny_fp32_graph.json" 2> "$OUT/tiny_fp32_graph.log" || echo "tiny CUDA-graph bench failed"
grep -h "capture" "$OUT/tiny_fp32_graph.log" | tail -2

echo "== 3. braid run on the GPU"
rm -rf /tmp/braid-gpu && mkdir -p /tmp/braid-gpu
timeout 60 "$BRAID" data synth /tmp/braid-gpu/data --train-samples 4000 --eval-samples 300 >/dev/null
cat > /tmp/braid-gpu/job.toml <<JOB
[job]
name = "clip-tiny-gpu"
[data]
train = "data/train/manifest.json"
eval = "data/eval/manifest.json"
tokenizer = "data/tokenizer.json"
decode_threads = 4
[train]
global_batch = 128
steps = 300
lr = 1e-3
warmup_steps = 20
weight_decay = 0.1
[cluster]
device = "cuda"
[checkpoint]
url = "ckpt"
every_steps = 150
JOB
timeout 120 "$BRAID" run /tmp/braid-gpu/job.toml --workers 1 --json --log-dir "$OUT/run-logs" > "$OUT/run_gpu.json"
echo "braid run exit: $?"
grep -h "collective connected" "$OUT"/run-logs/*.log | tail -1
rm -rf /tmp/braid-gpu/ckpt
sed 's/^warmup_steps = 20$/warmup_steps = 20\ncuda_graph = true/; s/^name = "clip-tiny-gpu"$/name = "clip-tiny-gpu-graph"/' \
  /tmp/braid-gpu/job.toml > /tmp/braid-gpu/job-graph.toml
timeout 120 "$BRAID" run /tmp/braid-gpu/job-graph.toml --workers 1 --json --log-dir "$OUT/run-graph-logs" > "$OUT/run_gpu_graph.json"
echo "braid run (CUDA graph) exit: $?"
grep -h "captured\|capturing" "$OUT"/run-graph-logs/*.log | tail -2

echo "== 4. CLIP ViT-B/16 batch $BATCH bf16: braid vs PyTorch eager"
measure() { # name, command...: runs the command while sampling GPU memory; writes $OUT/<name>.json and .mem
  local name=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/$name.mem" &
  local mon=$!
  timeout 150 "$@" > "$OUT/$name.json" || echo "$name failed"
  kill $mon 2>/dev/null; wait $mon 2>/dev/null
}
measure b16_braid "$BRAID" bench --preset vit-b-16 --device cuda:0 --precision bf16 --batch "$BATCH" \
  --steps "$STEPS" --warmup "$WARMUP" --json
measure b16_braid_graph "$BRAID" bench --preset vit-b-16 --device cuda:0 --precision bf16 --batch "$BATCH" \
  --steps "$STEPS" --warmup "$WARMUP" --cuda-graph --json
measure b16_torch "$PY" bench/open_clip_step.py --preset vit-b-16 --device cuda --precision bf16 --batch "$BATCH" \
  --steps "$STEPS" --warmup "$WARMUP"

echo "== 5. checkpoint of the ViT-B/16 training state from the GPU (pinned host snapshot)"
rm -rf /tmp/braid-ckbench
timeout 150 "$BRAID" bench --preset vit-b-16 --device cuda:0 --batch 256 --checkpoint-to /tmp/braid-ckbench --rounds 3 \
  | tee "$OUT/checkpoint_bench.txt"
rm -rf /tmp/braid-ckbench

echo "== 6. where the time goes: profiler traces of 3 steps; activation checkpointing"
"$BRAID" bench --preset vit-b-16 --device cuda:0 --precision bf16 --batch "$BATCH" --steps 3 --warmup 3 \
  --trace "$OUT/trace_braid.json" --json > /dev/null || echo "braid trace failed"
"$PY" bench/open_clip_step.py --preset vit-b-16 --device cuda --precision bf16 --batch "$BATCH" --steps 3 --warmup 3 \
  --trace "$OUT/trace_torch.json" > /dev/null || echo "reference trace failed"
for t in braid torch; do
  [ -f "$OUT/trace_$t.json" ] && "$PY" bench/trace_summary.py "$OUT/trace_$t.json" --top 25 | tee "$OUT/trace_$t.md"
  [ -f "$OUT/trace_$t.json" ] && gzip -f "$OUT/trace_$t.json"
done
measure b16_braid_ac "$BRAID" bench --preset vit-b-16 --device cuda:0 --precision bf16 --batch "$BATCH" \
  --steps "$STEPS" --warmup "$WARMUP" --activation-checkpointing --json

"$PY" bench/gpu_table.py "$OUT" | tee "$OUT/table.md"
