#!/usr/bin/env bash
# braid vs the reference implementations: ALBEF (torchmultimodal) and BLIP (transformers)
# pretraining-step time on CPU, same shapes, batch, caption length, vocabulary, queue length,
# thread count, warm-up and step counts, measured in the same run (alternating, ROUNDS rounds per
# model) so machine noise hits both alike. What each side computes: bench/momentum_step.py's
# docstring and README.md's benchmark section.
# Prints each measurement and, per model, the ratio of median step times (braid / reference;
# lower is better, target <= 1.0).
#
#   MODELS="albef blip" PRESET=tiny BATCH=64 THREADS=1 STEPS=10 WARMUP=2 ROUNDS=3 bench/cpu_momentum.sh
#   PRESET=base BATCH=2 THREADS=2 STEPS=3 WARMUP=1 ROUNDS=2 bench/cpu_momentum.sh
# Optional: VOCAB, CONTEXT, QUEUE (passed to both sides; default: each side's preset default).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test >/dev/null
cargo build --release --bins -q
MODELS=${MODELS:-albef blip} PRESET=${PRESET:-tiny} BATCH=${BATCH:-64} THREADS=${THREADS:-1}
STEPS=${STEPS:-10} WARMUP=${WARMUP:-2} ROUNDS=${ROUNDS:-3}
braid_extra=() ref_extra=()
if [[ -n "${VOCAB:-}" ]]; then braid_extra+=(--vocab-size "$VOCAB"); ref_extra+=(--vocab "$VOCAB"); fi
if [[ -n "${CONTEXT:-}" ]]; then braid_extra+=(--context-length "$CONTEXT"); ref_extra+=(--context "$CONTEXT"); fi
if [[ -n "${QUEUE:-}" ]]; then braid_extra+=(--queue-size "$QUEUE"); ref_extra+=(--queue "$QUEUE"); fi
step_seconds() { .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["step_seconds"])'; }
summary=()
for model in $MODELS; do
  braid=() ref=()
  for _ in $(seq "$ROUNDS"); do
    b=$(./target/release/braid bench --family "$model" --preset "$PRESET" --batch "$BATCH" --threads "$THREADS" \
      --steps "$STEPS" --warmup "$WARMUP" "${braid_extra[@]}" --json)
    r=$(.venv/bin/python bench/momentum_step.py --model "$model" --preset "$PRESET" --batch "$BATCH" --threads "$THREADS" \
      --steps "$STEPS" --warmup "$WARMUP" "${ref_extra[@]}")
    echo "$b"; echo "$r"
    braid+=("$(echo "$b" | step_seconds)")
    ref+=("$(echo "$r" | step_seconds)")
  done
  summary+=("$(.venv/bin/python - "$model" "${braid[*]}" "${ref[*]}" "$PRESET" "$BATCH" "$THREADS" <<'PY'
import statistics, sys
model, b, r, preset, batch, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
b = [float(x) for x in b.split()]
r = [float(x) for x in r.split()]
mb, mr = statistics.median(b), statistics.median(r)
ref = "torchmultimodal" if model == "albef" else "transformers"
print(f"{model.upper()}-{preset} step (batch {batch}, {threads} threads): braid {mb*1e3:.0f} ms, {ref} {mr*1e3:.0f} ms, ratio {mb/mr:.2f}x")
PY
)")
done
printf '%s\n' "${summary[@]}"
