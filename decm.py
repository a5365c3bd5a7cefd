"""DE-CM: "Dual-End Consistency Model" (Dong et al., arXiv 2602.10764, https://arxiv.org/abs/2602.10764).

The method in a paragraph. Noise sits at t=0 and data at t=1, z_t = (1-t) z + t x, and a network F
with two times parameterises the flow map (Eq. 9)
    f(x_t, t, s) = x_t + (s - t) F(x_t, t, s),        s >= t,
which moves a point of the probability-flow ODE from time t to time s. Instead of training every
pair (t, s), DE-CM distils a flow-matching teacher v_phi into three families of pairs ("sub-trajectory
clusters", Fig. 3), each a loss that vanishes at the exact flow map:
  - consistency (s = 1), Eq. (10)/(11), Alg. 1 l.8-11: f(x_t, t, 1) is constant along the ODE, so
        g_cm = F - v_t - (1 - t) dF/dt,   dF/dt = JVP of F at (z_t, t, 1) along (v_t, 1, 0),
    and F(z_t, t, 1) regresses on sg(F) - w_1(t) g_cm;
  - instantaneous (s = t), Eq. (17), l.13-14: F(z_t, t, t) regresses on v_t (MSE + cosine loss), the
    boundary condition that keeps training stable (Section 4.3);
  - noise-to-noisy (left end r -> 0, right end t), Eq. (12)-(15), l.17-28: the map from (almost) pure
    noise to any time t, trained every `freq` iterations in its own update with a fresh L_fm;
        g_n2n = (lam + gam) F - lam v_r - gam v_psi - (t - r) JVP of F at (z_r, r, t) along (lam v_r, lam, -gam),
    v_psi = v_phi(f(z_r, r, t), t) (see n2n_residual for why this is the derivable form).
The teacher velocity may be guided (Eq. 18) with the guidance term normalised (Alg. 1 l.6). Sampling
(Section 4.5, Fig. 5): the CM sampler (jump to data, re-noise with fresh noise), Euler on F(x, t, t),
and the Mix sampler (a deterministic noise-to-noisy jump first, CM steps after).

    python decm.py --dataset checkerboard          # FM teacher into OUT/teacher, then the student: minutes on a CPU
    python decm.py --dataset checkerboard --losses fm --out runs/teacher          # or the two stages apart:
    python decm.py --dataset checkerboard --teacher runs/teacher/ckpt.pt
    python decm.py --dataset cifar10                                              # unconditional CIFAR-10
    torchrun --nproc_per_node 8 decm.py --imagenet-latents --teacher T.pt         # AdamW 1e-4, CFG + norm
    python decm.py --sample-only --ckpt runs/decm-cifar10/ckpt.pt --samplers cm mix euler --nfe 4 8 12 16 --fid 50000

Table 3 a-g: --losses fm | cd | fm,cd | fm,n2n | fm,cd,n2n (rows a/b are the teacher, sampled with
--w-cfg 1 / 1.75); h-i: --no-velocity-norm; j-l: --t-schedule segments | arctan | lognorm; m-o: --freq 1 | 3 | 5.
Table 4: --samplers euler cm mix --nfe 4 8 12 16 on a trained student. Without --teacher, a run with
CD or N2N first trains the FM teacher for --teacher-steps into OUT/teacher; with --teacher-steps 0 it
trains from scratch on v_t = x - z (Alg. 1 l.6 comment).

Reading guide, in Algorithm 1's order:
    Eq. (3), the FM teacher ..................................... teacher_loss
    Alg. 1 l.1, the student from the teacher .................... load_teacher, build_net
    Alg. 1 l.2-6 (and l.18-21), noise, times, z_t, z_r, v_phi .. prepare, time_schedule, guided_velocity (Eq. 18)
    Eq. (9), the flow map ........................................ flow_map
    Eq. (10)/(11), Alg. 1 l.8-9, g_cm by a JVP ................... cm_residual, cm_step
    Alg. 1 l.10-11 / l.24-25, v^tar = sg(F) - w g, w_1, w_2 ...... consistency_residual, weight, adaptive_loss
    Eq. (17), Alg. 1 l.13-14, L_fm ............................... fm_loss, cosine_loss
    Alg. 1 l.8-15, the CD + FM update ............................ cd_fm_loss
    Eq. (12)-(15), Alg. 1 l.17-28, g_n2n and the N2N + FM update . n2n_residual, n2n_fm_loss
    Alg. 1, the loop ............................................... train
    Section 4.5, Fig. 5, Table 4, the samplers .................. sample_euler, sample_cm, sample_mix, sample_auto
    Section 5.1, the settings ..................................... PRESETS, ROLE_PRESETS
"""
import argparse
import functools
import math
import os
import sys

import torch
import torch.nn.functional as F

import common
import dit

INTERP = common.NoiseAt0()          # z_t = (1 - t) z + t x: noise z at t = 0, data x at t = 1
LOSS_NAMES = ("fm", "cd", "n2n")


# ==============================================================================================
# The method

def flow_map(x, t, s, F_val):
    """Eq. (9): f(x_t, t, s) = x_t + (s - t) F(x_t, t, s)."""
    return x + common.bcast(s - t, x) * F_val


def guided_velocity(teacher, x, t, y, w_cfg=1.0, eta=1.0, normalize=True):
    """v_phi of Alg. 1 l.5-6 (and l.20-21): the teacher velocity, classifier-free guided when w_cfg != 1.
        plain CFG, Eq. (18):        v = v_cond + (w_cfg - 1) (v_cond - v_uncond)
        velocity normalization, l.6: v = v_cond + (w_cfg - 1) eta (v_cond - v_uncond) / ||v_cond - v_uncond||
    ||.|| is the per-sample RMS (L2 norm / sqrt(#elements)); the paper does not say which norm. With the
    plain L2 norm the guidance step would shrink like 1/sqrt(dimension), so no eta could carry from 2D toy
    data to 32x16x16 latents; with the RMS, eta is the per-element size of the guidance step.

    In training it is a target pass (prepare and n2n_fm_loss run it through common.target): it enters the CD
    and N2N residuals next to F_minus from the JVP, and v_cond - v_uncond is a difference of near-equal
    velocities, taken here in fp32 at least."""
    if y is None or w_cfg == 1.0:
        return teacher(x, t, y=y)
    null = torch.full_like(y, teacher.null_label)
    v_cond, v_uncond = common.wide(teacher(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]))).chunk(2)
    diff = v_cond - v_uncond                                                 # (B, ...)
    if normalize:
        rms = diff.pow(2).mean(dim=tuple(range(1, diff.dim())), keepdim=True).sqrt()
        diff = eta * diff / (rms + 1e-6)                                     # l.6
    return v_cond + (w_cfg - 1) * diff                                       # Eq. (18)


def calibrate_eta(teacher, data, cfg, device, batches=8, batch=64, seed=0):
    """eta of Alg. 1 l.6, measured instead of guessed: the teacher's mean per-sample RMS of v_cond - v_uncond
    over `batches` batches of training images at times from the training schedule. With it the
    normalised guidance term (w_cfg - 1) eta (v_cond - v_uncond) / RMS has, on average over the data, the
    size of plain CFG's (w_cfg - 1) (v_cond - v_uncond), and only its direction is normalised per sample
    (APG-style, which the paper follows); a fixed eta = 1 would set its RMS to w_cfg - 1 whatever the teacher's
    CFG difference is. Runs at the start, before any training draw (the global RNG is left as it was);
    averaged over ranks."""
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for _ in range(batches):
            if data.kind == "toy":
                x, y = data.sample(batch, generator=g)
            else:
                x, y = data.get(torch.randint(0, len(data), (batch,), generator=g))
            x, y = x.to(device), y.to(device)
            z = torch.randn_like(x)
            t = time_schedule(cfg).sample(len(x), device)
            z_t = INTERP(x, z, t)[0]
            null = torch.full_like(y, teacher.null_label)
            v_cond, v_uncond = common.target(teacher, torch.cat([z_t, z_t]), torch.cat([t, t]),
                                             y=torch.cat([y, null])).chunk(2)
            diff = (v_cond - v_uncond).double()
            total += diff.pow(2).flatten(1).mean(1).sqrt().sum()
            count += len(x)
    return float(common.all_reduce_mean(total / count))


def adaptive_loss(residual, p, c, sample_weight=None):
    """Section 4.4, adaptive loss weighting (MeanFlow/FACM): d / sg(d + c)^p per sample, d the mean square of
    residual = prediction - target; p = 0.5 makes it a pseudo-Huber loss, p = 0 plain MSE. sample_weight [B]
    multiplies each sample's term. Not in the paper, our choices: d is the mean over elements and c = 1e-3,
    as in FACM's code (https://github.com/ali-vilab/FACM, losses.py); and it weighs d_1 (L_cm) and d_3
    (L_n2n), the self-supervised terms whose size varies, while d_2 (L_fm, Eq. 17) keeps its plain MSE +
    cosine form, as Eq. (17) writes it."""
    d = residual.pow(2).flatten(1).mean(1)                                 # (B,)
    per_sample = d / (d.detach() + c).pow(p)
    return (per_sample if sample_weight is None else per_sample * sample_weight).mean()


def consistency_residual(F_pred, g, weight):
    """F_theta - v^tar with v^tar = sg(F_theta) - w g (Alg. 1 l.10-11 and l.24-25, Eq. 10 and 15).

    Which F is sg(F)? Eq. (7) and (15) write F_theta - F_theta-, the trained evaluation and its own copy with
    the gradient stopped, and so we read it: the two cancel exactly, the loss's value is ||w g||^2 and its
    gradient that of w g . F_theta, whatever precision the gradient pass ran in. (Algorithm 1 writes sg(F_cm)
    with F_cm from the JVP, the same number in exact arithmetic; but under --bf16 the JVP is fp32 and the
    prediction bf16, and their difference, bf16 rounding noise, would then enter the loss and its gradient.)
    In g itself F is the JVP's exact primal (cm_residual, n2n_residual)."""
    return F_pred - F_pred.detach() + common.bcast(weight, g) * g


def cosine_loss(pred, target):
    """L_cos of Eq. (17): 1 - cosine similarity per sample, over channels at each position (averaged over
    positions), as FACM computes it for latents (https://github.com/ali-vilab/FACM, losses.py). With a single
    channel (the digits) a per-position cosine is +-1, the sign of each pixel, with zero gradient: the cosine
    is then taken over the whole sample, the direction of the velocity as one vector. 2D toy points: over
    their two coordinates."""
    if pred.dim() > 2 and pred.shape[1] == 1:
        pred, target = pred.flatten(1), target.flatten(1)                  # (B, H*W)
    cos = F.cosine_similarity(pred, target, dim=1, eps=1e-8)               # (B,) or (B, H, W)
    return (1 - cos).flatten(1).mean(1) if cos.dim() > 1 else 1 - cos        # (B,)


def fm_loss(F_fm, v_t, cos_weight=1.0):
    """d_2 of Alg. 1 l.14, Eq. (17): ||F(z_t, t, t) - v_t||^2 + L_cos(F(z_t, t, t), v_t), with the squared norm
    taken as the mean over elements, as FACM's code (DE-CM's parent) computes it
    (https://github.com/ali-vilab/FACM, losses.py). The convention sets the balance of the two terms: a summed
    norm would weigh the MSE D times more against the cosine, which lies in [0, 2] (D = 8192 on the paper's
    32x16x16 latents); the paper prints only the norm."""
    mse = (F_fm - v_t).pow(2).flatten(1).mean(1)                             # (B,)
    return (mse + cos_weight * cosine_loss(F_fm, v_t) if cos_weight else mse).mean()


def weight(kind, t, r=None):
    """w_1(t) and w_2(r, t), not given numerically in the paper. "1": the target is sg(F) - g, i.e.
    Eq. (10) with w'(t) = 1 gives v_bar (the "average velocity" target). "1-t" / "t-r": Eq. (7)'s
    w'(t) = w(t) eps (1 - t) / 2 with w = 1/eps, up to the factor 1/2: the gradient of the discrete
    consistency loss, which fades where the map is the identity (s - t -> 0). "1-sqrt(t)": the relaxation
    of FACM, DE-CM's parent (https://github.com/ali-vilab/FACM, losses.py: 1 - t^p with p = 0.5)."""
    if kind == "1":
        return torch.ones_like(t)
    if kind == "1-sqrt(t)":
        return 1 - t.sqrt()
    return 1 - t if kind == "1-t" else t - r


def cm_residual(F_net, z_t, t, v_t, jvp=common.jvp):
    """Alg. 1 l.8-9, Eq. (11): (F_minus, g_cm) with g_cm = F_minus - v_t - (1 - t) dF_minus/dt, where
    dF/dt = [d_x F, d_t F, d_s F] . [v_t, 1, 0] at (z_t, t, s = 1). It is minus the time derivative of
    f(x_t, t, 1) along the ODE, so g_cm = 0 exactly when f(., ., 1) is the consistency function.
    F_net is the module itself (not DDP): the JVP carries no graph (stop-gradient weights)."""
    one = torch.ones_like(t)
    F_minus, dF_dt = jvp(F_net, (z_t, t, one), (v_t, one, torch.zeros_like(t)))   # l.8, Eq. (11)
    return F_minus, F_minus - v_t - common.bcast(1 - t, z_t) * dF_dt               # l.9


def cm_step(g, cfg):
    """The g_cm that Alg. 1 l.10 subtracts, v_cm^tar = sg(F_cm) - w_1(t) g_cm. With --clip-g it is clipped to
    [-1, 1] first (FACM's target, https://github.com/ali-vilab/FACM, losses.py; off by default: the paper
    does not say)."""
    return g.clamp(-1, 1) if cfg["clip_g"] else g


def n2n_residual(F_net, velocity, z_r, r, t, v_r, lam, gam, v_t=None, literal=False, jvp=common.jvp):
    """Alg. 1 l.22-23, Eq. (12)-(15): (F_minus, g_n2n) for the map f(z_r, r, t) from r -> 0 to t.

    Two identities hold for the exact flow map, each a time derivative of f(x_r, r, t) = x_r + (t-r) F:
      left end  (consistency in r, x_r moving along the ODE): v_r - F + (t - r) [d_x F v_r + d_r F] = 0
      right end (f moves with the ODE in t, Eq. 13):          F + (t - r) d_t F - v_phi(f, t) = 0
    gam x right - lam x left gives
      g = (lam + gam) F - lam v_r - gam v_psi - (t - r) JVP(F; (lam v_r, lam, -gam)),  v_psi = v_phi(f, t),
    the tangent of l.22 (lam v_r, lam, -gam) with each velocity paired with its own end. This is the
    default, and it vanishes at the exact flow map for every lam, gam (tests/test_decm.py).

    The paper states it twice, differently. Eq. (15) pairs lam with v_psi and gam with v_phi (only equal
    to the above when lam = gam). Alg. 1 l.23 reads g = (lam + gam) sg(F_cm) - lam (v_r + (t - r) dF_cm)
    - gam v_t: the right-end velocity is v_t, the teacher at the *interpolant* z_t = (1-t) z + t x rather
    than at the predicted point f(z_r, r, t), and the JVP (already scaled by lam) is scaled by lam again.
    literal=True implements l.23, reading F_cm/dF_cm as F_n2n/dF_n2n of l.22 (F_cm does not exist in the
    FM + N2N setting of Table 3f); it does not vanish at the exact map since z_t != f(z_r, r, t)."""
    F_minus, dF = jvp(F_net, (z_r, r, t), (lam * v_r, lam * torch.ones_like(r), -gam * torch.ones_like(t)))  # l.22
    span = common.bcast(t - r, z_r)
    if literal:
        return F_minus, (lam + gam) * F_minus - lam * (v_r + span * dF) - gam * v_t   # l.23 as printed
    v_psi = velocity(flow_map(z_r, r, t, F_minus), t)                               # Eq. (13): v_tea(f_minus, t)
    return F_minus, (lam + gam) * F_minus - lam * v_r - gam * v_psi - span * dF     # Eq. (14)


def teacher_loss(model, batch, y, cfg):
    """The flow-matching teacher (--losses fm without --teacher), Eq. (3): F(z_t, t) regresses on x - z;
    a one-time network (the student adds s later). The cosine term of Eq. (17) only if --fm-cos > 0."""
    L_fm = fm_loss(common.Passes(model).grad(batch["z_t"], batch["t"], y=y), batch["v_t"], cfg["fm_cos"])
    return {"loss": L_fm, "fm": L_fm.detach()}


def cd_fm_loss(model, batch, y, cfg):
    """Alg. 1 l.8-15: L_cm (Eq. 10) + L_fm (Eq. 17), both from one update. Target passes: the JVP of F_cm (and
    the teacher's velocities, in prepare); the gradient pass: F(z_t, t, 1) and F(z_t, t, t), batched in one
    forward (DDP allows one forward per backward). The loss's value is ||w g||^2 whatever the gradient pass's
    precision (consistency_residual)."""
    z_t, t, v_t = batch["z_t"], batch["t"], batch["v_t"]
    with_cd, with_fm = "cd" in cfg["losses"], "fm" in cfg["losses"]
    F = common.Passes(model)
    if with_cd:
        _, g = cm_residual(F.function(y=y), z_t, t, v_t)                                     # l.8-9
    s = [torch.ones_like(t)] * with_cd + [t] * with_fm                                     # l.8: s = 1; l.13: s = t
    k = len(s)
    F_all = F.grad(torch.cat([z_t] * k), torch.cat([t] * k), torch.cat(s),
                   y=None if y is None else torch.cat([y] * k)).chunk(k)                    # k x (B, ...)
    out, loss = {}, 0.0
    if with_cd:
        # l.11, d_1; FACM weighs it by cos(pi t / 2) (1 at the noise end, 0 at the data end), off by default
        cm_weight = torch.cos(math.pi / 2 * t) if cfg["cm_weight"] == "cos" else None
        residual = consistency_residual(F_all[0], cm_step(g, cfg), weight(cfg["w1"], t))     # l.10
        out["cm"] = adaptive_loss(residual, cfg["adaptive_p"], cfg["adaptive_c"], cm_weight)
        out["g_cm"] = g.pow(2).mean().sqrt()                                              # RMS, a diagnostic
        loss = loss + out["cm"]
    if with_fm:
        out["fm"] = fm_loss(F_all[-1], v_t, cfg["fm_cos"])                                  # l.14, d_2
        loss = loss + out["fm"]
    return {"loss": loss, **{k_: v.detach() for k_, v in out.items()}}                      # l.15: their sum


def n2n_fm_loss(model, velocity, batch, y, cfg):
    """Alg. 1 l.18-28: L_n2n (Eq. 15) + a fresh L_fm (l.26-27), one update of their sum (l.28). Target passes:
    the JVP of F_n2n and the velocity v_psi at f(z_r, r, t); the gradient pass: F(z_r, r, t) and F(z_t, t, t).

    velocity(x, t, y): v_phi, for v_psi; None when training from scratch, where the student's own
    instantaneous velocity sg(F(x, t, t)) (what L_fm trains) stands in for the teacher."""
    z_r, r, t, v_r = batch["z_r"], batch["r"], batch["t"], batch["v_r"]
    F = common.Passes(model)

    def v_phi(net, x, s):                               # the teacher, or from scratch the student's own F(x, s, s)
        return velocity(x, s, y) if velocity else net(x, s, s, y=y)
    _, g = n2n_residual(F.function(y=y), lambda x, s: common.target(v_phi, F.net, x, s), z_r, r, t, v_r,
                        cfg["lam"], cfg["gamma"], batch["v_t"], cfg["n2n_form"] == "literal")   # l.22-23
    with_fm = "fm" in cfg["losses"]
    if with_fm:                                         # F(z_r, r, t) and F(z_t, t, t) in one DDP forward
        y2 = None if y is None else torch.cat([y, y])
        F_n2n, F_fm = F.grad(torch.cat([z_r, batch["z_t"]]), torch.cat([r, t]), torch.cat([t, t]), y=y2).chunk(2)
    else:
        F_n2n = F.grad(z_r, r, t, y=y)
    residual = consistency_residual(F_n2n, g, weight(cfg["w2"], t, r))                   # l.24
    out = {"n2n": adaptive_loss(residual, cfg["adaptive_p"], cfg["adaptive_c"])}           # l.25, d_3
    loss = out["n2n"]
    if with_fm:
        out["fm_n2n"] = fm_loss(F_fm, batch["v_t"], cfg["fm_cos"])                         # l.26-27, d_2
        loss = loss + out["fm_n2n"]
    out["g_n2n"] = g.pow(2).mean().sqrt()                                                # RMS, a diagnostic
    return {"loss": loss, **{k: v.detach() for k, v in out.items()}}


# ----------------------------------------------------------------------------------------------
# Time schedules (Section 4.4, Table 3 j-l)

class ArctanNormal:
    """"arctan-norm": sCM's log-normal noise level tau ~ N(m, s^2) pushed through the TrigFlow angle,
    rescaled to [0, 1] with data at 1: t = 1 - (2/pi) arctan(e^tau) (the same construction as FACM's
    default sampler, https://github.com/ali-vilab/FACM, losses.py, whose defaults m = -0.8, s = 1.6 are
    ours too)."""

    def __init__(self, m=-0.8, s=1.6):
        self.m, self.s = m, s

    def sample(self, n, device="cpu"):
        tau = self.m + self.s * torch.randn(n, device=device, dtype=torch.float64)
        return (1 - 2 / math.pi * torch.atan(torch.exp(tau))).float()

    def cdf(self, t):
        # t <= u  <=>  tau >= log tan(pi (1 - u) / 2)
        u = torch.as_tensor(t, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        z = (torch.log(torch.tan(math.pi * (1 - u) / 2)) - self.m) / self.s
        return 0.5 * (1 - torch.erf(z / math.sqrt(2)))


class Measured:
    """Values a run measures once at its start (eta "auto") and keeps in its checkpoint, so that a resumed
    run uses the same ones."""

    def __init__(self, **values):
        self.values = values

    def __getitem__(self, key):
        return self.values[key]

    def __setitem__(self, key, value):
        self.values[key] = value

    def logged(self):
        return {k: v for k, v in self.values.items() if isinstance(v, float)}

    def state_dict(self):
        return dict(self.values)

    def load_state_dict(self, state):
        self.values.update(state)


def time_schedule(cfg):
    """t of Alg. 1 l.3. "segments": uniform over the N+1 endpoints of N equal segments (Section 4.4,
    the paper's choice; N = 16 puts every 1/2/4/8/16-step sampler time on the grid)."""
    kind = cfg["t_schedule"]
    if kind == "segments":
        return common.Segments(cfg["segments"])
    if kind == "uniform":
        return common.Uniform(0.0, 1.0)
    if kind == "lognorm":
        return common.LogitNormal(cfg["t_mean"], cfg["t_std"])                   # t = sigmoid(u), u ~ N(m, s^2)
    return ArctanNormal(cfg["t_mean"], cfg["t_std"])


def prepare(x, y, velocity, cfg, with_n2n):
    """Alg. 1 l.2-6 (and l.18-21 on N2N iterations): noise, times, interpolants and v_phi, per sample, for
    this rank's batch: the draws of the iteration, shared by its CD+FM and N2N+FM updates and cut into their
    micro-batches (--batch-gpu). On N2N iterations the teacher sees z_t and z_r in one batched call.
    velocity: the guided teacher, or None (from scratch: v_t = v_r = x - z, the conditional velocity, l.6
    comment)."""
    z = torch.randn_like(x)                                                    # l.2
    t = time_schedule(cfg).sample(len(x), x.device)                            # l.3
    z_t, v_cond = INTERP(x, z, t)                                              # l.4
    batch = dict(y=y, z=z, t=t, z_t=z_t)
    if with_n2n:
        r = torch.minimum(cfg["r_max"] * torch.rand(len(x), device=x.device), t)   # l.18: r -> 0 (and r <= t)
        batch.update(r=r, z_r=INTERP(x, z, r)[0])                              # l.19
    if velocity is None:
        batch.update(v_t=v_cond, v_r=v_cond)
    elif with_n2n:                                                             # l.5 and l.20 in one call
        y2 = None if y is None else torch.cat([y, y])
        both = common.target(velocity, torch.cat([z_t, batch["z_r"]]), torch.cat([t, batch["r"]]), y2)   # (2B, ...)
        batch["v_t"], batch["v_r"] = both.chunk(2)
    else:
        batch["v_t"] = common.target(velocity, z_t, t, y)                      # l.5-6, a target pass
    return batch


# ==============================================================================================
# Samplers (Section 4.5, Fig. 5). F(x, t, s, y) is the student network; time grids are uniform.

def _times(n, i, x):
    return torch.full((len(x),), i / n, device=x.device)


@torch.no_grad()
def sample_cm(F_net, x, nfe, y=None, generator=None, start=0):
    """Fig. 5b: at t_i = i/nfe jump to data, x1 = f(x, t_i, 1), and re-noise x1 with fresh noise to
    t_{i+1}; the last jump is the sample. start > 0 begins at t_start (the Mix sampler's CM phase)."""
    for i in range(start, nfe):
        t = _times(nfe, i, x)
        one = torch.ones_like(t)
        x1 = flow_map(x, t, one, F_net(x, t, one, y))
        if i + 1 < nfe:
            t_next = common.bcast(_times(nfe, i + 1, x), x)
            x = (1 - t_next) * common.randn(x.shape, generator, x.device) + t_next * x1
    return x1


@torch.no_grad()
def sample_euler(F_net, x, nfe, y=None, generator=None):
    """Fig. 5a: Euler on the PF-ODE dx/dt = F(x, t, t) (Eq. 4), nfe uniform steps from 0 to 1."""
    for i in range(nfe):
        t = _times(nfe, i, x)
        x = x + F_net(x, t, t, y) / nfe
    return x


@torch.no_grad()
def sample_mix(F_net, x, nfe, y=None, generator=None, split=1, first="euler"):
    """Fig. 5c: `split` deterministic steps first, then CM steps from t_split, so the early, noisiest
    steps neither predict data nor inject fresh noise (Section 4.5). split is capped at nfe - 1 (the last
    evaluation lands on data); with one NFE this is the CM map.

    first="euler" (default, sampler "mix") is the paper's: "initiated with the Euler ODE and then followed
    by the CMs paradigm", Euler steps x <- x + (t_{i+1} - t_i) F(x, t_i, t_i) on the instantaneous velocity
    that L_fm trains. first="flowmap" (sampler "mix-flowmap") takes flow-map steps x <- f(x, t_i, t_{i+1})
    (Eq. 9) instead: one jump out of pure noise along the noise-to-noisy map; but no loss trains the pairs
    (t_i, t_{i+1}) with t_i > 0 that later flow-map steps of a split of 2 or more would use."""
    k = min(split, nfe - 1)
    for i in range(k):
        t, s = _times(nfe, i, x), _times(nfe, i + 1, x)
        if first == "euler":
            x = x + F_net(x, t, t, y) / nfe
        else:
            x = flow_map(x, t, s, F_net(x, t, s, y))
    return sample_cm(F_net, x, nfe, y, generator, start=k)


@torch.no_grad()
def sample_auto(F_net, x, nfe, y=None, generator=None, split=1):
    """The paper's choice per budget (Section 4.5): CM for 1-2 NFE, Mix for 4-16, Euler above 16. 3 NFE is in
    none of the paper's ranges; we give it to Mix, the sampler made for the budgets where the CM sampler's
    re-noising accumulates error (Table 4)."""
    if nfe <= 2:
        return sample_cm(F_net, x, nfe, y, generator)
    if nfe <= 16:
        return sample_mix(F_net, x, nfe, y, generator, split)
    return sample_euler(F_net, x, nfe, y, generator)


SAMPLERS = {"cm": sample_cm, "mix": sample_mix, "mix-flowmap": functools.partial(sample_mix, first="flowmap"),
            "euler": sample_euler}


def samplers(nets, cfg, data, device):
    """{name: (sample_fn, nfes)} for common.Run, on the EMA weights nets["ema"]. The student: "" is sample_auto,
    plus the --samplers named (Table 4). The teacher: Euler on F(x, t) with plain CFG (Eq. 18)."""
    net, shape = nets["ema"], data.shape
    if cfg["role"] == "teacher":
        def F_net(x, t, s, y):
            return guided_velocity(net, x, t, y, cfg["w_cfg"], normalize=False)
        fns = {"": (sample_euler, {})}
    else:
        def F_net(x, t, s, y):
            return net(x, t, s, y=y)
        fns = {"": (sample_auto, {"split": cfg["mix_split"]})}
        fns.update({name: (SAMPLERS[name], {"split": cfg["mix_split"]} if name.startswith("mix") else {})
                    for name in cfg["samplers"]})

    def bind(fn, kw):
        return lambda n, nfe, y, g: fn(F_net, common.randn((n, *shape), g, device), nfe, y, g, **kw)
    return {name: (bind(fn, kw), cfg["nfe"]) for name, (fn, kw) in fns.items()}


# ==============================================================================================
# Training loop

def build_net(cfg, data, role):
    """The teacher is a one-time network F(x, t); the student adds s (zero-initialised embedder)."""
    num_classes = data.num_classes if cfg["class_cond"] else 0
    return common.build_backbone(cfg, data, num_classes=num_classes, time_scale=cfg["time_scale"],
                                 class_dropout=cfg["class_dropout"] if role == "teacher" else 0.0,
                                 two_times=role == "student")


def load_teacher(cfg, data):
    """(teacher, student init state): the teacher's EMA weights, frozen; the student starts from the same
    weights (Alg. 1 l.1) and, its s embedder being zero, computes exactly the teacher's function."""
    ckpt = common.load_checkpoint(cfg["teacher"], "decm")
    teacher = build_net(cfg, data, "teacher")
    try:
        dit.load_backbone(teacher, ckpt["ema"])
    except ValueError as e:
        raise common.UserError(f"teacher {cfg['teacher']}: {e}") from None
    return teacher.eval().requires_grad_(False), ckpt["ema"]


def train(cfg, close=True):
    data = common.load_dataset(cfg["dataset"], cfg["data_path"], cfg["vae"])
    role = cfg["role"]
    teacher, init = load_teacher(cfg, data) if cfg["teacher"] else (None, None)
    run = common.Run(cfg, RESUMABLE, data)          # seeds every rank: the weights below are reproducible
    net = build_net(cfg, data, role)
    velocity = None
    guidance = Measured(eta=cfg["eta"])          # eta "auto" is measured once and kept in the checkpoint
    if teacher is not None:
        dit.load_backbone(net, init)                                         # Alg. 1 l.1
        teacher = teacher.to(run.device)

        def velocity(x, t, y):                                               # l.5-6 / l.20-21
            return guided_velocity(teacher, x, t, y, cfg["w_cfg"], guidance["eta"], cfg["velocity_norm"])
    net = net.to(run.device)
    model = run.wrap(net)
    ema = common.make_ema(net, cfg)
    opt = common.make_optimizer("adamw", net.parameters(), cfg["lr"], weight_decay=cfg["weight_decay"])
    loader = common.Loader(data, run.batch_per_rank, run.dist, cfg["seed"], cfg["xflip"])
    state = dict(model=net, ema=ema, opt=opt, loader=loader, guidance=guidance)
    start = run.start(state, "(flow-matching teacher, Eq. 3)" if role == "teacher" else
                      f"(student: {','.join(cfg['losses'])})", samplers({"ema": ema.model}, cfg, data, run.device), data)
    if guidance["eta"] == "auto" and teacher is not None and cfg["w_cfg"] != 1 and cfg["velocity_norm"]:
        guidance["eta"] = calibrate_eta(teacher, data, cfg, run.device)
        run.note(f"eta = {guidance['eta']:.4g}: the teacher's mean RMS of v_cond - v_uncond (Alg. 1 l.6, calibrated)")
    main_loss = teacher_loss if role == "teacher" else cd_fm_loss
    held = {}                                 # the latest N2N update's figures, logged at every step
    for step in run.steps(start):
        x, y = loader.next()
        with_n2n = role == "student" and "n2n" in cfg["losses"] and step % cfg["freq"] == 0   # l.17
        with run.precision():                                               # the teacher's passes (l.5, l.20)
            batch = prepare(x, y if cfg["class_cond"] else None, velocity, cfg, with_n2n)
        losses = {}
        if {"cd", "fm"} & set(cfg["losses"]):                                # l.15
            losses = run.update(opt, net.parameters(), lambda b: main_loss(model, b, b["y"], cfg), batch,
                                emas=[(ema, net)])
        if with_n2n:                                                         # l.28
            held = run.update(opt, net.parameters(), lambda b: n2n_fm_loss(model, velocity, b, b["y"], cfg),
                              batch, emas=[(ema, net)])
            held["grad_norm_n2n"] = held.pop("grad_norm")
            held.pop("loss")
        run.end_step(step, {**losses, **held, **guidance.logged()})
    run.finish(close=close)


def train_teacher_first(cfg, argv):
    """Stage 1 when a student has no --teacher and --teacher-steps > 0: the FM teacher, trained by this
    script with the same flags into OUT/teacher (continued there with --resume, skipped once done),
    becomes the student's --teacher."""
    path = os.path.join(cfg["out"], "teacher", "ckpt.pt")
    exists = os.path.isfile(path)
    if not (exists and common.load_checkpoint(path, "decm")["step"] >= cfg["teacher_steps"]):
        if exists and not cfg["resume"]:
            raise common.UserError(f"{os.path.dirname(path)} holds an unfinished teacher; continue it with --resume, "
                                   f"or choose another --out")
        args = [a for a in argv if a != "--resume"] + ["--resume"] * exists
        tcfg = parse_config(args + ["--losses", "fm", "--steps", str(cfg["teacher_steps"]), "--out",
                                    os.path.dirname(path)])
        tcfg.update(fid=0)
        train(tcfg, close=False)                         # under torchrun the process group carries on
    cfg["teacher"] = path
    cfg["resume"] = cfg["resume"] and os.path.isfile(os.path.join(cfg["out"], "ckpt.pt"))
    inherit_from_teacher(cfg, {})


# ==============================================================================================
# Presets and command line

# time_scale 10, not the DiT's 1000: the JVPs differentiate F in t and s, and the embedding's
# frequencies (up to time_scale rad per unit time) set the size of those derivatives; at 1000 the CD
# residual of the toy student grew to ~1e3 and training diverged (cf. sCM Section 4.1 on low time frequencies).
DEFAULTS = dict(
    losses="fm,cd,n2n", teacher=None, teacher_steps=0, freq=3, w1="1", w2="1", lam=1.0, gamma=1.0, r_max=0.05,
    n2n_form="derived", t_schedule=None, segments=16, t_mean=None, t_std=None, adaptive_p=0.5, adaptive_c=1e-3,
    fm_cos=None, w_cfg=1.0, eta="auto", velocity_norm=True, clip_g=False, cm_weight="1", class_dropout=0.1,
    weight_decay=0.0, time_scale=10.0,
    samplers=[], mix_split=1, nfe=[1, 2, 4],
)
# what the teacher (plain flow matching, Eq. 3) and the student (Alg. 1) use where a flag is not given
ROLE_DEFAULTS = {"teacher": dict(t_schedule="uniform", fm_cos=0.0),
                 "student": dict(t_schedule="segments", fm_cos=1.0)}
PRESETS = {
    # Section 5.1: AdamW lr 1e-4, class-conditional with CFG, velocity normalization on. The paper's
    # backbone is LightningDiT-XL/1 on 32x16x16 VA-VAE latents; ours is DiT-XL/2 on whatever the shards
    # hold. Not given in the paper (our choices): batch 256, 250 epochs of 1.28M images (Table 1
    # caption) = 1.25M steps, EMA 0.9999, w_cfg 1.75 (the guided teacher of Table 3b).
    "imagenet-latents": dict(model="DiT-XL/2", batch_size=256, steps=1_250_000, lr=1e-4, ema_decay=0.9999,
                             class_cond=True, w_cfg=1.75, teacher_steps=400_000, log_every=100,
                             sample_every=10_000, ckpt_every=10_000),
    # No CIFAR-10 run in the paper: the ImageNet optimiser, unconditional (--class-cond adds labels and
    # --w-cfg guidance), DiT-B/2 on 32x32 pixels, x-flips, EMA half-life 500k images.
    "cifar10": dict(model="DiT-B/2", batch_size=128, steps=400_000, lr=1e-4, ema_halflife_kimg=500, xflip=True,
                    teacher_steps=400_000, log_every=100, sample_every=10_000, ckpt_every=10_000),
    # Digits (8x8, one channel): DiT-T/2 on a CPU, 1500 steps like every digits preset; the roles differ below.
    "digits": dict(model="DiT-T/2", batch_size=64, steps=1500, lr=1e-3, ema_halflife_kimg=5, teacher_steps=1500,
                   log_every=100, ckpt_every=500, samplers=["cm", "mix", "euler"]),
    # 2D toy sets: the MLP; teacher and student each train in about a minute on a laptop CPU.
    "toy": dict(model="MLP", batch_size=256, steps=2000, lr=1e-3, ema_decay=0.995, teacher_steps=2000,
                log_every=100, ckpt_every=1000, samplers=["cm", "mix", "euler"]),
}


# Where a preset's teacher and student differ (flags given on the command line still win). Digits: the
# teacher is plain flow matching at the learning rate that trained it best in 1500 steps (2e-3: FD 96 at
# 100 Euler steps, 1e-3: 125); the student's update costs about five flow-matching updates, so it takes
# batch 32, which keeps its run within about five minutes on 2 cores (batch 64: about seven).
ROLE_PRESETS = {"digits": {"teacher": dict(lr=2e-3), "student": dict(batch_size=32)}}


def parse_losses(text):
    names = list(text) if isinstance(text, list) else [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in LOSS_NAMES]
    if bad or not names or len(set(names)) != len(names):
        raise common.UserError(f"--losses takes a comma list of {', '.join(LOSS_NAMES)} (e.g. fm,cd,n2n), got {text!r}")
    return [n for n in LOSS_NAMES if n in names]


def inherit_from_teacher(cfg, given):
    """The student's architecture is the teacher's: model, time scale and labels come from its config;
    a conflicting explicit flag, another data set or a teacher that is itself a student is an error."""
    tcfg = common.load_checkpoint(cfg["teacher"], "decm")["cfg"]
    if tcfg.get("role") != "teacher":
        raise common.UserError(f"{cfg['teacher']} is a DE-CM student, not a flow-matching teacher "
                               f"(train one with --losses fm and no --teacher)")
    if tcfg["dataset"] != cfg["dataset"]:
        raise common.UserError(f"the teacher {cfg['teacher']} was trained on {tcfg['dataset']}, not {cfg['dataset']}")
    for key, flag in (("model", "--model"), ("time_scale", "--time-scale"), ("class_cond", "--class-cond")):
        if key in given and given[key] != tcfg[key]:
            raise common.UserError(f"{flag} {given[key]} conflicts with the teacher's {tcfg[key]}")
        cfg[key] = tcfg[key]


def parse_config(argv=None):
    p = common.base_parser("decm", __doc__)
    a = p.add_argument
    a("--losses", help="comma list of fm (Eq. 17), cd (Eq. 10), n2n (Eq. 15): Table 3 a-g. 'fm' without "
                       "--teacher trains the flow-matching teacher (default fm,cd,n2n)")
    a("--teacher", help="checkpoint of the FM teacher F_tea (decm.py --losses fm); without it CD/N2N train "
                        "from scratch on v_t = x - z (Alg. 1 l.6)")
    a("--teacher-steps", type=int, help="without --teacher: first train the FM teacher for this many steps "
      "into OUT/teacher (presets: toy 2000, images 400k); 0 trains the student from scratch")
    a("--freq", type=int, help="N2N update every freq iterations, Alg. 1 l.17 (Table 3 m-o; default 3)")
    a("--w1", choices=["1", "1-t", "1-sqrt(t)"],
      help="w_1(t) of Alg. 1 l.10: 1 (Eq. 10 with w'=1, default), 1-t (Eq. 7) or FACM's 1-sqrt(t)")
    a("--clip-g", action=argparse.BooleanOptionalAction,
      help="clip g_cm to [-1, 1] in the CM target of Alg. 1 l.10 (FACM's; default off)")
    a("--cm-weight", choices=["1", "cos"], help="per-sample weight of L_cm: 1 (default) or FACM's cos(pi t / 2)")
    a("--w2", choices=["1", "t-r"], help="w_2(r, t) of Alg. 1 l.24: 1 (default) or t-r")
    a("--lam", type=float, help="lambda of Eq. (14)/(15), weight of the left-end (r) identity (default 1)")
    a("--gamma", type=float, help="gamma of Eq. (14)/(15), weight of the right-end (t) identity (default 1)")
    a("--r-max", type=float, help="r ~ U[0, r_max], the 'r -> 0' of Alg. 1 l.18 (default 0.05)")
    a("--n2n-form", choices=["derived", "literal"],
      help="g_n2n: derived = Eq. (14) with v_psi at f(z_r, r, t) (default); literal = Alg. 1 l.23 as printed")
    a("--t-schedule", choices=["segments", "uniform", "lognorm", "arctan"],
      help="t of Alg. 1 l.3 (Table 3 j-l): uniform-with-N-segments (student default), uniform (teacher "
           "default), log-norm, arctan-norm")
    a("--segments", type=int, help="N of the uniform-with-N-segments schedule, Section 4.4 (default 16)")
    a("--t-mean", type=float, help="mean of the normal behind log-norm / arctan-norm (defaults 0 / FACM's -0.8)")
    a("--t-std", type=float, help="std of the normal behind log-norm / arctan-norm (defaults 1 / FACM's 1.6)")
    a("--adaptive-p", type=float, help="p of the adaptive loss weighting d / sg(d + c)^p, Section 4.4 (default 0.5)")
    a("--adaptive-c", type=float, help="c of the adaptive loss weighting (default 1e-3)")
    a("--fm-cos", type=float, help="weight of L_cos in L_fm, Eq. (17) (student default 1; teacher default 0, Eq. 3)")
    a("--w-cfg", type=float, help="w_cfg of Eq. (18) for the teacher velocity (default 1 = no guidance)")
    a("--eta", help="eta of Alg. 1 l.6, the RMS size of the normalised guidance direction: a number, or auto "
                    "(default): the teacher's mean RMS of v_cond - v_uncond, measured at the start and logged")
    a("--velocity-norm", action=argparse.BooleanOptionalAction,
      help="velocity normalization, Alg. 1 l.6 (default on); --no-velocity-norm is plain CFG, Eq. (18), Table 3 i")
    a("--class-dropout", type=float, help="label dropout of the teacher, for its unconditional velocity (default 0.1)")
    a("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    a("--time-scale", type=float, help="time embedding scale: time_scale * t goes into the sinusoid (default 10; "
                                       "students inherit the teacher's)")
    a("--samplers", nargs="*", choices=list(SAMPLERS), help="extra samplers evaluated over --nfe (Table 4): "
      "cm (Fig. 5b), mix (Fig. 5c: Euler steps, then CM), mix-flowmap (flow-map steps, then CM), euler on "
      "F(x,t,t) (Fig. 5a); the main one picks per NFE")
    a("--mix-split", type=int, help="deterministic steps of the Mix sampler before its CM steps (default 1: our "
      "choice, the paper does not give the split)")

    def resolve(args):
        given = {k: v for k, v in vars(args).items() if v is not None}
        cfg = common.resolve_config(args, "decm", DEFAULTS, PRESETS, RESUMABLE)
        if not cfg["sample_only"]:
            cfg["losses"] = parse_losses(cfg["losses"])
            cfg["role"] = "teacher" if cfg["losses"] == ["fm"] and not cfg["teacher"] else "student"
            for key, value in ROLE_DEFAULTS[cfg["role"]].items():
                cfg[key] = value if cfg[key] is None else cfg[key]
            if "resume_of" not in cfg:                     # a resumed run keeps its own settings
                for key, value in ROLE_PRESETS.get(cfg["dataset"], {}).get(cfg["role"], {}).items():
                    if key not in given:
                        cfg[key] = value
            if cfg["teacher"]:
                inherit_from_teacher(cfg, given)
            if cfg["w_cfg"] != 1.0 and cfg["role"] == "student" and not cfg["teacher"] and not cfg["teacher_steps"]:
                raise common.UserError("--w-cfg guides a teacher: give --teacher or --teacher-steps > 0 "
                                       "(from scratch, v_t = x - z has no guidance)")
        arctan = cfg["t_schedule"] == "arctan"                  # FACM's (-0.8, 1.6) where the schedule is FACM's
        cfg["t_mean"] = (-0.8 if arctan else 0.0) if cfg["t_mean"] is None else cfg["t_mean"]
        cfg["t_std"] = (1.6 if arctan else 1.0) if cfg["t_std"] is None else cfg["t_std"]
        if cfg["eta"] != "auto":
            try:
                cfg["eta"] = float(cfg["eta"])
            except ValueError:
                raise common.UserError(f"--eta takes a number or auto, got {cfg['eta']!r}") from None
        check_config(cfg)
        return cfg
    return common.parse(p, argv, resolve)


RESUMABLE = {"samplers", "mix_split"}   # what --resume may change besides common.RESUMABLE (sampling only)


def check_config(cfg):
    """DE-CM's own flags: one line for the first that is out of range."""
    checks = [(cfg["eta"] == "auto" or 0 < cfg["eta"] < math.inf, f"--eta must be > 0 and finite, got {cfg['eta']}"),
              (cfg["freq"] >= 1, f"--freq must be >= 1, got {cfg['freq']}"),
              (0 <= cfg["r_max"] < 1, f"--r-max must lie in [0, 1), got {cfg['r_max']}"),
              (cfg["segments"] >= 1, f"--segments must be >= 1, got {cfg['segments']}"),
              (cfg["mix_split"] >= 1, f"--mix-split must be >= 1, got {cfg['mix_split']}"),
              (cfg["teacher_steps"] >= 0, f"--teacher-steps must be >= 0, got {cfg['teacher_steps']}"),
              (cfg["t_std"] > 0, f"--t-std must be > 0, got {cfg['t_std']}"),
              (cfg["lam"] >= 0 and cfg["gamma"] >= 0 and cfg["lam"] + cfg["gamma"] > 0,
               f"--lam and --gamma must be >= 0, not both 0, got {cfg['lam']}, {cfg['gamma']}"),
              (cfg["adaptive_c"] > 0 and cfg["adaptive_p"] >= 0, "--adaptive-c must be > 0 and --adaptive-p >= 0"),
              (cfg["w_cfg"] >= 1, f"--w-cfg must be >= 1, got {cfg['w_cfg']}"),
              (cfg["fm_cos"] >= 0, f"--fm-cos must be >= 0, got {cfg['fm_cos']}"),
              (cfg["w_cfg"] == 1.0 or cfg["class_cond"], "--w-cfg needs a class-conditional model (--class-cond)")]
    for ok, message in checks:
        if not ok:
            raise common.UserError(message)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(argv)
    if cfg["sample_only"]:
        return common.sample_only(cfg, lambda cfg, data: {"ema": build_net(cfg, data, cfg["role"])}, samplers)
    if cfg["role"] == "student" and not cfg["teacher"] and cfg["teacher_steps"] > 0:
        # the two stages are one run: --resume continues whichever was interrupted, and OUT is refused
        # (before the teacher starts) if it already holds a finished run and --resume is missing
        student, teacher = (os.path.join(cfg["out"], *p, "ckpt.pt") for p in ((), ("teacher",)))
        if os.path.isfile(student) and not cfg["resume"]:
            raise common.UserError(f"{cfg['out']} already holds a run ({student}); continue it with --resume, or "
                                   f"choose another --out")
        if cfg["resume"] and not (os.path.isfile(student) or os.path.isfile(teacher)):
            raise common.UserError(f"--resume: there is no checkpoint {student} (or {teacher}) to continue")
        train_teacher_first(cfg, argv)
    return train(cfg)


if __name__ == "__main__":
    common.cli(main)
