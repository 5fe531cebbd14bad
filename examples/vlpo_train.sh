#!/usr/bin/env bash
# VLPO training (Monet's RL with latent visual tokens) on Ray.
#
#   bash examples/vlpo_train.sh worker.actor.model.model_path=/ckpt/monet-sft data.train_files=/data/thyme [key=value ...]
#
# Defaults are Monet's vlpo_train.sh (examples/config/vlpo_monet.yaml); extra dotted overrides win. Re-running
# with the same trainer.experiment_name resumes from its newest complete checkpoint. LATENT_SIZE sets K.
#
# With no model given and no GPU, it runs the embedded default: a tiny Qwen2.5-VL built offline, warm-started
# with the latent SFT chain on the bundled toy task (Monet stages 1 -> 2 -> 3, examples/sft_train.sh), then trained
# with VLPO from the stage-3 model on a local Ray cluster (examples/config/vlpo_tiny_cpu.yaml; about 12 minutes on
# an idle 2-core machine, one run; about twice that on a loaded one). Your key=value overrides reach only the VLPO
# run, e.g. your own rows on the tiny model:
#   bash examples/vlpo_train.sh data.train_files=my.jsonl data.val_files=my_val.jsonl
# The warm start is sealed: built once, with only these settings, recorded in its SFT_OK and rebuilt when they change:
#   SFT_STEPS_1, SFT_STEPS_2, SFT_STEPS_3   steps of the Monet stages (default 100, 60, 250)
#   LATENT_SIZE                             K, latent steps per block (default 10; VLPO's too)
# It ends by printing VLPO's held-out gain and pointing at examples/latent_evidence.sh (what the latents carry).
# Environment: EMBEDDED_DIR (the tiny model and the warm start, default runs/_embedded), TOY_DIR (the toy data,
# default examples/toy_data/generated), TOY_TASK (shapes, the default, or pointer: docs/evaluation.md section 6.1),
# DRY_RUN=1 (print the commands, run nothing).
set -euo pipefail
source "$(dirname "$0")/common.sh" "$@"

if ! model_given "$@" && ! has_gpu; then
  embedded_env
  # The warm start has to get the model reading the image, not only the answer format: VLPO this short sharpens a
  # readout the warm start has begun but cannot find one (README section 2). None of "$@" reaches it.
  echo "== embedded default: the tiny model, the toy task and the latent SFT warm start (Monet stages 1-3)"
  bash "$REPO/examples/sft_train.sh"
  echo "== embedded default: VLPO on a local Ray cluster (CPU)"
  run_step "$PYTHON" -m RL.train_vlpo config="$REPO/examples/config/vlpo_tiny_cpu.yaml" \
    worker.actor.model.model_path="$EMBEDDED/tiny_sft_model" data.train_files="$TOY/train.jsonl" \
    data.val_files="$TOY/val.jsonl" worker.rollout.latent_size="$LATENT_SIZE" "$@"
  # The end message: the held-out gain of this run, and where the evidence of what the latents carry is.
  save_dir=runs name=tiny_cpu
  for arg in "$@"; do
    case "$arg" in trainer.save_dir=*) save_dir="${arg#*=}" ;; trainer.experiment_name=*) name="${arg#*=}" ;; esac
  done
  dry_run || "$PYTHON" -m tools.latent_evidence --gain "$save_dir/$name"
  exit 0
fi

if ! model_given "$@"; then
  fail "give the SFT checkpoint to train: worker.actor.model.model_path=/path/to/monet-sft-stage3"
fi
run_last "$PYTHON" -m RL.train_vlpo config="$REPO/examples/config/vlpo_monet.yaml" worker.rollout.latent_size="$LATENT_SIZE" "$@"
