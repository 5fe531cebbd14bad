"""The reward-function contract: what a user's ``path.py:fn`` receives and must return.

``reward_type=batch``: ``fn(list[RewardInput], **kwargs) -> list[dict]`` (one call per batch, so group-level rewards see
whole groups); ``reward_type=sequential``: ``fn(RewardInput, **kwargs) -> dict``. Every dict holds ``overall`` plus named
float components. Mistakes are reported with the function's spec, because they surface far from the user's file.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REWARD_TYPES = ("batch", "sequential")
_REPO_ROOT = Path(__file__).resolve().parents[1]  # where the bundled reward functions (rewards/, examples/) live


class RewardFunctionError(ValueError):
    """A reward function could not be loaded, or returned something other than the contract."""


@dataclass
class RewardInput:
    """One sample as the reward function sees it."""

    prompt: str
    response: str  # latent blocks rendered as <latent×K>
    ground_truth: str = ""
    response_length: int = 0  # tokens
    extra: dict[str, Any] = field(default_factory=dict)  # the data row's other fields
    group_id: str = ""  # samples of one prompt share it


def resolve_function_spec(spec: str) -> str:
    """The one rule for a ``file.py:fn`` path: absolute, because Ray workers may start in another directory; a relative
    path is taken from the current directory, else from the repository (the defaults name bundled files). A module
    spec (``package.module:fn``) is returned as it is."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target.endswith(".py"):
        return spec
    path = Path(target).expanduser()
    if not path.is_absolute() and not path.exists() and (_REPO_ROOT / path).exists():
        path = _REPO_ROOT / path
    return f"{path.resolve()}:{name}"


def _package_module(file: str):
    """The already-importable module for ``file`` when it sits in a package (so its relative imports work)."""
    folder, stem = os.path.split(file)
    parts = [os.path.splitext(stem)[0]]
    while os.path.isfile(os.path.join(folder, "__init__.py")):
        folder, pkg = os.path.split(folder)
        parts.insert(0, pkg)
    if len(parts) < 2:
        return None
    try:
        module = importlib.import_module(".".join(parts))
    except Exception:  # noqa: BLE001 - not importable under that name: load it as a plain file instead
        return None
    same = getattr(module, "__file__", None) and os.path.samefile(module.__file__, file)
    return module if same else None


def _load_from_file(path: str, name: str, spec: str) -> Callable:
    file = os.path.abspath(path)
    if not os.path.isfile(file):
        raise RewardFunctionError(f"reward function {spec!r}: file {file} does not exist")
    module = _package_module(file)
    if module is not None:
        return getattr(module, name, None)
    module_name = "_reward_fn_" + hashlib.sha1(file.encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(module_spec)
    # The standard library's recipe for importing a source file: the user's own module is registered under its
    # private name (dataclasses and pickling look it up by name); no library module is touched.
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise RewardFunctionError(f"reward function {spec!r}: importing {file} failed: {exc!r}") from exc
    return getattr(module, name, None)


def _load_from_module(module_path: str, name: str, spec: str) -> Callable:
    try:
        module = importlib.import_module(module_path)
    except Exception as exc:
        raise RewardFunctionError(f"reward function {spec!r}: cannot import module {module_path!r}: {exc!r}") from exc
    return getattr(module, name, None)


def load_reward_function(spec: str) -> Callable:
    """Resolve ``path/to/file.py:fn`` (relative to the current dir) or ``package.module:fn`` to a callable."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise RewardFunctionError(f"reward function {spec!r}: expected 'path.py:function' or 'package.module:function'")
    if target.endswith(".py"):
        fn = _load_from_file(target, name, spec)
    else:
        fn = _load_from_module(target, name, spec)
    if fn is None:
        raise RewardFunctionError(f"reward function {spec!r}: {target} has no attribute {name!r}")
    if not callable(fn):
        raise RewardFunctionError(f"reward function {spec!r}: {name!r} is not callable")
    return fn


def accepted_kwargs(fn: Callable, offered: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``offered`` that ``fn`` declares (all of it when it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return dict(offered)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(offered)
    return {k: v for k, v in offered.items() if k in params}


def validate_score(score: Any, spec: str, index: int) -> dict[str, float]:
    """Check one returned score dict; return it with float values."""
    if not isinstance(score, dict):
        raise RewardFunctionError(f"reward function {spec!r}: sample {index}: expected a dict, got {type(score).__name__}")
    if "overall" not in score:
        raise RewardFunctionError(f"reward function {spec!r}: sample {index}: dict has no 'overall' key ({sorted(score)})")
    out = {}
    for key, value in score.items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            raise RewardFunctionError(
                f"reward function {spec!r}: sample {index}: component {key!r} is not a number ({value!r})") from None
        if not math.isfinite(out[str(key)]):
            raise RewardFunctionError(f"reward function {spec!r}: sample {index}: component {key!r} is {value!r}")
    return out


def call_reward_function(fn: Callable, spec: str, reward_type: str, samples: list[RewardInput],
                         kwargs: dict[str, Any]) -> list[dict[str, float]]:
    """Run ``fn`` in its declared mode and validate the shape of what it returns."""
    if reward_type == "batch":
        scores = fn(samples, **kwargs)
        if not isinstance(scores, (list, tuple)) or len(scores) != len(samples):
            got = f"{type(scores).__name__} of length {len(scores)}" if hasattr(scores, "__len__") else type(scores).__name__
            raise RewardFunctionError(
                f"reward function {spec!r} (batch): expected a list of {len(samples)} dicts, got {got}")
    elif reward_type == "sequential":
        scores = [fn(sample, **kwargs) for sample in samples]
    else:
        raise RewardFunctionError(f"worker.reward.reward_type={reward_type!r}: expected one of {REWARD_TYPES}")
    return [validate_score(score, spec, i) for i, score in enumerate(scores)]
