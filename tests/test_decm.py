"""decm.py: the CD and N2N residuals against the exact Gaussian flow map (and the literal Algorithm-1
form that does not vanish), the JVP tangents against finite differences, guidance, the samplers on
the exact map, a teacher-then-student toy run, one DiT step, bit-identical resume and DDP steps."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch

import common
import decm
import dit
from conftest import ROOT, assert_states_equal, check_ddp_step, cpu_env, load_state, run_cli

MU, STD = torch.tensor([1.0, -0.5, 0.3]), 0.6
FLOW = common.GaussianFlow(decm.INTERP, MU, STD)            # z_t = (1-t) z + t x, x ~ N(MU, STD^2 I)


def exact_F(x, t, s, y=None, flow=FLOW):
    """Eq. (9) solved for F on the exact PF-ODE map; at s = t its limit, the velocity."""
    gap = s - t
    safe = torch.where(gap == 0, torch.ones_like(gap), gap)
    F_map = (flow.flow_map(x, t, s) - x) / common.bcast(safe, x)
    return torch.where(common.bcast(gap == 0, x), flow.velocity(x, t), F_map)


def exact_v(x, t, y=None):
    return FLOW.velocity(x, t)


def draws(n=512, seed=0, t_lo=0.0, t_hi=0.9, flow=FLOW):
    g = torch.Generator().manual_seed(seed)
    x = flow.sample_data(n, g).double()
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    t = t_lo + (t_hi - t_lo) * torch.rand(n, generator=g, dtype=torch.float64)
    r = 0.05 * torch.rand(n, generator=g, dtype=torch.float64)
    return x, z, t, torch.minimum(r, t)


def student_cfg(**kw):
    cfg = {**decm.DEFAULTS, **decm.ROLE_DEFAULTS["student"], "losses": ["fm", "cd", "n2n"]}
    cfg.update(kw)
    return cfg


# ----------------------------------------------------------------------------------------------
# Closed-form oracle: the exact flow map and the exact teacher make every residual vanish

def test_cm_residual_vanishes_on_the_exact_flow_map():
    x, z, t, _ = draws()
    z_t = decm.INTERP(x, z, t)[0]
    F_minus, g = decm.cm_residual(exact_F, z_t, t, exact_v(z_t, t))
    assert torch.allclose(F_minus, exact_F(z_t, t, torch.ones_like(t)))
    assert g.abs().max() < 1e-10
    # a wrong map (F off by 10% of its value) or a wrong velocity (conditional x - z) leaves a residual
    assert decm.cm_residual(lambda *a: 1.1 * exact_F(*a), z_t, t, exact_v(z_t, t))[1].pow(2).mean().sqrt() > 0.05
    assert decm.cm_residual(exact_F, z_t, t, x - z)[1].pow(2).mean().sqrt() > 0.3


def test_cd_fm_loss_is_zero_at_the_exact_solution():
    """The whole l.8-15 wiring (the batched F(z_t,t,1) / F(z_t,t,t) call, w_1, adaptive weighting,
    MSE + cosine) gives 0 at the exact map with the exact teacher, and not at a perturbed one."""
    x, z, t, _ = draws()
    z_t = decm.INTERP(x, z, t)[0]
    batch = dict(z_t=z_t, t=t, v_t=exact_v(z_t, t))
    for w1 in ("1", "1-t"):
        out = decm.cd_fm_loss(exact_F, batch, None, student_cfg(w1=w1))
        assert out["cm"] < 1e-15 and out["fm"] < 1e-12 and out["g_cm"] < 1e-10
    wrong = decm.cd_fm_loss(lambda *a, y=None: exact_F(*a) + 0.1, batch, None, student_cfg())
    assert wrong["cm"] > 1e-3 and wrong["fm"] > 1e-3


@pytest.mark.parametrize("lam,gam", [(1.0, 1.0), (2.0, 0.5), (0.3, 1.7)])
def test_n2n_residual_derived_vanishes_literal_does_not(lam, gam):
    """Default (derived, Eq. 14 with v_psi at f(z_r, r, t)): zero at the exact map for any lambda, gamma.
    Alg. 1 l.23 as printed: g_lit = gamma (v_psi - v_t) - (lambda - 1)(t - r) dF there, which is not
    zero because the teacher is read at the interpolant z_t, not at the flow map's image of z_r."""
    x, z, t, r = draws(t_lo=0.2, t_hi=1.0)
    z_r, z_t = decm.INTERP(x, z, r)[0], decm.INTERP(x, z, t)[0]
    v_r, v_t = exact_v(z_r, r), exact_v(z_t, t)
    F_minus, g = decm.n2n_residual(exact_F, exact_v, z_r, r, t, v_r, lam, gam)
    assert g.abs().max() < 1e-10
    _, g_lit = decm.n2n_residual(exact_F, exact_v, z_r, r, t, v_r, lam, gam, v_t=v_t, literal=True)
    _, dF = common.jvp(exact_F, (z_r, r, t), (lam * v_r, lam * torch.ones_like(r), -gam * torch.ones_like(t)))
    v_psi = exact_v(decm.flow_map(z_r, r, t, F_minus), t)
    assert torch.allclose(g_lit, gam * (v_psi - v_t) - (lam - 1) * common.bcast(t - r, dF) * dF, atol=1e-10)
    assert g_lit.pow(2).mean().sqrt() > 0.05
    print(f"lambda={lam} gamma={gam}: RMS g derived {g.pow(2).mean().sqrt():.2e}, literal {g_lit.pow(2).mean().sqrt():.3f}")


def test_literal_n2n_is_exact_only_for_straight_trajectories():
    """With point-mass data every PF-ODE path is the straight interpolation line, so z_t = f(z_r, r, t)
    and the literal l.23 form (lambda = 1) vanishes too: it is the straight-line approximation."""
    point = common.GaussianFlow(decm.INTERP, MU, 0.0)
    x, z, t, r = draws(t_lo=0.2, t_hi=0.95, flow=point)
    z_r, z_t = decm.INTERP(x, z, r)[0], decm.INTERP(x, z, t)[0]

    def F(a, b, c, y=None):
        return exact_F(a, b, c, flow=point)
    _, g_lit = decm.n2n_residual(F, lambda a, b: point.velocity(a, b), z_r, r, t, point.velocity(z_r, r), 1.0,
                                 0.7, v_t=point.velocity(z_t, t), literal=True)
    assert g_lit.abs().max() < 1e-9


def test_n2n_fm_loss_is_zero_at_the_exact_solution():
    x, z, t, r = draws(t_lo=0.2, t_hi=1.0)
    z_r, z_t = decm.INTERP(x, z, r)[0], decm.INTERP(x, z, t)[0]
    batch = dict(z_r=z_r, r=r, t=t, z_t=z_t, v_r=exact_v(z_r, r), v_t=exact_v(z_t, t))
    for w2 in ("1", "t-r"):
        out = decm.n2n_fm_loss(exact_F, exact_v, batch, None, student_cfg(w2=w2, lam=1.5, gamma=0.5))
        assert out["n2n"] < 1e-15 and out["fm_n2n"] < 1e-12
    lit = decm.n2n_fm_loss(exact_F, exact_v, batch, None, student_cfg(n2n_form="literal"))
    assert lit["n2n"] > 1e-3


# ----------------------------------------------------------------------------------------------
# JVP tangents against finite differences, on a network that is not a flow map

def random_net(seed=0, **kw):
    torch.manual_seed(seed)
    net = dit.build_model("MLP", (3,), hidden_size=32, depth=2, two_times=True, time_scale=10.0, **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net.double().eval().requires_grad_(False)


def test_cm_tangent_matches_finite_differences():
    """g_cm is minus the derivative of f(z_t + e v, t + e, 1) in e: checked by central differences."""
    net = random_net()
    _, z, t, _ = draws(64)
    v = torch.randn_like(z)
    _, g = decm.cm_residual(lambda a, b, c: net(a, b, c), z, t, v)
    one, e = torch.ones_like(t), 1e-5

    def f(h):
        return decm.flow_map(z + h * v, t + h, one, net(z + h * v, t + h, one))
    fd = (f(e) - f(-e)) / (2 * e)
    assert g.abs().mean() > 0.1
    assert (g + fd).abs().max() < 1e-6 * max(1.0, float(fd.abs().max()))


def test_n2n_tangent_matches_finite_differences():
    """g_n2n = gamma (d/dt f(z_r, r, t) - v_psi) - lambda d/de f(z_r + e v_r, r + e, t): the two
    end-point identities, each by central differences, recombine into the JVP-based residual."""
    net, teacher = random_net(0), random_net(1)
    _, z, t, r = draws(64, t_lo=0.2, t_hi=1.0)
    v_r = torch.randn_like(z)
    lam, gam, e = 1.3, 0.6, 1e-5

    def velocity(a, b):
        return teacher(a, b, b)
    F_minus, g = decm.n2n_residual(lambda a, b, c: net(a, b, c), velocity, z, r, t, v_r, lam, gam)

    def f(a, b, c):
        return decm.flow_map(a, b, c, net(a, b, c))
    left = (f(z + e * v_r, r + e, t) - f(z - e * v_r, r - e, t)) / (2 * e)
    right = (f(z, r, t + e) - f(z, r, t - e)) / (2 * e)
    fd = gam * (right - velocity(f(z, r, t), t)) - lam * left
    assert g.abs().mean() > 0.1
    assert (g - fd).abs().max() < 1e-6 * max(1.0, float(fd.abs().max()))


# ----------------------------------------------------------------------------------------------
# Pieces: guidance, losses, schedules, the student's start

def test_velocity_normalization_and_plain_cfg():
    torch.manual_seed(0)
    m = dit.build_model("MLP", (2,), num_classes=3, hidden_size=32, depth=2).eval()
    torch.nn.init.normal_(m.out.weight, std=0.5)
    torch.nn.init.normal_(m.cond.y_embedder.table.weight, std=1.0)     # labels that matter
    x, t, y = torch.randn(16, 2), torch.rand(16), torch.randint(0, 3, (16,))
    v_c, v_u = m(x, t, y=y), m(x, t, y=torch.full_like(y, 3))
    plain = decm.guided_velocity(m, x, t, y, 1.75, normalize=False)
    assert torch.allclose(plain, v_c + 0.75 * (v_c - v_u), atol=1e-6)              # Eq. (18)
    normed = decm.guided_velocity(m, x, t, y, 1.75, eta=0.4)
    step = normed - v_c                                                           # l.6: (w - 1) eta unit direction
    assert torch.allclose(step.pow(2).mean(1).sqrt(), torch.full((16,), 0.75 * 0.4), atol=1e-5)
    assert torch.allclose(torch.nn.functional.cosine_similarity(step, v_c - v_u), torch.ones(16), atol=1e-5)
    assert torch.equal(decm.guided_velocity(m, x, t, y, 1.0), v_c)


def test_adaptive_and_cosine_losses():
    pred, target = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    d = (pred - target).pow(2).mean((1, 2, 3))
    assert torch.isclose(decm.adaptive_loss(pred - target, 0.5, 1e-3), (d / (d + 1e-3).sqrt()).mean())
    assert torch.isclose(decm.adaptive_loss(pred - target, 0.0, 1e-3), d.mean())
    assert torch.allclose(decm.cosine_loss(pred, pred), torch.zeros(8), atol=1e-6)
    assert torch.allclose(decm.cosine_loss(pred, -2 * pred), torch.full((8,), 2.0), atol=1e-6)
    # channels only: scaling one pixel's channel vector changes nothing
    scaled = pred.clone()
    scaled[:, :, 0, 0] *= 5
    assert torch.allclose(decm.cosine_loss(scaled, pred), torch.zeros(8), atol=1e-6)


def test_cosine_loss_of_one_channel_images_has_a_gradient():
    """Eq. (17)'s cosine on one-channel images (digits): per pixel it would be the sign agreement of two
    numbers, 0 or 2 with zero gradient, adding about 1 to the logged loss. It is taken over the whole sample
    instead: it equals 1 - cos of the flattened images, vanishes at the target, and has a gradient."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(6, 1, 8, 8, generator=g).requires_grad_()
    target = torch.randn(6, 1, 8, 8, generator=g)
    loss = decm.cosine_loss(pred, target)
    flat = 1 - torch.nn.functional.cosine_similarity(pred.flatten(1), target.flatten(1), dim=1)
    assert torch.allclose(loss, flat, atol=1e-6)
    loss.sum().backward()
    assert pred.grad.abs().max() > 1e-3
    assert torch.allclose(decm.cosine_loss(3 * target, target), torch.zeros(6), atol=1e-6)
    per_pixel = 1 - torch.nn.functional.cosine_similarity(pred, target, dim=1)          # what it replaced
    assert set(per_pixel.detach().round().unique().tolist()) <= {0.0, 2.0}


def test_consistency_residual_cancels_the_prediction():
    """v^tar = sg(F) - w g with sg(F) the prediction's own detached value: the residual's value is w g exactly
    (whatever the prediction's precision: a bf16 prediction included) and its gradient is that of F."""
    F_pred = torch.randn(5, 1, 4, 4).to(torch.bfloat16).requires_grad_()
    g, w = 1e-6 * torch.randn(5, 1, 4, 4), torch.rand(5)
    res = decm.consistency_residual(F_pred, g, w)
    assert res.dtype == torch.float32 and torch.equal(res.detach(), common.bcast(w, g) * g)
    res.sum().backward()
    assert torch.equal(F_pred.grad, torch.ones_like(F_pred))


def test_time_schedules():
    torch.manual_seed(0)
    seg = decm.time_schedule(student_cfg(t_schedule="segments", segments=16)).sample(4000)
    assert set((seg * 16).round().int().tolist()) == set(range(17)) and torch.allclose(seg * 16, (seg * 16).round())
    arctan = decm.time_schedule(student_cfg(t_schedule="arctan", t_mean=0.3, t_std=1.2))
    sample = arctan.sample(4000).double()
    assert scipy.stats.kstest(sample.numpy(), lambda u: arctan.cdf(torch.as_tensor(u)).numpy()).pvalue > 0.01
    assert scipy.stats.kstest(sample.numpy(), lambda u: decm.ArctanNormal(0.8, 1.2).cdf(torch.as_tensor(u)).numpy()).pvalue < 1e-6


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A small flow-matching teacher on moons, trained by decm.py itself (--losses fm)."""
    out = tmp_path_factory.mktemp("teacher")
    decm.main(["--dataset", "moons", "--losses", "fm", "--steps", "30", "--batch-size", "64", "--nfe", "1",
               "--eval-samples", "64", "--log-every", "10", "--out", str(out)])
    return str(out / "ckpt.pt")


def test_student_starts_as_the_teacher(teacher_ckpt, tmp_path):
    cfg = decm.parse_config(["--dataset", "moons", "--teacher", teacher_ckpt, "--out", str(tmp_path)])
    assert cfg["role"] == "student" and cfg["time_scale"] == 10.0
    data = common.load_dataset("moons")
    teacher, init = decm.load_teacher(cfg, data)
    student = decm.build_net(cfg, data, "student")
    dit.load_backbone(student, init)
    x, t = torch.randn(32, 2), torch.rand(32)
    assert teacher(x, t).abs().mean() > 1e-2
    for s in (torch.rand(32), torch.ones(32), t):
        assert torch.equal(student(x, t, s), teacher(x, t))


# ----------------------------------------------------------------------------------------------
# Samplers on the exact flow map

def test_samplers_on_the_exact_map():
    """With the exact F, every CM and flow-map-first Mix sample is distributed as the data (re-noising
    lands on the marginal p_t; the flow-map steps are the PF-ODE itself). The paper's Mix takes Euler steps
    on F(x, t, t) first: exactly one Euler step of the exact velocity, then CM steps. Euler converges to
    the PF-ODE at first order."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 3, generator=g, dtype=torch.float64)
    for nfe in (1, 2, 4):
        for name in ("cm", "mix-flowmap"):
            x = decm.SAMPLERS[name](exact_F, z, nfe, None, g)
            assert (x.mean(0) - MU).abs().max() < 0.02 and (x.std(0) - STD).abs().max() < 0.02, (name, nfe)
    zero, one = torch.zeros(64, dtype=torch.float64), torch.ones(64, dtype=torch.float64)
    x = decm.sample_mix(exact_F, z[:64], 4, None, g, split=3, first="flowmap")   # 3 exact jumps, one CM step
    z75 = FLOW.flow_map(z[:64], zero, 0.75 + zero)
    assert torch.allclose(x, FLOW.flow_map(z75, 0.75 + zero, one), atol=1e-10)
    assert torch.allclose(decm.SAMPLERS["mix-flowmap"](exact_F, z[:64], 2, None, g), FLOW.flow_map(z[:64], zero, one))
    # the paper's Mix (Fig. 5c): Euler from 0 to 1/2 with F(x, 0, 0) = v(x, 0), then the CM map from 1/2
    euler_half = z[:64] + 0.5 * FLOW.velocity(z[:64], zero)
    assert torch.allclose(decm.sample_mix(exact_F, z[:64], 2, None, g), FLOW.flow_map(euler_half, 0.5 + zero, one))
    x = decm.sample_mix(exact_F, z[:64], 4, None, g, split=3)
    path = z[:64]
    for i in range(3):
        path = path + 0.25 * FLOW.velocity(path, i / 4 + zero)
    assert torch.allclose(x, FLOW.flow_map(path, 0.75 + zero, one), atol=1e-10)
    exact = FLOW.flow_map(z[:2000], torch.zeros(2000), torch.ones(2000))
    err = [(decm.sample_euler(exact_F, z[:2000], n) - exact).abs().mean() for n in (32, 64)]
    assert err[1] < 0.02 and 1.8 < err[0] / err[1] < 2.2                      # first order


# ----------------------------------------------------------------------------------------------
# Training runs

def test_teacher_then_student_on_toy_data(tmp_path):
    """`decm.py --dataset checkerboard` trains the FM teacher (OUT/teacher), then the DE-CM student from
    it. 1- and 2-step samples beat the noise prior by a wide margin, and so do both Mix samplers at 4 NFE.
    (Whether Mix beats CM, as the paper's Table 4 finds on ImageNet, the benchmark reports: at this scale the
    margins are within the run-to-run noise.)"""
    out = tmp_path / "run"
    decm.main(["--dataset", "checkerboard", "--teacher-steps", "800", "--steps", "600", "--batch-size", "128",
               "--ema-decay", "0.99", "--samplers", "cm", "mix", "mix-flowmap", "euler", "--out", str(out)])
    ev = json.load(open(out / "eval.json"))
    data = np.load(out / "samples" / "data.npy")
    prior = common.sliced_wasserstein(torch.randn(len(data), 2, generator=torch.Generator().manual_seed(0)),
                                      torch.from_numpy(data))
    print(f"prior {prior:.4f} teacher Euler-4 {json.load(open(out / 'teacher' / 'eval.json'))['swd']['4']:.4f}; "
          "student " + " ".join(f"{k}={v}" for k, v in ev.items()))
    assert ev["swd"]["1"] < 0.4 * prior and ev["swd"]["2"] < 0.4 * prior
    assert ev["swd_mix"]["4"] < 0.4 * prior and ev["swd_mix-flowmap"]["4"] < 0.4 * prior
    assert ev["swd"]["4"] == ev["swd_mix"]["4"] and ev["swd"]["1"] == ev["swd_cm"]["1"]
    cfg = json.load(open(out / "config.json"))
    assert cfg["role"] == "student" and cfg["losses"] == ["fm", "cd", "n2n"] and cfg["t_schedule"] == "segments"
    assert cfg["teacher"] == str(out / "teacher" / "ckpt.pt")
    assert json.load(open(out / "teacher" / "config.json"))["role"] == "teacher"
    log = [json.loads(l) for l in open(out / "log.jsonl")]
    assert log[-1]["step"] == 600 and {"cm", "fm", "n2n", "fm_n2n", "grad_norm", "grad_norm_n2n"} <= set(log[-1])
    assert (out / "samples" / "step600_mix_nfe4.png").exists() and (out / "samples" / "nfe1.npy").exists()
    # --sample-only from the checkpoint reproduces the evaluation without training
    decm.main(["--sample-only", "--ckpt", str(out / "ckpt.pt"), "--out", str(tmp_path / "s"), "--nfe", "1"])
    again = json.load(open(tmp_path / "s" / "eval.json"))
    assert again["swd"]["1"] == pytest.approx(ev["swd"]["1"], abs=1e-9)


def test_from_scratch_run(tmp_path):
    """--teacher-steps 0: no teacher at all, v_t = v_r = x - z and v_psi from the student itself."""
    decm.main(["--dataset", "moons", "--teacher-steps", "0", "--steps", "4", "--freq", "2", "--batch-size", "32",
               "--eval-samples", "64", "--log-every", "1", "--out", str(tmp_path)])
    assert json.load(open(tmp_path / "config.json"))["teacher"] is None and not (tmp_path / "teacher").exists()
    log = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert len(log) == 4 and all(np.isfinite(r["cm"]) and np.isfinite(r["n2n"]) for r in log)
    assert "swd_mix" in json.load(open(tmp_path / "eval.json"))


def test_one_dit_image_step(tmp_path, cifar_root):
    """DiT-T/2 on images, class-conditional: a 1-step teacher, then 2 student iterations with CFG and
    velocity normalization, N2N every iteration (two updates each)."""
    common_args = ["--dataset", "cifar10", "--data-path", cifar_root,
              "--eval-samples", "8", "--batch-size", "4", "--n", "4",
                   "--log-every", "1", "--class-cond"]
    decm.main(common_args + ["--model", "DiT-T/2", "--losses", "fm", "--steps", "1", "--nfe", "2",
                             "--out", str(tmp_path / "t")])
    out = tmp_path / "s"
    decm.main(common_args + ["--teacher", str(tmp_path / "t" / "ckpt.pt"), "--steps", "2", "--freq", "1",
                             "--w-cfg", "1.5", "--nfe", "1", "4", "--samplers", "mix", "--out", str(out)])
    log = [json.loads(l) for l in open(out / "log.jsonl")]
    assert len(log) == 2 and all(np.isfinite(r[k]) for r in log for k in ("cm", "fm", "n2n", "fm_n2n"))
    assert json.load(open(out / "config.json"))["model"] == "DiT-T/2"       # inherited from the teacher
    assert (out / "samples" / "step2_nfe4.png").exists() and (out / "samples" / "step2_mix_nfe1.png").exists()
    assert load_state(out / "ckpt.pt")["step"] == 2


def test_resume_is_bit_identical(teacher_ckpt, tmp_path):
    """7 iterations (N2N at 0, 3, 6) straight through, or 4 then --resume: the same bits."""
    common_args = ["--dataset", "moons", "--teacher", teacher_ckpt, "--batch-size", "32", "--eval-samples", "64",
                   "--log-every", "2", "--nfe", "1"]
    decm.main(common_args + ["--steps", "7", "--out", str(tmp_path / "a")])
    decm.main(common_args + ["--steps", "4", "--out", str(tmp_path / "b")])
    decm.main(common_args + ["--steps", "7", "--out", str(tmp_path / "b"), "--resume"])
    a, b = load_state(tmp_path / "a" / "ckpt.pt"), load_state(tmp_path / "b" / "ckpt.pt")
    assert a["step"] == b["step"] == 7
    a.pop("cfg"), b.pop("cfg")
    assert_states_equal(a, b)


def test_ddp_step(tmp_path, run_torchrun):
    check_ddp_step(run_torchrun, tmp_path, "decm", ["cd-fm", "n2n-fm", "cfg-cd-fm", "cfg-n2n-fm", "scratch-n2n-fm",
                                                    "teacher"])


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2

def test_bad_teacher_checkpoints(teacher_ckpt, tmp_path, capsys):
    other = tmp_path / "other.pt"
    common.save_checkpoint(str(other), {"cfg": {"method": "direct"}})
    student_dir = tmp_path / "student"
    decm.main(["--dataset", "moons", "--teacher", teacher_ckpt, "--steps", "1", "--batch-size", "8",
               "--eval-samples", "8", "--nfe", "1", "--samplers", "--out", str(student_dir)])
    broken = tmp_path / "broken.pt"
    state = load_state(teacher_ckpt)
    state["ema"] = {k: v[..., :1] if v.dim() else v for k, v in state["ema"].items()}
    common.save_checkpoint(str(broken), state)
    cases = [(["--teacher", str(other)], "written by direct.py, not decm.py"),
             (["--teacher", str(student_dir / "ckpt.pt")], "is a DE-CM student"),
             (["--teacher", teacher_ckpt, "--model", "DiT-T/2"], "conflicts with the teacher"),
             (["--teacher", str(broken)], "does not fit this model")]
    for args, message in cases:
        code, err = run_cli(decm.main, ["--dataset", "moons", "--out", str(tmp_path / "x")] + args, capsys)
        assert code == 2 and len(err) == 1 and message in err[0], err
    code, err = run_cli(decm.main, ["--dataset", "checkerboard", "--teacher", teacher_ckpt], capsys)
    assert code == 2 and len(err) == 1 and "trained on moons" in err[0], err


@pytest.mark.parametrize("args,message", [
    (["--dataset", "moons", "--losses", "fm,xx"], "--losses takes"),
    (["--dataset", "moons", "--freq", "0"], "--freq must be"),
    (["--dataset", "moons", "--r-max", "1.5"], "--r-max must"),
    (["--dataset", "moons", "--mix-split", "0"], "--mix-split must"),
    (["--dataset", "moons", "--teacher-steps", "-1"], "--teacher-steps must"),
    (["--dataset", "moons", "--losses", "fm", "--w-cfg", "2"], "class-conditional"),
    (["--dataset", "moons", "--class-cond", "--teacher-steps", "0", "--w-cfg", "2"], "give --teacher"),
    (["--dataset", "moons", "--samplers", "ddim"], "invalid choice"),
    (["--dataset", "moons", "--resume", "--out", "/nonexistent/run"], "no checkpoint"),
    (["--sample-only", "--ckpt", "/nonexistent.pt"], "checkpoint not found"),
])
def test_bad_input_is_one_line(args, message, capsys):
    code, err = run_cli(decm.main, args, capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_script_entry_point():
    res = subprocess.run([sys.executable, "decm.py", "--dataset", "moons", "--freq", "0"], cwd=ROOT,
                         capture_output=True, text=True, env=cpu_env())
    assert res.returncode == 2 and res.stderr.strip().splitlines() == ["error: --freq must be >= 1, got 0"]


# ----------------------------------------------------------------------------------------------
# Velocity normalisation with a calibrated eta (Alg. 1 l.6), and FACM's options

def wake(module, std=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() and not p.any():                       # the zero-initialised layers: labels matter
                p.copy_(std * torch.randn(p.shape, generator=g))
    return module


def test_calibrated_eta_gives_normalised_guidance_the_size_of_plain_cfg():
    """With eta = the teacher's mean RMS of v_cond - v_uncond (measured on training data at training
    times), the normalised guidance term (w - 1) eta d / RMS(d) has on average the RMS of plain CFG's
    (w - 1) d, on fresh batches; with eta = 1 it would be w - 1 per element whatever d is. The measurement
    leaves the global RNG where it was."""
    torch.manual_seed(0)
    teacher = wake(dit.build_model("DiT-T/2", (1, 8, 8), num_classes=10, time_scale=10.0)).eval()
    data = common.Digits("train")
    cfg = {**decm.DEFAULTS, **decm.ROLE_DEFAULTS["student"], "t_mean": 0.0, "t_std": 1.0}
    state = torch.get_rng_state()
    eta = decm.calibrate_eta(teacher, data, cfg, torch.device("cpu"), batches=4)
    assert torch.equal(torch.get_rng_state(), state)
    g = torch.Generator().manual_seed(5)
    x, y = data.get(torch.randint(0, len(data), (256,), generator=g))
    z = torch.randn(x.shape, generator=g)
    t = decm.time_schedule(cfg).sample(256)
    z_t = decm.INTERP(x, z, t)[0]
    with torch.no_grad():
        v_cond = teacher(z_t, t, y=y)
        terms = {norm: decm.guided_velocity(teacher, z_t, t, y, 2.0, eta, norm) - v_cond for norm in (False, True)}
        unit = decm.guided_velocity(teacher, z_t, t, y, 2.0, 1.0, True) - v_cond
    rms = {k: v.flatten(1).pow(2).mean(1).sqrt().mean() for k, v in terms.items()}
    print(f"eta {eta:.4f}; guidance term RMS: plain {rms[False]:.4f}, normalised {rms[True]:.4f}, eta=1 "
          f"{unit.pow(2).mean().sqrt():.4f}")
    assert 0.9 < rms[True] / rms[False] < 1.1
    assert unit.pow(2).mean().sqrt() > 10 * rms[False]         # the uncalibrated eta = 1 is far off


def test_calibrated_eta_is_logged_and_resumed(tmp_path):
    """eta "auto" is measured at the start, logged, kept in the checkpoint, and a guided student resumed
    half-way ends bit-identical to one trained in one go."""
    teacher = tmp_path / "t"
    decm.main(["--dataset", "moons", "--losses", "fm", "--class-cond", "--steps", "20", "--out", str(teacher),
               "--log-every", "10", "--eval-samples", "64"])
    common_args = ["--dataset", "moons", "--teacher", str(teacher / "ckpt.pt"), "--w-cfg", "1.5", "--log-every", "5",
                   "--ckpt-every", "5", "--eval-samples", "64"]
    decm.main(common_args + ["--steps", "10", "--out", str(tmp_path / "one")])
    decm.main(common_args + ["--steps", "5", "--out", str(tmp_path / "two")])
    decm.main(common_args + ["--steps", "10", "--out", str(tmp_path / "two"), "--resume"])
    one, two = load_state(tmp_path / "one" / "ckpt.pt"), load_state(tmp_path / "two" / "ckpt.pt")
    eta = one["guidance"]["eta"]
    logged = [json.loads(line)["eta"] for line in open(tmp_path / "one" / "log.jsonl")]
    assert isinstance(eta, float) and eta > 0 and logged == pytest.approx([eta, eta], rel=1e-6)
    assert_states_equal({k: v for k, v in one.items() if k != "cfg"}, {k: v for k, v in two.items() if k != "cfg"})


def test_facm_options():
    """FACM's w_1 = 1 - sqrt(t), its clip of g_cm to [-1, 1] in the CM target and its cos(pi t / 2) CM
    weight (all off by default), and the arctan-norm defaults (-0.8, 1.6) it uses."""
    t = torch.tensor([0.0, 0.25, 1.0])
    assert torch.allclose(decm.weight("1-sqrt(t)", t), torch.tensor([1.0, 0.5, 0.0]))
    g = torch.tensor([[3.0, -0.5], [-2.0, 0.2], [0.5, 4.0]])
    cfg = {"w1": "1", "clip_g": False}
    assert torch.equal(decm.cm_step(g, cfg), g)
    assert torch.equal(decm.cm_step(g, {**cfg, "clip_g": True}), g.clamp(-1, 1))
    default = decm.parse_config(["--dataset", "moons", "--teacher-steps", "0"])
    assert not default["clip_g"] and default["cm_weight"] == "1" and default["w1"] == "1"
    arctan = decm.parse_config(["--dataset", "moons", "--teacher-steps", "0", "--t-schedule", "arctan"])
    assert (arctan["t_mean"], arctan["t_std"]) == (-0.8, 1.6)
    sampler = decm.time_schedule(arctan)
    draws = sampler.sample(20_000)
    assert scipy.stats.kstest(draws.numpy(), lambda v: sampler.cdf(torch.as_tensor(v)).numpy()).pvalue > 1e-3
    tau = torch.log(torch.tan(math.pi / 2 * (1 - draws.double())))         # back to the normal: N(-0.8, 1.6^2)
    assert abs(tau.mean() + 0.8) < 0.05 and abs(tau.std() - 1.6) < 0.05
