"""Run infrastructure: EMA, atomic checkpoints, config resolution, the guarded update, images, CLI errors."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
from conftest import ROOT, cpu_env


def test_ema_half_life_and_decay():
    model = torch.nn.Linear(3, 1)
    torch.nn.init.zeros_(model.weight)
    ema = common.EMA(model, halflife_kimg=0.5)                 # half-life 500 images
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(5):
        ema.update(model, batch_size=100)                      # 500 images: halfway to the new weights
    assert torch.allclose(ema.model.weight, torch.full((1, 3), 0.5), atol=1e-6)
    ema2 = common.EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema2.update(model, batch_size=7)
    assert torch.allclose(ema2.model.weight, torch.full((1, 3), 1.1), atol=1e-6)
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())
    with pytest.raises(ValueError):
        common.EMA(model)


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, {"cfg": {"method": "x"}, "w": torch.ones(3)})
    real_save = torch.save

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("power cut")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {"cfg": {"method": "x"}, "w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(common.load_checkpoint(path)["w"], torch.ones(3))     # the old file, intact
    assert os.listdir(tmp_path) == ["ckpt.pt"]                                  # no temp file left


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(common.UserError, match="not found"):
        common.load_checkpoint(str(tmp_path / "none.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(common.UserError, match="not a readable checkpoint"):
        common.load_checkpoint(str(tmp_path / "junk.pt"))
    common.save_checkpoint(str(tmp_path / "gcm.pt"), {"cfg": {"method": "gcm"}})
    with pytest.raises(common.UserError, match="written by gcm.py, not scm.py"):
        common.load_checkpoint(str(tmp_path / "gcm.pt"), "scm")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(common.UserError, match="not a checkpoint written by these scripts"):
        common.load_checkpoint(str(tmp_path / "other.pt"))


def parse(argv, extra=None):
    p = common.base_parser("demo", "demo")
    p.add_argument("--alpha", type=float)
    return common.resolve_config(p.parse_args(argv), "demo", {"alpha": 1.0, "lr": 0.5},
                                 {"toy": {"alpha": 2.0, "steps": 10}, "cifar10": {"alpha": 3.0, "lr": 1e-4}})


def test_config_precedence():
    cfg = parse(["--dataset", "moons"])
    assert cfg["alpha"] == 2.0 and cfg["steps"] == 10 and cfg["lr"] == 0.5 and cfg["out"] == os.path.join("runs", "demo-moons")
    cfg = parse(["--dataset", "cifar10", "--alpha", "7", "--steps", "3"])
    assert cfg["alpha"] == 7.0 and cfg["lr"] == 1e-4 and cfg["steps"] == 3
    cfg = parse(["--imagenet-latents"])
    assert cfg["dataset"] == "imagenet-latents" and "imagenet_latents" not in cfg
    with pytest.raises(common.UserError, match="--dataset"):
        parse([])
    assert parse(["--dataset", "moons", "--ema-decay", "0.99"])["ema_halflife_kimg"] is None


def tiny_run(tmp_path, **over):
    cfg = {**common.COMMON_DEFAULTS, "method": "demo", "dataset": "moons", "out": str(tmp_path / "run"),
           "batch_size": 8, "log_every": 2, "steps": 4, "ema_decay": 0.9, **over}
    return common.Run(cfg)


def linear_update(run, opt, model, x, scale=1.0, emas=()):
    """One guarded update of a linear model on the loss scale * sum(model(x))."""
    return run.update(opt, model.parameters(), lambda b: {"loss": scale * model(b["x"]).sum()}, {"x": x}, emas)


def test_update_skips_non_finite_steps(tmp_path):
    run = tiny_run(tmp_path, max_skips=3)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 2)
    linear_update(run, opt, model, x, float("nan"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and run.skips == 1
    linear_update(run, opt, model, x)
    assert run.skips == 0 and run.skipped_total == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for _ in range(2):
        linear_update(run, opt, model, x, float("inf"))
    with pytest.raises(common.RunError, match="3 consecutive non-finite updates.*no checkpoint was written"):
        linear_update(run, opt, model, x, float("nan"))


def test_an_overflowing_step_is_rolled_back(tmp_path):
    """--guard snapshot: a finite loss and gradient whose optimizer step overflows the weights: the step is undone
    (weights and optimizer state as before it), counted as skipped, and the EMA is not touched."""
    run = tiny_run(tmp_path, guard="snapshot")
    model = torch.nn.Linear(2, 1)
    ema = common.EMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    x = torch.randn(8, 2)
    linear_update(run, opt, model, x, emas=[(ema, model)])          # creates the momentum state
    weights = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model.weight].items()}
    ema_before = [p.clone() for p in ema.model.parameters()]
    opt.param_groups[0]["lr"] = 1e30                                # gradient ~1e10, step ~1e40: overflow
    linear_update(run, opt, model, x, 1e10, emas=[(ema, model)])
    assert run.skips == 1 and run.skipped_total == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(state[k], v) for k, v in opt.state[model.weight].items())
    assert all(torch.equal(a, b) for a, b in zip(ema_before, ema.model.parameters()))
    opt.param_groups[0]["lr"] = 1e-2
    linear_update(run, opt, model, x, emas=[(ema, model)])          # and training goes on
    assert run.skips == 0 and all(torch.isfinite(p).all() for p in model.parameters())


def test_an_overflowing_step_stops_a_light_guard_run(tmp_path):
    """--guard light (the default) keeps no copy: the overflowing step stops the run at once, naming the last good
    checkpoint, which stays as it was (no checkpoint is written with non-finite weights); the EMA is untouched."""
    run = tiny_run(tmp_path)
    os.makedirs(tmp_path / "run")
    model = torch.nn.Linear(2, 1)
    ema = common.EMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(8, 2)
    linear_update(run, opt, model, x, emas=[(ema, model)])
    run.log(0, {"loss": torch.tensor(1.0)})
    path = run.checkpoint(1, {"model": model})
    good = open(path, "rb").read()
    ema_before = [p.clone() for p in ema.model.parameters()]
    opt.param_groups[0]["lr"] = 1e30
    with pytest.raises(common.RunError, match=r"update of step 2 turned finite gradients into non-finite weights.*"
                                              r"last good checkpoint is .*ckpt.pt \(step 1\).*--guard snapshot"):
        linear_update(run, opt, model, x, 1e10, emas=[(ema, model)])
    assert all(torch.equal(a, b) for a, b in zip(ema_before, ema.model.parameters()))
    assert run.checkpoint(2, {"model": model}) is None and open(path, "rb").read() == good


def test_micro_batches_accumulate_to_the_full_batch(tmp_path):
    """--batch-gpu: the update from 4 micro-batches equals the update from the whole batch (float tolerance)."""
    x = torch.randn(8, 3)
    results = []
    for micro in (8, 2):
        run = tiny_run(tmp_path, batch_gpu=micro)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out = run.update(opt, model.parameters(), lambda b: {"loss": model(b["x"]).pow(2).mean()}, {"x": x})
        results.append(([p.detach().clone() for p in model.parameters()], float(out["loss"])))
    (full, loss_full), (acc, loss_acc) = results
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(full, acc)) and abs(loss_full - loss_acc) < 1e-6


def test_update_clips_gradients(tmp_path):
    run = tiny_run(tmp_path, grad_clip=0.5)
    w = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([w], lr=1.0)
    out = run.update(opt, [w], lambda b: {"loss": (w * torch.tensor([3.0, 4.0, 0.0, 0.0])).sum()}, {"x": torch.ones(8)})
    assert abs(float(out["grad_norm"]) - 5.0) < 1e-6                      # reported before clipping
    assert torch.allclose(w.detach(), -0.5 * torch.tensor([0.6, 0.8, 0.0, 0.0]))


def test_log_records(tmp_path):
    run = tiny_run(tmp_path)
    os.makedirs(tmp_path / "run")
    for step in range(4):
        run.log(step, {"loss": torch.tensor(float(step)), "grad_norm": torch.tensor(1.0)})
    recs = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in recs] == [2, 4]
    assert recs[0]["loss"] == 0.5 and recs[1]["loss"] == 2.5 and recs[1]["kimg"] == 0.032
    assert {"sec_per_step", "skipped", "grad_norm"} <= set(recs[0])
    # the first step (compilation, warm-up) is timed apart, in the first record only
    assert "first_step_sec" in recs[0] and "first_step_sec" not in recs[1]


def test_checkpoint_restore_and_nan_guard(tmp_path):
    run = tiny_run(tmp_path)
    model = torch.nn.Linear(2, 2)
    run.start({"model": model})
    run.checkpoint(5, {"model": model})
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    run.checkpoint(6, {"model": model})                                  # refused: non-finite
    ckpt = common.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"), "demo")
    assert ckpt["step"] == 5 and torch.equal(ckpt["model"]["weight"], good["weight"])
    run._release_signals()
    run.lock.release()                                                  # as when its process ends
    run2 = tiny_run(tmp_path, resume=True)
    fresh = torch.nn.Linear(2, 2)
    assert run2.restore({"model": fresh}) == 5
    assert torch.equal(fresh.weight, good["weight"])


def test_rng_restore_continues_the_stream(tmp_path):
    run = tiny_run(tmp_path)
    os.makedirs(tmp_path / "run")
    torch.manual_seed(7)
    run.checkpoint(1, {})
    expected = torch.rand(5)
    torch.manual_seed(99)
    tiny_run(tmp_path, resume=True).restore({})
    assert torch.equal(torch.rand(5), expected)


def test_images_written(tmp_path):
    from PIL import Image
    common.save_grid(torch.rand(6, 3, 8, 8) * 2 - 1, str(tmp_path / "g.png"))
    assert Image.open(tmp_path / "g.png").size == (2 + 3 * 10, 2 + 2 * 10)   # 3 columns, 2 rows
    common.save_grid(torch.randn(4, 4, 8, 8), str(tmp_path / "lat.png"))      # latents without a decoder
    u8 = torch.randint(0, 256, (4, 8, 8, 1), dtype=torch.uint8)                # the samples/*.npz layout
    grid = common.image_grid(u8.numpy(), 2, pad_value=0.4)
    assert grid.shape == (2 + 2 * 10, 2 + 2 * 10, 3) and (grid[:2] == 102).all()   # grey frame 0.4 * 255
    assert np.array_equal(grid[12:20, 2:10, 0], u8[2, :, :, 0].numpy())         # third image: row 2, column 1
    assert np.array_equal(grid, common.image_grid(u8.permute(0, 3, 1, 2).float() / 127.5 - 1, 2, pad_value=0.4))
    pts = torch.randn(500, 2)
    common.save_scatter(pts, str(tmp_path / "s.png"), reference=torch.randn(500, 2))
    img = np.asarray(Image.open(tmp_path / "s.png"))
    assert img.shape == (384, 384, 3) and (img < 250).any() and (img == 255).any()


def test_cli_reports_user_errors_in_one_line(capsys):
    def main(argv):
        raise common.UserError("bad input here")
    with pytest.raises(SystemExit) as e:
        common.cli(main)
    assert e.value.code == 2 and capsys.readouterr().err.strip() == "error: bad input here"


def test_common_cli_commands_fail_cleanly(tmp_path):
    res = subprocess.run([sys.executable, "common.py", "encode-latents", "--images", str(tmp_path / "none"),
                          "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True,
                         env=cpu_env())
    assert res.returncode == 2 and res.stderr.strip().startswith("error: image folder not found")


def test_cpu_tests_start_no_process_that_could_see_a_gpu(monkeypatch):
    """The suite's own guard (conftest.CpuOnlyPopen), with a GPU pretended visible: a CPU test that starts a
    process with the inherited environment is stopped; with cpu_env() (CUDA_VISIBLE_DEVICES="") it runs."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for argv in (["direct.py", "--help"], ["-m", "torch.distributed.run", "--help"]):
        with pytest.raises(AssertionError, match="env=cpu_env"):
            subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True)
        assert subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, env=cpu_env()).returncode == 0
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0     # not a run of the project's scripts


def test_cublas_workspace_is_fixed_before_any_gpu_work(monkeypatch):
    """--deterministic on a GPU needs cuBLAS's fixed workspace, read at a process's first cuBLAS call: the suite
    sets it when it starts (conftest), and a process that used CUDA without it is told so in one line instead
    of failing later in a cuBLAS call."""
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(common.UserError, match="CUBLAS_WORKSPACE_CONFIG"):
        common.deterministic_algorithms()


def test_gpu_check_reports_the_exit_and_the_error_of_a_failing_phase(tmp_path):
    """tests/gpu_check.sh runs each phase through `phase`: a step that crashes gets its exit code and the last
    line of its traceback in the report's phase table, and counts as a failure (the script's exit code); a
    step that passes is reported with exit 0. (Before, `(exit $?)` read the exit of a command substitution: 0.)"""
    script = (f"source tests/gpu_check.sh; OUT={tmp_path}; "
              f"phase ok 60 {tmp_path}/a.log python -c 'print(1)'; "
              f"phase crash 60 {tmp_path}/b.log python -c 'raise ValueError(\"boom\")'; echo failures=$failures")
    res = subprocess.run(["bash", "-c", script], cwd=ROOT, env=cpu_env(), capture_output=True, text=True)
    table = (tmp_path / "phases.md").read_text()
    assert "| ok | 0 |" in table and "| crash | 1 |" in table and "ValueError: boom |" in table, table
    assert "failures=1" in res.stdout, res.stdout + res.stderr
