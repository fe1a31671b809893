# trapo-megatron: TRAPO post-training on Megatron-Core, for single nodes and Slurm clusters (pyxis/enroot).
#
# Build:  docker build -t trapo-megatron:0.1.0 .
# Test:   docker run --rm --gpus all --ipc=host trapo-megatron:0.1.0 python -m pytest -q
# Demo:   docker run --rm --ipc=host trapo-megatron:0.1.0 trapo demo
# Slurm:  enroot import -o trapo-megatron.sqsh dockerd://trapo-megatron:0.1.0
#         trapo launch --recipe qwen2.5-32b --executor slurm --container-image ./trapo-megatron.sqsh ...
# See docs/launch.md.
#
# The NGC image brings the CUDA toolkit (nvcc), cuDNN, NCCL and the compilers. Everything Python lives in a
# fresh venv pinned by requirements/gpu-lock.txt (resolved with vllm 0.33.0 and Transformer Engine 2.20.2:
# torch 2.14.0+cu130, the version vLLM pins): the wheels first, then Transformer Engine's torch extension and
# apex compiled against that torch. The image's own torch stack is left unused. No nemo-run in the image: its
# leptonai pin clashes with vllm (prometheus-fastapi-instrumentator 7 vs >= 8); the launcher runs outside.
FROM nvcr.io/nvidia/pytorch:25.09-py3

ARG UV_VERSION=0.13.9
# NVIDIA/apex has no releases on the package registries: build a pinned commit from source. Megatron uses
# its fused_weight_gradient_mlp_cuda for the output layer's gradient-accumulation fusion
# (megatron/core/tensor_parallel/layers.py); the optimizers come from TE (megatron/core/optimizer/__init__.py).
ARG APEX_COMMIT=10417aceddd7d5d05d7cbf7b0fc2daad1105f8b4
# Hopper (H100/H200) by default; add 8.0 for A100, 10.0 for B200.
ARG TORCH_CUDA_ARCH_LIST="9.0"
ARG MAX_JOBS=16

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    UV_PYTHON_DOWNLOADS=never \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_COMPILE_BYTECODE=1 \
    PIP_CONSTRAINT="" \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS} \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    TOKENIZERS_PARALLELISM=false

RUN apt-get update \
    && apt-get install -y --no-install-recommends git ninja-build \
    && rm -rf /var/lib/apt/lists/*

# uv, then the venv on the image's Python 3.12 (PIP_CONSTRAINT="" drops the NGC pin on its own torch;
# PIP_BREAK_SYSTEM_PACKAGES lets this one tool into the system Python if it is marked externally managed).
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir "uv==${UV_VERSION}" \
    && uv venv --python "$(command -v python3)" "$VIRTUAL_ENV"

WORKDIR /opt/trapo-megatron

# 1. The GPU lock (torch, vllm, megatron-core, transformers, math-verify, pytest, Transformer Engine's CUDA
#    libraries...), cached until the lock changes. transformer-engine-torch is a source package that compiles
#    against torch (step 2), so it is held back here; its version comes from the same lock.
COPY requirements/gpu-lock.txt requirements/gpu-lock.txt
RUN grep -v '^transformer-engine-torch==' requirements/gpu-lock.txt > /tmp/wheels.txt \
    && uv pip sync /tmp/wheels.txt && rm /tmp/wheels.txt

# 2. Transformer Engine's torch extension and apex compile against the venv's torch: their CUDA major must match.
RUN torch_cuda="$(python -c 'import torch; print(torch.version.cuda)')" \
    && nvcc_cuda="$(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')" \
    && echo "torch CUDA ${torch_cuda}, nvcc ${nvcc_cuda}" \
    && if [ "${torch_cuda%%.*}" != "${nvcc_cuda%%.*}" ]; then \
         echo "CUDA major of torch (${torch_cuda}) and of the base image (${nvcc_cuda}) differ:" \
              "pick an NGC image with CUDA ${torch_cuda%%.*}.x" >&2; exit 1; \
       fi
# --no-build-isolation: the extensions must see the venv's torch, so their build tools come first.
RUN uv pip install "cmake==3.31.6" "ninja==1.11.1.4" "wheel==0.45.1" "pybind11==2.13.6" \
    && uv pip install --no-build-isolation --no-deps -r requirements/gpu-lock.txt \
    && python -c "import transformer_engine.pytorch"
RUN git clone https://github.com/NVIDIA/apex.git /tmp/apex \
    && git -C /tmp/apex checkout "${APEX_COMMIT}" \
    && cd /tmp/apex \
    && APEX_CPP_EXT=1 APEX_CUDA_EXT=1 APEX_PARALLEL_BUILD=8 NVCC_APPEND_FLAGS="--threads 4" \
       uv pip install -v --no-build-isolation . \
    && cd / && rm -rf /tmp/apex \
    && python -c "import fused_weight_gradient_mlp_cuda"

# 3. This package (editable: examples/, tests/ and the assets stay next to the code, where the launch
#    recipes read the configs from).
COPY . /opt/trapo-megatron
RUN uv pip install --no-deps -e . \
    && python -c "import trapo_megatron, megatron.core, vllm, transformer_engine.pytorch, fused_weight_gradient_mlp_cuda" \
    && python -c "from trapo_megatron.megatron import features; print(features.detect('auto', 2))"

CMD ["bash"]
