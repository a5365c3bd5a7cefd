"""GCM: "A Guide to Training Consistency Models" (ICLR 2026 submission, https://openreview.net/forum?id=1SHdqm7Eaa).

The method in a paragraph. Consistency training from scratch on the OT flow-matching path with the
data at t=0 and the noise at t=1: x_t = (1-t) x + t z, u_t = z - x, t in [t0, tT] = [0.006, 0.994].
The network predicts the average velocity f(x_t, t, s) of the PF-ODE between t and an upper limit
s <= t, so the flow map is g(x_t, t, s) = x_t + (s - t) f(x_t, t, s) (Eq. 3). Training asks g to agree
at two neighbouring points of one trajectory, x_t and the Euler step x_r = x_t - h(t) u_t, through an
l2-norm (not squared) loss, written as Eq. (39):
    w(t)/p(t) || u_t - f(x_t,t,s) + (s - r) (f-(x_t,t,s) - f-(x_r,r,s)) / (t - r) ||_2,   r = t - h(t),
with f- evaluated without gradient and under the same dropout mask. As r -> t it becomes the
continuous-time loss of Eq. (6), whose d/dt f- is a JVP. The playbook (Table 1) adds one module at a
time: the step h(t) = eps e^{-mu t} (Eq. 8), the time input c(t) = (e^{mu t} - 1)/mu that keeps
c(t) - c(r) constant (Eq. 9), the Gamma weight w(t) = t^gamma e^{-lambda t} (Eq. 14) with t drawn from
the sine density (Eq. 15) and weighted by w/p, and a time-aware MMD over groups of m samples
(Eqs. 44-46). CU fixes s = t0 (the classic consistency model, restart sampling); VU draws s from the
uniform-power density (Eq. 17) and t from [s, tT] as an auxiliary task (pushforward sampling).

    python gcm.py --dataset checkerboard                     # 2D toy, CU, about a minute on a CPU
    python gcm.py --dataset checkerboard --variant vu        # the same with VU
    python gcm.py --dataset cifar10                          # Table 2 F (CU); --variant vu: Table 3 L
    torchrun --nproc_per_node 8 gcm.py --imagenet-latents    # App. G.2: VU on latents, class-conditional
    python gcm.py --sample-only --ckpt runs/gcm-cifar10/ckpt.pt --nfe 1 2 --fid 50000

Every module of Tables 2, 3 and 7 is a flag (--h, --time-precond, --weight, --t-dist, --mmd-group,
--mmd-sigma, --mmd-share-time, --jvp, --curriculum, --nu). The rows of Table 2 (CU; Table 3's G-L: add
--variant vu), each adding one module to the one before:
    A / G  --h constant --time-precond linear --weight uniform --t-dist uniform --mmd-group 1
    B / H  --time-precond linear --weight uniform --t-dist uniform --mmd-group 1      (+ h(t), Eq. 8)
    C / I  --weight uniform --t-dist uniform --mmd-group 1                          (+ c(t), Eq. 9)
    D / J  --t-dist uniform --mmd-group 1                                           (+ the Gamma weight)
    E / K  --mmd-group 1                                                            (+ sine t-sampling)
    F / L  (the defaults)                                                           (+ the time-aware MMD)
Table 7: (b) --h <shape>; (c) row B with --time-precond linear [--time-scale 1000]; (d) --curriculum; (f)
--variant vu --nu N; (g) --t-dist uniform, --dist-b 0.1 / 0.001, --t-dist cosh; (i) VU with --mmd-group 1,
--mmd-group 2 --mmd-share-time --mmd-sigma inf, or the defaults; (j) --jvp analytic --mmd-group 1.

Reading guide, in the paper's order:
    Eq. (1)/(2), the OT interpolant, data at t = 0 .......... INTERP (common.NoiseAt1)
    Eq. (3)/(4), Section 3.1's c_in / c_out ................. f_theta, g_theta, precond
    Eq. (8)/(36), Eqs. (26)-(35), App. C.3, the step h(t) ... STEP_SIZES, discretize, matched_eps
    Eq. (9), App. C.4, time preconditioning ................. time_input
    Eq. (14), the Gamma weight ................................ loss_weight
    Eqs. (15)-(17), App. E, sampling t and s ................ t_distribution, sample_times
    Eq. (5) as Eq. (39), App. D.1 ............................. flow_pair, consistency_residual
    Eq. (6), continuous time by a JVP ........................ analytic_residual
    Eq. (40), Eqs. (44)-(46), the time-aware MMD ............ mmd_particles, time_aware_mmd
    Table 1, the whole loss .................................. draw, gcm_losses
    App. G.1, the curriculum and the samplers ............... curriculum_eps, sampling_times, sample_restart,
                                                                sample_pushforward
    Table 1, App. G, the settings ............................ DEFAULTS, VARIANT_DEFAULTS, PRESETS
"""
import argparse
import math

import torch
from scipy import optimize

import common

INTERP = common.NoiseAt1()          # x_t = (1 - t) x + t z: data at t = 0, noise at t = 1, u_t = z - x


# ==============================================================================================
# The method: discretisation h(t), time input c(t), model parameterisation

def _edm_h(t, eps, mu):
    # Eq. (27), the EDM grid (rho = 7) translated to t by Eq. (24), t = (2/pi) arctan(sigma / 0.5); the
    # paper's constant A < 0 is -eps here, so every h(t) has one positive size parameter.
    sigma = 0.5 * torch.tan(math.pi / 2 * t)
    return 2 / math.pi * torch.atan((sigma ** (1 / 7) + eps) ** 7 / 0.5) - t


def _ect_h(t, eps, mu):
    # Eq. (28): ECT's sigma_r = sigma_t (1 - eps (1 + 8 / (1 + e^{sigma_t}))) (Eq. 25, k=8, b=1), sigma_t = 0.5 tan(pi t/2)
    T = torch.tan(math.pi / 2 * t)
    return t - 2 / math.pi * torch.atan(T * (1 - eps * (1 + 8 / (1 + torch.exp(0.5 * T)))))


# h(t) = t - r, Table 7b. Each takes (t, eps, mu). The baselines A/G of Tables 2/3 use "constant"
# (Table 1 and Section 3.1: t - r = eps); App. C.2/C.3 call 0.005 (1 - t)^2 the baseline of Table 7b's
# normalisation (matched_eps), and we size the constant step by that same integral.
STEP_SIZES = {
    "exp": lambda t, eps, mu: eps * torch.exp(-mu * t),                        # Eq. (8)/(36), ours
    "constant": lambda t, eps, mu: eps * torch.ones_like(t),                   # Eq. (26)
    "edm": _edm_h,                                                             # Eq. (27)
    "ect": _ect_h,                                                             # Eq. (28)
    "imm": lambda t, eps, mu: eps * (1 - t) ** 2 / (1 - eps * (1 - t)),        # Eq. (29)
    "linear": lambda t, eps, mu: eps * (1 - t),                                # Eq. (30)
    "quadratic": lambda t, eps, mu: eps * (1 - t) ** 2,                        # Eq. (31)
    "cubic": lambda t, eps, mu: eps * (1 - t) ** 3,                            # Eq. (32)
    "quadratic-increase": lambda t, eps, mu: eps * t ** 2,                     # Eq. (33)
    "quadratic-concave": lambda t, eps, mu: eps * t * (1 - t),                 # Eq. (34)
    "quadratic-convex": lambda t, eps, mu: eps * (0.5 - t) ** 2,               # Eq. (35)
}


def matched_eps(kind, mu=3.5):
    """App. C.3: the eps that gives h(t) the integral over [0, 1] of the baseline 0.005 (1 - t)^2,
    i.e. 0.005/3, so that the rows of Table 7b differ in shape only."""
    t = torch.linspace(0, 1, 100_001, dtype=torch.float64)

    def excess(eps):
        return float(torch.trapezoid(STEP_SIZES[kind](t, eps, mu), t)) - 0.005 / 3
    return optimize.brentq(excess, 1e-9, 0.1, xtol=1e-12)


def curriculum_eps(cfg, step):
    """App. G.1: the discretisation curriculum starts at eps = 0.5 and halves it every 50k iterations."""
    if not cfg["curriculum"]:
        return cfg["eps"]
    return cfg["curriculum_eps0"] * 0.5 ** (step // cfg["curriculum_every"])


def discretize(t, s, eps, cfg):
    """r = t - h(t), kept in [s, t] (App. D.2 assumes s <= r <= t). The clamp only acts for a large eps
    (the curriculum starts at 0.5) or t close to s; at r = s the target g(x_r, s, s) = x_r is the
    boundary condition of the flow map."""
    return torch.maximum(t - STEP_SIZES[cfg["h"]](t, eps, cfg["mu"]), s)


def time_input(kind, t, mu):
    """c(t), the time the network sees. Eq. (9) asks c'(t) h(t) = const, so that c(t) - c(t - h(t)) is
    the same at every t; for h = eps e^{-mu t} and c(t) ~ t near 0 that is c(t) = (e^{mu t} - 1)/mu
    (App. C.4; Section 3.2's "(eps e^{mu t} - 1)/mu" and Table 7c's "e^{-3.5t}" are misprints of it).
    "linear" is the baseline c(t) = t."""
    return torch.expm1(mu * t) / mu if kind == "exp" else t


def precond(kind, t, sigma_d):
    """(c_in(t), c_out(t)) of Section 3.1 for the OT path (alpha = 1 - t, sigma = t, alpha' = -1, sigma' = 1).

    The paper writes c_in = 1/(sigma_d sqrt(alpha^2 + sigma^2)), c_out = sigma_d sqrt(alpha'^2 + sigma'^2)
    "to maintain unit variance"; that holds when the noise is N(0, sigma_d^2 I) (IMM's convention), not
    for the z ~ N(0, I) of Section 2.1. "unit" (default) is the same intent derived for z ~ N(0, I) and
    data of standard deviation sigma_d: Var(x_t) = sigma_d^2 alpha^2 + sigma^2, Var(u_t) =
    sigma_d^2 alpha'^2 + sigma'^2. "literal" is the printed formula, "none" is c_in = c_out = 1."""
    a, b, da, db = INTERP.coefficients(t)
    if kind == "unit":
        return (sigma_d ** 2 * a ** 2 + b ** 2).rsqrt(), (sigma_d ** 2 * da ** 2 + db ** 2).sqrt()
    if kind == "literal":
        return 1 / (sigma_d * (a ** 2 + b ** 2).sqrt()), sigma_d * (da ** 2 + db ** 2).sqrt()
    return torch.ones_like(t), torch.ones_like(t)


def f_theta(net, x, t, s, cfg, y=None):
    """f_theta(x_t, t, s) = c_out(t) F(c_in(t) x_t, c(t), c(s)), the average velocity of Eq. (3)/(4).

    A CU network has one time input: s = t0 always, so c(s) would be a constant (the paper's CU model
    on ImageNet-64 is likewise a one-time EDM2 network, App. I). VU networks get c(s) as a second time
    (zero-initialised embedder, dit.py)."""
    c_in, c_out = precond(cfg["precond"], t, cfg["sigma_d"])
    s_in = time_input(cfg["time_precond"], s, cfg["mu"]) if cfg["variant"] == "vu" else None
    out = net(common.bcast(c_in, x) * x, time_input(cfg["time_precond"], t, cfg["mu"]), s=s_in, y=y)
    return common.bcast(c_out, x) * out


def g_theta(f, x, t, s):
    """Eq. (3): g(x_t, t, s) = x_t + (s - t) f(x_t, t, s), the state at s on x_t's trajectory."""
    return x + common.bcast(s - t, x) * f(x, t, s)


# ==============================================================================================
# The method: sampling s and t, loss weight (Sections 3.3, 3.4, App. E)

def loss_weight(t, cfg):
    """w(t): the Gamma weight t^gamma e^{-lambda t} (Eq. 14) or the baseline w = 1."""
    return t ** cfg["gamma"] * torch.exp(-cfg["lam"] * t) if cfg["weight"] == "gamma" else torch.ones_like(t)


def t_distribution(cfg, lo, hi):
    """p(t | s) on [s, tT] (Table 1): sine (Eq. 15), cosh (Eq. 16) or uniform, placed on [lo, hi]."""
    kind, a, b = cfg["t_dist"], cfg["dist_a"], cfg["dist_b"]
    if kind == "sine":
        return common.Sine(a, b, lo, hi)
    if kind == "cosh":
        return common.Cosh(a, b, lo, hi)
    return common.Uniform(lo, hi)


def sample_times(n, cfg, device):
    """(t, s, weight) for n samples.

    s: t0 (CU), or the uniform-power density on [t0, tT] (VU, Eq. 17, sampled as in App. E.2). Then t
    on [s, tT] from p(t | s) (first s, then t: App. E.2 shows this keeps the CU task as s -> t0).
    weight = w(t) p_U(t | s) / p(t | s) with p_U uniform on [s, tT]: Section 3.3's importance weight
    w(t)/p(t), measured against the uniform baseline p(t) = 1 of Table 1, so uniform sampling gives
    w(t) exactly and the conditional range [s, tT] does not reweight the VU task.
    The IMM variant of the MMD loss shares (t, s) within each group of m samples (Table 7i).
    With p_diag > 0 (App. G.2) a sample has s = t with that probability, t from MeanFlow's logit-normal
    and weight w(t) (the logit-normal is the intended emphasis there, so it is not divided out)."""
    t0, tT = cfg["t0"], cfg["tT"]
    m = cfg["mmd_group"] if cfg["mmd_share_time"] else 1
    k = n // m
    if cfg["variant"] == "vu":
        s = common.UniformPower(cfg["nu"], t0, tT).sample(k, device)          # Eq. (17), App. E.2
    else:
        s = torch.full((k,), t0, device=device)
    p = t_distribution(cfg, s, tT)
    t = torch.maximum(p.sample(k, device), s).clamp(max=tT)  # rounding to fp32 may leave [s, tT] by an ulp
    t64 = torch.maximum(t.double().clamp(max=tT), s.double())  # ... and fp32(tT) > tT, where the pdf is 0
    weight = loss_weight(t, cfg) / (p.pdf(t64) * (tT - s.double())).float()
    if cfg["p_diag"] > 0:
        diag = torch.rand(k, device=device) < cfg["p_diag"]
        # App. G.2 writes "their log-normal distribution (lognorm(-0.4, 1.0))". We read it as MeanFlow's time
        # sampler (arXiv 2505.13447), which its PyTorch reimplementations compute as t = sigmoid(n), n ~ N(-0.4, 1):
        # a logit-normal under the name lognorm. A log-normal t (e^n) would fall outside [0, 1] a third of the time.
        t_diag = common.LogitNormal(cfg["diag_mean"], cfg["diag_std"], t0, tT).sample(k, device)
        t, s = torch.where(diag, t_diag, t), torch.where(diag, t_diag, s)
        weight = torch.where(diag, loss_weight(t, cfg), weight)
    return tuple(v.repeat_interleave(m) for v in (t, s, weight))


# ==============================================================================================
# The method: the losses

def flow_pair(f, x_t, u, t, s, r):
    """The evaluations of Eq. (5) at x_t and at the Euler step x_r = x_t + (r - t) u_t, through f, the
    common.Passes of f_theta: returns (F_t, F_t_minus, F_r, x_r) with F_t = f(x_t, t, s) the gradient pass,
    F_t_minus its value without gradient and F_r = f-(x_r, r, s), both target passes, since the residual
    multiplies their difference by (s - r)/(t - r), up to about 1000. All three see one dropout mask (and
    label dropout): otherwise their difference, divided by t - r ~ 0.005, would be mask noise."""
    x_r = x_t - common.bcast(t - r, x_t) * u
    F_r = f.target(x_r, r, s)                                                 # f_theta-(x_r, r, s)
    F_t = f.grad(x_t, t, s)                                                   # f_theta(x_t, t, s)
    return F_t, f.detached(F_t, x_t, t, s), F_r, x_r                          # f_theta-(x_t, t, s)


def consistency_residual(u, F_t, F_t_minus, F_r, t, s, r):
    """Eq. (39): E = u_t - f(x_t,t,s) + (s - r) (f-(x_t,t,s) - f-(x_r,r,s)) / (t - r).

    ||E|| has the gradient of Eq. (5), w/(t-s) ||g(x_t,t,s) - g-(x_r,r,s)||, per sample (App. D.1:
    g(x_t) - g-(x_r) = (t - r) E once (s - t) f is split as (r - t) f + (s - r) f-), but its value
    stays O(1) instead of O(h). At r = s the last term is zero (the target is x_r itself)."""
    k = torch.where((s < r) & (r < t), (s - r) / (t - r), 0.0)
    return u - F_t + common.bcast(k, u) * (F_t_minus - F_r)


def analytic_residual(f, x_t, u, t, s):
    """Eq. (6) (Table 7j, "Analytic"): E = u_t - f(x_t,t,s) + (s - t) d/dt f-(x_t,t,s), the limit r -> t
    of Eq. (39). d/dt f- = J_x f- u_t + d_t f- is one forward-mode JVP of f- (a target pass) with tangent
    (u_t, 1) along the conditional path dx_t/dt = u_t, under the gradient pass's dropout mask; f: the
    common.Passes of f_theta."""
    _, dF_dt = common.jvp(f.function(s), (x_t, t), (u, torch.ones_like(t)))
    return u - f.grad(x_t, t, s) + common.bcast(s - t, u) * dF_dt


def mmd_particles(x_t, x_r, F_t, F_t_minus, F_r, t, s, r):
    """The particles of Eq. (40), the form App. G.1 uses for the MMD loss:
        g_t = x_t + (r - t) f(x_t,t,s) + (s - r) f-(x_t,t,s)   (the value of g(x_t,t,s), gradient of (r - t) f),
        g_r = x_r + (s - r) f-(x_r,r,s)                        (g-(x_r,r,s), no gradient),
    so that g_t - g_r = (t - r) E of Eq. (39)."""
    g_t = x_t + common.bcast(r - t, x_t) * F_t + common.bcast(s - r, x_t) * F_t_minus
    g_r = x_r + common.bcast(s - r, x_r) * F_r
    return g_t, g_r


def time_aware_mmd(g_t, g_r, t, r, s, row_weight, m, sigma, time_factor="pair"):
    """The time-aware MMD of Eq. (46) per group of m consecutive samples, with the kernel of Eq. (44),
    k((x1,t1,s1), (x2,t2,s2)) = -||x1 - x2||_2 exp(-(|t1 - t2| + |s1 - s2|) / sigma):
        L_i = 1/m^2 sum_j rho_j sum_k c_jk (2 ||g_t^j - g_r^k|| - ||g_t^j - g_t^k|| - ||g_r^j - g_r^k||),
    g_t^j the particle g(x_t, t, s) of sample j and g_r^k = g-(x_r, r, s) of sample k (Eq. 40).

    time_factor="pair" (default) is Eq. (46) as printed: one factor per pair (j, k),
    c_jk = exp(-(|t^j - r^k| + |s^j - s^k|) / sigma), shared by the three terms. The bracket is then zero
    for every pair once the particles agree (g_t^j = g_r^j), so the loss vanishes at the exact flow map,
    for any times. "particle" applies Eq. (44) to each compared pair with the particles' own times,
    (t^j, t^k), (r^j, r^k) and (t^j, r^k), as Eq. (45) reads: the three terms are then weighted
    differently and the loss does not vanish at the exact map (about 1e-3 at r = t - h(t)).
    Neither form is an MMD^2 in general (the rows are weighted by rho_j and c_jk is not symmetric): either
    can be negative away from the solution. sigma = inf drops the time factor (IMM's shared-time
    comparison, Table 7i). rho_j = row_weight_j = w(t^j, s^j) / (t^j - r^j) is Eq. (46)'s row weight with Eq. (40)'s
    1/(t - r). Returns (G,)."""
    G = len(g_t) // m
    g_t, g_r = g_t.reshape(G, m, -1), g_r.reshape(G, m, -1)                   # (G, m, D)
    t, r, s, rho = (v.reshape(G, m) for v in (t, r, s, row_weight))                 # (G, m)

    def dist(a, b):
        return (a[:, :, None] - b[:, None, :]).norm(dim=-1)                   # (G, m, m)

    def factor(ta, tb):                                                       # Eq. (44)'s time factor
        return torch.exp(-((ta[:, :, None] - tb[:, None, :]).abs() + (s[:, :, None] - s[:, None, :]).abs()) / sigma)
    if time_factor == "pair":                                                 # Eq. (46)
        rows = factor(t, r) * (2 * dist(g_t, g_r) - dist(g_t, g_t) - dist(g_r, g_r))
    else:                                                                     # Eq. (44) per compared pair
        rows = 2 * factor(t, r) * dist(g_t, g_r) - factor(t, t) * dist(g_t, g_t) - factor(r, r) * dist(g_r, g_r)
    return (rho[:, :, None] * rows).sum((1, 2)) / m ** 2                      # (G,)


def draw(x, y, cfg):
    """The random draws of one step, per sample, beside the data x and labels y: the noise z and (t, s,
    weight) of sample_times (consecutive MMD groups of m samples). Drawn once for this rank's batch, so that
    cutting it into micro-batches (--batch-gpu, a multiple of m) changes nothing."""
    t, s, weight = sample_times(len(x), cfg, x.device)
    return dict(x=x, y=y, z=torch.randn_like(x), t=t, s=s, weight=weight)


def gcm_losses(model, batch, cfg, eps):
    """The training loss of a (micro-)batch of draws (Table 1, Sections 3.1-3.5): the l2-norm loss (Eq. 39;
    mmd_group = 1), the time-aware MMD (Eq. 46) or the analytic Eq. (6). Target passes: both ends of the finite
    difference of Eq. (39), or the JVP of Eq. (6); the gradient pass: f(x_t, t, s)."""
    y, t, s, weight = batch["y"], batch["t"], batch["s"], batch["weight"]
    x_t, u = INTERP(batch["x"], batch["z"], t)                               # x_t = (1-t) x + t z, u_t = z - x
    f = common.Passes(model, lambda net, x, t, s: f_theta(net, x, t, s, cfg, y))     # f_theta and f-
    if cfg["jvp"] == "analytic":
        norm = analytic_residual(f, x_t, u, t, s).flatten(1).norm(dim=1)
        return {"loss": (weight * norm).mean(), "residual": norm.mean().detach()}
    r = discretize(t, s, eps, cfg)
    F_t, F_t_minus, F_r, x_r = flow_pair(f, x_t, u, t, s, r)
    if cfg["mmd_group"] == 1:
        norm = consistency_residual(u, F_t, F_t_minus, F_r, t, s, r).flatten(1).norm(dim=1)   # Eq. (39)
        return {"loss": (weight * norm).mean(), "residual": norm.mean().detach()}
    g_t, g_r = mmd_particles(x_t, x_r, F_t, F_t_minus, F_r, t, s, r)
    row_weight = torch.where(t > r, weight / (t - r), 0.0)                   # Eq. (46)'s w(t, s) / (t - r)
    loss = time_aware_mmd(g_t, g_r, t, r, s, row_weight, cfg["mmd_group"], cfg["mmd_sigma"],
                          cfg["mmd_time_factor"]).mean()
    return {"loss": loss, "residual": ((g_t - g_r).flatten(1).norm(dim=1) / (t - r).clamp_min(1e-12)).mean().detach()}


# ==============================================================================================
# Samplers (App. G.1; the restart and pushforward samplers of IMM)

def sampling_times(nfe, t0, tT, t1):
    """[tT, ..., t0] with nfe + 1 entries: [tT, t0] for one step, [tT, t1, t0] for two (t1 = 0.6,
    App. G.1); more steps keep t1 first and then split [t0, t1] evenly (the paper evaluates 1 and 2)."""
    if nfe == 1:
        return [tT, t0]
    return [tT] + torch.linspace(t1, t0, nfe).tolist()


def _full(x, v):
    return torch.full((len(x),), v, device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample_restart(f, x, times, noise):
    """CU: jump to t0 with g(x, t, t0), re-noise the estimate to the next time with fresh noise,
    x_tau = (1 - tau) x0 + tau z', and jump again. One network call per time but the last."""
    x0 = g_theta(f, x, _full(x, times[0]), _full(x, times[-1]))
    for tau in times[1:-1]:
        x0 = g_theta(f, (1 - tau) * x0 + tau * noise(), _full(x, tau), _full(x, times[-1]))
    return x0


@torch.no_grad()
def sample_pushforward(f, x, times):
    """VU: follow the flow map deterministically, x <- g(x, t_i, t_{i+1}), tT -> t1 -> ... -> t0."""
    for a, b in zip(times[:-1], times[1:]):
        x = g_theta(f, x, _full(x, a), _full(x, b))
    return x


def samplers(nets, cfg, data, device):
    """{name: (sample_fn, nfes)} for common.Run, on the EMA weights nets["ema"]. Sampling starts at x_tT = tT z,
    the interpolant at tT with the unknown (1 - tT) x = 0.006 x left out."""
    net, shape = nets["ema"], data.shape

    def sample(n, nfe, labels, g):
        f = lambda x, t, s: f_theta(net, x, t, s, cfg, labels)                   # noqa: E731
        times = sampling_times(nfe, cfg["t0"], cfg["tT"], cfg["t1"])
        x = times[0] * common.randn((n, *shape), g, device)
        if cfg["sampler"] == "pushforward":
            return sample_pushforward(f, x, times)
        return sample_restart(f, x, times, lambda: common.randn((n, *shape), g, device))
    return {"": (sample, cfg["nfe"])}


# ==============================================================================================
# Training loop

def build_model(cfg, data):
    """The backbone: one time input for CU, two (t, s) for VU; c(t) enters its sinusoidal embedding
    multiplied by time_scale (1: the network sees c(t) itself, as the paper's DDPM++ does)."""
    return common.build_backbone(cfg, data, num_classes=data.num_classes if cfg["class_cond"] else 0,
                                 class_dropout=cfg["class_dropout"], two_times=cfg["variant"] == "vu",
                                 time_scale=cfg["time_scale"], dropout=cfg["dropout"])


def train(cfg):
    data = common.load_dataset(cfg["dataset"], cfg["data_path"], cfg["vae"])
    run = common.Run(cfg, RESUMABLE, data)          # seeds every rank: the weights below are reproducible
    if run.batch_gpu % cfg["mmd_group"]:                # an MMD group never spans two micro-batches
        raise common.UserError(f"--mmd-group {cfg['mmd_group']} does not divide the per-process micro-batch "
                               f"{run.batch_gpu} (--batch-size / processes, or --batch-gpu)")
    net = build_model(cfg, data).to(run.device)
    model = run.wrap(net)
    ema = common.make_ema(net, cfg)
    opt = common.make_optimizer(cfg["optimizer"], net.parameters(), cfg["lr"], betas=tuple(cfg["betas"]))
    loader = common.Loader(data, run.batch_per_rank, run.dist, cfg["seed"], cfg["xflip"])
    state = dict(net=net, ema=ema, opt=opt, loader=loader)
    start = run.start(state, f"({cfg['variant'].upper()})", samplers({"ema": ema.model}, cfg, data, run.device), data)
    for step in run.steps(start):
        x, y = loader.next()
        eps = curriculum_eps(cfg, step)
        batch = draw(x, y if cfg["class_cond"] else None, cfg)
        losses = run.update(opt, net.parameters(), lambda b: gcm_losses(model, b, cfg, eps), batch,
                            emas=[(ema, net)])
        if cfg["curriculum"]:
            losses["eps"] = eps
        run.end_step(step, losses)
    run.finish()


# ==============================================================================================
# Presets (Table 1, App. G) and command line

# The GCM column of Table 1; variant-dependent entries (MMD group and width, sampler) are None here
# and filled in by parse_config: CU m = 4, sigma = 0.05, restart; VU m = 2, sigma = 0.1, pushforward.
DEFAULTS = dict(
    variant="cu", t0=0.006, tT=0.994, t1=0.6, h="exp", eps=None, mu=3.5, curriculum=False,
    curriculum_eps0=0.5, curriculum_every=50_000, time_precond="exp", time_scale=1.0, precond="unit",
    sigma_d=0.5, weight="gamma", gamma=1.0, lam=6.0, t_dist="sine", dist_a=None, dist_b=None, nu=4.0,
    p_diag=0.0, diag_mean=-0.4, diag_std=1.0, mmd_group=None, mmd_sigma=None, mmd_share_time=False,
    mmd_time_factor="pair", jvp="fd", sampler=None, dropout=0.0, class_dropout=0.0, optimizer="radam",
    betas=[0.9, 0.999],
)
VARIANT_DEFAULTS = {"cu": dict(mmd_group=4, mmd_sigma=0.05, sampler="restart"),
                    "vu": dict(mmd_group=2, mmd_sigma=0.1, sampler="pushforward")}

# App. G.1: RAdam lr 1e-4, betas (0.9, 0.999), eps 1e-8, batch 512, 400k iterations, EMA 0.9999,
# dropout 0.2, x-flips without EDM augmentation. The paper's network is DDPM++ (56M); ours is a DiT.
_CIFAR = dict(model="DiT-B/2", batch_size=512, steps=400_000, lr=1e-4, optimizer="radam", betas=[0.9, 0.999],
              ema_decay=0.9999, dropout=0.2, xflip=True, sigma_d=0.5, log_every=100, sample_every=10_000,
              ckpt_every=10_000)
PRESETS = {
    "cifar10-cu": dict(_CIFAR, variant="cu"),                  # Table 2 F: m = 4, sigma = 0.05
    "cifar10-vu": dict(_CIFAR, variant="vu"),                  # Table 3 L: m = 2, sigma = 0.1
    # App. G.2 (latent ImageNet-256, from MeanFlow's setting): VU, BF16, eps = 0.02, s = t with
    # probability 0.75 and t ~ logit-normal(-0.4, 1.0) there, nu = 1, gamma = 0.2, l2 loss. Batch,
    # optimizer and EMA are MeanFlow's (not stated in the GCM paper): Adam lr 1e-4, betas (0.9, 0.95),
    # batch 256, EMA 0.9999; 40 epochs of 1.28M images = 200k steps (Table 6b, XL/2).
    "imagenet-latents": dict(model="DiT-XL/2", variant="vu", class_cond=True, batch_size=256, steps=200_000,
                             lr=1e-4, optimizer="adam", betas=[0.9, 0.95], ema_decay=0.9999, bf16=True,
                             sigma_d=1.0, eps=0.02, nu=1.0, gamma=0.2, p_diag=0.75, mmd_group=1,
                             log_every=100, sample_every=10_000, ckpt_every=10_000),
    # Digits (8x8, one channel, std about 0.75): DiT-T/2 on a CPU, 1500 steps of batch 64 like every digits
    # preset (about two minutes here); Adam for the reason given for the toy sets, at 1e-3 (2e-3 was worse:
    # FD 364 against 235 at one step); EMA half-life 5k images (20k made the 2- and 4-step samples worse:
    # FD 299 / 340 against 259 / 265). Longer runs want less: CU at 1e-3 spiked in every seed, after 10.8k /
    # 8.7k / 7.4k steps (seeds 0 / 1 / 2; gradient norm 0.05 -> 0.15-0.8; FD at one step at 12k 154 / 580 /
    # 939); resumed from 6k with --lr 5e-4 none did (72 / 73 / 64 at 12k). VU at 1e-3 did not spike. The
    # README's curves (tests/benchmark.py --curves) keep 1e-3 at every budget.
    "digits": dict(model="DiT-T/2", batch_size=64, steps=1500, lr=1e-3, optimizer="adam", ema_halflife_kimg=5,
                   sigma_d=0.75, log_every=100, ckpt_every=500),
    # 2D toy sets: the toy MLP, data of about unit variance, about a minute on a CPU. Adam, not RAdam:
    # RAdam's variance rectification acts like a warm-up of a few thousand steps at beta2 = 0.999.
    "toy": dict(model="MLP", batch_size=256, steps=3000, lr=1e-3, optimizer="adam", ema_decay=0.995,
                sigma_d=1.0, log_every=200, ckpt_every=1000),
}


def parse_config(argv=None):
    p = common.base_parser("gcm", __doc__)
    a = p.add_argument
    a("--variant", choices=["cu", "vu"], help="upper limit s: cu = constant s = t0; vu = variable s ~ p_up (Eq. 17)")
    a("--t0", type=float, help="t0, the data end of the time range (App. G.1: 0.006)")
    a("--tT", type=float, help="tT, the noise end of the time range (App. G.1: 0.994)")
    a("--t1", type=float, help="t1, the intermediate time of 2-step sampling (App. G.1: 0.6)")
    a("--h", choices=list(STEP_SIZES), help="discretisation h(t) = t - r, Eqs. (26)-(36) (Table 7b; default exp, Eq. 8)")
    a("--eps", type=float, help="eps of h(t) (default 0.005 for exp; other shapes: the App. C.3 integral match)")
    a("--mu", type=float, help="mu of h(t) = eps e^{-mu t} (Eq. 8) and c(t) = (e^{mu t}-1)/mu (Eq. 9); default 3.5")
    a("--curriculum", action=argparse.BooleanOptionalAction, help="discretisation curriculum (App. G.1, Table 7d)")
    a("--curriculum-eps0", type=float, help="initial eps of the curriculum (App. G.1: 0.5)")
    a("--curriculum-every", type=int, help="iterations between halvings of eps (App. G.1: 50000)")
    a("--time-precond", choices=["exp", "linear"], help="time input c(t): exp = (e^{mu t}-1)/mu (Eq. 9), linear = t")
    a("--time-scale", type=float, help="multiplier of c(t) in the network's sinusoidal embedding (1; IMM's 1000t: 1000)")
    a("--precond", choices=["unit", "literal", "none"],
      help="c_in, c_out of Section 3.1: unit = 1/sqrt(sigma_d^2 alpha^2 + sigma^2), sqrt(sigma_d^2 alpha'^2 + "
           "sigma'^2) (for z ~ N(0, I)); literal = the printed 1/(sigma_d sqrt(alpha^2 + sigma^2)), "
           "sigma_d sqrt(alpha'^2 + sigma'^2); none = 1, 1")
    a("--sigma-d", type=float, help="sigma_d, the data standard deviation in c_in/c_out (0.5 for images)")
    a("--weight", choices=["gamma", "uniform"], help="w(t): gamma = t^gamma e^{-lambda t} (Eq. 14), uniform = 1")
    a("--gamma", type=float, help="gamma of the Gamma weight, Eq. (14) (default 1; App. G.2: 0.2)")
    a("--lam", type=float, help="lambda of the Gamma weight, Eq. (14) (default 6)")
    a("--t-dist", choices=["sine", "cosh", "uniform"], help="p(t) on [s, tT]: sine Eq. (15), cosh Eq. (16), uniform")
    a("--dist-a", type=float, help="a of p_sine/p_cosh, Eqs. (15)/(16) (defaults: sine 1, cosh 1.5)")
    a("--dist-b", type=float, help="b of p_sine/p_cosh, Eqs. (15)/(16) (defaults: sine 0.01, cosh 0)")
    a("--nu", type=float, help="nu of the uniform-power density of s, Eq. (17) (VU; default 4)")
    a("--p-diag", type=float, help="probability of s = t (App. G.2: 0.75 on ImageNet latents; VU only)")
    a("--diag-mean", type=float, help="logit-normal mean of t when s = t (App. G.2: -0.4)")
    a("--diag-std", type=float, help="logit-normal std of t when s = t (App. G.2: 1.0)")
    a("--mmd-group", type=int, help="m, samples per MMD group, Eq. (46); 1 = the l2 loss, Eq. (39) (CU 4, VU 2)")
    a("--mmd-sigma", type=common.float_or_inf,
      help="sigma of the time-aware kernel, Eq. (44) (CU 0.05, VU 0.1; inf = no time factor)")
    a("--mmd-time-factor", choices=["pair", "particle"],
      help="time factor of the MMD kernel: pair = Eq. (46) as printed, one factor per pair (default; zero at the "
           "exact map); particle = Eq. (44) with each compared particle's own times")
    a("--mmd-share-time", action=argparse.BooleanOptionalAction,
      help="IMM's MMD: all samples of a group share (t, s) (Table 7i; use with --mmd-sigma inf)")
    a("--jvp", choices=["fd", "analytic"], help="fd = finite difference, Eq. (39); analytic = Eq. (6) by JVP (Table 7j)")
    a("--sampler", choices=["restart", "pushforward"], help="multi-step sampler (default: restart for CU, pushforward for VU)")
    a("--dropout", type=float, help="dropout of the backbone (App. G.1: 0.2)")
    a("--class-dropout", type=float, help="label dropout with --class-cond")
    a("--optimizer", choices=["radam", "adam", "adamw"], help="optimizer (App. G.1: RAdam)")
    a("--betas", type=float, nargs=2, help="optimizer betas (App. G.1: 0.9 0.999)")

    def resolve(args):
        variant = args.variant or ("vu" if args.imagenet_latents or args.dataset == "imagenet-latents" else "cu")
        presets = {"cifar10": PRESETS[f"cifar10-{variant}"], "imagenet-latents": PRESETS["imagenet-latents"],
                   "digits": PRESETS["digits"], "toy": PRESETS["toy"]}
        cfg = common.resolve_config(args, "gcm", DEFAULTS, presets, RESUMABLE)
        for k, v in VARIANT_DEFAULTS[cfg["variant"]].items():
            if cfg[k] is None:
                cfg[k] = v
        shape = {"sine": (1.0, 0.01), "cosh": (1.5, 0.0), "uniform": (0.0, 0.0)}[cfg["t_dist"]]   # Eqs. (15)/(16)
        for key, value in zip(("dist_a", "dist_b"), shape):     # each one not given takes its default
            cfg[key] = value if cfg[key] is None else cfg[key]
        if cfg["eps"] is None:
            cfg["eps"] = 0.005 if cfg["h"] == "exp" else matched_eps(cfg["h"], cfg["mu"])
        check_config(cfg)
        return cfg
    return common.parse(p, argv, resolve)


RESUMABLE = {"sampler", "t1"}           # what --resume may change besides common.RESUMABLE (sampling only)


def check_config(cfg):
    fail = common.UserError
    if not 0 <= cfg["t0"] < cfg["t1"] < cfg["tT"] <= 1:
        raise fail(f"need 0 <= t0 < t1 < tT <= 1, got t0={cfg['t0']}, t1={cfg['t1']}, tT={cfg['tT']}")
    for name in ("eps", "mu", "nu", "mmd_sigma", "curriculum_eps0", "curriculum_every"):
        if not cfg[name] > 0:
            raise fail(f"--{name.replace('_', '-')} must be positive, got {cfg[name]}")
    if not cfg["diag_std"] > 0:
        raise fail(f"--diag-std must be positive, got {cfg['diag_std']}")
    if cfg["t_dist"] == "sine" and not (0 <= cfg["dist_a"] <= 2 and 0 <= cfg["dist_b"] <= 2):
        raise fail(f"--dist-a and --dist-b of the sine density must lie in [0, 2], where sin(pi (a u + b (1 - u)) / 2) "
                   f">= 0 (Eq. 15), got {cfg['dist_a']}, {cfg['dist_b']}")
    if cfg["gamma"] < 0 or cfg["lam"] < 0:
        raise fail(f"--gamma and --lam of the Gamma weight must be >= 0, got {cfg['gamma']}, {cfg['lam']}")
    if cfg["mmd_group"] < 1:
        raise fail(f"--mmd-group must be at least 1, got {cfg['mmd_group']}")
    if cfg["t_dist"] in ("sine", "cosh") and cfg["dist_a"] == cfg["dist_b"]:
        raise fail(f"the {cfg['t_dist']} density needs a != b (Eqs. 15/16)")
    if not 0 <= cfg["p_diag"] < 1:
        raise fail(f"--p-diag must lie in [0, 1), got {cfg['p_diag']}")
    if cfg["variant"] == "cu" and (cfg["p_diag"] > 0 or cfg["sampler"] == "pushforward"):
        raise fail("--p-diag and the pushforward sampler need a flow map to any s: use --variant vu")
    if cfg["mmd_group"] > 1 and (cfg["jvp"] == "analytic" or cfg["p_diag"] > 0):
        raise fail("the MMD loss (Eq. 46) is built from finite differences with r < t: use --mmd-group 1 with "
                   "--jvp analytic or --p-diag")


def main(argv=None):
    cfg = parse_config(argv)
    if cfg["sample_only"]:
        return common.sample_only(cfg, lambda cfg, data: {"ema": build_model(cfg, data)}, samplers)
    return train(cfg)


if __name__ == "__main__":
    common.cli(main)
