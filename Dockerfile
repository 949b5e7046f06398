# Two stages: build a wheel of the gateway and its dependencies, then install them alone.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 nbia && mkdir -m 700 /data && chown nbia /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels nbia-proxy && rm -rf /wheels
USER nbia
WORKDIR /data
# Inside a container the gateway must listen on all interfaces to be reachable.
ENV NBIA_PROXY_HOST=0.0.0.0 \
    NBIA_PROXY_ALLOW_REMOTE_OPEN=true \
    NBIA_PROXY_PORT=8080 \
    NBIA_PROXY_DATA_DIR=/data
EXPOSE 8080
VOLUME ["/data"]
CMD ["nbia-proxy", "serve"]
