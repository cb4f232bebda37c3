# syntax=docker/dockerfile:1
#
# registry-gate container image.
#
#   docker build -t registry-gate .
#   docker run -p 5000:5000 -v registry-gate-cache:/var/lib/registry-gate registry-gate
#
# Stage 1 builds wheels for the gate and its dependencies; stage 2 installs them into a
# slim runtime with no compiler, no pip cache and no build tooling, running as a fixed
# non-root uid (10001) so volume ownership is predictable (Kubernetes fsGroup 10001).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# README.md is the package's long description (pyproject `readme`): the build needs it.
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
ARG GATE_UID=10001
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATE_HEALTHCHECK_URL=http://127.0.0.1:5000/healthz
# Not REGISTRY_GATE_*: every variable with that prefix is a gate.yaml override.

RUN groupadd --system --gid "${GATE_UID}" registry-gate \
 && useradd --system --uid "${GATE_UID}" --gid "${GATE_UID}" --no-create-home \
      --home-dir /var/lib/registry-gate --shell /usr/sbin/nologin registry-gate

# The wheels are bind-mounted from the build stage, so they never become a layer here.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/*.whl

# Default configuration and the example policies; mount your own /etc/registry-gate
# (or just gate.yaml and policies/) to replace them.
COPY deploy/gate.yaml /etc/registry-gate/gate.yaml
COPY policies/ /etc/registry-gate/policies/
RUN mkdir -p /var/lib/registry-gate/cache /var/lib/registry-gate/audit \
 && chown -R "${GATE_UID}:${GATE_UID}" /var/lib/registry-gate

USER ${GATE_UID}:${GATE_UID}
WORKDIR /var/lib/registry-gate
VOLUME ["/var/lib/registry-gate", "/etc/registry-gate"]
EXPOSE 5000

# slim has no curl: ask the gate with Python. GATE_HEALTHCHECK_URL may be https:// when
# gate.yaml sets `tls:` (the certificate is not verified: this only asks "is it up?").
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python3", "-c", "import os, ssl, sys, urllib.request; url = os.environ.get('GATE_HEALTHCHECK_URL', 'http://127.0.0.1:5000/healthz'); ctx = ssl._create_unverified_context(); sys.exit(0 if urllib.request.urlopen(url, timeout=4, context=ctx).status == 200 else 1)"]

# SIGTERM drains in-flight requests and stops; SIGHUP reloads the policy files
# (`docker kill --signal HUP <container>`).
STOPSIGNAL SIGTERM
ENTRYPOINT ["registry-gate"]
CMD ["serve", "--config", "/etc/registry-gate/gate.yaml"]
