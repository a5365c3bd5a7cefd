"""What the four method files share, in two parts.

Part one, the maths: interpolants and the closed-form flow of Gaussian data, time samplers, target passes and
JVPs (how a loss says which of its passes builds a target), EMA, and the metrics (the sliced Wasserstein
distance, FID, the digits figure). Part two, the run machinery: errors, distributed setup, the precision of
each pass, data (CIFAR-10, ImageNet latents, digits, 2D toy sets), files, and the run with its CLI, checks
and bookkeeping. A method's own idea never lives here: only pieces at least two methods use as they are.

Command line (besides being imported by the method scripts):
    python common.py fid-ref --dataset cifar10 [--data-path ./data]      # cache CIFAR-10 train stats
    python common.py fid-ref IMAGES.npz|DIR --out STATS.npz             # statistics of any image set
    python common.py fid IMAGES.npz|DIR --ref STATS.npz                 # FID of exported samples
    python common.py encode-latents --images DIR --out DIR [--vae NAME]  # ImageFolder -> latent shards
"""
import argparse
import contextlib
import contextvars
import copy
import errno
import fcntl
import functools
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F


# ==============================================================================================
# Part one: the maths the methods share. Interpolants x_t = alpha(t) x + sigma(t) z and their conditional
# velocity alpha'(t) x + sigma'(t) z, and the closed-form flow of Gaussian data

def bcast(t, x):
    """A per-sample [B] tensor reshaped to broadcast against x of shape [B, ...]."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class Interpolant:
    """Base: subclasses give coefficients(t) = (alpha, sigma, dalpha/dt, dsigma/dt).

    `noise_std` is the standard deviation of z (1, or sigma_d for TrigFlow)."""
    noise_std = 1.0

    def coefficients(self, t):
        raise NotImplementedError

    def __call__(self, x, z, t):
        """Returns x_t and the conditional velocity dx_t/dt for the pair (x, z)."""
        a, s, da, ds = (bcast(c, x) for c in self.coefficients(t))
        return a * x + s * z, da * x + ds * z


class NoiseAt0(Interpolant):
    """OT path with noise at t=0 and data at t=1 (DE-CM, Direct): x_t = (1-t) z + t x, v = x - z."""

    def coefficients(self, t):
        return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)


class NoiseAt1(Interpolant):
    """OT path with data at t=0 and noise at t=1 (GCM): x_t = (1-t) x + t z, u = z - x."""

    def coefficients(self, t):
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)


class TrigFlow(Interpolant):
    """sCM Section 3: x_t = cos(t) x + sin(t) z, z ~ N(0, sigma_d^2 I), t in [0, pi/2], v = cos(t) z - sin(t) x."""

    def __init__(self, sigma_d=0.5):
        self.noise_std = sigma_d

    def coefficients(self, t):
        return torch.cos(t), torch.sin(t), -torch.sin(t), torch.cos(t)


class GaussianFlow:
    """The exact probability-flow ODE when the data are N(mu, std^2 I).

    Under x_t = a x + b z the marginal is N(a mu, (a^2 std^2 + b^2 noise_std^2) I), one Gaussian per
    coordinate. The PF-ODE map between two times is the monotone map between those Gaussians:
        flow_map(x_t, t, s) = m_s + (sd_s / sd_t) (x_t - m_t),
    and its velocity is v(x, t) = m'_t + (sd'_t / sd_t) (x - m_t), with
    sd'_t / sd_t = (a a' std^2 + b b' noise_std^2) / sd_t^2. Every method's loss must vanish on these."""

    def __init__(self, interpolant, mu, std):
        self.interp = interpolant
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.std = torch.as_tensor(std, dtype=torch.float64)

    def _moments(self, t, like):
        a, b, da, db = (bcast(c.double(), like) for c in self.interp.coefficients(t.double()))
        mu, std = self.mu.to(like.device), self.std.to(like.device)
        var = a ** 2 * std ** 2 + b ** 2 * self.interp.noise_std ** 2
        rate = (a * da * std ** 2 + b * db * self.interp.noise_std ** 2) / var   # sd'_t / sd_t
        return a * mu, da * mu, var.sqrt(), rate

    def sample_data(self, n, generator=None):
        eps = torch.randn(n, *self.mu.shape, generator=generator, dtype=torch.float64)
        return (self.mu + self.std * eps).float()

    def velocity(self, x, t):
        m, dm, _, rate = self._moments(t, x)
        return (dm + rate * (x.double() - m)).to(x.dtype)

    def flow_map(self, x, t, s):
        m_t, _, sd_t, _ = self._moments(t, x)
        m_s, _, sd_s, _ = self._moments(s, x)
        return (m_s + sd_s / sd_t * (x.double() - m_t)).to(x.dtype)


# ==============================================================================================
# Time samplers: sample(n) uses the global torch RNG; pdf(t) is the density (pmf for Segments);
# cdf(t) is there for the KS tests. lo/hi may be [n] tensors (GCM samples t on [s, tT] per sample).

def _uniform(n, device):
    return torch.rand(n, device=device, dtype=torch.float64)


class Uniform:
    def __init__(self, lo=0.0, hi=1.0):
        self.lo, self.hi = lo, hi

    def sample(self, n, device="cpu"):
        return (self.lo + (self.hi - self.lo) * _uniform(n, device)).float()

    def pdf(self, t):
        inside = (t >= self.lo) & (t <= self.hi)
        return inside.to(torch.float64) / (self.hi - self.lo)

    def cdf(self, t):
        return ((t - self.lo) / (self.hi - self.lo)).clamp(0, 1)


class LogNormal:
    """sigma = exp(tau), tau ~ N(P_mean, P_std^2) (EDM; sCM maps it to t = arctan(sigma / sigma_d))."""

    def __init__(self, P_mean, P_std):
        self.P_mean, self.P_std = P_mean, P_std

    def sample(self, n, device="cpu"):
        return torch.exp(self.P_mean + self.P_std * torch.randn(n, device=device, dtype=torch.float64)).float()

    def pdf(self, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        z = (torch.log(sigma) - self.P_mean) / self.P_std
        return torch.exp(-0.5 * z ** 2) / (sigma * self.P_std * math.sqrt(2 * math.pi))

    def cdf(self, sigma):
        z = (torch.log(torch.as_tensor(sigma, dtype=torch.float64)) - self.P_mean) / self.P_std
        return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


class LogitNormal:
    """t = lo + (hi - lo) sigmoid(u), u ~ N(m, s^2) (SD3's "logit-normal", DE-CM's "log-norm")."""

    def __init__(self, m=0.0, s=1.0, lo=0.0, hi=1.0):
        self.m, self.s, self.lo, self.hi = m, s, lo, hi

    def sample(self, n, device="cpu"):
        u = self.m + self.s * torch.randn(n, device=device, dtype=torch.float64)
        return (self.lo + (self.hi - self.lo) * torch.sigmoid(u)).float()

    def pdf(self, t):
        x = ((torch.as_tensor(t, dtype=torch.float64) - self.lo) / (self.hi - self.lo)).clamp(1e-12, 1 - 1e-12)
        z = (torch.logit(x) - self.m) / self.s
        return torch.exp(-0.5 * z ** 2) / (self.s * math.sqrt(2 * math.pi) * x * (1 - x) * (self.hi - self.lo))

    def cdf(self, t):
        x = ((torch.as_tensor(t, dtype=torch.float64) - self.lo) / (self.hi - self.lo)).clamp(1e-12, 1 - 1e-12)
        return 0.5 * (1 + torch.erf((torch.logit(x) - self.m) / (self.s * math.sqrt(2))))


class Segments:
    """Uniform over the N+1 endpoints lo + k (hi - lo) / N of N equal segments (DE-CM Section 4.4)."""

    def __init__(self, N, lo=0.0, hi=1.0):
        self.N, self.lo, self.hi = N, lo, hi

    def sample(self, n, device="cpu"):
        k = torch.randint(0, self.N + 1, (n,), device=device)
        return (self.lo + (self.hi - self.lo) * k.double() / self.N).float()

    def pdf(self, t):
        """Probability mass: 1/(N+1) on each endpoint, 0 elsewhere."""
        k = (torch.as_tensor(t, dtype=torch.float64) - self.lo) / (self.hi - self.lo) * self.N
        on_grid = (k - k.round()).abs() < 1e-6
        return on_grid.double() / (self.N + 1)


class Sine:
    """GCM Eq. (15): p(u) = pi (a - b) / (2 (cos(pi b/2) - cos(pi a/2))) sin(pi (a u + b (1 - u)) / 2) on
    u in [0, 1], placed on [lo, hi] by t = lo + (hi - lo) u. Sampled by the inverse CDF, Eq. (41)."""

    def __init__(self, a=1.0, b=0.01, lo=0.0, hi=1.0):
        self.a, self.b, self.lo, self.hi = a, b, lo, hi

    def _u(self, t):
        return (torch.as_tensor(t, dtype=torch.float64) - self.lo) / (self.hi - self.lo)

    def sample(self, n, device="cpu"):
        a, b, v = self.a, self.b, _uniform(n, device)
        cb, ca = math.cos(math.pi * b / 2), math.cos(math.pi * a / 2)
        u = (2 / (math.pi * (a - b))) * (torch.arccos(cb - v * (cb - ca)) - math.pi * b / 2)   # Eq. (41)
        return (self.lo + (self.hi - self.lo) * u).float()

    def pdf(self, t):
        a, b, u = self.a, self.b, self._u(t)
        norm = math.pi * (a - b) / (2 * (math.cos(math.pi * b / 2) - math.cos(math.pi * a / 2)))
        p = norm * torch.sin(math.pi / 2 * (a * u + b * (1 - u)))
        return torch.where((u >= 0) & (u <= 1), p, torch.zeros_like(p)) / (self.hi - self.lo)

    def cdf(self, t):
        a, b, u = self.a, self.b, self._u(t).clamp(0, 1)
        cb, ca = math.cos(math.pi * b / 2), math.cos(math.pi * a / 2)
        return (cb - torch.cos(math.pi / 2 * ((a - b) * u + b))) / (cb - ca)


class Cosh:
    """GCM Eq. (16): p(u) = (a - b) / (sinh a - sinh b) cosh(a u + b (1 - u)) on [0, 1] -> [lo, hi];
    inverse CDF Eq. (42)."""

    def __init__(self, a=1.5, b=0.0, lo=0.0, hi=1.0):
        self.a, self.b, self.lo, self.hi = a, b, lo, hi

    def _u(self, t):
        return (torch.as_tensor(t, dtype=torch.float64) - self.lo) / (self.hi - self.lo)

    def sample(self, n, device="cpu"):
        a, b, v = self.a, self.b, _uniform(n, device)
        u = (torch.arcsinh(math.sinh(b) + v * (math.sinh(a) - math.sinh(b))) - b) / (a - b)   # Eq. (42)
        return (self.lo + (self.hi - self.lo) * u).float()

    def pdf(self, t):
        a, b, u = self.a, self.b, self._u(t)
        p = (a - b) / (math.sinh(a) - math.sinh(b)) * torch.cosh(a * u + b * (1 - u))
        return torch.where((u >= 0) & (u <= 1), p, torch.zeros_like(p)) / (self.hi - self.lo)

    def cdf(self, t):
        a, b, u = self.a, self.b, self._u(t).clamp(0, 1)
        return (torch.sinh((a - b) * u + b) - math.sinh(b)) / (math.sinh(a) - math.sinh(b))


@functools.lru_cache(maxsize=None)
def _gauss_legendre(n):
    """Gauss-Legendre nodes and weights on [-1, 1], computed once: numpy's eigensolver behind leggauss
    leaves BLAS threads spinning after each call, which slowed every training step that built a sampler
    (a GCM-VU toy step took 3.5x longer on 2 cores)."""
    x, w = np.polynomial.legendre.leggauss(n)
    return torch.tensor(x), torch.tensor(w)


class UniformPower:
    """GCM Eq. (17): p(u; nu) = nu int_u^1 (1/tau) (1 - u/tau)^(nu-1) dtau on [0, 1] -> [lo, hi].
    Sampled as in App. E.2: u = U1 (1 - (1 - U2)^(1/nu)) with U1, U2 ~ U(0, 1) independent.

    With y = u/tau the integral is nu int_u^1 (1 - y)^(nu-1) / y dy; we evaluate it (and the CDF) by
    Gauss-Legendre quadrature in log y, which is smooth for nu >= 1."""

    def __init__(self, nu=4.0, lo=0.0, hi=1.0):
        self.nu, self.lo, self.hi = nu, lo, hi
        self._x, self._w = _gauss_legendre(64)

    def sample(self, n, device="cpu"):
        u1, u2 = _uniform(n, device), _uniform(n, device)
        u = u1 * (1 - (1 - u2) ** (1 / self.nu))
        return (self.lo + (self.hi - self.lo) * u).float()

    def _density01(self, u):
        # nu int_{log u}^{0} (1 - e^l)^(nu-1) dl, Gauss-Legendre on [log u, 0]
        lu = torch.log(u.clamp_min(1e-300))[..., None]
        l = lu / 2 * (1 - self._x)                               # nodes mapped from [-1, 1] to [log u, 0]
        return self.nu * (-lu[..., 0] / 2) * ((1 - torch.exp(l)) ** (self.nu - 1) * self._w).sum(-1)

    def pdf(self, t):
        u = (torch.as_tensor(t, dtype=torch.float64) - self.lo) / (self.hi - self.lo)
        inside = (u > 0) & (u <= 1)
        return torch.where(inside, self._density01(u.clamp(1e-300, 1)), torch.zeros_like(u)) / (self.hi - self.lo)

    def cdf(self, t):
        # P(U1 X <= u), X = 1 - (1 - U2)^(1/nu) with CDF 1 - (1 - x)^nu: for U1 <= u the event is sure,
        # so F(u) = u + int_u^1 [1 - (1 - u/U1)^nu] dU1 (Gauss-Legendre on [u, 1]).
        u = ((torch.as_tensor(t, dtype=torch.float64) - self.lo) / (self.hi - self.lo)).clamp(0, 1)[..., None]
        u1 = u + (1 - u) * (1 + self._x) / 2                     # nodes on [u, 1]
        inner = 1 - (1 - u / u1) ** self.nu
        return u[..., 0] + (1 - u[..., 0]) / 2 * (inner * self._w).sum(-1)


def randn(shape, generator, device, std=1.0):
    """Gaussian noise drawn on the host from `generator` (device-independent), moved to `device`."""
    return (std * torch.randn(*shape, generator=generator)).to(device)


# ==============================================================================================
# Target passes and JVPs. A training step runs two kinds of pass through a network: the gradient pass, whose
# output carries the parameters' gradient, and target passes, whose outputs build a target without one (F_minus,
# both points of a finite difference, a JVP, a teacher's velocity, Direct's propagation target). The losses say
# which pass is which through `Passes` and `target`, and nothing else; how each kind is computed (through DDP
# or not, with which dropout mask, and in which precision: "Precision", in part two) is decided here.

class Passes:
    """The passes of one training step through one network, with one dropout mask for all of them:
        grad(*inputs)            the gradient pass (through DDP and --compile);
        target(*inputs)          a target pass of the same network: no gradient, on the module inside DDP, in the
                                 target precision;
        detached(out, *inputs)   the gradient pass's output `out` at these inputs as a target: its own value with
                                 the gradient stopped where the gradient pass computed it as a target pass would
                                 (reuse_for_target), else the target pass;
        function(*fixed, **kw)   the network as a function of the inputs that come before `fixed`, for `jvp`
                                 (a target pass too).
    Every pass starts from the random state the first one found, so all see the same dropout mask and label
    dropout: F_theta - F_minus carries no mask noise. Outputs are fp32 at least, for the loss algebra. `call(net,
    *inputs, **kw)` says how a pass uses the network (GCM's preconditioning); by default net(*inputs, **kw).
    `model` may be a plain function (the tests' closed-form solutions)."""

    def __init__(self, model, call=None):
        self.model, self.net = model, unwrap(model)
        self.call = call or (lambda net, *inputs, **kw: net(*inputs, **kw))
        self._same = None

    def _shared(self, like):
        if self._same is None:
            self._same = SameRandomness(like.device)
        return self._same

    def grad(self, *inputs, **kw):
        with self._shared(inputs[0]):
            return wide(self.call(self.model, *inputs, **kw))

    def target(self, *inputs, **kw):
        with self._shared(inputs[0]), torch.no_grad(), target_precision(inputs[0]):
            return wide(self.call(self.net, *inputs, **kw))

    def detached(self, out, *inputs, **kw):
        return wide(out.detach()) if reuse_for_target(inputs[0]) else self.target(*inputs, **kw)

    def function(self, *fixed, **kw):
        def f(*inputs):
            with self._shared(inputs[0]):
                return self.call(self.net, *inputs, *fixed, **kw)
        return f


def target(fn, *args, keep_graph=False, **kw):
    """fn(*args, **kw) as a target pass: no gradient, the networks among the arguments in eval mode (no dropout
    of their own: a velocity that enters a target is a function of its inputs) and in the target precision
    (that of the first tensor argument's device), each network's output and the result in fp32 at least.
    keep_graph=True keeps the graph through the inputs (an ablation's target with its gradient)."""
    like = next(a for a in args if torch.is_tensor(a))
    with torch.set_grad_enabled(keep_graph and torch.is_grad_enabled()), eval_mode(*args), target_precision(like):
        return wide(fn(*(_Widened(a) if isinstance(a, nn.Module) else a for a in args), **kw))


def target_pass(fn):
    """Decorator: every call of fn is a target pass (`target`)."""
    @functools.wraps(fn)
    def as_target(*args, **kw):
        return target(fn, *args, **kw)
    return as_target


class _Widened:
    """A network inside a target pass: its outputs are widened to fp32 before any difference is taken of them."""

    def __init__(self, net):
        self.net = net

    def __call__(self, *inputs, **kw):
        return wide(self.net(*inputs, **kw))

    def __getattr__(self, name):
        return getattr(self.net, name)


def jvp(fn, primals, tangents):
    """(fn(primals), J_fn(primals) . tangents) by forward-mode AD (torch.func.jvp), without a graph (the weights
    are stop-gradient in every JVP the methods take), as a target pass: in IEEE fp32 under the exact policy
    (bf16 inputs are widened first), under bf16 autocast under the faster one; fp32 (or fp64) out. `fn` is a
    network as a function of the inputs differentiated (Passes.function: the module inside DDP, since the JVP
    contributes no parameter gradient); other inputs (labels) are closed over."""
    like = primals[0]
    with torch.no_grad(), target_precision(like, "target pass: JVP"):
        if _arithmetic(like) != "bf16":
            primals, tangents = tuple(map(wide, primals)), tuple(map(wide, tangents))
        out, tangent = torch.func.jvp(fn, tuple(primals), tuple(tangents))
    return wide(out), wide(tangent)


def wide(x):
    """At least fp32 (bf16 outputs are widened for the target algebra and the losses; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def mse(a, b):
    """||a - b||^2 averaged over every element, in fp32 at least (bf16 is widened; float64 stays float64)."""
    return (wide(a) - wide(b)).pow(2).mean()


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class SameRandomness:
    """Snapshot the RNG once; every `with` block starts from that snapshot.

    The JVP pass and the gradient pass of a consistency loss must see the same dropout mask (and label
    dropout), otherwise F_theta - F_minus carries mask noise. Wrap each pass in `with same:`."""

    def __init__(self, device="cpu"):
        self.device = device
        self.state = rng_state(device)

    def __enter__(self):
        set_rng_state(self.state, self.device)
        return self

    def __exit__(self, *exc):
        return False


# ==============================================================================================
# EMA of the weights, as a decay per step or (EDM) a half-life in images, the same on any number of GPUs

class EMA:
    """Exponential moving average of a model's weights: a fixed `decay` per step, or EDM's half-life
    in images (`halflife_kimg`), beta = 0.5 ** (batch / (halflife_kimg * 1000)), so runs with different
    batch sizes average over the same number of images. The copy is kept in eval mode."""

    def __init__(self, model, decay=None, halflife_kimg=None):
        if (decay is None) == (halflife_kimg is None):
            raise ValueError("give exactly one of decay and halflife_kimg")
        self.decay, self.halflife_kimg = decay, halflife_kimg
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    def beta(self, batch_size):
        return self.decay if self.decay is not None else 0.5 ** (batch_size / (self.halflife_kimg * 1000))

    @torch.no_grad()
    def update(self, model, batch_size):
        src = unwrap(model)
        ema_p, p = list(self.model.parameters()), list(src.parameters())
        torch._foreach_lerp_(ema_p, p, 1 - self.beta(batch_size))
        for eb, b in zip(self.model.buffers(), src.buffers()):
            eb.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


# ==============================================================================================
# Metrics: the sliced Wasserstein distance of 2D toy sets

def sliced_wasserstein(x, y, n_proj=512, seed=0):
    """Sliced 2-Wasserstein distance between point clouds x [n, d] and y [m, d]:
    sqrt of the mean over random unit directions of W2^2 between the 1D projections. Quantiles are
    compared on a common grid of min(n, m) levels, so n and m may differ. Fixed directions (seed)."""
    x, y = x.detach().double().cpu().reshape(len(x), -1), y.detach().double().cpu().reshape(len(y), -1)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    px, py = (x @ dirs).sort(dim=0).values, (y @ dirs).sort(dim=0).values          # (n, P), (m, P)
    k = min(len(px), len(py))
    levels = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    qx = torch.quantile(px, levels, dim=0) if len(px) != k else px
    qy = torch.quantile(py, levels, dim=0) if len(py) != k else py
    return float(((qx - qy) ** 2).mean().sqrt())


# ==============================================================================================
# FID: the Inception-v3 of pytorch-fid (https://github.com/mseitzer/pytorch-fid), which reproduces the
# TensorFlow FID graph: in the pool branches of the A, C and first E blocks the average pooling ignores
# padding, and the last E block max-pools. Its state dict uses torchvision's module names, so we build
# torchvision's Inception3 and swap those blocks for these subclasses.

FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"


def _fid_avg_pool(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _fid_max_pool(x):
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _fid_blocks():
    from torchvision.models import inception as tvi

    class FIDInceptionA(tvi.InceptionA):
        pool = staticmethod(_fid_avg_pool)

        def _forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(self.pool(x))]

    class FIDInceptionC(tvi.InceptionC):
        pool = staticmethod(_fid_avg_pool)

        def _forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = x
            for i in range(1, 6):
                bd = getattr(self, f"branch7x7dbl_{i}")(bd)
            return [self.branch1x1(x), b7, bd, self.branch_pool(self.pool(x))]

    class FIDInceptionE(tvi.InceptionE):
        def __init__(self, in_channels, pool):
            super().__init__(in_channels)
            self.pool = pool

        def _forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            return [self.branch1x1(x), b3, bd, self.branch_pool(self.pool(x))]

    return tvi, FIDInceptionA, FIDInceptionC, FIDInceptionE


class FIDInception(nn.Module):
    """x: images in [-1, 1], any size -> (N, 2048) pool features (float32).

    The features are computed in IEEE fp32 on every device (`ieee_fp32`: no TF32 convolutions on Ampere and
    later GPUs, where PyTorch's default, and so pytorch-fid's, would allow them): FID then does not depend on
    the GPU it was computed on, and statistics from a GPU and from a CPU agree to fp32 round-off. TF32 moves
    the features by about 1e-4 relative and FID by about that much too, far below the FID's own sampling
    noise, so published numbers computed with TF32 stay comparable."""

    def __init__(self):
        super().__init__()
        tvi, A, C, E = _fid_blocks()
        net = tvi.Inception3(num_classes=1008, aux_logits=False, init_weights=False, transform_input=False)
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
        net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = C(768, 128), C(768, 160), C(768, 160), C(768, 192)
        net.Mixed_7b, net.Mixed_7c = E(1280, _fid_avg_pool), E(2048, _fid_max_pool)
        self.net = net.eval().requires_grad_(False)

    def load_state_dict(self, state_dict, strict=True):
        return self.net.load_state_dict(state_dict, strict=strict)

    @torch.no_grad()
    def forward(self, x):
        with ieee_fp32(), torch.autocast(x.device.type, enabled=False):
            x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
            n = self.net
            for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                          n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                          n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
                x = layer(x)
            return F.adaptive_avg_pool2d(x, 1).flatten(1)          # (N, 2048)


FID_WEIGHTS_SHA256_PREFIX = "6726825d"      # the hash prefix in the published file name (torch.hub's convention)


def _sha256(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_fid_inception(weights=None, device="cpu"):
    """The FID network with the standard weights: `weights` path, else the torch hub cache, else a
    download; offline without them -> UserError naming the URL and where to put the file. A downloaded or
    cached file must have the published hash (torch.hub checks the download, we check the cache); every
    file is read with weights_only=True (plain tensors, no code)."""
    net = FIDInception()
    fname = os.path.basename(FID_WEIGHTS_URL)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", fname)
    path = weights or (cached if os.path.isfile(cached) else None)
    if weights and not os.path.isfile(weights):
        raise UserError(f"FID weights not found: {weights}")
    if path == cached and not _sha256(cached).startswith(FID_WEIGHTS_SHA256_PREFIX):
        raise UserError(f"{cached} does not have the published hash {FID_WEIGHTS_SHA256_PREFIX}...: a damaged or "
                        f"foreign file; delete it (it is downloaded again when online) or pass --fid-weights PATH")
    try:
        if path:
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=False, map_location="cpu",
                                                       check_hash=True, weights_only=True)
    except Exception as e:
        raise UserError(f"could not get the FID Inception weights ({type(e).__name__}: {str(e).splitlines()[0][:80]}); "
                        f"download {FID_WEIGHTS_URL} to {cached} or pass --fid-weights PATH") from None
    if not isinstance(state, dict):
        raise UserError(f"{path or fname} is not a state dict")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        reason = str(e).splitlines()[0][:100]
        raise UserError(f"{path or fname} is not the FID Inception state dict ({reason})") from None
    return net.to(device)


def quantize_images(x):
    """Generated images in [-1, 1] -> what a saved PNG holds: uint8 levels, returned in [-1, 1]."""
    u8 = ((x.float() + 1) * 127.5).round().clamp(0, 255)
    return u8 / 127.5 - 1


def to_uint8(x):
    """Images in [-1, 1], [N, C, H, W] -> uint8 [N, H, W, C] numpy, the levels quantize_images keeps."""
    return ((x.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(arr):
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [-1, 1] (the inverse of to_uint8 on its levels)."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 127.5 - 1


FID_DIM = 2048                          # the Inception pool features FID compares


class FeatureStats:
    """Running float64 sums of Inception features; `finish()` all-reduces and returns (mu, sigma)."""

    def __init__(self, dim=FID_DIM, device="cpu"):
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.s1 = torch.zeros(dim, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, feats):
        f = feats.double()
        self.n += len(f)
        self.s1 += f.sum(0)
        self.s2 += f.T @ f

    def finish(self):
        n, s1, s2 = (all_reduce_sum(v.clone()) for v in (self.n, self.s1, self.s2))
        mu = s1 / n
        sigma = (s2 - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    The eigenvalues of S1 S2 are those of (S1^(1/2) S2^(1/2)) (S1^(1/2) S2^(1/2))^T, so
    tr((S1 S2)^(1/2)) is the sum of singular values (nuclear norm) of S1^(1/2) S2^(1/2). That needs two
    symmetric eigendecompositions (round-off negatives clipped to 0) and one SVD: no general, possibly
    complex sqrtm, and no squaring of the condition number."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)

    def psd_sqrt(s):
        w, V = np.linalg.eigh((s + s.T) / 2)
        return (V * np.sqrt(np.clip(w, 0, None))) @ V.T

    tr_covmean = np.linalg.svd(psd_sqrt(s1) @ psd_sqrt(s2), compute_uv=False).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def inception_stats(images_iter, inception, device):
    """Statistics of an iterable of image batches in [-1, 1] (this rank's share; all-reduced)."""
    stats = FeatureStats(device=device)
    for x in images_iter:
        stats.add(inception(quantize_images(x.to(device))))
    return stats.finish()


def reference_stats_path(dataset, data_path):
    return os.path.join(data_path or "./data", f"fid_stats_{dataset}_train.npz")


def fid_reference(dataset, data_path=None, ref=None, weights=None, batch_size=250, dist_info=None, device=None):
    """(mu, sigma) of the reference set. `ref` is an .npz with mu, sigma; for CIFAR-10 the stats of the
    50k training images are computed once and cached next to the data."""
    if ref:
        if not os.path.isfile(ref):
            raise UserError(f"FID reference statistics not found: {ref}")
        mu, sigma = read_stats(ref)
        if len(mu) != FID_DIM:
            raise UserError(f"{ref} holds {len(mu)}-d statistics; FID's Inception features are {FID_DIM}-d")
        return mu, sigma
    path = reference_stats_path(dataset, data_path)
    if os.path.isfile(path):
        return read_stats(path)
    if dataset != "cifar10":
        raise UserError(f"no FID reference statistics for {dataset}: pass --fid-ref STATS.npz (keys mu, sigma)")
    dist_info = dist_info or Dist(device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    data = CIFAR10(data_path or "./data")
    inception = load_fid_inception(weights, dist_info.device)
    idx = torch.arange(dist_info.rank, len(data), dist_info.world_size)
    batches = (data.get(idx[i:i + batch_size])[0] for i in range(0, len(idx), batch_size))
    mu, sigma = inception_stats(batches, inception, dist_info.device)
    if dist_info.is_main:
        try:
            atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma))
        except OSError as e:                                  # a read-only data folder: computed, not cached
            print0(f"warning: could not cache the FID reference statistics in {path} ({e.strerror or e})")
    return mu, sigma


# ==============================================================================================
# The digits figure: FID's recipe with a small classifier of 8x8 digits as the feature network. The Frechet
# distance between generated and held-out digits in its penultimate features (the same `frechet_distance` as
# FID), and the share of samples per predicted class (mode coverage).

DIGITS_CLASSIFIER_VERSION = 1


class DigitsClassifier(nn.Module):
    """A small CNN for 8x8 digits: `features` are the 64-d penultimate activations (the counterpart of
    Inception's 2048-d pool features), `forward` gives the 10 class logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),                     # (N, 32, 8, 8)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (N, 64, 4, 4)
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 128, 2, 2)
            nn.Flatten(), nn.Linear(512, 64), nn.ReLU())                   # (N, 64)
        self.head = nn.Linear(64, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def _train_digits_classifier(epochs=60, batch=64, lr=2e-3):
    """Deterministic: a fixed seed, a fixed order of batches and one thread (so that the float sums do not
    depend on the machine's thread count). Adam with a cosine learning-rate decay; every image is shifted
    by up to one pixel at random, which makes the features robust to digits a pixel off centre. About
    fifteen seconds on one CPU core."""
    train, held = Digits("train"), Digits("held-out")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = DigitsClassifier()
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        total, done = epochs * math.ceil(len(train) / batch), 0
        for _ in range(epochs):
            order = torch.randperm(len(train), generator=g)
            for i in range(0, len(order), batch):
                x, y = train.get(order[i:i + batch])
                padded = F.pad(x, (1, 1, 1, 1), value=-1.0)                 # (B, 1, 10, 10), background -1
                crops = torch.stack([padded[:, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)])
                x = crops[torch.randint(0, 9, (len(x),), generator=g), torch.arange(len(x))]   # (B, 1, 8, 8)
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * done / total))
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
        net.eval()
        with torch.no_grad():
            accuracy = float((net(held.images).argmax(1) == held.labels).float().mean())
    finally:
        torch.set_num_threads(threads)
    return net, accuracy


def digits_classifier(data_path=None, device="cpu", verbose=True):
    """The classifier behind the digits figure: read from DATA/digits_classifier.pt, or trained once on the
    training split and cached there (a plain state dict, read with weights_only=True). Its held-out
    accuracy is printed."""
    path = os.path.join(data_path or "./data", "digits_classifier.pt")
    net, accuracy = DigitsClassifier(), None
    if os.path.isfile(path):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("version") == DIGITS_CLASSIFIER_VERSION:
                net.load_state_dict(blob["state"])
                accuracy = float(blob["accuracy"])
        except Exception:                                  # unreadable or foreign: train a new one over it
            accuracy = None
    if accuracy is None:
        net, accuracy = _train_digits_classifier()
        if int(os.environ.get("RANK", 0)) == 0:
            try:
                save_checkpoint(path, {"version": DIGITS_CLASSIFIER_VERSION, "state": net.state_dict(),
                                       "accuracy": accuracy})
            except OSError as e:
                print0(f"warning: could not cache the digits classifier in {path} ({e.strerror})")
    if verbose:
        print0(f"digits classifier: {100 * accuracy:.1f}% held-out accuracy ({path})")
    return net.eval().requires_grad_(False).to(device), accuracy


class DigitsQuality:
    """score(images) -> {"fd": Frechet distance to the held-out digits, "class_share": [share of samples
    per predicted class], "modes": exp(entropy of those shares), 10 when every digit is equally common}.
    Images in [-1, 1] are quantised as a saved PNG would hold them (like FID's input) before the classifier
    sees them. floor(): held-out against the training digits; ceiling(n): Gaussian noise images."""

    def __init__(self, data_path=None, device="cpu", verbose=True):
        self.device = torch.device(device)
        self.net, self.accuracy = digits_classifier(data_path, self.device, verbose)
        self.ref = self.stats(Digits("held-out").images)

    @torch.no_grad()
    def _run(self, images, batch=1000):
        x = quantize_images(torch.as_tensor(images).float())
        feats, preds = [], []
        for chunk in x.split(batch):
            f = self.net.features(chunk.to(self.device))
            feats.append(f.double().cpu())
            preds.append(self.net.head(f).argmax(1).cpu())
        return torch.cat(feats), torch.cat(preds)

    def stats(self, images):
        feats = self._run(images)[0]
        mu = feats.mean(0)
        centred = feats - mu
        return mu.numpy(), (centred.T @ centred / (len(feats) - 1)).numpy()

    def score(self, images):
        feats, preds = self._run(images)
        mu = feats.mean(0)
        centred = feats - mu
        sigma = centred.T @ centred / (len(feats) - 1)
        share = torch.bincount(preds, minlength=10).double() / len(preds)
        entropy = -(share * share.clamp_min(1e-300).log()).sum()
        return {"fd": frechet_distance(mu.numpy(), sigma.numpy(), *self.ref),
                "class_share": [round(float(s), 4) for s in share], "modes": float(entropy.exp())}

    def floor(self):
        return self.score(Digits("train").images)

    def ceiling(self, n=1000, seed=0):
        return self.score(torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1))


# ##############################################################################################
# Part two: the run machinery. Nothing below is maths: errors, distributed setup, the precision of each
# pass, data, files, and the run (its CLI, config, checks, lock, guard and bookkeeping).
# ##############################################################################################

# ==============================================================================================
# Errors: bad input is one line on stderr and exit code 2, never a traceback (see "The run" for the
# whole contract and `cli`)

class UserError(Exception):
    """Something the user gave us is wrong (a path, a flag, a checkpoint): reported in one line."""


class RunError(Exception):
    """The run itself cannot go on (e.g. too many non-finite steps): reported in one line, exit 1."""


# ==============================================================================================
# Distributed setup: one code path for `python` and `torchrun`

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def ddp(self):
        return self.world_size > 1 or tdist.is_initialized()

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(device=None):
    """Initialise torch.distributed when launched by torchrun (RANK set): NCCL on CUDA, gloo on CPU.

    device: None picks CUDA when available, else CPU; "cpu" forces the CPU (and gloo)."""
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if "RANK" not in os.environ:                                # plain `python`
        return Dist(device=torch.device(device or ("cuda" if use_cuda else "cpu")))
    env = {k: os.environ.get(k, "") for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    missing = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not env[k]]
    if missing:
        raise UserError(f"RANK={env['RANK']} is set, as torchrun sets it, but {' and '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not: launch with torchrun, or unset RANK to run one "
                        f"process")
    try:
        rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"] or 0)
    except ValueError:
        raise UserError(f"RANK={env['RANK']!r}, WORLD_SIZE={env['WORLD_SIZE']!r}, LOCAL_RANK={env['LOCAL_RANK']!r}: "
                        f"not whole numbers") from None
    if not 0 <= rank < world or local_rank < 0:
        raise UserError(f"RANK={rank} does not lie in 0 .. WORLD_SIZE-1 = {world - 1} (or LOCAL_RANK={local_rank} < 0)")
    try:
        socket.getaddrinfo(env["MASTER_ADDR"], None)
    except OSError:                     # else the process group retries it for half an hour
        raise UserError(f"MASTER_ADDR={env['MASTER_ADDR']} is not a host name this machine can resolve") from None
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                 **({"device_id": dev} if use_cuda else {}))
    return Dist(rank, local_rank, world, dev)


def check_compiler(device_type):
    """--compile needs what Inductor builds code with: a working C++ compiler for CPU kernels, Triton for CUDA
    ones. Checked before any work, so that a machine without them gets one line and no run folder."""
    try:
        if device_type == "cuda":
            from torch.utils._triton import has_triton
            missing = None if has_triton() else "Triton, which builds its GPU kernels, is missing or sees no GPU"
        else:
            from torch._inductor.cpp_builder import get_cpp_compiler
            get_cpp_compiler()
            missing = None
    except ImportError:                    # another PyTorch release: the first compiled step will say it
        return
    except Exception as e:
        missing = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    if missing:
        raise UserError(f"--compile: torch.compile cannot build code on this machine ({missing}); run without "
                        f"--compile")


def deterministic_algorithms():
    """--deterministic: PyTorch's deterministic kernels (and cuBLAS's fixed workspace, which they need), so that a
    run and its resumption repeat bit for bit on a GPU too, a little slower. CPU runs are deterministic without
    it. An operation without a deterministic kernel then raises instead of varying. cuBLAS reads its workspace
    setting at the process's first cuBLAS call: a process that has used CUDA already must have had it set."""
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.cuda.is_initialized():
        raise UserError("--deterministic needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before this process "
                        "uses CUDA (it has already); set it before starting Python")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def tune_cpu_allocator():
    """Keep freed tensor memory in the process on glibc (CPU runs). By default glibc hands every large
    freed block back to the OS and page-faults it in again at the next step; for a training loop that
    reallocates the same activations every step this costs ~10-20% of a CPU step (sys time). Same
    effect as MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ in the environment; a no-op elsewhere."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)      # M_TRIM_THRESHOLD: do not trim the heap below 1 GiB of free space
        libc.mallopt(-3, 1 << 30)      # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap
    except (OSError, AttributeError):
        pass


def seed_everything(seed, dist_info):
    """Per-rank seed (DiT convention): ranks draw different noise and times, reproducibly."""
    torch.manual_seed(seed * dist_info.world_size + dist_info.rank)


def print0(*args, **kwargs):
    if not tdist.is_initialized() or tdist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(x):
    if tdist.is_initialized():
        tdist.all_reduce(x)
    return x


def all_reduce_mean(x):
    if tdist.is_initialized():
        tdist.all_reduce(x)
        x /= tdist.get_world_size()
    return x


@contextlib.contextmanager
def eval_mode(*modules):
    """Inside the block the modules run in eval mode (no dropout, no label dropout); their modes are restored
    after. For passes that build a target or a sample and share no random draws with a gradient pass: they
    must not see a dropout of their own. Plain functions (the tests' exact solutions) pass
    through untouched."""
    modules = [m for m in modules if isinstance(m, nn.Module)]
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.train(False)
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def unwrap(model):
    """The plain module inside torch.compile and DDP (Run.wrap). Forward-mode JVPs and target passes run on it:
    they need no gradient sync (weights are stop-gradient there), while every pass that produces parameter
    gradients must go through DDP."""
    model = getattr(model, "_orig_mod", model)                 # torch.compile's OptimizedModule
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ==============================================================================================
# Precision: which passes of a training step run in which arithmetic. This section is the whole mechanism;
# the method files only say which of their passes are target passes (part one, "Target passes and JVPs").
#
# Gradient passes (a forward whose output carries the parameters' gradient, and its backward) run under
# --bf16 in bf16 autocast (`mixed_precision`, which Run puts around every method's loss; CUDA, and the CPU,
# where the tests run it); otherwise in fp32, with TF32 matmuls and convolutions on CUDA (--tf32, on by default,
# as in DiT and nanoGPT: `set_tf32`). A rounding error there is noise on one gradient.
#
# Target passes (a pass whose output enters a target without a gradient: teacher velocities, F_minus, both
# evaluations of a finite difference, Direct's propagation target) and the JVPs are different: targets
# subtract near-equal numbers (F_theta - F_minus, f(x_t) - f(x_r)), divide by small steps (GCM's (s - r)/(t - r),
# up to 1000; discrete sCM's 1/sin(t - t')) or add a small increment to a large value (Direct's dt/t (v - w)), so
# an error of those passes is amplified into the target itself. The policy --target-precision decides how
# they run (`target_precision`, `jvp`):
#   fp32 (the exact policy, the default): IEEE fp32 on every device: autocast off, and TF32 (and oneDNN's
#       reduced-precision fp32 modes) off inside, restored after (`fp32_matmuls`). On Ampere and Hopper GPUs a
#       TF32 pass keeps 10 mantissa bits, a relative error near 1e-3 that GCM's (s - r)/(t - r) would amplify
#       a thousandfold. (NVIDIA's FastGen and EDM2 turn TF32 off for the same reason.)
#   tf32 (the middle policy): fp32 storage with autocast off as under the exact policy, but TF32 tensor cores in
#       the target passes' matmuls and convolutions on CUDA (10 mantissa bits against bf16's 7, at the speed of
#       the tensor cores, where IEEE fp32 runs at about a fifteenth of the bf16 peak). On a CPU there are no TF32
#       units: this is the exact policy.
#   bf16 (the faster policy of public implementations such as Sana-Sprint, rCM, FACM and TVM; needs --bf16):
#       the target passes and JVPs run under the same bf16 autocast as the gradient passes.
# Under every policy the numerically delicate parts stay fp32 in every pass: the attention softmax, the norms
# and the time embeddings (dit.py), and the target algebra: what a target pass returns is widened to fp32 before
# differences, divisions and normalisations (`Passes`, `target`, `jvp`).
# A gradient pass's own detached output may stand in for a target pass only when it is computed at least as
# precisely as that target pass would be (`reuse_for_target`); otherwise the target pass is run.
# tests/test_precision.py checks, for every method at the closed-form Gaussian solution, that the targets
# computed under --bf16 equal the fp32 ones to fp32 accuracy (exact policy; on CUDA with TF32 on elsewhere),
# measures what the tf32 and bf16 policies cost, and that TF32 is off inside every target pass and on again after.

TARGET_PRECISIONS = ("fp32", "tf32", "bf16")


_TARGETS = contextvars.ContextVar("target_precision", default="fp32")


def _fp32_switches():
    """[(flags object, attribute, IEEE value, device type)] of the switches that let fp32 matmuls and convolutions
    round to fewer mantissa bits. PyTorch >= 2.9 has per-backend `fp32_precision` settings (cuBLAS and cuDNN on
    CUDA; oneDNN on the CPU, whose "bf16" and "tf32" modes torch.set_float32_matmul_precision("medium"/"high")
    turns on); older versions only the two CUDA `allow_tf32` flags and the matmul precision, which oneDNN also
    follows. Only one of the two APIs is used: PyTorch refuses to read a flag that was set through both."""
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision"):
        return [(b.cuda.matmul, "fp32_precision", "ieee", "cuda"), (b.cudnn.conv, "fp32_precision", "ieee", "cuda"),
                (b.cudnn.rnn, "fp32_precision", "ieee", "cuda"), (b.mkldnn.matmul, "fp32_precision", "ieee", "cpu"),
                (b.mkldnn.conv, "fp32_precision", "ieee", "cpu")]
    return [(b.cuda.matmul, "allow_tf32", False, "cuda"), (b.cudnn, "allow_tf32", False, "cuda")]


@contextlib.contextmanager
def fp32_matmuls(cuda_tf32=False):
    """Inside: fp32 matmuls and convolutions in IEEE fp32 on every device, or with cuda_tf32 in TF32 on CUDA (and
    IEEE fp32 on the CPU); every switch is restored after, however the block ends."""
    switches = _fp32_switches()
    saved = [getattr(obj, name) for obj, name, *_ in switches]
    old_api = switches[0][1] == "allow_tf32"
    saved_matmul = torch.get_float32_matmul_precision() if old_api else None
    try:
        if old_api:                           # oneDNN follows the global matmul precision (which sets allow_tf32 too)
            torch.set_float32_matmul_precision("highest")
        for obj, name, ieee, device in switches:
            setattr(obj, name, (True if old_api else "tf32") if cuda_tf32 and device == "cuda" else ieee)
        yield
    finally:
        if old_api:
            torch.set_float32_matmul_precision(saved_matmul)
        for (obj, name, *_), value in zip(switches, saved):
            setattr(obj, name, value)


def ieee_fp32():
    """Inside: IEEE fp32 matmuls and convolutions on every device (no TF32, no oneDNN bf16)."""
    return fp32_matmuls(cuda_tf32=False)


def set_tf32(on):
    """--tf32: TF32 for CUDA matmuls and convolutions outside the target passes (a no-op on the CPU)."""
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision"):
        for obj in (b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn):
            obj.fp32_precision = "tf32" if on else "ieee"
    else:
        b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = bool(on)


def _fp32_mode(*levels):
    """PyTorch >= 2.9: the first fp32_precision along an operation, its backend and the global setting that is
    not "none" (which means "as the level above")."""
    for level in (*levels, torch.backends):
        mode = getattr(level, "fp32_precision", "none")
        if mode != "none":
            return mode
    return "ieee"


def reduced_fp32(device_type="cuda"):
    """True when fp32 matmuls or convolutions on this kind of device may now round to fewer mantissa bits than
    IEEE fp32: TF32 on CUDA (cuBLAS, cuDNN; PyTorch's default allows it in cuDNN), oneDNN's bf16 or TF32 modes
    on the CPU."""
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision"):
        ops = [(b.cuda.matmul,), (b.cudnn.conv, b.cudnn)] if device_type == "cuda" else \
            [(b.mkldnn.matmul, b.mkldnn), (b.mkldnn.conv, b.mkldnn)]
        return any(_fp32_mode(*levels) != "ieee" for levels in ops)
    if device_type == "cuda":
        return b.cuda.matmul.allow_tf32 or b.cudnn.allow_tf32
    return torch.get_float32_matmul_precision() != "highest"


def tf32_enabled():
    """True when CUDA matmuls or convolutions may round fp32 to TF32 now."""
    return reduced_fp32("cuda")


@contextlib.contextmanager
def mixed_precision(device, bf16=False, targets="fp32"):
    """The precision of a training step: bf16 autocast around its gradient passes with --bf16 (on CUDA or the
    CPU), and the policy its target passes follow (TARGET_PRECISIONS). Run.precision() is this for the run."""
    if targets not in TARGET_PRECISIONS:
        raise ValueError(f"targets must be one of {TARGET_PRECISIONS}, got {targets!r}")
    token = _TARGETS.set(targets)
    try:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bool(bf16)):
            yield
    finally:
        _TARGETS.reset(token)


def target_arithmetic(device_type, autocast_on, policy=None):
    """What a target pass on this kind of device runs in under `policy` (default: the one in force): "bf16" (the
    faster policy, inside its autocast), "tf32" (the middle policy, on CUDA) or "ieee" (everything else)."""
    policy = policy or _TARGETS.get()
    if policy == "bf16" and autocast_on:
        return "bf16"
    return "tf32" if policy == "tf32" and device_type == "cuda" else "ieee"


def _arithmetic(like):
    return target_arithmetic(like.device.type, torch.is_autocast_enabled(like.device.type))


@contextlib.contextmanager
def target_precision(like, label="target pass"):
    """Context for target passes (see above): autocast off and IEEE fp32 under the exact policy, TF32 on CUDA
    under the tf32 one; the surrounding bf16 autocast under the faster one. `like` is a tensor on the device in
    question. Widen what such a pass returns to fp32 before subtracting or dividing it. A profiler sees the
    block as `label` (tests/benchmark.py --profile)."""
    with torch.profiler.record_function(label):
        arithmetic = _arithmetic(like)
        if arithmetic == "bf16":
            yield
        else:
            with torch.autocast(like.device.type, enabled=False), fp32_matmuls(cuda_tf32=arithmetic == "tf32"):
                yield


def reuse_for_target(like):
    """True when a gradient pass on like's device computes its output at least as precisely as a target pass
    would: under the faster policy (whose target passes are bf16 too); otherwise without autocast, and with no
    reduced-precision fp32 (TF32 on CUDA, oneDNN's bf16 on the CPU) unless the tf32 policy allows TF32 to the
    target passes as well. Its detached output may then stand in for the target pass; otherwise the caller
    runs the target pass (one more forward)."""
    arithmetic = _arithmetic(like)
    if arithmetic == "bf16":
        return True
    if torch.is_autocast_enabled(like.device.type):
        return False
    return arithmetic == "tf32" or not reduced_fp32(like.device.type)


# ==============================================================================================
# Data. Every dataset exposes `shape` (per-sample), `num_classes`, `kind` ("toy" | "image" | "latent")
# and either `sample(n)` (toy, infinite) or `len` + `get(indices)` (finite, returns float x, int64 y).

DATASETS = ("cifar10", "imagenet-latents", "digits", "checkerboard", "moons", "8gaussians")


TOY_SETS = ("checkerboard", "moons", "8gaussians")


class ToyData:
    """2D toy sets drawn on the fly with the global torch RNG, scaled to roughly unit variance.
    Labels name the mode a point came from (8 board cells, 2 moons, 8 Gaussians)."""
    kind = "toy"

    def __init__(self, name):
        if name not in TOY_SETS:
            raise UserError(f"unknown toy set {name!r}; choose from {', '.join(TOY_SETS)}")
        self.name, self.shape = name, (2,)
        self.num_classes = {"checkerboard": 8, "moons": 2, "8gaussians": 8}[name]

    def sample(self, n, generator=None):
        g = dict(generator=generator)
        if self.name == "checkerboard":        # 4x4 board on [-2, 2]^2, the 8 cells with even row+col parity
            cell = torch.randint(0, 8, (n,), **g)
            row = cell // 2
            col = 2 * (cell % 2) + (row % 2)
            x = torch.stack([col, row], 1).float() - 2 + torch.rand(n, 2, **g)
        elif self.name == "moons":             # two interleaved half circles, noise 0.05, centred
            y = torch.randint(0, 2, (n,), **g)
            theta = math.pi * torch.rand(n, **g)
            upper = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
            lower = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], 1)
            x = torch.where(y[:, None] == 0, upper, lower) + 0.05 * torch.randn(n, 2, **g)
            x = (x - torch.tensor([0.5, 0.25])) * 1.4
            return x, y
        else:                                  # 8 Gaussians on a circle of radius sqrt(2), std 0.1
            cell = torch.randint(0, 8, (n,), **g)
            angle = cell.float() * (math.pi / 4)
            x = math.sqrt(2) * torch.stack([torch.cos(angle), torch.sin(angle)], 1) + 0.1 * torch.randn(n, 2, **g)
        return x, cell


class _CIFARUnpickler(pickle.Unpickler):
    """The CIFAR-10 batches are Python pickles, and a pickle can name any function to call while it loads.
    This unpickler resolves only the names the release's files use to rebuild their numpy arrays; any
    other global (os.system, builtins.eval, ...) is refused before it can run."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}                   # bytes in a protocol-2 pickle written by Python 3

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")


def read_cifar_batch(path):
    """One CIFAR-10 batch file -> (uint8 [n, 3072], int64 [n] labels in 0..9), read with _CIFARUnpickler and
    checked; anything else is one UserError naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"CIFAR-10 file missing: {path}")
    try:
        with open(path, "rb") as f:
            batch = _CIFARUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise UserError(f"{path} is not a CIFAR-10 batch ({type(e).__name__}: {str(e)[:80]})") from None
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise UserError(f"{path}: b'data' must be a uint8 array of shape [n, 3072], got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        labels = None
    if labels is None or labels.shape != (len(data),) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise UserError(f"{path}: b'labels' must be {len(data)} integers in 0..9")
    return data, labels


class CIFAR10:
    """CIFAR-10 training images as uint8 [50000, 3, 32, 32] in memory; get() returns x in [-1, 1]."""
    kind = "image"
    shape, num_classes = (3, 32, 32), 10

    def __init__(self, root, train=True):
        folder = os.path.join(root, "cifar-10-batches-py")
        if not os.path.isdir(folder):
            try:                                                   # downloads and extracts when online
                import torchvision
                torchvision.datasets.CIFAR10(root, train=train, download=True)
            except Exception as e:
                raise UserError(f"CIFAR-10 is not in {folder} and could not be downloaded ({type(e).__name__}); "
                                f"download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it "
                                f"into {root}") from None
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        images, labels = [], []
        for name in names:
            data, lab = read_cifar_batch(os.path.join(folder, name))
            images.append(data.reshape(-1, 3, 32, 32))                # (n, 3072) R, G, B planes -> (n, 3, 32, 32)
            labels.append(lab)
        self.images = torch.from_numpy(np.concatenate(images))     # (N, 3, 32, 32) uint8
        self.labels = torch.from_numpy(np.concatenate(labels))

    def __len__(self):
        return len(self.labels)

    def get(self, idx):
        return self.images[idx].float() / 127.5 - 1, self.labels[idx]


class Digits:
    """scikit-learn's handwritten digits (`sklearn.datasets.load_digits`: 1797 images of 8x8 pixels with 17
    grey levels 0..16, 10 classes), shipped inside the package: real images that need no download.
    Pixels are scaled to [-1, 1] (level / 8 - 1), one channel. A fixed, class-stratified held-out split
    (HELD_OUT_PER_CLASS images of every digit, drawn once with numpy's seeded PCG64) is never trained on:
    split="train" (1437 images) feeds the training loop and the quality classifier, split="held-out" (360)
    is what generated digits are compared with."""
    kind = "image"
    shape, num_classes = (1, 8, 8), 10
    HELD_OUT_PER_CLASS = 36

    def __init__(self, split="train"):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise UserError("--dataset digits needs scikit-learn: pip install scikit-learn") from None
        bunch = load_digits()
        labels = np.asarray(bunch.target, dtype=np.int64)
        rng = np.random.default_rng(0)
        held = np.concatenate([rng.permutation(np.flatnonzero(labels == k))[: self.HELD_OUT_PER_CLASS]
                               for k in range(self.num_classes)])
        keep = np.zeros(len(labels), dtype=bool)
        keep[held] = True
        if split == "train":
            keep = ~keep
        elif split != "held-out":
            raise ValueError(f"split must be 'train' or 'held-out', got {split!r}")
        levels = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)[keep])         # (N, 8, 8) in 0..16
        self.images = (levels / 8 - 1)[:, None]                                             # (N, 1, 8, 8)
        self.labels = torch.from_numpy(labels[keep])

    def __len__(self):
        return len(self.labels)

    def get(self, idx):
        return self.images[idx], self.labels[idx]


# ImageNet latents on disk (written by `python common.py encode-latents`):
#   DIR/meta.json      {"format": "latents-v1", "shape": [C, H, W], "count": N, "num_classes": 1000,
#                       "vae": "<diffusers name or path>", "scale_factor": 0.18215, "image_size": 256,
#                       "shards": [{"file": "shard-00000.pt", "count": n0}, ...]}
#   DIR/shard-XXXXX.pt torch.save({"latents": float16 [n, C, H, W], "labels": int64 [n]})
# Latents are stored already multiplied by scale_factor, so the model sees roughly unit variance.
LATENT_FORMAT = "latents-v1"


class ImageNetLatents:
    """Latent shards (format above). `vae` replaces the autoencoder recorded in meta.json for decoding
    (grids, FID); the shards were encoded with the recorded one, so only a compatible decoder makes sense."""
    kind = "latent"

    def __init__(self, root, vae=None):
        meta_path = os.path.join(root, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"no latent shards in {root} (meta.json missing); make them with "
                            f"`python common.py encode-latents --images IMAGENET_TRAIN --out {root}`")
        self.meta = self._read_meta(meta_path)
        if vae:
            self.meta["vae"] = vae
        self.shape, self.num_classes = tuple(self.meta["shape"]), int(self.meta["num_classes"])
        self.latents, self.labels = [], []
        for shard in self.meta["shards"]:
            path = os.path.join(root, shard["file"])
            lat, lab = self._read_shard(path)
            if tuple(lat.shape[1:]) != self.shape or lat.shape[0] != shard["count"] or lab.shape != (shard["count"],):
                raise UserError(f"{path}: latents {tuple(lat.shape)} / labels {tuple(lab.shape)} do not match "
                                f"meta.json (shape {list(self.shape)}, count {shard['count']})")
            if len(lab) and (int(lab.min()) < 0 or int(lab.max()) >= self.num_classes):
                raise UserError(f"{path}: labels must lie in 0..{self.num_classes - 1} (meta.json num_classes), got "
                                f"{int(lab.min())}..{int(lab.max())}")
            self.latents.append(lat)
            self.labels.append(lab)
        self.files = [os.path.join(root, s["file"]) for s in self.meta["shards"]]
        self.offsets = np.cumsum([0] + [len(l) for l in self.labels])

    @staticmethod
    def _read_meta(path):
        try:
            with open(path) as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != LATENT_FORMAT:
            raise UserError(f"{path} is not a {LATENT_FORMAT} latent index")
        missing = [k for k in ("shape", "num_classes", "shards", "vae", "scale_factor") if k not in meta]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}")
        shards = meta["shards"]
        if not (isinstance(shards, list) and all(isinstance(s, dict) and isinstance(s.get("file"), str)
                                                 and isinstance(s.get("count"), int) for s in shards)):
            raise UserError(f"{path}: shards must be a list of {{\"file\": name, \"count\": n}}")
        if not (isinstance(meta["shape"], list) and len(meta["shape"]) == 3 and all(isinstance(v, int) and v > 0
                                                                                  for v in meta["shape"])):
            raise UserError(f"{path}: shape must be [C, H, W], got {meta['shape']!r}")
        return meta

    @staticmethod
    def _read_shard(path):
        """A shard with weights_only=True (a data file never runs code): a dict with latents and labels."""
        if not os.path.isfile(path):
            raise UserError(f"latent shard missing: {path}")
        try:
            blob = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            raise UserError(f"{path} is not a latent shard ({reason})") from None
        lat, lab = (blob.get(k) if isinstance(blob, dict) else None for k in ("latents", "labels"))
        if not (torch.is_tensor(lat) and lat.is_floating_point() and lat.dim() == 4
                and torch.is_tensor(lab) and lab.dtype == torch.int64 and lab.dim() == 1):
            raise UserError(f"{path} is not a dict with latents (float [n, C, H, W]) and labels (int64 [n])")
        return lat, lab

    def __len__(self):
        return int(self.offsets[-1])

    def get(self, idx):
        """Latents and labels at the indices (float32, int64). Every batch is checked for NaN/inf, which a
        corrupt shard would otherwise feed into the weights."""
        idx = torch.as_tensor(idx)
        shard = np.searchsorted(self.offsets, idx.numpy(), side="right") - 1
        x = torch.empty(len(idx), *self.shape)
        y = torch.empty(len(idx), dtype=torch.int64)
        for k in np.unique(shard):                                 # gather shard by shard
            sel = torch.from_numpy(np.nonzero(shard == k)[0])
            local = idx[sel] - int(self.offsets[k])
            x[sel] = self.latents[k][local].float()
            y[sel] = self.labels[k][local]
            if not torch.isfinite(x[sel]).all():
                bad = int(local[~torch.isfinite(x[sel]).flatten(1).all(1)][0])
                raise UserError(f"{self.files[k]}: latent {bad} holds NaN or inf")
        return x, y

    def to_pixels(self, z):
        return vae_decode(z, self.meta)


def load_dataset(name, data_path=None, vae=None):
    """The data set `name` (DATASETS); vae overrides the decoder recorded with latent shards."""
    if name in TOY_SETS:
        return ToyData(name)
    if name == "cifar10":
        return CIFAR10(data_path or "./data")
    if name == "digits":
        return Digits("train")
    if name == "imagenet-latents":
        return ImageNetLatents(data_path or "./data/imagenet-latents", vae)
    raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def to_pixels(data, x):
    """Images in [-1, 1] for grids and FID: latents go through the VAE decoder, images pass through."""
    return data.to_pixels(x) if hasattr(data, "to_pixels") else x


class Loader:
    """Endless per-rank batches. Finite datasets: DistributedSampler (shuffled, set_epoch) split over
    ranks; the position (epoch, batch) is part of the checkpoint, so a resumed run reads the same
    batches. Random horizontal flips are drawn from the global RNG (also checkpointed) on the host."""

    def __init__(self, data, batch_per_rank, dist_info, seed=0, xflip=False):
        self.data, self.batch, self.dist, self.seed, self.xflip = data, batch_per_rank, dist_info, seed, xflip
        self.epoch, self.pos, self._batches = 0, 0, None
        if data.kind != "toy" and len(data) < batch_per_rank * dist_info.world_size:
            raise UserError(f"dataset has {len(data)} samples, fewer than one global batch "
                            f"({batch_per_rank * dist_info.world_size})")

    def _epoch_batches(self):
        from torch.utils.data import DistributedSampler
        sampler = DistributedSampler(range(len(self.data)), num_replicas=self.dist.world_size, rank=self.dist.rank,
                                     shuffle=True, seed=self.seed, drop_last=True)
        sampler.set_epoch(self.epoch)
        idx = torch.tensor(list(sampler))
        n = len(idx) // self.batch
        return idx[: n * self.batch].view(n, self.batch)             # (batches, per-rank batch)

    def next(self):
        if self.data.kind == "toy":
            x, y = self.data.sample(self.batch)
        else:
            if self._batches is None:
                self._batches = self._epoch_batches()
            if self.pos >= len(self._batches):
                self.epoch, self.pos = self.epoch + 1, 0
                self._batches = self._epoch_batches()
            x, y = self.data.get(self._batches[self.pos])
            self.pos += 1
            if self.xflip:
                flip = torch.rand(len(x)) < 0.5
                x = torch.where(bcast(flip, x), x.flip(-1), x)
        dev = self.dist.device
        return x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos, self._batches = state["epoch"], state["pos"], None


# ---------------------------------------------------------------------------------------------
# VAE (diffusers, optional and imported lazily)

_VAES = {}


def _load_vae(name, device):
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise UserError("latent data needs the VAE from the `diffusers` package: pip install diffusers") from None
    key = (name, str(device))
    if key not in _VAES:
        try:
            _VAES[key] = AutoencoderKL.from_pretrained(name).to(device).eval().requires_grad_(False)
        except Exception as e:
            raise UserError(f"could not load the VAE {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                            f"pass a local diffusers folder") from None
    return _VAES[key]


@torch.no_grad()
def vae_decode(z, meta):
    vae = _load_vae(meta["vae"], z.device)
    return vae.decode(z.float() / meta["scale_factor"]).sample.clamp(-1, 1)


def write_latent_shards(out, batches, shape, num_classes, vae, scale_factor, image_size, shard_size=16384):
    """Write (latents, labels) batches into shards + meta.json (the format above). Returns the count."""
    os.makedirs(out, exist_ok=True)
    shards, buf_x, buf_y, count = [], [], [], 0

    def flush():
        if not buf_x:
            return
        name = f"shard-{len(shards):05d}.pt"
        lat, lab = torch.cat(buf_x), torch.cat(buf_y)
        save_checkpoint(os.path.join(out, name), {"latents": lat, "labels": lab})
        shards.append({"file": name, "count": len(lab)})
        buf_x.clear()
        buf_y.clear()

    for lat, lab in batches:
        if tuple(lat.shape[1:]) != tuple(shape):
            raise UserError(f"encoder produced latents of shape {tuple(lat.shape[1:])}, expected {tuple(shape)}")
        buf_x.append(lat.to(torch.float16).cpu())
        buf_y.append(lab.to(torch.int64).cpu())
        count += len(lab)
        if sum(len(b) for b in buf_y) >= shard_size:
            flush()
    flush()
    meta = {"format": LATENT_FORMAT, "shape": list(shape), "count": count, "num_classes": num_classes,
            "vae": vae, "scale_factor": scale_factor, "image_size": image_size, "shards": shards}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return count


DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"      # the Direct Models paper's (Table 5); DiT's sample.py offers it too


def encode_latents(images, out, vae_name=DEFAULT_VAE, image_size=256, batch_size=64,
                   scale_factor=0.18215, shard_size=16384, mode="sample", device=None, encoder=None):
    """ImageFolder -> latent shards. Images are resized (shorter side) and centre-cropped to image_size.
    `encoder` (images in [-1, 1] -> latents, before scaling) replaces the VAE, for tests."""
    import torchvision.datasets as tvd
    import torchvision.transforms as T
    if not os.path.isdir(images):
        raise UserError(f"image folder not found: {images}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tf = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor()])
    try:
        folder = tvd.ImageFolder(images, transform=tf)
    except (FileNotFoundError, OSError) as e:                 # no class folders, or no images in one
        raise UserError(f"{images} is not an ImageFolder (one sub-folder of images per class): {e}") from None
    loader = torch.utils.data.DataLoader(folder, batch_size=batch_size, shuffle=False, num_workers=0)
    if encoder is None:
        vae = _load_vae(vae_name, device)

        def encoder(x):
            dist = vae.encode(x).latent_dist
            return dist.sample() if mode == "sample" else dist.mean
    with torch.no_grad():
        first = encoder(torch.zeros(1, 3, image_size, image_size, device=device))
        shape = tuple(first.shape[1:])
        batches = ((encoder(x.to(device) * 2 - 1) * scale_factor, y) for x, y in loader)
        return write_latent_shards(out, batches, shape, len(folder.classes), vae_name, scale_factor,
                                   image_size, shard_size)


# ==============================================================================================
# Files: every one written whole or not at all, checkpoints, sample files and grids, the log

def atomic_write(path, write, mode="wb"):
    """Write `path` whole or not at all: write(f) fills a temporary file beside it (.NAME.tmpPID), which is
    flushed, fsynced and renamed over `path`, so a crash at any point leaves the old file or the new one. A write
    that fails (a full disk, a folder gone) leaves no temporary file and raises OSError naming the cause:
    torch.save reports a full disk as a RuntimeError of its zip writer ("unexpected pos", "file write
    failed"), which becomes the same OSError."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except RuntimeError as e:
        if not re.search(r"inline_container|PytorchStreamWriter|file write failed|unexpected pos", str(e)):
            raise
        free = shutil.disk_usage(folder).free
        raise OSError(errno.ENOSPC, f"the write failed ({free / 2**20:.0f} MiB free in {folder})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, obj):
    """torch.save, atomically (atomic_write), creating the folder if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, method=None):
    """torch.load(weights_only=True) with one-line errors; `method` checks which script wrote it."""
    if not path or not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "cfg" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by these scripts")
    if method is not None and ckpt["cfg"].get("method") != method:
        raise UserError(f"{path} was written by {ckpt['cfg'].get('method')}.py, not {method}.py")
    return ckpt


def load_state(obj, ckpt, name, path):
    """obj.load_state_dict(ckpt[name]), or one line when the checkpoint `path` has no such state or it does not
    fit `obj` (another model size, data shape or option)."""
    if name not in ckpt:
        raise UserError(f"{path} has no {name!r} state (written with other options?)")
    try:
        obj.load_state_dict(ckpt[name])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path}: its {name!r} state does not fit this run ({str(e).splitlines()[0][:120]})") from None


def all_finite(module_or_state):
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def remove_temporaries(folder):
    """Delete the temporary files (of checkpoints, npz files, log.jsonl) that a killed process left in
    `folder`; those of a process still running are kept."""
    for name in os.listdir(folder):
        m = re.search(r"\.tmp(\d+)(\.npz)?$", name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)                          # that process is alive: not ours to clean
            if int(m.group(1)) != os.getpid():
                continue
        except (OSError, ValueError):
            pass
        try:
            os.remove(os.path.join(folder, name))
        except OSError:
            pass


def save_npz(path, images, labels=None):
    """Samples as the ADM evaluation suite and DiT's sample_ddp.py write them: uint8 NHWC under `arr_0`
    (class labels, if any, under `labels`). Written atomically (atomic_write)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "labels": labels}
    atomic_write(path, lambda f: np.savez(f, **arrays))


def save_pngs(images, folder):
    """uint8 [N, H, W, C] -> folder/000000.png, 000001.png, ... (the layout FID tools read)."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(os.path.join(folder, f"{i:06d}.png"))


def image_grid(images, nrow, pad_value=0.0):
    """Images -> one uint8 [H, W, 3] mosaic with nrow per row and a 2-pixel frame of grey level pad_value in
    [0, 1]. images: float [N, C, H, W] in [-1, 1], or uint8 [N, H, W, C] (the layout of samples/*.npz)."""
    import torchvision
    if images.dtype in (np.uint8, torch.uint8):
        x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    else:
        x = images.detach().float().cpu()
    if x.shape[1] not in (1, 3):        # latents without a decoder: show the first 3 channels, each standardised
        x = x[:, :3]
        x = (x - x.mean((0, 2, 3), keepdim=True)) / (2 * x.std((0, 2, 3), keepdim=True) + 1e-8)
    grid = torchvision.utils.make_grid(x.clamp(-1, 1), nrow=nrow, padding=2, value_range=(-1, 1), normalize=True,
                                       pad_value=pad_value)
    return (grid * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def save_grid(images, path, nrow=None):
    """Images in [-1, 1], [N, C, H, W] -> one PNG grid."""
    from PIL import Image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image_grid(images, nrow or math.ceil(math.sqrt(len(images))))).save(path)


def save_scatter(points, path, reference=None, size=384, lim=3.0):
    """2D points -> PNG without matplotlib: a density raster of `points` (blue) over `reference` (grey)
    on the square [-lim, lim]^2."""
    from PIL import Image

    def raster(p):
        p = torch.as_tensor(p).detach().float().cpu().reshape(-1, 2)
        ij = ((p + lim) / (2 * lim) * size).floor().long()
        keep = ((ij >= 0) & (ij < size)).all(1)
        ij = ij[keep]
        h = torch.zeros(size * size)
        h.index_add_(0, (size - 1 - ij[:, 1]) * size + ij[:, 0], torch.ones(len(ij)))
        h = h.view(size, size)
        return (h / (h.max() + 1e-8)).clamp(0, 1).sqrt().numpy()   # sqrt so sparse regions stay visible

    img = np.full((size, size, 3), 255.0)
    if reference is not None:
        img -= 90 * raster(reference)[..., None]
    d = raster(points)[..., None]
    img = img * (1 - d) + d * np.array([30.0, 70.0, 200.0])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(img.round().clip(0, 255).astype(np.uint8)).save(path)


class JSONLLogger:
    """OUT/log.jsonl, the run's one append-only record (log steps and snapshots): one JSON object per line,
    appended by rank 0. A process killed in the middle of an append leaves a torn last line, and a node that
    loses power can leave NUL bytes or garbage; `cut` copes with both when a run starts."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled

    def write(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def cut(self, step):
        """Keep the records up to `step` (where the run starts again), so that each step is logged once, and
        drop every line that is not a whole record; say in one line what was dropped. The file is rewritten
        whole (temporary file, then rename), so the next append starts on a fresh line."""
        if not (self.enabled and os.path.isfile(self.path)):
            return
        keep, later, unreadable = [], 0, 0
        with open(self.path, "rb") as f:                 # bytes: garbage need not be UTF-8
            for line in f:
                record = _json_record(line)
                if record is None:
                    unreadable += bool(line.strip())
                elif record["step"] <= step:
                    keep.append(line.rstrip(b"\r\n") + b"\n")
                else:
                    later += 1
        atomic_write(self.path, lambda f: f.writelines(keep))
        dropped = [f"{later} record(s) past step {step}"] * bool(later) + \
                  [f"{unreadable} unreadable line(s) (a write cut short by a kill or a crash)"] * bool(unreadable)
        if dropped:
            print0(f"{self.path}: kept the {len(keep)} record(s) up to step {step}; dropped {' and '.join(dropped)}")


def _json_record(line):
    """The record on one line of log.jsonl (a JSON object with an integer step), or None."""
    try:
        record = json.loads(line.decode("utf-8"))
    except ValueError:                                    # UnicodeDecodeError and JSONDecodeError alike
        return None
    return record if isinstance(record, dict) and type(record.get("step")) is int else None


def read_json(path):
    """The JSON object in `path`: {} when there is none, or when the file is not one (then said in a line, as
    the caller is about to write it anew)."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
        if isinstance(obj, dict):
            return obj
    except ValueError:
        pass
    print0(f"warning: {path} is not a JSON object (a write cut short?); it is written anew")
    return {}


def write_json(path, obj):
    """A JSON file written whole or not at all (atomic_write): a kill while writing leaves the old file."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=1, sort_keys=True), mode="w")


# ==============================================================================================
# The run: CLI, config, and the bookkeeping every training loop shares
#
# The contract of every method script (README "When things go wrong"):
#   - bad input (a flag, a path, a data file, a checkpoint) is one line on stderr and exit code 2, before
#     anything is written: a failed start leaves no run folder behind;
#   - a run that cannot go on (a streak of non-finite updates) stops with one line and exit code 1,
#     naming the last good checkpoint; no checkpoint is written over a good one while updates are skipped;
#   - SIGTERM, SIGUSR1 (what schedulers send before a kill) and SIGINT (Ctrl-C) finish the current step,
#     write OUT/ckpt.pt, print one line naming it and the step, and exit with 128 + the signal's number
#     (SIGINT 130, SIGUSR1 138, SIGTERM 143); a second signal acts at once. Under torchrun every rank stops
#     after the same step. `--resume` then continues exactly where the run stopped.

EXIT_USER_ERROR, EXIT_RUN_ERROR = 2, 1


STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


COMMON_DEFAULTS = dict(
    dataset=None, data_path=None, out=None, steps=2000, batch_size=256, batch_gpu=None, lr=1e-3, model="MLP",
    seed=0, resume=False, log_every=100, sample_every=None, ckpt_every=1000, snapshot_every=None, keep=None,
    nfe=[1, 2, 4], sample_only=False, ckpt=None, n=64, npz=None, png_dir=None, classes=None, fid=0,
    fid_weights=None, fid_ref=None, fid_batch=250, class_cond=False, xflip=False, ema_decay=None,
    ema_halflife_kimg=None, grad_clip=0.0, max_skips=20, bf16=False, target_precision="fp32", tf32=True,
    deterministic=False, compile=False, guard="light", device=None, threads=None, eval_samples=None, vae=None,
)


# What --sample-only may set: which samples, how many, where they go and how they are scored, not what the
# checkpoint holds. A method adds its own sampling settings (its RESUMABLE).
SAMPLING = {"sample_only", "ckpt", "out", "n", "npz", "png_dir", "classes", "nfe", "fid", "fid_weights", "fid_ref",
            "fid_batch", "eval_samples", "seed", "device", "threads", "bf16", "tf32", "deterministic", "data_path",
            "vae"}


# The checkpoints a run is trained from (sCD's and DE-CM's --teacher, sCM's --init): saved as absolute paths;
# --resume takes another path for one only where it is the same file, or where the saved one is gone (the
# user moved it; the teacher's shape is checked again when it loads).
INPUT_FILES = ("teacher", "init")


# What --resume may change: how long, how fast and how the run reports and samples, not what its checkpoint
# holds (model, method variant, data, teacher...). A method adds its own sampling-only settings.
RESUMABLE = {"out", "steps", "lr", "batch_gpu", "log_every", "sample_every", "ckpt_every", "snapshot_every", "keep",
             "nfe", "n", "eval_samples", "fid", "fid_weights", "fid_ref", "fid_batch", "max_skips", "device",
             "bf16", "target_precision", "tf32", "deterministic", "compile", "guard", "threads", "data_path", "vae",
             "resume", "grad_clip"}


class Interrupted(Exception):
    """A stop signal arrived; the checkpoint is written. Reported in one line, exit code 128 + signal."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.code = 128 + signum


_CATCHING = weakref.WeakSet()          # runs whose loop holds the stop signals (released however it ends)


def say(line):
    """An error line on stderr: from rank 0 once the ranks share a process group (they stop together, and say the
    same); before it exists, from every rank, since a rank may fail alone there (the other ranks name
    themselves)."""
    rank = os.environ.get("RANK", "0")
    if rank == "0" or not tdist.is_initialized():
        print(("" if rank == "0" else f"rank {rank}: ") + line, file=sys.stderr, flush=True)


def cli(main, argv=None):
    """Run main(argv), turning UserError / RunError / Interrupted into one line on stderr and the exit code
    of the contract above (a Ctrl-C before training started is an Interrupted without a checkpoint). A
    failure of torch.compile's compiler while the first step compiles (check_compiler catches the missing
    compiler before any work) is a RunError too."""
    try:
        try:
            return main(argv)
        except Exception as e:
            if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise RunError(f"torch.compile failed ({cause}); run without --compile") from None
    except (UserError, RunError, Interrupted, KeyboardInterrupt) as e:
        for run in list(_CATCHING):                       # a loop left by an exception gives the signals back
            run._release_signals()
        if isinstance(e, KeyboardInterrupt):
            e = Interrupted(signal.SIGINT, "interrupted before training started; nothing was written")
        say(f"{'stopped' if isinstance(e, Interrupted) else 'error'}: {e}")
        sys.exit(e.code if isinstance(e, Interrupted) else EXIT_USER_ERROR if isinstance(e, UserError)
                 else EXIT_RUN_ERROR)
    finally:
        for lock in list(_LOCKS):                         # a run ended by an exception lets go of its folder
            lock.release()


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (and exit code 2) like every other input error."""

    def error(self, message):
        say(f"error: {message} (see {self.prog} --help)")
        sys.exit(EXIT_USER_ERROR)


def base_parser(method, description):
    """The flags every method script shares. Defaults are None so a flag given on the
    command line can be told from one left to the preset (see resolve_config); `parse` shows each flag's
    value for the chosen preset in --help."""
    p = OneLineErrorParser(prog=f"{method}.py", description=description, add_help=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("-h", "--help", action="store_true", default=None, help="this help; with --dataset (and the method's mode "
      "flag) it shows the values of that preset")
    a("--dataset", choices=DATASETS, help="data set; picks the paper's preset for that setting")
    a("--imagenet-latents", action="store_true", default=None, help="shorthand for --dataset imagenet-latents")
    a("--data-path", help="data folder (cifar10, digits: ./data; latents: ./data/imagenet-latents)")
    a("--out", help=f"run directory (runs/{method}-<dataset>)")
    a("--steps", type=int, help="training iterations")
    a("--batch-size", type=int, help="global batch size (split over ranks; fixed for a run)")
    a("--batch-gpu", type=int, help="largest per-process micro-batch: gradient accumulation over the per-process "
                                    "share of --batch-size (unset, or at least the share: no accumulation)")
    a("--lr", type=float, help="learning rate")
    a("--model", help="backbone: MLP (toy data) or one of DiT-T/2, DiT-S/2, DiT-B/2, DiT-L/2, DiT-XL/2")
    a("--seed", type=int, help="base seed; rank r uses seed * world_size + r")
    a("--resume", action="store_true", default=None, help="continue from OUT/ckpt.pt (bit-identical trajectory; "
                                                          "may change only --steps, --lr and the reporting flags)")
    a("--log-every", type=int, help="steps between log.jsonl records")
    a("--sample-every", type=int, help="steps between sample grids (unset: only at the end)")
    a("--ckpt-every", type=int, help="steps between checkpoints (OUT/ckpt.pt)")
    a("--snapshot-every", type=int, help="thousands of images between snapshots OUT/ckpt-{kimg:06d}.pt (unset: none)")
    a("--keep", type=int, help="keep only the newest N snapshots (unset: all)")
    a("--nfe", type=int, nargs="+", help="numbers of function evaluations to sample/evaluate with")
    a("--sample-only", action="store_true", default=None, help="write samples (and --fid) from --ckpt, no training")
    a("--ckpt", help="checkpoint for --sample-only (OUT/ckpt.pt or any snapshot)")
    a("--n", type=int, help="samples per grid; with --npz / --png-dir, samples exported per sampler and NFE")
    a("--npz", help="--sample-only: export the samples to this .npz (uint8 NHWC under arr_0, the ADM "
                    "evaluation-suite format; toy sets: float32 points); one file per sampler and NFE")
    a("--png-dir", help="--sample-only: also write one PNG per sample into this folder")
    a("--class", dest="classes", type=int, nargs="+", metavar="K",
      help="class-conditional models: sample these classes (in turn)")
    a("--fid", type=int, help="FID with this many samples per NFE (50000 for published numbers)")
    a("--fid-weights", help="path of pt_inception-2015-12-05-6726825d.pth (else torch hub cache/download)")
    a("--fid-ref", help="reference statistics .npz (mu, sigma); default: cached CIFAR-10 train statistics")
    a("--fid-batch", type=int, help="per-rank batch for drawing samples (FID, --npz, evaluation)")
    a("--class-cond", action=argparse.BooleanOptionalAction, help="class-conditional model (labels, CFG)")
    a("--xflip", action=argparse.BooleanOptionalAction, help="random horizontal flips of training images")
    a("--ema-decay", type=float, help="EMA decay per step (overrides the half-life)")
    a("--ema-halflife-kimg", type=float, help="EMA half-life in thousands of images (EDM convention)")
    a("--grad-clip", type=float, help="clip the gradient norm to this value (0: off)")
    a("--max-skips", type=int, help="stop after this many consecutive non-finite steps")
    a("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast for the gradient passes (CUDA or CPU)")
    a("--target-precision", choices=TARGET_PRECISIONS, help="the passes that build targets (JVPs, teacher "
      "velocities, finite differences): fp32 = IEEE fp32 (the exact policy), tf32 = fp32 with TF32 tensor cores on "
      "CUDA (the exact policy on a CPU), bf16 = under --bf16's autocast (the faster policy of public "
      "implementations); common.py, Precision")
    a("--tf32", action=argparse.BooleanOptionalAction, help="TF32 matmuls and convolutions on CUDA outside the target "
                                                            "passes (--no-tf32: IEEE fp32 everywhere)")
    a("--deterministic", action=argparse.BooleanOptionalAction, help="deterministic kernels: bit-identical runs and "
      "resumes on a GPU too (slower; CPU runs are deterministic anyway)")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the networks' gradient passes (the JVPs "
      "and target passes stay eager); the first step includes the compilation")
    a("--guard", choices=UpdateGuard.KINDS, help="an optimizer step that overflows the weights: light = stop the run "
      "(no copy kept), snapshot = undo it from a copy made before every step (3x the parameters' memory)")
    a("--device", choices=["cpu", "cuda"], help="force a device (default: CUDA when available)")
    a("--threads", type=int, help="CPU threads (default: 1 for toy sets, where the small MLP gains nothing "
                                  "from more; else PyTorch's choice)")
    a("--vae", help="latent data: diffusers AutoencoderKL name or folder that decodes samples (default: the one "
                    "recorded in the shards' meta.json)")
    a("--eval-samples", type=int, help="samples per sampler and NFE written at the end to samples/nfe{k}.npy "
                                       "(toy points) or .npz (images) and scored (toy 4096, images 1000)")
    return p


def parse(parser, argv, resolve):
    """parser.parse_args(argv), then resolve(args) -> cfg. With -h/--help: the help, each flag's entry
    ending in its value for the preset that the other flags choose (or "set by the preset" without
    --dataset), then exit 0."""
    args = parser.parse_args(argv)
    if not args.help:
        cfg = resolve(args)
        check_numbers(parser, cfg)
        return cfg
    args.help = None
    try:
        cfg = resolve(args)
    except UserError:
        cfg = None
    for action in parser._actions:
        if action.dest in ("help",) or action.help in (None, argparse.SUPPRESS):
            continue
        if cfg is None:
            note = "set by the preset of --dataset"
        else:
            value = cfg.get(action.dest)
            note = f"{'preset ' + cfg['dataset'] + ': ' if cfg.get('dataset') else ''}{value}"
        action.help = f"{action.help} [{note}]".replace("%", "%%")
    parser.print_help()
    sys.exit(0)


def resolve_config(args, method, defaults, presets, sampling=()):
    """defaults <- presets[setting] <- explicitly given flags. Toy sets use presets["toy"] unless they
    have their own entry. --sample-only and --resume start from the checkpoint's saved config instead,
    then apply the flags given: --sample-only takes the sampling flags (SAMPLING, and the method's own
    `sampling` settings) and others only with the checkpoint's value; Run checks that a resumed run changes
    only what RESUMABLE allows. Returns a plain dict (saved as config.json)."""
    given = {k: v for k, v in vars(args).items() if v is not None and k != "help"}
    for key in INPUT_FILES:                          # saved absolute: --resume from another folder finds them
        if isinstance(given.get(key), str) and given[key] != "none":
            given[key] = os.path.abspath(given[key])
    if given.pop("imagenet_latents", False):
        given["dataset"] = "imagenet-latents"
    if given.get("sample_only"):                    # sampling: the checkpoint's config, then the flags given
        if not given.get("ckpt"):
            raise UserError("--sample-only needs --ckpt PATH")
        trained = load_checkpoint(given["ckpt"], method)["cfg"]
        fixed = sorted(k for k in given if k not in SAMPLING | set(sampling) and given[k] != trained.get(k))
        if fixed:
            flags = ", ".join(f"--{k.replace('_', '-')} {given[k]} (it has {trained.get(k)})" for k in fixed[:4])
            raise UserError(f"--sample-only uses the settings {given['ckpt']} was trained with; drop {flags}")
        cfg = {**COMMON_DEFAULTS, **defaults, **trained, **given, "resume": False}
        cfg["out"] = given.get("out") or os.path.dirname(os.path.abspath(given["ckpt"]))
        check_common(cfg)
        return cfg
    dataset = given.get("dataset")
    if dataset is None:
        raise UserError("choose a data set with --dataset (" + ", ".join(DATASETS) + ")")
    setting = dataset if dataset in presets else ("toy" if dataset in TOY_SETS else dataset)
    cfg = {**COMMON_DEFAULTS, **defaults, **presets.get(setting, {}), **given}
    cfg.update(method=method, dataset=dataset)
    cfg["out"] = cfg["out"] or os.path.join("runs", f"{method}-{dataset}")
    if given.get("resume"):                         # the run's own config, then the flags given
        out, path = cfg["out"], os.path.join(cfg["out"], "ckpt.pt")
        if os.path.isfile(path):
            trained = relocated(load_checkpoint(path, method)["cfg"], out)
            cfg = {**COMMON_DEFAULTS, **defaults, **trained, **given, "out": out, "resume_of": trained}
    if "ema_decay" in given:                        # the EMA flag given wins over the preset's other one
        cfg["ema_halflife_kimg"] = None
    elif "ema_halflife_kimg" in given:
        cfg["ema_decay"] = None
    if cfg["eval_samples"] is None:
        cfg["eval_samples"] = 4096 if dataset in TOY_SETS else 1000
    if cfg["threads"] is None and dataset in TOY_SETS:
        cfg["threads"] = 1
    check_common(cfg)
    return cfg


def relocated(trained, out):
    """A run folder moved or copied elsewhere resumes from its new path `out`: where a run lives is not one of
    its settings, so the files its config names inside the old folder (decm.py's two-stage OUT/teacher/ckpt.pt)
    are read from the new one, where they moved with it. Paths outside the folder (an sCD teacher) are the
    user's files and stay as they are."""
    old = trained.get("out") or out

    def move(path):
        if not isinstance(path, str) or os.path.isabs(path) != os.path.isabs(old):
            return path
        rel = os.path.relpath(path, old)
        inside = rel not in (os.curdir, os.pardir) and not rel.startswith(os.pardir + os.sep)
        return os.path.join(out, rel) if inside and os.path.exists(os.path.join(out, rel)) else path
    return {k: v if k == "out" else move(v) for k, v in trained.items()}


# The range of every flag that more than one script has, checked once (check_common) wherever the flag exists:
# (config keys, test, what the flag must be). A method's own flags are checked in its file.
RANGES = [
    (("batch_size", "log_every", "ckpt_every", "sample_every", "snapshot_every", "keep", "n", "max_skips",
      "fid_batch", "batch_gpu", "threads"), lambda v: v >= 1, "be >= 1"),
    (("steps", "fid", "eval_samples", "seed"), lambda v: v >= 0, "be >= 0"),
    (("seed",), lambda v: v < 2 ** 32, "lie in 0 .. 2^32 - 1"),       # the seeds of every rank and batch fit int64
    (("threads",), lambda v: v <= (os.cpu_count() or 1), f"lie in 1 .. {os.cpu_count()} (the CPUs here)"),
    (("lr", "ema_halflife_kimg"), lambda v: math.isfinite(v) and v > 0, "be a finite number > 0"),
    (("grad_clip", "weight_decay"), lambda v: v != v or v >= 0, "be >= 0"),       # nan: check_numbers says it
    (("ema_decay", "dropout", "class_dropout"), lambda v: 0 <= v < 1, "lie in [0, 1)"),
    (("betas",), lambda v: all(0 <= b < 1 for b in v), "lie in [0, 1)"),
    (("sigma_d", "time_scale"), lambda v: v > 0, "be positive"),
]


def check_common(cfg):
    """The shared flags, checked before any work for training and --sample-only alike (the checkpoint's own
    settings pass; what depends on the data is in check_late_needs): one UserError naming the first bad one.
    Every float flag is also finite (`check_numbers`)."""
    for keys, ok, what in RANGES:
        for key in keys:
            if cfg.get(key) is not None and not ok(cfg[key]):
                raise UserError(f"--{key.replace('_', '-')} must {what}, got {cfg[key]}")
    if any(k < 1 for k in cfg["nfe"]):
        raise UserError(f"--nfe values must be >= 1, got {cfg['nfe']}")
    if cfg["target_precision"] == "bf16" and not cfg["bf16"]:
        raise UserError("--target-precision bf16 runs the target passes under --bf16's autocast: add --bf16")
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but PyTorch sees no CUDA device here (use --device cpu)")
    if cfg["classes"] is not None and not cfg["class_cond"]:
        raise UserError("--class picks classes of a class-conditional model; this model is unconditional")
    if (cfg["npz"] or cfg["png_dir"]) and not cfg["sample_only"]:
        raise UserError("--npz / --png-dir export samples with --sample-only --ckpt CKPT")
    if cfg["ckpt"] and not cfg["sample_only"]:
        raise UserError("--ckpt is read by --sample-only; a training run continues from OUT/ckpt.pt with --resume")
    if cfg["keep"] and not cfg["snapshot_every"]:
        raise UserError("--keep N keeps the newest snapshots: give --snapshot-every KIMG too")
    if cfg["npz"] and not cfg["npz"].endswith(".npz"):
        raise UserError(f"--npz takes a file name ending in .npz, got {cfg['npz']!r}")
    toy, latent = cfg["dataset"] in TOY_SETS, cfg["dataset"] == "imagenet-latents"
    for flag, ignored in (("--data-path", toy and cfg["data_path"]), ("--xflip", toy and cfg["xflip"]),
                          ("--fid", toy and cfg["fid"]), ("--vae", not latent and cfg["vae"])):
        if ignored:                                             # a flag that would do nothing is a mistake
            raise UserError(f"{flag} does nothing for --dataset {cfg['dataset']}"
                            + ("; toy sets are scored by the sliced Wasserstein distance" if flag == "--fid" else ""))
    check_output("--out", cfg["out"])
    if cfg["png_dir"]:
        check_output("--png-dir", cfg["png_dir"])
        if toy:
            raise UserError(f"--png-dir writes images; the samples of --dataset {cfg['dataset']} are 2D points: --npz "
                            f"writes them (float32 [n, 2] under arr_0)")
    if cfg["npz"]:
        check_output("--npz", cfg["npz"], folder=False)
    if cfg["data_path"]:
        check_output("--data-path", cfg["data_path"], writable=False)


def check_output(flag, path, folder=True, writable=True):
    """A path the run will write (a folder, or with folder=False a file), checked before any work for what can
    be known then: not a file where a folder must go or the reverse, not under a file, no name too long for
    its file system, and a place where files can be made: tried by making and dropping a nameless temporary
    file in the nearest existing folder, since /proc or a read-only mount refuse only the attempt and
    permission bits say nothing to root. Creates nothing. writable=False checks only the shape (--data-path
    may be a read-only data set)."""
    full = os.path.abspath(path)
    if folder and os.path.lexists(full) and not os.path.isdir(full):
        raise UserError(f"{flag} {path} is a file, not a folder")
    if not folder and os.path.isdir(full):
        raise UserError(f"{flag} {path} is a folder; it takes a file name")
    base = full if folder else os.path.dirname(full)
    while not os.path.isdir(base):
        if os.path.lexists(base):
            raise UserError(f"{flag} {path} lies under {base}, which is a file, not a folder")
        base = os.path.dirname(base)
    if not writable:
        return
    longest = max(os.path.relpath(full, base).split(os.sep), key=lambda name: len(os.fsencode(name)))
    if len(os.fsencode(longest)) > os.pathconf(base, "PC_NAME_MAX"):
        raise UserError(f"{flag} {path}: the name {longest[:16]}... is too long for the file system")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written: nothing can be created in {base} ({e.strerror})") from None


def check_numbers(parser, values):
    """Every float flag of `parser` takes a finite number: nan or inf as a learning rate, a time or a weight
    would only surface as a non-finite run later. A flag with a meaning at infinity declares type=float_or_inf
    (and still refuses nan). Run after the specific checks, whose messages say more."""
    for action in parser._actions:
        if action.type in (float, float_or_inf):
            value = values.get(action.dest)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v is not None and (math.isnan(v) or (math.isinf(v) and action.type is float)):
                    raise UserError(f"{action.option_strings[0]} must be a finite number, got {v}")


def float_or_inf(text):
    """argparse type of a float flag that may be infinite (see check_numbers)."""
    return float(text)


def check_late_needs(cfg, data, dist_info):
    """What a run needs only at its end (or at its first grid), checked at its start, so that no long run
    dies there: the classes of --class (those of the data the model was built for); the VAE that decodes
    latent samples (diffusers importable, the model loadable from its name or --vae PATH); with --fid, the
    Inception weights and the reference statistics (computed and cached now if they can be); for digits,
    the classifier of the digits figure (trained and cached now)."""
    bad = [k for k in cfg.get("classes") or () if not 0 <= k < data.num_classes]
    if bad:
        raise UserError(f"--class {bad[0]}: the classes of {cfg['dataset']} are 0 .. {data.num_classes - 1}")
    if data.kind == "latent":
        _load_vae(data.meta["vae"], "cpu")
    if cfg.get("fid") and data.kind != "toy":
        load_fid_inception(cfg.get("fid_weights"), "cpu")
        fid_reference(cfg["dataset"], cfg.get("data_path"), cfg.get("fid_ref"), cfg.get("fid_weights"),
                      dist_info=dist_info)
    if cfg["dataset"] == "digits" and cfg.get("eval_samples"):
        digits_classifier(cfg.get("data_path"), verbose=False)


class UpdateGuard:
    """What Run.update does when an optimizer step overflows the weights. A non-finite loss or gradient is caught
    before the step, which is then skipped, with nothing copied; a step that turns finite gradients into
    non-finite weights (an absurd learning rate) is the rare case this decides:
      light (--guard light, the default): nothing is copied before a step. Such a step cannot be undone, so the
          run stops at once (exit 1), naming the last good checkpoint; no checkpoint is written in between
          (Run.checkpoint refuses non-finite weights), so a bad step never reaches one.
      snapshot (--guard snapshot): the parameters and the optimizer state are copied before every step into
          buffers reused from step to step (three times the parameters' memory with Adam, 8 GB for DiT-XL/2,
          and a copy of them every step), and such a step is undone and counted as skipped, like a non-finite
          gradient."""
    KINDS = ("light", "snapshot")

    def __init__(self, kind="light"):
        self.kind, self.copies, self.n_state = kind, None, 0

    @staticmethod
    def _state(opt, params):
        return [v for p in params for v in opt.state.get(p, {}).values() if torch.is_tensor(v)]

    def before_step(self, opt, params):
        if self.kind != "snapshot":
            return
        state = self._state(opt, params)
        tensors = [p.detach() for p in params] + state
        if self.copies is None or [c.shape for c in self.copies] != [t.shape for t in tensors]:
            self.copies = [torch.empty_like(t) for t in tensors]
        self.n_state = len(state)
        torch._foreach_copy_(self.copies, tensors)

    def undo(self, opt, params):
        """Put back the parameters and optimizer state of before the step; False when nothing was kept (light)."""
        if self.kind != "snapshot":
            return False
        state = self._state(opt, params)
        if len(state) != self.n_state:                    # the first step created the state: drop it
            for p in params:
                opt.state.pop(p, None)
            state = []
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in params] + state, self.copies[:len(params) + len(state)])
        return True


RUN_FILES = {"ckpt.pt": "checkpoint", "log.jsonl": "log", "config.json": "settings", "eval.json": "figures"}


def check_run_files(out):
    """Before any work (training or --sample-only): nothing in OUT stands where the run will write one of its
    own files (a folder named log.jsonl, a file named samples), which would end a finished run in a
    traceback."""
    for name, what in RUN_FILES.items():
        path = os.path.join(out, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise UserError(f"{path} is not a file; a run keeps its {what} there")
    samples = os.path.join(out, "samples")
    if os.path.lexists(samples) and not os.path.isdir(samples):
        raise UserError(f"{samples} is not a folder; a run keeps its sample files there")


def check_run_folder(cfg, ckpt_path, resumable):
    """OUT's checkpoint is continued only with --resume, and a resumed run may change only what RESUMABLE (and
    the method's `resumable`) allows. Returns {setting: (old, new)} of what --resume changes."""
    exists = os.path.isfile(ckpt_path)
    if exists and not cfg.get("resume"):
        raise UserError(f"{cfg['out']} already holds a run ({ckpt_path}); continue it with --resume, or "
                        f"choose another --out")
    if cfg.get("resume") and not exists:
        raise UserError(f"--resume: there is no checkpoint {ckpt_path} to continue")
    trained = cfg.pop("resume_of", None)
    if trained is None:
        return {}
    allowed = RESUMABLE | set(resumable)

    def moved(k):                                    # an input checkpoint moved, or named another way
        old, new = trained.get(k), cfg.get(k)
        return k in INPUT_FILES and isinstance(old, str) and isinstance(new, str) and os.path.isfile(new) and (
            not os.path.exists(old) or os.path.samefile(old, new))
    changed = sorted(k for k in set(cfg) | set(trained) if k not in allowed and cfg.get(k) != trained.get(k)
                     and not moved(k))
    if changed:
        parts = ", ".join(f"--{k.replace('_', '-')} {trained.get(k)} -> {cfg.get(k)}" for k in changed[:4])
        raise UserError(f"--resume continues the run in {cfg['out']}, which was started with other settings "
                        f"({parts}); drop those flags, or start a new run with another --out")
    return {k: (trained.get(k), cfg.get(k)) for k in sorted(allowed - {"resume"}) if trained.get(k) != cfg.get(k)}


class RunLock:
    """One live process writes a run folder at a time. The writer holds an exclusive flock on OUT/.lock, which
    the kernel drops when the process ends, however it ends (kill -9, a lost node): a job scheduled twice is
    refused while the first lives and takes over once it has died, and a stale file never blocks anything.
    The file holds the holder's pid and host, for the one line that refuses a second writer; it stays in OUT,
    emptied, after a release. Under torchrun rank 0 alone holds the lock and tells the other ranks what it
    found, so `check` and `acquire` are collectives. A file system without flock gets a warning, no lock; NFS
    clients emulate flock with whole-file fcntl locks (https://man7.org/linux/man-pages/man2/flock.2.html)."""

    def __init__(self, folder, dist_info, hint=""):
        self.folder, self.path, self.dist, self.hint = folder, os.path.join(folder, ".lock"), dist_info, hint
        self.file, self.held = None, False

    def check(self):
        """Refuse (on every rank) if a live process holds the lock. Creates nothing."""
        self._refuse_if(self._holder() if self.dist.is_main else None)

    def acquire(self):
        """Take the lock, creating the folder, or refuse as `check` does; nothing to do if held already."""
        if not self.held:
            self._refuse_if(self._take() if self.dist.is_main else None)
            self.held = True
            _LOCKS.add(self)

    def release(self):
        if self.file is not None:
            self.file.truncate(0)
            self.file.close()                                       # closing the file drops the lock
            self.file = None
        self.held = False
        _LOCKS.discard(self)

    def _holder(self):
        """Why this process may not write the folder (a live holder, named), or None. Probes with a shared lock,
        dropped at once."""
        try:
            with open(self.path, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(self.path, "rb") as f:
                holder = f.read().decode(errors="replace").strip() or "a process that is starting"
            return (f"{self.folder} is in use by {holder}, which holds {self.path} (one process writes a run folder "
                    f"at a time); wait for it to end, or stop it and continue with --resume" + self.hint)
        except OSError:                                             # no lock file yet, or no locks here
            pass
        return None

    def _take(self):
        """Rank 0: take the lock and write who holds it; None, or why the lock cannot be had (then the folder
        and the lock file are removed again if this made them: a refused start leaves nothing)."""
        made = [d for d in _parents(self.folder) if not os.path.isdir(d)]
        existed = os.path.exists(self.path)
        try:
            os.makedirs(self.folder, exist_ok=True)
            f = open(self.path, "a+b")                              # not truncated before it is ours
        except OSError as e:
            _remove_made(made)
            return f"cannot create the lock {self.path} ({e.strerror or e})"
        for _ in range(20):                                         # another start may probe it this moment
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
            except OSError as e:
                print0(f"warning: {self.path} cannot be locked on this file system ({e.strerror}); nothing "
                       f"stops a second process from writing {self.folder}")
                f.close()
                return None
        else:
            f.close()
            return self._holder() or f"{self.folder} is in use by another process; wait for it to end"
        try:
            f.truncate(0)
            f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
            f.flush()
        except OSError as e:                                        # a full disk: no room for one line
            f.close()
            if not existed:
                os.remove(self.path)
            _remove_made(made)
            return f"cannot write the lock {self.path} ({e.strerror or e}): make room on the disk and start again"
        self.file = f
        return None

    def _refuse_if(self, refusal):
        if self.dist.ddp:
            box = [refusal]
            tdist.broadcast_object_list(box, src=0)
            refusal = box[0]
        if refusal:
            raise UserError(refusal)


_LOCKS = set()                          # run folders this process holds (released however its run ends)


def _parents(folder):
    """`folder` and the folders above it, deepest first."""
    folder = os.path.abspath(folder)
    while folder != os.path.dirname(folder):
        yield folder
        folder = os.path.dirname(folder)


def _remove_made(folders):
    """Remove the folders of a failed start that it made itself (deepest first), if they are empty."""
    for d in folders:
        try:
            os.rmdir(d)
        except OSError:
            pass


class Run:
    """Bookkeeping around a method's training loop: devices and seeds, the run folder, the guarded optimizer
    update (gradient accumulation, non-finite skipping and rollback), logging, checkpoints with every RNG
    stream, snapshots, stop signals, samples and evaluation.

        data = common.load_dataset(...)                  # every check that can fail comes first
        run = Run(cfg)                                   # checks the run folder; creates nothing
        ...                                              # models, EMA, optimizer, loader
        start = run.start(state, describe, samplers, data)   # --resume or a fresh folder; OUT is created here
        for step in run.steps(start):
            batch = ...                                  # this rank's batch and its random draws
            losses = run.update(opt, params, loss_fn, batch, emas)
            run.end_step(step, losses)                   # logs, grids, checkpoints, snapshots, stop signals
        run.finish()                                     # grids and eval.json of the final EMA weights
    """

    def __init__(self, cfg, resumable=(), data=None):
        self.cfg = cfg
        if cfg.get("deterministic"):
            deterministic_algorithms()
        self.dist = setup_distributed(cfg.get("device"))
        self.device = self.dist.device
        if cfg.get("compile"):
            check_compiler(self.device.type)
        if self.device.type == "cuda":
            set_tf32(cfg.get("tf32", True))
        else:
            tune_cpu_allocator()
        self._threads_before = torch.get_num_threads()
        if cfg.get("threads"):
            torch.set_num_threads(cfg["threads"])
        world, training = self.dist.world_size, not cfg.get("sample_only")     # sampling: --fid-batch batches
        if training and cfg["batch_size"] % world:
            raise UserError(f"global batch {cfg['batch_size']} is not divisible by the world size {world}")
        self.batch_per_rank = max(cfg["batch_size"] // world, 1)
        self.batch_gpu = min(cfg.get("batch_gpu") or self.batch_per_rank, self.batch_per_rank)   # at most the share
        if training and self.batch_per_rank % self.batch_gpu:
            raise UserError(f"--batch-gpu {self.batch_gpu} does not divide the per-process batch {self.batch_per_rank} "
                            f"(--batch-size {cfg['batch_size']} over {world} processes)")
        self.out, self.resumed_changes = cfg["out"], {}
        self.is_main = self.dist.is_main
        self.ckpt_path = os.path.join(self.out, "ckpt.pt")
        self.lock = RunLock(self.out, self.dist, "; --sample-only can write elsewhere with --out DIR"
                            if cfg.get("sample_only") else "")
        self.lock.check()
        check_run_files(self.out)
        if training:
            self.resumed_changes = check_run_folder(cfg, self.ckpt_path, resumable)
        if data is not None:
            check_late_needs(cfg, data, self.dist)
        seed_everything(cfg["seed"], self.dist)
        self.skips = 0                    # consecutive non-finite updates
        self.skipped_total = 0
        self.last_good = None             # (path, step) of the newest checkpoint known good
        self.guard = UpdateGuard(cfg.get("guard") or "light")
        self._wrapped, self._signal, self._old_handlers = [], 0, {}
        self._acc, self._acc_n, self._t_last, self._lr, self._last_step = {}, 0, time.time(), None, 0
        self._timed_n, self._first_step_sec = 0, None
        self._bar = self._state = self._samplers = self._data = None
        self.logger = JSONLLogger(os.path.join(self.out, "log.jsonl"), self.is_main)
        self.samples = RunSamples(cfg, self.dist, self.out)

    # -- start ---------------------------------------------------------------------------------
    def start(self, state, describe="", samplers=None, data=None):
        """Before the first step: with --resume, restore OUT/ckpt.pt into `state` (what checkpoints hold); then
        create OUT (removing temporary files that killed processes left), cut log.jsonl back to the restored
        step, write config.json, print what runs where, and catch the stop signals. `samplers` ({name:
        (sample_fn, nfes)}) and `data` are what end_step's grids and finish's evaluation draw. Returns the
        first step."""
        self._state, self._samplers, self._data = state, samplers, data
        self.lock.acquire()
        start = self.restore(state) if self.cfg.get("resume") else 0
        if self.is_main:
            os.makedirs(os.path.join(self.out, "samples"), exist_ok=True)
            for folder in (self.out, os.path.join(self.out, "samples")):
                remove_temporaries(folder)
            self.logger.cut(start)
            write_json(os.path.join(self.out, "config.json"), self.cfg)
        self._announce(state, describe, start)
        return start

    def _announce(self, state, describe, start):
        models = [m for m in state.values() if isinstance(m, nn.Module)]
        size = sum(p.numel() for m in models for p in m.parameters())
        device = (f"{self.dist.world_size} x {torch.cuda.get_device_name(self.device)}" if self.device.type == "cuda"
                  else f"CPU, {self.dist.world_size} process(es) x {torch.get_num_threads()} thread(s)")
        if self.dist.ddp:
            device += f" ({tdist.get_backend()})"
        accumulation = (f", micro-batch {self.batch_gpu} ({self.batch_per_rank // self.batch_gpu} per update)"
                        if self.batch_gpu < self.batch_per_rank else "")
        dataset = self.cfg["dataset"]
        preset = f"toy ({dataset})" if dataset in TOY_SETS else dataset
        print0(f"{self.cfg['method']}.py {describe}, preset {preset}: {self.cfg['model']} ({size / 1e6:.2f}M "
               f"parameters), batch {self.cfg['batch_size']}{accumulation}, {self.cfg['steps']} steps, {device}; "
               f"writing to {self.out}" + (f"; resumed at step {start}" if start else ""))
        print0("config: " + json.dumps(self.cfg, sort_keys=True))
        for k, (old, new) in self.resumed_changes.items():
            print0(f"--resume: {k} {old} -> {new}")

    def precision(self):
        """The run's precision around a method's loss (and DE-CM's target passes before it): --bf16 and
        --target-precision, see "Precision" above."""
        return mixed_precision(self.device, self.cfg.get("bf16"), self.cfg.get("target_precision") or "fp32")

    def wrap(self, model):
        """A model that receives gradients, as its gradient passes call it: DDP-wrapped under torchrun, and with
        --compile compiled by torch.compile (over DDP, as PyTorch's DDP notes advise). The JVPs and the target
        passes call the plain module (`unwrap`), eagerly: the DiT's attention needs its own forward-mode rule
        (the fused kernel has none), which Dynamo cannot trace, so a compiled torch.func.jvp breaks its graph at
        every attention layer and runs eagerly anyway, as does a compiled module called inside torch.func.jvp
        (PyTorch 2.14, measured). Compiled dropout draws its masks as eager PyTorch does (Inductor's
        fallback_random), so the eager target passes share them."""
        model = model.to(self.device)
        if self.dist.ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
            self._wrapped.append(model)
        if self.cfg.get("compile"):
            import torch._inductor.config
            torch._inductor.config.fallback_random = True
            model = torch.compile(model)
        return model

    # -- the update ----------------------------------------------------------------------------
    def update(self, opt, params, loss_fn, batch, emas=()):
        """One optimizer update from this rank's `batch` (a dict of per-sample tensors: the data and every
        random draw of the step, so that splitting it changes nothing but memory).

        Gradient accumulation: the batch is cut into micro-batches of --batch-gpu samples; loss_fn(micro) ->
        dict of scalar tensors ("loss" is the mean over the micro-batch) runs under the run's precision, and its
        loss, scaled by the micro-batch's share, is back-propagated; DDP synchronises the gradients only on the
        last micro-batch (no_sync before). Then the guard: if any micro-batch's loss or the all-reduced gradient
        is non-finite, the update is skipped; an optimizer step that leaves parameters non-finite is undone or
        stops the run (UpdateGuard); the EMAs [(ema, module)] are updated only after a good update. --max-skips
        skips in a row stop the run. Returns the losses averaged over micro-batches, with grad_norm."""
        params = [p for p in params if p.requires_grad]
        n = len(next(v for v in batch.values() if torch.is_tensor(v)))
        cuts = list(range(0, n, self.batch_gpu))
        totals, finite = {}, torch.ones((), device=self.device)
        for i, lo in enumerate(cuts):
            micro = {k: v[lo:lo + self.batch_gpu] if torch.is_tensor(v) and v.dim() else v for k, v in batch.items()}
            share = len(micro[next(k for k, v in batch.items() if torch.is_tensor(v))]) / n
            sync = contextlib.nullcontext() if i == len(cuts) - 1 else self.no_sync()
            with sync:
                with self.precision(), torch.profiler.record_function("loss"):
                    losses = loss_fn(micro)
                with torch.profiler.record_function("backward"):
                    (losses["loss"] * share).backward()
            for k, v in losses.items():
                v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
                totals[k] = totals.get(k, 0) + share * v.to(self.device)
            finite = finite * torch.isfinite(losses["loss"].detach()).float()
        clip = self.cfg.get("grad_clip") or 0.0
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        ok = self._all_agree(finite * torch.isfinite(gnorm).float())
        self._lr = opt.param_groups[0]["lr"]
        if ok:
            self.guard.before_step(opt, params)
            with torch.profiler.record_function("optimizer step"):
                opt.step()
            peaks = torch.stack(torch._foreach_norm([p.detach() for p in params], float("inf")))  # max |p| each
            ok = self._all_agree(torch.isfinite(peaks).all().float())
            if not ok and not self.guard.undo(opt, params):   # the step itself overflowed and cannot be undone
                self._stop(f"the update of step {self._last_step + 1} turned finite gradients into non-finite "
                           f"weights, and --guard light keeps no copy to undo it", "Lower --lr, or use --guard "
                           f"snapshot to skip such updates")
        if ok:
            for ema, module in emas:
                ema.update(module, self.cfg["batch_size"])
            self.skips = 0
        else:
            self.skips += 1
            self.skipped_total += 1
        opt.zero_grad(set_to_none=True)
        if self.skips >= self.cfg["max_skips"]:
            self._stop_on_skips()
        totals["grad_norm"] = gnorm.detach()
        return totals

    def no_sync(self):
        """DDP's no_sync on every wrapped model: gradients accumulate locally until the last micro-batch."""
        stack = contextlib.ExitStack()
        for model in self._wrapped:
            stack.enter_context(model.no_sync())
        return stack

    def _all_agree(self, flag):
        """True when flag (0/1) is 1 on every rank: every rank takes the same decision."""
        return bool(all_reduce_sum(flag.float()) == self.dist.world_size)

    def _stop_on_skips(self):
        self._acc["skipped_in_a_row"] = torch.tensor(float(self.skips), device=self.device) * self._acc_n
        self._stop(f"{self.skips} consecutive non-finite updates", "Lower --lr or check the data")

    def _stop(self, what, advice):
        """Stop the run on a bad update (exit 1), naming the last good checkpoint; the log shows the steps so far."""
        self._write_record(self._last_step)
        where = (f"the last good checkpoint is {self.last_good[0]} (step {self.last_good[1]})" if self.last_good
                 else "no checkpoint was written")
        raise RunError(f"{what}; stopping ({where}). {advice}")

    # -- logging -------------------------------------------------------------------------------
    def kimg(self, steps_done):
        """Thousands of training images after `steps_done` updates (--batch-size is fixed for a run)."""
        return round(steps_done * self.cfg["batch_size"] / 1000, 3)

    def steps(self, start):
        """The steps start .. steps-1; on rank 0 in a terminal, with a progress bar showing the main losses
        and kimg/s. While it runs, SIGTERM, SIGUSR1 and SIGINT only set a flag that end_step acts on."""
        it = range(start, self.cfg["steps"])
        if self.is_main and sys.stderr.isatty():
            from tqdm import tqdm
            it = self._bar = tqdm(it, initial=start, total=self.cfg["steps"], dynamic_ncols=True, unit="step")
        self._t_last = time.time()
        self._catch_signals()
        try:
            yield from it
        finally:
            self._release_signals()

    def log(self, step, scalars):
        """Accumulate scalar tensors (no host sync); every log_every steps average them over steps and
        ranks and write one log.jsonl record (and refresh the progress bar)."""
        for k, v in scalars.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            self._acc[k] = self._acc.get(k, 0) + v.to(self.device)
        self._acc_n += 1
        self._last_step = done = step + 1
        if self._first_step_sec is None:   # the process's first step: compilation, autotuning, allocator warm-up
            now = time.time()
            self._first_step_sec, self._t_last = now - self._t_last, now
        else:
            self._timed_n += 1
        if done % self.cfg["log_every"] and done != self.cfg["steps"]:
            return None
        return self._write_record(done)

    def _write_record(self, done):
        """One log.jsonl record of the steps accumulated since the last one (all ranks take part)."""
        if not self._acc_n:
            return None
        keys = sorted(self._acc)
        vec = all_reduce_mean(torch.stack([self._acc[k] for k in keys]) / self._acc_n)
        now = time.time()
        sec = (now - self._t_last) / self._timed_n if self._timed_n else self._first_step_sec
        rec = {"step": done, "kimg": self.kimg(done)}
        rec.update({k: float(v) for k, v in zip(keys, vec.tolist())})
        if self._lr is not None:
            rec["lr"] = self._lr
        rec.update(sec_per_step=round(sec, 5), skipped=self.skipped_total)
        if self._timed_n + 1 == self._acc_n:          # the first record: the first step apart (compilation etc.)
            rec["first_step_sec"] = round(self._first_step_sec, 3)
        self._acc, self._acc_n, self._t_last, self._timed_n = {}, 0, now, 0
        self.logger.write(rec)
        if self._bar is not None:
            main = {k: f"{rec[k]:.4g}" for k in ("loss", "grad_norm") if k in rec}
            self._bar.set_postfix(kimg=f"{rec['kimg']:.1f}", **main,
                                  **{"kimg/s": f"{self.cfg['batch_size'] / 1000 / max(sec, 1e-9):.2f}"})
        elif self.is_main:
            print0(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
        return rec

    def note(self, text, **record):
        """A line for the person watching (above the progress bar) and, with `record`, for log.jsonl."""
        if self._bar is not None:
            self._bar.write(text)
        else:
            print0(text)
        if record:
            self.logger.write(record)

    # -- checkpoints, snapshots, stop signals --------------------------------------------------
    def _gather_rng(self):
        state = rng_state(self.device)
        if not self.dist.ddp:
            return [state]
        states = [None] * self.dist.world_size
        tdist.all_gather_object(states, state)
        return states

    def checkpoint(self, step, objects, path=None):
        """Save {name: obj.state_dict()} plus step, config, every rank's RNG and the skip counter,
        atomically, from rank 0 (a collective: every rank calls it). Nothing is written while updates are
        being skipped, nor when a weight is not finite: the last good checkpoint stays. Returns the path
        written, or None."""
        path = path or self.ckpt_path
        rng = self._gather_rng()
        written = None
        if self.is_main:
            state = {name: obj.state_dict() for name, obj in objects.items()}
            tensors = [s for s in state.values() if isinstance(s, dict) and all(torch.is_tensor(v) for v in s.values())]
            failure = None
            if self.skips:
                self.note(f"warning: step {step} follows {self.skips} non-finite updates; {path} not written")
            elif not all(all_finite(w) for w in tensors):
                self.note(f"warning: non-finite weights at step {step}; {path} not written")
            else:
                state.update(step=step, cfg=self.cfg, rng=rng, skipped=self.skipped_total)
                try:
                    save_checkpoint(path, state)
                    written = path
                except OSError as e:                                  # disk full, folder gone: the old file stays
                    failure = f"could not write {path} at step {step} ({e.strerror or e})"
        shared = [written, failure if self.is_main else None]
        if self.dist.ddp:
            tdist.broadcast_object_list(shared, src=0)                # every rank knows what exists now
        written, failure = shared
        if failure:
            kept = f"{self.last_good[0]} (step {self.last_good[1]}) is kept" if self.last_good else "none was kept"
            raise RunError(f"{failure}; the previous checkpoint {kept}")
        if written and path == self.ckpt_path:
            self.last_good = (path, step)
        return written

    def restore(self, objects):
        """Load OUT/ckpt.pt into `objects` and the RNG streams (--resume); returns the start step."""
        ckpt = load_checkpoint(self.ckpt_path, self.cfg["method"])
        for name, obj in objects.items():
            load_state(obj, ckpt, name, self.ckpt_path)
            if isinstance(obj, torch.optim.Optimizer):            # a changed --lr applies from here on
                for group in obj.param_groups:
                    group["lr"] = self.cfg["lr"]
        rng = ckpt["rng"]
        if len(rng) == self.dist.world_size:
            set_rng_state(rng[self.dist.rank], self.device)
        else:
            print0(f"warning: checkpoint has RNG streams for {len(rng)} ranks, running on {self.dist.world_size}; "
                   f"the continuation will not be bit-identical")
            seed_everything(self.cfg["seed"] + ckpt["step"], self.dist)
        self.skipped_total = ckpt.get("skipped", 0)
        self.last_good = (self.ckpt_path, ckpt["step"])
        return ckpt["step"]

    def _catch_signals(self):
        """SIGTERM / SIGUSR1 / SIGINT only set a flag; the loop stops at the end of the step (end_step)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        _CATCHING.add(self)

    def _on_signal(self, signum, frame):
        self._signal = signum
        signal.signal(signum, self._old_handlers.get(signum, signal.SIG_DFL))    # a second one acts at once

    def _release_signals(self):
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}
        _CATCHING.discard(self)

    def _stop_requested(self):
        """The signal any rank caught (0: none), the same on every rank: they all stop after the same step."""
        if not self.dist.ddp:
            return self._signal
        flag = torch.tensor(float(self._signal), device=self.device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return int(flag)

    def end_step(self, step, losses):
        """The loop's bookkeeping after update `step` (0-based): its losses logged (log); grids every
        sample_every updates; a snapshot each time the images seen pass a multiple of snapshot_every thousand; a
        checkpoint every ckpt_every updates, after the last one, and when a stop signal arrived, after which the
        run stops."""
        self.log(step, losses)
        state, sample, data = self._state, self._samplers, self._data
        done = step + 1
        cfg = self.cfg
        stop = self._stop_requested()
        if cfg["sample_every"] and done % cfg["sample_every"] == 0:
            self.samples.save(f"step{done}", sample, data)
        every = cfg["snapshot_every"]
        if every and int(self.kimg(done) // every) > int(self.kimg(step) // every):
            self.snapshot(done, state)
        if done % cfg["ckpt_every"] == 0 or done == cfg["steps"] or stop:
            self.checkpoint(done, state)
        if stop:
            self._write_record(done)                                    # the steps since the last record
            self._release_signals()
            if self._bar is not None:
                self._bar.close()
            name = signal.Signals(stop).name
            where = f"checkpoint {self.last_good[0]} holds step {self.last_good[1]}" if self.last_good else \
                "no good checkpoint could be written"
            raise Interrupted(stop, f"{name} after step {done}: {where}; continue with --resume")

    def snapshot(self, step, state):
        """OUT/ckpt-{kimg:06d}.pt, a checkpoint kept beside ckpt.pt (--sample-only reads either); only the
        newest --keep are kept."""
        kimg = self.kimg(step)
        name = f"ckpt-{int(kimg):06d}.pt"
        written = self.checkpoint(step, state, os.path.join(self.out, name))
        if written and self.is_main:
            removed = []
            if self.cfg["keep"]:
                old = sorted(f for f in os.listdir(self.out) if re.fullmatch(r"ckpt-\d{6}\.pt", f))
                for f in old[:-self.cfg["keep"]]:
                    os.remove(os.path.join(self.out, f))
                    removed.append(f)
            self.note(f"snapshot {written} (step {step}, {kimg:g} kimg)"
                      + (f"; removed {', '.join(removed)}" if removed else ""),
                      step=step, kimg=kimg, snapshot=name, removed=removed)

    def finish(self, tag=None, sample=None, data=None, close=True):
        """End of a run (or of --sample-only): grids tagged `tag` (default step<steps>), eval.json, from the
        samplers and data given to start unless given here; then the signals, the thread count and (with
        close) the process group are released."""
        tag = tag or f"step{self.cfg['steps']}"
        sample, data = (self._samplers, self._data) if sample is None else (sample, data)
        self._release_signals()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.lock.acquire()                                         # --sample-only writes OUT from here on
        self.samples.save(tag, sample, data)
        self.samples.evaluate(sample, data)
        self.lock.release()
        torch.set_num_threads(self._threads_before)
        if close:
            self.close()

    def close(self):
        if tdist.is_initialized():
            tdist.barrier()
            tdist.destroy_process_group()


class RunSamples:
    """A run's samples: grids, --npz / --png-dir exports and the end-of-run evaluation (eval.json), drawn in seeded
    batches shared out over the ranks, so that a seed gives the same samples on one process or many."""

    def __init__(self, cfg, dist_info, out):
        self.cfg, self.dist, self.device, self.out, self.is_main = cfg, dist_info, dist_info.device, out, dist_info.is_main

    def generator(self, salt=0):
        """A private CPU generator for sampling, so sampling never moves the training RNG streams."""
        return torch.Generator().manual_seed(self.cfg["seed"] * 1000003 + salt * 1009 + self.dist.rank)

    def sample_labels(self, data, n, generator, start=0):
        """Labels of samples start .. start + n - 1: None for an unconditional model; the classes of --class
        in turn; else drawn uniformly from `generator`."""
        if not self.cfg.get("class_cond"):
            return None
        if self.cfg.get("classes"):
            classes = self.cfg["classes"]
            return torch.tensor([classes[(start + j) % len(classes)] for j in range(n)], device=self.device)
        return torch.randint(0, data.num_classes, (n,), generator=generator).to(self.device)

    def _batches(self, n, salt, batch):
        """This rank's share of n samples as (start, size, generator): batch i covers samples i*batch ..
        and draws from a generator seeded by (seed, salt, i) alone, and batches are dealt to the ranks in
        turn, so the samples of a seed are the same on one process or many."""
        for i, start in enumerate(range(0, n, batch)):
            if i % self.dist.world_size == self.dist.rank:
                seed = (self.cfg["seed"] * 1_000_003 + salt * 10_007 + i) % (1 << 63)
                yield start, min(batch, n - start), torch.Generator().manual_seed(seed)

    def draw(self, sample_fn, data, n, nfe, salt, batch=None, desc=None):
        """n samples of sample_fn at `nfe`, drawn in batches shared out over the ranks (a collective: every
        rank calls it). Returns, on rank 0, every sample in index order with its label (None if
        unconditional): images as uint8 [n, H, W, C] (what a PNG holds), toy points as float32 [n, d];
        None on the other ranks."""
        batch = batch or (n if data.kind == "toy" else self.cfg["fid_batch"])
        mine = list(self._batches(n, salt, batch))
        if desc and self.is_main:
            from tqdm import tqdm
            mine = tqdm(mine, desc=desc, unit="batch", dynamic_ncols=True, mininterval=5)
        parts = []
        for start, size, g in mine:
            labels = self.sample_labels(data, size, g, start)
            x = sample_fn(size, nfe, labels, g)
            x = x.float().cpu().numpy() if data.kind == "toy" else to_uint8(to_pixels(data, x))
            parts.append((start, x, None if labels is None else labels.cpu().numpy()))
        if self.dist.ddp:
            gathered = [None] * self.dist.world_size if self.is_main else None
            tdist.gather_object(parts, gathered, dst=0)
            parts = [p for rank_parts in gathered for p in rank_parts] if self.is_main else []
        if not self.is_main:
            return None
        parts.sort(key=lambda p: p[0])
        labels = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
        return np.concatenate([p[1] for p in parts]), labels

    def export(self, samplers, data):
        """--sample-only with --npz OUT.npz and/or --png-dir DIR: cfg.n samples per sampler and NFE, drawn in
        seeded batches shared out over the ranks (the same samples for a seed on any number of processes).
        Images: uint8 NHWC under arr_0 (labels, if any, under `labels`), one PNG per sample in DIR; toy sets:
        float32 points under arr_0. With one sampler and one NFE the file is OUT.npz itself; otherwise
        OUT-<sampler>-nfe<k>.npz (and DIR/<sampler>-nfe<k>/) for each."""
        cfg, jobs = self.cfg, []
        one = sum(len(nfes) for _, nfes in samplers.values()) == 1
        for name, (sample_fn, nfes) in samplers.items():           # every file's path is checked before work
            for k in nfes:
                tag = f"{name or 'default'}-nfe{k}"
                npz = cfg["npz"] and (cfg["npz"] if one else f"{cfg['npz'][:-4]}-{tag}.npz")
                png = cfg["png_dir"] and (cfg["png_dir"] if one else os.path.join(cfg["png_dir"], tag))
                if npz:
                    check_output("--npz", npz, folder=False)
                if png:
                    check_output("--png-dir", png)
                jobs.append((name, sample_fn, k, npz, png))
        for name, sample_fn, k, npz, png in jobs:
            drawn = self.draw(sample_fn, data, cfg["n"], k, salt=20_000 + k,
                              desc=f"sampling {cfg['n']} ({name or 'default'} sampler, {k} NFE)")
            if drawn is None:
                continue
            x, labels = drawn
            if npz:
                save_npz(npz, x, labels)
                print0(f"wrote {npz}: arr_0 {x.dtype} {list(x.shape)}, sampler {name or 'default'}, {k} NFE")
            if png:
                save_pngs(x, png)
                print0(f"wrote {len(x)} PNG files to {png}")

    def save(self, tag, samplers, data):
        """Grids (scatter plots for toy data) per sampler and NFE: samples/{tag}[_{name}]_nfe{k}.png.

        samplers: {name: (sample_fn, nfes)}, name "" for the method's own sampler;
        sample_fn(n, nfe, labels, generator) -> samples in data space."""
        if not self.is_main:
            return
        for name, (sample_fn, nfes) in samplers.items():
            for k in nfes:
                g = self.generator(k)
                n = self.cfg["eval_samples"] if data.kind == "toy" else self.cfg["n"]
                x = sample_fn(n, k, self.sample_labels(data, n, g), g)
                path = os.path.join(self.out, "samples", f"{tag}{'_' + name if name else ''}_nfe{k}.png")
                if data.kind == "toy":
                    save_scatter(x, path, reference=data.sample(n, generator=torch.Generator().manual_seed(1))[0])
                else:
                    save_grid(to_pixels(data, x), path)

    def evaluate(self, samplers, data):
        """End-of-run evaluation into eval.json (a collective: every rank calls it). samplers: {name:
        (sample_fn, nfes)} as in save. For every sampler and NFE, eval_samples samples are written
        to samples/[<name>_]nfe{k}.npy (toy points, float32 [n, d]) or .npz (images, uint8 NHWC under
        `arr_0`, the ADM evaluation-suite format) and scored: toy sets by the sliced Wasserstein distance
        to held-out data ({"swd": {"1": ...}}, held-out points in samples/data.npy), digits by the digits
        figure ({"fd": ..., "modes": ..., "class_share": ...}), other images with --fid by FID
        ({"fid": ...}). Keys of the other samplers than the method's own get the suffix _<name>."""
        result, n = {}, self.cfg["eval_samples"]
        toy, digits = data.kind == "toy", self.cfg["dataset"] == "digits"
        folder = os.path.join(self.out, "samples")
        if toy and self.is_main:
            held_out = data.sample(n, generator=torch.Generator().manual_seed(10_000 + self.cfg["seed"]))[0]
            np.save(os.path.join(folder, "data.npy"), held_out.numpy().astype(np.float32))
        quality = DigitsQuality(self.cfg.get("data_path"), verbose=False) if digits and self.is_main and n else None
        for name, (sample_fn, nfes) in samplers.items():
            suffix = "_" + name if name else ""
            for k in nfes:
                drawn = self.draw(sample_fn, data, n, k, salt=k) if n else None
                if drawn is not None:
                    x, labels = drawn
                    stem = os.path.join(folder, f"{name + '_' if name else ''}nfe{k}")
                    if toy:
                        np.save(stem + ".npy", x)
                        swd = sliced_wasserstein(torch.from_numpy(x), held_out)
                        result.setdefault("swd" + suffix, {})[str(k)] = swd
                    else:
                        save_npz(stem + ".npz", x, labels)
                    if quality is not None:
                        for key, value in quality.score(from_uint8(x)).items():
                            result.setdefault(key + suffix, {})[str(k)] = value
            if self.cfg.get("fid") and not toy:
                result["fid" + suffix] = {str(k): self.fid(sample_fn, data, k, name) for k in nfes}
        if self.is_main and result:
            path = os.path.join(self.out, "eval.json")
            write_json(path, {**read_json(path), **result})
            print0("eval:", json.dumps({k: v for k, v in result.items() if not k.startswith("class_share")}))
        return result

    def fid(self, sample_fn, data, nfe, name=""):
        """FID of cfg.fid samples (batches shared out over the ranks) against the reference statistics."""
        cfg = self.cfg
        ref = fid_reference(cfg["dataset"], cfg.get("data_path"), cfg.get("fid_ref"), cfg.get("fid_weights"),
                            dist_info=self.dist)
        inception = load_fid_inception(cfg.get("fid_weights"), self.device)

        def batches():
            for start, size, g in self._batches(cfg["fid"], 10_000 + nfe, cfg["fid_batch"]):
                yield to_pixels(data, sample_fn(size, nfe, self.sample_labels(data, size, g, start), g))
        mu, sigma = inception_stats(batches(), inception, self.device)
        value = frechet_distance(mu, sigma, *ref)
        print0(f"FID ({cfg['fid']} samples, sampler {name or 'default'}, {nfe} NFE): {value:.3f}")
        return value


def sample_only(cfg, networks, samplers):
    """--sample-only, for every method: the EMA weights of --ckpt in the networks networks(cfg, data) builds
    ({the key of their state in the checkpoint: module}), then the grids, the --npz / --png-dir exports and the
    evaluation of samplers(those networks, cfg, data, device), into --out."""
    data = load_dataset(cfg["dataset"], cfg["data_path"], cfg["vae"])
    run = Run(cfg, data=data)
    ckpt = load_checkpoint(cfg["ckpt"], cfg["method"])
    nets = networks(cfg, data)
    for key, net in nets.items():
        load_state(net, ckpt, key, cfg["ckpt"])
    sample = samplers({key: net.to(run.device).eval() for key, net in nets.items()}, cfg, data, run.device)
    run.samples.export(sample, data)
    run.finish("sample", sample, data)


def build_backbone(cfg, data, **kwargs):
    """dit.build_model for this data set (cfg["model"]: "MLP" for toy data, a DiT name for images)."""
    import dit
    try:
        return dit.build_model(cfg["model"], data.shape, **kwargs)
    except ValueError as e:
        raise UserError(str(e)) from None


def make_optimizer(kind, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """Adam / AdamW (fused kernels, CPU and CUDA) or RAdam (multi-tensor)."""
    params = list(params)
    if kind in ("adam", "adamw"):
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
    if kind == "radam":
        return torch.optim.RAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)
    raise UserError(f"unknown optimizer {kind!r}; choose adam, adamw or radam")


def make_ema(model, cfg):
    return EMA(model, decay=cfg.get("ema_decay"), halflife_kimg=cfg.get("ema_halflife_kimg"))


# ==============================================================================================
# Command line of common.py itself

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_batches(path, batch=250):
    """(count, iterator of float [b, 3, H, W] batches in [-1, 1]) of the images in `path`: an .npz with uint8
    NHWC under arr_0 (the ADM evaluation-suite format, what --npz writes) or a folder of image files (read
    recursively, in sorted order). One-channel images are repeated to three for Inception."""
    if os.path.isfile(path) and path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as f:
                arr = f["arr_0"]
        except Exception as e:
            raise UserError(f"{path} is not an .npz with arr_0 ({type(e).__name__}: {str(e)[:80]})") from None
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise UserError(f"{path}: arr_0 must be uint8 [N, H, W, 1 or 3] images, got {arr.dtype} {list(arr.shape)}")
        if len(arr) < 2:
            raise UserError(f"{path} holds {len(arr)} image(s); FID's covariance needs at least 2 (50k by convention)")

        def npz_batches():
            for i in range(0, len(arr), batch):
                x = from_uint8(arr[i:i + batch])
                yield x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return len(arr), npz_batches()
    if not os.path.isdir(path):
        raise UserError(f"{path} is neither an .npz file nor a folder of images")
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if len(files) < 2:
        raise UserError(f"{path} holds {len(files)} image file(s) ({', '.join(IMAGE_SUFFIXES)}); FID's covariance "
                        f"needs at least 2 (50k by convention)")

    def folder_batches():
        from PIL import Image
        for i in range(0, len(files), batch):
            try:
                arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[i:i + batch]])
            except (OSError, ValueError) as e:
                raise UserError(f"could not read the images {files[i]} .. ({type(e).__name__}: {str(e)[:80]}); "
                                f"they must be readable and of one size") from None
            yield from_uint8(arr)
    return len(files), folder_batches()


def stats_of(path, weights=None, batch=250, device=None):
    """FID statistics (mu, sigma) of the images in `path` (image_batches), with a progress bar."""
    from tqdm import tqdm
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    count, batches = image_batches(path, batch)
    inception = load_fid_inception(weights, device)
    bar = tqdm(batches, total=math.ceil(count / batch), desc=f"Inception features of {count} images", unit="batch")
    return inception_stats(bar, inception, device)


def read_stats(path):
    """Reference statistics (.npz with mu [d], sigma [d, d]); no pickles."""
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = f["mu"], f["sigma"]
    except Exception as e:
        raise UserError(f"{path} is not an .npz of FID statistics with mu and sigma ({type(e).__name__})") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UserError(f"{path}: mu must be [d] and sigma [d, d], got {list(mu.shape)} and {list(sigma.shape)}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{path}: the statistics hold NaN or infinite values; compute them again (fid-ref)")
    return mu, sigma


def _main(argv=None):
    p = OneLineErrorParser(prog="common.py", description="data preparation and FID for the method scripts")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=OneLineErrorParser)
    r = sub.add_parser("fid-ref", help="FID reference statistics of an image folder or .npz (or of CIFAR-10's "
                                       "training set, cached beside the data)")
    r.add_argument("images", nargs="?", help="folder of images or .npz (arr_0 uint8 NHWC); omit for --dataset")
    r.add_argument("--out", help="where to write the statistics (.npz with mu, sigma); needed with IMAGES")
    r.add_argument("--dataset", default="cifar10", choices=["cifar10"])
    r.add_argument("--data-path", default="./data")
    r.add_argument("--fid-weights")
    r.add_argument("--batch-size", type=int, default=250)
    f = sub.add_parser("fid", help="FID of an image folder or .npz (e.g. --sample-only --npz) against statistics")
    f.add_argument("images", help="folder of images or .npz (arr_0 uint8 NHWC)")
    f.add_argument("--ref", required=True, help="reference statistics .npz (mu, sigma; from fid-ref)")
    f.add_argument("--fid-weights")
    f.add_argument("--batch-size", type=int, default=250)
    e = sub.add_parser("encode-latents", help="encode an ImageFolder into VAE latent shards")
    e.add_argument("--images", required=True, help="ImageFolder root (one sub-folder per class)")
    e.add_argument("--out", default="./data/imagenet-latents")
    e.add_argument("--vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL name or folder (recorded in "
                   "meta.json; training and sampling decode with it unless their --vae says otherwise)")
    e.add_argument("--image-size", type=int, default=256)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--scale-factor", type=float, default=0.18215)
    e.add_argument("--shard-size", type=int, default=16384)
    e.add_argument("--mode", choices=["sample", "mean"], default="sample", help="posterior sample or mean")
    args = p.parse_args(argv)
    check_numbers(sub.choices[args.cmd], vars(args))                 # every output and value before any work
    for flag, value, low in (("--batch-size", getattr(args, "batch_size", 1), 1),
                             ("--shard-size", getattr(args, "shard_size", 1), 1),
                             ("--image-size", getattr(args, "image_size", 8), 8)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    if args.cmd == "fid-ref" and args.images:
        if not args.out or not args.out.endswith(".npz"):
            raise UserError("fid-ref IMAGES needs --out STATS.npz")
        check_output("--out", args.out, folder=False)
        mu, sigma = stats_of(args.images, args.fid_weights, args.batch_size)
        made = [d for d in _parents(os.path.dirname(os.path.abspath(args.out))) if not os.path.isdir(d)]
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            atomic_write(args.out, lambda f: np.savez(f, mu=mu, sigma=sigma))
        except OSError as e:
            _remove_made(made)
            raise UserError(f"could not write {args.out}: {e.strerror or e}") from None
        print(f"wrote {args.out} ({mu.shape[0]}-d statistics of {args.images})")
    elif args.cmd == "fid-ref":
        path = reference_stats_path(args.dataset, args.data_path)
        check_output("--data-path", args.data_path)
        check_output("--data-path", path, folder=False)
        if os.path.isfile(path):
            os.remove(path)                                          # recompute on request
        mu, _ = fid_reference(args.dataset, args.data_path, weights=args.fid_weights, batch_size=args.batch_size)
        print(f"wrote {path} ({mu.shape[0]}-d statistics)")
    elif args.cmd == "fid":
        ref = fid_reference(None, ref=args.ref)
        mu, sigma = stats_of(args.images, args.fid_weights, args.batch_size)
        print(f"FID of {args.images} against {args.ref}: {frechet_distance(mu, sigma, *ref):.4f}")
    else:
        if args.image_size % 8 or not args.scale_factor > 0:
            raise UserError(f"--image-size must be a multiple of 8 (the VAE downsamples by 8) and --scale-factor "
                            f"> 0, got {args.image_size} and {args.scale_factor}")
        check_output("--out", args.out)
        n = encode_latents(args.images, args.out, args.vae, args.image_size, args.batch_size, args.scale_factor,
                           args.shard_size, args.mode)
        print(f"wrote {n} latents to {args.out}")


if __name__ == "__main__":
    cli(_main)
