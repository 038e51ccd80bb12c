# syntax=docker/dockerfile:1
# overnight's one image: `overnight serve` by default (the API service), and
# `overnight worker` in the pods of a batch's Kubernetes Job (the Job sets the
# command; see src/overnight/runtimes/kubernetes/manifests.py WORKER_COMMAND), and the
# built-in mock engine for `mock` templates. Runs as uid/gid 10001 and works with a
# read-only root file system (deploy/kubernetes/ runs it that way): the only place it
# writes is the data directory, /var/lib/overnight (mount a volume there).
#
#   docker build -t overnight .
#   docker run --rm -p 8000:8000 -v overnight-data:/var/lib/overnight overnight

# Python 3.11 on Debian 12, pinned by tag and by the digest of its multi-architecture
# index (amd64 and arm64), so a rebuild gets the same bytes. To move on, look up the
# new digest (`docker buildx imagetools inspect python:3.11.X-slim-bookworm`) and
# change both parts together.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# -- build: the wheel, then a virtual environment with it and its dependencies -------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# Only what the wheel is built from (.dockerignore allows nothing else in).
COPY pyproject.toml README.md ./
COPY src ./src
# The image installs the wheel, as `pip install overnight[all]` would, not the source
# tree: what ships is exactly what the package declares (package data included).
# [all]: every store and storage backend and the Kubernetes client, so one image
# serves every deploy/kubernetes overlay and runs the Job workers. All of these
# have binary wheels for amd64 and arm64: no compiler is needed.
# (--without-pip: the build stage's pip installs into it; none ships in the image.)
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
 && wheel="$(echo /dist/overnight-*.whl)" \
 && python -m venv --without-pip /opt/overnight \
 && python -m pip --python /opt/overnight/bin/python install "${wheel}[all]" \
 && /opt/overnight/bin/overnight --version

# -- runtime ------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="overnight" \
      org.opencontainers.image.description="OpenAI-compatible batch inference for self-hosted LLM engines" \
      org.opencontainers.image.licenses="Apache-2.0"
# uid/gid 10001, as deploy/kubernetes/ runs the pods (runAsUser/runAsGroup/fsGroup);
# its home is the data directory, the one writable path.
RUN groupadd --system --gid 10001 overnight \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/overnight \
        --no-create-home --shell /usr/sbin/nologin overnight \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/overnight
COPY --from=build /opt/overnight /opt/overnight
# Bytecode was compiled at install time; nothing is written beside the code at run
# time (the root file system may be read-only).
ENV PATH=/opt/overnight/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/overnight \
    OVERNIGHT_DATA_DIR=/var/lib/overnight
WORKDIR /var/lib/overnight
USER 10001:10001
EXPOSE 8000
# `overnight serve`'s readiness, on the port it listens on (set OVERNIGHT_PORT, not
# --port, to move it). Kubernetes ignores HEALTHCHECK (deploy/kubernetes has its own
# probes on /health); run a worker under plain Docker with --no-healthcheck.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('OVERNIGHT_PORT', '8000') + '/health', timeout=4)"]
ENTRYPOINT ["overnight"]
CMD ["serve", "--host", "0.0.0.0"]
