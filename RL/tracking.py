"""Metric logging for every trainer: metrics.jsonl (always), console, wandb, tensorboard, mlflow and swanlab when
asked (`trainer.logger`).

metrics.jsonl is the source of truth (plots and tests read it); the other sinks are views of it, each writing its
files inside the run folder unless its own environment variable points it elsewhere (WANDB_MODE=online,
MLFLOW_TRACKING_URI, SWANLAB_MODE=online), and each resuming the same tracker run when the training run resumes. Everything that
reaches a sink goes through `common.secrets.redact` first: secret-named keys, the values of secret config keys and
secret environment variables, and key-shaped strings are masked, so an API key can not leak through a config dump,
a metric or a logged generation.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

from tqdm import tqdm

from common.atomic import write_atomic
from common.cli import disk_full, no_space_failure
from common.jsonl import read_jsonl
from common.secrets import redact, secret_values  # the one home of the secret rules

CONSOLE_KEYS = ("reward/mean", "reward/accuracy", "val/accuracy", "actor/pg_loss", "actor/kl_loss",
                "rollout/latent_blocks", "solver/self_consistency", "proposer/reward", "val/majority_accuracy",
                "sft/loss", "sft/ce", "sft/align", "timing_s/step")
METRICS_FILE, GENERATIONS_FILE, WANDB_ID_FILE = "metrics.jsonl", "generations.jsonl", "wandb_run_id"
MLFLOW_ID_FILE, SWANLAB_ID_FILE = "mlflow_run_id", "swanlab_run_id"
LOGGERS = ("console", "jsonl", "wandb", "tensorboard", "mlflow", "swanlab")


# ---- the tracker -----------------------------------------------------------------------------------------------
class Tracker:
    """Writes one metrics line per step; loggers: "console", "jsonl" (always on), "wandb", "tensorboard", "mlflow",
    "swanlab"."""

    def __init__(self, run_dir: str | os.PathLike, loggers: Iterable[str] = ("console",), project: str = "monet_rl",
                 run_name: Optional[str] = None, config_dict: Optional[dict] = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.loggers = {str(name).lower() for name in loggers}
        unknown = self.loggers - set(LOGGERS)
        if unknown:
            raise ValueError(f"unknown logger(s) {sorted(unknown)}; choose from {', '.join(LOGGERS)}")
        self.metrics_path = self.run_dir / METRICS_FILE
        self.generations_path = self.run_dir / GENERATIONS_FILE
        self._secrets = secret_values(config_dict or {})
        self.config = self._clean(config_dict or {})
        self.run_name = run_name or self.run_dir.name
        self.wandb = self._init_wandb(project) if "wandb" in self.loggers else None
        self.writer = self._init_tensorboard() if "tensorboard" in self.loggers else None
        self.sinks = [sink(self.run_dir, project, self.run_name, self.config)
                      for name, sink in (("mlflow", MlflowSink), ("swanlab", SwanlabSink)) if name in self.loggers]

    # ---- logging ---------------------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict) -> None:
        """Append {"step": step, **metrics} to metrics.jsonl (flushed) and forward it to the enabled sinks."""
        row = self._clean({"step": int(step), **{k: v for k, v in _plain(metrics).items() if k != "step"}})
        _append_lines(self.metrics_path, [json.dumps(row, sort_keys=False, allow_nan=True)])
        numbers = {key: value for key, value in row.items() if key != "step" and _is_number(value)}
        if "console" in self.loggers:
            tqdm.write(console_line(row))  # above an active progress bar, not through it
        if self.wandb is not None:
            self.wandb.log(numbers, step=int(step))
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, int(step))
            self.writer.flush()
        for sink in self.sinks:
            sink.log(int(step), numbers)

    def log_generations(self, step: int, rows: list[dict]) -> None:
        """Sample generations (prompt, response, score ...) to generations.jsonl and a wandb table."""
        rows = [self._clean(_plain(row)) for row in rows]
        _append_lines(self.generations_path, [json.dumps({"step": int(step), **row}, default=str) for row in rows])
        if self.wandb is not None and rows:
            import wandb

            columns = sorted({key for row in rows for key in row})
            table = wandb.Table(columns=["step", *columns],
                                data=[[int(step), *[_cell(row.get(col)) for col in columns]] for row in rows])
            self.wandb.log({"val/generations": table}, step=int(step))

    def truncate_after(self, step: int) -> int:
        """Drop metrics/generation lines with step > `step` (a resume re-runs them); returns lines dropped."""
        dropped = 0
        for path in (self.metrics_path, self.generations_path):
            dropped += _truncate_jsonl(path, int(step))
        return dropped

    def last_step(self) -> int:
        """The step of the last metrics line, -1 when there is none."""
        rows = read_metrics(self.metrics_path)
        return int(rows[-1]["step"]) if rows else -1

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- sinks -----------------------------------------------------------------------------------------------
    def _init_wandb(self, project: str):
        """Offline unless WANDB_MODE says otherwise; all wandb files inside the run folder; resumable by id.

        Command-line capture (metadata), code saving and console capture are off: a CLI override or a printed
        line may carry an API key, and only redacted config and metrics may reach wandb.
        """
        import wandb

        wandb_dir = self.run_dir / "wandb"
        for env, folder in (("WANDB_DIR", self.run_dir), ("WANDB_CACHE_DIR", wandb_dir / "cache"),
                            ("WANDB_CONFIG_DIR", wandb_dir / "config"), ("WANDB_DATA_DIR", wandb_dir / "data")):
            folder.mkdir(parents=True, exist_ok=True)
            os.environ[env] = str(folder)
        settings = wandb.Settings(console="off", x_disable_meta=True, save_code=False, disable_code=True,
                                  disable_git=True)
        return wandb.init(project=project, name=self.run_name, id=self._wandb_id(), resume="allow",
                          config=self.config, dir=str(self.run_dir), mode=os.environ.get("WANDB_MODE", "offline"),
                          settings=settings)

    def _wandb_id(self) -> str:
        """A run id stored in the run folder, so a resumed run appends to the same wandb run."""
        return stored_run_id(self.run_dir / WANDB_ID_FILE, self.run_name)

    def _init_tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if self.config:
            writer.add_text("config", "```\n" + json.dumps(self.config, indent=2, default=str) + "\n```", 0)
        return writer

    def _clean(self, obj: Any) -> Any:
        return redact(obj, self._secrets)


class MlflowSink:
    """An MLflow run: a file store in `<run>/mlflow` (`mlflow ui --backend-store-uri <run>/mlflow` shows it), or the
    server MLFLOW_TRACKING_URI names. The redacted config becomes its params; its id, kept in the run folder, makes a
    resumed run append to it. The client API is used, not `mlflow.start_run`, which records the command line (where
    a key may be) and keeps a global active run."""

    def __init__(self, run_dir: Path, project: str, run_name: str, config: dict):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlflow").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps its file store only when asked (the database store needs SQL)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        self.run_id = self._resumed(run_dir / MLFLOW_ID_FILE) or self._create(run_dir, project, run_name, config)

    def _resumed(self, id_file: Path) -> Optional[str]:
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        try:
            return self.client.get_run(run_id).info.run_id if run_id else None
        except Exception:  # noqa: BLE001 - a store that no longer has it: start a new one
            return None

    def _create(self, run_dir: Path, project: str, run_name: str, config: dict) -> str:
        from mlflow.entities import Param

        experiment = self.client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
        run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(key[:250], json.dumps(value, default=str)[:6000] if not isinstance(value, str) else value[:6000])
                  for key, value in flat(config).items()]
        for start in range(0, len(params), 100):  # the store's limit per call
            self.client.log_batch(run_id, params=params[start:start + 100])
        write_atomic(run_dir / MLFLOW_ID_FILE, run_id + "\n")
        return run_id

    def log(self, step: int, numbers: dict) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(re.sub(r"[^\w\-./ ]", "_", key), float(value), stamp, step) for key, value in numbers.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class SwanlabSink:
    """A SwanLab run, offline into `<run>/swanlab` unless SWANLAB_MODE says otherwise (`swanlab sync` uploads it).
    Off: the runtime probe (it records the command line), console capture (a printed line may carry a key), the
    requirements, git and system-monitor probes. Its id, kept in the run folder, makes a resumed run the same run."""

    def __init__(self, run_dir: Path, project: str, run_name: str, config: dict):
        import swanlab

        settings = swanlab.Settings(
            probe=swanlab.Settings.Probe(runtime=False, requirements=False, conda=False, git=False, monitor=False),
            terminal=swanlab.Settings.Terminal(proxy_type="none"))
        self.run = swanlab.init(project=project, name=run_name, config=config, settings=settings, reinit=True,
                                mode=os.environ.get("SWANLAB_MODE", "offline"), log_dir=str(run_dir / "swanlab"),
                                id=stored_run_id(run_dir / SWANLAB_ID_FILE, run_name), resume="allow")

    def log(self, step: int, numbers: dict) -> None:
        if numbers:
            self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()


# ---- helpers ---------------------------------------------------------------------------------------------------
def stored_run_id(path: Path, run_name: str) -> str:
    """The tracker run id kept in `path` (made from the run's name on first use), so a resumed run appends to the
    same tracker run."""
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = f"{re.sub(r'[^A-Za-z0-9_-]', '-', run_name)[:48]}-{uuid.uuid4().hex[:8]}"
    write_atomic(path, run_id + "\n")
    return run_id


def flat(tree: dict, prefix: str = "") -> dict:
    """{"a.b": value} of a nested config."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def console_line(row: dict) -> str:
    """One short line: the step and the headline metrics present in `row`."""
    parts = [f"step {row.get('step')}"]
    for key in CONSOLE_KEYS:
        value = row.get(key)
        if _is_number(value):
            parts.append(f"{key}={value:.4g}" if key != "timing_s/step" else f"{key}={value:.2f}")
    return " | ".join(parts)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All rows of a metrics.jsonl (a run folder or the file); a torn last line from a crash is skipped."""
    path = Path(path)
    return read_jsonl(path / METRICS_FILE if path.is_dir() else path)


def _append_lines(path: Path, lines: list[str]) -> None:
    """Append JSON lines (flushed); a full disk is a failed run naming the file (a torn last line is skipped on
    read and dropped by the resume's truncation)."""
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
            handle.flush()
    except OSError as error:
        if disk_full(error):
            raise no_space_failure(path, error.strerror) from error
        raise


def _truncate_jsonl(path: Path, step: int) -> int:
    """Keep the lines of steps <= `step` (the file is replaced whole); returns how many lines went, a torn one
    included."""
    if not path.is_file():
        return 0
    lines = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    kept = [row for row in read_jsonl(path) if int(row.get("step", -1)) <= step]
    try:
        write_atomic(path, "".join(json.dumps(row, allow_nan=True) + "\n" for row in kept))
    except OSError as error:  # the file itself is untouched until the rename
        if disk_full(error):
            raise no_space_failure(path, error.strerror) from error
        raise
    return lines - len(kept)


def _plain(obj: Any) -> Any:
    """JSON-friendly copy: tensors and numpy scalars become Python numbers or lists."""
    if isinstance(obj, dict):
        return {str(key): _plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(item) for item in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch.Tensor, numpy arrays and scalars
        return _plain(obj.tolist())
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _cell(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value, default=str)
