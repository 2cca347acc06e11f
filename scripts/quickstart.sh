#!/usr/bin/env bash
# pcpt quickstart: installs what is missing, then runs the demo pipeline on the CPU:
#   pcpt-data synth → pcpt-pretrain fit (tiny Point-MAE) → artifact → SVM probe + 5-way 10-shot,
#   pretrained vs random init. Usage: bash scripts/quickstart.sh [OUT_DIR]   (default: quickstart_out)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import open3d" >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if ! ldconfig -p 2>/dev/null | grep -q libusb-1.0; then
    echo "[quickstart] installing libusb-1.0-0 (needed by open3d)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libusb-1.0-0 >/dev/null
  fi
fi
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "[quickstart] installing torch==2.13.0 (the default build; install your CUDA build first to choose it)"
    python -m pip install -q torch==2.13.0
  else
    # No NVIDIA GPU: the CPU build. From PyPI alone, Linux gets the CUDA build (several GB).
    echo "[quickstart] installing torch==2.13.0 (CPU build, https://download.pytorch.org/whl/cpu)"
    python -m pip install -q torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
# pcpt with the test tools, so that the README's second command (python -m pytest -n 2) runs next.
if ! command -v pcpt-data >/dev/null 2>&1 \
    || ! python -c "import datapipes, pretrain, finetune, lightning, open3d, webdataset, faiss" >/dev/null 2>&1 \
    || ! python -c "import pytest, xdist, pytest_timeout, hypothesis" >/dev/null 2>&1; then
  echo "[quickstart] installing pcpt, its dependencies and its test tools"
  python -m pip install -q -e '.[dev]'
fi

exec python scripts/quickstart.py "${1:-quickstart_out}"
