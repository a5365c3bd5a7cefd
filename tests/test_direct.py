"""direct.py: the propagation loss against the exact Gaussian flow, stop-gradient placement, a toy
run, one DiT step, bit-identical resume and a two-process DDP step."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import direct
import dit
from conftest import ROOT, assert_states_equal, check_ddp_step, cpu_env, load_state, run_cli

MU, STD = torch.tensor([1.5, -0.5, 0.25]), 0.4
FLOW = common.GaussianFlow(direct.INTERP, MU, STD)     # x_t = (1-t) x0 + t x1, x1 ~ N(MU, STD^2)


def exact_w(param):
    """w(x0, t) of the exact flow map phi(x0, t) = FLOW.flow_map(x0, 0, t) (Eq. 4 solved for w)."""
    def w(x0, t, y=None):
        disp = FLOW.flow_map(x0, torch.zeros_like(t), t) - x0
        return disp / common.bcast(t, x0) if param == "tw" else disp
    return w


def exact_v(x, t, y=None):
    return FLOW.velocity(x, t)


@pytest.mark.parametrize("param", ["tw", "w"])
def test_propagation_residual_is_second_order_in_dt(param):
    """With the exact flow map and exact velocity, w(x0, t'+dt) minus the Eq. (16) target is the
    forward-difference truncation error, O(dt^2): halving dt divides it by 4 (the loss by 16)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(256, 3, generator=g, dtype=torch.float64)
    t = 0.1 + 0.8 * torch.rand(256, generator=g, dtype=torch.float64)
    w = exact_w(param)
    residual = []
    for dt in (0.02, 0.01):
        target = direct.propagate(w(x0, t), exact_v(direct.flow(w(x0, t), x0, t, param), t), t, dt, param)
        residual.append((w(x0, t + dt) - target).abs().max())
        loss = direct.propagation_loss(w, exact_v, x0, t, dt, param=param)
        assert torch.isclose(loss, (w(x0, t + dt) - target).pow(2).mean())
    assert residual[1] < 1e-3
    assert 3.6 < residual[0] / residual[1] < 4.4


def test_exact_w_starts_at_the_initial_velocity():
    """phi(x0, t) = x0 + t w(x0, t): as t -> 0, w(x0, t) -> d phi/dt at 0 = v(x0, 0), error O(t)."""
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v0 = exact_v(x0, torch.zeros(64, dtype=torch.float64))
    errs = [(exact_w("tw")(x0, torch.full((64,), t, dtype=torch.float64)) - v0).abs().max() for t in (1e-2, 5e-3)]
    assert errs[1] < 0.02 and 1.8 < errs[0] / errs[1] < 2.2
    # the path sampler and the one-step sampler read the same map
    t = torch.full((64,), 0.3, dtype=torch.float64)
    assert torch.allclose(direct.direct_path(exact_w("tw"), x0, 0.3), FLOW.flow_map(x0, 0 * t, t))
    assert torch.allclose(direct.sample_direct(exact_w("tw"), x0), FLOW.flow_map(x0, 0 * t, t + 0.7))


def tiny_models(seed=0):
    torch.manual_seed(seed)
    v = dit.build_model("MLP", (2,), hidden_size=32, depth=2)
    w = dit.build_model("MLP", (2,), hidden_size=32, depth=2)
    for m in (v, w):                                    # non-zero outputs, so every path carries gradient
        torch.nn.init.normal_(m.out.weight, std=0.3)
    return v, w


def test_stop_gradient_placement():
    """Default: w_nu's gradient flows only through w_nu(x0, t'+dt), and theta gets none from Eq. (16)."""
    v, w = tiny_models()
    x0, t, dt = torch.randn(64, 2), 0.05 + 0.9 * torch.rand(64), 0.01
    direct.propagation_loss(w, v, x0, t, dt).backward()
    assert all(p.grad is None for p in v.parameters())
    got = [p.grad.clone() for p in w.parameters()]
    w.zero_grad()
    with torch.no_grad():                               # the target by hand, detached
        w_prev = w(x0, t)
        target = (t - dt)[:, None] / t[:, None] * w_prev + dt / t[:, None] * v(x0 + t[:, None] * w_prev, t)
    (w(x0, t + dt) - target).pow(2).mean().backward()
    assert all(torch.allclose(a, p.grad, atol=1e-7) for a, p in zip(got, w.parameters()))
    # Table 3 ablation: without stop-gradients the gradient differs, and still none reaches theta
    w.zero_grad()
    direct.propagation_loss(w, v, x0, t, dt, stop_grad=False).backward()
    assert all(p.grad is None for p in v.parameters())
    assert max((a - p.grad).abs().max() for a, p in zip(got, w.parameters())) > 1e-4


def test_cfm_loss_and_guidance():
    v, _ = tiny_models()
    x1, x0, t = torch.randn(16, 2), torch.randn(16, 2), torch.rand(16)
    xt = (1 - t)[:, None] * x0 + t[:, None] * x1
    assert torch.isclose(direct.cfm_loss(v, x1, x0, t), (v(xt, t) - (x1 - x0)).pow(2).mean())
    m = dit.build_model("MLP", (2,), num_classes=3, hidden_size=32, depth=2).eval()
    torch.nn.init.normal_(m.out.weight, std=0.3)
    y = torch.randint(0, 3, (16,))
    v_c, v_u = m(xt, t, y=y), m(xt, t, y=torch.full_like(y, 3))
    assert torch.allclose(direct.velocity(m, xt, t, y, 1.5), v_u + 1.5 * (v_c - v_u), atol=1e-6)


def test_euler_sampler_follows_the_exact_velocity():
    """The flow-matching baseline with the exact velocity lands on the data law (Euler, 128 steps)."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(20_000, 3, generator=g, dtype=torch.float64)
    x1 = direct.sample_euler(exact_v, x0, 128)
    assert (x1.mean(0) - MU.double()).abs().max() < 0.02 and (x1.std(0) - STD).abs().max() < 0.02


def test_toy_run_beats_the_prior_and_nears_flow_matching(tmp_path):
    out = tmp_path / "run"
    direct.main(["--dataset", "moons", "--steps", "1200", "--dt", "0.05", "--euler-steps", "128",
                 "--out", str(out)])
    ev = json.load(open(out / "eval.json"))
    data = np.load(out / "samples" / "data.npy")
    prior = common.sliced_wasserstein(torch.randn(len(data), 2, generator=torch.Generator().manual_seed(0)),
                                      torch.from_numpy(data))
    one_step, euler128 = ev["swd"]["1"], ev["swd_euler"]["128"]
    print(f"direct 1-step SWD {one_step:.4f}, v_theta Euler-128 {euler128:.4f}, noise prior {prior:.4f}")
    assert one_step < 0.35 * prior
    assert one_step < euler128 + 0.06
    assert np.load(out / "samples" / "nfe1.npy").shape == (4096, 2)
    assert (out / "samples" / "step1200_nfe1.png").exists() and (out / "config.json").exists()
    log = [json.loads(l) for l in open(out / "log.jsonl")]
    assert log[-1]["step"] == 1200 and {"cfm", "prop", "grad_norm", "lr", "sec_per_step", "skipped", "kimg"} <= set(log[-1])
    # --sample-only from the checkpoint reproduces the evaluation without training
    direct.main(["--sample-only", "--ckpt", str(out / "ckpt.pt"), "--out", str(tmp_path / "s"), "--euler-steps", "4"])
    again = json.load(open(tmp_path / "s" / "eval.json"))
    assert again["swd"]["1"] == pytest.approx(one_step, abs=1e-9)
    assert (tmp_path / "s" / "samples" / "sample_nfe1.png").exists()


def test_one_dit_image_step(tmp_path, cifar_root):
    out = tmp_path / "img"
    direct.main(["--dataset", "cifar10", "--data-path", cifar_root,
              "--eval-samples", "8", "--model", "DiT-T/2", "--steps", "2",
                 "--batch-size", "4", "--n", "4", "--euler-steps", "2", "--log-every", "1", "--out", str(out)])
    log = [json.loads(l) for l in open(out / "log.jsonl")]
    assert len(log) == 2 and all(np.isfinite(r["loss"]) for r in log)
    assert (out / "samples" / "step2_nfe1.png").exists() and (out / "samples" / "step2_euler_nfe2.png").exists()
    assert load_state(out / "ckpt.pt")["step"] == 2


def test_resume_is_bit_identical(tmp_path):
    common_args = ["--dataset", "moons", "--batch-size", "32", "--euler-steps", "1", "--eval-samples", "64",
                   "--log-every", "2"]
    direct.main(common_args + ["--steps", "6", "--out", str(tmp_path / "a")])
    direct.main(common_args + ["--steps", "3", "--out", str(tmp_path / "b")])
    direct.main(common_args + ["--steps", "6", "--out", str(tmp_path / "b"), "--resume"])
    a, b = load_state(tmp_path / "a" / "ckpt.pt"), load_state(tmp_path / "b" / "ckpt.pt")
    assert a["step"] == b["step"] == 6
    a.pop("cfg"), b.pop("cfg")
    assert_states_equal(a, b)


def test_ddp_step(tmp_path, run_torchrun):
    check_ddp_step(run_torchrun, tmp_path, "direct", ["default", "no-stop-grad", "cfg"])


@pytest.mark.parametrize("args,message", [
    (["--dataset", "moons", "--dt", "0.7"], "--dt must lie in"),
    (["--dataset", "moons", "--nfe", "2"], "one-step sampler"),
    (["--dataset", "moons", "--model", "DiT-T/2"], "square images"),
    (["--dataset", "moons", "--resume", "--out", "/nonexistent/run"], "no checkpoint"),
    (["--sample-only", "--ckpt", "/nonexistent.pt"], "checkpoint not found"),
])
def test_bad_input_is_one_line(args, message, capsys):
    code, err = run_cli(direct.main, args, capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_script_entry_point():
    res = subprocess.run([sys.executable, "direct.py", "--dataset", "moons", "--dt", "2"], cwd=ROOT,
                         capture_output=True, text=True, env=cpu_env())
    assert res.returncode == 2 and res.stderr.strip().splitlines() == ["error: --dt must lie in (0, 0.5), got 2.0"]
