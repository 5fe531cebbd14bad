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
  CONFIG=examples/config/ireasoner_tiny_cpu.yaml
  TOY=examples/toy_data/generated
  if [ ! -f "$EMBEDDED/tiny_selfplay_model/SFT_OK" ]; then
    echo "== embedded default: the tiny model, the toy images and the proposer/solver warm start"
    [ -f "$EMBEDDED/tiny_model/config.json" ] || "$PYTHON" -m tools.make_tiny_model --out "$EMBEDDED/tiny_model"
    [ -f "$TOY/selfplay_sft.jsonl" ] || "$PYTHON" -m tools.toy_task --out "$TOY" \
      --selfplay-prompts examples/format_prompt/toy_proposer.jinja examples/format_prompt/toy_solver.jinja
    "$PYTHON" -m RL.sft config="$CONFIG" worker.actor.model.model_path="$EMBEDDED/tiny_model" \
      data.train_files="$TOY/selfplay_sft.jsonl" data.image_dir= worker.rollout.latent_size="$LATENT_SIZE" \
      sft.output_dir="$EMBEDDED/tiny_selfplay_model" "$@"
    touch "$EMBEDDED/tiny_selfplay_model/SFT_OK"
  fi
  echo "== embedded default: self-evolution on a local Ray cluster (CPU)"
  exec "$PYTHON" -m RL.self_evolution config="$CONFIG" worker.actor.model.model_path="$EMBEDDED/tiny_selfplay_model" \
    worker.rollout.latent_size="$LATENT_SIZE" "$@"
fi

if [ "$model_given" = 0 ]; then
  echo "give the base model: worker.actor.model.model_path=/path/to/Qwen2.5-VL-7B-Instruct" >&2
  exit 2
fi
exec "$PYTHON" -m RL.self_evolution config=examples/config/ireasoner.yaml worker.rollout.latent_size="$LATENT_SIZE" "$@"
