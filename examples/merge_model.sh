#!/usr/bin/env bash
# Merge a training checkpoint (DCP shards, LoRA merged in) into a Hugging Face folder RUN_STEP_DIR/huggingface/.
#
#   bash examples/merge_model.sh runs/<run>/step_000050 [ROLE]     (ROLE: actor by default; solver / proposer)
#   ROLE=solver bash examples/merge_model.sh runs/<run>/step_000050 [--adapter-only]
#
# Extra options go to tools.merge_model (--out DIR, --dtype auto|fp32|bf16|fp16, --adapter-only).
set -euo pipefail
STEP_DIR="${1:-}"
source "$(dirname "$0")/common.sh" "$@"
if [[ -z "$STEP_DIR" ]]; then
  echo "usage: [ROLE=solver] bash examples/merge_model.sh RUN_STEP_DIR [ROLE] [--out DIR]" \
    "[--dtype auto|fp32|bf16|fp16] [--adapter-only]" >&2
  exit 2
fi
shift
ROLE="${ROLE:-actor}"
if [[ $# -gt 0 && "$1" != --* ]]; then ROLE="$1"; shift; fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
exec "$PYTHON" -m tools.merge_model "$STEP_DIR" --role "$ROLE" "$@"
