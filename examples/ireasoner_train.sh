#!/usr/bin/env bash
# Proposer–solver self-evolution (iReasoner / EvoLMM) from unlabeled images, on Ray.
#
#   bash examples/ireasoner_train.sh worker.actor.model.model_path=/ckpt/Qwen2.5-VL-7B-Instruct \
#       data.image_dir=/data/images data.include_subfolders=chartqa,ai2d trainer.experiment_name=ireasoner_7b
#
# Defaults are the released iReasoner recipe (examples/config/ireasoner.yaml); extra dotted overrides win.
# Re-running with the same trainer.experiment_name resumes from its newest complete checkpoint.
# With no model given and no GPU, it runs the embedded default: the tiny offline Qwen2.5-VL warm-started on the toy
# task's proposer/solver formats, then self-evolution from the toy images alone (labels held out, only measured).
set -euo pipefail
source "$(dirname "$0")/common.sh"

if ! model_given "$@" && ! has_gpu; then
  embedded_env
  CONFIG=examples/config/ireasoner_tiny_cpu.yaml
  if [ ! -f "$EMBEDDED/tiny_selfplay_model/SFT_OK" ]; then
    echo "== embedded default: the tiny model, the toy images and the proposer/solver warm start"
    [ -f "$EMBEDDED/tiny_model/config.json" ] || "$PYTHON" -m tools.make_tiny_model --out "$EMBEDDED/tiny_model"
    [ -f "$TOY/selfplay_sft.jsonl" ] || "$PYTHON" -m tools.toy_task --out "$TOY" \
      --selfplay-prompts examples/format_prompt/toy_proposer.jinja examples/format_prompt/toy_solver.jinja
    # The default SFT stage (mirage2): the given responses, each <latent> a block fed back its hidden states. The
    # full model is fine-tuned; the config's LoRA rank is for the self-evolution adapters.
    "$PYTHON" -m RL.sft config="$CONFIG" worker.actor.model.model_path="$EMBEDDED/tiny_model" \
      data.train_files="$TOY/selfplay_sft.jsonl" data.image_dir= worker.rollout.latent_size="$LATENT_SIZE" \
      worker.actor.model.lora.rank=0 sft.output_dir="$EMBEDDED/tiny_selfplay_model" "$@"
    touch "$EMBEDDED/tiny_selfplay_model/SFT_OK"
  fi
  echo "== embedded default: self-evolution on a local Ray cluster (CPU)"
  exec "$PYTHON" -m RL.self_evolution config="$CONFIG" worker.actor.model.model_path="$EMBEDDED/tiny_selfplay_model" \
    worker.rollout.latent_size="$LATENT_SIZE" "$@"
fi

if ! model_given "$@"; then
  echo "give the base model: worker.actor.model.model_path=/path/to/Qwen2.5-VL-7B-Instruct" >&2
  exit 2
fi
exec "$PYTHON" -m RL.self_evolution config=examples/config/ireasoner.yaml worker.rollout.latent_size="$LATENT_SIZE" "$@"
