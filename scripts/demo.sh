#!/usr/bin/env bash
# The demo job: CLIP-tiny pretrained by 2 CPU workers on the synthetic image-caption set, with
# checkpoints and a held-out evaluation at the end. Installs what it needs on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --bins
if [[ ! -f data/synth/train/manifest.json ]]; then
  ./target/release/braid data synth data/synth --train-samples 10000 --eval-samples 500
fi
exec ./target/release/braid run examples/clip-tiny.toml --workers 2 "$@"
