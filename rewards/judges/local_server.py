"""A loopback judge server speaking OpenAI chat-completions and Gemini generateContent, with injectable faults.

For tests and offline demos: it judges like a lenient model (the reference's words all appear in the prediction's
answer → correct; a looping wrong response → −1 in repetition mode). A marker ``[fault:NAME]`` in the question makes it
misbehave: ``slow`` (answers after ``slow_s``), ``429`` (always, with ``Retry-After``), ``429once`` (first time only),
``500``, ``500once``, ``truncated`` (cut-off JSON), ``maybe`` (a reply that is neither verdict). ``hits`` counts
requests per fault name ("none" for normal ones). Keys are compared, never stored or logged.
"""
from __future__ import annotations

import hmac
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rewards.answer import last_boxed

_FAULT_RE = re.compile(r"\[fault:([a-z0-9]+)\]")
_SECTION_RE = re.compile(r"\[Reference answer\]\n(.*?)\n\n\[Prediction\]\n(.*)\n\[End of prediction\]", re.DOTALL)
_GEMINI_PATH_RE = re.compile(r"^/v1beta/models/([^/:]+):generateContent$")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9.]+", text.lower()))


def _is_looping(text: str) -> bool:
    sentences = [s.strip() for s in re.split(r"[.\n]", text) if s.strip()]
    return any(count >= 3 for count in Counter(sentences).values())


def judge_text(user: str, repetition: bool) -> str:
    """The verdict a sensible judge model would reply for one of our prompts."""
    match = _SECTION_RE.search(user)
    if not match:
        return "I cannot tell."
    reference, prediction = match.group(1), match.group(2)
    boxed = last_boxed(prediction)
    answer = prediction if boxed is None else boxed
    correct = bool(_words(reference)) and _words(reference) <= _words(answer)
    if not repetition:
        return "yes" if correct else "no"
    return "1" if correct else ("-1" if _is_looping(prediction) else "0")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients that time out reset the connection: expected here
        pass


class LocalJudgeServer:
    """``with LocalJudgeServer(key="k") as server: ... server.base_url ...``; ephemeral port on 127.0.0.1."""

    def __init__(self, key: str = "test-key", slow_s: float = 2.0, retry_after_s: float = 1.0):
        self._key, self.slow_s, self.retry_after_s = key, slow_s, retry_after_s
        self.hits: Counter = Counter()
        self.unauthorized = 0
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._httpd = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()

    def total_hits(self) -> int:
        return sum(self.hits.values())

    def _first_time(self, token: str) -> bool:
        with self._lock:
            first = token not in self._seen
            self._seen.add(token)
            return first

    def _authorized(self, headers) -> bool:
        given = headers.get("x-goog-api-key") or (headers.get("authorization") or "").removeprefix("Bearer ")
        return hmac.compare_digest(given.encode(), self._key.encode())

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                gemini = _GEMINI_PATH_RE.match(self.path)
                if self.path != "/v1/chat/completions" and not gemini:
                    return self._send(404, b'{"error": {"code": 404, "message": "not found"}}')
                if not server._authorized(self.headers):
                    with server._lock:
                        server.unauthorized += 1
                    return self._send(401, b'{"error": {"code": 401, "message": "bad key", "status": "UNAUTHENTICATED"}}')
                system, user = _gemini_texts(body) if gemini else _openai_texts(body)
                fault = (_FAULT_RE.search(user) or [None, "none"])[1]
                with server._lock:
                    server.hits[fault] += 1
                self._respond(fault, judge_text(user, "-1" in system), user, bool(gemini), body)

            def _respond(self, fault, verdict, user, gemini, body):
                error = lambda code, status: json.dumps(
                    {"error": {"code": code, "message": "injected fault", "status": status}}).encode()
                if fault == "slow":
                    time.sleep(server.slow_s)
                if fault == "429" or (fault == "429once" and server._first_time(user)):
                    return self._send(429, error(429, "RESOURCE_EXHAUSTED"), {"Retry-After": f"{server.retry_after_s:g}"})
                if fault == "500" or (fault == "500once" and server._first_time(user)):
                    return self._send(500, error(500, "INTERNAL"))
                if fault == "truncated":
                    return self._send(200, b'{"id": "chatcmpl-1", "choices": [{"index": 0, "mess')
                text = "maybe" if fault == "maybe" else verdict
                payload = _gemini_reply(text) if gemini else _openai_reply(text, body.get("model", ""))
                self._send(200, json.dumps(payload).encode())

        return Handler


def _openai_texts(body: dict) -> tuple[str, str]:
    messages = body.get("messages", [])
    pick = lambda role: "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == role)
    return pick("system"), pick("user")


def _gemini_texts(body: dict) -> tuple[str, str]:
    parts = lambda c: "\n".join(p.get("text", "") for p in (c or {}).get("parts", []))
    system = parts(body.get("systemInstruction") or body.get("system_instruction"))
    return system, "\n".join(parts(c) for c in body.get("contents", []))


def _openai_reply(text: str, model: str) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def _gemini_reply(text: str) -> dict:
    return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP",
                            "index": 0}],
            "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1, "totalTokenCount": 2}}
