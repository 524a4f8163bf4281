# syntax=docker/dockerfile:1
# One image for every service of the federation; the command picks the service:
#   docker run IMAGE registry            (or consent, hub-node, imaging-gateway)
#   docker run IMAGE python -m hie_hub   (any command runs as given)
#   docker run IMAGE migrate registry    (Alembic to head, then exit)
# Kubernetes (deploy/k8s) sets the command itself: `python -m hie_<service>`.
# Not built on the machine this was written on (no container engine there); see docs/operations.md.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: install the project and its pinned dependencies into a virtual environment ---------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/hie
ENV PATH=/opt/hie/bin:$PATH
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
COPY cli ./cli
# The project's runtime dependencies only (the dev extra stays out), each at its constraints.txt
# pin; the build backend (hatchling) is pinned there too. Every dependency ships manylinux wheels
# for CPython 3.11, so no compiler is needed. The cache mount keeps downloads between builds.
RUN --mount=type=cache,target=/root/.cache/pip \
    PIP_CONSTRAINT=constraints.txt pip install . \
    && pip check \
    && python -m compileall -q -j 0 /opt/hie/lib

# --- runtime: the virtual environment on a clean slim image, as an unprivileged user ------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="hie-federation" \
      org.opencontainers.image.description="Federated health information exchange (진료정보교류): registry, consent, hub node, imaging gateway" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 hie \
    && useradd --system --uid 10001 --gid hie --home-dir /var/lib/hie --shell /usr/sbin/nologin hie \
    && install -d -o hie -g hie -m 0750 /var/lib/hie /var/lib/hie/spool
COPY --from=build /opt/hie /opt/hie
COPY --chmod=0755 deploy/docker/hie_service.py /opt/hie/bin/hie-service
# Inside a container the services listen on every interface (their default is 127.0.0.1).
ENV PATH=/opt/hie/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/hie \
    HIE_REGISTRY_HOST=0.0.0.0 \
    HIE_CONSENT_HOST=0.0.0.0 \
    HIE_HUB_HOST=0.0.0.0 \
    HIE_IMAGING_HOST=0.0.0.0 \
    HIE_IMAGING_SPOOL_DIR=/var/lib/hie/spool
WORKDIR /var/lib/hie
USER 10001:10001
# registry 8001, consent 8002, hub node 8010, imaging gateway 8020 (HTTP) and 11112 (DICOM).
EXPOSE 8001 8002 8010 8020 11112
# Docker's own health check (Kubernetes uses the probes in deploy/k8s instead): GET /healthz on
# the port of whichever service runs as PID 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["hie-service", "healthcheck"]
ENTRYPOINT ["hie-service"]
CMD ["registry"]
