# anp-proxy in a container (docs/DEPLOY.md, "Container image"). Not built in
# CI. Gateway and receiver are the same binary: the command says which.
#
#   docker build -t anp-proxy .
#   docker run --ulimit nofile=1048576:1048576 --ulimit memlock=-1:-1 \
#     --stop-timeout 40 -v /etc/anp-proxy:/etc/anp-proxy:ro \
#     -p 8089:8089 anp-proxy gateway --config /etc/anp-proxy/config.toml
#
# io_uring: Docker's default seccomp profile refuses its system calls, so the
# runtimes fall back to epoll (the start line says `driver=legacy (epoll)`);
# allow io_uring_setup/enter/register in the profile to get io_uring.

FROM rust:1.88-bookworm AS build
WORKDIR /src
# Cargo.toml names the bench tools' sources: the whole tree is needed to
# resolve the package, only the main binary is built.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin anp-proxy \
 && strip target/release/anp-proxy

FROM debian:bookworm-slim
# CA certificates: wss:// gateways and DID documents fetched over HTTPS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home-dir /var/lib/anp-proxy --create-home anp-proxy
COPY --from=build /src/target/release/anp-proxy /usr/local/bin/anp-proxy
COPY config.toml /etc/anp-proxy/config.toml
USER anp-proxy
WORKDIR /var/lib/anp-proxy
# Container defaults through the environment (they win over the file; pass
# -e to change them): listen on every interface (the shipped config says
# 127.0.0.1), keep the SQLite registry in the writable volume (relative
# paths resolve next to the config, usually a read-only mount). Logs go to
# stderr (`log_dir = ""` in the shipped config). A receiver keeps its
# instance id next to its config: on a read-only mount, set
# `receiver.instance_id` (ANP_PROXY_RECEIVER__INSTANCE_ID).
ENV ANP_PROXY_GATEWAY__HOST=0.0.0.0 \
    ANP_PROXY_GATEWAY__DATABASE__PATH=/var/lib/anp-proxy/anp-proxy.db
VOLUME /var/lib/anp-proxy
# SIGTERM is the drain (gateway) or graceful shutdown (receiver).
STOPSIGNAL SIGTERM
EXPOSE 8089
ENTRYPOINT ["/usr/local/bin/anp-proxy"]
CMD ["gateway", "--config", "/etc/anp-proxy/config.toml"]
