#!/usr/bin/env bash
# The test suite: installs what it needs on first use (torch into .venv, the Python reference
# packages), builds the binaries, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test
cargo build --release --bins
cargo test --release --workspace "$@"
