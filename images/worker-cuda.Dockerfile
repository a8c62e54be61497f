# syntax=docker/dockerfile:1
# NOT YET BUILDABLE: the worker has no `cuda` feature yet (its forward pass runs on CPU kernels).
# This file fixes the image layout the CUDA worker will have.
# The latentserve worker for NVIDIA GPUs: built with the worker's `cuda` feature (candle's CUDA
# backend) on the CUDA devel image, run on the much smaller CUDA runtime image (cuBLAS, cuRAND,
# NVRTC; the driver's libcuda comes from the node through the NVIDIA container toolkit).
# Build from the workspace root:
#   docker build -f images/worker-cuda.Dockerfile --build-arg CUDA_COMPUTE_CAP=90 \
#     -t REGISTRY/latentserve-worker-cuda:0.1.0 .
# Pods run it with `--device cuda` and a GPU limit (e.g. nvidia.com/gpu: 1).

ARG RUST_VERSION=1.89
ARG CUDA_VERSION=12.4.1
ARG UBUNTU_RELEASE=22.04

# rustc and cargo come from the official Rust image; they only need a glibc as new as Debian
# bookworm's, which Ubuntu 22.04 has.
FROM rust:${RUST_VERSION}-bookworm AS rust

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_RELEASE} AS build
# The GPU generation the kernels are compiled for (candle-kernels builds PTX for it; newer GPUs
# JIT the PTX). 80: A100, 86: A10/A40, 89: L4/L40S, 90: H100/H200. No GPU is needed to build.
ARG CUDA_COMPUTE_CAP=80
# LIBRARY_PATH: link against the driver stub; the node's real libcuda.so.1 is mounted into the
# container at run time.
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/cuda/bin:${PATH} \
    LIBRARY_PATH=/usr/local/cuda/lib64/stubs
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential pkg-config ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=rust /usr/local/cargo /usr/local/cargo
COPY --from=rust /usr/local/rustup /usr/local/rustup
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p latentserve-worker --features cuda \
 && install -D -m 0755 target/release/latentserve-worker /out/latentserve-worker

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_RELEASE}
LABEL org.opencontainers.image.title="latentserve-worker-cuda" \
      org.opencontainers.image.description="latentserve inference worker (NVIDIA CUDA): DeepSeek-style MLA + MoE models over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base image already asks the NVIDIA container toolkit for the compute driver libraries;
# which GPUs the container sees is up to the device plugin (the pod's nvidia.com/gpu limit).
COPY --from=build /out/latentserve-worker /usr/local/bin/latentserve-worker
# The demo model: what `serve` and `generate` load when no --model is given (the worker looks in
# <prefix>/share/latentserve/models/demo next to its binary).
COPY models/demo/ /usr/local/share/latentserve/models/demo/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/latentserve-worker"]
CMD ["serve", "--device", "cuda"]
