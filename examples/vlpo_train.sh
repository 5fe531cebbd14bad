#!/usr/bin/env bash
# VLPO training (Monet's RL with latent visual tokens) on Ray.
#
#   bash examples/vlpo_train.sh worker.actor.model.model_path=/ckpt/monet-sft data.train_files=/data/thyme [key=value ...]
#
# Defaults are Monet's vlpo_train.sh (examples/config/vlpo_monet.yaml); extra dotted overrides win. Re-running
# with the same trainer.experiment_name resumes from its newest complete checkpoint. LATENT_SIZE sets K.
# With no model given and no GPU, it runs the embedded default: a tiny Qwen2.5-VL built offline, warm-started
# with latent SFT on the bundled toy task, then trained with VLPO on a local Ray cluster (about 5 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export LATENT_SIZE="${LATENT_SIZE:-10}"
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export VLLM_NO_USAGE_STATS=1 NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

model_given=0
for arg in "$@"; do
  case "$arg" in worker.actor.model.model_path=*) model_given=1 ;; esac
done
has_gpu=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")

if [ "$model_given" = 0 ] && [ "$has_gpu" = 0 ]; then
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
  EMBEDDED=runs/_embedded
  CONFIG=examples/config/vlpo_tiny_cpu.yaml
  # The warm start has to get the model reading the image, not only the answer format: VLPO this short sharpens a
  # readout the warm start has begun but cannot find one (README section 2). At the config's 3e-3, or with the vision
  # tower trained, the answers stay the per-question prior.
  SFT_ARGS=(sft.steps=250 sft.lr=1.0e-3 sft.freeze_vision_tower=true)
  if [ ! -f "$EMBEDDED/tiny_sft_model/SFT_OK" ]; then
    echo "== embedded default: building the tiny model and toy task, then the latent SFT warm start"
    "$PYTHON" -m tools.make_tiny_model --out "$EMBEDDED/tiny_model"
    "$PYTHON" -m tools.toy_task --out examples/toy_data/generated
    "$PYTHON" -m RL.sft config="$CONFIG" worker.actor.model.model_path="$EMBEDDED/tiny_model" \
      worker.rollout.latent_size="$LATENT_SIZE" sft.output_dir="$EMBEDDED/tiny_sft_model" "${SFT_ARGS[@]}" "$@"
    touch "$EMBEDDED/tiny_sft_model/SFT_OK"
  fi
  echo "== embedded default: VLPO on a local Ray cluster (CPU)"
  exec "$PYTHON" -m RL.main config="$CONFIG" worker.actor.model.model_path="$EMBEDDED/tiny_sft_model" \
    worker.rollout.latent_size="$LATENT_SIZE" "$@"
fi

if [ "$model_given" = 0 ]; then
  echo "give the SFT checkpoint to train: worker.actor.model.model_path=/path/to/monet-sft-stage3" >&2
  exit 2
fi
exec "$PYTHON" -m RL.main config=examples/config/vlpo_monet.yaml worker.rollout.latent_size="$LATENT_SIZE" "$@"
