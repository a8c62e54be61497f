# syntax=docker/dockerfile:1
# The latentserve worker for NVIDIA GPUs: the worker built with its `cuda` feature. Build from
# the workspace root:
#   docker build -f images/worker-cuda.Dockerfile -t REGISTRY/latentserve-worker-cuda:0.1.0 .
#
# STATUS: the image builds the feature, but the CUDA forward pass is not implemented yet.
# `--device cuda` probes the GPU and its libraries, then exits non-zero with one line saying the
# forward pass is not in this build (docs/gpu.md). Run it with `--device cpu` until then.
#
# The `cuda` feature loads every CUDA library at run time (cudarc's dynamic loading) and compiles
# its kernels with NVRTC at start-up for the GPU it finds, so the build stage needs no CUDA
# toolkit, no driver and no GPU: it is the plain Rust image, like images/worker.Dockerfile. The
# run stage is NVIDIA's CUDA runtime image, which has cuBLAS, cuBLASLt and NVRTC; the driver's
# libcuda.so.1 comes from the node through the NVIDIA container toolkit.

ARG RUST_VERSION=1.89
ARG DEBIAN_RELEASE=bookworm
# CUDA 13 libraries need a driver of the 580 series or newer on the nodes; for nodes on a CUDA 12
# driver build with e.g. --build-arg CUDA_VERSION=12.8.1 (the worker looks for the .so.13 and
# .so.12 names of every library).
ARG CUDA_VERSION=13.0.0
# Ubuntu 24.04's glibc (2.39) is newer than bookworm's (2.36), which the binary is linked against;
# Ubuntu 22.04 (2.35) would be too old.
ARG UBUNTU_RELEASE=24.04

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p latentserve-worker --features cuda \
 && install -D -m 0755 target/release/latentserve-worker /out/latentserve-worker

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_RELEASE}
LABEL org.opencontainers.image.title="latentserve-worker-cuda" \
      org.opencontainers.image.description="latentserve inference worker (NVIDIA CUDA build): DeepSeek-style MLA + MoE models over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base image already asks the NVIDIA container toolkit for the compute driver libraries;
# which GPUs the container sees is up to the device plugin (the pod's nvidia.com/gpu limit).
COPY --from=build /out/latentserve-worker /usr/local/bin/latentserve-worker
# The demo model: what `serve` and `generate` load when no --model is given (the worker looks in
# <prefix>/share/latentserve/models/demo next to its binary).
COPY models/demo/ /usr/local/share/latentserve/models/demo/
# NVRTC output is cached per GPU architecture here (an unwritable cache only costs a recompile
# at each start); mount an emptyDir or a volume over it to keep it across restarts.
ENV LATENTSERVE_CACHE=/var/cache/latentserve
RUN install -d -o 65532 -g 65532 /var/cache/latentserve
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/latentserve-worker"]
CMD ["serve", "--device", "cuda"]
