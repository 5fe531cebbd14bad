"""Running an evaluation: load the items, start the workers, run each pass batch by batch, write the summary.

A pass walks the items in fixed batches of `eval.batch_size` (batch b = items b*size ... (b+1)*size - 1), skipping the
items its jsonl already holds; each batch is split evenly over the workers (data parallel), judged, and appended.
Seeds derive from (eval.seed, pass, batch, shard), so a resumed pass reproduces an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from RL.config import to_yaml
from RL.config.checks import ABLATIONS
from RL.evaluate.evaluation import Evaluation
from RL.evaluate.judging import build_judge, judge_rows
from RL.evaluate.passes import AblationPass, DirectPass, DmlrPass
from RL.evaluate.rmm import RmmPass, rmm_metrics
from RL.evaluate.stats import delta, markdown, pass_summary
from RL.evaluate.store import PassStore, read_rows

PASS_ORDER = ("direct", *(f"ablate_{name}" for name in ABLATIONS), "dmlr", "rmm")


def evaluate(config, group=None) -> dict:
    """Run every pass the config asks for and return the summary; `group` reuses running workers (tests)."""
    from monet_models import load_processor
    from RL.data import RLPromptDataset
    from RL.evaluate.inputs import prepare_files

    folder = output_folder(config)
    to_yaml(config, redact=True, path=folder / "config.yaml")
    processor = load_processor(config.worker.actor.model.model_path)
    files = prepare_files(config.data.val_files, folder, config.data)
    dataset = RLPromptDataset(files, processor, config.data, max_samples=config.data.val_max_samples, name="eval")
    endpoint = None
    if config.eval.endpoint:
        from RL.evaluate.endpoint import EndpointAnswers

        endpoint = EndpointAnswers(config.eval.endpoint, config.eval.endpoint_model)
    owned = group is None and endpoint is None
    if owned:
        group = start_workers(config)
    try:
        evaluation = Evaluation(config, processor, dataset, build_judge(config, folder), group, folder, endpoint)
        for name in pass_names(config.eval):
            run_pass(evaluation, name)
    finally:
        if owned:
            group.shutdown()
    return write_summary(folder, config)


def output_folder(config) -> Path:
    ev, files = config.eval, config.data.val_files
    first = files if isinstance(files, str) else files[0]
    name = ev.name or f"{Path(config.worker.actor.model.model_path).name}-{Path(first).stem}"
    folder = Path(ev.save_dir).expanduser().resolve() / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def start_workers(config):
    from RL.evaluate.worker import EvalWorker
    from RL.trainer.ray_setup import init_ray
    from workers.group import WorkerGroup

    init_ray()
    group = WorkerGroup(EvalWorker, config.world_size, torch.cuda.is_available(), name="eval",
                        dist_timeout_s=config.trainer.dist_timeout_s)
    group.call("init_evaluation", config)
    return group


def pass_names(ev) -> list[str]:
    if ev.method != "direct":
        return [ev.method]
    return ["direct"] + [f"ablate_{name}" for name in ev.ablate.split(",") if name]


def run_pass(evaluation: Evaluation, name: str) -> None:
    """Produce, judge and append the pass's missing items batch by batch (a tqdm bar with ETA)."""
    ev = evaluation.config.eval
    store = PassStore(evaluation.folder, name, pass_settings(evaluation.config, name), ev.resume)
    produce = {"direct": DirectPass, "dmlr": DmlrPass, "rmm": RmmPass}.get(name, AblationPass)(evaluation, name)
    todo = [index for index in range(len(evaluation.dataset)) if index not in store.done]
    with tqdm(total=len(todo), desc=f"eval {name}", unit="item", dynamic_ncols=True) as bar:
        for batch, indices in itertools.groupby(todo, key=lambda index: index // ev.batch_size):
            indices = list(indices)
            start = time.perf_counter()
            rows = produce(batch, indices)
            share = (time.perf_counter() - start) / len(rows)  # wall-clock per item, the workers in parallel
            for row in rows:
                row.setdefault("latency_s", share * len(rows))
                row["seconds"] = share
            if name != "rmm":  # the loop judges every attempt itself
                judge_rows(rows, evaluation.judge)
            store.append(rows)
            bar.update(len(rows))


def pass_settings(config, name: str) -> dict:
    """What a pass's results depend on; resuming under different values is refused."""
    data, ev = config.data, config.eval
    files = [data.val_files] if isinstance(data.val_files, str) else list(data.val_files)
    settings = {
        "model": config.worker.actor.model.model_path, "engine": config.worker.rollout.name,
        "dtype": config.worker.rollout.dtype, "data": [_file_stamp(path) for path in files],
        "data_options": [data.prompt_key, data.answer_key, data.image_key, data.image_dir, data.format_prompt,
                         data.min_pixels, data.max_pixels, data.max_prompt_length],  # val_max_samples may grow
        "strategy": ev.strategy, "max_new_tokens": ev.max_new_tokens or data.max_response_length,
        "latent_size": config.worker.rollout.latent_size, "seed": ev.seed, "batch_size": ev.batch_size,
        "judge": config.worker.rule_based_judge.api_name,
    }
    if ev.endpoint:  # the answers come from there (the model folder only prepared the items)
        settings.update(engine="endpoint", endpoint=ev.endpoint, endpoint_model=ev.endpoint_model)
    prefix = {"dmlr": "dmlr_", "rmm": "rmm_"}.get(name)
    if prefix:
        settings.update({key: value for key, value in dataclasses.asdict(ev).items() if key.startswith(prefix)})
    return settings


def _file_stamp(path: str) -> list:
    stat = Path(path).stat() if Path(path).exists() else None
    return [path, stat.st_size if stat else None, int(stat.st_mtime) if stat else None]


def write_summary(folder: Path, config) -> dict:
    """summary.json, summary.md and one DMLR-style `<pass>.results.json` per pass found in the folder."""
    passes = {}
    found = {name: read_rows(folder / f"{name}.jsonl") for name in PASS_ORDER if (folder / f"{name}.jsonl").exists()}
    for name, rows in found.items():
        if not rows:
            continue
        stats = pass_summary(rows)
        if name != "direct" and found.get("direct"):
            stats["delta_vs_direct"] = delta(found["direct"], rows)
        if name == "rmm":
            stats["rmm"] = rmm_metrics(rows)
        passes[name] = stats
        write_results_json(folder, name, rows, config, stats)
    summary = _finite({"model": config.worker.actor.model.model_path, "data": config.data.val_files,
                       "folder": str(folder), "passes": passes})
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / "summary.md").write_text(markdown(summary))
    from RL.plots import plot_evaluation  # matplotlib: loaded only once there is a summary to draw

    plot_evaluation(summary, folder / "summary.png")
    return summary


def write_results_json(folder: Path, name: str, rows: list[dict], config, stats: dict) -> None:
    """The pass in DMLR's results.json layout, so tools written for DMLR's outputs read ours."""
    entries = [{"data_idx": row["index"], "question": row["question"], "image_path": "", "sys_prompt": "",
                "prompt": row["prompt"], "model_output": row["response"], "answer": row["answer"],
                "ground_truth": row["ground_truth"], "ground_truth_text": row.get("ground_truth_text"),
                "is_correct": row["verdict"] == 1, "best_reward": row.get("best_reward"),
                "best_reward_step": row.get("best_reward_step"),
                "stop_reason": {"eos": "eos_token", "length": "length"}.get(row["finish_reason"], "other")}
               for row in rows]
    results = _finite({"model": config.worker.actor.model.model_path, "dataset": config.data.val_files,
                       "accuracy": stats["accuracy"], "correct": stats["correct"], "total": stats["judged"],
                       "config": {"max_new_tokens": config.eval.max_new_tokens or config.data.max_response_length,
                                  "min_pixels": config.data.min_pixels, "max_pixels": config.data.max_pixels},
                       "args": dataclasses.asdict(config.eval), "entries": entries})
    (folder / f"{name}.results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def _finite(value):
    """NaN (an accuracy of nothing judged) as null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
