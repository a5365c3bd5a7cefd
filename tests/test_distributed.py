"""`torchrun --nproc_per_node 2` with gloo on the CPU: the distributed helpers of common.py."""
import json

import pytest


def test_distributed_helpers(tmp_path, run_torchrun):
    res = run_torchrun("tests/dist_helpers.py", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in range(2))
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2) and r0["ddp"] and r0["backend"] == "gloo"
    assert r0["batch_per_rank"] == 4
    assert r0["first_draw"] != r1["first_draw"]                      # per-rank seeds
    assert r0["mean"] == r1["mean"] == 0.5
    assert not set(r0["indices"]) & set(r1["indices"]) and len(set(r0["indices"] + r1["indices"])) == 40
    assert r0["stats_ok"] and r1["stats_ok"]
    for r in (r0, r1):
        assert r["params_equal_across_ranks"]
        assert r["matches_mean_gradient"] < 1e-6
        assert r["rng_restored"]
