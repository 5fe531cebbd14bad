"""What a served request may say about its latent blocks, and how its text shows them (no vLLM import).

The OpenAI protocol carries extension arguments only as a flat `vllm_xargs` object of strings and numbers, so a
served request controls its blocks with these keys (all optional; the model folder's settings are the defaults):

| key | value | default |
|---|---|---|
| `latent` | 1 / 0 (or true / false): blocks may open / text only | 1, or 0 when the folder's `sampling_strategy` is not `monet` |
| `latent_size` | K, latent steps per block (>= 1) | the folder's `latent_size`, else `LATENT_SIZE`, else 10 |
| `latent_noise` | std of the noise added to each latent (>= 0) | 0 (evaluation decodes without noise) |
| `latent_noise_relative` | 1 / 0: the std is in units of each hidden state's RMS | 1 when the folder's `latent_noise_scale` is `rms` |
| `latent_seed` | seed of the request's noise generator | the request's `seed`, else 0 |
| `latent_render` | `count` (each block as `<latent×K>`) / `omit` (blocks left out of the text) | the folder's `latent_render`, else `count` |
| `return_latents` | 1: the response's choice carries `latents` (one list of D floats per latent); not with `stream` or `n` > 1 | 0 |

`latent_key` is set by the server itself (to collect the latents of a `return_latents` request) and is refused from
clients. Anything else in `vllm_xargs` is left to vLLM.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from monet_models.latent_tokens import LatentTokens, default_latent_size
from monet_models.run_settings import read_run_settings

RENDER_MODES = ("count", "omit")
KEY_FIELD = "latent_key"
SERVE_KEYS = ("latent", "latent_size", "latent_noise", "latent_noise_relative", "latent_seed", "latent_render",
              "return_latents")


@dataclass(frozen=True)
class ServeDefaults:
    """A served model's block settings when a request says nothing, from its folder's latent_config.json."""

    latent: bool = True
    latent_size: int = 10
    noise_relative: bool = False
    render: str = "count"

    @classmethod
    def from_folder(cls, folder: str) -> "ServeDefaults":
        settings = read_run_settings(folder)  # {} for a hub name or a folder without latent_config.json
        render = settings.get("latent_render", "count")
        if render not in RENDER_MODES:
            raise ValueError(f"{folder}/latent_config.json: latent_render = {render!r}; expected one of {RENDER_MODES}")
        return cls(latent=settings.get("sampling_strategy", "monet") == "monet",
                   latent_size=settings.get("latent_size") or default_latent_size(),
                   noise_relative=settings.get("latent_noise_scale") == "rms", render=render)


def parse_xargs(xargs: dict | None) -> dict:
    """The serving keys of a request's `vllm_xargs`, checked and typed; a ValueError names the bad key."""
    xargs = xargs or {}
    if not isinstance(xargs, dict):
        raise ValueError("vllm_xargs: expected an object of flat keys")
    out = {}
    for key in SERVE_KEYS:
        if key not in xargs:
            continue
        value = xargs[key]
        if key in ("latent", "latent_noise_relative", "return_latents"):
            out[key] = _flag(key, value)
        elif key in ("latent_size", "latent_seed"):
            out[key] = _integer(key, value, minimum=1 if key == "latent_size" else None)
        elif key == "latent_noise":
            out[key] = _number(key, value)
        elif value not in RENDER_MODES:
            raise ValueError(f"vllm_xargs.latent_render: expected one of {RENDER_MODES}, got {value!r}")
        else:
            out[key] = value
    return out


def _flag(key: str, value) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "on", "yes", "0", "false", "off", "no"):
        return value.strip().lower() in ("1", "true", "on", "yes")
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"vllm_xargs.{key}: expected 1 or 0 (true or false), got {value!r}")


def _integer(key: str, value, minimum: int | None) -> int:
    try:
        number = int(value)
        if isinstance(value, float) and number != value:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"vllm_xargs.{key}: expected an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"vllm_xargs.{key}: must be >= {minimum}, got {number}")
    return number


def _number(key: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"vllm_xargs.{key}: expected a number, got {value!r}") from None
    if not number >= 0:
        raise ValueError(f"vllm_xargs.{key}: must be >= 0, got {value!r}")
    return number


def render_texts(tokenizer) -> dict:
    """The `BlockRenderer` arguments of a tokenizer: the block tokens' texts and every special token's."""
    ids = LatentTokens.from_tokenizer(tokenizer)
    start, pad, end = tokenizer.convert_ids_to_tokens([ids.start, ids.pad, ids.end])
    specials = set(tokenizer.all_special_tokens) | {
        token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    return {"start": start, "pad": pad, "end": end, "specials": sorted(specials)}


class BlockRenderer:
    """Text decoded with its special tokens -> the text `render_response` prints for the same tokens: a run of K
    pads closed by the block end becomes `<latent×K>` (or nothing with `omit`), the block start goes, and the other
    special tokens go too unless the client asked to keep them. Fed piece by piece (a stream's deltas), it holds
    back only what may still become a special token; `flush` ends the response (a block cut by the length limit
    shows its pads so far)."""

    def __init__(self, start: str, pad: str, end: str, specials: list[str], mode: str = "count",
                 keep_specials: bool = False):
        self.start, self.pad, self.end, self.mode, self.keep_specials = start, pad, end, mode, keep_specials
        names = sorted({start, pad, end, *specials}, key=len, reverse=True)
        self.specials = set(names)
        self._split = re.compile("(" + "|".join(re.escape(name) for name in names) + ")")
        self._pending, self._count = "", 0

    def feed(self, text: str) -> str:
        self._pending += text
        held = self._held_back(self._pending)
        ready, self._pending = self._pending[:len(self._pending) - held], self._pending[len(self._pending) - held:]
        return self._render(ready)

    def flush(self) -> str:
        out = self._render(self._pending)
        self._pending = ""
        if self._count:
            out += self._block(self._count)
            self._count = 0
        return out

    def _render(self, text: str) -> str:
        out = []
        for piece in self._split.split(text):
            if not piece:
                continue
            if piece == self.pad:
                self._count += 1
            elif piece == self.end and self._count:
                out.append(self._block(self._count))
                self._count = 0
            elif piece == self.start:
                continue
            elif piece in self.specials:
                if self.keep_specials:
                    out.append(piece)
            else:
                out.append(piece)
        return "".join(out)

    def _block(self, count: int) -> str:
        return f"<latent×{count}>" if self.mode == "count" else ""

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a special token's text."""
        for size in range(min(len(text), max(map(len, self.specials)) - 1), 0, -1):
            tail = text[-size:]
            if any(name.startswith(tail) and name != tail for name in self.specials):
                return size
        return 0


LATENT_MARK = re.compile(r"<latent×(\d+)>")


def count_latents(text: str) -> tuple[int, int]:
    """(blocks, latents) of a response rendered with `count`: what an endpoint's answer shows of its reasoning."""
    sizes = [int(k) for k in LATENT_MARK.findall(text)]
    return len(sizes), sum(sizes)
