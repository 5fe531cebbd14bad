"""The adamw_bf16 optimizer (Kahan-compensated AdamW) and the global gradient norm over sharded gradients.

The two-rank checks (FSDP2 over gloo: optimizer state through torch.distributed.checkpoint, clipping against one
process's clipping of the whole gradient) run in one spawned pair of processes that the module's tests share."""
import socket

import pytest
import torch
import torch.multiprocessing as mp

from workers.actor.optimizers import KahanAdamW, build_optimizer, clip_grad_norm

LR, STEPS, SIZE = 1e-6, 200, 4096


def bf16_ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at `values` (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(values.abs())) - 7)


def train(optimizer_cls, start: torch.Tensor, grads: list[torch.Tensor], **kwargs):
    param = torch.nn.Parameter(start.clone())
    optimizer = optimizer_cls([param], **kwargs)
    for grad in grads:
        param.grad = grad.to(param.dtype)
        optimizer.step()
    return param.detach(), optimizer


@pytest.fixture(scope="module")
def bf16_run():
    """Weights of magnitude 1e-2 (as in a real checkpoint) trained 200 steps at lr 1e-6 on gradients of a fixed sign
    plus noise, so each weight moves about lr a step: a few bf16 spacings in all, each step far below one."""
    gen = torch.Generator().manual_seed(0)
    start = ((torch.rand(SIZE, generator=gen) + 0.5) * 1e-2 * torch.randn(SIZE, generator=gen).sign()).bfloat16()
    direction = torch.randn(SIZE, generator=gen).sign()
    grads = [(direction + 0.5 * torch.randn(SIZE, generator=gen)) * 1e-3 for _ in range(STEPS)]
    settings = {"lr": LR, "weight_decay": 1e-2}
    reference, _ = train(torch.optim.AdamW, start.float(), grads, **settings)
    kahan, optimizer = train(KahanAdamW, start, grads, **settings)
    plain, _ = train(torch.optim.AdamW, start, grads, **settings)
    compensated = kahan.float() + optimizer.state[optimizer.param_groups[0]["params"][0]]["compensation"].float()
    return start.float(), reference, kahan.float(), compensated, plain.float()


def test_kahan_bf16_adamw_tracks_fp32_adamw_at_lr_1e_6(bf16_run):
    start, reference, kahan, compensated, _ = bf16_run
    movement = reference - start
    # the weight plus what rounding dropped is the fp32 trajectory, to a small part of the whole movement
    assert (compensated - reference).abs().max() < 0.05 * movement.abs().max()
    # the bf16 weights are the fp32 ones rounded: the error stays within one spacing instead of accumulating
    assert ((kahan - reference).abs() <= bf16_ulp(reference)).all()
    # and on average they moved as far as the fp32 ones (rounding a move of a few spacings shifts this a little)
    along = ((kahan - start) * movement.sign()).mean() / movement.abs().mean()
    assert 0.9 < along < 1.1


def test_plain_adamw_on_bf16_weights_loses_the_updates(bf16_run):
    """Why adamw_bf16 needs the compensation: the same run with torch's AdamW on the bf16 weights barely moves."""
    start, reference, _, _, plain = bf16_run
    movement = reference - start
    along = ((plain - start) * movement.sign()).mean() / movement.abs().mean()
    assert along < 0.1


def test_on_fp32_weights_it_is_torch_adamw():
    """Weight decay, betas, eps and bias correction as torch.optim.AdamW (and an lr changed between steps, as the
    scheduler does); fp32 weights keep no compensation buffer."""
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(257, generator=gen)
    grads = [torch.randn(257, generator=gen) for _ in range(30)]
    settings = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.3}
    params = {cls: torch.nn.Parameter(start.clone()) for cls in (torch.optim.AdamW, KahanAdamW)}
    optimizers = {cls: cls([param], **settings) for cls, param in params.items()}
    for step, grad in enumerate(grads):
        for cls, optimizer in optimizers.items():
            optimizer.param_groups[0]["lr"] = 1e-2 / (1 + step)
            params[cls].grad = grad.clone()
            optimizer.step()
    assert (params[KahanAdamW] - params[torch.optim.AdamW]).abs().max() < 1e-6
    assert (params[KahanAdamW] - start).abs().max() > 1e-2  # it moved
    assert set(optimizers[KahanAdamW].state[params[KahanAdamW]]) == {"step", "exp_avg", "exp_avg_sq"}


def test_state_dict_round_trip_keeps_fp32_moments_and_the_trajectory():
    """torch's Optimizer.load_state_dict casts state to the parameter's dtype; the fp32 moments of bf16 weights must
    come back fp32, so a resumed run steps exactly as an uninterrupted one."""
    gen = torch.Generator().manual_seed(2)
    start = (torch.randn(64, generator=gen) * 1e-2).bfloat16()
    grads = [torch.randn(64, generator=gen) * 1e-3 for _ in range(8)]
    whole, _ = train(KahanAdamW, start, grads, lr=1e-4)
    first, optimizer = train(KahanAdamW, start, grads[:4], lr=1e-4)
    saved = optimizer.state_dict()
    resumed, fresh = train(KahanAdamW, first, [], lr=1e-4)
    fresh.load_state_dict(saved)
    state = fresh.state[fresh.param_groups[0]["params"][0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert state["compensation"].dtype == torch.bfloat16
    param = fresh.param_groups[0]["params"][0]
    for grad in grads[4:]:
        param.grad = grad.bfloat16()
        fresh.step()
    assert torch.equal(param.detach(), whole)


def test_build_optimizer_follows_the_strategy():
    from RL.config.schema import OptimConfig

    param = torch.nn.Parameter(torch.zeros(3))
    assert type(build_optimizer([param], OptimConfig(strategy="adamw"))) is torch.optim.AdamW
    bf16 = build_optimizer([param], OptimConfig(strategy="adamw_bf16", lr=3e-6, betas=[0.9, 0.99]))
    assert isinstance(bf16, KahanAdamW) and bf16.param_groups[0]["betas"] == (0.9, 0.99)
    with pytest.raises(ValueError, match="worker.actor.optim.strategy"):
        build_optimizer([param], OptimConfig(strategy="sgd"))


def test_clip_grad_norm_in_one_process_is_torch_clip_grad_norm():
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(shape, generator=gen) for shape in ((5, 3), (7,), (2, 2, 2))]
    ours = [torch.nn.Parameter(torch.zeros_like(grad)) for grad in grads]
    theirs = [torch.nn.Parameter(torch.zeros_like(grad)) for grad in grads]
    for mine, other, grad in zip(ours, theirs, grads):
        mine.grad, other.grad = grad.clone(), grad.clone()
    norm = clip_grad_norm(ours, 0.5)
    assert norm == pytest.approx(float(torch.nn.utils.clip_grad_norm_(theirs, 0.5)), rel=1e-6)
    for mine, other in zip(ours, theirs):
        torch.testing.assert_close(mine.grad, other.grad)
    ours[0].grad[0, 0] = float("nan")
    kept = ours[1].grad.clone()
    assert clip_grad_norm(ours, 0.5) != clip_grad_norm(ours, 0.5)  # nan, and nothing scaled
    assert torch.equal(ours[1].grad, kept)


# ---- two ranks: FSDP2 over gloo ---------------------------------------------------------------------------------
def small_model(dtype: torch.dtype) -> torch.nn.Module:
    """Odd sizes, so the two shards of a weight differ in length."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def backward(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    model(torch.randn(6, 5, generator=gen).to(dtype)).square().sum().backward()


def clipping_on_ranks(results: dict) -> None:
    """Norm and clipped gradients of a sharded model (1-D mesh, and a 2-D replicate x shard mesh whose replicas
    must not be counted twice) against one process clipping the whole gradient. Both ranks run the same batch,
    so the averaged sharded gradient is the single process's."""
    from workers.actor.fsdp import shard_model

    single = small_model(torch.float32)
    backward(single, seed=5)
    expected = float(torch.nn.utils.clip_grad_norm_(list(single.parameters()), 0.1))
    for name, fsdp_size in (("sharded", -1), ("hybrid", 1)):
        model = shard_model(small_model(torch.float32), fsdp_size=fsdp_size)
        backward(model, seed=5)
        norm = clip_grad_norm(list(model.parameters()), 0.1)
        clipped = [param.grad.full_tensor() for param in model.parameters()]
        results[name] = {"norm": norm, "expected": expected, "max_grad_error": max(
            float((mine - other.grad).abs().max()) for mine, other in zip(clipped, single.parameters()))}


def checkpoint_on_ranks(folder: str, results: dict) -> None:
    """Train a sharded bf16 model 3 steps, save weights and optimizer state with torch.distributed.checkpoint, load
    them into a fresh model and optimizer, and take the same 4th step on both."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    from workers.actor.fsdp import shard_model

    def build():
        model = shard_model(small_model(torch.bfloat16))
        return model, KahanAdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    def step(model, optimizer, seed):
        backward(model, seed)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model, optimizer = build()
    initial = [param.full_tensor().clone() for param in model.parameters()]
    for seed in range(3):
        step(model, optimizer, seed)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=folder)
    restored, fresh = build()
    state = {"model": get_model_state_dict(restored), "optim": get_optimizer_state_dict(restored, fresh)}
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(restored, state["model"])
    set_optimizer_state_dict(restored, fresh, state["optim"])
    pairs = list(zip(optimizer.param_groups[0]["params"], fresh.param_groups[0]["params"]))
    results["state_equal"] = all(
        torch.equal(optimizer.state[old][key].full_tensor(), fresh.state[new][key].full_tensor())
        for old, new in pairs for key in ("exp_avg", "exp_avg_sq", "compensation"))
    results["state_dtypes"] = sorted({f"{key}:{value.dtype}" for param in fresh.state
                                      for key, value in fresh.state[param].items()})
    results["steps"] = sorted({float(fresh.state[param]["step"]) for param in fresh.state})
    step(model, optimizer, 3)
    step(restored, fresh, 3)
    results["params_equal"] = all(torch.equal(old.full_tensor(), new.full_tensor()) for old, new in pairs)
    results["moved"] = all(not torch.equal(param.full_tensor(), first)
                           for param, first in zip(model.parameters(), initial))


def two_ranks(rank: int, port: int, folder: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {}
        clipping_on_ranks(results)
        checkpoint_on_ranks(f"{folder}/checkpoint", results)
        torch.save(results, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_ranks")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(two_ranks, args=(port, str(folder)), nprocs=2, join=True)
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("mesh", ["sharded", "hybrid"])
def test_clipping_over_two_gloo_ranks_is_single_process_clipping(rank_results, mesh):
    for results in rank_results:
        found = results[mesh]
        assert found["norm"] == pytest.approx(found["expected"], rel=1e-5)
        assert found["expected"] > 0.1  # so the gradients were scaled
        assert found["max_grad_error"] < 1e-6


def test_optimizer_state_round_trips_through_distributed_checkpoint(rank_results):
    for results in rank_results:
        assert results["state_equal"] and results["params_equal"] and results["moved"]
        assert results["state_dtypes"] == ["compensation:torch.bfloat16", "exp_avg:torch.float32",
                                           "exp_avg_sq:torch.float32", "step:torch.float32"]
        assert results["steps"] == [3.0]
