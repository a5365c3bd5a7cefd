"""tests/benchmark.py keeps working: every registered training step runs at a tiny size (batch 4: the
GCM MMD groups hold 4 samples), every toy-quality entry trains a few steps and reports its samplers, and
every digits entry trains two steps and reports its rows and goals. (The README's figures come from a full run by hand; this only guards the harness.)"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchmark  # noqa: E402


def test_benchmark_tables_smoke(tmp_path, capsys, digits_data):
    path = tmp_path / "bench.json"
    benchmark.main(["--model", "DiT-T/2", "--size", "8", "--batch", "4", "--repeats", "2", "--warmup", "1",
                    "--toy-steps", "20", "--toy-dataset", "moons",
                    "--toy-flags=--eval-samples 512", "--digits-steps", "2", "--digits-data", digits_data,
                    "--digits-flags=--eval-samples 32 --batch-size 16 --n 4", "--json", str(path),
                    "--figure", str(tmp_path / "digits.png")])
    figures = json.loads(path.read_text())
    assert set(figures["step_cost"]) == set(benchmark.STEPS)
    assert all(r["sec"] > 0 and r["ratio"] > 0 for r in figures["step_cost"].values())
    assert figures["step_cost"]["fm/plain"]["ratio"] == 1.0
    sct = figures["step_cost"]["scm/sct"]            # sCM's goal is against its own diffusion step
    assert sct["reference"] == "scm/diffusion" and sct["ref_ratio"] > 0 and sct["goal"] == 2.2
    assert {n for n, r in figures["step_cost"].items() if "goal" in r} == {n for n, g in benchmark.GOAL.items() if g}
    toy = figures["toy"]
    for method in ("scm", "gcm", "decm", "direct"):    # each method reports its own samplers at 1 NFE at least
        assert any(k.startswith(method + "/") and k.endswith("/nfe1") for k in toy), method
    assert {"fm/euler/nfe1", "fm/euler/nfe4", "fm/euler/nfe100"} <= set(toy)
    assert 0.25 < toy["prior"] < 0.5 and toy["floor"] < 0.1
    assert all(v == v and v > 0 for v in toy.values())  # no NaN
    digits = figures["digits"]
    for row in ("fm/euler", "decm/cm", "decm/mix", "decm/mix-flowmap", "scm/sct", "scm/scd", "scm/teacher-ode",
                "gcm/cu-restart", "gcm/vu-pushforward", "direct/one-step", "scm/scd-cfg1.5", "decm/auto-cfg1.5",
                "direct/one-step-cfg1.5"):
        assert f"{row}/nfe1" in digits, row
    assert {f"fm/euler/nfe{k}" for k in (1, 2, 4, 8, 100)} <= set(digits)
    assert digits["floor"]["fd"] < digits["ceiling"]["fd"] and digits["classifier_accuracy"] >= 0.97
    assert set(figures["digits_goals"]["methods"]) >= {"decm/cm", "scm/sct", "gcm/cu-restart", "direct/one-step"}
    from PIL import Image
    assert Image.open(tmp_path / "digits.png").size[1] > 1000       # a row per entry of DIGITS_FIGURE
    text = capsys.readouterr().out
    assert "| fm/plain |" in text and "| direct/one-step |" in text and "| <= 2.2 " in text
    assert "within 2x of fm/euler at 100" in text and "| held-out vs training digits (floor) |" in text
