# syntax=docker/dockerfile:1
# braid's worker (and the whole `braid` CLI), with libtorch 2.11.0 and the CUDA 13 libraries of
# PyTorch's wheel. Runs on GPU nodes (NVIDIA driver >= 580 through the NVIDIA container toolkit)
# and on CPU nodes alike. Build from the repository root:
#
#   docker build -f deploy/docker/worker.Dockerfile -t braid-worker:0.1.0 .
#
# Where libtorch is at run time: the builder builds in /opt/braid, so `braid` carries the rpath
# /opt/braid/.venv/torch/lib (scripts/torch_link.rs; .venv/torch links to the venv's torch
# package). The runtime image puts libtorch's lib/ at exactly that path, and the wheel's CUDA
# libraries (site-packages/nvidia) next to it at /opt/braid/.venv/nvidia, where libtorch's own
# rpath ($ORIGIN/../../nvidia/<lib>/lib) looks for them. No LD_LIBRARY_PATH, no Python at run
# time. The CUDA base image only adds the NVIDIA_* settings and the driver compatibility
# libraries: cuBLAS, cuDNN, NCCL and the CUDA runtime come from the wheel, in the versions
# libtorch was built with, so the larger -runtime image would only duplicate them.

ARG CUDA_BASE=nvidia/cuda:13.0.1-base-ubuntu24.04

FROM rust:1.95-bookworm AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/braid
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    deploy/docker/build.sh worker
RUN mkdir -p /stage/.venv/torch \
 && cp -a .venv/torch/lib /stage/.venv/torch/lib \
 && cp -a "$(readlink -f .venv/torch)/../nvidia" /stage/.venv/nvidia \
 && rm -f /stage/.venv/torch/lib/libtorch_python.so

FROM ${CUDA_BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 braid \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/braid --shell /bin/bash braid
COPY --from=builder /stage/.venv /opt/braid/.venv
COPY --from=builder /opt/braid/target/release/braid /usr/local/bin/braid
USER 10001:10001
ENTRYPOINT ["braid"]
CMD ["worker"]
