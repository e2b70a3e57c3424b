# Switchboard node image.
#
# Multi-stage, all stages on the same base: `deps` makes a virtualenv with the
# runtime dependencies, `project` provides switchboard's own wheel, and the final
# stage copies the virtualenv, installs the wheel into it and runs as an
# unprivileged user (uid 10001). Dependencies and code are separate layers, so a
# code change rebuilds only the small ones. No secret is baked in: the cluster
# secret is mounted at run time (docker-compose.yml: the compose secret
# switchboard_secret, read with `switchboard node --secret-file`).
#
# The base is a build argument; the default is the standard Python image, for
# anyone who can pull from a registry:
#
#   docker build -t switchboard:latest .
#
# Without a registry, scripts/build-base-image.sh makes a local Debian bookworm
# base (debootstrap + docker import) and scripts/build-image.sh prebuilds every
# wheel on the host into build/docker-wheels/{deps,project}/ and then runs
#
#   docker build --network none --build-arg BASE_IMAGE=switchboard-base:bookworm \
#       -t switchboard:latest .
#
# With prebuilt wheels nothing is downloaded: pip installs with --no-index
# --find-links. Without them the wheels are built from the package index here.
# The base needs python3 with venv, of the Python version the wheels are for (3.11).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS deps
# Only pyproject.toml and the dependency wheels (the [s] makes the wheels optional).
COPY pyproject.toml build/docker-wheels/dep[s] /src/
RUN set -eu; \
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore; \
    python3 -m venv /opt/switchboard; \
    cd /src; \
    if ! ls ./*.whl >/dev/null 2>&1; then \
        echo "no prebuilt wheels: building the dependencies' wheels from the package index"; \
        [ -f README.md ] || : > README.md; \
        /opt/switchboard/bin/pip wheel --use-pep517 --wheel-dir /src . ; \
        rm -f /src/switchboard-*.whl; \
    fi; \
    /opt/switchboard/bin/pip install --no-index --find-links /src /src/*.whl; \
    rm -rf /src

FROM deps AS project
COPY . /src/
RUN set -eu; \
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore; \
    mkdir /wheels; \
    if ls /src/build/docker-wheels/project/switchboard-*.whl >/dev/null 2>&1; then \
        cp /src/build/docker-wheels/project/switchboard-*.whl /wheels/; \
    else \
        /opt/switchboard/bin/pip wheel --use-pep517 --no-deps --wheel-dir /wheels /src; \
    fi

FROM ${BASE_IMAGE}
# Everything but the code first: these layers stay cached across code changes.
RUN groupadd --system --gid 10001 switchboard \
    && useradd --system --uid 10001 --gid switchboard --no-create-home \
         --home-dir /var/lib/switchboard --shell /usr/sbin/nologin switchboard \
    && mkdir -p /var/lib/switchboard \
    && chown switchboard:switchboard /var/lib/switchboard \
    && chmod 0700 /var/lib/switchboard
LABEL org.opencontainers.image.title="switchboard" \
      org.opencontainers.image.description="Switchboard node: fault-tolerant presence and messaging cluster" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/switchboard/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SWITCHBOARD_READYZ_URL=http://127.0.0.1:7400/readyz
# client, Raft, admin, metrics/health: the ports docker-compose.yml uses
EXPOSE 7100 7200 7300 7400
# Healthy = /readyz answers 200: a member of a quorum, caught up, not fenced, not
# drained. Run the node with --metrics 0.0.0.0:7400 (or set SWITCHBOARD_READYZ_URL).
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['SWITCHBOARD_READYZ_URL'], timeout=2)"]
WORKDIR /var/lib/switchboard
ENTRYPOINT ["switchboard"]
CMD ["--help"]
# The virtualenv is owned by root: the node's user can run it, not change it.
COPY --from=deps /opt/switchboard /opt/switchboard
COPY --from=project /wheels/ /tmp/project/
# Offline: every dependency is in the virtualenv already, or this fails.
RUN PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore \
        /opt/switchboard/bin/pip install --no-index --find-links /tmp/project \
        /tmp/project/switchboard-*.whl \
    && rm -rf /tmp/project \
    && switchboard --help >/dev/null
USER switchboard
