# Sourced by the launch scripts: the repository root as working folder, the Python to use, the environment every run
# wants, and the two questions that pick the embedded default (a model given? a GPU here?).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export LATENT_SIZE="${LATENT_SIZE:-10}"
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export VLLM_NO_USAGE_STATS=1 NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
EMBEDDED=runs/_embedded
TOY=examples/toy_data/generated

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
