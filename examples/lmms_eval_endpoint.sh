#!/usr/bin/env bash
# lmms-eval's OpenAI-compatible model class evaluating our served model, over the toy task's held-out questions:
#
#   bash examples/lmms_eval_endpoint.sh [MODEL_DIR | URL]
#
# MODEL_DIR (default: the embedded runs/_embedded/tiny_sft_model): the script serves it with `python -m tools.serve`
# on a free loopback port (fp32 without a GPU; log in $LMMS_OUT/server.log) and stops that server by its PID at exit.
# URL (http://HOST:PORT/v1): a server already running; the model asked is $LMMS_MODEL, else the first it lists.
# lmms-eval runs in its own venv, $LMMS_VENV (default .venv-lmms in the repository), created on the first run with
# lmms-eval==$LMMS_EVAL_VERSION (0.7.3; minutes): lmms-eval moves numpy to 2.4.x, which the vLLM extras refuse.
# The task is examples/lmms_eval_task (toy_latent): each question of $LMMS_DATA (default: the toy task's val.jsonl,
# generated first if missing) with its image, greedy, 48 new tokens; its metrics are exact_match (the project's rule
# judge on the answer after the latent blocks, with a copy of rewards/answer.py) and latent_rate (the share of
# responses holding a <latent×K> block). lmms-eval writes its results and the logged samples under $LMMS_OUT
# (default runs/lmms_eval); the script prints where, the accuracy and one response.
# Environment: LMMS_OUT, LMMS_VENV, LMMS_DATA, LMMS_MODEL, LMMS_LIMIT (the first N questions only), LMMS_CONCURRENCY
# (parallel requests, default 4), LMMS_EVAL_VERSION. docs/evaluation.md §7 has a measured run.
set -euo pipefail
source "$(dirname "$0")/common.sh" "$@"
[ "$#" -le 1 ] || fail "lmms_eval_endpoint.sh takes one MODEL_DIR or URL (got $#); set its environment variables instead"

TARGET="${1:-$EMBEDDED/tiny_sft_model}"
OUT="$(realpath -m -- "${LMMS_OUT:-$REPO/runs/lmms_eval}")"
VENV="$(realpath -m -- "${LMMS_VENV:-$REPO/.venv-lmms}")"
VERSION="${LMMS_EVAL_VERSION:-0.7.3}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"

# lmms-eval's own environment, installed once (a marker names what was installed; a new LMMS_EVAL_VERSION reinstalls).
# As install.sh: torch==2.13.0 first (the CPU build where pip finds one) and held by a constraint, so lmms-eval does
# not pull torch 2.14 with gigabytes of NVIDIA wheels. filelock<4: lmms-eval 0.7.3's evaluator imports filelock._api,
# which filelock 4 no longer has. torchvision: the only release pip matches to torch 2.13.0 is a CUDA build that
# cannot import next to the CPU torch ("operator torchvision::nms does not exist"), and transformers imports it when
# installed; it is removed then (the openai_compatible model class never needs it).
LMMS_PIP=("lmms-eval==$VERSION" "filelock<4")
# That venv's Python without common.sh's PYTHONPATH: lmms-eval never sees (or imports) this project.
lmms_python() { env -u PYTHONPATH "$VENV/bin/python" "$@"; }
lmms_pip() {  # pip of that venv, without the notes about unreadable local package folders
  lmms_python -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "is neither a file nor a directory" || true; }
}
ensure_lmms_venv() {
  [ "$(cat "$VENV/LMMS_EVAL_OK" 2>/dev/null)" = "torch==2.13.0 ${LMMS_PIP[*]}" ] && return 0
  local started=$SECONDS
  echo "== installing torch==2.13.0, then ${LMMS_PIP[*]} into $VENV (its own venv: lmms-eval needs numpy>=2.4)"
  python3 -m venv "$VENV"
  lmms_pip install torch==2.13.0
  echo "torch==2.13.0" > "$VENV/constraints.txt"
  lmms_pip install -c "$VENV/constraints.txt" "${LMMS_PIP[@]}"
  lmms_python -c "import torchvision" 2>/dev/null || lmms_pip uninstall -y torchvision
  lmms_python -c "import lmms_eval.evaluator, lmms_eval.models.chat.openai" \
    || fail "lmms-eval does not import in $VENV (see above)"
  echo "torch==2.13.0 ${LMMS_PIP[*]}" > "$VENV/LMMS_EVAL_OK"
  echo "== installed in $((SECONDS - started)) s"
}

# The task folder in the run: the YAML and utils.py, the rule judge's answer module, the rows with absolute images.
write_task() {
  local data="${LMMS_DATA:-$TOY/val.jsonl}"
  [ -n "${LMMS_DATA:-}" ] || [ -f "$data" ] || ensure_toy_inputs
  [ -f "$data" ] || fail "LMMS_DATA=$data: no such file (the project's rows: problem with <image>, answer, images)"
  rm -rf "$OUT/task" && mkdir -p "$OUT/task"
  cp "$REPO/examples/lmms_eval_task/toy_latent.yaml" "$REPO/examples/lmms_eval_task/utils.py" "$OUT/task/"
  cp "$REPO/rewards/answer.py" "$OUT/task/rule_answer.py"
  echo "== $(lmms_python "$OUT/task/utils.py" "$data" "$OUT/task/rows.jsonl") questions from $data"
}

SERVER_PID=""
stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 60); do kill -0 "$SERVER_PID" 2>/dev/null || return 0; sleep 1; done
  kill -KILL -- "-$SERVER_PID" 2>/dev/null || true  # its own process group (setsid): the engine process too
}

# Serves MODEL_DIR on a free loopback port; sets URL once /v1/models answers.
start_server() {
  local port dtype=() deadline
  port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  has_gpu || dtype=(--dtype float32)
  echo "== serving $TARGET on 127.0.0.1:$port (log: $OUT/server.log)"
  trap stop_server EXIT
  setsid "$PYTHON" -m tools.serve "$TARGET" --host 127.0.0.1 --port "$port" --served-model-name latent \
    --max-model-len 1024 "${dtype[@]}" > "$OUT/server.log" 2>&1 &
  SERVER_PID=$!
  URL="http://127.0.0.1:$port/v1"
  deadline=$((SECONDS + 900))
  until curl -sf "$URL/models" > /dev/null; do
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -n 30 "$OUT/server.log" >&2; fail "the server exited"; }
    [ "$SECONDS" -lt "$deadline" ] || { tail -n 30 "$OUT/server.log" >&2; fail "the server did not answer in 900 s"; }
    sleep 2
  done
}

ensure_lmms_venv
write_task
if [[ "$TARGET" == http://* || "$TARGET" == https://* ]]; then
  URL="${TARGET%/}"
else
  [ -n "${1:-}" ] || [ -f "$TARGET/SFT_OK" ] || fail "no MODEL_DIR or URL given and no embedded model in $TARGET" \
    "(bash examples/sft_train.sh builds it)"
  start_server
fi
MODEL="${LMMS_MODEL:-$(curl -sf "$URL/models" | lmms_python -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')}"

limit=()
[ -z "${LMMS_LIMIT:-}" ] || limit=(--limit "$LMMS_LIMIT")
echo "== lmms-eval: --model openai_compatible model_version=$MODEL at $URL"
started="$(date +%s)"
OPENAI_API_BASE="$URL" OPENAI_API_KEY="${OPENAI_API_KEY:-unused}" \
  lmms_python -m lmms_eval --model openai_compatible \
    --model_args "model_version=$MODEL,num_concurrent=${LMMS_CONCURRENCY:-4},max_retries=2" \
    --include_path "$OUT/task" --tasks toy_latent --batch_size 1 --log_samples --output_path "$OUT" "${limit[@]}" \
  2>&1 | tee "$OUT/lmms_eval.log"

# lmms-eval exits 0 when the evaluation fails ("Error during evaluation"): a results file of this run says it worked.
lmms_python - "$OUT" "$started" <<'EOF'
import json, sys
from pathlib import Path

out, started = Path(sys.argv[1]), float(sys.argv[2])
found = [path for path in out.rglob("*_results.json") if path.stat().st_mtime >= started]
if not found:
    sys.exit(f"error: lmms-eval wrote no results under {out} (its log: {out / 'lmms_eval.log'})")
results = max(found, key=lambda path: path.stat().st_mtime)
metrics = json.loads(results.read_text())["results"]["toy_latent"]
samples = sorted(results.parent.glob("*_samples_toy_latent.jsonl"), key=lambda path: path.stat().st_mtime)
print(f"== results: {results}")
print(f"== exact_match {metrics['exact_match,none']:.3f}, latent_rate {metrics['latent_rate,none']:.3f}")
if samples:
    first = json.loads(samples[-1].read_text().splitlines()[0])
    print(f"== samples: {samples[-1]}\n   first response: {first['filtered_resps']!r} (answer {first['target']!r})")
EOF
