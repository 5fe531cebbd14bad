#!/usr/bin/env bash
# VLPO training (Monet's RL with latent visual tokens) on Ray.
#
#   bash examples/vlpo_train.sh worker.actor.model.model_path=/ckpt/monet-sft data.train_files=/data/thyme [key=value ...]
#
# Defaults are Monet's vlpo_train.sh (examples/config/vlpo_monet.yaml); extra dotted overrides win. Re-running
# with the same trainer.experiment_name resumes from its newest complete checkpoint. LATENT_SIZE sets K.
# With no model given and no GPU, it runs the embedded default: a tiny Qwen2.5-VL built offline, warm-started
# with the latent SFT chain on the bundled toy task (Monet stages 1 -> 2 -> 3, examples/sft_train.sh), then trained
# with VLPO from the stage-3 model on a local Ray cluster (about 4.5 minutes on 2 CPU cores).
set -euo pipefail
source "$(dirname "$0")/common.sh"

if ! model_given "$@" && ! has_gpu; then
  embedded_env
  CONFIG=examples/config/vlpo_tiny_cpu.yaml
  # The warm start is Monet's SFT chain on the toy task (examples/sft_train.sh): stage 1 with a zoomed view of the
  # shape in the chain, stage 2 with the zoom seen only by the latents, stage 3 without it. It has to get the model
  # reading the image, not only the answer format: VLPO this short sharpens a readout the warm start has begun but
  # cannot find one (README section 2).
  if [ ! -f "$EMBEDDED/tiny_sft_model/SFT_OK" ]; then
    echo "== embedded default: building the tiny model and toy task, then the latent SFT chain (Monet stages 1-3)"
    "$PYTHON" -m tools.make_tiny_model --out "$EMBEDDED/tiny_model"
    "$PYTHON" -m tools.toy_task --out "$TOY" --sft
    SFT_OUT="$EMBEDDED/tiny_sft_model" bash examples/sft_train.sh "$@"
    touch "$EMBEDDED/tiny_sft_model/SFT_OK"
  fi
  echo "== embedded default: VLPO on a local Ray cluster (CPU)"
  exec "$PYTHON" -m RL.main config="$CONFIG" worker.actor.model.model_path="$EMBEDDED/tiny_sft_model" \
    worker.rollout.latent_size="$LATENT_SIZE" "$@"
fi

if ! model_given "$@"; then
  echo "give the SFT checkpoint to train: worker.actor.model.model_path=/path/to/monet-sft-stage3" >&2
  exit 2
fi
exec "$PYTHON" -m RL.main config=examples/config/vlpo_monet.yaml worker.rollout.latent_size="$LATENT_SIZE" "$@"
