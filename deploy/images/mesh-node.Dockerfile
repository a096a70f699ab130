# syntax=docker/dockerfile:1
# mesh-node and its kernel programs. Build from the workspace root:
#   docker build -f deploy/images/mesh-node.Dockerfile -t nodemesh/mesh-node:dev .
# (cargo xtask kind-up does). Checked offline by tests/tests/deploy_manifests.rs (hadolint, and
# that what is copied is what the workspace builds).

# Build stage: the same recipe as on a developer's machine. `cargo xtask build-ebpf` installs
# Debian's Rust with its standard library source, LLVM 22 and bpf-linker (TOOLCHAIN.md), then
# builds the eBPF object; the user-space binary is built with the image's rustup toolchain.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo xtask build-ebpf \
    && cargo build --release --locked -p mesh-node --bin mesh-node \
    && mkdir -p /out \
    && cp target/release/mesh-node target/ebpf/bpfel-unknown-none/release/mesh-ebpf /out/

# Runtime: glibc and libgcc only (mesh-node links nothing else and runs no other program).
# Root: mesh-node loads BPF programs and enters pod network namespaces (see
# deploy/base/mesh-node.yaml for the privileges and why). Distroless publishes no version tags:
# pin a digest (`@sha256:...`) for a release.
# hadolint ignore=DL3007
FROM gcr.io/distroless/cc-debian12:latest
COPY --from=build /out/mesh-node /usr/bin/mesh-node
# Where mesh-node looks for its kernel programs in an image (--bpf-object overrides it).
COPY --from=build /out/mesh-ebpf /usr/lib/nodemesh/mesh-ebpf
ENV NODEMESH_BPF_OBJECT=/usr/lib/nodemesh/mesh-ebpf
# mesh-node refuses to run as another user.
# hadolint ignore=DL3002
USER 0:0
ENTRYPOINT ["/usr/bin/mesh-node"]
