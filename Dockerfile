# trainbus service image. CPU torch by default; for CUDA build with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t trainbus:cuda .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TRAINBUS_HOST=0.0.0.0 \
    TRAINBUS_PORT=8000 \
    TRAINBUS_DATA_DIR=/data

RUN groupadd --system trainbus \
    && useradd --system --gid trainbus --home-dir /home/trainbus --create-home trainbus \
    && mkdir -p /data && chown trainbus:trainbus /data

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md constraints.txt ./
COPY bus ./bus
COPY worker ./worker
COPY subscribers ./subscribers
COPY api ./api
COPY trainbus ./trainbus
RUN pip install --constraint constraints.txt '.[gpu]'

USER trainbus
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('TRAINBUS_PORT', '8000')}/healthz\", timeout=2)" || exit 1
CMD ["trainbus", "serve"]
