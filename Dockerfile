# GPU cluster image for spnet_dist. Not built in CI (no Docker engine on the build machines): kept correct by reading.
# Build:  docker build -t spnet_dist .
# Run:    docker run --gpus all --ipc=host -v /data/imagenet:/data/imagenet spnet_dist train data=imagenet data.root=/data/imagenet
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev \
        g++ ninja-build git && rm -rf /var/lib/apt/lists/* && python3.12 -m venv $VIRTUAL_ENV

WORKDIR /opt/spnet_dist
# The lock holds torch 2.15.0 / torchvision 0.29.2 (CUDA 13 builds) and the DALI CUDA 13 wheel.
COPY requirements.lock pyproject.toml README.md ./
RUN pip install -r requirements.lock
COPY spnet_dist ./spnet_dist
COPY configs ./configs
COPY tools ./tools
# Editable install keeps configs/ beside the package, where `spnet` finds it.
RUN pip install --no-deps -e .

ENTRYPOINT ["spnet"]
CMD ["--help"]
