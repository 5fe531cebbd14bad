#!/usr/bin/env bash
# Latent SFT on Ray: Monet's three stages or Mirage's two, on the same FSDP policy workers as VLPO (docs/sft.md).
#
#   bash examples/sft_train.sh stage=monet1 worker.actor.model.model_path=/ckpt/Qwen2.5-VL-7B-Instruct \
#       data.train_files=/data/Monet-SFT-125K/Visual_CoT/train.json data.image_dir=/data/Monet-SFT-125K
#   bash examples/sft_train.sh stage=monet2 worker.actor.model.model_path=<stage-1 model> data.train_files=...
#   bash examples/sft_train.sh stage=monet3 worker.actor.model.model_path=<stage-1 model> \
#       sft.teacher_path=<stage-2 model> data.train_files=...
#   bash examples/sft_train.sh stage=mirage1|mirage2 worker.actor.model.model_path=... data.train_files=rows.jsonl
#
# `stage=S` reads examples/config/sft_S.yaml (the released recipe of stage S) and sets sft.stage; dotted overrides
# win. The run is <trainer.save_dir>/<sft.experiment_name>; re-running the command resumes it. Its model ends in
# sft.output_dir (default <run>/model): a Hugging Face folder for the next stage, for VLPO and for vLLM.
# Multi-node: start Ray, then RAY_ADDRESS=HEAD_IP:6379 ... trainer.nnodes=N trainer.n_gpus_per_node=G (as VLPO).
# With no model given and no GPU it runs the embedded chain: the tiny offline model on the toy task's Monet rows,
# stage 1 -> 2 -> 3 (examples/config/sft_tiny_cpu.yaml), the stage-3 model in $SFT_OUT (runs/_embedded/tiny_sft_model).
set -euo pipefail
source "$(dirname "$0")/common.sh"

stage="" rest=()
for arg in "$@"; do
  case "$arg" in
    stage=*) stage="${arg#stage=}" ;;
    *) rest+=("$arg") ;;
  esac
done

if ! model_given "$@" && ! has_gpu; then
  embedded_env
  OUT="${SFT_OUT:-$EMBEDDED/tiny_sft_model}"
  [ -f "$EMBEDDED/tiny_model/config.json" ] || "$PYTHON" -m tools.make_tiny_model --out "$EMBEDDED/tiny_model"
  [ -f "$TOY/sft_monet.json" ] || "$PYTHON" -m tools.toy_task --out "$TOY" --sft
  common=(config=examples/config/sft_tiny_cpu.yaml sft.latent_size="$LATENT_SIZE")
  echo "== embedded latent SFT, Monet stage 1: the toy chains with the zoomed image in them"
  "$PYTHON" -m RL.sft "${common[@]}" sft.stage=monet1 worker.actor.model.model_path="$EMBEDDED/tiny_model" \
    sft.steps="${SFT_STEPS_1:-100}" sft.output_dir="$EMBEDDED/sft_monet1" "${rest[@]}"
  # Stage 2 at lr 1e-4: the alignment reaches the parameters only through the latents, and at stage 1's 1e-3 the
  # CE's direct steps move the observation states away from the teacher faster than the latents can pull them back.
  echo "== Monet stage 2: the zoom seen only by the latents, aligned to stage 1's observation states"
  "$PYTHON" -m RL.sft "${common[@]}" sft.stage=monet2 worker.actor.model.model_path="$EMBEDDED/sft_monet1" \
    sft.observation_weight=4.0 sft.align_weight=4.0 sft.lr=1.0e-4 sft.steps="${SFT_STEPS_2:-60}" \
    sft.output_dir="$EMBEDDED/sft_monet2" "${rest[@]}"
  echo "== Monet stage 3: no zoom; the latents learn stage 2's, from the stage-1 model"
  "$PYTHON" -m RL.sft "${common[@]}" sft.stage=monet3 worker.actor.model.model_path="$EMBEDDED/sft_monet1" \
    sft.teacher_path="$EMBEDDED/sft_monet2" sft.observation_weight=4.0 sft.steps="${SFT_STEPS_3:-250}" \
    sft.output_dir="$OUT" "${rest[@]}"
  exit 0
fi

if [ -z "$stage" ] || [ ! -f "examples/config/sft_${stage}.yaml" ]; then
  echo "give the stage: stage=monet1|monet2|monet3|mirage1|mirage2 (got '${stage}')" >&2
  exit 2
fi
if ! model_given "$@"; then
  echo "give the model to train: worker.actor.model.model_path=/path/to/model" >&2
  exit 2
fi
exec "$PYTHON" -m RL.sft config="examples/config/sft_${stage}.yaml" sft.stage="$stage" "${rest[@]}"
