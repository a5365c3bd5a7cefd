"""gcm.py: the consistency residuals against the exact Gaussian flow map, Eq. (39) vs Eq. (5) vs
Eq. (6), h(t) and c(t), the time sampling and its importance weights, the MMD loss, the samplers,
CU and VU toy runs, one DiT step, bit-identical resume and a two-process DDP step."""
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common
from oracles import jvp_finite_difference
import gcm
from conftest import ROOT, assert_states_equal, check_ddp_step, cpu_env, load_state, run_cli

MU, STD = torch.tensor([1.5, -0.5, 0.25]), 0.4
FLOW = common.GaussianFlow(gcm.INTERP, MU, STD)        # x_t = (1-t) x + t z, x ~ N(MU, STD^2 I)
T0, TT = 0.006, 0.994


def exact_f(x, t, s, y=None):
    """The average velocity of the exact flow map: f = (Phi_{t->s}(x) - x) / (s - t), Eq. (3)/(4)."""
    return (FLOW.flow_map(x, t, s) - x) / common.bcast(s - t, x)


def oracle_batch(n=512, vu=False, seed=0):
    """Points x_t, times t in [0.1, 0.9], upper limits s (t0, or uniform in [t0, t - 0.05]), and the exact
    marginal velocity v(x_t, t), which replaces the one-sample estimate u_t in the oracle."""
    g = torch.Generator().manual_seed(seed)
    x_t = 2 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    t = 0.1 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64)
    s = T0 + (t - 0.05 - T0) * torch.rand(n, generator=g, dtype=torch.float64) if vu else torch.full_like(t, T0)
    return x_t, t, s, FLOW.velocity(x_t, t)


@pytest.mark.parametrize("vu", [False, True])
def test_finite_difference_residual_is_first_order(vu):
    """With the exact flow map and velocity, Eq. (39)'s residual is (g(x_t,t,s) - g(x_r,r,s))/(t - r),
    and the Euler step x_r misses the trajectory by O(h^2): the residual is O(h), halving eps halves it."""
    x_t, t, s, v = oracle_batch(vu=vu)
    cfg = {"h": "exp", "mu": 3.5}
    res = []
    for eps in (0.02, 0.01):
        r = gcm.discretize(t, s, eps, cfg)
        assert torch.allclose(t - r, eps * torch.exp(-3.5 * t))
        F_t, F_t_minus, F_r, x_r = gcm.flow_pair(common.Passes(exact_f), x_t, v, t, s, r)
        res.append(gcm.consistency_residual(v, F_t, F_t_minus, F_r, t, s, r).norm(dim=1).max())
    print(f"Eq. (39) residual at eps 0.02 / 0.01: {res[0]:.2e} / {res[1]:.2e}")
    assert 1.9 < res[0] / res[1] < 2.1


@pytest.mark.parametrize("vu", [False, True])
def test_analytic_residual_vanishes(vu):
    """Eq. (6) with the exact flow map: g(x_t, t, s) is constant along the trajectory, so
    v - f + (s - t) df/dt = 0 to float64 round-off (the JVP differentiates through flow_map)."""
    x_t, t, s, v = oracle_batch(vu=vu)
    E = gcm.analytic_residual(common.Passes(exact_f), x_t, v, t, s)
    print(f"Eq. (6) residual: {E.abs().max():.2e}")
    assert E.abs().max() < 1e-10
    # the same with an off-trajectory velocity is far from zero: the check has power
    assert gcm.analytic_residual(common.Passes(exact_f), x_t, v + 0.1, t, s).abs().max() > 0.05


def toy_cfg(*flags):
    return gcm.parse_config(["--dataset", "moons", *flags])


def tiny_net(cfg, seed=0):
    """gcm's toy MLP on 3-d data in float64, out of its zero init so every path carries gradient."""
    torch.manual_seed(seed)
    net = gcm.build_model(cfg, SimpleNamespace(shape=(3,), num_classes=0)).double()
    torch.nn.init.normal_(net.out.weight, std=0.3)
    if net.cond.s_embedder is not None:
        torch.nn.init.normal_(net.cond.s_embedder.mlp[2].weight, std=0.3)
    return net


def test_eq39_has_the_gradient_of_eq5():
    """App. D.1: w/(t-s) ||g(x_t,t,s) - g-(x_r,r,s)|| (Eq. 5) and w ||E|| (Eq. 39) have the same
    parameter gradient per sample (under one dropout mask), though their values differ by (t-r)/(t-s)."""
    cfg = toy_cfg("--variant", "vu", "--dropout", "0.2")
    net = tiny_net(cfg)
    x_t, t, s, _ = oracle_batch(64, vu=True, seed=3)
    u = torch.randn_like(x_t)
    r = gcm.discretize(t, s, 0.01, cfg)
    w = gcm.loss_weight(t, cfg)

    def f(x, tt, ss):
        return gcm.f_theta(net, x, tt, ss, cfg)
    F_t, F_t_minus, F_r, x_r = gcm.flow_pair(common.Passes(f), x_t, u, t, s, r)
    loss39 = (w * gcm.consistency_residual(u, F_t, F_t_minus, F_r, t, s, r).norm(dim=1)).mean()
    grad39 = torch.autograd.grad(loss39, list(net.parameters()), retain_graph=True)
    g_t = x_t + common.bcast(s - t, x_t) * F_t                                   # g_theta(x_t, t, s), Eq. (3)
    g_r = (x_r + common.bcast(s - r, x_r) * F_r).detach()                        # g_theta-(x_r, r, s)
    loss5 = (w / (t - s) * (g_t - g_r).norm(dim=1)).mean()
    grad5 = torch.autograd.grad(loss5, list(net.parameters()))
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(grad39, grad5))
    assert max(a.abs().max() for a in grad39) > 1e-3
    assert not torch.isclose(loss39, loss5)


def test_network_jvp_matches_finite_differences_under_dropout():
    """Eq. (6) on a real network with dropout: the JVP (on fp64 weights) equals a central difference
    taken under the same dropout mask, and Eq. (39)'s residual tends to it at rate O(h)."""
    cfg = toy_cfg("--variant", "vu", "--dropout", "0.2")
    net = tiny_net(cfg)
    x_t, t, s, _ = oracle_batch(64, vu=True, seed=4)
    u = torch.randn_like(x_t)

    def f(x, tt, ss):
        return gcm.f_theta(net, x, tt, ss, cfg)
    torch.manual_seed(7)
    E6 = gcm.analytic_residual(common.Passes(f), x_t, u, t, s)
    torch.manual_seed(7)                                  # the same dropout mask as the JVP's
    F, dF = jvp_finite_difference(lambda x, tt: f(x, tt, s), (x_t, t), (u, torch.ones_like(t)), eps=1e-5)
    assert torch.allclose(E6, u - F + common.bcast(s - t, u) * dF, atol=1e-7)
    gaps = []
    for eps in (2e-3, 1e-3):
        r = gcm.discretize(t, s, eps, cfg)
        torch.manual_seed(7)
        E39 = gcm.consistency_residual(u, *gcm.flow_pair(common.Passes(f), x_t, u, t, s, r)[:3], t, s, r)
        gaps.append((E39 - E6).abs().max())
    assert gaps[1] < 0.02 and 1.8 < gaps[0] / gaps[1] < 2.2


def test_time_input_makes_the_step_uniform():
    """Eq. (9): c'(t) h(t) = const, i.e. c(t) - c(t - h(t)) is the same at every t, for the pairs
    (exp h, exp c) and (constant h, c = t); and c(t)/t -> 1 at 0 (App. C.4)."""
    t = torch.linspace(0.006, 0.994, 200, dtype=torch.float64, requires_grad=True)
    for h_kind, c_kind, eps in (("exp", "exp", 0.005), ("constant", "linear", 0.002)):
        c = gcm.time_input(c_kind, t, 3.5)
        dc = torch.autograd.grad(c.sum(), t)[0]
        prod = dc * gcm.STEP_SIZES[h_kind](t, eps, 3.5)
        assert torch.allclose(prod, torch.full_like(prod, eps), rtol=1e-10)
        gap = c - gcm.time_input(c_kind, t - gcm.STEP_SIZES[h_kind](t, eps, 3.5), 3.5)
        assert (gap.max() - gap.min()) / gap.mean() < 0.01
    # exp c with the baseline constant h is not uniform: the check has power
    gap = gcm.time_input("exp", t, 3.5) - gcm.time_input("exp", t - 0.002, 3.5)
    assert gap.max() / gap.min() > 20
    small = torch.tensor([1e-4, 1e-6], dtype=torch.float64)
    assert torch.allclose(gcm.time_input("exp", small, 3.5) / small, torch.ones(2, dtype=torch.float64), atol=1e-3)


def test_step_sizes_of_table_7b():
    """Every h(t) is positive on (t0, tT) (the convex one vanishes at 0.5 only), the App. C.3 eps gives
    each the integral 0.005/3 of the baseline 0.005 (1-t)^2, IMM's h tends to that baseline as
    eps -> 0, and EDM's translated h is bell-shaped (App. C.2)."""
    t = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    inside = (t > T0) & (t < TT)
    for kind in gcm.STEP_SIZES:
        eps = gcm.matched_eps(kind)
        h = gcm.STEP_SIZES[kind](t, eps, 3.5)
        assert abs(float(torch.trapezoid(h, t)) - 0.005 / 3) < 1e-9, kind
        pos = h[inside] > 0 if kind != "quadratic-convex" else h[inside & ((t - 0.5).abs() > 1e-3)] > 0
        assert pos.all(), kind
    assert gcm.matched_eps("quadratic") == pytest.approx(0.005, rel=1e-6)
    assert gcm.matched_eps("constant") == pytest.approx(0.005 / 3, rel=1e-6)
    imm = gcm.STEP_SIZES["imm"](t[:-1], 1e-4, 3.5) / (1e-4 * (1 - t[:-1]) ** 2)
    assert (imm - 1).abs().max() < 2e-4
    h_edm = gcm.STEP_SIZES["edm"](t, gcm.matched_eps("edm"), 3.5)
    peak = int(h_edm.argmax())
    assert 0.1 < float(t[peak]) < 0.9 and h_edm[peak] > 3 * max(h_edm[1000], h_edm[-1000])


def test_preconditioning_gives_unit_variance():
    """c_in x_t and u_t / c_out have unit variance: "unit" for z ~ N(0, I) and data of std sigma_d;
    the paper's printed formula ("literal") only under IMM's z ~ N(0, sigma_d^2 I)."""
    g = torch.Generator().manual_seed(0)
    sigma_d, n = 0.5, 400_000
    x = sigma_d * torch.randn(n, generator=g, dtype=torch.float64)
    for kind, noise_std in (("unit", 1.0), ("literal", sigma_d)):
        z = noise_std * torch.randn(n, generator=g, dtype=torch.float64)
        for tv in (0.006, 0.3, 0.7, 0.994):
            t = torch.full((n,), tv, dtype=torch.float64)
            c_in, c_out = gcm.precond(kind, t, sigma_d)
            x_t, u = (1 - t) * x + t * z, z - x
            assert abs(float((c_in * x_t).std()) - 1) < 0.01 and abs(float((u / c_out).std()) - 1) < 0.01
    c_in, _ = gcm.precond("literal", torch.tensor([0.994], dtype=torch.float64), sigma_d)
    assert abs(float(c_in) * 0.994 - 1) > 0.5                          # literal with z ~ N(0, I): far from 1


def test_network_sees_c_of_t_and_s():
    seen = {}

    def net(x, t, s=None, y=None):
        seen.update(x=x, t=t, s=s)
        return torch.ones_like(x)
    t, s = torch.tensor([0.2, 0.9]), torch.tensor([0.1, 0.006])
    x = torch.ones(2, 3)
    for variant in ("cu", "vu"):
        cfg = toy_cfg("--variant", variant, "--sigma-d", "0.5")
        f = gcm.f_theta(net, x, t, s, cfg)
        c_in, c_out = gcm.precond("unit", t, 0.5)
        assert torch.allclose(seen["t"], torch.expm1(3.5 * t) / 3.5)
        assert torch.allclose(seen["x"], c_in[:, None] * x) and torch.allclose(f, c_out[:, None] * x)
        assert (seen["s"] is None) if variant == "cu" else torch.allclose(seen["s"], torch.expm1(3.5 * s) / 3.5)
    g = gcm.g_theta(lambda x, t, s: torch.full_like(x, 2.0), x, t, s)     # Eq. (3)
    assert torch.allclose(g, x + 2 * (s - t)[:, None])


def test_time_sampling_and_importance_weights():
    """t | s lies in [s, tT]; the weight w(t) p_U(t|s) / p(t|s) makes any p an unbiased stand-in for
    uniform sampling with weight w (Section 3.3); VU's s follows Eq. (17); s = t with prob. p_diag."""
    n = 200_000
    grid = torch.linspace(T0, TT, 100_001, dtype=torch.float64)
    w_uniform = float(torch.trapezoid(gcm.loss_weight(grid, toy_cfg()), grid)) / (TT - T0)   # E_U[w(t)]
    for t_dist in ("sine", "cosh", "uniform"):
        cfg = toy_cfg("--t-dist", t_dist)
        torch.manual_seed(0)
        t, s, weight = gcm.sample_times(n, cfg, "cpu")
        assert (s == T0).all() and (t >= s).all() and (t <= TT).all() and torch.isfinite(weight).all()
        assert float(weight.double().mean()) == pytest.approx(w_uniform, rel=0.01), t_dist
    assert float(t.mean()) == pytest.approx(0.5, abs=0.01)
    torch.manual_seed(0)
    t, s, weight = gcm.sample_times(n, toy_cfg("--variant", "vu"), "cpu")                  # sine t on [s, tT]
    assert (s >= T0).all() and (t >= s).all() and (t <= TT).all()
    up = common.UniformPower(4.0, T0, TT)
    q = torch.tensor([0.1, 0.2, 0.4], dtype=torch.float64)
    assert torch.allclose((s.double()[:, None] <= q).double().mean(0), up.cdf(q), atol=0.005)
    torch.manual_seed(0)
    t, s, weight = gcm.sample_times(n, toy_cfg("--variant", "vu", "--p-diag", "0.75", "--mmd-group", "1"), "cpu")
    assert float((t == s).double().mean()) == pytest.approx(0.75, abs=0.005)
    torch.manual_seed(0)
    t, s, _ = gcm.sample_times(12, toy_cfg("--variant", "vu", "--mmd-share-time"), "cpu")   # IMM: per group
    assert (t.view(6, 2) == t.view(6, 2)[:, :1]).all() and (s.view(6, 2) == s.view(6, 2)[:, :1]).all()
    assert len(set(t.tolist())) == 6


def test_mmd_is_zero_for_identical_sets_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    G, m, D = 16, 4, 5
    x = torch.randn(G * m, D, generator=g, dtype=torch.float64)
    t = 0.2 + 0.6 * torch.rand(G * m, generator=g, dtype=torch.float64)
    s = torch.full_like(t, T0)
    lam = torch.rand(G * m, generator=g, dtype=torch.float64) + 0.5
    for sigma in (0.05, math.inf):
        same = gcm.time_aware_mmd(x, x.clone(), t, t.clone(), s, lam, m, sigma)
        assert same.abs().max() < 1e-12
        moved = gcm.time_aware_mmd(x, x + 0.1, t, t.clone(), s, lam, m, sigma)   # shifted particles
        assert (moved > 1e-3).all()
        other = gcm.time_aware_mmd(x, torch.randn(G * m, D, generator=g, dtype=torch.float64), t, t, s,
                                   torch.ones_like(lam), m, sigma)              # another sample
        assert (other > 0).all()
    # one particle per group: 2 lam ||g_t - g_r|| exp(-|t - r| / sigma), the l2 loss up to that factor
    r = t - 0.01
    single = gcm.time_aware_mmd(x, x + 0.1, t, r, s, lam, 1, 0.05)
    assert torch.allclose(single, 2 * lam * 0.1 * math.sqrt(D) * math.exp(-0.01 / 0.05))
    # Eq. (40)'s particles: g_t has g(x_t, t, s)'s value and g_t - g_r = (t - r) E of Eq. (39)
    F_t, F_r = torch.randn(G * m, D, generator=g), torch.randn(G * m, D, generator=g)
    x_t, u, tt, ss = x.float(), torch.randn(G * m, D, generator=g), t.float(), s.float()
    rr = tt - 0.01
    x_r = x_t - 0.01 * u
    g_t, g_r = gcm.mmd_particles(x_t, x_r, F_t, F_t, F_r, tt, ss, rr)
    assert torch.allclose(g_t, x_t + (ss - tt)[:, None] * F_t, atol=1e-6)
    E = gcm.consistency_residual(u, F_t, F_t, F_r, tt, ss, rr)
    assert torch.allclose(g_t - g_r, (tt - rr)[:, None] * E, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.05, 0.1])
def test_mmd_at_exact_particles_with_r_below_t(sigma):
    """At the exact flow map g(x_t, t, s) = g(x_r, r, s): the particles agree, g_t^j = g_r^j, while
    r = t - h(t) != t. Eq. (46) as printed (one time factor per pair) is then zero for every group; the
    per-particle-time form (Eq. 44 on each compared pair) is not, and can have either sign."""
    g = torch.Generator().manual_seed(1)
    G, m, D = 64, 4, 16
    particles = torch.randn(G * m, D, generator=g, dtype=torch.float64)
    t = 0.1 + 0.8 * torch.rand(G * m, generator=g, dtype=torch.float64)
    r = t - gcm.STEP_SIZES["exp"](t, 0.005, 3.5)
    s = T0 + (t - T0) * 0.5 * torch.rand(G * m, generator=g, dtype=torch.float64)     # VU: s varies too
    lam = 0.5 + torch.rand(G * m, generator=g, dtype=torch.float64)
    pair = gcm.time_aware_mmd(particles, particles.clone(), t, r, s, lam, m, sigma)
    per_particle = gcm.time_aware_mmd(particles, particles.clone(), t, r, s, lam, m, sigma, "particle")
    print(f"sigma {sigma}: Eq. (46) {pair.abs().max():.1e}, per-particle times {per_particle.abs().max():.1e}")
    assert pair.abs().max() < 1e-12
    assert per_particle.abs().max() > 1e-4
    # away from the solution the printed form is a loss again: particles of another sample score higher
    other = gcm.time_aware_mmd(particles, particles + 0.2, t, r, s, lam, m, sigma)
    assert other.mean() > 0.01


def test_sampling_time_lists():
    assert gcm.sampling_times(1, T0, TT, 0.6) == [TT, T0]
    assert gcm.sampling_times(2, T0, TT, 0.6) == pytest.approx([TT, 0.6, T0])
    assert gcm.sampling_times(4, T0, TT, 0.6) == pytest.approx([TT, 0.6, 0.402, 0.204, T0])


def test_samplers_with_the_exact_flow_map():
    """Pushforward composes flow maps: any time list gives Phi_{tT->t0} exactly. Restart re-noises
    with fresh noise: with the exact map every jump lands on the data law N(MU, STD^2)."""
    x = TT * torch.randn(20_000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    direct = FLOW.flow_map(x, torch.full((len(x),), TT, dtype=torch.float64), torch.full((len(x),), T0, dtype=torch.float64))
    for nfe in (1, 2, 4):
        times = gcm.sampling_times(nfe, T0, TT, 0.6)
        assert torch.allclose(gcm.sample_pushforward(exact_f, x, times), direct, atol=1e-10)
        calls = []

        def counted(*a):
            calls.append(1)
            return exact_f(*a)
        g = torch.Generator().manual_seed(1)
        out = gcm.sample_restart(counted, x, times, lambda: torch.randn(x.shape, generator=g, dtype=torch.float64))
        assert len(calls) == nfe
        assert (out.mean(0) - (1 - T0) * MU).abs().max() < 0.02 and (out.std(0) - (1 - T0) * STD).abs().max() < 0.02


def toy_run(tmp_path, name, args):
    """The toy preset on 8gaussians. (On the checkerboard, 1500 steps leave VU's 2-step pushforward at
    about 0.5x the prior's SWD: its first jump, tT -> t1 = 0.6, needs s = 0.6, which Eq. (17) with
    nu = 4 draws with probability ~3e-3, so that jump is barely trained at this budget.)"""
    out = tmp_path / name
    gcm.main(["--dataset", "8gaussians", "--out", str(out)] + args)
    ev = json.load(open(out / "eval.json"))
    data = np.load(out / "samples" / "data.npy")
    prior = common.sliced_wasserstein(torch.randn(len(data), 2, generator=torch.Generator().manual_seed(0)),
                                      torch.from_numpy(data))
    return out, ev["swd"], prior


@pytest.mark.parametrize("variant", ["cu", "vu"])
def test_toy_run_beats_the_prior(tmp_path, variant):
    out, swd, prior = toy_run(tmp_path, variant, ["--variant", variant, "--steps", "1500"])
    print(f"{variant}: SWD 1-step {swd['1']:.4f}, 2-step {swd['2']:.4f}, 4-step {swd['4']:.4f}; prior {prior:.4f}")
    assert swd["1"] < 0.4 * prior and swd["2"] < 0.4 * prior          # prior ~0.31, data-vs-data ~0.05
    assert np.load(out / "samples" / "nfe1.npy").shape == (4096, 2)
    assert (out / "samples" / "step1500_nfe2.png").exists() and (out / "config.json").exists()
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[-1]["step"] == 1500 and {"loss", "residual", "grad_norm", "sec_per_step"} <= set(log[-1])
    if variant == "cu":   # --sample-only from the checkpoint reproduces the evaluation without training
        gcm.main(["--sample-only", "--ckpt", str(out / "ckpt.pt"), "--out", str(tmp_path / "s"), "--nfe", "1"])
        again = json.load(open(tmp_path / "s" / "eval.json"))
        assert again["swd"]["1"] == pytest.approx(swd["1"], abs=1e-9)
        assert (tmp_path / "s" / "samples" / "sample_nfe1.png").exists()


@pytest.mark.parametrize("args", [[], ["--variant", "vu", "--jvp", "analytic", "--mmd-group", "1"]])
def test_one_dit_image_step(tmp_path, cifar_root, args):
    out = tmp_path / "img"
    gcm.main(["--dataset", "cifar10", "--data-path", cifar_root,
              "--eval-samples", "8", "--model", "DiT-T/2", "--steps", "2",
              "--batch-size", "4", "--n", "4", "--log-every", "1", "--out", str(out)] + args)
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 2 and all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in log)
    assert (out / "samples" / "step2_nfe2.png").exists()
    assert load_state(out / "ckpt.pt")["step"] == 2


def test_resume_is_bit_identical(tmp_path):
    args = ["--dataset", "moons", "--variant", "vu", "--batch-size", "32", "--eval-samples", "64", "--nfe", "1",
            "--log-every", "2", "--dropout", "0.1", "--curriculum", "--curriculum-every", "2"]
    gcm.main(args + ["--steps", "6", "--out", str(tmp_path / "a")])
    gcm.main(args + ["--steps", "3", "--out", str(tmp_path / "b")])
    gcm.main(args + ["--steps", "6", "--out", str(tmp_path / "b"), "--resume"])
    a, b = load_state(tmp_path / "a" / "ckpt.pt"), load_state(tmp_path / "b" / "ckpt.pt")
    assert a["step"] == b["step"] == 6
    a.pop("cfg"), b.pop("cfg")
    assert_states_equal(a, b)


def test_ddp_step(tmp_path, run_torchrun):
    check_ddp_step(run_torchrun, tmp_path, "gcm", ["cu-l2", "vu-mmd", "analytic", "imm"])


@pytest.mark.parametrize("args,message", [
    (["--dataset", "moons", "--batch-size", "30"], "--mmd-group 4 does not divide the per-process micro-batch 30"),
    (["--dataset", "moons", "--p-diag", "0.5"], "use --variant vu"),
    (["--dataset", "moons", "--sampler", "pushforward"], "use --variant vu"),
    (["--dataset", "moons", "--jvp", "analytic"], "use --mmd-group 1"),
    (["--dataset", "moons", "--t1", "0.999"], "need 0 <= t0 < t1 < tT <= 1"),
    (["--dataset", "moons", "--t-dist", "cosh", "--dist-a", "1", "--dist-b", "1"], "needs a != b"),
    (["--dataset", "moons", "--h", "bogus"], "invalid choice"),
    (["--sample-only", "--ckpt", "/nonexistent.pt"], "checkpoint not found"),
])
def test_bad_input_is_one_line(args, message, capsys, tmp_path):
    code, err = run_cli(gcm.main, args + ["--out", str(tmp_path / "bad")], capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_script_entry_point():
    res = subprocess.run([sys.executable, "gcm.py", "--dataset", "moons", "--mmd-group", "0"], cwd=ROOT,
                         capture_output=True, text=True, env=cpu_env())
    assert res.returncode == 2 and res.stderr.strip().splitlines() == ["error: --mmd-group must be at least 1, got 0"]
