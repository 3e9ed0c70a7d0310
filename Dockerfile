# syntax=docker/dockerfile:1
# wharf in a slim image, running as an unprivileged user.
#
#   docker build -t wharf .
#   docker run --rm --stop-timeout 30 -p 127.0.0.1:6969:6969 -p 127.0.0.1:8080:8080 \
#     -p 127.0.0.1:9999:9999 -p 127.0.0.1:9898:9898 wharf
#
# (--stop-timeout: Docker kills after 10 s by default; the config drains for up to 25 s.)
#
# Docker's default seccomp profile refuses io_uring_setup: with backend = "auto" wharf then
# runs on epoll and logs "backend auto: using epoll because io_uring_setup is not permitted".
# To run io_uring in a container, allow those three system calls with a custom profile (see
# "Running in production" in the README).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p wharf \
    && strip target/release/wharf

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /srv/wharf wharf \
    && mkdir -p /srv/wharf/files /etc/wharf
COPY --from=build /src/target/release/wharf /usr/local/bin/wharf
COPY configs/container.toml /etc/wharf/wharf.toml
COPY files/ /srv/wharf/files/
USER 10001:10001
WORKDIR /srv/wharf
EXPOSE 6969 8080 9999 9898
# The config is validated before anything binds; a bad one exits 2 with every error listed.
ENTRYPOINT ["/usr/local/bin/wharf"]
CMD ["serve", "--config", "/etc/wharf/wharf.toml"]
