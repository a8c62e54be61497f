# syntax=docker/dockerfile:1
# The latentserve request router: one Deployment per ModelDeployment, in front of its workers.
# Build from the workspace root:
#   docker build -f images/router.Dockerfile -t REGISTRY/latentserve-router:0.1.0 .
# It holds no model (it asks a worker for the tokenizer) and writes nothing to disk, so the
# operator runs it as UID 65532 with a read-only root filesystem.

ARG RUST_VERSION=1.89
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# The cache mounts keep the crate registry and target/ between builds on the same builder;
# the binary is copied out because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p latentserve-router \
 && install -D -m 0755 target/release/latentserve-router /out/latentserve-router

FROM debian:${DEBIAN_RELEASE}-slim
LABEL org.opencontainers.image.title="latentserve-router" \
      org.opencontainers.image.description="latentserve request router: per-request, prefix-cache- and load-aware balancing over the workers of one ModelDeployment" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/latentserve-router /usr/local/bin/latentserve-router
# Numeric IDs, so that runAsNonRoot can verify them without an /etc/passwd entry.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/latentserve-router"]
