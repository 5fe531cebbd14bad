# Sourced by the launch scripts with their arguments (`source common.sh "$@"`): `--help`, the repository's place
# ($REPO), the Python to use, the environment every run wants, the two questions that pick the embedded default
# (a model given? a GPU here?), DRY_RUN, and the inputs and seals of the embedded warm starts.
# The scripts stay in the folder they were started from, so every relative path the user gives (data.train_files,
# a model, config=, trainer.save_dir, --out) means what it means in that folder, as with `python -m ...`; the
# scripts' own files are named from $REPO, and PYTHONPATH carries the repository to Python and its Ray workers.
LAUNCH_SCRIPT="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)/$(basename "${BASH_SOURCE[1]}")"

# `--help` / `-h` anywhere: the script's header comment, and nothing else (no model is built, no torch imported).
for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p;}' "$LAUNCH_SCRIPT"; exit 0 ;;
  esac
done

# The embedded folder and the toy data may be moved (tests do); a relative path is the caller's, made absolute (and
# exported so, for the scripts this one runs).
[ -z "${EMBEDDED_DIR:-}" ] || export EMBEDDED_DIR="$(realpath -m -- "$EMBEDDED_DIR")"
[ -z "${TOY_DIR:-}" ] || export TOY_DIR="$(realpath -m -- "$TOY_DIR")"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
EMBEDDED="${EMBEDDED_DIR:-$REPO/runs/_embedded}"
TOY="${TOY_DIR:-$REPO/examples/toy_data/generated}"
# The toy task the embedded defaults write into $TOY: pointer (RL/toy_pointer_task.py: "what colour is the cell the
# arrow points to?", Monet rows zooming into the target) or shapes (RL/toy_task.py). docs/evaluation.md §6.
TOY_TASK="${TOY_TASK:-shapes}"
TOY_TRAIN="${TOY_TRAIN:-512}"  # training images the toy generator draws
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export LATENT_SIZE="${LATENT_SIZE:-10}"
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export VLLM_NO_USAGE_STATS=1 NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

has_gpu() { [ "$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")" = 1 ]; }

# True when the arguments name a model; otherwise, on a machine without a GPU, the scripts run the embedded default.
model_given() {
  local arg
  for arg in "$@"; do
    case "$arg" in worker.actor.model.model_path=*) return 0 ;; esac
  done
  return 1
}

# The embedded default is offline and single-threaded per worker (two Ray workers share 2 cores).
embedded_env() { export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1; }

# DRY_RUN=1: print each command the script would run (`+ command`) and run none, so what reaches which run can be
# read before anything trains. Nothing is written, built or deleted.
dry_run() { [ "${DRY_RUN:-0}" = 1 ]; }
run_step() {
  if dry_run; then echo "+ $(printf '%q ' "$@")"; else "$@"; fi
}
run_last() {  # the script's final command, in place of the shell
  dry_run && { echo "+ $(printf '%q ' "$@")"; exit 0; }
  exec "$@"
}

fail() { echo "error: $*" >&2; exit 2; }

# A short hash of the contents of files and folders (sorted, names excluded): what a warm start was built from.
content_hash() {
  { find "$@" -type f -print0 2>/dev/null || true; } | LC_ALL=C sort -z | xargs -0r cat | sha256sum | cut -c1-12
}

# Runs a builder unless STAMP holds VERSION (a hash of the builder's code), then writes VERSION into STAMP.
build_once() {
  local stamp=$1 version=$2
  shift 2
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$version" ] && return 0
  run_step "$@"
  dry_run || echo "$version" > "$stamp"
}

# The tiny offline model and the toy task (every file the embedded defaults read: RL rows, Monet and Mirage SFT rows,
# the proposer/solver warm-start rows), rebuilt when missing or made by another version of their generator.
toy_prompts=("$REPO/examples/format_prompt/toy_proposer.jinja" "$REPO/examples/format_prompt/toy_solver.jinja")
ensure_toy_inputs() {
  build_once "$EMBEDDED/tiny_model/BUILD_OK" "$(content_hash "$REPO/monet_models/tiny_model.py" "$REPO/RL/toy_task.py")" \
    "$PYTHON" -m tools.make_tiny_model --out "$EMBEDDED/tiny_model"
  [[ "$TOY_TASK" == pointer || "$TOY_TASK" == shapes ]] || fail "TOY_TASK=$TOY_TASK: give pointer or shapes"
  build_once "$TOY/TOY_OK" "$TOY_TASK-$TOY_TRAIN-$(content_hash "$REPO/RL/toy_task.py" \
      "$REPO/RL/toy_pointer_task.py" "${toy_prompts[@]}")" \
    "$PYTHON" -m tools.toy_task --task "$TOY_TASK" --out "$TOY" --train "$TOY_TRAIN" --sft \
      --selfplay-prompts "${toy_prompts[@]}"
}

# A warm start's seal: its model folder's SFT_OK holds the settings it was built with, one `name=value` a line, so a
# change (steps, LATENT_SIZE, a config, the toy data...) rebuilds it instead of sealing a stale model for every later
# run. open_warm_start SETTINGS MODEL [FOLDER...] returns 1 when the seal matches (nothing to build). Otherwise it
# deletes what was built with other settings (MODEL, its run MODEL-run and the FOLDERs of earlier stages), records the
# settings in MODEL.BUILDING (a killed build resumes only with the same settings) and returns 0.
open_warm_start() {
  local settings=$1 model=$2 record
  shift 2
  [ -f "$model/SFT_OK" ] && [ "$(cat "$model/SFT_OK")" = "$settings" ] && return 1
  for record in "$model.BUILDING" "$model/SFT_OK"; do
    [ -f "$record" ] || continue
    if [ "$(cat "$record")" != "$settings" ]; then
      echo "== warm start settings changed ($(settings_diff "$(cat "$record")" "$settings")): rebuilding $model"
      run_step rm -rf "$model" "$model-run" "$@"
    fi
    break
  done
  dry_run || { mkdir -p "$(dirname "$model")" && printf '%s\n' "$settings" > "$model.BUILDING"; }
  return 0
}

seal_warm_start() {  # SETTINGS MODEL: written last, once the model is complete
  dry_run && return 0
  printf '%s\n' "$1" > "$2/SFT_OK"
  rm -f "$2.BUILDING"
}

# "name old -> new" for each setting that differs between two seals.
settings_diff() {
  local old=$1 new=$2 line name before changed=""
  [ -n "$old" ] || { echo "sealed without its settings"; return; }
  while IFS= read -r line; do
    grep -qxF -- "$line" <<<"$old" && continue
    name=${line%%=*}
    before=$(grep -m1 "^$name=" <<<"$old" || true)
    before=${before:-$name=unset}
    changed+="${changed:+, }$name ${before#*=} -> ${line#*=}"
  done <<<"$new"
  echo "${changed:-settings removed}"
}
