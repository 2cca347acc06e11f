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
  echo "[quickstart] installing torch==2.13.0 (CPU wheel)"
  python -m pip install -q torch==2.13.0
fi
if ! command -v pcpt-data >/dev/null 2>&1 || ! python -c "import datapipes, pretrain, finetune, lightning, open3d, webdataset, faiss" >/dev/null 2>&1; then
  echo "[quickstart] installing pcpt and its dependencies"
  python -m pip install -q -e .
fi

exec python scripts/quickstart.py "${1:-quickstart_out}"
