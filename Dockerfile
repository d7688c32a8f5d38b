# LLaVA-NeXT worker image: a slim Python base, PyTorch's own CUDA wheels (pinned), llava-queue[worker].
# torchvision (the release made for that torch) gives the worker transformers' fast image processor.
# (Flower runs from its own image: docker-compose.yml.)
# CUDA comes once, inside the torch wheel (its nvidia-* libraries); the host provides only the NVIDIA driver
# (through the NVIDIA Container Toolkit). Build for another CUDA: --build-arg TORCH_INDEX=.../whl/cu126.
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/huggingface NVIDIA_DRIVER_CAPABILITIES=compute,utility

# A non-root user; the Hugging Face cache volume is created owned by it.
RUN useradd --create-home --uid 1000 llava \
    && mkdir -p /data/huggingface && chown llava:llava /data/huggingface

# Dependency layers first: torch and torchvision (pinned, one CUDA), then the project's dependencies read from
# pyproject.toml. Editing the code below reuses both layers.
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /app
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = p['optional-dependencies']; \
print('\n'.join(p['dependencies'] + extras['worker']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && rm /tmp/requirements.txt

# The code: installed without dependencies (they are all above).
COPY README.md ./
COPY producer ./producer
COPY worker ./worker
COPY configs ./configs
RUN pip install --no-deps . && python -m worker --version

USER llava
# One process per GPU: one container per GPU (docker-compose.yml), or `llava-worker --gpus all` in one.
CMD ["llava-worker", "--config", "/app/configs/llava-v1.6-mistral-7b.yaml", "--device", "cuda"]
