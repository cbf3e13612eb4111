#!/usr/bin/env bash
# braid vs open_clip: CLIP-tiny training-step time on CPU, same shapes, batch and thread count,
# measured in the same run (alternating, 3 rounds each) so machine noise hits both alike.
# Prints each measurement and the ratio of medians (braid / open_clip; below 1.0 = braid faster).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test >/dev/null
cargo build --release --bins -q
BATCH=${BATCH:-64} THREADS=${THREADS:-1} STEPS=${STEPS:-20} ROUNDS=${ROUNDS:-3}
braid=() ref=()
for _ in $(seq "$ROUNDS"); do
  b=$(./target/release/braid bench --preset tiny --batch "$BATCH" --threads "$THREADS" --steps "$STEPS" --json)
  r=$(.venv/bin/python bench/open_clip_step.py --preset tiny --batch "$BATCH" --threads "$THREADS" --steps "$STEPS")
  echo "$b"; echo "$r"
  braid+=("$(echo "$b" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["step_seconds"])')")
  ref+=("$(echo "$r" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["step_seconds"])')")
done
.venv/bin/python - "${braid[*]}" "${ref[*]}" <<'PY'
import statistics, sys
b = [float(x) for x in sys.argv[1].split()]
r = [float(x) for x in sys.argv[2].split()]
mb, mr = statistics.median(b), statistics.median(r)
print(f"CLIP-tiny step (batch, threads as above): braid {mb*1e3:.1f} ms, open_clip {mr*1e3:.1f} ms, ratio {mb/mr:.2f}x")
PY
