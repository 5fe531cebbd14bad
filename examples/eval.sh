#!/usr/bin/env bash
# Evaluation with latent reasoning on Ray (data parallel over trainer.n_gpus_per_node workers).
#
#   bash examples/eval.sh MODEL_DIR data.val_files=FILE [method=direct|dmlr|rmm] [ablate=zero,shuffle,noise,text] \
#       [worker.rollout.name=native|vllm] [name=NAME] [key=value ...]
#   ... eval.endpoint=http://127.0.0.1:8000/v1 [eval.endpoint_model=NAME]   # answers from an OpenAI-compatible
#       endpoint (python -m tools.serve, or an API model with EVAL_ENDPOINT_API_KEY) instead of Ray workers
#
# FILE: the project's rows (json/jsonl/parquet: problem, answer, images), DMLR's JSON list or a VLMEvalKit TSV.
# Results: runs/eval/<name>/ (per-item <pass>.jsonl, summary.json, summary.md); re-running resumes. LATENT_SIZE sets
# K. Without a GPU the defaults suit the CPU (native engine in fp32, EVAL_WORKERS workers, default 2); later
# key=value items win. Toy example:
#   bash examples/eval.sh runs/_embedded/tiny_sft_model config=examples/config/vlpo_tiny_cpu.yaml \
#       data.val_files=examples/toy_data/generated/val.jsonl eval.category_column=kind ablate=zero,shuffle,noise,text
set -euo pipefail
source "$(dirname "$0")/common.sh" "$@"

if [ "$#" -lt 1 ] || [[ "$1" == *=* ]]; then
  echo "usage: bash examples/eval.sh MODEL_DIR data.val_files=FILE [method=...] [ablate=...] [key=value ...]" >&2
  exit 2
fi
model="$1"
shift
defaults=()
if ! has_gpu; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  defaults=(worker.rollout.name=native worker.rollout.dtype=fp32 trainer.n_gpus_per_node="${EVAL_WORKERS:-2}")
fi
exec "$PYTHON" -m RL.evaluate "$model" "${defaults[@]}" "$@"
