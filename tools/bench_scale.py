"""Memory per rank, weight-sync cost and latent hand-back on a real-width probe, beside the memory plan.

    python -m tools.bench_scale --shape 3b --layers 2 --ranks 2 --engine native|vllm [--model DIR]

Prints ONE JSON object. What it runs: `--ranks` processes (torch.multiprocessing, gloo on loopback), each a
`PolicyWorker` called directly, without Ray, through the trainer's own sequence of calls (RL/trainer/vlpo.py):

    load     init_roles: the actor sharded with FSDP2 (rank 0 reads the checkpoint), the engine built and put to sleep
    sync     begin_rollout after the update: the actor's weights streamed into the engine (ShardedModel.stream_weights)
    rollout  generate (monet strategy, blocks forced to open often) and end_rollout
    scoring  compute_log_probs (and compute_ref_log_probs with --ref)
    update   update_policy: one PPO optimizer step over the rank's samples

This is the first training step: the optimizer's state appears only at its update, so the plan's figures for the phases
before it (and for the first sync) are compared without their optimizer component ("plan_first_step_gib"); the
steady-state figure is printed beside it. `--skip-update` leaves the update out (its memory is the largest; the sync is
then the first one). Per phase and rank: the peak resident set of the rank's process (VmHWM, reset at the phase's start through
/proc/self/clear_refs) and of the rank with its child processes (sampled every 20 ms), beside the memory plan's figure
for the same config (RL/memory_plan.py, on CPU: host memory per rank). The sync's seconds are the median of
`--sync-repeats` more syncs after the phases, with the sampling thread stopped (it shares the cores; the metered one
is printed too), against copying the same bytes tensor to tensor in one process, and the bytes it writes to any file system are read from /proc/<pid>/io
(`write_bytes` of the rank and its children) and a listing of its TMPDIR. The latent hand-back is timed on the engine's
own record → RolloutSample path (native: RolloutRecorder.to_samples; vLLM: LatentRecord.result, what monet_collect
returns in-process) for 512 requests x 10 latents of width 3584 with their log-probs, against a memcpy of those bytes.

Compute runs in fp32 by default: this CPU class multiplies bf16 matrices about 100x slower than fp32 (no AVX512-BF16),
and the plan takes the dtype into account either way. The probe is built (~20 s) into a temporary folder unless
--model names one (`python -m tools.make_tiny_model --shape 3b --layers 2 --out DIR`). docs/scale.md shows results.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

GIB = 2 ** 30
PHASES = ("load", "rollout", "scoring", "update", "sync")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("tiny", "3b", "7b"), default="3b")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers and vision blocks of the probe")
    parser.add_argument("--model", default="", help="an existing probe folder (default: build one)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--engine", choices=("native", "vllm"), default="native")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="actor compute and engine dtype")
    parser.add_argument("--optim", choices=("adamw", "adamw_bf16"), default="adamw")
    parser.add_argument("--prompts", type=int, default=1, help="prompts per rank")
    parser.add_argument("--n", type=int, default=2, help="samples per prompt")
    parser.add_argument("--prompt-words", type=int, default=24, help="filler words per prompt (its length)")
    parser.add_argument("--new-tokens", type=int, default=16, help="response tokens (every sample runs to it)")
    parser.add_argument("--latent-size", type=int, default=10)
    parser.add_argument("--logprob-chunk", type=int, default=256, help="worker.actor.logprob_chunk_size")
    parser.add_argument("--ref", action="store_true", help="also a reference model (KL); default algorithm.disable_kl")
    parser.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off")
    parser.add_argument("--skip-update", action="store_true", help="no update phase; the sync is the first one")
    parser.add_argument("--sync-repeats", type=int, default=3, help="unmetered syncs timed after the phases")
    parser.add_argument("--handback-requests", type=int, default=512)
    parser.add_argument("--handback-width", type=int, default=3584)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# ---- measuring one process -----------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def write_bytes(pids) -> int:
    """Bytes the processes caused to be written to storage (/proc/<pid>/io write_bytes; 0 where unreadable)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/io") as handle:
                total += next(int(line.split()[1]) for line in handle if line.startswith("write_bytes"))
        except (OSError, StopIteration):
            pass
    return total


class SyncWatch:
    """What a sync wrote: storage writes of the processes (/proc/<pid>/io) and new entries in the temp folder."""

    def __init__(self, pids, folder: Path):
        self.pids, self.folder = pids, folder
        self.listed, self.written = set(folder.iterdir()), write_bytes(pids)

    def done(self) -> dict:
        return {"write_bytes": write_bytes(self.pids) - self.written,
                "new_files": sorted(str(p) for p in set(self.folder.iterdir()) - self.listed)}


class PhaseMeter:
    """Peak memory per phase of this process (VmHWM after a reset) and of it with its children (a sampling thread)."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.results: dict[str, dict] = {}
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def tree(self):
        return [self.process, *self.process.children(recursive=True)]

    def _tree_rss(self) -> int:
        total = 0
        for proc in self.tree():
            try:
                total += proc.memory_info().rss
            except Exception:  # noqa: BLE001 - a child that just ended
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, self._tree_rss())

    before_phase = staticmethod(lambda: None)

    @contextmanager
    def phase(self, name: str):
        self.before_phase()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current resident set
        self._peak = self._tree_rss()
        start = time.perf_counter()
        yield
        self.results[name] = {"peak_gib": _status_kib("VmHWM") * 1024 / GIB,
                              "peak_with_children_gib": max(self._peak, self._tree_rss()) / GIB,
                              "seconds": time.perf_counter() - start}

    def close(self) -> None:
        self._stop.set()


# ---- one rank ------------------------------------------------------------------------------------------------------
def rank_main(rank: int, args, config, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from common.checkpoint_layout import torch_dtype
    from workers.policy_worker import PolicyWorker
    from workers.rollout.base import SamplingParams

    torch.manual_seed(args.seed + rank)
    meter = PhaseMeter()
    worker = PolicyWorker()
    worker.init_distributed(rank, args.ranks, "127.0.0.1", port, threads=1)
    meter.before_phase = dist.barrier  # phases start together: times are the phase's, not a wait for the other rank
    baseline = meter.process.memory_info().rss / GIB
    roles = ["actor", "rollout"] + (["ref"] if args.ref else [])
    with meter.phase("load"):
        worker.init_roles(config, roles, ["actor"], total_steps=4)
    pids = [proc.pid for proc in meter.tree()]
    tmp = Path(tempfile.gettempdir())
    watched = SyncWatch(pids, tmp)
    with meter.phase("first_sync"):
        first_seconds = worker.begin_rollout()
    io = watched.done()
    items, prompts = rank_prompts(worker.model.processor, args, rank)
    start = worker.engine.tokens.start
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.new_tokens, strategy="monet",
                            latent_size=args.latent_size, ignore_eos=True, seed=args.seed + rank,
                            logit_bias={start: 4.0})
    with meter.phase("rollout"):
        samples = worker.generate(prompts, params, "actor")
        worker.end_rollout()
    batch = training_batch(items, samples, args, worker.model.processor.tokenizer)
    with meter.phase("scoring"):
        worker.compute_log_probs(batch, "actor", "s1")
        if args.ref:
            worker.compute_ref_log_probs(batch, "s1")
    sync_seconds = first_seconds
    if not args.skip_update:
        advantages = torch.randn(len(batch), batch.tensors["responses"].shape[1])
        with meter.phase("update"):
            worker.update_policy(batch, "actor", "s1", advantages, mini_batch_size=len(batch), kl_coef=0.0)
        watched = SyncWatch(pids, tmp)
        with meter.phase("sync"):
            sync_seconds = worker.begin_rollout()
        io = watched.done()
        worker.end_rollout()
    else:
        meter.results["sync"] = meter.results["first_sync"]
    meter.close()  # its sampling thread would share the two cores with the timed syncs below
    sync_times = [first_seconds if args.skip_update else sync_seconds] + timed_syncs(worker, args.sync_repeats)
    # what a sync streams: every parameter of the model once, in the engine's dtype (vLLM on CPU repacks its linear
    # layers out of `parameters()`, so the engine's own tensors cannot be counted)
    engine_bytes = sum(p.numel() for p in worker.model.module.parameters()) * torch_dtype(args.dtype).itemsize
    close = getattr(worker.engine, "close", None)  # vLLM's in-process engine ends the process group with it
    queue.put({"rank": rank, "baseline_gib": baseline, "phases": meter.results, "sync_seconds": sync_times,
               "sync_write_bytes": io["write_bytes"], "tmpdir_new_files": io["new_files"],
               "engine_weight_bytes": engine_bytes, "latents": sum(s.num_latents for s in samples),
               "tokens": int(batch.tensors["attention_mask"].sum()), "dtype": str(torch_dtype(args.dtype))})
    close() if close else worker.shutdown()


def timed_syncs(worker, repeats: int) -> list[float]:
    """Seconds of `repeats` more syncs of the (unchanged) actor, each marked as changed so that it streams, with
    nothing else running in the process."""
    times = []
    for _ in range(repeats):
        worker._actor_changed()  # what an update does: the engine's copy is stale
        times.append(worker.begin_rollout())
        worker.end_rollout()
    return times


def rank_prompts(processor, args, rank: int):
    """This rank's prompts: one toy image each and the same filler text, so every prompt has the same length."""
    import random

    import torch

    from RL.toy_task import draw_shape
    from workers.rollout.base import PromptInput

    rng = random.Random(args.seed * 1000 + rank)
    text = "Which shape is it? " + " ".join(["think"] * args.prompt_words)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    items, prompts = [], []
    for index in range(args.prompts):
        image = draw_shape(rng.choice(["red", "blue"]), rng.choice(["circle", "square"]), "left", rng)
        enc = processor(text=[processor.apply_chat_template(messages, add_generation_prompt=True)],
                        images=[image.resize((56, 56))], return_tensors="pt")
        ids = enc["input_ids"][0]
        items.append({"input_ids": ids, "uid": f"{rank}-{index}", "pixel_values": enc["pixel_values"],
                      "image_grid_thw": enc["image_grid_thw"], "ground_truth": "circle", "raw_prompt": text})
        prompts.append(PromptInput(ids, enc["pixel_values"], enc["image_grid_thw"]))
    return items, prompts


def training_batch(items, samples, args, tokenizer):
    from RL.trainer.rollout_batch import build_rollout_batch

    return build_rollout_batch(items, samples, args.n, tokenizer.pad_token_id, args.new_tokens)


def prompt_length(model_dir: str, args) -> int:
    from monet_models.processor import load_processor

    items, _ = rank_prompts(load_processor(model_dir), args, 0)
    return len(items[0]["input_ids"])


# ---- the run -------------------------------------------------------------------------------------------------------
def bench_config(args, model_dir: str, prompt_tokens: int):
    """The RootConfig the ranks run, as the trainer would load it."""
    from RL.config import load_config

    world_prompts = args.prompts * args.ranks
    samples = args.prompts * args.n
    overrides = [
        f"worker.actor.model.model_path={model_dir}", f"trainer.n_gpus_per_node={args.ranks}", "trainer.nnodes=1",
        f"data.max_prompt_length={prompt_tokens}", f"data.max_response_length={args.new_tokens}",
        f"data.rollout_batch_size={world_prompts}", f"worker.actor.global_batch_size={world_prompts}",
        f"worker.actor.micro_batch_size_per_device_for_update={samples}",
        f"worker.actor.micro_batch_size_per_device_for_experience={samples}",
        f"worker.actor.logprob_chunk_size={args.logprob_chunk}", f"worker.actor.fsdp.torch_dtype={args.dtype}",
        f"worker.ref.fsdp.torch_dtype={args.dtype}", f"worker.actor.optim.strategy={args.optim}",
        f"worker.actor.model.enable_gradient_checkpointing={not args.no_checkpointing}",
        f"worker.rollout.name={args.engine}", f"worker.rollout.dtype={args.dtype}", f"worker.rollout.n={args.n}",
        f"worker.rollout.latent_size={args.latent_size}", f"worker.rollout.max_num_seqs={max(samples, 2)}",
        f"worker.rollout.max_num_batched_tokens={max(512, prompt_tokens + args.new_tokens)}",
        "worker.rollout.cpu_kvcache_space_gb=1", f"algorithm.disable_kl={not args.ref}",
        f"algorithm.use_kl_loss={args.ref}",
    ]
    return load_config(overrides, require_inputs=False)


def run_ranks(args, config) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    procs = [context.Process(target=rank_main, args=(rank, args, config, port, queue)) for rank in range(args.ranks)]
    for proc in procs:
        proc.start()
    results = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    return sorted(results, key=lambda result: result["rank"])


def copy_seconds(total_bytes: int, repeats: int = 3) -> float:
    """Copying `total_bytes` tensor to tensor in one process (through a buffer pair of at most 256 MiB, so the
    baseline costs no second copy of the model)."""
    import torch

    size = min(total_bytes, 256 * 2 ** 20)
    src, dst = torch.ones(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for offset in range(0, total_bytes, size):
            dst[:min(size, total_bytes - offset)].copy_(src[:min(size, total_bytes - offset)])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def handback(args, model_dir: str) -> dict:
    """Seconds to turn the engine's records of `handback_requests` requests x `latent_size` latents of width
    `handback_width` (and 64 log-probs each) into what `generate` returns, against a memcpy of the same bytes."""
    import torch

    requests, k, width, tokens = args.handback_requests, args.latent_size, args.handback_width, 64
    latents = torch.randn(requests, k, width)
    if args.engine == "vllm":
        from monet_models.vllm.logits import LatentRecord
        from monet_models.vllm.request import LatentRequestArgs

        records = [LatentRecord(LatentRequestArgs(f"r{i}", k, True, 1.0), [], None, None,
                                log_probs=[-1.0] * tokens, latents=list(latents[i].unbind(0)))
                   for i in range(requests)]
        seconds = _median(lambda: [record.result() for record in records])
        path = "LatentRecord.result (monet_collect, in-process)"
    else:
        from monet_models.latent_tokens import LatentTokens
        from monet_models.processor import load_processor
        from workers.rollout.latent_state import LatentLayout
        from workers.rollout.records import RolloutRecorder

        tokenizer = load_processor(model_dir).tokenizer
        layout = LatentLayout(LatentTokens.from_tokenizer(tokenizer), k, True, len(tokenizer), len(tokenizer))
        recorder = RolloutRecorder(requests, tokens, tokenizer.pad_token_id, "cpu")
        rows = torch.arange(requests)
        for step in range(k):
            recorder.record_latents(rows, step + 1, latents[:, step])
        seconds = _median(lambda: recorder.to_samples(1, 0, layout))
        path = "RolloutRecorder.to_samples"
    payload = latents.numel() * 4 + requests * tokens * 4
    source, target = torch.randn(payload // 4), torch.empty(payload // 4)
    memcpy = _median(lambda: target.copy_(source))
    return {"path": path, "requests": requests, "latents_per_request": k, "width": width, "bytes": payload,
            "seconds": round(seconds, 4), "memcpy_seconds": round(memcpy, 4), "ratio": round(seconds / memcpy, 1)}


def _median(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(args, config, results: list[dict], model_dir: str) -> dict:
    from RL.memory_plan import GIB as PLAN_GIB, Device, plan_memory

    roles = ("actor", "rollout") + (("ref",) if args.ref else ())
    plan = plan_memory(config, Device("cpu", None, "bench"), roles=roles)
    planned = {phase.name: phase.device / PLAN_GIB for phase in plan.phases}
    optimizer = {phase.name: sum(c.device for c in phase.components if c.name == "optimizer") / PLAN_GIB
                 for phase in plan.phases}
    before_state = {"load", "rollout", "scoring", "update"} | ({"sync"} if args.skip_update else set())
    first_step = {name: planned[name] - (optimizer[name] if name in before_state else 0) for name in planned}
    phases = {}
    for name in PHASES:
        if name == "update" and args.skip_update:
            continue
        measured = [result["phases"][name]["peak_gib"] for result in results]
        with_children = [result["phases"][name]["peak_with_children_gib"] for result in results]
        # the plan's load figure is rank 0's (it alone holds the full state dict); every other phase is every rank's
        compared = measured[0] if name == "load" else max(measured)
        phases[name] = {"measured_gib": [round(m, 3) for m in measured],
                        "measured_with_children_gib": [round(m, 3) for m in with_children],
                        "plan_first_step_gib": round(first_step[name], 3), "plan_gib": round(planned[name], 3),
                        "measured_over_plan": round(compared / first_step[name], 3),
                        "seconds": [round(result["phases"][name]["seconds"], 1) for result in results],
                        "plan_components_gib": {c.name: round(c.device / PLAN_GIB, 3)
                                                for c in next(p for p in plan.phases if p.name == name).components
                                                if c.counted and c.device}}
    engine_bytes = results[0]["engine_weight_bytes"]
    # a sync ends when its slowest rank does; the first (metered, right after the update) and the unmetered repeats
    syncs = [max(times) for times in zip(*(result["sync_seconds"] for result in results))]
    sync = statistics.median(syncs[1:] or syncs)
    copy = copy_seconds(engine_bytes)
    return {
        "shape": args.shape, "layers": args.layers, "ranks": args.ranks, "engine": args.engine, "dtype": args.dtype,
        "optimizer": args.optim, "parameters": plan.dims.total, "reference": args.ref,
        "tokens_per_rank": [r["tokens"] for r in results], "latents_per_rank": [r["latents"] for r in results],
        "baseline_gib": [round(r["baseline_gib"], 3) for r in results],
        "phases": phases,
        "first_sync_gib": [round(r["phases"]["first_sync"]["peak_gib"], 3) for r in results],
        "sync": {"seconds": round(sync, 3), "metered_seconds": round(syncs[0], 3),
                 "unmetered_seconds": [round(t, 3) for t in syncs[1:]], "bytes": engine_bytes, "copy_seconds": round(copy, 3),
                 "over_copy": round(sync / copy, 1),
                 "write_bytes": [r["sync_write_bytes"] for r in results],
                 "tmpdir_new_files": sorted({f for r in results for f in r["tmpdir_new_files"]})},
        "handback": handback(args, model_dir),
        "cpu_count": os.cpu_count(),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM logs to stdout otherwise, around the JSON
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as scratch:
        model_dir = args.model or build_probe(args, scratch)
        tmp = Path(scratch) / "tmp"
        tmp.mkdir()
        os.environ["TMPDIR"] = str(tmp)  # the ranks' temp folder: any file a sync writes there shows up
        tempfile.tempdir = None
        config = bench_config(args, model_dir, prompt_length(model_dir, args))
        results = run_ranks(args, config)
        print(json.dumps(report(args, config, results, model_dir), indent=1))


def build_probe(args, scratch: str) -> str:
    from monet_models.tiny_model import build_tiny_model
    from RL.toy_task import corpus_lines

    return str(build_tiny_model(Path(scratch) / "model", corpus_lines(), args.seed, shape=args.shape,
                                layers=args.layers))


if __name__ == "__main__":
    main()
