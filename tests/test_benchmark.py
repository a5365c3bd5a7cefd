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
    benchmark.main(["--model", "DiT-T/2", "--size", "8", "--batch", "4", "--repeats", "1", "--warmup", "0",
                    "--toy-steps", "20", "--toy-dataset", "moons",
                    "--toy-flags=--eval-samples 512", "--digits-steps", "2", "--digits-data", digits_data,
                    "--digits-flags=--eval-samples 32 --batch-size 16 --n 4", "--json", str(path),
                    "--figure", str(tmp_path / "digits.png")])
    figures = json.loads(path.read_text())
    cost = figures["step_cost"]
    assert set(cost) == set(benchmark.STEPS)
    assert all(r["sec"] > 0 and r["ratio"] > 0 and r["tflop"] > 0 and r["tflops"] > 0 for r in cost.values())
    assert cost["fm/plain"]["ratio"] == 1.0 and cost["scm/diffusion"]["reference"] == "scm/diffusion"
    sct = cost["scm/sct"]                            # sCM's goal is against its own diffusion step
    assert sct["reference"] == "scm/diffusion" and sct["goal"] == 2.2
    assert {n for n, r in cost.items() if "goal" in r} == {n for n, g in benchmark.GOAL.items() if g}
    # FLOPs by pass count: a forward-backward is 3 forwards; GCM's Eq. (39) adds a forward (4); sCT a JVP
    ratio = {n: cost[n]["tflop"] / cost[benchmark.REFERENCE[n]]["tflop"] for n in cost}
    assert abs(ratio["gcm/cu-fd-l2"] - 4 / 3) < 0.05 and 1.5 < ratio["scm/sct"] < 2.2
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


def test_benchmark_skips_what_a_batch_cannot_take_and_runs_digits_jobs(tmp_path, capsys, digits_data, monkeypatch):
    """--batch 2: the CU MMD rows (groups of 4) are skipped with the reason, the VU one (groups of 2) runs.
    --digits-jobs 2: two digits entries train as two processes at once, their rows merged into one table."""
    path = tmp_path / "bench.json"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")                   # the digits jobs are CPU processes
    benchmark.main(["--model", "DiT-T/2", "--size", "8", "--batch", "2", "--repeats", "1", "--warmup", "0",
                    "--only", "gcm/cu-fd-mmd", "gcm/vu-fd-mmd", "scm-sct", "gcm-cu", "--skip", "toy", "--digits-jobs", "2",
                    "--digits-steps", "2", "--digits-data", digits_data, "--keep-runs", str(tmp_path / "runs"),
                    "--digits-flags=--eval-samples 16 --batch-size 16 --n 4 --nfe 1 --threads 1", "--json", str(path)])
    figures = json.loads(path.read_text())
    assert figures["step_cost"]["gcm/cu-fd-mmd"] == {"skipped": "batch 2 is not a multiple of the MMD group of 4"}
    assert figures["step_cost"]["gcm/vu-fd-mmd"]["sec"] > 0
    assert "| gcm/cu-fd-mmd | skipped: batch 2" in capsys.readouterr().out
    assert {r.rsplit("/", 1)[0] for r in figures["digits"] if "/nfe" in r} == {"scm/sct", "gcm/cu-restart"}
    assert os.path.isfile(tmp_path / "runs" / "logs" / "scm-sct.log")


def test_compute_curves_score_snapshots_as_the_shorter_runs(tmp_path, capsys, digits_data, monkeypatch):
    """Table d at a tiny budget unit (25 steps of batch 40): flow matching and the DE-CM student distilled from
    its snapshot at the largest budget, scored at 1x and 2x. The 1x score of the long run's snapshot is the end
    of a 25-step run, bit for bit; the student's cost counts its teacher; a second call finds nothing to do."""
    import decm
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")                   # the runs are CPU processes
    argv = ["--curves", str(tmp_path / "cv"), "--curve-unit-steps", "25", "--curve-budgets", "1", "2",
            "--curve-seeds", "0", "--curve-chains", "fm", "decm", "--digits-flags=--batch-size 40",
            "--curve-eval-samples", "32", "--digits-data", digits_data, "--json", str(tmp_path / "cv.json"),
            "--figure", str(tmp_path / "cv.png")]
    benchmark.main(argv)
    report = json.loads((tmp_path / "cv.json").read_text())
    short = tmp_path / "short"
    decm.main(["--dataset", "digits", "--losses", "fm", "--out", str(short), "--steps", "25", "--batch-size", "40",
               "--threads", "1", "--data-path", digits_data, "--eval-samples", "32", *benchmark._BASELINE])
    scored = json.loads((tmp_path / "cv" / "seed0" / "fm" / "at-1x" / "eval.json").read_text())
    assert scored["fd"] == json.loads((short / "eval.json").read_text())["fd"]
    rows = report["rows"]
    assert set(rows) == {"fm/euler", "decm/cm", "decm/mix", "decm/euler"}
    assert set(rows["decm/cm"]) == {"chain", "1", "2"} and set(rows["fm/euler"]["2"]["0"]) == {"1", "2", "4", "8", "100"}
    fm, student = report["chains"]["fm"], report["chains"]["decm"]
    assert fm["unit_cost"] == 1 and abs(fm["forward_passes_per_image"] - 3) < 0.05      # forward + backward
    assert student["teacher"] == "fm" and student["teacher_cost"] == 2 and 1.5 < student["unit_cost"] < 3
    assert benchmark.row_cost(report, "decm/cm", 2) == 2 + 2 * student["unit_cost"]
    assert all(s > 0 for s in report["seconds"]["fm"]["2"].values())
    assert "| fm/euler | 100 | 1.00 | 0.0 |" in capsys.readouterr().out
    benchmark.main(argv)                                               # everything is done: only the table again
    assert "start" not in capsys.readouterr().out


def test_policy_report_chooses_the_fastest_policy_whose_targets_are_right(tmp_path):
    """The GPU check's decision tables: the oracle errors of every policy (on a CPU the tf32 policy is the exact
    one) and, per method, the fastest policy whose target error at the solution is within the tolerance."""
    errors = benchmark.policy_errors("cpu")
    assert all(e["tf32"] == e["fp32"] and e["bf16"] > 100 * e["fp32"] for e in errors.values())
    (tmp_path / "policy-errors.json").write_text(json.dumps(errors))
    for policy, run in benchmark.POLICY_RUNS.items():                  # bf16 fastest, then tf32, then exact
        sec = {"fp32": 0.3, "tf32": 0.2, "bf16": 0.1}[policy]
        rows = {entry: {"sec": sec, "ratio": sec / 0.1} for entry in benchmark.POLICY_METHODS.values()}
        (tmp_path / f"step-cost-{run}.json").write_text(json.dumps({"step_cost": rows}))
    text = benchmark.policy_report(str(tmp_path))
    for method in benchmark.POLICY_METHODS:                      # every bf16 target errs by more than 1e-3 here
        assert f"Default on this device for {method}: `tf32`" in text, text


def test_claims_are_judged_seed_by_seed_at_the_largest_budget():
    """A claim "a beats b" shows when a has the lower FD in every seed at the largest budget, is mixed when in
    some, and does not show in none; smaller budgets and seeds one side lacks do not count; the band is the
    median, lowest and highest over the seeds compared."""
    def scores(*fds):
        return {str(seed): {"1": {"fd": fd}, "2": {"fd": fd2}} for seed, (fd, fd2) in enumerate(fds)}
    report = {"setting": {"budgets": [1, 8]}, "rows": {
        "scm/sct": {"chain": "sct", "1": scores((900, 1)), "8": scores((50, 40), (60, 70), (55, 45))},
        "gcm/vu-pushforward": {"chain": "gcm-vu", "8": scores((30, 20), (35, 25), (31, 21), (2, 1))}}}
    claims = {c["claim"]: c for c in benchmark.curves_claims(report)}
    two_vs_one = claims["2 steps better than 1 (sCT)"]
    assert (two_vs_one["wins"], two_vs_one["seeds"], two_vs_one["verdict"]) == (2, 3, "mixed")
    assert two_vs_one["a"] == (45, 40, 70, 3) and two_vs_one["b"] == (55, 50, 60, 3)
    assert claims["VU's pushforward sampler improves with steps (2 vs 1)"]["verdict"] == "shows"
    assert "2 steps better than 1 (sCD)" not in claims                    # no sCD rows: no verdict
    report["rows"]["gcm/cu-restart"] = {"chain": "gcm-cu", "8": scores((40, 40), (20, 20))}
    vu_cu = {c["claim"]: c for c in benchmark.curves_claims(report)}["VU better than CU at 1 step"]
    assert (vu_cu["wins"], vu_cu["seeds"], vu_cu["verdict"]) == (1, 2, "mixed")     # the two seeds both have
    assert vu_cu["a"] == (32.5, 30, 35, 2) and vu_cu["b"] == (30, 20, 40, 2)     # the bands over those seeds only
    report["rows"]["scm/sct"]["8"] = scores((40, 50))
    assert {c["claim"]: c for c in benchmark.curves_claims(report)}["2 steps better than 1 (sCT)"]["verdict"] == \
        "does not show"
    assert "| sCM | 2 steps better than 1 (sCT) | 50 | 40 | 0 of 1 | does not show |" in \
        benchmark.claims_markdown(benchmark.curves_claims(report))
