# LLaVA-NeXT worker image: CUDA runtime + PyTorch (CUDA wheels from PyPI) + llava-queue[worker,monitor].
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH HF_HOME=/data/huggingface
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
COPY configs ./configs
RUN pip install ".[worker,monitor]"

# One process per GPU: run one container per GPU (docker-compose.yml) or `llava-worker --gpus all`.
CMD ["llava-worker", "--config", "/app/configs/llava-v1.6-mistral-7b.yaml"]
