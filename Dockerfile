# kiln in a container: `kiln train` and `kiln serve` (docs/deploy.md).
#
#   make image                                   # CPU, on python:3.11-slim-bookworm
#   make image BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#              TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128   # GPU: run with --gpus all
#
# BASE is any Debian or Ubuntu image: a Python image is used as it is; one without Python (a
# CUDA runtime, plain Debian) gets its distribution's python3 and python3-venv. Versions are
# pinned by constraints.txt. No pip setting is baked in (a private index or local wheels come
# in at build time only, see PIP_CONFIG_FILE below), nor any token or password: those are
# given to `docker run` or compose when the container starts.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS python
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update -q \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# ---- build: the pinned dependencies in a virtualenv, /opt/kiln, and kiln as a wheel
FROM python AS build
# The CUDA build of the pinned torch (2.13.0+cuXXX satisfies torch==2.13.0), as `make setup`.
ARG TORCH_INDEX_URL=
# What the image can do: train (with the recipe metrics and plots) and serve on PostgreSQL.
ARG EXTRAS=metrics,plots,serve,postgres
# pip's settings for this stage only (a private index, local wheels): a pip.conf that the
# build mounts, e.g. `podman build -v $PWD/build-pip:/mnt:ro --build-arg
# PIP_CONFIG_FILE=/mnt/pip.conf` (docs/deploy.md). Neither the file nor the argument reaches
# the image: its last stage starts from `python`, not from this one.
ARG PIP_CONFIG_FILE
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/kiln
WORKDIR /src
COPY constraints.txt ./
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        /opt/kiln/bin/pip install -q -c constraints.txt torch --index-url "$TORCH_INDEX_URL"; \
    else \
        /opt/kiln/bin/pip install -q -c constraints.txt torch; \
    fi
# The dependencies (those of a stub package), then kiln as a wheel beside them: a change to
# kiln's code leaves the virtualenv, and the image's largest layer, as they were.
COPY pyproject.toml README.md ./
RUN mkdir kiln && touch kiln/__init__.py \
    && /opt/kiln/bin/pip install -q -c constraints.txt ".[$EXTRAS]" \
    && /opt/kiln/bin/pip uninstall -q -y kiln \
    && rm -rf kiln build kiln.egg-info
COPY kiln ./kiln
RUN /opt/kiln/bin/pip wheel -q --no-deps -w /dist .

# ---- the image: the virtualenv, the shipped configs and demo data, a non-root user
FROM python
# Any uid may run the image (`--user $(id -u):$(id -g)`, so that a mounted run directory
# stays its owner's): HOME, the data cache and the volumes' mount points are writable by all,
# sticky as /tmp.
ARG KILN_UID=10001
RUN echo "kiln:x:${KILN_UID}:${KILN_UID}:kiln:/home/kiln:/bin/sh" >> /etc/passwd \
    && echo "kiln:x:${KILN_UID}:" >> /etc/group \
    && mkdir -p /home/kiln /kiln/runs /kiln/.kiln_cache /srv/kiln \
    && chown "${KILN_UID}:${KILN_UID}" /home/kiln /kiln/runs /kiln/.kiln_cache /srv/kiln \
    && chmod 1777 /home/kiln /kiln/runs /kiln/.kiln_cache /srv/kiln
COPY --from=build /opt/kiln /opt/kiln
# (COPY, not RUN --mount=from: podman's layer cache would keep an older kiln)
COPY --from=build /dist /tmp/dist
RUN /opt/kiln/bin/pip install -q --no-deps --no-index --no-cache-dir \
        --disable-pip-version-check /tmp/dist/kiln-*.whl \
    && rm -r /tmp/dist \
    && /opt/kiln/bin/kiln --help > /dev/null
WORKDIR /kiln
COPY configs ./configs
COPY examples/data ./examples/data
ENV PATH=/opt/kiln/bin:$PATH HOME=/home/kiln PYTHONUNBUFFERED=1
USER ${KILN_UID}:${KILN_UID}
# runs/<name>/ of `kiln train` (run in /kiln), and `kiln serve --state-dir /srv/kiln`.
VOLUME ["/kiln/runs", "/srv/kiln"]
EXPOSE 8080
# A container running `kiln serve` is healthy when /api/health answers (at its --host and
# --port); any other (`kiln train`) while it runs.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["python", "-c", "import glob, sys, urllib.request\nfor f in glob.glob('/proc/[0-9]*/cmdline'):\n    try:\n        a = open(f).read().split('\\0')\n    except OSError:\n        continue\n    if 'serve' in a[1:4] and a[1].endswith('kiln'):\n        a = [p for x in a for p in (x.split('=', 1) if x.startswith('--') else [x])]\n        o = dict(zip(a, a[1:]))\n        host = o.get('--host', '127.0.0.1')\n        host = '127.0.0.1' if host in ('0.0.0.0', '::') else host\n        host = f'[{host}]' if ':' in host else host\n        port = o.get('--port', '8080')\n        urllib.request.urlopen(f'http://{host}:{port}/api/health', timeout=4)\n        sys.exit(0)\n"]
ENTRYPOINT ["kiln"]
CMD ["--help"]
