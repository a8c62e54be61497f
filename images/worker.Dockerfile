# syntax=docker/dockerfile:1
# The latentserve worker for CPU nodes. Build from the workspace root:
#   docker build -f images/worker.Dockerfile -t REGISTRY/latentserve-worker:0.1.0 .
# For NVIDIA GPUs use images/worker-cuda.Dockerfile. Only the small demo model is in the image
# (the default without --model); the operator mounts real models read-only (hostPath, PVC or an
# OCI image volume) and passes --model.

ARG RUST_VERSION=1.89
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p latentserve-worker \
 && install -D -m 0755 target/release/latentserve-worker /out/latentserve-worker

FROM debian:${DEBIAN_RELEASE}-slim
LABEL org.opencontainers.image.title="latentserve-worker" \
      org.opencontainers.image.description="latentserve inference worker (CPU): DeepSeek-style MLA + MoE models over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/latentserve-worker /usr/local/bin/latentserve-worker
# The demo model: what `serve` and `generate` load when no --model is given (the worker looks in
# <prefix>/share/latentserve/models/demo next to its binary).
COPY models/demo/ /usr/local/share/latentserve/models/demo/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/latentserve-worker"]
CMD ["serve"]
