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
# win. The run is <sft.output_dir>-run, else <trainer.save_dir>/<trainer.experiment_name>-sft-<stage>; re-running
# the command resumes it. Its model ends in sft.output_dir (default <run>/model): a Hugging Face folder for the next
# stage, for VLPO and for vLLM.
# Multi-node: start Ray, then RAY_ADDRESS=HEAD_IP:6379 ... trainer.nnodes=N trainer.n_gpus_per_node=G (as VLPO).
#
# With no model given and no GPU it runs on the tiny offline model and the toy task (examples/config/sft_tiny_cpu.yaml):
#   bash examples/sft_train.sh                 the embedded chain, Monet stage 1 -> 2 -> 3, the warm start of
#                                              vlpo_train.sh: the stage-3 model in $EMBEDDED_DIR/tiny_sft_model. It
#                                              takes no key=value overrides; its settings are SFT_STEPS_1, SFT_STEPS_2,
#                                              SFT_STEPS_3 (default 100, 60, 250) and LATENT_SIZE, recorded in its
#                                              SFT_OK seal; a change rebuilds the chain.
#   bash examples/sft_train.sh stage=S [key=value ...]
#                                              one stage on the toy rows (S: monet1 monet2 monet3 mirage1 mirage2), your
#                                              overrides included; the model in $EMBEDDED_DIR/stages/sft_S. monet2 and
#                                              monet3 start from the earlier Monet stages' models, mirage2 from
#                                              mirage1's: run those stages first.
# Environment: EMBEDDED_DIR (default runs/_embedded), TOY_DIR (the toy data, default examples/toy_data/generated),
# TOY_TASK (shapes, the default, or pointer: the two-hop task, docs/sft.md), LATENT_SIZE (K, default 10), DRY_RUN=1
# (print the commands, run nothing).
set -euo pipefail
source "$(dirname "$0")/common.sh" "$@"

STAGES="monet1 monet2 monet3 mirage1 mirage2"
stage="" rest=()
for arg in "$@"; do
  case "$arg" in
    stage=*) stage="${arg#stage=}" ;;
    *) rest+=("$arg") ;;
  esac
done
if [ -n "$stage" ] && [[ " $STAGES " != *" $stage "* ]]; then
  fail "stage=$stage: unknown stage; give one of ${STAGES// /, }"
fi

# The toy recipe of stage $1 on top of sft_tiny_cpu.yaml, in STAGE_ARGS: its rows, the model it starts from (the
# earlier stages' models are in folder $2) and the keys that differ from the config. Part of the chain's seal.
toy_stage_args() {
  local stage=$1 earlier=$2 model="$EMBEDDED/tiny_model" rows="$TOY/sft_monet.json" latent="$LATENT_SIZE" keys=()
  case "$stage" in
    monet1) keys=(sft.steps="${SFT_STEPS_1:-100}") ;;
    # Stage 2 at lr 1e-4: the alignment reaches the parameters only through the latents, and at stage 1's 1e-3 the
    # CE's direct steps move the observation states away from the teacher faster than the latents can pull them back.
    monet2) model="$earlier/sft_monet1"
            keys=(sft.observation_weight=4.0 sft.align_weight=4.0 sft.lr=1.0e-4 sft.steps="${SFT_STEPS_2:-60}") ;;
    # Stage 3 aligns the latents only (sft.align_layers=last), not every layer as the released recipe
    # (sft_monet3.yaml) does: this is the warm start the measured VLPO numbers (docs/sft.md) start from.
    monet3) model="$earlier/sft_monet1"
            keys=(sft.teacher_path="$earlier/sft_monet2" sft.observation_weight=4.0 sft.align_layers=last
                  sft.steps="${SFT_STEPS_3:-250}") ;;
    # Mirage's K is 4: the helper image (the zoomed cell) is 4 merged patches on the tiny model.
    mirage1) rows="$TOY/sft_mirage.jsonl" latent=4 keys=(sft.ce_weight=0.1 sft.steps=100) ;;
    mirage2) model="$earlier/sft_mirage1" rows="$TOY/sft_mirage.jsonl" latent=4 keys=(sft.steps=100) ;;
  esac
  STAGE_ARGS=(config="$REPO/examples/config/sft_tiny_cpu.yaml" sft.stage="$stage" worker.actor.model.model_path="$model"
              data.train_files="$rows" sft.latent_size="$latent" "${keys[@]}")
}

# The earlier stages a toy stage starts from, refused with the command to run first when one is missing.
require_earlier_stages() {
  local stage=$1 earlier=$2 needed prior
  case "$stage" in
    monet2) needed="monet1" ;;
    monet3) needed="monet1 monet2" ;;
    mirage2) needed="mirage1" ;;
    *) return 0 ;;
  esac
  for prior in $needed; do
    [ -f "$earlier/sft_$prior/config.json" ] || dry_run ||
      fail "stage=$stage starts from the $prior model, and $earlier/sft_$prior holds none; run first:" \
        "bash examples/sft_train.sh stage=$prior"
  done
}

# The embedded chain (Monet 1 -> 2 -> 3), sealed: rebuilt from scratch when its settings change, else skipped.
build_embedded_chain() {
  local model="$EMBEDDED/tiny_sft_model" settings
  settings="SFT_STEPS_1=${SFT_STEPS_1:-100}
SFT_STEPS_2=${SFT_STEPS_2:-60}
SFT_STEPS_3=${SFT_STEPS_3:-250}
LATENT_SIZE=$LATENT_SIZE
recipe=$(declare -f toy_stage_args | sha256sum | cut -c1-12)
config=$(content_hash "$REPO/examples/config/sft_tiny_cpu.yaml")
toy_data=$(content_hash "$TOY/sft_monet.json" "$TOY/images")
tiny_model=$(content_hash "$EMBEDDED/tiny_model")"
  if ! open_warm_start "$settings" "$model" "$EMBEDDED/sft_monet1" "$EMBEDDED/sft_monet1-run" \
      "$EMBEDDED/sft_monet2" "$EMBEDDED/sft_monet2-run"; then
    echo "== embedded warm start: $model is sealed with these settings (SFT_OK); delete it to rebuild"
    return 0
  fi
  echo "== embedded latent SFT, Monet stage 1: the toy chains with the zoomed image in them"
  toy_stage_args monet1 "$EMBEDDED"
  run_step "$PYTHON" -m RL.train_sft "${STAGE_ARGS[@]}" sft.output_dir="$EMBEDDED/sft_monet1"
  echo "== Monet stage 2: the zoom seen only by the latents, aligned to stage 1's observation states"
  toy_stage_args monet2 "$EMBEDDED"
  run_step "$PYTHON" -m RL.train_sft "${STAGE_ARGS[@]}" sft.output_dir="$EMBEDDED/sft_monet2"
  echo "== Monet stage 3: no zoom; the latents learn stage 2's, from the stage-1 model"
  toy_stage_args monet3 "$EMBEDDED"
  run_step "$PYTHON" -m RL.train_sft "${STAGE_ARGS[@]}" sft.output_dir="$model"
  seal_warm_start "$settings" "$model"
}

if ! model_given "$@" && ! has_gpu; then
  embedded_env
  stages="$EMBEDDED/stages"
  if [ -z "$stage" ]; then
    [ "${#rest[@]}" -eq 0 ] || fail "the embedded warm start takes no key=value overrides (got ${rest[0]}): VLPO" \
      "starts from it. Set SFT_STEPS_1/2/3 or LATENT_SIZE, or train one stage with your keys:" \
      "bash examples/sft_train.sh stage=monet1 ${rest[*]}"
    ensure_toy_inputs
    build_embedded_chain
    exit 0
  fi
  require_earlier_stages "$stage" "$stages"
  ensure_toy_inputs
  toy_stage_args "$stage" "$stages"
  echo "== embedded latent SFT, stage $stage on the toy task: the model in $stages/sft_$stage"
  run_last "$PYTHON" -m RL.train_sft "${STAGE_ARGS[@]}" sft.output_dir="$stages/sft_$stage" "${rest[@]}"
fi

if [ -z "$stage" ]; then
  fail "give the stage: stage=${STAGES// /|}"
fi
if ! model_given "$@"; then
  fail "give the model to train: worker.actor.model.model_path=/path/to/model"
fi
run_last "$PYTHON" -m RL.train_sft config="$REPO/examples/config/sft_${stage}.yaml" sft.stage="$stage" "${rest[@]}"
