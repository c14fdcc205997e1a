# The broker's image (`tokenfleet-broker`): multi-stage, the runtime stage FROM scratch with the binary, the
# libraries it links, the CA bundle and an unprivileged user (65532); no shell at run time.
#
# From source (a Rust toolchain image is pulled for the build stage):
#   buildah bud -f images/broker.Dockerfile -t tokenfleet/tokenfleet-broker:VERSION .      (or docker build)
# From release binaries already built (scripts/build-images.sh; no toolchain image needed):
#   images/rootfs.sh target/release/tokenfleet-broker DIR
#   buildah bud -f images/broker.Dockerfile --build-context rootfs=DIR -t tokenfleet/tokenfleet-broker:VERSION .
# A `rootfs` build context replaces the build stages, which are then skipped.
#
# Probe-friendly without a HEALTHCHECK: GET /healthz and /readyz on the HTTP port.
ARG RUST_IMAGE=rust:1-bookworm

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tokenfleet-broker --bin tokenfleet-broker \
 && images/rootfs.sh target/release/tokenfleet-broker /rootfs

FROM scratch AS rootfs
COPY --from=build /rootfs/ /

FROM scratch
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="tokenfleet-broker" \
      org.opencontainers.image.description="tokenfleet token broker: holds provider credentials and refresh tokens sealed, runs consent flows, issues short-lived access tokens to enrolled agents" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="tokenfleet"
COPY --from=rootfs / /
USER 65532:65532
EXPOSE 50051/tcp 8080/tcp
ENTRYPOINT ["/usr/local/bin/tokenfleet-broker"]
CMD ["serve"]
