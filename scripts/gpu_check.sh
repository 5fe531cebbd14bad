#!/usr/bin/env bash
# The first-GPU-run script for a lent GPU machine, one JSON out, meant to finish within 10 minutes on one GPU:
#   1. install the GPU extra (flash-attn too when a wheel installs within 4 minutes);
#   2. the `gpu`-marked tests and the vLLM tests on the GPU;
#   3. adamw_bf16 (Kahan) on CUDA: does lr 1e-6 move bf16 weights as an fp32 master would;
#   4. a 2-step VLPO run with vLLM on the 3B-width probe (make_tiny_model --shape 3b --layers 2) on the toy task:
#      the device's used memory (nvidia-smi, every 200 ms; its peak), each step's phase timings (the weight sync
#      among them), and the memory plan's figures for the same run beside them;
#   5. the rollout benchmark on a random 3B-shaped model.
#   bash scripts/gpu_check.sh            (writes $OUT/gpu_check.json when OUT is set, else ./gpu_check.json)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV="${VENV:-.venv-gpu}"
OUT_FILE="${OUT:-.}/gpu_check.json"
WORK="$VENV/gpu_check"
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check -q"
$PIP install torch==2.13.0
grep -v '^numpy==' constraints.txt > "$VENV/constraints-gpu.txt"  # the vllm extra needs numpy<2.4
$PIP install -c "$VENV/constraints-gpu.txt" -e ".[vllm,test]"
timeout 240 $PIP install flash-attn --no-build-isolation > "$VENV/flash_attn.log" 2>&1 && flash=1 || flash=0
installed=$(( $(date +%s) - start ))
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1
set +e
"$PY" -m pytest -q -p no:cacheprovider -m "gpu or vllm" tests/test_gpu.py tests/test_rollout_vllm.py \
  > "$WORK/gpu_tests.log" 2>&1
tests_rc=$?
"$PY" - > "$WORK/kahan.json" 2> "$WORK/kahan.log" <<'PY'
import json, torch
from workers.actor.optimizers import KahanAdamW
torch.manual_seed(0)
start = (torch.randn(1 << 20, device="cuda") * 1e-2)
grads = [torch.randn_like(start) for _ in range(8)]
fp32 = torch.nn.Parameter(start.clone()); bf16 = torch.nn.Parameter(start.to(torch.bfloat16))
plain = torch.nn.Parameter(start.to(torch.bfloat16))
optims = [torch.optim.AdamW([fp32], lr=1e-6), KahanAdamW([bf16], lr=1e-6), torch.optim.AdamW([plain], lr=1e-6)]
for step in range(200):
    for param, optim in zip((fp32, bf16, plain), optims):
        param.grad = grads[step % 8].to(param.dtype)
        optim.step()
moved = (fp32.detach() - start)
along = lambda p: float(((p.detach().float() - start.to(torch.bfloat16).float()) * moved).sum() / (moved * moved).sum())
print(json.dumps({"kahan_bf16_movement_vs_fp32": along(bf16), "plain_bf16_movement_vs_fp32": along(plain)}))
PY
kahan_rc=$?
"$PY" -m tools.make_tiny_model --out "$WORK/probe3b" --shape 3b --layers 2 > "$WORK/probe.log" 2>&1
"$PY" -m tools.toy_task --out "$WORK/toy" >> "$WORK/probe.log" 2>&1
nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 200 > "$WORK/memory.csv" &
sampler=$!
run_start=$(date +%s.%N)
"$PY" -m RL.train_vlpo config=examples/config/vlpo_tiny_cpu.yaml worker.actor.model.model_path="$WORK/probe3b" \
  data.train_files="$WORK/toy/train.jsonl" data.val_files="$WORK/toy/val.jsonl" \
  worker.rollout.name=vllm worker.actor.fsdp.torch_dtype=bf16 worker.rollout.dtype=bf16 trainer.n_gpus_per_node=1 \
  trainer.max_steps=2 trainer.val_freq=-1 trainer.val_before_train=false trainer.save_freq=-1 \
  trainer.save_dir="$WORK/runs" trainer.experiment_name=probe3b_vllm > "$WORK/vlpo.log" 2>&1
vlpo_rc=$?
kill "$sampler" 2>/dev/null
"$PY" -m tools.plan_memory config=examples/config/vlpo_tiny_cpu.yaml worker.actor.model.model_path="$WORK/probe3b" \
  worker.rollout.name=vllm worker.actor.fsdp.torch_dtype=bf16 trainer.n_gpus_per_node=1 --json \
  > "$WORK/plan.json" 2> "$WORK/plan.log"
"$PY" -m tools.bench_rollout --engine vllm --device cuda --dtype bf16 --hidden 2048 --layers 36 \
  --heads 16 --kv-heads 2 --intermediate 11008 --vocab 151936 --prompts 64 --new-tokens 128 --repeats 2 \
  > "$WORK/bench.json" 2> "$WORK/bench.log"
bench_rc=$?
set -e
"$PY" - "$installed" "$flash" "$tests_rc" "$kahan_rc" "$vlpo_rc" "$bench_rc" "$run_start" "$WORK" "$OUT_FILE" <<'PY'
import json, sys, torch
from pathlib import Path
installed, flash, tests_rc, kahan_rc, vlpo_rc, bench_rc, run_start, work, out = sys.argv[1:]
work = Path(work)

def read_json(name):
    try:
        return json.loads((work / name).read_text())
    except Exception as error:  # a failed part reports why instead of a number
        log = work / name.replace(".json", ".log")
        return {"error": repr(error), "log": log.read_text()[-2000:] if log.exists() else ""}

metrics = work / "runs" / "probe3b_vllm" / "metrics.jsonl"
steps = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
memory = [line.split(", ") for line in (work / "memory.csv").read_text().splitlines() if line.count(",") == 1]
used_mib = [float(value) for _, value in memory if value.strip().replace(".", "").isdigit()]
report = {
    "gpu": torch.cuda.get_device_name(0), "install_s": int(installed), "flash_attn_installed": flash == "1",
    "gpu_tests_rc": int(tests_rc), "gpu_tests": (work / "gpu_tests.log").read_text().strip().splitlines()[-1:],
    "kahan_rc": int(kahan_rc), "kahan": read_json("kahan.json"),
    "vlpo_3b_probe": {"rc": int(vlpo_rc), "log_tail": (work / "vlpo.log").read_text()[-1500:] if int(vlpo_rc) else "",
                      "steps": [{k: v for k, v in step.items() if k.startswith("timing_s/")} for step in steps],
                      "device_used_gib_peak": max(used_mib, default=0) / 1024,
                      "device_used_gib_samples": len(used_mib)},
    "plan": read_json("plan.json"), "bench_rc": int(bench_rc), "bench": read_json("bench.json"),
}
print(json.dumps(report))
open(out, "w").write(json.dumps(report, indent=2) + "\n")
PY
