# blkfuse images. Two targets:
#
#   test (the default, last stage): the whole test suite; scripts/docker-test builds and runs it
#     docker build -t blkfuse-test .
#     docker run --rm --init --device /dev/fuse --cap-add SYS_ADMIN --security-opt apparmor=unconfined blkfuse-test
#   runtime: blkfuse alone (no tests, no compilers), entrypoint `blkfuse`; scripts/docker-runtime-test
#     docker build --target runtime -t blkfuse .
#     docker run ... blkfuse mount --foreground IMAGE MOUNTPOINT      (README "In Docker")
#
# BASE: any Debian 12 (bookworm) or 13 (trixie) image, e.g. one made with debootstrap + `docker import`
#   where Docker Hub is out of reach (see README, "In Docker").
# EXTRA_CA_CERTS: PEM text of extra CA certificates to trust, for networks whose HTTPS goes
#   through an intercepting proxy; they are added to the system store, which pip then uses.
#   Only the build and test stages get them; the runtime image does not.
# With the classic builder every stage is built (runtime too, for the test image); with
# BuildKit (DOCKER_BUILDKIT=1) only the stages the target needs.
ARG BASE=debian:bookworm


# ---- build: blkfuse and its dependencies in /opt/blkfuse (pyfuse3 compiles against libfuse3)
FROM ${BASE} AS build
ARG EXTRA_CA_CERTS=""
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN set -e; if [ -n "$EXTRA_CA_CERTS" ]; then \
        mkdir -p /usr/local/share/ca-certificates; \
        printf '%s\n' "$EXTRA_CA_CERTS" | awk ' \
            /-----BEGIN CERTIFICATE-----/ { n++; f = sprintf("/usr/local/share/ca-certificates/blkfuse-extra-%d.crt", n) } \
            f { print > f } \
            /-----END CERTIFICATE-----/ { close(f); f = "" }'; \
    fi
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
        pkg-config libfuse3-dev patch ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/blkfuse
# pyfuse3 3.5.0 from its sdist with blkfuse's patches first: `pip install /src` then keeps it
COPY scripts/pyfuse3 /src/scripts/pyfuse3
RUN /src/scripts/pyfuse3/build /opt/blkfuse
COPY pyproject.toml README.md /src/
COPY blkfuse /src/blkfuse
RUN /opt/blkfuse/bin/pip install /src && /opt/blkfuse/bin/blkfuse --version \
    && /opt/blkfuse/bin/python -c 'from blkfuse.daemon.fs import missing_pyfuse3_features as m; \
assert not m(), f"pyfuse3 lacks {m()}"'


# ---- runtime: the interpreter, fuse3 (fusermount3, libfuse3) and the venv from `build`
FROM ${BASE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 fuse3 \
        e2fsprogs xfsprogs btrfs-progs \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/blkfuse /opt/blkfuse
ENV PATH=/opt/blkfuse/bin:$PATH
ENTRYPOINT ["blkfuse"]
CMD ["--help"]


# ---- test (default): the repository, its test dependencies, `scripts/test`
FROM ${BASE} AS test

ARG EXTRA_CA_CERTS=""
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# One file per certificate (update-ca-certificates hashes only the first of a file). The
# ca-certificates package, installed by scripts/setup below, picks them up when it configures.
RUN set -e; if [ -n "$EXTRA_CA_CERTS" ]; then \
        mkdir -p /usr/local/share/ca-certificates; \
        printf '%s\n' "$EXTRA_CA_CERTS" | awk ' \
            /-----BEGIN CERTIFICATE-----/ { n++; f = sprintf("/usr/local/share/ca-certificates/blkfuse-extra-%d.crt", n) } \
            f { print > f } \
            /-----END CERTIFICATE-----/ { close(f); f = "" }'; \
        ls /usr/local/share/ca-certificates; \
    fi

WORKDIR /src

# Layers from slowest-changing to fastest: Debian packages, Python dependencies (pyfuse3 built
# from its sdist with scripts/pyfuse3's patches), the source.
COPY scripts/setup scripts/setup
RUN scripts/setup --system \
    && if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then update-ca-certificates; fi
COPY pyproject.toml ./
COPY scripts/pyfuse3 scripts/pyfuse3
RUN scripts/setup --deps
COPY . .
RUN scripts/setup

CMD ["scripts/test"]
