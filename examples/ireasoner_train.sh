#!/usr/bin/env bash
# Proposer–solver self-evolution (iReasoner / EvoLMM) from unlabeled images, on Ray.
#
#   bash examples/ireasoner_train.sh worker.actor.model.model_path=/ckpt/Qwen2.5-VL-7B-Instruct \
#       data.image_dir=/data/images data.include_subfolders=chartqa,ai2d trainer.experiment_name=ireasoner_7b
#
# Defaults are the released iReasoner recipe (examples/config/ireasoner.yaml); extra dotted overrides win.
# Re-running with the same trainer.experiment_name resumes from its newest complete checkpoint.
#
# With no model given and no GPU, it runs the embedded default (examples/config/ireasoner_tiny_cpu.yaml): the tiny
# offline Qwen2.5-VL warm-started on the toy task's proposer/solver formats, then self-evolution from the toy images
# alone (labels held out, only measured). Your key=value overrides reach only the self-evolution run. The warm start
# is sealed: built once, with only these settings, recorded in its SFT_OK and rebuilt when they change:
#   SELFPLAY_SFT_STEPS   its steps (default: the config's sft.steps, 400)
#   LATENT_SIZE          K, latent steps per block (default 10; the solver's too)
# Environment: EMBEDDED_DIR (the tiny model and the warm start, default runs/_embedded), TOY_DIR (the toy data,
# default examples/toy_data/generated), DRY_RUN=1 (print the commands, run nothing).
set -euo pipefail
source "$(dirname "$0")/common.sh" "$@"

if ! model_given "$@" && ! has_gpu; then
  embedded_env
  CONFIG="$REPO/examples/config/ireasoner_tiny_cpu.yaml"
  MODEL="$EMBEDDED/tiny_selfplay_model"
  ensure_toy_inputs
  # The default SFT stage (mirage2): the given responses, each <latent> a block fed back its hidden states. The full
  # model is fine-tuned; the config's LoRA rank is for the self-evolution adapters. None of "$@" reaches it.
  warm_start=(config="$CONFIG" worker.actor.model.model_path="$EMBEDDED/tiny_model"
              data.train_files="$TOY/selfplay_sft.jsonl" data.image_dir= worker.rollout.latent_size="$LATENT_SIZE"
              worker.actor.model.lora.rank=0 sft.output_dir="$MODEL"
              ${SELFPLAY_SFT_STEPS:+sft.steps="$SELFPLAY_SFT_STEPS"})
  settings="SELFPLAY_SFT_STEPS=${SELFPLAY_SFT_STEPS:-config}
LATENT_SIZE=$LATENT_SIZE
recipe=$(printf '%s\n' "${warm_start[@]}" | sha256sum | cut -c1-12)
config=$(content_hash "$CONFIG")
toy_data=$(content_hash "$TOY/selfplay_sft.jsonl" "$TOY/images/train")
tiny_model=$(content_hash "$EMBEDDED/tiny_model")"
  if open_warm_start "$settings" "$MODEL"; then
    echo "== embedded default: the proposer/solver warm start"
    run_step "$PYTHON" -m RL.train_sft "${warm_start[@]}"
    seal_warm_start "$settings" "$MODEL"
  fi
  echo "== embedded default: self-evolution on a local Ray cluster (CPU)"
  run_last "$PYTHON" -m RL.train_self_evolution config="$CONFIG" worker.actor.model.model_path="$MODEL" \
    data.image_dir="$TOY/images" data.val_files="$TOY/val.jsonl" worker.rollout.latent_size="$LATENT_SIZE" "$@"
fi

if ! model_given "$@"; then
  fail "give the base model: worker.actor.model.model_path=/path/to/Qwen2.5-VL-7B-Instruct"
fi
run_last "$PYTHON" -m RL.train_self_evolution config="$REPO/examples/config/ireasoner.yaml" worker.rollout.latent_size="$LATENT_SIZE" \
  "$@"
