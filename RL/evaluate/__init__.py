"""Evaluation with latent reasoning: `python -m RL.evaluate MODEL_DIR data.val_files=F [method=...] [ablate=...]`.

Passes (each one jsonl of per-item results in `runs/eval/<name>/`, resumable): `direct` (batched generation with
latent blocks, or text only), the latent ablations (`ablate_zero|shuffle|noise|text`), `dmlr` (test-time latent
optimisation) and `rmm` (the reasoning-memory loop). `summary.json` / `summary.md` compare every pass in the folder.
Light to import: the entry point validates its command line before torch, transformers or Ray load.
"""


class EvaluationError(RuntimeError):
    """An evaluation that cannot go on for a reason the user can act on (the message says which)."""
