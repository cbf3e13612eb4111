#!/usr/bin/env bash
# The demo job: a tiny model pretrained by 2 CPU workers on the synthetic image-caption set, with
# checkpoints and a held-out evaluation at the end. Installs what it needs on first use.
#   ./scripts/demo.sh            CLIP-tiny (about 30 s)
#   ./scripts/demo.sh albef      ALBEF-tiny: ITC with momentum distillation, ITM, MLM
#   ./scripts/demo.sh blip       BLIP-tiny: ITC, ITM, captioning; then `braid infer` captions
# Any further arguments go to `braid run`.
set -euo pipefail
cd "$(dirname "$0")/.."
family=clip
if [[ $# -gt 0 && "$1" != -* ]]; then
  family=$1
  shift
fi
case "$family" in
  clip | albef | blip) ;;
  *) echo "demo: unknown model family '$family' (choose clip, albef or blip)" >&2; exit 2 ;;
esac
./scripts/setup.sh
cargo build --release --bins
if [[ ! -f data/synth/train/manifest.json || ! -f data/synth/tokenizer-bert.json ]]; then
  ./target/release/braid data synth data/synth --train-samples 10000 --eval-samples 500
fi
./target/release/braid run "examples/$family-tiny.toml" --workers 2 "$@"
if [[ "$family" == blip ]]; then
  ./target/release/braid infer --task caption --job examples/blip-tiny.toml --data data/synth/eval/manifest.json --limit 8
fi
