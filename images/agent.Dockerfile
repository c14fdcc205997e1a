# The agent's image (`tokenfleet-agent`): multi-stage, the runtime stage FROM scratch with the binary, the
# libraries it links, the CA bundle and an unprivileged user (65532); no shell at run time.
#
# From source (a Rust toolchain image is pulled for the build stage):
#   buildah bud -f images/agent.Dockerfile -t tokenfleet/tokenfleet-agent:VERSION .      (or docker build)
# From release binaries already built (scripts/build-images.sh; no toolchain image needed):
#   images/rootfs.sh target/release/tokenfleet-agent DIR
#   buildah bud -f images/agent.Dockerfile --build-context rootfs=DIR -t tokenfleet/tokenfleet-agent:VERSION .
# A `rootfs` build context replaces the build stages, which are then skipped.
#
# Probe-friendly without a HEALTHCHECK: the SMTP port accepts connections.
ARG RUST_IMAGE=rust:1-bookworm

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tokenfleet-agent --bin tokenfleet-agent \
 && images/rootfs.sh target/release/tokenfleet-agent /rootfs

FROM scratch AS rootfs
COPY --from=build /rootfs/ /

FROM scratch
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="tokenfleet-agent" \
      org.opencontainers.image.description="tokenfleet fleet agent: legacy SMTP/POP3 for printers, durable spool, OAuth 2.0 (XOAUTH2) delivery upstream" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="tokenfleet"
COPY --from=rootfs / /
USER 65532:65532
# SMTP and POP3 for the printers; 9465 for /metrics and /healthz when `[metrics] listen` is
# set to 0.0.0.0:9465 (the default listens on loopback only).
EXPOSE 2525/tcp 1110/tcp 9465/tcp
ENTRYPOINT ["/usr/local/bin/tokenfleet-agent"]
CMD ["run"]
