"""Shared fixtures: an offline environment and one tiny Qwen2.5-VL per test session."""
import os
import sys

for key, value in {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

import pytest
import torch

from RL.toy_task import corpus_lines, make_toy_dataset

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def process_group():
    """A torch.distributed world of one (gloo, a free loopback port) in the test process, for FSDP2 models built
    in-process; destroyed after the module."""
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module", autouse=True)
def no_process_group_left(request):
    """A module that leaves torch.distributed's default group behind breaks whichever module its pytest worker runs
    next ("trying to initialize the default process group twice"): the group is ended and the module that left it
    fails."""
    yield
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail(f"{request.module.__name__} left a torch.distributed process group behind")


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    """A module's tests share the local Ray cluster the first of them starts; it is shut down with the module."""
    yield
    ray = sys.modules.get("ray")  # never imported by a module that does not use it
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def build_toy_model(folder):
    """The tiny Qwen2.5-VL with its tokenizer trained on the toy task's text (as `tools.make_tiny_model` builds it)."""
    from monet_models.tiny_model import build_tiny_model  # transformers: loaded only by the tests that need a model

    return build_tiny_model(folder, corpus_lines(), seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return str(build_toy_model(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory):
    return str(make_toy_dataset(tmp_path_factory.mktemp("toy_data"), n_train=32, n_val=8, seed=0))


@pytest.fixture(scope="session")
def sft_data_dir(tmp_path_factory):
    """The toy task with its latent-SFT rows (Monet chains with a zoomed image, Mirage rows with a helper image)."""
    return str(make_toy_dataset(tmp_path_factory.mktemp("sft_data"), n_train=16, n_val=4, seed=0, sft=True))


@pytest.fixture(scope="session")
def vlpo_sft_model(tmp_path_factory, toy_data_dir):
    """The tiny model after a short latent SFT on Ray (the default stage: a block, then the boxed answer), so rollouts
    open latent blocks: (model, data dir, run root)."""
    from RL.config import load_config
    from RL.train_sft import run_sft
    from tests.test_vlpo_ray import overrides

    root = tmp_path_factory.mktemp("vlpo")
    base = build_toy_model(root / "tiny")
    config = load_config(overrides(root, toy_data_dir, base, "sft") + [
        "sft.steps=25", "sft.batch_size=8", "sft.lr=3e-3", f"sft.output_dir={root / 'sft'}"])
    return str(run_sft(config)), toy_data_dir, root


@pytest.fixture(scope="session")
def selfplay_model(tmp_path_factory):
    """The tiny model briefly warm-started on the toy proposer/solver formats, and the toy images."""
    from RL.config import load_config
    from RL.train_sft import run_sft
    from tests.test_self_evolution import CONFIG, REPO

    root = tmp_path_factory.mktemp("selfplay")
    prompts = (str(REPO / "examples/format_prompt/toy_proposer.jinja"),
               str(REPO / "examples/format_prompt/toy_solver.jinja"))
    data = make_toy_dataset(root / "toy", n_train=32, n_val=8, seed=0, selfplay_prompts=prompts)
    base = build_toy_model(root / "tiny")
    config = load_config([f"config={CONFIG}", f"worker.actor.model.model_path={base}",
                          f"data.train_files={data}/selfplay_sft.jsonl", "data.image_dir=", "worker.rollout.latent_size=3",
                          "sft.steps=30", "sft.batch_size=8", "sft.lr=3e-3", f"sft.output_dir={root / 'sft'}",
                          "worker.actor.model.lora.rank=0"],  # the warm start trains the whole model
                         require_inputs=False)
    return str(run_sft(config)), data, root
