# syntax=docker/dockerfile:1
# The fleetstream worker image: `docker build -t fleetstream .`, then `docker run fleetstream worker --help`.
# Stage 1 builds a virtual environment with the runtime dependencies only (the RocksDB table store included,
# no test or benchmark extras); stage 2 copies that environment into a slim image and runs it as a non-root user.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/fleetstream
ENV PATH=/opt/fleetstream/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fleetstream ./fleetstream
RUN pip install --upgrade pip && pip install ".[rocksdb]"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="fleetstream" \
      org.opencontainers.image.description="Fleet and asset tracking stream processor (Faust + Kafka)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 fleetstream \
    && useradd --system --uid 10001 --gid fleetstream --home-dir /var/lib/fleetstream --shell /usr/sbin/nologin fleetstream \
    && mkdir -p /var/lib/fleetstream/data \
    && chown -R fleetstream:fleetstream /var/lib/fleetstream
COPY --from=build /opt/fleetstream /opt/fleetstream
ENV PATH=/opt/fleetstream/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FLEETSTREAM_DATA_DIR=/var/lib/fleetstream/data \
    NUMBA_CACHE_DIR=/var/lib/fleetstream/numba-cache \
    FLEETSTREAM_WEB_HOST=0.0.0.0 \
    FLEETSTREAM_WEB_PORT=6066
WORKDIR /var/lib/fleetstream
USER 10001:10001
EXPOSE 6066
# liveness only: /ready (tables recovered) is for load balancers and Kubernetes readiness
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('FLEETSTREAM_WEB_PORT', '6066'), timeout=4)"]
ENTRYPOINT ["fleetstream"]
CMD ["worker"]
