#!/usr/bin/env bash
# braid vs the reference implementations: ALBEF (torchmultimodal) and BLIP (transformers)
# pretraining-step time on CPU, same shapes, batch, caption length, vocabulary, queue length,
# thread count, warm-up and step counts, measured in the same run (alternating, ROUNDS rounds per
# model) so machine noise hits both alike. What each side computes: bench/momentum_step.py's
# docstring and README.md's benchmark section.
# Prints each measurement and, per model, the ratio of median step times (braid / reference;
# lower is better, target <= 1.0), and beside it the ratio of CPU seconds per step (all threads),
# which other processes on a shared machine disturb less. Use an odd STEPS: both sides then take
# the same middle step as the median.
#
#   MODELS="albef blip" PRESET=tiny BATCH=64 THREADS=1 STEPS=9 WARMUP=2 ROUNDS=3 bench/cpu_momentum.sh
#   PRESET=base BATCH=2 THREADS=2 STEPS=3 WARMUP=1 ROUNDS=2 bench/cpu_momentum.sh
# Optional: VOCAB, CONTEXT, QUEUE (passed to both sides; default: each side's preset default).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test >/dev/null
cargo build --release --bins -q
MODELS=${MODELS:-albef blip} PRESET=${PRESET:-tiny} BATCH=${BATCH:-64} THREADS=${THREADS:-1}
STEPS=${STEPS:-9} WARMUP=${WARMUP:-2} ROUNDS=${ROUNDS:-3}
braid_extra=() ref_extra=()
if [[ -n "${VOCAB:-}" ]]; then braid_extra+=(--vocab-size "$VOCAB"); ref_extra+=(--vocab "$VOCAB"); fi
if [[ -n "${CONTEXT:-}" ]]; then braid_extra+=(--context-length "$CONTEXT"); ref_extra+=(--context "$CONTEXT"); fi
if [[ -n "${QUEUE:-}" ]]; then braid_extra+=(--queue-size "$QUEUE"); ref_extra+=(--queue "$QUEUE"); fi
field() { .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
summary=()
for model in $MODELS; do
  braid=() ref=() braid_cpu=() ref_cpu=()
  for _ in $(seq "$ROUNDS"); do
    b=$(./target/release/braid bench --family "$model" --preset "$PRESET" --batch "$BATCH" --threads "$THREADS" \
      --steps "$STEPS" --warmup "$WARMUP" "${braid_extra[@]}" --json)
    r=$(.venv/bin/python bench/momentum_step.py --model "$model" --preset "$PRESET" --batch "$BATCH" --threads "$THREADS" \
      --steps "$STEPS" --warmup "$WARMUP" "${ref_extra[@]}")
    echo "$b"; echo "$r"
    .venv/bin/python -c 'import json,sys; b, r = (json.loads(x)["momentum_shape"] for x in sys.argv[1:]); sys.exit(
        None if b == r else f"braid and the reference ran different shapes:\n  braid     {b}\n  reference {r}")' "$b" "$r"
    braid+=("$(echo "$b" | field step_seconds)") braid_cpu+=("$(echo "$b" | field cpu_seconds)")
    ref+=("$(echo "$r" | field step_seconds)") ref_cpu+=("$(echo "$r" | field cpu_seconds)")
  done
  summary+=("$(.venv/bin/python - "$model" "$PRESET" "$BATCH" "$THREADS" "${braid[*]}" "${ref[*]}" "${braid_cpu[*]}" "${ref_cpu[*]}" <<'PY'
import statistics, sys
model, preset, batch, threads = sys.argv[1:5]
mb, mr, cb, cr = (statistics.median(float(x) for x in v.split()) for v in sys.argv[5:9])
ref = "torchmultimodal" if model == "albef" else "transformers"
print(f"{model.upper()}-{preset} step (batch {batch}, {threads} threads): braid {mb*1e3:.0f} ms, {ref} {mr*1e3:.0f} ms, "
      f"ratio {mb/mr:.2f}x; CPU time braid {cb:.2f} s, {ref} {cr:.2f} s, ratio {cb/cr:.2f}x")
PY
)")
done
printf '%s\n' "${summary[@]}"
