# syntax=docker/dockerfile:1
# The latentserve operator. Build from the workspace root:
#   docker build -f images/operator.Dockerfile -t REGISTRY/latentserve-operator:0.1.0 .
# The result is a small Debian image that runs the binary (linked against bookworm's glibc) as
# UID 65532; the operator writes nothing to disk, so the chart mounts the root filesystem read-only.

ARG RUST_VERSION=1.89
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# The cache mounts keep the crate registry and target/ between builds on the same builder;
# the binary is copied out because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p latentserve-operator \
 && install -D -m 0755 target/release/latentserve-operator /out/latentserve-operator

FROM debian:${DEBIAN_RELEASE}-slim

LABEL org.opencontainers.image.title="latentserve-operator" \
      org.opencontainers.image.description="The latentserve Kubernetes operator (ModelDeployment controller)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/latentserve-operator /usr/local/bin/latentserve-operator
# Numeric IDs, so that runAsNonRoot can verify them without an /etc/passwd entry.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/latentserve-operator"]
CMD ["run"]
