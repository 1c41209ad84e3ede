# syntax=docker/dockerfile:1.7
# PixelPrune grounding service on NVIDIA GPUs.
#   docker build -t pixelprune:0.1.0-cuda .
#   docker build -t pixelprune:0.1.0-cuda --build-arg FLASH_ATTN=1 .   # + FlashAttention-2
#   docker run --gpus all -p 50051:50051 -p 9464:9464 pixelprune:0.1.0-cuda --model Qwen/Qwen3-VL-2B-Instruct
# torch's CUDA wheels bring their own CUDA libraries; the runtime image only
# supplies the driver-facing userland. Keep CUDA_TAG and TORCH_INDEX on the
# same CUDA major version.
ARG CUDA_TAG=12.8.1
ARG UBUNTU=ubuntu24.04
ARG FLASH_ATTN=0

# flash-attn compiles against torch and nvcc, so its wheel is built in the
# devel image; the final image only installs the wheel. BuildKit builds this
# stage only when FLASH_ATTN=1.
FROM nvidia/cuda:${CUDA_TAG}-cudnn-devel-${UBUNTU} AS flash-attn-1
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG FLASH_ATTN_VERSION=2.8.3
ARG MAX_JOBS=4
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git ninja-build \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 MAX_JOBS=${MAX_JOBS}
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
 && pip install packaging psutil ninja wheel \
 && pip wheel --no-build-isolation --no-deps -w /wheels "flash-attn==${FLASH_ATTN_VERSION}"

FROM nvidia/cuda:${CUDA_TAG}-cudnn-runtime-${UBUNTU} AS flash-attn-0
RUN mkdir /wheels

FROM flash-attn-${FLASH_ATTN} AS flash-attn-wheels

FROM nvidia/cuda:${CUDA_TAG}-cudnn-runtime-${UBUNTU}
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/models/hf-cache
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && groupadd --gid 10001 pixelprune \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin pixelprune \
 && mkdir -p /models \
 && chown 10001:10001 /models
# The large, rarely changing layer first: the CUDA build of torch.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY --from=flash-attn-wheels /wheels /tmp/flash-attn-wheels
RUN if ls /tmp/flash-attn-wheels/*.whl >/dev/null 2>&1; then pip install /tmp/flash-attn-wheels/*.whl; fi \
 && rm -rf /tmp/flash-attn-wheels
# The package (the build context is filtered by .dockerignore).
COPY . /src
RUN pip install "/src[service]" && rm -rf /src
USER 10001:10001
WORKDIR /home/pixelprune
VOLUME ["/models"]
# gRPC (with grpc.health.v1 and reflection) and Prometheus /metrics.
EXPOSE 50051 9464
ENV PIXELPRUNE_HOST=0.0.0.0 PIXELPRUNE_DEVICE=cuda
ENTRYPOINT ["pixelprune", "serve"]
