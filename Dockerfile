# blkfuse test image.
#   docker build -t blkfuse .                       (or: scripts/docker-test, which also runs it)
#   docker run --rm --init --device /dev/fuse --cap-add SYS_ADMIN --security-opt apparmor=unconfined blkfuse
#
# BASE: any Debian 12 (bookworm) image, e.g. one made with debootstrap + `docker import`
#   where Docker Hub is out of reach (see README, "In Docker").
# EXTRA_CA_CERTS: PEM text of extra CA certificates to trust, for networks whose HTTPS goes
#   through an intercepting proxy; they are added to the system store, which pip then uses.
ARG BASE=debian:bookworm
FROM ${BASE}

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
# from its sdist with scripts/pyfuse3's patch), the source.
COPY scripts/setup scripts/setup
RUN scripts/setup --system \
    && if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then update-ca-certificates; fi
COPY pyproject.toml ./
COPY scripts/pyfuse3 scripts/pyfuse3
RUN scripts/setup --deps
COPY . .
RUN scripts/setup

CMD ["scripts/test"]
