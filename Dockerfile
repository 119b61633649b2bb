# One image for every talkforge service (docker-compose.yml): `talkforge serve` (its flow
# runs are Ray drivers), the Ray head and workers, `talkforge dashboard`, and the CLI.
#
#   docker build -t talkforge:0.1.0 .                                # CPU torch (default)
#   docker build --build-arg TORCH=cuda -t talkforge:0.1.0-cuda .    # the GPU image
#
# TORCH=cpu installs torch/torchvision as +cpu builds from PyTorch's CPU index and none of
# the CUDA libraries (several GB smaller): for services that never touch a GPU. TORCH=cuda
# installs torch exactly as locked (PyPI's build with its CUDA 13 libraries; the host needs
# an NVIDIA driver for CUDA 13 and the NVIDIA container toolkit): for GPU Ray workers. Both
# come from the same lock (scripts/image-requirements.sh), so a Ray cluster mixing them
# runs the same Python, Ray and talkforge code. WITH_S3=true adds s3fs for s3:// store and
# catalog data paths. No test tools, no pip cache, a non-root user.
FROM python:3.11-slim-bookworm

ARG TORCH=cpu
ARG WITH_S3=false
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1

RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       ffmpeg espeak-ng \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/talkforge
COPY requirements.lock pyproject.toml ./
COPY scripts/image-requirements.sh scripts/
# The lock is a complete resolved set: --no-deps keeps pip from re-resolving it. deno and
# yt-dlp-ejs (yt-dlp's JavaScript challenge solver) come with it.
RUN bash scripts/image-requirements.sh "$TORCH" requirements.lock > /tmp/image.lock \
    && pip install --no-cache-dir --no-deps -r /tmp/image.lock \
    && if [ "$WITH_S3" = "true" ]; then pip install --no-cache-dir "s3fs==2026.9.0"; fi \
    && rm /tmp/image.lock

COPY . .
RUN pip install --no-cache-dir --no-deps -e . \
    && useradd --create-home --uid 10001 talkforge \
    && mkdir -p /data \
    && chown talkforge /data

USER talkforge
VOLUME ["/data"]
# talkforge serve's runner webserver (compose services with another role override this)
ENV PREFECT_RUNNER_SERVER_ENABLE=true
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-m", "flows.health"]
ENTRYPOINT ["talkforge"]
CMD ["serve", "--config", "configs/cluster.yaml", "--join-ray", "ray-head:6379"]
