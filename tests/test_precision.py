"""--bf16 keeps the maths (SPEC section 9, common.py "Precision"): for every method, at the closed-form
Gaussian solution, the target computed under bf16 autocast (on the CPU, as --bf16 runs it there) equals
the fp32 target to fp32 accuracy, not bf16's. The networks are tests/oracles.py's exact solutions, which
compute through a matrix product that autocast runs in bf16 like a real network's linear layers, so a
target pass left under autocast shows bf16 errors (printed in each test's docstring: before the fix).
Also: targets never see label dropout, and --bf16 runs on the CPU."""
import contextlib
import copy
import math

import pytest
import torch
import torch.nn as nn

import common
import decm
import direct
import dit
import gcm
import oracles as O
import scm

FP32 = contextlib.nullcontext


def wake(module, std=0.05, seed=0):
    """Random values for the zero-initialised layers (adaLN-Zero, final layer), so that every input,
    labels included, changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() and not p.any():
                p.copy_(std * torch.randn(p.shape, generator=g))
    return module


# ----------------------------------------------------------------------------------------------
# GCM: the Eq. (39) finite difference and the MMD particles

def gcm_setup(variant, seed=0):
    cfg = {**gcm.parse_config(["--dataset", "moons", "--variant", variant]), "sigma_d": 0.5}
    flow = O.gcm_flow()
    net = O.AffineOracle(O.gcm_net(flow, cfg), 8)
    g = torch.Generator().manual_seed(seed)
    n = 256
    x, z = O.images(n, seed), O.noise(n, seed + 1)
    t = 0.1 + 0.85 * torch.rand(n, generator=g)
    s = torch.full_like(t, cfg["t0"]) if variant == "cu" else cfg["t0"] + (t - cfg["t0"]) * torch.rand(n, generator=g)
    return cfg, flow, net, x, z, t, s


@pytest.mark.parametrize("variant", ["cu", "vu"])
def test_gcm_finite_difference_target_stays_fp32(variant):
    """The target part of Eq. (39), u + (s - r)/(t - r) (f-(x_t) - f-(x_r)), at eps = 0.005 with the exact
    velocity, and the MMD particles' difference: under bf16 they equal the fp32 values (computed without
    autocast) to fp32 round-off, and both are within fp32 accuracy (times the 1/h amplification) of float64.
    Before the fix (both passes under autocast) the error was 5.6 per sample against an O(h) residual of
    0.011."""
    cfg, flow, net, x, z, t, s = gcm_setup(variant)
    x_t, _ = gcm.INTERP(x, z, t)
    v = flow.velocity(x_t.double(), t.double()).float()
    r = gcm.discretize(t, s, 0.005, cfg)

    def target(ctx, dtype):
        f = lambda xx, tt, ss: gcm.f_theta(net, xx, tt, ss, cfg)                        # noqa: E731
        xt, vv, tt, ss, rr = (a.to(dtype) for a in (x_t, v, t, s, r))
        with ctx():
            F_t, F_t_minus, F_r, x_r = gcm.flow_pair(f, f, xt, vv, tt, ss, rr)
            k = torch.where((ss < rr) & (rr < tt), (ss - rr) / (tt - rr), 0.0)
            T = vv + common.bcast(k, vv) * (F_t_minus - F_r)                               # E + f(x_t, t, s)
            g_t, g_r = gcm.mmd_particles(xt, x_r, F_t, F_t_minus, F_r, tt, ss, rr)
            P = g_t - g_r - common.bcast(rr - tt, xt) * gcm.wide(F_t)                       # (t - r) T
        return T.double(), P.double()
    T16, P16 = target(O.bf16, torch.float32)
    T32, P32 = target(FP32, torch.float32)
    T64, P64 = target(FP32, torch.float64)
    per_sample = lambda a, b: (a - b).flatten(1).norm(dim=1)                              # noqa: E731
    print(f"GCM {variant}: Eq. (39) target, bf16 vs fp32 {per_sample(T16, T32).max():.1e}, "
          f"fp32 vs fp64 {per_sample(T32, T64).max():.1e} per sample")
    assert per_sample(T16, T32).max() < 1e-5 and per_sample(T32, T64).max() < 1e-2
    assert per_sample(P16, P32).max() < 1e-6 and per_sample(P32, P64).max() < 1e-4


def test_gcm_loss_under_bf16_matches_fp32():
    """gcm_losses end to end (l2 loss, CU): the logged residual ||E|| under bf16 differs from fp32 only by
    the bf16 rounding of the prediction f(x_t), not by an amplified target error."""
    cfg, flow, net, x, *_ = gcm_setup("cu")
    cfg = dict(cfg, mmd_group=1)
    res = {}
    for name, ctx in (("fp32", FP32), ("bf16", O.bf16)):
        torch.manual_seed(3)
        with ctx():
            res[name] = float(gcm.gcm_losses(net, gcm.draw(x, None, cfg), cfg, 0.005)["residual"])
    assert abs(res["bf16"] - res["fp32"]) < 0.02 * res["fp32"], res


# ----------------------------------------------------------------------------------------------
# sCM: sCD's tangent (continuous and discrete time)

def scm_setup(mode="scd", discrete=0):
    sigma_d = 0.5
    flow = O.trig_flow(sigma_d)
    student = O.AffineOracle(O.trig_consistency_F(flow, sigma_d), 8)
    teacher = O.AffineOracle(O.trig_teacher_F(flow, sigma_d), 8)
    cfg = {**scm.DEFAULTS, "mode": mode, "sigma_d": sigma_d, "adaptive_weight": False, "warmup_iters": 0,
           "discrete_steps": discrete, "P_mean": -0.4, "P_std": 1.0}
    return cfg, student, teacher


def test_scd_tangent_vanishes_under_bf16():
    """sCD with the exact consistency function and the exact teacher: df/dt = 0 along the PF-ODE, so the
    normalised tangent g/(||g|| + c) is zero up to fp32 round-off, under bf16 as in fp32. Before the fix
    (teacher velocity under autocast) its norm was 0.07 per sample at initialisation of a DiT student."""
    cfg, student, teacher = scm_setup()
    x0 = O.images(256)
    out = {}
    for name, ctx in (("fp32", FP32), ("bf16", O.bf16)):
        torch.manual_seed(0)
        with ctx():
            out[name] = math.sqrt(float(scm.scm_losses(student, None, scm.draw(x0, None, cfg), 10, cfg, teacher)["mse"]) * 64)
    print(f"sCD normalised tangent at the exact solution: fp32 {out['fp32']:.1e}, bf16 {out['bf16']:.1e}")
    assert out["fp32"] < 1e-4 and out["bf16"] < 1e-4


def test_scd_at_initialisation_is_zero_under_bf16():
    """A real DiT student equal to its teacher (Alg. 1 l.1), tangent warmup at r = 0: the normalised target
    is exactly the teacher-vs-student velocity difference, zero to fp32 accuracy under bf16 too."""
    torch.manual_seed(0)
    teacher = wake(dit.build_model("DiT-T/2", (1, 8, 8), time_scale=1.0, adanorm="double")).eval()
    student = copy.deepcopy(teacher).train()
    cfg = {**scm.DEFAULTS, "mode": "scd", "sigma_d": 0.5, "adaptive_weight": False, "warmup_iters": 100}
    torch.manual_seed(1)
    with O.bf16():
        mse = float(scm.scm_losses(student, None, scm.draw(O.images(64), None, cfg), 0, cfg, teacher)["mse"])
    norm = math.sqrt(mse * 64)
    print(f"sCD at initialisation under bf16: normalised target norm {norm:.1e} per sample (0.07 before the fix)")
    assert norm < 1e-3


def test_discrete_scd_tangent_is_fp32_under_bf16():
    """Discrete-time sCD (App. E): the finite difference divides by sin(t - t'); under bf16 both F_minus
    evaluations run in fp32, so the tangent equals the fp32 one (it is O(step), not zero, at the exact
    solution)."""
    cfg, student, teacher = scm_setup(discrete=64)
    x0 = O.images(256)
    out = {}
    for name, ctx in (("fp32", FP32), ("bf16", O.bf16)):
        torch.manual_seed(0)
        with ctx():
            out[name] = float(scm.scm_losses(student, None, scm.draw(x0, None, cfg), 10, cfg, teacher)["mse"])
    assert out["fp32"] > 0 and abs(out["bf16"] - out["fp32"]) < 1e-3 * out["fp32"], out


# ----------------------------------------------------------------------------------------------
# DE-CM: the CD and N2N residuals, and the CFG difference

def decm_setup(losses):
    flow = O.decm_flow()
    student = O.AffineOracle(O.average_velocity(flow), 8)
    teacher = O.AffineOracle(O.velocity(flow), 8)
    cfg = {**decm.DEFAULTS, **decm.ROLE_DEFAULTS["student"], "losses": losses}

    def velocity(x, t, y):
        return decm.guided_velocity(teacher, x, t, y)
    return cfg, student, velocity


def test_decm_residuals_vanish_under_bf16():
    """At the exact flow map g_cm and g_n2n (the derived form) vanish: under bf16 too, to fp32 round-off.
    Before the fix v_psi ran under autocast: g_n2n had an RMS of 1.4e-3 there (5.7e-8 in fp32)."""
    cfg, student, velocity = decm_setup(["fm", "cd", "n2n"])
    x = O.images(256)
    for name, ctx in (("fp32", FP32), ("bf16", O.bf16)):
        torch.manual_seed(0)
        with ctx():
            batch = decm.prepare(x, None, velocity, cfg, True)
            cd = decm.cd_fm_loss(student, batch, None, cfg)
            n2n = decm.n2n_fm_loss(student, velocity, batch, None, cfg)
        print(f"DE-CM {name}: g_cm RMS {float(cd['g_cm']):.1e}, g_n2n RMS {float(n2n['g_n2n']):.1e}")
        assert float(cd["g_cm"]) < 1e-5 and float(n2n["g_n2n"]) < 1e-5, name


class LabelledVelocity(nn.Module):
    """A teacher whose unconditional velocity (the null label) differs from the conditional one by a small
    delta: v_cond - v_uncond = delta, about 1e-3 of the velocity, below bf16's resolution of it."""

    def __init__(self, base, delta):
        super().__init__()
        self.base, self.delta, self.null_label = base, delta, 10

    def forward(self, x, t, s=None, y=None):
        out = self.base(x, t)
        return out - (y == self.null_label).to(out.dtype)[:, None, None, None] * self.delta.to(out.dtype)


@pytest.mark.parametrize("normalize", [False, True])
def test_cfg_difference_is_fp32_under_bf16(normalize):
    teacher = LabelledVelocity(O.AffineOracle(O.velocity(O.decm_flow()), 8), 1e-3 * torch.linspace(-1, 1, 64).view(1, 8, 8))
    x, t, y = O.noise(64), torch.rand(64), torch.randint(0, 10, (64,))
    v_cond = teacher(x, t, y=y)
    ref = decm.guided_velocity(teacher, x, t, y, 2.0, eta=1e-3, normalize=normalize) - v_cond
    with O.bf16():
        got = decm.guided_velocity(teacher, x, t, y, 2.0, eta=1e-3, normalize=normalize) - v_cond
    # the guidance term itself, (w - 1) times the (normalised) difference, to fp32 accuracy
    print(f"CFG guidance term under bf16 (normalize={normalize}): relative error {O.rel(got, ref):.1e}")
    assert O.rel(got, ref) < 1e-3


# ----------------------------------------------------------------------------------------------
# Direct: the propagation target, and label dropout

def test_direct_target_stays_fp32_under_bf16():
    """Eq. (16)'s target with the exact w and v: under bf16 it equals the fp32 target to 1e-6 (relative), and
    misses w(x0, t' + dt) by the forward difference's O(dt^2) only. Before the fix (under autocast) it
    missed by 2.2e-3."""
    flow = O.decm_flow()
    w_net, v_net = O.AffineOracle(O.direct_w(flow), 8), O.AffineOracle(O.velocity(flow), 8)
    x0 = O.noise(512)
    t = 0.01 + 0.98 * torch.rand(512, generator=torch.Generator().manual_seed(0))
    T32 = direct.propagation_target(w_net, v_net, x0, t, 0.01)
    with O.bf16():
        T16 = direct.propagation_target(w_net, v_net, x0, t, 0.01)
    exact = w_net(x0, t + 0.01)
    print(f"Direct target under bf16: {O.rel(T16, T32):.1e} from fp32, {O.rel(T16, exact):.1e} from w(t + dt)")
    assert O.rel(T16, T32) < 1e-6 and O.rel(T16, exact) < 2e-4


def test_direct_guided_target_sees_no_label_dropout():
    """Class-conditional Direct with CFG 1.5 (the ImageNet preset): v_theta is trained with label dropout
    0.1, but the propagation target is a function of its inputs: two calls in train mode agree exactly.
    (Before the fix about 10% of the target velocities were unguided: 10 of 64 samples differed.)"""
    torch.manual_seed(0)
    v_net = wake(dit.build_model("DiT-T/2", (1, 8, 8), num_classes=10, class_dropout=0.1)).train()
    w_net = wake(dit.build_model("DiT-T/2", (1, 8, 8), num_classes=10), seed=1).train()
    x0, t, y = O.noise(64), torch.full((64,), 0.5), torch.randint(0, 10, (64,))
    a = direct.propagation_target(w_net, v_net, x0, t, 0.01, y, cfg_scale=1.5)
    b = direct.propagation_target(w_net, v_net, x0, t, 0.01, y, cfg_scale=1.5)
    assert torch.equal(a, b)
    assert v_net.training and w_net.training                                   # modes restored
    with torch.no_grad():                                                      # the dropout is real in train mode
        outs = [v_net(x0, t, y=y) for _ in range(2)]
    assert not torch.equal(*outs)


# ----------------------------------------------------------------------------------------------
# --bf16 on the CPU

def test_bf16_autocast_runs_on_the_cpu(tmp_path):
    cfg = {**common.COMMON_DEFAULTS, "method": "demo", "dataset": "moons", "out": str(tmp_path), "batch_size": 4,
           "bf16": True, "device": "cpu"}
    run = common.Run(cfg)
    lin = nn.Linear(4, 4)
    with run.autocast():
        out = lin(torch.randn(2, 4))
        with common.full_precision(out):
            kept = lin(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and kept.dtype == torch.float32
