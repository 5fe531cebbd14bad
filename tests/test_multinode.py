"""Two Ray nodes on one machine (`ray.cluster_utils.Cluster`): VLPO's workers land on both; a node lost mid-run is
reported with its step and how to resume, or survived with `trainer.max_restarts`; placement fails fast, naming the
resources, while a node is missing.

The driver is the real entry point, `python -m RL.train_vlpo`, joining the cluster through RAY_ADDRESS as on a real
cluster. Each node has one CPU, so `trainer.nnodes=2 trainer.n_gpus_per_node=1` (two workers of {CPU: 1}) puts one
worker on each. The test removes the second node once metrics.jsonl shows step 1; with `trainer.save_freq=1` the
step that fails is the one after the newest checkpoint, whichever it is.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import ray

from RL.config import ConfigError, load_config
from tests.helpers import REPO, read_metrics
from tests.test_vlpo_ray import overrides

MULTINODE = {"trainer.nnodes": 2, "trainer.n_gpus_per_node": 1, "trainer.save_freq": 1, "trainer.save_limit": -1}
PLACEMENT = re.compile(r"^policy: 2 workers on (\d) nodes?: (.*)$", re.MULTILINE)


class TwoNodes:
    """A head node and a second node, one CPU each; `second` is the node the test removes and starts again."""

    def __init__(self, temp_dir: str):
        from ray.cluster_utils import Cluster

        node = {"num_cpus": 1, "include_dashboard": False, "object_store_memory": 150 * 1024 ** 2}
        self.cluster = Cluster(initialize_head=True, head_node_args={**node, "temp_dir": temp_dir})
        self.node_args = node
        self.second = self.cluster.add_node(**node)

    def remove_second(self) -> str:
        """Kill every process of the second node; returns its id (as the driver prints it: the first 8 digits)."""
        node_id = self.second.node_id[:8]
        self.cluster.remove_node(self.second)
        self.second = None
        return node_id

    def ensure_second(self) -> None:
        if self.second is None:
            self.second = self.cluster.add_node(**self.node_args)


@pytest.fixture(scope="module")
def nodes(vlpo_sft_model):
    if ray.is_initialized():  # the session fixture's SFT run left a local cluster in this process
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="rl_mn_", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir  # the cluster's address file goes to <it>/ray, not where other runs look
    os.mkdir(os.path.join(temp_dir, "ray"))
    two = TwoNodes(os.path.join(temp_dir, "ray"))
    yield two
    two.cluster.shutdown()
    os.environ.pop("RAY_TMPDIR") if saved is None else os.environ.update(RAY_TMPDIR=saved)
    shutil.rmtree(temp_dir, ignore_errors=True)


def start_driver(nodes: TwoNodes, args: list[str], log_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS=nodes.cluster.address)
    env.pop("LATENT_RL_CRASH_AT", None)
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "RL.train_vlpo", *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True), log


def remove_second_node_after_step_1(nodes: TwoNodes, driver: subprocess.Popen, run_dir) -> str:
    """Wait for step 1's metrics line (the driver then runs step 2 or later), then remove the second node."""
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert driver.poll() is None, "the driver ended before step 1"
        time.sleep(0.5)
    return nodes.remove_second()


def placements(output: str) -> list[dict[str, str]]:
    """Each placement the driver printed, as {node id: worker}: "policy-0 on 10.0.0.1 (id 1a2b3c4d); ..."."""
    return [{node: name for name, node in re.findall(r"(policy-\d) on \S+ \(id (\w+)\)", line)}
            for _, line in PLACEMENT.findall(output)]


def finish(driver: subprocess.Popen, log, log_path) -> tuple[int, str]:
    status = driver.wait(timeout=600)
    log.close()
    return status, log_path.read_text()


@pytest.mark.parametrize("override, message", [
    ("trainer.placement_timeout_s=0", "trainer.placement_timeout_s: must be > 0 seconds, got 0"),
    ("trainer.dist_timeout_s=-1", "trainer.dist_timeout_s: must be > 0 seconds, got -1"),
    ("trainer.max_restarts=-1", "trainer.max_restarts: must be >= 0, got -1"),
])
def test_placement_timeout_and_restarts_are_checked_with_the_config(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([override], require_inputs=False)


@pytest.mark.slow
def test_lost_node_is_named_with_its_step_and_a_rerun_while_it_is_down_fails_fast(nodes, vlpo_sft_model, tmp_path):
    model, data, root = vlpo_sft_model
    nodes.ensure_second()
    args = overrides(root, data, model, "multinode_lost", **MULTINODE, **{"trainer.max_steps": 4})
    run_dir = root / "runs/multinode_lost"
    driver, log = start_driver(nodes, args, tmp_path / "lost.log")
    lost_id = remove_second_node_after_step_1(nodes, driver, run_dir)
    status, output = finish(driver, log, tmp_path / "lost.log")

    placed = placements(output)
    assert len(placed) == 1 and len(placed[0]) == 2 and lost_id in placed[0], output[-3000:]  # one worker per node
    assert status == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    message = re.fullmatch(r"error: lost node \S+ \(id (\w+)\) with (policy-\d) at step (\d+); re-run the same command "
                           r"to resume from step (\d+) \((\S+)\) once the cluster is whole again, or set "
                           r"trainer.max_restarts to restart by itself.*", errors[-1] if errors else "")
    assert message, errors
    node_id, worker, failed, resumes_from, checkpoint = message.groups()
    assert (node_id, worker) == (lost_id, placed[0][lost_id])
    assert int(resumes_from) == int(failed) - 1 >= 1
    assert checkpoint.endswith(f"step_{int(resumes_from):06d}")
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, int(failed)))

    # The same command while the node is still down: refused within the placement timeout, nothing written.
    before = (run_dir / "metrics.jsonl").read_bytes(), sorted(p.name for p in run_dir.glob("step_*"))
    driver, log = start_driver(nodes, args + ["trainer.placement_timeout_s=5"], tmp_path / "rerun.log")
    status, output = finish(driver, log, tmp_path / "rerun.log")
    assert status == 2, output[-3000:]
    assert ("error: trainer.nnodes=2 × trainer.n_gpus_per_node=1 = 2 workers of {CPU: 1} not placed within 5 s: the "
            "cluster has 1 node (CPU 1 free); start the missing nodes or lower trainer.nnodes") in output, output[-3000:]
    assert ((run_dir / "metrics.jsonl").read_bytes(), sorted(p.name for p in run_dir.glob("step_*"))) == before


@pytest.mark.slow
def test_max_restarts_finishes_the_run_by_itself_with_each_step_once(nodes, vlpo_sft_model, tmp_path):
    model, data, root = vlpo_sft_model
    nodes.ensure_second()
    args = overrides(root, data, model, "multinode_restart", **MULTINODE,
                     **{"trainer.max_steps": 4, "trainer.max_restarts": 1})
    run_dir = root / "runs/multinode_restart"
    driver, log = start_driver(nodes, args, tmp_path / "restart.log")
    lost_id = remove_second_node_after_step_1(nodes, driver, run_dir)
    nodes.ensure_second()  # a node comes back while the driver waits to place the restarted workers
    status, output = finish(driver, log, tmp_path / "restart.log")
    assert status == 0, output[-3000:]

    placed = placements(output)
    restart = re.search(rf"lost node \S+ \(id {lost_id}\) with {placed[0][lost_id]} at step (\d+): restart 1 of 1 "
                        r"\(trainer.max_restarts\), from \S+step_(\d+)", output)
    assert restart, output[-3000:]
    failed, resumed = int(restart.group(1)), int(restart.group(2))
    assert resumed == failed - 1 and f"from step {resumed}" in output
    assert len(placed) == 2 and all(len(nodes_used) == 2 for nodes_used in placed)  # the restart spans both again
    assert lost_id not in placed[1]
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["step"] for m in metrics if "trainer/restarts" in m] == [failed]
    assert metrics[failed - 1]["trainer/restarts"] == 1

