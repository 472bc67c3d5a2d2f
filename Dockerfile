# signing-proxy as a container: a SigV4 signing sidecar for the containers next to it.
#
#   docker build -t signing-proxy:local .
#   docker run --rm -p 127.0.0.1:8080:8080 \
#     -v "$PWD/deploy/real-api-config.yaml:/etc/signing-proxy/config.yaml:ro" \
#     -v "$HOME/.aws:/home/signing-proxy/.aws:ro" -e AWS_PROFILE=dev \
#     -e PROXY_TOKEN -e UPSTREAM_URL=https://abc123.execute-api.eu-west-1.amazonaws.com/prod \
#     signing-proxy:local
#
# The image holds no configuration and no credentials. The config is a mounted file; credentials come
# at run time from the environment, a read-only ~/.aws mount, or the platform (ECS task role, EKS IRSA
# or Pod Identity). README.md ("Running in a container") has the details; docker-compose.yml is a runnable example.

# ---- build: a wheel for the project and one for each dependency, resolved from pyproject.toml
FROM python:3.12-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy/ proxy/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# ---- runtime: the wheels installed offline; no compiler, no build tools, no source tree
FROM python:3.12-slim-bookworm
LABEL org.opencontainers.image.title="signing-proxy" \
      org.opencontainers.image.description="A local reverse proxy that SigV4-signs HTTP requests for Amazon API Gateway" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/signing-proxy
# A fixed, numeric, non-root user: Kubernetes' runAsNonRoot can check it, and file permissions on
# mounted configs or ~/.aws can be granted to it (uid/gid 10001).
RUN groupadd --system --gid 10001 signing-proxy \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/signing-proxy --create-home \
            --shell /usr/sbin/nologin signing-proxy \
 && mkdir -p /etc/signing-proxy
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl
USER 10001:10001
WORKDIR /home/signing-proxy
# 8080: the proxy (listen), 9901: /healthz, /readyz, /metrics (admin_listen). The config decides
# what is bound: listen 0.0.0.0:8080 with an inbound_token, admin_listen 0.0.0.0:9901.
EXPOSE 8080 9901
# No curl in the slim image: the proxy's own client asks http://127.0.0.1:9901/healthz.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 CMD ["signing-proxy", "health"]
ENTRYPOINT ["signing-proxy"]
CMD ["run", "--config", "/etc/signing-proxy/config.yaml"]
