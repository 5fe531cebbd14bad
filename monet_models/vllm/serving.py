"""Serving a latent model with vLLM's own OpenAI-compatible server (`python -m tools.serve`), through two of its
extension points:

- `ServingLogitsProcessor` (`--logits-processors`): the latent-block processor that also takes requests carrying no
  `LatentRequestArgs`, building them from the flat `vllm_xargs` keys of `serve_args.py` over the model folder's
  defaults. So every request reasons with blocks unless it says `latent: 0`; its record is forgotten when it ends,
  unless the server asked to keep it (`return_latents`).
- `LatentServingMiddleware` (`--middleware`, an ASGI class): on `/v1/chat/completions` and `/v1/completions` it has
  vLLM decode with the special tokens (`skip_special_tokens=false`) and rewrites each choice's text, streamed or not,
  with `serve_args.BlockRenderer`, so blocks read `<latent×K>` as in `tools.generate` and training logs; for a
  `return_latents` request it tags the request with a key and, once the answer is complete, collects its latents
  from the engine (`LatentWorkerExtension.monet_collect_latents`) into the choice's `latents`.

A bad serving key is a 400 naming it, before the request reaches the engine.
"""
from __future__ import annotations

import functools
import json
import uuid

from monet_models.vllm.logits import LatentBlockLogitsProcessor
from monet_models.vllm.request import EXTRA_ARGS_KEY, LatentRequestArgs
from monet_models.vllm.serve_args import KEY_FIELD, BlockRenderer, ServeDefaults, parse_xargs, render_texts

PATHS = ("/v1/chat/completions", "/v1/completions")


class ServingLogitsProcessor(LatentBlockLogitsProcessor):
    def __init__(self, vllm_config, device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        self.defaults = ServeDefaults.from_folder(vllm_config.model_config.model)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        xargs = sampling_params.extra_args or {}
        if EXTRA_ARGS_KEY in xargs:
            return super().validate_params(sampling_params)
        parse_xargs(xargs)

    def request_args(self, params) -> LatentRequestArgs | None:
        xargs = params.extra_args or {}
        if EXTRA_ARGS_KEY in xargs:
            return super().request_args(params)
        values = parse_xargs(xargs)
        key = xargs.get(KEY_FIELD)
        return LatentRequestArgs(
            key=str(key) if key else f"served:{uuid.uuid4().hex}", keep_record=bool(key),
            latent_size=values.get("latent_size", self.defaults.latent_size),
            allow_latents=values.get("latent", self.defaults.latent), log_prob_temperature=1.0,
            noise_std=values.get("latent_noise", 0.0),
            noise_relative=values.get("latent_noise_relative", self.defaults.noise_relative),
            noise_seed=values.get("latent_seed", params.seed or 0))


@functools.lru_cache(maxsize=4)
def _render_setup(tokenizer_path: str, model_path: str) -> tuple[dict, ServeDefaults]:
    """Token texts the renderer needs and the folder's defaults, once per server."""
    from transformers import AutoTokenizer

    return render_texts(AutoTokenizer.from_pretrained(tokenizer_path)), ServeDefaults.from_folder(model_path)


class LatentServingMiddleware:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in PATHS:
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        try:
            request = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            request = None
        if not isinstance(request, dict):  # vLLM answers malformed bodies itself
            return await self.app(scope, _replay(body, receive), send)
        state = scope["app"].state
        tokens, defaults = _render_setup(state.args.tokenizer or state.args.model, state.args.model)
        try:
            plan = _plan(request, defaults)
        except ValueError as error:
            return await _error(send, str(error))
        xargs = dict(request.get("vllm_xargs") or {})
        if plan["key"]:
            xargs[KEY_FIELD] = plan["key"]
        if xargs:
            request["vllm_xargs"] = xargs
        request["skip_special_tokens"] = False
        new_body = json.dumps(request).encode()
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        scope = {**scope, "headers": headers + [(b"content-length", str(len(new_body)).encode())]}
        renderers = lambda: BlockRenderer(**tokens, mode=plan["render"], keep_specials=plan["keep"])  # noqa: E731
        rewriter = _Rewriter(send, renderers, plan["key"], state.engine_client)
        await self.app(scope, _replay(new_body, receive), rewriter.send)


def _plan(request: dict, defaults: ServeDefaults) -> dict:
    """How to rewrite this request's answer: render mode, kept specials, and the key of a `return_latents` one."""
    xargs = request.get("vllm_xargs") or {}
    if isinstance(xargs, dict) and KEY_FIELD in xargs:
        raise ValueError(f"vllm_xargs.{KEY_FIELD}: set by the server, not by clients")
    values = parse_xargs(xargs)
    key = None
    if values.get("return_latents"):
        if request.get("stream") or (request.get("n") or 1) != 1:
            raise ValueError("vllm_xargs.return_latents: only for a request with stream=false and n=1")
        key = f"served:{uuid.uuid4().hex}"
    return {"render": values.get("latent_render", defaults.render), "key": key,
            "keep": request.get("skip_special_tokens") is False}


class _Rewriter:
    """Wraps the server's `send`: renders each choice's text (JSON at once, server-sent events as they come)."""

    def __init__(self, send, make_renderer, key: str | None, engine_client):
        self._send, self._make, self._key, self._engine = send, make_renderer, key, engine_client
        self._start, self._mode, self._chunks, self._renderers, self._tail = None, None, [], {}, b""

    async def send(self, message):
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            if message["status"] != 200:
                self._mode = "pass"
            else:
                self._mode = "events" if content_type.startswith(b"text/event-stream") else "json"
            if self._mode == "json":
                self._start = message  # sent with the rewritten body's length
                return None
            return await self._send(message)
        if message["type"] != "http.response.body" or self._mode == "pass":
            return await self._send(message)
        if self._mode == "events":
            return await self._send({**message, "body": self._events(message.get("body", b""),
                                                                       message.get("more_body", False))})
        self._chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return None
        body = await self._json(b"".join(self._chunks))
        headers = [(k, v) for k, v in self._start.get("headers", []) if k.lower() != b"content-length"]
        await self._send({**self._start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
        return await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def _json(self, body: bytes) -> bytes:
        response = json.loads(body)
        for choice in response.get("choices", []):
            field, holder = _text_field(choice)
            if holder is not None and isinstance(holder.get(field), str):
                renderer = self._make()
                holder[field] = renderer.feed(holder[field]) + renderer.flush()
        if self._key and response.get("choices"):
            latents = await self._engine.collective_rpc("monet_collect_latents", args=([self._key],))
            response["choices"][0]["latents"] = latents[0][self._key]
        return json.dumps(response, ensure_ascii=False).encode()

    def _events(self, body: bytes, more: bool) -> bytes:
        """Complete `data: {...}` events rewritten; a partial one waits for the next chunk."""
        text = self._tail + body
        events = text.split(b"\n\n")
        self._tail = b"" if not more else events.pop()
        return b"".join(self._event(event) + b"\n\n" for event in events if event.strip())

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data: ") or event.strip() == b"data: [DONE]":
            return event
        try:
            chunk = json.loads(event[len(b"data: "):])
        except json.JSONDecodeError:
            return event
        for choice in chunk.get("choices", []) if isinstance(chunk, dict) else []:
            field, holder = _text_field(choice)
            renderer = self._renderers.setdefault(choice.get("index", 0), self._make())
            text = renderer.feed(holder.get(field) or "") if holder is not None else ""
            if choice.get("finish_reason") is not None:
                text += renderer.flush()
            if holder is not None and (holder.get(field) is not None or text):
                holder[field] = text
        return b"data: " + json.dumps(chunk, ensure_ascii=False).encode()


def _text_field(choice: dict) -> tuple[str, dict | None]:
    """Where a choice keeps its text: `message.content` (chat), `delta.content` (chat stream) or `text`."""
    for name in ("message", "delta"):
        if isinstance(choice.get(name), dict):
            return "content", choice[name]
    return "text", choice if "text" in choice else None


async def _read_body(receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later: the client's disconnect

    return replay


async def _error(send, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "BadRequestError", "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
