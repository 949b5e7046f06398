# Two stages: build wheels of the gateway and its dependencies, then install those alone into a
# clean image (no compiler, no pip cache, no sources). tests/test_image.py replays these steps
# without a Docker engine, so a file the package needs but no COPY brings in fails a test.
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# /series-cache: the mount point of a binary_dir volume that replicas share (deploy/compose.yaml).
# Docker gives a new named volume the owner and mode of its mount point: made here for the
# gateway's user, or the volume would be root's and the series cache could not write.
RUN groupadd --gid 10001 nbia \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /data nbia \
    && mkdir /data /series-cache \
    && chown 10001:10001 /data /series-cache \
    && chmod 0700 /data /series-cache
COPY --from=build /wheels /wheels
# Only the wheels built above: --no-index fails the build if one is missing.
RUN pip install --no-cache-dir --no-index --find-links /wheels /wheels/nbia_proxy-*.whl \
    && rm -rf /wheels
USER 10001:10001
WORKDIR /data
# Inside a container the gateway must listen on all interfaces to be reachable.
ENV NBIA_PROXY_HOST=0.0.0.0 \
    NBIA_PROXY_ALLOW_REMOTE_OPEN=true \
    NBIA_PROXY_PORT=8080 \
    NBIA_PROXY_DATA_DIR=/data
EXPOSE 8080
VOLUME ["/data"]
# The slim image has no curl: ask /healthz with the interpreter the gateway runs on.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('NBIA_PROXY_PORT', '8080'), timeout=4)"]
CMD ["nbia-proxy", "serve"]
