# Switchboard node image.
#
# Two stages on the same base: `build` makes a virtualenv with switchboard and its
# runtime dependencies, the final stage copies only that virtualenv and runs as an
# unprivileged user. No secret is baked in: the cluster secret is mounted at run
# time (docker-compose.yml mounts it as the compose secret switchboard_secret).
#
# The base is a build argument. The default is the standard Python image, for
# anyone who can pull from a registry:
#
#   docker build -t switchboard:latest .
#
# Without a registry, scripts/build-base-image.sh makes a local Debian bookworm
# base (debootstrap + docker import) and scripts/build-image.sh builds the wheels
# on the host into build/docker-wheels/ and builds FROM that base, so nothing is
# downloaded during the image build (see docs/docker.md):
#
#   docker build --build-arg BASE_IMAGE=switchboard-base:bookworm -t switchboard:latest .
#
# The base needs python3 (3.11, the version the wheels are built for) with venv.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# .dockerignore lets in only the package sources, pyproject.toml, README.md and
# build/docker-wheels/ (when scripts/build-image.sh made it).
COPY . /src
# With prebuilt wheels the install is offline (--no-index). Without them, the
# wheels are built here from the package index first, then installed the same way.
RUN set -eu; \
    python3 -m venv /opt/switchboard; \
    if ls build/docker-wheels/*.whl >/dev/null 2>&1; then \
        echo "installing from the prebuilt wheels in build/docker-wheels (offline)"; \
        wheels=build/docker-wheels; \
    else \
        echo "no prebuilt wheels: building them from the package index"; \
        /opt/switchboard/bin/pip wheel --wheel-dir /tmp/wheels .; \
        wheels=/tmp/wheels; \
    fi; \
    /opt/switchboard/bin/pip install --no-index --find-links "$wheels" switchboard; \
    /opt/switchboard/bin/switchboard --help >/dev/null

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="switchboard" \
      org.opencontainers.image.description="Switchboard node: fault-tolerant presence and messaging cluster" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 switchboard \
    && useradd --system --uid 10001 --gid switchboard --no-create-home \
         --home-dir /var/lib/switchboard --shell /usr/sbin/nologin switchboard \
    && mkdir -p /var/lib/switchboard \
    && chown switchboard:switchboard /var/lib/switchboard \
    && chmod 0700 /var/lib/switchboard
COPY --from=build /opt/switchboard /opt/switchboard
ENV PATH=/opt/switchboard/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SWITCHBOARD_READYZ_URL=http://127.0.0.1:7400/readyz
USER switchboard
WORKDIR /var/lib/switchboard
# client, Raft, admin, metrics/health (the ports docker-compose.yml uses)
EXPOSE 7100 7200 7300 7400
# Healthy = /readyz answers 200: a member of a quorum, caught up, not fenced, not
# drained. Run the node with --metrics 0.0.0.0:7400 (or set SWITCHBOARD_READYZ_URL).
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['SWITCHBOARD_READYZ_URL'], timeout=2)"]
ENTRYPOINT ["switchboard"]
CMD ["--help"]
