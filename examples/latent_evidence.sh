#!/usr/bin/env bash
# The evidence that the latent block carries what the answer needs, on the pointer task (RL/toy_pointer_task.py: a
# 2x2 grid, an arrow, "What colour is the cell the arrow points to?"), with the tiny offline model on the CPU:
#
#   bash examples/latent_evidence.sh
#
# Per seed S of SEEDS (default "0 1"), into $EVIDENCE_DIR/seed<S>/ (default runs/latent_evidence); with SHARE_SFT=1
# (the default: the SFT arms cost most of the time) step 1 runs for the first seed only and every seed's RL arms
# start from its models, so the seeds vary the RL runs; SHARE_SFT=0 repeats the SFT arms per seed:
#   1. SFT: Monet stages 1 -> 2 -> 3 (examples/sft_train.sh stage=..., sft.seed=S; the stage-3 model is
#      stages/sft_monet3), and the text-only arm text_sft: stage 1's recipe on the same rows without the latent block
#      and the zoom (sft_text.json), for SFT_STEPS_1 + SFT_STEPS_3 steps, the student's steps in the Monet chain.
#   2. RL, RL_STEPS steps each, the same seeds: vlpo_noise (VLPO from stage 3, latent exploration noise
#      LATENT_NOISE, default 0.1), vlpo_noise0 (the same with noise 0: Monet's released setting, no latent gradient),
#      grpo_text (text-only GRPO from text_sft), in rl/<arm>/.
#   3. Held-out evaluation (examples/eval.sh) of the five models in eval/<arm>/ on EVIDENCE_VAL (default 128) fresh
#      questions ($EVIDENCE_DIR/heldout), with ablate=zero,shuffle,noise,text on stage 3 and vlpo_noise.
# The training rows are $EVIDENCE_DIR/toy (the embedded default's generator, TOY_TASK=pointer).
# Then `python -m tools.latent_evidence` writes evidence.md (the tables, 95% Wilson intervals), val_accuracy.png
# (validation accuracy per step of the RL arms) and ablations.png. Re-running skips every model and pass already
# there. docs/evaluation.md section 6 holds the table measured with the defaults.
# Environment: EVIDENCE_DIR, SEEDS, SHARE_SFT, TOY_TRAIN (training images drawn, default 512), SFT_STEPS_1/2/3
# (default 100, 60, 500), RL_STEPS (default 30), LATENT_NOISE, LATENT_SIZE (K, default 10), EVIDENCE_VAL, DRY_RUN=1
# (print the commands only).
set -euo pipefail
source "$(dirname "$0")/common.sh" "$@"
[ "$#" -eq 0 ] || fail "latent_evidence.sh takes no arguments (got $1); set its environment variables instead"
has_gpu && echo "note: a GPU is here, but the evidence runs the tiny model on the CPU recipe"
embedded_env

EVIDENCE="$(realpath -m -- "${EVIDENCE_DIR:-$REPO/runs/latent_evidence}")"
SEEDS="${SEEDS:-0 1}"
RL_STEPS="${RL_STEPS:-30}"
STEPS_1="${SFT_STEPS_1:-100}" STEPS_3="${SFT_STEPS_3:-500}"
export TOY_TASK=pointer TOY_DIR="$EVIDENCE/toy" SFT_STEPS_1="$STEPS_1" SFT_STEPS_3="$STEPS_3"
TOY="$TOY_DIR"
ABLATIONS=zero,shuffle,noise,text
EVAL_ITEMS="${EVIDENCE_VAL:-128}"

# The held-out questions: new draws of the pointer task (another seed than the training rows), more of them than the
# embedded default's val.jsonl (which the RL arms validate on), so the intervals are tighter.
heldout() {
  build_once "$EVIDENCE/heldout/TOY_OK" "$EVAL_ITEMS-$(content_hash "$REPO/RL/toy_task.py" "$REPO/RL/toy_pointer_task.py")" \
    "$PYTHON" -m tools.toy_task --task pointer --out "$EVIDENCE/heldout" --train 0 --val "$EVAL_ITEMS" --seed 1000
}

# Model folder $1 unless it holds a model: the command after it trains one there.
train_once() {
  local model=$1
  shift
  [ -f "$model/config.json" ] && { echo "== $model: done"; return 0; }
  run_step "$@"
}

sft_arms() {  # seed folder, seed
  local dir=$1 seed=$2 stage
  for stage in monet1 monet2 monet3; do
    echo "== seed $seed: Monet stage ${stage#monet}"
    train_once "$dir/stages/sft_$stage" env EMBEDDED_DIR="$dir" bash "$REPO/examples/sft_train.sh" stage="$stage" \
      sft.seed="$seed"
  done
  echo "== seed $seed: text-only SFT (the same rows without the latent block, $((STEPS_1 + STEPS_3)) steps)"
  train_once "$dir/text_sft" env EMBEDDED_DIR="$dir" bash "$REPO/examples/sft_train.sh" stage=monet1 \
    data.train_files="$TOY/sft_text.json" sft.steps="$((STEPS_1 + STEPS_3))" sft.seed="$seed" \
    sft.output_dir="$dir/text_sft"
}

# RL arm $3 of seed folder $1 (seed $2) from model $4, extra keys after; its last checkpoint merged to rl/<arm>/model.
rl_arm() {
  local dir=$1 seed=$2 arm=$3 start=$4 step
  shift 4
  step="$dir/rl/$arm/step_$(printf '%06d' "$RL_STEPS")"
  echo "== seed $seed: RL arm $arm from ${start#$dir/}"
  train_once "$dir/rl/$arm/model" "$PYTHON" -m RL.train_vlpo config="$REPO/examples/config/vlpo_tiny_cpu.yaml" \
    worker.actor.model.model_path="$start" data.train_files="$TOY/train.jsonl" data.val_files="$TOY/val.jsonl" \
    worker.rollout.latent_size="$LATENT_SIZE" trainer.save_dir="$dir/rl" trainer.experiment_name="$arm" \
    trainer.max_steps="$RL_STEPS" trainer.save_freq="$RL_STEPS" trainer.seed="$seed" data.seed="$seed" \
    worker.rollout.seed="$seed" "$@"
  train_once "$dir/rl/$arm/model" "$PYTHON" -m tools.merge_model "$step" --out "$dir/rl/$arm/model"
}

evaluate() {  # seed folder, arm, model, [ablations]; skipped when its summary holds every pass
  local dir=$1 arm=$2 model=$3 ablate=${4:-} name missing=0
  for name in direct ${ablate//,/ }; do
    [ "$name" = direct ] || name="ablate_$name"
    grep -q "\"$name\"" "$dir/eval/$arm/summary.json" 2>/dev/null || missing=1
  done
  [ "$missing" = 0 ] && { echo "== $dir/eval/$arm: done"; return 0; }
  echo "== evaluating $arm${ablate:+ (direct, $ablate)}"
  run_step bash "$REPO/examples/eval.sh" "$model" config="$REPO/examples/config/vlpo_tiny_cpu.yaml" \
    data.val_files="$EVIDENCE/heldout/val.jsonl" eval.save_dir="$dir/eval" name="$arm" ${ablate:+ablate="$ablate"}
}

ensure_toy_inputs  # the tiny model (in $EMBEDDED) and the pointer task's training rows (in $TOY)
dry_run || mkdir -p "$EVIDENCE/heldout"
heldout
first_seed="${SEEDS%% *}"
for seed in $SEEDS; do
  dir="$EVIDENCE/seed$seed" sft="$EVIDENCE/seed$seed"
  [ "${SHARE_SFT:-1}" = 1 ] && sft="$EVIDENCE/seed$first_seed"
  dry_run || mkdir -p "$dir"
  if [ "$sft" = "$dir" ]; then
    sft_arms "$dir" "$seed"
  fi
  rl_arm "$dir" "$seed" vlpo_noise "$sft/stages/sft_monet3" worker.rollout.monet.latent_noise_std="${LATENT_NOISE:-0.1}"
  rl_arm "$dir" "$seed" vlpo_noise0 "$sft/stages/sft_monet3" worker.rollout.monet.latent_noise_std=0
  rl_arm "$dir" "$seed" grpo_text "$sft/text_sft" worker.rollout.sampling_strategy=sample
  if [ "$sft" = "$dir" ]; then
    evaluate "$dir" text_sft "$dir/text_sft"
    evaluate "$dir" stage3 "$dir/stages/sft_monet3" "$ABLATIONS"
  fi
  evaluate "$dir" vlpo_noise "$dir/rl/vlpo_noise/model" "$ABLATIONS"
  evaluate "$dir" vlpo_noise0 "$dir/rl/vlpo_noise0/model"
  evaluate "$dir" grpo_text "$dir/rl/grpo_text/model"
done
run_last "$PYTHON" -m tools.latent_evidence "$EVIDENCE"
