#!/usr/bin/env bash
# Create the ImageReward serving environment (default: .venv-imagereward in the repo root).
#
# Why a separate venv: image-reward 1.5 imports helpers from `transformers.modeling_utils` that are gone
# after transformers 4.55.4, needs `clip-anytorch` (which needs pkg_resources, so setuptools<81) and pins
# timm==0.6.13. The main environment runs transformers 5, so ImageReward lives here and is reached over HTTP:
#
#   .venv-imagereward/bin/python -m reward_servers.serve --model image_reward --path DIR --port 8910
#
# Usage: bash scripts/setup_image_reward_env.sh [VENV_DIR]      (idempotent: re-running only checks)
# Pins: the known-good set from shared/ENVIRONMENT.md (verified 2026-11-25, Python 3.11).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${RLALIGN_IMAGE_REWARD_VENV:-$ROOT/.venv-imagereward}}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# torch is pinned in the same command so pip never swaps it for a different (multi-GB CUDA) build.
"$VENV/bin/pip" install --quiet \
    torch==2.14.1 torchvision==0.29.1 \
    image-reward==1.5 timm==0.6.13 clip-anytorch 'setuptools<81' transformers==4.55.4 \
    fastapi uvicorn numpy pillow

# Fail here, not in the first request, if the set does not import together.
"$VENV/bin/python" -W ignore::UserWarning -c "import ImageReward, fastapi, uvicorn, numpy, PIL, torch; print('image-reward env ok:', torch.__version__)"
echo "ImageReward env ready: $VENV"
