#!/usr/bin/env bash
# Set up .venv for this project on a CPU machine (idempotent). torch is installed first and then used as a
# constraint, so nothing can pull CUDA wheels. Usage: bash install.sh [extra,...]   e.g. bash install.sh test
set -euo pipefail
cd "$(dirname "$0")"
EXTRAS="${1:-test}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || $PIP install torch==2.13.0
stamp=".venv/.installed-$(cat setup.py constraints.txt | sha1sum | cut -c1-12)-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
  $PIP install -c constraints.txt --config-settings editable_mode=compat -e ".[${EXTRAS}]" 2>&1 | grep -v "is neither a file nor a directory" || true
  .venv/bin/python -c "import torch, transformers, ray, monet_models" && touch "$stamp"
fi
echo "environment ready: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
