#!/usr/bin/env bash
# VITA-RMM's whole pipeline on Ray (docs/evaluation.md §RMM):
#   1. simulation: the reasoning model runs the reason -> feedback -> memory -> retry loop over SIM_DATA with the
#      feedback model as critic and as memory writer (the teacher), memory carried across items; every memory write
#      is a training row in RMM's combined data format (OUT/simulation/rmm_combined_data.json);
#   2. the memory manager: LoRA SFT of MANAGER_BASE on those rows (examples/config/rmm.yaml: r 16, alpha 32, dropout
#      0.05, lr 2e-4, 3 epochs); its adapter exported to OUT/manager_adapter (a PEFT folder);
#   3. evaluation of the reasoning model on EVAL_DATA with the same feedback model and the trained manager (its base +
#      the adapter), memory scope SCOPE; RMM's four metrics in OUT/evaluation/summary.md.
#
#   REASONER=/ckpt/monet-7b FEEDBACK=api:gpt-4o MANAGER_BASE=/ckpt/Qwen2.5-VL-3B-Instruct \
#   SIM_DATA=/data/rmm_sim.jsonl EVAL_DATA=/data/rmm_test.jsonl bash examples/rmm_train.sh [key=value ...]
#
# FEEDBACK: api:<model name> (its key from the provider's variable, e.g. OPENAI_API_KEY; RMM_API_BASE_URL sets the
# endpoint), a local Qwen2.5-VL folder, or self. key=value items reach the SFT (step 2); EVAL_ARGS (space-separated
# key=value items) reach steps 1 and 3, e.g. EVAL_ARGS="config=my_eval.yaml data.val_max_samples=500".
# Environment: OUT (default runs/rmm), SCOPE (dataset | per_item, default dataset), DRY_RUN=1 (print the commands).
# Re-running resumes every step (the evaluation passes by item, the SFT from its newest checkpoint).
#
# With no REASONER and no GPU it runs the embedded default: the tiny offline Qwen2.5-VL as reasoning model, feedback
# model (a local folder served by our engine) and manager base, 24 toy questions simulated (train split) and 24
# evaluated (val split), on CPU in minutes; the files in $EMBEDDED_DIR/rmm. The tiny model reasons badly and its
# feedback is noise: the run shows the plumbing, and that the trained manager writes its entries in the typed format
# (the last line: the share of manager replies in that format, simulation teacher vs trained manager), not quality.
set -euo pipefail
source "$(dirname "$0")/common.sh" "$@"

EVAL_EXTRA=(${EVAL_ARGS:-})
SCOPE="${SCOPE:-dataset}"

# run_pipeline CONFIG SFT_CONFIG [key=value ... for the SFT]: steps 1 -> 2 -> 3 with REASONER, FEEDBACK, MANAGER_BASE,
# SIM_DATA, EVAL_DATA and OUT set.
run_pipeline() {
  local config=$1 sft_config=$2 rows step
  shift 2
  local loop=(${config:+config="$config"} method=rmm eval.rmm_feedback_model="$FEEDBACK" eval.save_dir="$OUT"
              ${RMM_API_BASE_URL:+eval.rmm_api_base_url="$RMM_API_BASE_URL"})
  echo "== RMM 1/3: simulation on $SIM_DATA (feedback and teacher memory: $FEEDBACK)"
  run_step "$PYTHON" -m RL.evaluate "$REASONER" data.val_files="$SIM_DATA" "${loop[@]}" \
    eval.rmm_memory_model="$FEEDBACK" eval.rmm_memory_scope=dataset name=simulation "${EVAL_EXTRA[@]}"
  rows="$OUT/simulation/rmm_combined_data.json"
  echo "== RMM 2/3: LoRA SFT of the memory manager ($MANAGER_BASE) on $rows"
  run_step "$PYTHON" -m RL.train_sft config="$sft_config" worker.actor.model.model_path="$MANAGER_BASE" \
    data.train_files="$rows" sft.output_dir="$OUT/manager" "$@"
  step=$(ls -d "$OUT/manager-run"/step_* 2>/dev/null | sort | tail -n 1 || true)
  dry_run && step="${step:-$OUT/manager-run/step_N}"
  run_step rm -rf "$OUT/manager_adapter"
  run_step "$PYTHON" -m tools.merge_model "$step" --adapter-only --out "$OUT/manager_adapter"
  echo "== RMM 3/3: evaluation on $EVAL_DATA with the trained manager (base + adapter), memory scope $SCOPE"
  run_step "$PYTHON" -m RL.evaluate "$REASONER" data.val_files="$EVAL_DATA" "${loop[@]}" \
    eval.rmm_memory_model="$OUT/manager_adapter" eval.rmm_memory_scope="$SCOPE" name=evaluation "${EVAL_EXTRA[@]}"
  dry_run || "$PYTHON" -c "import sys; from RL.evaluate.rmm import typed_rate; from RL.evaluate.store import read_rows
from pathlib import Path; print('memory manager replies in the typed format:', *('%s %.2f' % (n, typed_rate(read_rows(Path(sys.argv[1]) / n / 'rmm.jsonl'))) for n in ('simulation', 'evaluation')))" "$OUT"
  exit 0
}

if [ -z "${REASONER:-}" ] && ! has_gpu; then
  embedded_env
  ensure_toy_inputs
  REASONER="$EMBEDDED/tiny_model" FEEDBACK="$EMBEDDED/tiny_model" MANAGER_BASE="$EMBEDDED/tiny_model"
  SIM_DATA="$TOY/train.jsonl" EVAL_DATA="$TOY/val.jsonl" OUT="$EMBEDDED/rmm"
  EVAL_EXTRA=(worker.rollout.name=native worker.rollout.dtype=fp32 worker.rollout.latent_size="$LATENT_SIZE"
              trainer.n_gpus_per_node=2 eval.batch_size=4 eval.max_new_tokens=16 eval.rmm_critic_max_new_tokens=24
              eval.rmm_memory_max_new_tokens=24 data.val_max_samples=24 "${EVAL_EXTRA[@]}")
  run_pipeline "$REPO/examples/config/vlpo_tiny_cpu.yaml" "$REPO/examples/config/rmm_tiny_cpu.yaml" "$@"
fi

for name in REASONER FEEDBACK MANAGER_BASE SIM_DATA EVAL_DATA; do
  [ -n "${!name:-}" ] || fail "set $name (see bash examples/rmm_train.sh --help)"
done
OUT="${OUT:-runs/rmm}"
run_pipeline "" "$REPO/examples/config/rmm.yaml" "$@"
