# syntax=docker/dockerfile:1
# braid's coordinator: membership, rendezvous, data plan and checkpoint commit. It does not link
# libtorch and needs no GPU. Build from the repository root:
#
#   docker build -f deploy/docker/coordinator.Dockerfile -t braid-coordinator:0.1.0 .

FROM rust:1.95-bookworm AS builder
WORKDIR /opt/braid
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    deploy/docker/build.sh coordinator

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 braid \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin braid
COPY --from=builder /opt/braid/target/release/braid-coordinator /usr/local/bin/braid-coordinator
USER 10001:10001
EXPOSE 7070
ENTRYPOINT ["braid-coordinator"]
