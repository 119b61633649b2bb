#!/usr/bin/env bash
# Print the pinned requirements the image installs, from requirements.lock:
#   cpu  (default image): torch/torchvision as +cpu builds from PyTorch's CPU index, no CUDA
#        libraries (nvidia-*, cuda-*, triton) — the services that need no GPU;
#   cuda (the GPU image, for GPU Ray workers): torch and its CUDA 13 libraries exactly as locked.
# Test tools (pytest, ruff, compose-spec) are never included. Used by the Dockerfile; checked
# by tests/test_compose.py.
set -euo pipefail
variant=${1:-cpu}
lock=${2:-requirements.lock}
test_tools='pytest|pytest-timeout|ruff|compose-spec|iniconfig|pluggy'
case "$variant" in
  cpu)
    echo "--extra-index-url https://download.pytorch.org/whl/cpu"
    grep -vE "^(${test_tools}|torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==" "$lock"
    sed -nE 's/^(torch|torchvision)==([^+]+)$/\1==\2+cpu/p' "$lock"
    ;;
  cuda)
    grep -vE "^(${test_tools})==" "$lock"
    ;;
  *)
    echo "usage: $0 cpu|cuda [LOCK]" >&2
    exit 2
    ;;
esac
