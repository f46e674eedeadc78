# tickvault: multi-stage build, Rust builder -> Debian slim runtime as a non-root user.
# Build: docker build -t tickvault .
FROM rust:1-bookworm AS builder
WORKDIR /src
# Dependencies first, so a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked || true
COPY migrations ./migrations
COPY build.rs ./
COPY src ./src
# tickvault_build_info{revision}: there is no .git here, so it comes as a
# build argument (docker-compose.prod.yml passes GIT_REVISION from .env).
ARG GIT_REVISION=unknown
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin tickvault \
    && strip target/release/tickvault

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tzdata \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tickvault \
    && useradd --system --uid 10001 --gid tickvault --home-dir /app --shell /usr/sbin/nologin tickvault
WORKDIR /app
COPY --from=builder /src/target/release/tickvault /usr/local/bin/tickvault
USER tickvault:tickvault
ENV TICKVAULT_LOG__FORMAT=json \
    TICKVAULT_HTTP__ADDR=0.0.0.0:9464 \
    RUST_LOG=info
EXPOSE 9464
# /ready through the CLI: exit 0 only when the database and NATS are up and every consumer is in place.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["tickvault", "health", "--url", "http://127.0.0.1:9464/ready"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tickvault"]
CMD ["run"]
