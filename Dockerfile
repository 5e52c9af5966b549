# One image for both roles: `api` (uvicorn) and `worker` (torchyard worker).
# GPU workers need the CUDA build of torch. The default is PyTorch's stable CUDA
# line, 13.0: the host needs an NVIDIA driver >= 580 and a Turing or newer GPU.
# Older drivers (>= 525) or GPUs (Maxwell, Pascal, Volta):
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
# A CPU-only image: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TORCHYARD_HOME=/var/lib/torchyard

WORKDIR /srv/torchyard

# training.compile needs a C/C++ compiler: Triton builds its launcher with one on
# GPU, Inductor compiles its kernels with one on CPU.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch first, from its own index, so the package install below keeps it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY torchyard ./torchyard
RUN pip install . \
    && useradd --create-home --uid 1000 torchyard \
    && mkdir -p /var/lib/torchyard /data/artifacts /work \
    && chown -R torchyard /var/lib/torchyard /data /work

USER torchyard
EXPOSE 8000

# The API by default; docker-compose.yml gives the worker its own command.
CMD ["uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
