"""Direct Models: "End-to-End Single-Step Flow Matching via Direct Models" (ICLR 2026 submission,
https://openreview.net/forum?id=XpOnko2c59).

The method in a paragraph. Flow matching with noise x0 at t=0 and data x1 at t=1, x_t = (1-t) x0 + t x1
(Eq. 2/14). Besides a velocity field v_theta trained by conditional flow matching (Eq. 15), a second
network w_nu parameterises the whole flow map from the noise, phi(x0, t) = x0 + t w(x0, t) (Eq. 4), so
any point of the trajectory, and the sample x1 = x0 + w(x0, 1) (Eq. 17), is one forward pass away.
w_nu is trained by "local velocity propagation": a forward difference of d phi / dt = v(phi, t) gives
    w(x0, t + dt) = (t - dt)/t w(x0, t) + dt/t v(x_t, t),        x_t = x0 + t w(x0, t)      (Eq. 12/13)
and the loss (Eq. 16) regresses w_nu(x0, t'+dt) on the right-hand side with stop-gradients on
w_nu(x0, t') (in both places) and v_theta as the velocity, t' ~ U[dt, 1-dt]. Both networks are updated
at every step (Algorithm 1); there is no teacher and no distillation stage.

    python direct.py --dataset checkerboard                  # 2D toy run, about a minute on a CPU
    python direct.py --dataset cifar10                       # unconditional, DiT-B/2 on pixels
    torchrun --nproc_per_node 8 direct.py --imagenet-latents # Table 5: DiT-B/2, batch 256, CFG 1.5
    python direct.py --sample-only --ckpt runs/direct-cifar10/ckpt.pt --nfe 1 --fid 50000

Ablations: --no-stop-grad (Table 3), --param w for phi = x + w(x, t) (Table 4), --dt (Table 2).
`--nfe` evaluates the direct one-step map (it has no multi-step use, Section 7); `--euler-steps`
evaluates the jointly trained v_theta with the Euler sampler, the flow-matching rows of Table 1.

Reading guide, in the paper's order:
    Eq. (2)/(14), the straight path, noise at t = 0 ........ INTERP (common.NoiseAt0)
    Eq. (15), Alg. 1 l.5-8, the CFM loss of v_theta ........ cfm_loss
    Eq. (4), the flow map phi(x0, t) = x0 + t w(x0, t) ...... flow, direct_path
    Eq. (7), (12)/(13), propagating w by a forward difference  propagate
    Eq. (16), Alg. 1 l.10-13, the propagation loss .......... propagation_target, propagation_loss
    Alg. 1, one step of both networks ....................... draw, direct_losses (train: the update order)
    Eq. (17), one-step sampling ............................. sample_direct
    Eq. (1), Table 1, the Euler baseline on v_theta ......... sample_euler
    Table 5, the settings ..................................... PRESETS
"""
import argparse

import torch

import common

INTERP = common.NoiseAt0()          # x_t = (1 - t) x0 + t x1: x0 noise (t=0), x1 data (t=1)


# ==============================================================================================
# The method

def cfm_loss(v_model, x1, x0, t, y=None):
    """Eq. (15): || v_theta(x_t, t) - (x1 - x0) ||^2 at x_t = (1 - t) x0 + t x1 (Eq. 14), Alg. 1 l.5-7; the
    squared norm averaged over elements (common.mse), the paper's up to a constant."""
    x_t, u = INTERP(x1, x0, t)
    return common.mse(v_model(x_t, t, y=y), u)


def velocity(v_model, x, t, y=None, cfg_scale=1.0):
    """v_theta(x, t), classifier-free guided when cfg_scale != 1: v_u + s (v_c - v_u), one batched call."""
    if y is None or cfg_scale == 1.0:
        return v_model(x, t, y=y)
    null = torch.full_like(y, v_model.null_label)
    v_c, v_u = v_model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null])).chunk(2)
    return v_u + cfg_scale * (v_c - v_u)


def flow(w, x0, t, param="tw"):
    """Eq. (4): phi(x0, t) = x0 + t w(x0, t); with param="w" (Table 4 ablation) phi = x0 + w(x0, t)."""
    return x0 + (common.bcast(t, x0) * w if param == "tw" else w)


def propagate(w_prev, v, t, dt, param="tw"):
    """The right-hand side of Eq. (12)/(13): w at t + dt from w and the velocity at t.
    param="tw": (t - dt)/t w + dt/t v.  param="w" (phi = x + w): w + dt v, the same forward difference."""
    t = common.bcast(t, w_prev)
    if param == "tw":
        return (t - dt) / t * w_prev + dt / t * v
    return w_prev + dt * v


@common.target_pass
def propagation_target(w_net, v_net, x0, t, dt, y=None, param="tw", cfg_scale=1.0):
    """The target of Eq. (16), Alg. 1 l.11-12: (t' - dt)/t' sg[w_nu(x0, t')] + dt/t' v_theta(x'_t, t') at
    x'_t = x0 + t' sg[w_nu(x0, t')], with v_theta guided when cfg_scale != 1 (Table 5).

    A target pass (common.target_pass): its networks run in eval mode, since v_theta is trained with label
    dropout (for CFG) and a target whose "guided" velocity were unguided for a random tenth of the batch would be
    noise; and in the target precision (IEEE fp32 under the exact policy), since the target's new information is
    the step dt/t' (v - w), about 1% of w, the size of bf16's rounding of w."""
    w_prev = w_net(x0, t, y=y)                                                # sg[w_nu(x0, t')]
    v = velocity(v_net, flow(w_prev, x0, t, param), t, y, cfg_scale)
    return propagate(w_prev, v, t, dt, param)


def propagation_loss(w_model, v_model, x0, t, dt, y=None, param="tw", stop_grad=True, cfg_scale=1.0):
    """Eq. (16), Alg. 1 l.10-12, for t' = t ~ U[dt, 1 - dt]:
        || w_nu(x0, t' + dt) - [(t' - dt)/t' sg[w_nu(x0, t')] + dt/t' v_theta(x'_t, t')] ||^2,
        x'_t = x0 + t' sg[w_nu(x0, t')].
    The loss trains nu only: v_theta is evaluated without gradient to theta (theta learns from Eq. 15
    alone). stop_grad=False is the Table 3 ablation: the gradient then also flows through w_nu(x0, t')
    and through x'_t into v_theta's input (not into theta); v_theta still runs in eval mode, as a target pass."""
    w, v = common.Passes(w_model), common.Passes(v_model)        # v_theta's passes here are target passes only
    if stop_grad:
        target = propagation_target(w.net, v.net, x0, t, dt, y, param, cfg_scale)
        return common.mse(w.grad(x0, t + dt, y=y), target)
    # both w evaluations in one call: DDP allows one forward per backward
    y2 = None if y is None else torch.cat([y, y])
    w_prev, w_next = w.grad(torch.cat([x0, x0]), torch.cat([t, t + dt]), y=y2).chunk(2)
    return common.mse(w_next, ablation_target(w_prev, w.net, v.net, x0, t, dt, y, param, cfg_scale))


def ablation_target(w_prev, w_net, v_net, x0, t, dt, y=None, param="tw", cfg_scale=1.0):
    """Table 3's target without stop-gradients: (t' - dt)/t' w_nu(x0, t') + dt/t' v_theta(x'_t, t') with the
    gradient through w_prev = w_nu(x0, t') of the gradient pass, in both places, and through x'_t into v_theta's
    input (not its parameters: Frozen). w_prev is both a prediction (its gradient) and part of the target (its
    value): its value is the target pass's where the gradient pass does not compute it as a target pass would
    (--bf16 under the exact policy, TF32), its gradient the gradient pass's (w + sg(w_exact - w))."""
    w_prev = w_prev + (common.Passes(w_net).detached(w_prev, x0, t, y=y) - w_prev).detach()
    x_t = flow(w_prev, x0, t, param)
    v = common.target(velocity, Frozen(v_net), x_t, t, y, cfg_scale, keep_graph=True)
    return propagate(w_prev, v, t, dt, param)


class Frozen(torch.nn.Module):
    """A network as a function of its inputs only: its parameters detached (no gradient to them)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.null_label = net, getattr(net, "null_label", None)
        self.train(getattr(net, "training", False))

    def forward(self, *inputs, **kw):
        state = {**{k: p.detach() for k, p in self.net.named_parameters()}, **dict(self.net.named_buffers())}
        return torch.func.functional_call(self.net, state, inputs, kw)


def draw(x1, y, cfg):
    """The random draws of one step of Algorithm 1, per sample, beside the data x1 and labels y: l.3 the
    noise x0, l.5 t ~ U[0, 1], l.10 t' ~ U[dt, 1 - dt]. Drawn once for this rank's batch, so that cutting it
    into micro-batches (--batch-gpu) changes nothing."""
    dt = cfg["dt"]
    n, dev = len(x1), x1.device
    return dict(x1=x1, y=y, x0=torch.randn_like(x1), t=torch.rand(n, device=dev),
                t_prime=dt + (1 - 2 * dt) * torch.rand(n, device=dev))


def cfm_losses(v_model, batch):
    """Alg. 1 l.5-7 alone (--update-order paper): Eq. (15) on a (micro-)batch of draws."""
    L_cfm = cfm_loss(v_model, batch["x1"], batch["x0"], batch["t"], batch["y"])
    return {"loss": L_cfm, "cfm": L_cfm.detach()}


def prop_losses(v_model, w_model, batch, cfg):
    """Alg. 1 l.10-12 alone (--update-order paper): Eq. (16) on a (micro-)batch of draws."""
    L_prop = propagation_loss(w_model, v_model, batch["x0"], batch["t_prime"], cfg["dt"], batch["y"], cfg["param"],
                              cfg["stop_grad"], cfg["cfg_scale"])
    return {"loss": L_prop, "prop": L_prop.detach()}


def direct_losses(v_model, w_model, batch, cfg):
    """One step of Algorithm 1 on a (micro-)batch of draws: both losses (the networks are independent, so
    one backward of their sum updates each with its own gradient). Gradient passes: v_theta on Eq. (15) and
    w_nu at t' + dt; target passes: the propagation target (propagation_target)."""
    x1, y, x0 = batch["x1"], batch["y"], batch["x0"]
    L_cfm = cfm_loss(v_model, x1, x0, batch["t"], y)                                   # l.5-7
    L_prop = propagation_loss(w_model, v_model, x0, batch["t_prime"], cfg["dt"], y, cfg["param"],
                              cfg["stop_grad"], cfg["cfg_scale"])                      # l.10-12
    return {"loss": L_cfm + L_prop, "cfm": L_cfm.detach(), "prop": L_prop.detach()}


# ==============================================================================================
# Samplers

@torch.no_grad()
def sample_direct(w_model, x0, y=None, param="tw"):
    """Eq. (17): x1 = x0 + w_nu(x0, 1), one network evaluation."""
    t = torch.ones(len(x0), device=x0.device)
    return flow(w_model(x0, t, y=y), x0, t, param)


@torch.no_grad()
def direct_path(w_model, x0, t, y=None, param="tw"):
    """Any intermediate latent in one call: x_t = phi(x0, t) = x0 + t w(x0, t) (Eq. 4)."""
    t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device).expand(len(x0))
    return flow(w_model(x0, t, y=y), x0, t, param)


@torch.no_grad()
def sample_euler(v_model, x0, steps, y=None, cfg_scale=1.0):
    """The flow-matching baseline: Euler integration of dx/dt = v_theta(x, t) (Eq. 1) from t=0 to 1."""
    x = x0
    for i in range(steps):
        t = torch.full((len(x),), i / steps, device=x.device)
        x = x + velocity(v_model, x, t, y, cfg_scale) / steps
    return x


def samplers(nets, cfg, data, device):
    """{name: (sample_fn, nfes)} for common.Run, on the EMA weights nets["ema_v"] and nets["ema_w"]."""
    ema_v, ema_w, shape = nets["ema_v"], nets["ema_w"], data.shape

    def direct(n, nfe, labels, g):
        return sample_direct(ema_w, common.randn((n, *shape), g, device), labels, cfg["param"])

    def euler(n, nfe, labels, g):
        return sample_euler(ema_v, common.randn((n, *shape), g, device), nfe, labels, cfg["cfg_scale"])
    return {"": (direct, cfg["nfe"]), "euler": (euler, cfg["euler_steps"])}


# ==============================================================================================
# Training loop

def build_models(cfg, data):
    """v_theta and w_nu: the same backbone, one time input each. Labels (ImageNet) go to both; only
    v_theta is trained with label dropout, since only it is queried unconditionally (for CFG)."""
    num_classes = data.num_classes if cfg["class_cond"] else 0
    v_net = common.build_backbone(cfg, data, num_classes=num_classes, class_dropout=cfg["class_dropout"])
    w_net = common.build_backbone(cfg, data, num_classes=num_classes)
    return v_net, w_net


def train(cfg):
    data = common.load_dataset(cfg["dataset"], cfg["data_path"], cfg["vae"])
    run = common.Run(cfg, RESUMABLE, data)          # seeds every rank: the weights below are reproducible
    v_net, w_net = (m.to(run.device) for m in build_models(cfg, data))
    v_model, w_model = run.wrap(v_net), run.wrap(w_net)
    ema_v, ema_w = common.make_ema(v_net, cfg), common.make_ema(w_net, cfg)
    params = list(v_net.parameters()) + list(w_net.parameters())
    opt = common.make_optimizer("adamw", params, cfg["lr"], weight_decay=cfg["weight_decay"])
    loader = common.Loader(data, run.batch_per_rank, run.dist, cfg["seed"], cfg["xflip"])
    state = dict(v=v_net, w=w_net, ema_v=ema_v, ema_w=ema_w, opt=opt, loader=loader)
    start = run.start(state, "(Direct Models: v_theta and w_nu)",
                      samplers({"ema_v": ema_v.model, "ema_w": ema_w.model}, cfg, data, run.device), data)
    for step in run.steps(start):
        x1, y = loader.next()
        batch = draw(x1, y if cfg["class_cond"] else None, cfg)
        if cfg["update_order"] == "joint":
            # One AdamW step for both networks (their parameters are disjoint, so each still follows its own
            # loss): nu's target uses v_theta from before theta's step, a lag of one step against Alg. 1's
            # order, and the gradient clipping and non-finite skipping act on both together. Measured against
            # the paper's order (--update-order paper), seeds 0-2 of each preset: checkerboard one-step SWD
            # 0.083 / 0.097 / 0.052 joint against 0.079 / 0.107 / 0.076; digits one-step FD 440 / 444 / 447
            # against 464 / 452 / 485, v_theta at 100 Euler steps identical (its training does not depend on
            # the order). The lag costs nothing we can see, and the joint step is one guarded update, not two.
            losses = run.update(opt, params, lambda b: direct_losses(v_model, w_model, b, cfg), batch,
                                emas=[(ema_v, v_net), (ema_w, w_net)])
        else:                                       # Alg. 1: theta's step (l.8), then nu's, with the new v_theta
            losses = run.update(opt, v_net.parameters(), lambda b: cfm_losses(v_model, b), batch, emas=[(ema_v, v_net)])
            losses["grad_norm_v"] = losses.pop("grad_norm")
            prop = run.update(opt, w_net.parameters(), lambda b: prop_losses(v_model, w_model, b, cfg), batch,
                              emas=[(ema_w, w_net)])
            losses.update(prop=prop["prop"], grad_norm=prop["grad_norm"], loss=losses["loss"] + prop["loss"])
        run.end_step(step, losses)
    run.finish()


# ==============================================================================================
# Presets (Table 5) and command line

DEFAULTS = dict(dt=0.01, param="tw", stop_grad=True, cfg_scale=1.0, class_dropout=0.0, weight_decay=0.0,
                euler_steps=[128, 4, 1], nfe=[1], update_order="joint")
PRESETS = {
    # Table 5, ImageNet-256 column: DiT-B/2 on 32x32x4 latents, batch 256, 800k steps, class dropout 0.1, AdamW
    # 5e-5 without weight decay, EMA 0.999, and "Classifier Free Guidance 1.5". Where the guidance acts is our
    # reading: the table says no more, and the one-step sampler (Eq. 17) is a single call of w_nu with no
    # unconditional branch to guide, so it can only enter through v_theta, the one network trained with label
    # dropout: the guided velocity inside the propagation target (Eq. 16).
    "imagenet-latents": dict(model="DiT-B/2", batch_size=256, steps=800_000, lr=5e-5, ema_decay=0.999,
                             class_cond=True, class_dropout=0.1, cfg_scale=1.5, log_every=100,
                             sample_every=10_000, ckpt_every=10_000),
    # The paper has no CIFAR-10 run; we carry over its unconditional (CelebA-HQ) column: batch 64,
    # 500k steps, AdamW 5e-5, EMA 0.999, DiT-B/2 (on 32x32 pixels instead of latents), x-flips.
    "cifar10": dict(model="DiT-B/2", batch_size=64, steps=500_000, lr=5e-5, ema_decay=0.999, xflip=True,
                    log_every=100, sample_every=10_000, ckpt_every=10_000),
    # Digits (8x8, one channel): DiT-T/2 on a CPU, 1500 steps of batch 64 like every digits preset (about four
    # minutes here); EMA half-life 5k images; lr 1e-3 (2e-3 was worse). dt = 0.05, one of Table 2's values:
    # w_nu learns by propagating the velocity dt at a time from t = 0, and at a budget this short the
    # propagation, not the O(dt^2) truncation, limits the one-step map (FD 422 with dt 0.05, 633 with 0.01).
    "digits": dict(model="DiT-T/2", batch_size=64, steps=1500, lr=1e-3, ema_halflife_kimg=5, dt=0.05,
                   log_every=100, ckpt_every=500, euler_steps=[1, 2, 4, 8, 100]),
    # 2D toy sets: an MLP, about a minute on a laptop CPU.
    "toy": dict(model="MLP", batch_size=256, steps=3000, lr=1e-3, ema_decay=0.995, log_every=200,
                ckpt_every=1000),
}


RESUMABLE = {"euler_steps"}            # what --resume may change besides common.RESUMABLE (evaluation only)


def parse_config(argv=None):
    p = common.base_parser("direct", __doc__)
    a = p.add_argument
    a("--dt", type=float, help="delta t of the forward difference, Eq. (7)/(16) (Table 2; default 0.01)")
    a("--param", choices=["tw", "w"], help="flow parameterisation: tw = Eq. (4) phi = x + t w; w = x + w (Table 4)")
    a("--stop-grad", action=argparse.BooleanOptionalAction,
      help="stop-gradients of Eq. (16) on w_nu(x0, t') (default on; --no-stop-grad is Table 3's ablation)")
    a("--cfg-scale", type=float,
      help="classifier-free guidance scale of v_theta inside the propagation target (Table 5 lists 1.5 on ImageNet; "
           "where it acts is our reading, see PRESETS)")
    a("--class-dropout", type=float, help="label dropout of v_theta (Table 5: 0.1 on ImageNet)")
    a("--weight-decay", type=float, help="AdamW weight decay (Table 5: 0)")
    a("--update-order", choices=["joint", "paper"], help="joint: one AdamW step for v_theta and w_nu (default); "
      "paper: Alg. 1's order, theta's step (l.8) before nu's target is formed (l.11-12), then nu's step")
    a("--euler-steps", type=int, nargs="+", help="steps of the v_theta Euler baseline to evaluate (Table 1: 128 4 1)")

    def resolve(args):
        cfg = common.resolve_config(args, "direct", DEFAULTS, PRESETS, RESUMABLE)
        if cfg["sample_only"] and args.euler_steps is None:
            cfg["euler_steps"] = []               # sampling: the v_theta baseline only when asked for
        if min(cfg["euler_steps"], default=1) < 1:
            raise common.UserError(f"--euler-steps values must be >= 1, got {cfg['euler_steps']}")
        if not 0 < cfg["dt"] < 0.5:
            raise common.UserError(f"--dt must lie in (0, 0.5), got {cfg['dt']}")
        if cfg["nfe"] != [1]:
            raise common.UserError("the direct map is a one-step sampler: use --nfe 1 (--euler-steps for v_theta)")
        if cfg["cfg_scale"] != 1.0 and not cfg["class_cond"]:
            raise common.UserError("--cfg-scale needs a class-conditional model (--class-cond)")
        return cfg
    return common.parse(p, argv, resolve)


def main(argv=None):
    cfg = parse_config(argv)
    if cfg["sample_only"]:
        return common.sample_only(cfg, lambda cfg, data: dict(zip(("ema_v", "ema_w"), build_models(cfg, data))),
                                  samplers)
    return train(cfg)


if __name__ == "__main__":
    common.cli(main)
