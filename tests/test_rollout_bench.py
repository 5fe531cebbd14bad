"""The rollout benchmark script runs end to end and reports every method (a smoke test, not a timing test)."""
import json

from tools import bench_rollout


def test_bench_rollout_prints_json_for_every_method(capsys):
    bench_rollout.main(["--prompts", "2", "--new-tokens", "4", "--repeats", "1", "--latent-size", "2"])
    report = json.loads(capsys.readouterr().out)
    assert set(report["results"]) == {"generate", "sample", "monet"}
    for entry in report["results"].values():
        assert entry["tokens"] == 8 and "warning" not in entry and entry["tokens_per_s"] > 0
    assert 0 <= report["results"]["monet"]["latent_fraction"] <= 1
