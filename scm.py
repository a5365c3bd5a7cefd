"""sCM: "Simplifying, Stabilizing & Scaling Continuous-Time Consistency Models" (Lu & Song, arXiv 2410.11081,
https://arxiv.org/abs/2410.11081). Algorithm 1 is in its Appendix A, the settings in Appendix G.

The method in a paragraph. TrigFlow (Section 3) puts data at t=0 and noise at t=pi/2:
    x_t = cos(t) x0 + sin(t) z,   z ~ N(0, sigma_d^2 I),   v_t = cos(t) z - sin(t) x0,
and one network F_theta(x_t / sigma_d, t) serves as the diffusion model (PF-ODE Eq. 3: dx_t/dt =
sigma_d F, trained by Eq. 4: ||sigma_d F - v_t||^2) and as the consistency model (Eq. 5):
    f_theta(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, t),      f(x, 0) = x.
Continuous-time consistency training makes f constant along PF-ODE trajectories; its gradient (Eq. 2)
is that of an MSE against a target built from the tangent df/dt (Eq. 6). With the prior weighting
1/(sigma_d tan t), tangent normalisation and a learned weight w_phi(t), the loss is (Eq. 8, Alg. 1)
    g = -cos^2 t (sigma_d F_minus - dx_t/dt) - r cos t sin t (x_t + sigma_d dF_minus/dt),  g <- g / (||g|| + c)
    L = e^{w_phi(t)} / D ||F_theta - F_minus - g||^2 - w_phi(t),
where dx_t/dt is v_t (sCT, consistency training) or the teacher's sigma_d F_pretrain (sCD, distillation),
r ramps from 0 to 1 (tangent warmup), and sigma_d dF_minus/dt is one forward-mode JVP of the stop-gradient
network with the tangent (cos t sin t dx_t/dt, cos t sin t sigma_d) (Section 5.1). Samples: one step
x0 = f(sigma_d z, t_max), or two with the intermediate time t = 1.1.

    python scm.py --dataset checkerboard                                   # sCT on a 2D toy set, ~1 min on a CPU
    python scm.py --dataset moons --mode diffusion --out runs/teacher      # the TrigFlow teacher (Eq. 4)
    python scm.py --dataset moons --mode scd --teacher runs/teacher/ckpt.pt  # sCD, initialised from the teacher
    python scm.py --dataset cifar10 --mode sct                             # App. G CIFAR-10 setting
    torchrun --nproc_per_node 8 scm.py --imagenet-latents --mode scd --teacher T.pt   # sCD with CFG in [1, 2]
    python scm.py --sample-only --ckpt runs/scm-cifar10/ckpt.pt --nfe 1 2 --fid 50000

Ablations: --tangent clip|raw (Fig. 5a), --no-adaptive-weight (Fig. 5b), --discrete-steps N (discrete-time
sCM, App. E, Fig. 5c), --warmup-iters 0 (no tangent warmup), --time-scale / --adanorm (Section 4.1).

Reading guide, in the paper's order (Algorithm 1 and App. G are in its appendix):
    Section 3, TrigFlow x_t = cos t x0 + sin t z ........... common.TrigFlow
    Alg. 1 l.2, the log-normal time proposal ............... sample_time
    Eq. (4), the diffusion (teacher) objective ............. diffusion_loss, teacher_losses
    Eq. (3), the PF-ODE and the teacher's velocity (CFG) ... teacher_velocity, ddim_step, sample_ode
    Eq. (5), the consistency function ....................... consistency_fn
    Alg. 1 l.1, theta <- theta_pretrain ..................... load_pretrained, init_from
    Alg. 1 l.4-6, Eq. (6), the JVP rearrangement (5.1) ..... tangent (warmup r included)
    Alg. 1 l.7, tangent normalisation / clipping (4.2) ..... normalize_tangent
    Alg. 1 l.8, Eq. (8), the adaptive weight (App. D) ...... AdaptiveWeight
    Alg. 1, one whole step ................................... draw, scm_losses
    App. E, discrete time .................................... edm_times, sample_discrete_times, discrete_tangent
    Section 5.2, guidance as a student input ................ guidance_scale, build_net
    Section 5.2, 1- and 2-step sampling (t = 1.1) ........... consistency_times, sample_consistency
    App. G, the settings ...................................... DEFAULTS, PRESETS
"""
import argparse
import functools
import math

import torch
import torch.nn as nn

import common
import dit


# ==============================================================================================
# The method: TrigFlow, the diffusion objective, the consistency function and the sCM loss

def sample_time(n, cfg, device):
    """Alg. 1 l.2: tau ~ N(P_mean, P_std^2), t = arctan(e^tau / sigma_d), i.e. sigma_d tan t is log-normal
    (Eq. 8's text writes e^{sigma_d tan t} ~ N(...), a typo for this EDM proposal)."""
    sigma = common.LogNormal(cfg["P_mean"], cfg["P_std"]).sample(n, device)           # (B,) e^tau
    return torch.atan(sigma / cfg["sigma_d"])


def diffusion_loss(model, x0, z, t, sigma_d, y=None):
    """Eq. (4): || sigma_d F_theta(x_t / sigma_d, t) - v_t ||^2 with c_noise(t) = t (Section 4.1)."""
    x_t, v_t = common.TrigFlow(sigma_d)(x0, z, t)
    return common.mse(sigma_d * model(x_t / sigma_d, t, y=y), v_t)


@torch.no_grad()
def teacher_velocity(teacher, x_t, t, sigma_d, y=None, scale=None):
    """PF-ODE Eq. (3): dx_t/dt = sigma_d F_pretrain(x_t / sigma_d, t). With a guidance scale per sample
    (Section 5.2), classifier-free guidance F_u + scale (F_c - F_u), both branches in one batched call. In sCD
    it is a target pass (common.target: its network outputs are fp32 there), since it enters the tangent as
    sigma_d F_minus - dx_t/dt, a difference of near-equal velocities (zero when the student equals its teacher)."""
    u = x_t / sigma_d
    if scale is None:
        return sigma_d * teacher(u, t, y=y)
    null = torch.full_like(y, teacher.null_label)
    F_c, F_u = teacher(torch.cat([u, u]), torch.cat([t, t]), y=torch.cat([y, null])).chunk(2)       # (B, ...) each
    return sigma_d * (F_u + common.bcast(scale, F_u) * (F_c - F_u))


def consistency_fn(net, x_t, t, sigma_d, y=None, scale=None):
    """Eq. (5): f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t). At t = 0 it returns x_t exactly
    (the CM boundary condition), whatever F is."""
    F = net(x_t / sigma_d, t, y=y, w=scale)
    return common.bcast(torch.cos(t), x_t) * x_t - common.bcast(torch.sin(t), x_t) * sigma_d * F


def tangent(F_minus_fn, x_t, t, dxdt, sigma_d, r=1.0):
    """Alg. 1 l.5-6: g = cos(t) df_minus/dt (the prior weighting 1/(sigma_d tan t) of Eq. 8 times the
    -sigma_d sin t of Eq. 2 leaves this cos t), with the warmup factor r on the sin t part of Eq. (6).

    JVP rearrangement (Section 5.1): the JVP of F_minus(., .) at (x_t / sigma_d, t) with the tangent
    (cos t sin t dxdt, cos t sin t sigma_d) is cos t sin t (grad_u F dxdt + sigma_d dF/dt|_partial) =
    cos t sin t sigma_d dF_minus/dt (u = x_t / sigma_d, so grad_{x_t} = grad_u / sigma_d); the paper's
    display drops the sigma_d on its left side. Scaling the tangent by cos t sin t before the JVP keeps the
    intermediate tangents small near t = 0 and t = pi/2. Returns (F_minus, g), g before normalisation."""
    cos, sin = torch.cos(t), torch.sin(t)                                  # (B,)
    cs = common.bcast(cos * sin, x_t)
    F_minus, cs_sigma_dF = common.jvp(F_minus_fn, (x_t / sigma_d, t), (cs * dxdt, cos * sin * sigma_d))
    cos2 = common.bcast(cos * cos, x_t)
    g = -cos2 * (sigma_d * F_minus - dxdt) - r * (cs * x_t + cs_sigma_dF)     # Alg. 1 l.6, Eq. (6) times cos t
    return F_minus, g


def ddim_step(x_t, t, t_prev, dxdt):
    """One first-order TrigFlow step from t to t_prev along the velocity dxdt:
    x_{t'} = cos(t - t') x_t - sin(t - t') dxdt. It is exact for the conditional path (dxdt = v_t gives
    cos t' x0 + sin t' z), and the teacher's DDIM step for dxdt = sigma_d F_pretrain (App. E)."""
    h = t - t_prev
    return common.bcast(torch.cos(h), x_t) * x_t - common.bcast(torch.sin(h), x_t) * dxdt


def discrete_tangent(F_minus, F_minus_prev, x_t, t, t_prev, dxdt, sigma_d, r=1.0):
    """App. E, discrete-time sCM: the finite difference [f_minus(x_t, t) - f_minus(x_t', t')] / sin(t - t')
    with x_t' = ddim_step(x_t, t, t', dxdt), written out so it matches Eq. (6) term by term:
        Delta = -cos t' (sigma_d F_minus(x_t, t) - dxdt)
                - r sin t' (x_t + sigma_d [cos(t - t') F_minus(x_t, t) - F_minus(x_t', t')] / sin(t - t')),
    which tends to df_minus/dt as t' -> t. Returns g = cos(t) Delta, the analogue of tangent()."""
    h = t - t_prev
    cos_p, sin_p = (common.bcast(f(t_prev), x_t) for f in (torch.cos, torch.sin))
    dF = (common.bcast(torch.cos(h), x_t) * F_minus - F_minus_prev) / common.bcast(torch.sin(h), x_t)
    delta = -cos_p * (sigma_d * F_minus - dxdt) - r * sin_p * (x_t + sigma_d * dF)
    return common.bcast(torch.cos(t), x_t) * delta


def per_sample_norm(g):
    return g.flatten(1).norm(dim=1)                                       # (B,)


def normalize_tangent(g, kind="normalize", c=0.1, norm="l2"):
    """Section 4.2, Alg. 1 l.7. "normalize": g / (||g|| + c); "clip": clip(g, -1, 1) (the alternative of
    Fig. 5a); "raw": g unchanged. norm="l2" is the paper's ||g||; norm="rms" divides it by sqrt(D), the
    per-element convention some reimplementations use (it makes c independent of the resolution)."""
    if kind == "normalize":
        n = per_sample_norm(g)
        if norm == "rms":
            n = n / math.sqrt(g[0].numel())
        return g / common.bcast(n + c, g)
    if kind == "clip":
        return g.clamp(-1, 1)
    return g


class AdaptiveWeight(nn.Module):
    """w_phi(t) of Eq. (8) (App. D, after EDM2): a linear map of fixed Fourier features of
    c = ln(sigma_d tan t) / 4, EDM2's noise input, so the weight resolves the log-normal proposal evenly
    in log sigma. The linear layer starts at zero: e^{w_phi} = 1 for every t at the start."""

    def __init__(self, sigma_d, channels=128):
        super().__init__()
        self.sigma_d = sigma_d
        g = torch.Generator().manual_seed(0)                    # same features on every rank and run
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t):
        c = torch.log(self.sigma_d * torch.tan(t.float())) / 4                              # (B,)
        feats = math.sqrt(2) * torch.cos(c[:, None] * self.freqs + self.phases)            # (B, C)
        return self.linear(feats).squeeze(-1)                                              # (B,)


def edm_times(N, sigma_d, sigma_min=0.002, sigma_max=80.0, rho=7.0, device="cpu"):
    """App. E: the EDM grid sigma_i = (sigma_min^(1/rho) + i/N (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho,
    i = 0..N (increasing), mapped to TrigFlow times t_i = arctan(sigma_i / sigma_d)."""
    i = torch.arange(N + 1, dtype=torch.float64, device=device) / N
    sigma = (sigma_min ** (1 / rho) + i * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
    return torch.atan(sigma / sigma_d)                                                   # (N + 1,)


def sample_discrete_times(n, cfg, device):
    """Discrete-time pairs (t_{i+1}, t_i) on the grid: the log-normal proposal's sigma picks the interval
    [sigma_i, sigma_{i+1}) it falls in (iCT's discretised log-normal, Song & Dhariwal 2023; App. E gives
    the grid, not how pairs are drawn)."""
    grid = edm_times(cfg["discrete_steps"], cfg["sigma_d"], cfg["sigma_min"], cfg["sigma_max"], device=device)
    t_cont = sample_time(n, cfg, device).double()
    i = (torch.searchsorted(grid, t_cont, right=True) - 1).clamp(0, cfg["discrete_steps"] - 1)
    return grid[i + 1].float(), grid[i].float()


def guidance_scale(n, cfg, device):
    """Section 5.2 / App. G: w ~ U[1, cfg_max] per sample, the student's extra input (None without guidance)."""
    if not guided(cfg):
        return None
    return 1 + (cfg["cfg_max"] - 1) * torch.rand(n, device=device)


def guided(cfg):
    return cfg["mode"] == "scd" and cfg["cfg_max"] > 1


def draw(x0, y, cfg):
    """The random draws of one step of Algorithm 1, per sample, beside the data x0 and labels y: l.2 the
    noise z ~ N(0, sigma_d^2 I) and the time t (with the grid neighbour t' in discrete time), and the
    guidance scale w of Section 5.2. Drawn once for this rank's batch, so that cutting it into micro-batches
    (--batch-gpu) changes nothing."""
    z = cfg["sigma_d"] * torch.randn_like(x0)                              # l.2: z ~ N(0, sigma_d^2 I)
    if cfg["discrete_steps"] and cfg["mode"] != "diffusion":
        t, t_prev = sample_discrete_times(len(x0), cfg, x0.device)
    else:
        t, t_prev = sample_time(len(x0), cfg, x0.device), None              # l.2: t = arctan(e^tau / sigma_d)
    return dict(x0=x0, y=y, z=z, t=t, t_prev=t_prev, scale=guidance_scale(len(x0), cfg, x0.device))


def scm_losses(model, weight_model, batch, step, cfg, teacher=None):
    """One step of Algorithm 1 (sCT or sCD, continuous or discrete time) on a (micro-)batch of draws.
    model is F_theta (DDP-wrapped in multi-process runs), weight_model is w_phi, teacher is F_pretrain
    (sCD). Returns scalar tensors. Target passes: the teacher velocity, the JVP of F_minus and, in discrete
    time, both F_minus evaluations of the finite difference; the gradient pass: F_theta (and w_phi)."""
    sigma_d = cfg["sigma_d"]
    x0, y, t, t_prev, scale = batch["x0"], batch["y"], batch["t"], batch["t_prev"], batch["scale"]
    x_t, v_t = common.TrigFlow(sigma_d)(x0, batch["z"], t)                 # l.3
    if cfg["mode"] == "sct":
        dxdt = v_t                                                          # l.4: cos t z - sin t x0
    else:
        dxdt = common.target(teacher_velocity, teacher, x_t, t, sigma_d, y, scale)   # l.4: sigma_d F_pretrain (+ CFG)
    r = min(1.0, step / cfg["warmup_iters"]) if cfg["warmup_iters"] else 1.0   # l.5: tangent warmup
    F = common.Passes(model)                # F_theta and F_minus (its stop-gradient copy), one dropout mask
    if not cfg["discrete_steps"]:
        _, g = tangent(F.function(y=y, w=scale), x_t, t, dxdt, sigma_d, r)     # l.5-6: the JVP of F_minus
    F_theta = F.grad(x_t / sigma_d, t, y=y, w=scale)                        # (B, ...) with gradient
    if cfg["discrete_steps"]:
        x_prev = ddim_step(x_t, t, t_prev, dxdt)
        F_minus = F.detached(F_theta, x_t / sigma_d, t, y=y, w=scale)
        F_minus_prev = F.target(x_prev / sigma_d, t_prev, y=y, w=scale)
        g = discrete_tangent(F_minus, F_minus_prev, x_t, t, t_prev, dxdt, sigma_d, r)
    g_rms = per_sample_norm(g) / math.sqrt(g[0].numel())
    g = normalize_tangent(g, cfg["tangent"], cfg["tangent_c"], cfg["tangent_norm"])   # l.7
    # F_minus in Eq. (8)'s difference F_theta - F_minus is F_theta's own value with the gradient stopped:
    # the difference is then exactly zero, whatever precision the pass ran in, and the gradient is -g times
    # e^{w_phi}/D, Eq. (2)'s direction.
    err = (F_theta - F_theta.detach() - g).pow(2).flatten(1).mean(1)        # ||.||^2 / D per sample, (B,)
    w_phi = weight_model(t) if weight_model is not None else torch.zeros_like(err)    # w_phi = 0: Fig. 5b "w/o"
    loss = (torch.exp(w_phi) * err - w_phi).mean()                         # l.8, Eq. (8)
    return {"loss": loss, "mse": err.mean().detach(), "w_phi": w_phi.mean().detach(),
            "g_rms": g_rms.mean().detach(), "r": torch.tensor(r)}


def teacher_losses(model, batch, cfg):
    """The diffusion teacher: Eq. (4) with the same log-normal time proposal (the draws of `draw`)."""
    loss = diffusion_loss(model, batch["x0"], batch["z"], batch["t"], cfg["sigma_d"], batch["y"])
    return {"loss": loss}


# ==============================================================================================
# Samplers

def t_max(cfg):
    """The noise end used for sampling: arctan(sigma_max / sigma_d) (EDM's sigma_max = 80), just below pi/2."""
    return math.atan(cfg["sigma_max"] / cfg["sigma_d"])


def consistency_times(nfe, cfg):
    """[t_max, t_1, ..., t_{nfe-1}]: 2 steps use the paper's intermediate t = 1.1 (Section 5.2). For more
    steps the paper gives no times; we space them evenly below 1.1 (1.1, 0.55 for 3 steps), unless
    --mid-times lists them."""
    mids = cfg["mid_times"] or [1.1 * (nfe - 1 - i) / (nfe - 1) for i in range(nfe - 1)]
    return [t_max(cfg)] + list(mids[: nfe - 1])


@torch.no_grad()
def sample_consistency(net, z, times, sigma_d, generator, y=None, scale=None):
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): x = f(z, times[0]) from z ~ N(0, sigma_d^2 I);
    then for each later time re-noise x_t = cos t x + sin t z' (fresh z') and map back with f (Eq. 5)."""
    x = z
    for i, t_i in enumerate(times):
        t = torch.full((len(z),), t_i, device=z.device)
        if i > 0:
            z_new = common.randn(z.shape, generator, z.device, std=sigma_d)
            x = math.cos(t_i) * x + math.sin(t_i) * z_new
        x = consistency_fn(net, x, t, sigma_d, y, scale)
    return x


@torch.no_grad()
def sample_ode(net, z, steps, sigma_d, t_start, y=None, cfg_scale=1.0):
    """The teacher's sampler: PF-ODE Eq. (3) from t_start to 0 on a uniform grid in t, with the first-order
    TrigFlow (DDIM) step. Its last step, from t to 0, is Eq. (5): x0 = cos t x_t - sin t sigma_d F."""
    ts = torch.linspace(t_start, 0.0, steps + 1, dtype=torch.float64)
    x = z
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        t = torch.full((len(x),), float(t_cur), device=x.device)
        scale = None if cfg_scale == 1.0 or y is None else torch.full((len(x),), cfg_scale, device=x.device)
        v = teacher_velocity(net, x, t, sigma_d, y, scale)
        x = ddim_step(x, t, torch.full_like(t, float(t_next)), v)
    return x


def samplers(nets, cfg, data, device):
    """{name: (sample_fn, nfes)} for common.Run, on the EMA weights nets["ema"]. For the teacher the NFE is the
    number of ODE steps (times 2 with CFG); for sCT/sCD it is the number of f evaluations."""
    net, shape, sigma_d = nets["ema"], data.shape, cfg["sigma_d"]

    def noise(n, g):
        return common.randn((n, *shape), g, device, std=sigma_d)            # x_{t_max} ~ N(0, sigma_d^2 I)

    if cfg["mode"] == "diffusion":
        def ode(n, nfe, labels, g):
            return sample_ode(net, noise(n, g), nfe, sigma_d, t_max(cfg), labels, cfg["cfg_scale"])
        return {"": (ode, cfg["nfe"])}

    def cm(n, nfe, labels, g):
        scale = torch.full((n,), cfg["cfg_scale"], device=device) if guided(cfg) else None
        return sample_consistency(net, noise(n, g), consistency_times(nfe, cfg), sigma_d, g, labels, scale)
    return {"": (cm, cfg["nfe"])}


# ==============================================================================================
# Training loop

def build_net(cfg, data):
    """F_theta: the DiT (images) or the toy MLP, with c_noise(t) = t embedded at `time_scale`, adaptive double
    normalisation when adanorm="double" (Section 4.1), labels when class-conditional, and the guidance
    scale as a zero-initialised extra input for sCD with guidance (so it starts equal to the teacher)."""
    num_classes = data.num_classes if cfg["class_cond"] else 0
    return common.build_backbone(cfg, data, num_classes=num_classes, time_scale=cfg["time_scale"],
                                 class_dropout=cfg["class_dropout"] if cfg["mode"] == "diffusion" else 0.0,
                                 extra_cond=guided(cfg), adanorm=cfg["adanorm"], dropout=cfg["dropout"])


def load_pretrained(path, cfg, data, role):
    """Read a diffusion checkpoint written by `scm.py --mode diffusion` for --teacher or --init; anything
    else (another script, another mode, data set, data shape or sigma_d) is one clear error."""
    pre = common.load_checkpoint(path, "scm")
    tcfg = pre["cfg"]
    if tcfg.get("mode") != "diffusion":
        raise common.UserError(f"--{role} {path} is an {tcfg.get('mode')} checkpoint; it must be a diffusion "
                               f"model trained with `scm.py --mode diffusion`")
    if tcfg.get("dataset") != cfg["dataset"] or tcfg.get("data_shape") != list(data.shape):
        raise common.UserError(f"--{role} {path} was trained on {tcfg.get('dataset')} {tcfg.get('data_shape')}, "
                               f"not {cfg['dataset']} {list(data.shape)}")
    if tcfg["sigma_d"] != cfg["sigma_d"]:
        raise common.UserError(f"--{role} {path} uses sigma_d = {tcfg['sigma_d']}, this run {cfg['sigma_d']}")
    return tcfg, pre["ema"]


def init_from(net, icfg, state, cfg):
    """Alg. 1 l.1: theta <- theta_pretrain. The architecture must be the teacher's; a guided student has one
    extra zero-initialised input (dit.load_backbone accepts its missing keys)."""
    for key in ("model", "time_scale", "adanorm", "class_cond"):
        if icfg.get(key) != cfg[key]:
            raise common.UserError(f"--init {cfg['init']} has {key} = {icfg.get(key)!r}, this run {cfg[key]!r}")
    try:
        dit.load_backbone(net, state)
    except ValueError as e:
        raise common.UserError(f"--init {cfg['init']}: {e}") from None


def train(cfg):
    data = common.load_dataset(cfg["dataset"], cfg["data_path"], cfg["vae"])
    cfg["data_shape"] = list(data.shape)                       # saved with the run: --teacher/--init check it
    # read (and check) the pretrained checkpoints before anything is written; a resumed run takes its weights
    # from its own checkpoint, so its --init file is not needed any more (it may have moved or gone)
    roles = ("teacher",) if cfg["resume"] else ("teacher", "init")
    pretrained = {role: load_pretrained(cfg[role], cfg, data, role) for role in roles if cfg[role]}
    if "teacher" in pretrained and guided(cfg):
        tcfg = pretrained["teacher"][0]
        if not (tcfg["class_cond"] and tcfg["class_dropout"] > 0):
            raise common.UserError(f"--cfg-max {cfg['cfg_max']} needs a class-conditional teacher trained with "
                                   f"label dropout (--class-cond --class-dropout P); {cfg['teacher']} is not")
    run = common.Run(cfg, RESUMABLE, data)          # seeds every rank: the weights below are reproducible
    net = build_net(cfg, data)
    if "init" in pretrained:
        init_from(net, *pretrained["init"], cfg)
    net = net.to(run.device)
    model = run.wrap(net)
    state = dict(net=net)
    params = list(net.parameters())
    teacher = weight_model = None
    if "teacher" in pretrained:                                # F_pretrain: its own architecture, EMA weights
        tcfg, tstate = pretrained["teacher"]
        teacher = build_net(tcfg, data)
        teacher.load_state_dict(tstate)
        teacher = teacher.to(run.device).eval().requires_grad_(False)
    if cfg["mode"] != "diffusion" and cfg["adaptive_weight"]:
        weight = AdaptiveWeight(cfg["sigma_d"]).to(run.device)
        weight_model = run.wrap(weight)                         # w_phi is trained too: its gradient is synced
        state["weight"] = weight
        params += list(weight.parameters())
    ema = common.make_ema(net, cfg)
    opt = common.make_optimizer(cfg["optimizer"], params, cfg["lr"], tuple(cfg["betas"]), cfg["adam_eps"])
    loader = common.Loader(data, run.batch_per_rank, run.dist, cfg["seed"], cfg["xflip"])
    state.update(ema=ema, opt=opt, loader=loader)
    start = run.start(state, {"diffusion": "(TrigFlow diffusion teacher, Eq. 4)", "sct": "(sCT)",
                              "scd": "(sCD)"}[cfg["mode"]], samplers({"ema": ema.model}, cfg, data, run.device), data)
    for step in run.steps(start):
        x0, y = loader.next()
        batch = draw(x0, y if cfg["class_cond"] else None, cfg)
        if cfg["mode"] == "diffusion":
            loss_fn = functools.partial(teacher_losses, model, cfg=cfg)
        else:
            loss_fn = functools.partial(scm_losses, model, weight_model, step=step, cfg=cfg, teacher=teacher)
        run.end_step(step, run.update(opt, params, loss_fn, batch, emas=[(ema, net)]))
    run.finish()


# ==============================================================================================
# Presets (App. G) and command line

DEFAULTS = dict(
    mode="sct", teacher=None, init=None, sigma_d=0.5, P_mean=-1.0, P_std=1.4, tangent="normalize",
    tangent_c=0.1, tangent_norm="l2", warmup_iters=10_000, adaptive_weight=True, discrete_steps=0,
    sigma_min=0.002, sigma_max=80.0, mid_times=None, cfg_max=1.0, cfg_scale=1.0, class_dropout=0.0,
    dropout=0.0, time_scale=1.0, adanorm="double", optimizer="radam", betas=[0.9, 0.99], adam_eps=1e-8,
)

# App. G, CIFAR-10 (the paper's network is DDPM++; ours is the DiT): sigma_d 0.5, P_mean -1.0, P_std 1.4,
# batch 512, EMA half-life 0.5 Mimg. Students: RAdam lr 1e-4, betas (0.9, 0.99), eps 1e-8, no schedule,
# dropout 0.20 (sCT) / 0 (sCD), c 0.1, H 10k. Teacher: Adam lr 1e-3, dropout 0.13, 400k iterations.
# The step count of the students is not in the text we have; we keep the teacher's 400k.
_CIFAR10 = dict(model="DiT-B/2", sigma_d=0.5, P_mean=-1.0, P_std=1.4, batch_size=512, ema_halflife_kimg=500.0,
                steps=400_000, xflip=True, nfe=[1, 2], log_every=100, sample_every=10_000, ckpt_every=10_000)
# ImageNet latents (App. G lists P_mean -0.8, P_std 1.6 and guidance up to 2 for ImageNet 512). The rest is
# our choice where the text is silent: EDM2's batch 2048, the CIFAR-10 optimisers, no dropout, teacher
# label dropout 0.1 (for CFG), and sampling at the guidance scale 1.5 inside the trained range [1, 2].
# Per GPU, --batch-gpu 128: an estimate (no GPU was available; tests/gpu_check.sh measures it) that one
# micro-batch of 128 latents of 32x32x4 through DiT-B/2 (the JVP and the teacher's forward keep no graph;
# the forward-backward dominates, about 0.3 GB of fp32 activations per sample at 256 tokens) fits an 80 GB
# GPU with room; on 8 GPUs the 256 per process then take two micro-batches.
_LATENTS = dict(model="DiT-B/2", sigma_d=0.5, P_mean=-0.8, P_std=1.6, batch_size=2048, batch_gpu=128,
                ema_halflife_kimg=500.0, steps=400_000, class_cond=True, class_dropout=0.1, nfe=[1, 2],
                log_every=100, sample_every=10_000, ckpt_every=10_000)
# 2D toy sets: the MLP, about a minute on a laptop CPU. The toy data have unit-order variance, so sigma_d = 1
# and the proposal is CIFAR's shifted by ln 2 (the same distribution of sigma / sigma_d).
_TOY = dict(model="MLP", sigma_d=1.0, P_mean=-1.0 + math.log(2), P_std=1.4, batch_size=256, steps=1500,
            ema_decay=0.995, warmup_iters=300, log_every=100, ckpt_every=500, nfe=[1, 2])
# Digits (8x8, one channel; raw pixel RMS about 0.85, std 0.75 around the mean): DiT-T/2 on a CPU. Every digits
# preset of the four scripts trains 1500 steps of batch 64 (DE-CM's student: batch 32), each run in at most
# about five minutes on 2 cores. sigma_d 0.75; the App. G optimisers at learning rates for a short run (sCT
# at 2e-3 stayed at the noise ceiling after 1000 steps); EMA half-life 5k images (20k was worse for sCD: FD
# 507 against 470); the log-normal proposal of CIFAR-10 (P_mean 0 was worse: 571). No tangent warmup: the
# paper's H = 10k is 2.5% of a 400k-iteration run, and at 1500 steps a warmup over the first 300 cost more
# than it steadied (sCD from the same teacher: FD 470 with it, 264 without; sCT 420 against 369).
# --warmup-iters H brings it back.
_DIGITS = dict(model="DiT-T/2", sigma_d=0.75, P_mean=-1.0, P_std=1.4, batch_size=64, steps=1500, ema_halflife_kimg=5,
               warmup_iters=0, log_every=100, ckpt_every=500, nfe=[1, 2, 4])
PRESETS = {
    "digits": {"diffusion": dict(_DIGITS, optimizer="adam", lr=2e-3, betas=[0.9, 0.999], nfe=[8, 100]),
               "sct": dict(_DIGITS, lr=1e-3),
               "scd": dict(_DIGITS, lr=5e-4)},
    "cifar10": {"diffusion": dict(_CIFAR10, optimizer="adam", lr=1e-3, betas=[0.9, 0.999], dropout=0.13,
                                  nfe=[32, 128]),
                "sct": dict(_CIFAR10, lr=1e-4, dropout=0.2),
                "scd": dict(_CIFAR10, lr=1e-4, dropout=0.0)},
    "imagenet-latents": {"diffusion": dict(_LATENTS, optimizer="adam", lr=1e-4, betas=[0.9, 0.999],
                                           cfg_scale=1.5, nfe=[32, 128]),
                         "sct": dict(_LATENTS, lr=1e-4, class_dropout=0.0),
                         "scd": dict(_LATENTS, lr=1e-4, cfg_max=2.0, cfg_scale=1.5)},
    "toy": {"diffusion": dict(_TOY, optimizer="adam", lr=2e-3, betas=[0.9, 0.999], nfe=[16, 64]),
            "sct": dict(_TOY, lr=2e-3),
            "scd": dict(_TOY, lr=5e-4)},          # fine-tuning the teacher: a lower rate, as App. G's 1e-4 vs 1e-3
}


def parse_config(argv=None):
    p = common.base_parser("scm", __doc__)
    a = p.add_argument
    a("--mode", choices=["diffusion", "sct", "scd"],
      help="diffusion: the TrigFlow teacher, Eq. (4); sct: consistency training; scd: distillation (Alg. 1)")
    a("--teacher", help="sCD: checkpoint of `scm.py --mode diffusion`, the F_pretrain of Alg. 1 l.4")
    a("--init", help="Alg. 1 l.1 theta <- theta_pretrain from this diffusion checkpoint (sCD default: the "
                     "teacher; 'none' starts from scratch)")
    a("--sigma-d", type=float, help="sigma_d, the data standard deviation of TrigFlow (Section 3; 0.5 for images)")
    a("--P-mean", type=float, help="P_mean of the log-normal proposal sigma_d tan t ~ LogN(P_mean, P_std^2) (Eq. 8)")
    a("--P-std", type=float, help="P_std of the log-normal proposal (Eq. 8, App. G)")
    a("--tangent", choices=["normalize", "clip", "raw"],
      help="Section 4.2 / Fig. 5a: g / (||g|| + c) (default), clip(g, -1, 1), or the raw tangent")
    a("--tangent-c", type=float, help="c of the tangent normalisation g / (||g|| + c) (Section 4.2: 0.1)")
    a("--tangent-norm", choices=["l2", "rms"],
      help="||g|| of the normalisation: l2 as the paper writes it (default) or rms = l2 / sqrt(D)")
    a("--warmup-iters", type=int, help="H of the tangent warmup r = min(1, iters / H) (Section 4.2; 0: off)")
    a("--adaptive-weight", action=argparse.BooleanOptionalAction,
      help="learn w_phi(t) of Eq. (8) jointly (default); --no-adaptive-weight fixes w_phi = 0 (Fig. 5b)")
    a("--discrete-steps", type=int,
      help="App. E discrete-time sCM: N steps of the EDM grid, finite-difference tangent (0: continuous)")
    a("--sigma-min", type=float, help="sigma_min of the EDM grid of App. E (0.002)")
    a("--sigma-max", type=float, help="sigma_max: sampling starts at t_max = arctan(sigma_max / sigma_d) (80)")
    a("--mid-times", type=float, nargs="+",
      help="intermediate times of multistep sampling, decreasing (default: 1.1 for 2 steps, Section 5.2)")
    a("--cfg-max", type=float, help="sCD with guidance: scale w ~ U[1, cfg_max] as a student input (Section 5.2, "
                                    "App. G: 2); 1 disables guidance")
    a("--cfg-scale", type=float, help="guidance scale used for sampling (the student's w input, or CFG of the teacher)")
    a("--class-dropout", type=float, help="teacher label dropout, so it can be queried unconditionally for CFG")
    a("--dropout", type=float, help="dropout rate (App. G CIFAR-10: teacher 0.13, sCT 0.20, sCD 0)")
    a("--time-scale", type=float, help="multiplier of c_noise(t) = t in the positional time embedding (Section "
                                       "4.1 keeps its frequencies low; default 1)")
    a("--adanorm", choices=["zero", "double"],
      help="DiT conditioning: adaLN-Zero or the adaptive double normalisation of Section 4.1 (default)")
    a("--optimizer", choices=["adam", "adamw", "radam"], help="App. G: RAdam for sCT/sCD, Adam for the teacher")
    a("--betas", type=float, nargs=2, help="optimizer betas (App. G students: 0.9 0.99)")
    a("--adam-eps", type=float, help="optimizer epsilon (App. G: 1e-8)")

    def resolve(args):
        mode = args.mode or DEFAULTS["mode"]
        cfg = common.resolve_config(args, "scm", DEFAULTS, {k: v[mode] for k, v in PRESETS.items()}, RESUMABLE)
        check_config(cfg)
        return cfg
    return common.parse(p, argv, resolve)


RESUMABLE = {"mid_times", "cfg_scale"}  # what --resume may change besides common.RESUMABLE (sampling only)


def check_config(cfg):
    """Combinations that cannot work: one line each, before anything is written."""
    def bad(msg):
        raise common.UserError(msg)
    mode = cfg["mode"]
    if cfg["sample_only"]:
        cfg["teacher"] = None                                       # sampling needs the student only
    elif mode == "scd":
        if not cfg["teacher"]:
            bad("--mode scd needs --teacher CKPT (a model trained with `scm.py --mode diffusion`)")
        if cfg["init"] is None:
            cfg["init"] = cfg["teacher"]                            # Alg. 1 l.1 for sCD
    elif cfg["teacher"]:
        bad(f"--teacher is only used by --mode scd, not {mode}")
    if cfg["init"] == "none" or cfg["sample_only"]:
        cfg["init"] = None
    if mode == "diffusion" and cfg["init"]:
        bad("--init starts a consistency model from a teacher; --mode diffusion trains the teacher itself")
    if cfg["P_std"] <= 0:
        bad(f"--P-std must be positive, got {cfg['P_std']}")
    if not cfg["tangent_c"] >= 0:
        bad(f"--tangent-c must be >= 0 (the c of g / (||g|| + c)), got {cfg['tangent_c']}")
    if cfg["warmup_iters"] < 0:
        bad(f"--warmup-iters must be >= 0 (0: no warmup), got {cfg['warmup_iters']}")
    if not cfg["adam_eps"] > 0:
        bad(f"--adam-eps must be positive, got {cfg['adam_eps']}")
    if cfg["discrete_steps"] < 0 or (cfg["discrete_steps"] and mode == "diffusion"):
        bad("--discrete-steps N (N > 0) applies to --mode sct/scd")
    if not 0 < cfg["sigma_min"] < cfg["sigma_max"]:
        bad("need 0 < --sigma-min < --sigma-max")
    if cfg["cfg_max"] < 1 or (cfg["cfg_max"] > 1 and mode != "scd"):
        bad("--cfg-max >= 1, and guidance as a student input is for --mode scd (sCT has no CFG, Section 5.2)")
    if (cfg["cfg_max"] > 1 or cfg["class_dropout"] > 0) and not cfg["class_cond"]:
        bad("--cfg-max / --class-dropout need a class-conditional model (--class-cond)")
    if cfg["cfg_scale"] != 1.0:
        if mode == "sct" or (mode == "scd" and not guided(cfg)):
            bad(f"--cfg-scale {cfg['cfg_scale']} needs a guided model (--mode scd --cfg-max > 1, or the teacher)")
        if guided(cfg) and not 1 <= cfg["cfg_scale"] <= cfg["cfg_max"]:
            bad(f"--cfg-scale {cfg['cfg_scale']} lies outside the trained range [1, {cfg['cfg_max']}]")
        if mode == "diffusion" and not (cfg["class_cond"] and cfg["class_dropout"] > 0):
            bad("--cfg-scale for the teacher needs --class-cond and --class-dropout > 0")
    mids = cfg["mid_times"]
    if mids and (any(b >= a for a, b in zip(mids, mids[1:])) or not 0 < mids[-1] or mids[0] >= t_max(cfg)):
        bad(f"--mid-times must decrease within (0, t_max = {t_max(cfg):.4f})")
    if mids and mode != "diffusion" and max(cfg["nfe"]) - 1 > len(mids):
        bad(f"--nfe {max(cfg['nfe'])} needs {max(cfg['nfe']) - 1} --mid-times, got {len(mids)}")
    if min(cfg["nfe"]) < 1:
        bad("--nfe values must be >= 1")


def main(argv=None):
    cfg = parse_config(argv)
    if cfg["sample_only"]:
        return common.sample_only(cfg, lambda cfg, data: {"ema": build_net(cfg, data)}, samplers)
    return train(cfg)


if __name__ == "__main__":
    common.cli(main)
