# syntax=docker/dockerfile:1
# llm-gateway: an OpenAI-compatible LLM gateway.
#   docker build -t llm-gateway .
#   docker run -p 8080:8080 -e DEEPSEEK_API_KEY=... llm-gateway
# The image serves /etc/llm-gateway/gateway.yaml: the embedded default (mock fallback, NO authentication),
# fine for a local try-out; mount your own config over it for anything else:
#   docker run -p 8080:8080 -v $PWD/my-gateway.yaml:/etc/llm-gateway/gateway.yaml:ro -e ... llm-gateway
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY plugins ./plugins
COPY config ./config
# The project and every dependency as wheels, so the runtime stage needs no compiler and no source.
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /nonexistent --shell /usr/sbin/nologin gateway
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels llm-gateway
COPY config/gateway.yaml /etc/llm-gateway/gateway.yaml
WORKDIR /app
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('GATEWAY_PORT', '8080') + '/health/live', timeout=4)"]
CMD ["llm-gateway", "serve", "--config", "/etc/llm-gateway/gateway.yaml", "--host", "0.0.0.0"]
