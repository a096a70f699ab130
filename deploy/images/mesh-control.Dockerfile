# syntax=docker/dockerfile:1
# mesh-control. Build from the workspace root:
#   docker build -f deploy/images/mesh-control.Dockerfile -t nodemesh/mesh-control:dev .
# (cargo xtask kind-up does). Checked offline by tests/tests/deploy_manifests.rs (hadolint, and
# that what is copied is what the workspace builds).

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mesh-control --bin mesh-control \
    && mkdir -p /out \
    && cp target/release/mesh-control /out/

# Runtime: glibc and libgcc only, as the distroless image's unprivileged user (65532, as the
# Deployment's runAsUser): mesh-control needs no privilege, only its CA secret and the API.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/mesh-control /usr/bin/mesh-control
USER 65532:65532
ENTRYPOINT ["/usr/bin/mesh-control"]
