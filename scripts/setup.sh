#!/usr/bin/env bash
# Installs what braid needs to build and run: a project-local venv with torch==2.11.0 (libtorch
# for tch 0.24), and with `--test` the Python reference packages the test suite compares against.
# A no-op when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
TEST_PACKAGES=(open-clip-torch==3.3.0 safetensors numpy pillow ftfy regex transformers==5.24.0 "moto[server]" iopath kubernetes-validate==1.37.0)
# ALBEF's reference. Its wheel pins DALL-E and attrs, which its ALBEF modules never import (they
# need iopath, above, and torchvision, which open-clip-torch brings), so it goes in without them.
TORCHMULTIMODAL=torchmultimodal-nightly==2024.4.1

if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv" >&2
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION into .venv (a few minutes, once)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-cache-dir "torch==$TORCH_VERSION"
fi
torch_dir=$(.venv/bin/python -c "import os, torch; print(os.path.dirname(torch.__file__))")
ln -sfn "$torch_dir" .venv/torch
# CUDA builds of torch bring the CUDA runtime headers without their crt/ folder, which libtorch's
# CUDA headers include (braid's CUDA-graph shim is built against them): the nvidia-cuda-crt wheel
# of the same CUDA version adds it (about 1 MB).
cuda_version=$(.venv/bin/python -c "import torch; print(torch.version.cuda or '')")
if [[ -n "$cuda_version" ]] && ! compgen -G "$torch_dir/../nvidia/*/include/crt/host_config.h" >/dev/null; then
  echo "setup: installing the CUDA $cuda_version compiler-runtime headers (nvidia-cuda-crt)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-cache-dir --no-deps "nvidia-cuda-crt==$cuda_version.*"
fi

if [[ "${1:-}" == "--test" ]]; then
  # Debian packages the tests drive: `ip` (the partition test cuts a worker off inside a network
  # namespace), the Prometheus server (it scrapes a running job's /metrics) and Chromium (the
  # status page test renders the coordinator's page headless and screenshots it) and openssl
  # (the TLS tests make their own certificates).
  apt_install() { # PACKAGE COMMAND WHY
    command -v "$2" >/dev/null && return
    echo "setup: installing $1 ($2) for $3" >&2
    local sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
    { $sudo apt-get install -y -qq "$1" || { $sudo apt-get update -qq && $sudo apt-get install -y -qq "$1"; }; } >/dev/null 2>&1 \
      || echo "setup: could not install $1; $3 will fail or be skipped" >&2
  }
  apt_install iproute2 ip "the partition test"
  apt_install prometheus prometheus "the Prometheus scrape test"
  apt_install chromium chromium "the status page test"
  apt_install openssl openssl "the TLS tests (they make their own certificates)"
  if ! .venv/bin/python -c "import open_clip, safetensors, numpy, PIL, ftfy, transformers, moto.server, boto3, iopath, kubernetes_validate" 2>/dev/null; then
    echo "setup: installing test reference packages into .venv" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-cache-dir "torch==$TORCH_VERSION" "${TEST_PACKAGES[@]}"
  fi
  if ! .venv/bin/python -c "import torchmultimodal.models.albef.model" 2>/dev/null; then
    echo "setup: installing $TORCHMULTIMODAL into .venv" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-cache-dir --no-deps "$TORCHMULTIMODAL"
  fi
fi
