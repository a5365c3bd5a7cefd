"""--bf16 keeps the maths (common.py, "Precision"): for every method, at the closed-form
Gaussian solution, the target computed under bf16 autocast equals the fp32 target to fp32 accuracy, not bf16's
(the exact policy, the default); on a CUDA GPU the same holds with TF32 on outside the target passes. The
networks are tests/oracles.py's exact solutions, which compute through a matrix product that autocast runs in
bf16 and a GPU with TF32 rounds to TF32, like a real network's linear layers: a target pass left under autocast
or TF32 shows those errors (printed in each test's docstring: before the fix). Also: TF32 is off inside every
target pass and on again after it; what the faster policy (--target-precision bf16) costs at the solution;
targets never see label dropout; --bf16 runs on the CPU."""
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
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@contextlib.contextmanager
def switched(set_switches):
    """set_switches() changes the fp32 matmul switches for the block; they are restored after."""
    saved = [getattr(obj, name) for obj, name, *_ in common._fp32_switches()]
    set_switches()
    try:
        yield
    finally:
        for (obj, name, *_), value in zip(common._fp32_switches(), saved):
            setattr(obj, name, value)


def tf32(on):
    """TF32 set as a run on a GPU sets it (common.set_tf32), restored after (a no-op for CPU arithmetic)."""
    return switched(lambda: common.set_tf32(on))


@pytest.fixture(params=DEVICES)
def device(request):
    """The CPU, and a CUDA GPU with TF32 on outside the target passes, as a training run there has it."""
    with tf32(request.param == "cuda"):
        yield request.param


def wake(module, std=0.05, seed=0):
    """Random values for the zero-initialised layers (adaLN-Zero, final layer), so that every input,
    labels included, changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() and not p.any():
                p.copy_(std * torch.randn(p.shape, generator=g).to(p.device))
    return module


# ----------------------------------------------------------------------------------------------
# GCM: the Eq. (39) finite difference and the MMD particles

def gcm_setup(variant, seed=0, device="cpu"):
    cfg = {**gcm.parse_config(["--dataset", "moons", "--variant", variant]), "sigma_d": 0.5}
    flow = O.gcm_flow()
    net = O.AffineOracle(O.gcm_net(flow, cfg), 8, device=device)
    g = torch.Generator().manual_seed(seed)
    n = 256
    x, z = O.images(n, seed, device), O.noise(n, seed + 1, device)
    t = 0.1 + 0.85 * torch.rand(n, generator=g)
    s = torch.full_like(t, cfg["t0"]) if variant == "cu" else cfg["t0"] + (t - cfg["t0"]) * torch.rand(n, generator=g)
    return cfg, flow, net, x, z, t.to(device), s.to(device)


def gcm_targets(variant, ctx, dtype, device="cpu"):
    """The target part of Eq. (39), T = u + (s - r)/(t - r) (f-(x_t) - f-(x_r)), with the exact velocity at
    eps = 0.005, and the MMD particles' difference P = g_t - g_r - (r - t) f(x_t) = (t - r) T, per sample."""
    cfg, flow, net, x, z, t, s = gcm_setup(variant, device=device)
    x_t, _ = gcm.INTERP(x, z, t)
    v = flow.velocity(x_t.double(), t.double()).float()
    r = gcm.discretize(t, s, 0.005, cfg)
    f = lambda xx, tt, ss: gcm.f_theta(net, xx, tt, ss, cfg)                            # noqa: E731
    xt, vv, tt, ss, rr = (a.to(dtype) for a in (x_t, v, t, s, r))
    with ctx():
        F_t, F_t_minus, F_r, x_r = gcm.flow_pair(common.Passes(f), xt, vv, tt, ss, rr)
        k = torch.where((ss < rr) & (rr < tt), (ss - rr) / (tt - rr), 0.0)
        T = vv + common.bcast(k, vv) * (F_t_minus - F_r)                                   # E + f(x_t, t, s)
        g_t, g_r = gcm.mmd_particles(xt, x_r, F_t, F_t_minus, F_r, tt, ss, rr)
        P = g_t - g_r - common.bcast(rr - tt, xt) * common.wide(F_t)                           # (t - r) T
    return T.double(), P.double()


def per_sample(a, b):
    return (a - b).flatten(1).norm(dim=1)


@pytest.mark.parametrize("variant", ["cu", "vu"])
def test_gcm_finite_difference_target_stays_fp32(variant, device):
    """The target part of Eq. (39) and the MMD particles' difference: under bf16 (and on a GPU with TF32 on)
    they equal the fp32 values (computed without autocast) to fp32 round-off, and both are within fp32 accuracy
    (times the 1/h amplification) of float64. Before the fix (both passes under autocast) the error was 5.6 per
    sample against an O(h) residual of 0.011."""
    T16, P16 = gcm_targets(variant, lambda: O.bf16(device), torch.float32, device)
    T32, P32 = gcm_targets(variant, FP32, torch.float32, device)
    T64, P64 = gcm_targets(variant, FP32, torch.float64, device)
    print(f"GCM {variant} on {device}: Eq. (39) target, bf16 vs fp32 {per_sample(T16, T32).max():.1e}, "
          f"fp32 vs fp64 {per_sample(T32, T64).max():.1e} per sample")
    assert per_sample(T16, T32).max() < 1e-5 and per_sample(T32, T64).max() < 1e-2
    assert per_sample(P16, P32).max() < 1e-6 and per_sample(P32, P64).max() < 1e-4


def test_gcm_loss_under_bf16_matches_fp32(device):
    """gcm_losses end to end (l2 loss, CU): the logged residual ||E|| under bf16 differs from fp32 only by
    the bf16 rounding of the prediction f(x_t), not by an amplified target error."""
    cfg, flow, net, x, *_ = gcm_setup("cu", device=device)
    cfg = dict(cfg, mmd_group=1)
    res = {}
    for name, ctx in (("fp32", FP32), ("bf16", lambda: O.bf16(device))):
        torch.manual_seed(3)
        with ctx():
            res[name] = float(gcm.gcm_losses(net, gcm.draw(x, None, cfg), cfg, 0.005)["residual"])
    assert abs(res["bf16"] - res["fp32"]) < 0.02 * res["fp32"], res


# ----------------------------------------------------------------------------------------------
# sCM: sCD's tangent (continuous and discrete time)

def scm_setup(mode="scd", discrete=0, device="cpu"):
    sigma_d = 0.5
    flow = O.trig_flow(sigma_d)
    student = O.AffineOracle(O.trig_consistency_F(flow, sigma_d), 8, device=device)
    teacher = O.AffineOracle(O.trig_teacher_F(flow, sigma_d), 8, device=device)
    cfg = {**scm.DEFAULTS, "mode": mode, "sigma_d": sigma_d, "adaptive_weight": False, "warmup_iters": 0,
           "discrete_steps": discrete, "P_mean": -0.4, "P_std": 1.0}
    return cfg, student, teacher


def scd_tangent_norm(ctx, device="cpu"):
    """sCD with the exact consistency function and the exact teacher: the RMS norm per sample of the normalised
    tangent g/(||g|| + c), which is zero at the solution (df/dt = 0 along the PF-ODE)."""
    cfg, student, teacher = scm_setup(device=device)
    x0 = O.images(256, device=device)
    torch.manual_seed(0)
    with ctx():
        return math.sqrt(float(scm.scm_losses(student, None, scm.draw(x0, None, cfg), 10, cfg, teacher)["mse"]) * 64)


def test_scd_tangent_vanishes_under_bf16(device):
    """The normalised sCD tangent at the exact solution is zero up to fp32 round-off, under bf16 as in fp32 (and
    with TF32 on, on a GPU). Before the fix (teacher velocity under autocast) its norm was 0.07 per sample at
    initialisation of a DiT student."""
    out = {name: scd_tangent_norm(ctx, device) for name, ctx in (("fp32", FP32), ("bf16", lambda: O.bf16(device)))}
    print(f"sCD normalised tangent at the exact solution on {device}: fp32 {out['fp32']:.1e}, bf16 {out['bf16']:.1e}")
    assert out["fp32"] < 1e-4 and out["bf16"] < 1e-4


def test_scd_at_initialisation_is_zero_under_bf16(device):
    """A real DiT student equal to its teacher (Alg. 1 l.1), tangent warmup at r = 0: the normalised target
    is exactly the teacher-vs-student velocity difference, zero to fp32 accuracy under bf16 too."""
    torch.manual_seed(0)
    teacher = wake(dit.build_model("DiT-T/2", (1, 8, 8), time_scale=1.0, adanorm="double")).eval().to(device)
    student = copy.deepcopy(teacher).train()
    cfg = {**scm.DEFAULTS, "mode": "scd", "sigma_d": 0.5, "adaptive_weight": False, "warmup_iters": 100}
    torch.manual_seed(1)
    with O.bf16(device):
        mse = float(scm.scm_losses(student, None, scm.draw(O.images(64, device=device), None, cfg), 0, cfg, teacher)["mse"])
    norm = math.sqrt(mse * 64)
    print(f"sCD at initialisation under bf16 on {device}: normalised target norm {norm:.1e} per sample (0.07 before)")
    assert norm < 1e-3


def test_discrete_scd_tangent_is_fp32_under_bf16(device):
    """Discrete-time sCD (App. E): the finite difference divides by sin(t - t'); under bf16 both F_minus
    evaluations are target passes, so the tangent equals the fp32 one (it is O(step), not zero, at the exact
    solution)."""
    cfg, student, teacher = scm_setup(discrete=64, device=device)
    x0 = O.images(256, device=device)
    out = {}
    for name, ctx in (("fp32", FP32), ("bf16", lambda: O.bf16(device))):
        torch.manual_seed(0)
        with ctx():
            out[name] = float(scm.scm_losses(student, None, scm.draw(x0, None, cfg), 10, cfg, teacher)["mse"])
    assert out["fp32"] > 0 and abs(out["bf16"] - out["fp32"]) < 1e-3 * out["fp32"], out


# ----------------------------------------------------------------------------------------------
# DE-CM: the CD and N2N residuals and losses, and the CFG difference

def decm_setup(losses, device="cpu"):
    flow = O.decm_flow()
    student = O.AffineOracle(O.average_velocity(flow), 8, device=device)
    teacher = O.AffineOracle(O.velocity(flow), 8, device=device)
    cfg = {**decm.DEFAULTS, **decm.ROLE_DEFAULTS["student"], "losses": losses}

    def velocity(x, t, y):
        return decm.guided_velocity(teacher, x, t, y)
    return cfg, student, velocity


def decm_at_solution(ctx, device="cpu", losses=("fm", "cd", "n2n")):
    """(cd_fm_loss, n2n_fm_loss) outputs with the exact student and teacher."""
    cfg, student, velocity = decm_setup(list(losses), device)
    x = O.images(256, device=device)
    torch.manual_seed(0)
    with ctx():
        batch = decm.prepare(x, None, velocity, cfg, True)
        return decm.cd_fm_loss(student, batch, None, cfg), decm.n2n_fm_loss(student, velocity, batch, None, cfg)


def test_decm_residuals_and_losses_vanish_under_bf16(device):
    """At the exact flow map g_cm and g_n2n (the derived form) vanish: under bf16 too, to fp32 round-off.
    Before the fix v_psi ran under autocast: g_n2n had an RMS of 1.4e-3 there (5.7e-8 in fp32). And the CM and
    N2N losses, whose target is sg(F) - w g with sg(F) the prediction's own value, vanish with g: before, sg(F)
    was the fp32 JVP's primal and the bf16 prediction's rounding entered the loss (L_cm 2e-5, L_n2n 1.3e-4)."""
    for name, ctx in (("fp32", FP32), ("bf16", lambda: O.bf16(device))):
        cd, n2n = decm_at_solution(ctx, device)
        print(f"DE-CM {name} on {device}: g_cm RMS {float(cd['g_cm']):.1e}, g_n2n RMS {float(n2n['g_n2n']):.1e}, "
              f"L_cm {float(cd['cm']):.1e}, L_n2n {float(n2n['n2n']):.1e}")
        assert float(cd["g_cm"]) < 1e-5 and float(n2n["g_n2n"]) < 1e-5, name
        # d = ||w g||^2 with w = 1 (adaptive p = 0.5: d / sqrt(d + c)), so the losses are of order g^2 / sqrt(c)
        assert float(cd["cm"]) < 1e-9 and float(n2n["n2n"]) < 1e-9, name


class LabelledVelocity(nn.Module):
    """A teacher whose unconditional velocity (the null label) differs from the conditional one by a small
    delta: v_cond - v_uncond = delta, about 1e-3 of the velocity, below bf16's resolution of it."""

    def __init__(self, base, delta):
        super().__init__()
        self.base, self.delta, self.null_label = base, delta, 10

    def forward(self, x, t, s=None, y=None):
        out = self.base(x, t)
        return out - (y == self.null_label).to(out.dtype)[:, None, None, None] * self.delta.to(out.device, out.dtype)


@pytest.mark.parametrize("normalize", [False, True])
def test_cfg_difference_is_fp32_under_bf16(normalize, device):
    """The guided teacher velocity as prepare() computes it (a target pass): its guidance term, (w - 1) times the
    (normalised) difference v_cond - v_uncond, to fp32 accuracy under bf16."""
    teacher = LabelledVelocity(O.AffineOracle(O.velocity(O.decm_flow()), 8, device=device),
                               1e-3 * torch.linspace(-1, 1, 64).view(1, 8, 8))
    x, t, y = O.noise(64, device=device), torch.rand(64).to(device), torch.randint(0, 10, (64,)).to(device)
    v_cond = teacher(x, t, y=y)

    def guided():
        with common.target_precision(x):
            return decm.guided_velocity(teacher, x, t, y, 2.0, eta=1e-3, normalize=normalize) - v_cond
    ref = guided()
    with O.bf16(device):
        got = guided()
    print(f"CFG guidance term under bf16 on {device} (normalize={normalize}): relative error {O.rel(got, ref):.1e}")
    assert O.rel(got, ref) < 1e-3


# ----------------------------------------------------------------------------------------------
# Direct: the propagation target (with and without stop-gradients), and label dropout

def direct_setup(device="cpu", n=512):
    flow = O.decm_flow()
    w_net = O.AffineOracle(O.direct_w(flow), 8, device=device)
    v_net = O.AffineOracle(O.velocity(flow), 8, device=device)
    x0 = O.noise(n, device=device)
    t = (0.01 + 0.98 * torch.rand(n, generator=torch.Generator().manual_seed(0))).to(device)
    return w_net, v_net, x0, t


def test_direct_target_stays_fp32_under_bf16(device):
    """Eq. (16)'s target with the exact w and v: under bf16 it equals the fp32 target to 1e-6 (relative), and
    misses w(x0, t' + dt) by the forward difference's O(dt^2) only. Before the fix (under autocast) it missed by
    2.2e-3."""
    w_net, v_net, x0, t = direct_setup(device)
    T32 = direct.propagation_target(w_net, v_net, x0, t, 0.01)
    with O.bf16(device):
        T16 = direct.propagation_target(w_net, v_net, x0, t, 0.01)
    exact = w_net(x0, t + 0.01)
    print(f"Direct target under bf16 on {device}: {O.rel(T16, T32):.1e} from fp32, {O.rel(T16, exact):.1e} from w(t + dt)")
    assert O.rel(T16, T32) < 1e-6 and O.rel(T16, exact) < 2e-4


def test_direct_ablation_target_without_stop_gradients(device):
    """Table 3's --no-stop-grad target, (t' - dt)/t' w(x0, t') + dt/t' v(x'_t, t') with the gradient through
    w(x0, t'): in float64 it is exactly the formula (no rounding to fp32 on the way: before the fix it differed
    by 6e-6); under bf16 its value equals the fp32 one to 1e-6 although w(x0, t') comes from the bf16 gradient
    pass (before: 1.5e-2), and the gradient still reaches that pass."""
    w_net, v_net, x0, t = direct_setup(device)
    dt = 0.01
    x64, t64 = x0.double(), t.double()
    w64 = w_net(x64, t64)
    manual = (common.bcast(t64 - dt, w64) * w64 + dt * v_net(x64 + common.bcast(t64, w64) * w64, t64)) / common.bcast(t64, w64)
    got = direct.ablation_target(w64, w_net, v_net, x64, t64, dt)
    assert got.dtype == torch.float64 and float((got - manual).abs().max()) < 1e-12
    T32 = direct.ablation_target(w_net(x0, t), w_net, v_net, x0, t, dt)
    with O.bf16(device):
        w_prev = w_net(x0, t).requires_grad_()                                 # the bf16 gradient pass's value
        T16 = direct.ablation_target(w_prev, w_net, v_net, x0, t, dt)
    print(f"Direct --no-stop-grad target under bf16 on {device}: {O.rel(T16.detach(), T32):.1e} from fp32")
    assert w_prev.dtype == torch.bfloat16 and O.rel(T16.detach(), T32) < 1e-6
    T16.sum().backward()
    assert w_prev.grad is not None and w_prev.grad.abs().max() > 0


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
# TF32 inside the target passes (the flags are settable, and read back, on a CPU-only PyTorch too)

def losses_of(method, device="cpu"):
    """(oracle modules, loss of one step) for a method variant; the loss runs a step's gradient and target passes."""
    if method.startswith("gcm"):
        cfg, _, net, x, *_ = gcm_setup("cu" if method == "gcm-cu" else "vu", device=device)
        return [net], lambda: gcm.gcm_losses(net, gcm.draw(x, None, cfg), cfg, 0.005)
    if method.startswith("scm"):
        cfg, student, teacher = scm_setup(discrete=64 if method == "scm-discrete" else 0, device=device)
        x0 = O.images(64, device=device)
        return [student, teacher], lambda: scm.scm_losses(student, None, scm.draw(x0, None, cfg), 10, cfg, teacher)
    if method.startswith("decm"):
        flow = O.decm_flow()
        student = O.AffineOracle(O.average_velocity(flow), 8, device=device)
        teacher = O.AffineOracle(O.velocity(flow), 8, device=device)
        cfg = {**decm.DEFAULTS, **decm.ROLE_DEFAULTS["student"], "losses": ["fm", "cd", "n2n"]}
        velocity = lambda x, t, y: decm.guided_velocity(teacher, x, t, y)          # noqa: E731
        x = O.images(64, device=device)

        def step():
            batch = decm.prepare(x, None, velocity, cfg, True)
            cd = decm.cd_fm_loss(student, batch, None, cfg)
            return decm.n2n_fm_loss(student, velocity, batch, None, cfg) if method == "decm-n2n" else cd
        return [student, teacher], step
    w_net, v_net, x0, t = direct_setup(device, n=64)
    stop_grad = method == "direct"
    batch = direct.draw(torch.zeros_like(x0), None, {"dt": 0.01})
    return [w_net, v_net], lambda: direct.direct_losses(v_net, w_net, batch, {"dt": 0.01, "param": "tw",
                                                                               "stop_grad": stop_grad, "cfg_scale": 1.0})


@pytest.mark.parametrize("method", ["gcm-cu", "gcm-vu", "scm", "scm-discrete", "decm-cd", "decm-n2n", "direct",
                                    "direct-no-stop-grad"])
def test_tf32_is_off_inside_target_passes_and_on_again_after(method):
    """With TF32 on (as a run on a GPU sets it) and --bf16, every network call of a training step is either a
    gradient pass, with bf16 autocast and TF32 as they were, or a target pass, with autocast and TF32 off;
    each step has both kinds, and TF32 is on again after the step."""
    modules, step = losses_of(method)
    calls = []
    for m in modules:
        m.calls = calls
    with tf32(True):
        assert common.tf32_enabled()
        torch.manual_seed(0)
        with O.bf16("cpu"):
            step()
        assert common.tf32_enabled()
    kinds = set(calls)
    print(f"{method}: {len(calls)} calls, (autocast, TF32) seen: {sorted(kinds)}")
    assert kinds == {(True, True), (False, False)}, kinds


def test_target_precision_and_jvp_restore_the_flags():
    """IEEE fp32 inside target_precision and jvp, also without autocast (fp32 training with TF32 on a GPU), and
    every switch back to what it was afterwards, also when the block raises."""
    seen = []
    with tf32(True):
        before = [getattr(obj, name) for obj, name, *_ in common._fp32_switches()]
        x = torch.randn(3, 4)
        with common.target_precision(x):
            seen.append(common.tf32_enabled())
        common.jvp(lambda a: (seen.append(common.tf32_enabled()), a * a)[1], (x,), (torch.ones_like(x),))
        with pytest.raises(RuntimeError), common.ieee_fp32():
            seen.append(common.tf32_enabled())
            raise RuntimeError("inside")
        assert [getattr(obj, name) for obj, name, *_ in common._fp32_switches()] == before
        assert common.tf32_enabled() and seen == [False, False, False]
        with O.bf16("cpu"):                                            # and the reuse rule follows the policy
            assert not common.reuse_for_target(x)
        with O.bf16("cpu", targets="bf16"):
            assert common.reuse_for_target(x)
    assert common.reuse_for_target(x)                                  # fp32 on the CPU: the gradient pass is exact


# ----------------------------------------------------------------------------------------------
# The faster policy (--target-precision bf16): what it costs at the closed-form solution

POLICIES = ("fp32", "tf32", "bf16")


def policy_errors(method, device="cpu"):
    """{policy: error} of a method's target at the closed-form solution under --bf16 on `device` (a GPU with TF32
    on outside the target passes), for the exact, tf32 and faster policies: GCM, the Eq. (39) target's largest
    per-sample distance to fp32, relative to the target's size there; sCD, the normalised tangent's RMS norm (0 at the solution); DE-CM, g_cm's and
    g_n2n's RMS (0 at the solution); Direct, the propagation target's relative distance to fp32."""
    out = {}
    for targets in POLICIES:
        ctx = lambda: O.bf16(device, targets)                                            # noqa: E731
        if method.startswith("gcm"):
            T, _ = gcm_targets(method[-2:], ctx, torch.float32, device)
            T32 = gcm_targets(method[-2:], FP32, torch.float32, device)[0]
            out[targets] = float((per_sample(T, T32) / T32.flatten(1).norm(dim=1)).max())
        elif method == "scm":
            out[targets] = scd_tangent_norm(ctx, device)
        elif method.startswith("decm"):
            cd, n2n = decm_at_solution(ctx, device)
            out[targets] = float(cd["g_cm"] if method == "decm-cd" else n2n["g_n2n"])
        else:
            w_net, v_net, x0, t = direct_setup(device)
            with ctx():
                T = direct.propagation_target(w_net, v_net, x0, t, 0.01)
            out[targets] = O.rel(T, direct.propagation_target(w_net, v_net, x0, t, 0.01))
    return out


@pytest.mark.parametrize("method", ["gcm-cu", "scm", "decm-cd", "decm-n2n", "direct"])
def test_policies_run_the_targets_in_their_arithmetic(method, device):
    """The faster policy really moves the target passes to bf16: its error at the solution is of bf16's size, at
    least 100x the exact policy's (the README's precision table prints both). The tf32 policy is the exact one
    on a CPU, to the bit; on a GPU its target passes round to TF32: an error between the other two, about an
    eighth of bf16's (10 mantissa bits against 7)."""
    errors = policy_errors(method, device)
    print(f"{method} on {device}: target error at the solution, " +
          ", ".join(f"{p} policy {e:.2e}" for p, e in errors.items()))
    assert errors["bf16"] > 100 * errors["fp32"] and errors["bf16"] > 1e-4
    if device == "cpu":
        assert errors["tf32"] == errors["fp32"]
    else:
        assert 10 * errors["fp32"] < errors["tf32"] < errors["bf16"] / 3


def test_target_arithmetic_of_each_policy():
    """Which arithmetic a target pass runs in, by policy, device and whether --bf16's autocast is on: tf32 only
    on CUDA (with or without --bf16), bf16 only inside --bf16's autocast, IEEE fp32 everywhere else."""
    arithmetic = {(p, d, a): common.target_arithmetic(d, a, p) for p in POLICIES for d in ("cpu", "cuda")
                  for a in (False, True)}
    assert {k for k, v in arithmetic.items() if v == "tf32"} == {("tf32", "cuda", False), ("tf32", "cuda", True)}
    assert {k for k, v in arithmetic.items() if v == "bf16"} == {("bf16", "cpu", True), ("bf16", "cuda", True)}
    with common.fp32_matmuls(cuda_tf32=True), matmul_precision("medium"):
        assert common.tf32_enabled()                       # the tf32 policy's switches, oneDNN's bf16 left as set
    with common.fp32_matmuls(cuda_tf32=True):
        assert common.tf32_enabled() and not common.reduced_fp32("cpu")
    with tf32(False):
        x = torch.randn(3)
        with common.mixed_precision("cpu", targets="tf32"), common.target_precision(x):
            assert not common.tf32_enabled() and not common.reduced_fp32("cpu")      # on a CPU: the exact policy
        assert not common.tf32_enabled()


def matmul_precision(mode):
    """torch.set_float32_matmul_precision(mode) for the block: "medium" lets oneDNN run fp32 matmuls in bf16 on a
    CPU with bf16 units (and cuBLAS in TF32)."""
    return switched(lambda: torch.set_float32_matmul_precision(mode))


def test_reduced_precision_fp32_on_the_cpu_is_not_a_target():
    """After torch.set_float32_matmul_precision("medium") oneDNN may run a CPU's fp32 matmuls (a DiT's linear
    layers) in bf16: a gradient pass is then no longer computed as a target pass, so it is not reused for GCM's
    Eq. (39) target, and GCM CU's loss stays the IEEE one up to the rounding of the prediction (on this CPU the
    reused pass moved the loss by 15%, 0.443 to 0.510, before the fix)."""
    from types import SimpleNamespace
    cfg = gcm.parse_config(["--dataset", "digits", "--variant", "cu", "--mmd-group", "1"])
    torch.manual_seed(0)
    net = wake(gcm.build_model(cfg, SimpleNamespace(shape=(1, 8, 8), num_classes=10, kind="image"))).train()
    x = torch.randn(64, 1, 8, 8)

    def loss():
        torch.manual_seed(3)
        return float(gcm.gcm_losses(net, gcm.draw(x, None, cfg), cfg, 0.005)["loss"].detach())
    exact = loss()
    with matmul_precision("medium"):
        assert common.reduced_fp32("cpu") and not common.reuse_for_target(x)
        reduced = loss()
    assert common.reuse_for_target(x)
    print(f"GCM CU loss, IEEE fp32 {exact:.6f}, oneDNN's medium precision {reduced:.6f}")
    assert abs(reduced - exact) < 1e-3 * exact


def test_tf32_policy_trains_as_the_exact_one_on_a_cpu(tmp_path):
    """--target-precision tf32 is accepted with or without --bf16, and on a CPU a run under it is the exact
    policy's run, bit for bit."""
    states = []
    for policy in ("fp32", "tf32"):
        out = tmp_path / policy
        gcm.main(["--dataset", "moons", "--steps", "6", "--batch-size", "32", "--eval-samples", "16", "--out", str(out),
                  "--target-precision", policy, "--log-every", "3"])
        states.append(torch.load(out / "ckpt.pt", weights_only=True)["net"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# ----------------------------------------------------------------------------------------------
# --bf16 on the CPU

def test_bf16_autocast_runs_on_the_cpu(tmp_path):
    cfg = {**common.COMMON_DEFAULTS, "method": "demo", "dataset": "moons", "out": str(tmp_path), "batch_size": 4,
           "bf16": True, "device": "cpu"}
    run = common.Run(cfg)
    lin = nn.Linear(4, 4)
    with run.precision():
        out = lin(torch.randn(2, 4))
        with common.target_precision(out):
            kept = lin(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and kept.dtype == torch.float32
