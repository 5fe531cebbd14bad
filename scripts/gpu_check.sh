#!/usr/bin/env bash
# One-shot check for a lent GPU machine: install the GPU extra, run the `gpu`-marked tests, then the rollout
# benchmark on a random-initialised Qwen2.5-VL of 3B shape, and print one JSON object. Meant to finish in 10 minutes.
#   bash scripts/gpu_check.sh            (writes $OUT/gpu_check.json when OUT is set, else ./gpu_check.json)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV="${VENV:-.venv-gpu}"
OUT_FILE="${OUT:-.}/gpu_check.json"
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install torch==2.13.0
grep -v '^numpy==' constraints.txt > "$VENV/constraints-gpu.txt"  # the vllm extra needs numpy<2.4
$PIP install -c "$VENV/constraints-gpu.txt" -e ".[vllm,test]"
installed=$(( $(date +%s) - start ))
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py > "$VENV/gpu_tests.log" 2>&1
tests_rc=$?
"$VENV/bin/python" -m tools.bench_rollout --engine vllm --device cuda --dtype bf16 --hidden 2048 --layers 36 \
  --heads 16 --kv-heads 2 --intermediate 11008 --vocab 151936 --prompts 64 --new-tokens 128 --repeats 2 \
  > "$VENV/bench.json" 2> "$VENV/bench.log"
bench_rc=$?
set -e
"$VENV/bin/python" - "$installed" "$tests_rc" "$bench_rc" "$VENV" "$OUT_FILE" <<'PY'
import json, sys, torch
installed, tests_rc, bench_rc, venv, out = sys.argv[1:]
tail = open(f"{venv}/gpu_tests.log").read().strip().splitlines()[-1:]
try:
    bench = json.load(open(f"{venv}/bench.json"))
except Exception as error:  # the benchmark failed: report why instead of a number
    bench = {"error": repr(error), "log": open(f"{venv}/bench.log").read()[-2000:]}
report = {"gpu": torch.cuda.get_device_name(0), "install_s": int(installed), "gpu_tests_rc": int(tests_rc),
          "gpu_tests": tail, "bench_rc": int(bench_rc), "bench": bench}
print(json.dumps(report))
open(out, "w").write(json.dumps(report, indent=2) + "\n")
PY
