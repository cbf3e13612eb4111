#!/usr/bin/env bash
# Builds what one of braid's container images ships, from the repository root:
#
#   deploy/docker/build.sh coordinator   target/release/braid-coordinator (no libtorch)
#   deploy/docker/build.sh worker        .venv with torch==2.11.0 (scripts/setup.sh), then
#                                        target/release/braid linked against it
#
# deploy/docker/<image>.Dockerfile RUNs exactly this, and tests/tests/deploy_k8s.rs runs it
# outside Docker, so the image build and the tested build cannot drift apart. Build output goes
# to stderr; the last line on stdout is the path of the built binary.
#
# The worker links libtorch the way every build of this repository does: scripts/setup.sh
# installs torch into .venv and links .venv/torch to the package, .cargo/config.toml points
# LIBTORCH there (the libtorch that LIBTORCH_USE_PYTORCH=1 would find, without changing
# torch-sys's build inputs and so rebuilding it), and scripts/torch_link.rs gives the binary
# an rpath of <repository>/.venv/torch/lib.
#
# Binaries are selected with --bin alone, not -p: dependency features then resolve as in the
# workspace build (`cargo build --release --bins`), so this builds the very binaries the tests
# run, and after that build it is a no-op. The coordinator still compiles without libtorch.
set -euo pipefail
cd "$(dirname "$0")/../.."

case "${1:-}" in
  coordinator)
    cargo build --release --locked --bin braid-coordinator >&2
    binary=target/release/braid-coordinator
    ;;
  worker)
    ./scripts/setup.sh >&2
    cargo build --release --locked --bin braid >&2
    binary=target/release/braid
    ;;
  *)
    echo "usage: $0 coordinator|worker" >&2
    exit 2
    ;;
esac
echo "$PWD/$binary"
