"""What the four method files share: interpolants and the closed-form Gaussian flow, time samplers,
JVP helpers, data (CIFAR-10, ImageNet latents, 2D toy sets), distributed setup, EMA, checkpoints,
logging, image grids, the sliced Wasserstein distance and FID.

A method's own idea never lives here: only pieces at least two methods use as they are.

Command line (besides being imported by the method scripts):
    python common.py fid-ref --dataset cifar10 [--data-path ./data]      # cache CIFAR-10 train stats
    python common.py encode-latents --images DIR --out DIR [--vae NAME]  # ImageFolder -> latent shards
"""
import argparse
import contextlib
import copy
import functools
import json
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F


# ==============================================================================================
# Errors: bad input is one line on stderr and exit code 2, never a traceback

class UserError(Exception):
    """Something the user gave us is wrong (a path, a flag, a checkpoint): reported in one line."""


class RunError(Exception):
    """The run itself cannot go on (e.g. too many non-finite steps): reported in one line, exit 1."""


def cli(main, argv=None):
    """Run main(argv), turning UserError/RunError into one line on stderr and an exit code."""
    try:
        return main(argv)
    except (UserError, RunError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, UserError) else 1)


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
    if int(os.environ.get("RANK", -1)) == -1:                   # plain `python`
        return Dist(device=torch.device(device or ("cuda" if use_cuda else "cpu")))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                 **({"device_id": dev} if use_cuda else {}))
    return Dist(rank, local_rank, world, dev)


def enable_tf32():
    """TF32 matmuls/convolutions on Ampere+ GPUs (a no-op on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


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
    must not see a dropout of their own (SPEC section 9). Plain functions (the tests' exact solutions) pass
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
    """The module inside DDP. Forward-mode JVPs run on it: they need no gradient sync (weights are
    stop-gradient there), while every pass that produces parameter gradients must go through DDP."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ==============================================================================================
# Interpolants x_t = alpha(t) x + sigma(t) z and their conditional velocity alpha'(t) x + sigma'(t) z

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
    """The exact probability-flow ODE when the data are N(mu, std^2 I) (SPEC section 7).

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
        var = a ** 2 * self.std ** 2 + b ** 2 * self.interp.noise_std ** 2
        rate = (a * da * self.std ** 2 + b * db * self.interp.noise_std ** 2) / var   # sd'_t / sd_t
        return a * self.mu, da * self.mu, var.sqrt(), rate

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


# ==============================================================================================
# Precision (SPEC section 9): which passes may run in bf16.
#
# --bf16 wraps each method's loss in bf16 autocast (`Run.autocast`; CUDA, and the CPU, where the tests run
# it). Inside it, the passes that produce parameter gradients run in bf16: a rounding error of about 4e-3
# there is noise on one gradient, as in any mixed-precision training. Every pass whose output enters a
# target without a gradient runs in fp32 (`full_precision`), and so do the JVPs (`jvp`): targets subtract
# near-equal numbers (F_theta - F_minus, f(x_t) - f(x_r)), divide by small steps (GCM's (s - r)/(t - r) up
# to 1000, sCM's discrete 1/sin(t - t')) or add a small increment to a large value (Direct's dt/t (v - w)),
# so a bf16 error there is amplified into the target itself. The method files state which of their
# passes are which; tests/test_precision.py checks, for every method, that at the closed-form Gaussian
# solution the target computed under --bf16 vanishes to fp32 accuracy.

def full_precision(like):
    """Context: the enclosed passes run in fp32 (or fp64) even inside --bf16 autocast. `like` is a tensor on
    the device in question; the inputs of those passes must not be bf16 themselves."""
    return torch.autocast(like.device.type, enabled=False)


def autocast_active(like):
    """True inside bf16 autocast on like's device: a pass whose output a target needs in fp32 was then
    not computed in fp32 and must be recomputed under full_precision."""
    return torch.is_autocast_enabled(like.device.type)


# ==============================================================================================
# JVP helpers. Both return (f(primals), J_f(primals) . tangents) with the same call shape, carry no
# autograd graph (the weights are stop-gradient in every JVP the methods take) and run in fp32.

def _fp32(x):
    """bf16/fp16 -> fp32 for the JVP; fp32 and fp64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def jvp(fn, primals, tangents):
    """Analytic forward-mode JVP with torch.func.jvp. Call it on the unwrapped module (`unwrap`), not
    on DDP: the JVP contributes no parameter gradient, and the gradient pass goes through DDP.
    Inputs that are not differentiated (labels) are closed over by `fn`."""
    with torch.no_grad(), torch.autocast(primals[0].device.type, enabled=False):
        return torch.func.jvp(fn, tuple(map(_fp32, primals)), tuple(map(_fp32, tangents)))


def jvp_finite_difference(fn, primals, tangents, eps=1e-3):
    """Central finite difference (f(p + eps v) - f(p - eps v)) / (2 eps); O(eps^2) error. All three
    evaluations see the same random draws (dropout), so the difference measures the function only."""
    with torch.no_grad(), torch.autocast(primals[0].device.type, enabled=False):
        same = SameRandomness(primals[0].device)
        primals, tangents = tuple(map(_fp32, primals)), tuple(map(_fp32, tangents))
        shifted = [tuple(p + sign * eps * t for p, t in zip(primals, tangents)) for sign in (1, -1)]
        with same:
            out = fn(*primals)
        with same:
            plus = fn(*shifted[0])
        with same:
            minus = fn(*shifted[1])
        return out, (plus - minus) / (2 * eps)


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
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise UserError(f"CIFAR-10 file missing: {path}")
            with open(path, "rb") as f:                            # the python-pickle format of the release
                batch = pickle.load(f, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch[b"labels"])
        self.images = torch.from_numpy(np.concatenate(images))     # (N, 3, 32, 32) uint8
        self.labels = torch.tensor(labels, dtype=torch.int64)

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
        with open(meta_path) as f:
            self.meta = json.load(f)
        if self.meta.get("format") != LATENT_FORMAT:
            raise UserError(f"{meta_path} is not a {LATENT_FORMAT} latent index")
        if vae:
            self.meta["vae"] = vae
        self.shape, self.num_classes = tuple(self.meta["shape"]), int(self.meta["num_classes"])
        self.latents, self.labels = [], []
        for shard in self.meta["shards"]:
            path = os.path.join(root, shard["file"])
            if not os.path.isfile(path):
                raise UserError(f"latent shard missing: {path}")
            blob = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            lat, lab = blob["latents"], blob["labels"]
            if tuple(lat.shape[1:]) != self.shape or lat.shape[0] != shard["count"] or lab.shape != (shard["count"],):
                raise UserError(f"{path}: latents {tuple(lat.shape)} / labels {tuple(lab.shape)} do not match "
                                f"meta.json (shape {list(self.shape)}, count {shard['count']})")
            self.latents.append(lat)
            self.labels.append(lab)
        self.offsets = np.cumsum([0] + [len(l) for l in self.labels])

    def __len__(self):
        return int(self.offsets[-1])

    def get(self, idx):
        idx = torch.as_tensor(idx)
        shard = np.searchsorted(self.offsets, idx.numpy(), side="right") - 1
        x = torch.empty(len(idx), *self.shape)
        y = torch.empty(len(idx), dtype=torch.int64)
        for k in np.unique(shard):                                 # gather shard by shard
            sel = torch.from_numpy(np.nonzero(shard == k)[0])
            local = idx[sel] - int(self.offsets[k])
            x[sel] = self.latents[k][local].float()
            y[sel] = self.labels[k][local]
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
    folder = tvd.ImageFolder(images, transform=tf)
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
# Toy-set metric

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
# FID (SPEC section 6): the Inception-v3 of pytorch-fid (https://github.com/mseitzer/pytorch-fid),
# which reproduces the TensorFlow FID graph: in the pool branches of the A, C and first E blocks the
# average pooling ignores padding, and the last E block max-pools. Its state dict uses torchvision's
# module names, so we build torchvision's Inception3 and swap those blocks for these subclasses.

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
    """x: images in [-1, 1], any size -> (N, 2048) pool features (float32)."""

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
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        n = self.net
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                      n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)              # (N, 2048)


def load_fid_inception(weights=None, device="cpu"):
    """The FID network with the standard weights: `weights` path, else the torch hub cache, else a
    download; offline without them -> UserError naming the URL and where to put the file."""
    net = FIDInception()
    fname = os.path.basename(FID_WEIGHTS_URL)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", fname)
    path = weights or (cached if os.path.isfile(cached) else None)
    if weights and not os.path.isfile(weights):
        raise UserError(f"FID weights not found: {weights}")
    try:
        if path:
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=False, map_location="cpu")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"could not get the FID Inception weights ({type(e).__name__}); download {FID_WEIGHTS_URL} "
                        f"to {cached} or pass --fid-weights PATH") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path or fname} is not the FID Inception state dict ({str(e).splitlines()[0][:100]})") from None
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


def save_npz(path, images, labels=None):
    """Samples as the ADM evaluation suite and DiT's sample_ddp.py write them: uint8 NHWC under `arr_0`
    (class labels, if any, under `labels`). Written to a temporary file, then renamed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.npz"
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "labels": labels}
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class FeatureStats:
    """Running float64 sums of Inception features; `finish()` all-reduces and returns (mu, sigma)."""

    def __init__(self, dim=2048, device="cpu"):
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
        with np.load(ref) as f:
            return f["mu"], f["sigma"]
    path = reference_stats_path(dataset, data_path)
    if os.path.isfile(path):
        with np.load(path) as f:
            return f["mu"], f["sigma"]
    if dataset != "cifar10":
        raise UserError(f"no FID reference statistics for {dataset}: pass --fid-ref STATS.npz (keys mu, sigma)")
    dist_info = dist_info or Dist(device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    data = CIFAR10(data_path or "./data")
    inception = load_fid_inception(weights, dist_info.device)
    idx = torch.arange(dist_info.rank, len(data), dist_info.world_size)
    batches = (data.get(idx[i:i + batch_size])[0] for i in range(0, len(idx), batch_size))
    mu, sigma = inception_stats(batches, inception, dist_info.device)
    if dist_info.is_main:
        tmp = path + ".tmp.npz"
        np.savez(tmp, mu=mu, sigma=sigma)
        os.replace(tmp, path)
    return mu, sigma


# ==============================================================================================
# The digits figure (SPEC section 8): FID's recipe with a small classifier of 8x8 digits as the feature
# network. The Frechet distance between generated and held-out digits in its penultimate features (the
# same `frechet_distance` as FID), and the share of samples per predicted class (mode coverage).

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


# ==============================================================================================
# Training infrastructure: EMA, checkpoints, logging, images

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


def save_checkpoint(path, obj):
    """Write atomically: a temp file in the same folder, fsync, then rename over `path`. A crash at any
    point leaves either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


def all_finite(module_or_state):
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def _to_uint8_grid(images, nrow):
    import torchvision
    x = images.detach().float().cpu()
    if x.shape[1] not in (1, 3):        # latents without a decoder: show the first 3 channels, each standardised
        x = x[:, :3]
        x = (x - x.mean((0, 2, 3), keepdim=True)) / (2 * x.std((0, 2, 3), keepdim=True) + 1e-8)
    grid = torchvision.utils.make_grid(x.clamp(-1, 1), nrow=nrow, padding=2, value_range=(-1, 1), normalize=True)
    return (grid * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def save_grid(images, path, nrow=None):
    """Images in [-1, 1], [N, C, H, W] -> one PNG grid."""
    from PIL import Image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arr = _to_uint8_grid(images, nrow or math.ceil(math.sqrt(len(images))))
    Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(path)


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
    """Appends one JSON object per line (rank 0 only)."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled

    def write(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ==============================================================================================
# The run: CLI, config, and the bookkeeping every training loop shares

COMMON_DEFAULTS = dict(
    dataset=None, data_path=None, out=None, steps=2000, batch_size=256, lr=1e-3, model="MLP", seed=0,
    resume=False, log_every=100, sample_every=0, ckpt_every=1000, nfe=[1, 2, 4], sample_only=False, ckpt=None,
    n=64, fid=0, fid_weights=None, fid_ref=None, fid_batch=250, class_cond=False, xflip=False,
    ema_decay=None, ema_halflife_kimg=None, grad_clip=0.0, max_skips=20, bf16=False, device=None,
    eval_samples=None, classes=None, vae=None,
)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (and exit code 2) like every other input error."""

    def error(self, message):
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def base_parser(method, description):
    """The flags every method script shares (SPEC section 1). Defaults are None so a flag given on the
    command line can be told from one left to the preset (see resolve_config)."""
    p = OneLineErrorParser(prog=f"{method}.py", description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", choices=DATASETS, help="data set; picks the paper's preset for that setting")
    a("--imagenet-latents", action="store_true", help="shorthand for --dataset imagenet-latents")
    a("--data-path", help="data folder (default ./data for cifar10, ./data/imagenet-latents for latents)")
    a("--out", help=f"run directory (default runs/{method}-<dataset>)")
    a("--steps", type=int, help="training iterations")
    a("--batch-size", type=int, help="global batch size (split over ranks)")
    a("--lr", type=float, help="learning rate")
    a("--model", help="backbone: MLP (toy data) or one of DiT-T/2, DiT-S/2, DiT-B/2, DiT-L/2, DiT-XL/2")
    a("--seed", type=int, help="base seed; rank r uses seed * world_size + r")
    a("--resume", action="store_true", default=None, help="continue from OUT/ckpt.pt (bit-identical trajectory)")
    a("--log-every", type=int, help="steps between log.jsonl records")
    a("--sample-every", type=int, help="steps between sample grids (0: only at the end)")
    a("--ckpt-every", type=int, help="steps between checkpoints")
    a("--nfe", type=int, nargs="+", help="numbers of function evaluations to sample/evaluate with")
    a("--sample-only", action="store_true", default=None, help="write samples (and --fid) from --ckpt, no training")
    a("--ckpt", help="checkpoint for --sample-only")
    a("--n", type=int, help="samples per grid")
    a("--fid", type=int, help="FID with this many samples per NFE (50000 for published numbers)")
    a("--fid-weights", help="path of pt_inception-2015-12-05-6726825d.pth (else torch hub cache/download)")
    a("--fid-ref", help="reference statistics .npz (mu, sigma); default: cached CIFAR-10 train statistics")
    a("--fid-batch", type=int, help="per-rank batch for FID sampling")
    a("--class-cond", action=argparse.BooleanOptionalAction, help="class-conditional model (labels, CFG)")
    a("--xflip", action=argparse.BooleanOptionalAction, help="random horizontal flips of training images")
    a("--ema-decay", type=float, help="EMA decay per step (overrides the half-life)")
    a("--ema-halflife-kimg", type=float, help="EMA half-life in thousands of images (EDM convention)")
    a("--grad-clip", type=float, help="clip the gradient norm to this value (0: off)")
    a("--max-skips", type=int, help="stop after this many consecutive non-finite steps")
    a("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast for forward/backward passes (CUDA)")
    a("--device", choices=["cpu", "cuda"], help="force a device (default: CUDA when available)")
    a("--vae", help="latent data: diffusers AutoencoderKL name or folder that decodes samples (default: the one "
                    "recorded in the shards' meta.json)")
    a("--eval-samples", type=int, help="samples per sampler and NFE written at the end to samples/nfe{k}.npy "
                                       "(toy points) or .npz (images) and scored (default: toy 4096, images 1000)")
    return p


def resolve_config(args, method, defaults, presets):
    """defaults <- presets[setting] <- explicitly given flags. Toy sets use presets["toy"] unless they
    have their own entry. Returns a plain dict (saved as config.json)."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    if given.pop("imagenet_latents", False):
        given["dataset"] = "imagenet-latents"
    if given.get("sample_only"):                    # sampling: the checkpoint's config, then the flags given
        if not given.get("ckpt"):
            raise UserError("--sample-only needs --ckpt PATH")
        trained = load_checkpoint(given["ckpt"], method)["cfg"]
        cfg = {**COMMON_DEFAULTS, **defaults, **trained, "resume": False, **given}
        cfg["out"] = given.get("out") or os.path.dirname(os.path.abspath(given["ckpt"]))
        return cfg
    dataset = given.get("dataset")
    if dataset is None:
        raise UserError("choose a data set with --dataset (" + ", ".join(DATASETS) + ")")
    setting = dataset if dataset in presets else ("toy" if dataset in TOY_SETS else dataset)
    cfg = {**COMMON_DEFAULTS, **defaults, **presets.get(setting, {}), **given}
    cfg.update(method=method, dataset=dataset)
    cfg["out"] = cfg["out"] or os.path.join("runs", f"{method}-{dataset}")
    if cfg["ema_decay"] is not None:
        cfg["ema_halflife_kimg"] = None
    if cfg["eval_samples"] is None:
        cfg["eval_samples"] = 4096 if dataset in TOY_SETS else 1000
    return cfg


class Run:
    """Bookkeeping around a method's training loop: devices and seeds, the run folder, the optimizer
    update with non-finite skipping, logging, checkpoints with all RNG streams, samples and evaluation.

        run = Run(cfg)
        ...
        for step in run.steps(start):
            losses = ...                       # dict of scalar tensors, "loss" is optimised
            run.update(opt, losses["loss"], params)
            run.log(step, losses)
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.dist = setup_distributed(cfg.get("device"))
        self.device = self.dist.device
        if self.device.type == "cuda":
            enable_tf32()
        else:
            tune_cpu_allocator()
        if cfg["batch_size"] % self.dist.world_size:
            raise UserError(f"global batch {cfg['batch_size']} is not divisible by the world size {self.dist.world_size}")
        self.batch_per_rank = cfg["batch_size"] // self.dist.world_size
        seed_everything(cfg["seed"], self.dist)
        self.out = cfg["out"]
        self.is_main = self.dist.is_main
        self.skips = 0            # consecutive non-finite steps
        self.skipped_total = 0
        self._acc, self._acc_n, self._t_last, self._lr = {}, 0, time.time(), None
        if self.is_main:
            os.makedirs(os.path.join(self.out, "samples"), exist_ok=True)
        self.logger = JSONLLogger(os.path.join(self.out, "log.jsonl"), self.is_main)

    # -- config ------------------------------------------------------------------------------
    def save_config(self):
        if self.is_main:
            print0(json.dumps(self.cfg, indent=1, sort_keys=True))
            with open(os.path.join(self.out, "config.json"), "w") as f:
                json.dump(self.cfg, f, indent=1, sort_keys=True)

    def autocast(self):
        """--bf16: bf16 autocast around a method's loss, on CUDA or the CPU (see "Precision" above for which
        passes then run in bf16 and which stay in fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.cfg.get("bf16")))

    def wrap(self, model):
        """DDP-wrap a model that receives gradients (no-op in a single process)."""
        model = model.to(self.device)
        if not self.dist.ddp:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    # -- the update ----------------------------------------------------------------------------
    def update(self, opt, loss, params, grad_clip=None):
        """backward, then step only if the loss and the (already all-reduced) gradient are finite.
        Non-finite steps are skipped and counted; too many in a row stop the run (the last good
        checkpoint stays). Returns the gradient norm (a tensor)."""
        params = [p for p in params if p.requires_grad]
        loss.backward()
        clip = grad_clip if grad_clip is not None else self.cfg.get("grad_clip", 0.0)
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip and clip > 0 else float("inf"))
        ok = torch.isfinite(gnorm) & torch.isfinite(loss.detach())
        ok = all_reduce_sum(ok.float()) == self.dist.world_size          # every rank decides alike
        self._lr = opt.param_groups[0]["lr"]
        if bool(ok):
            opt.step()
            self.skips = 0
        else:
            self.skips += 1
            self.skipped_total += 1
            if self.skips >= self.cfg["max_skips"]:
                raise RunError(f"{self.skips} consecutive non-finite steps; stopping (the last good checkpoint "
                               f"{os.path.join(self.out, 'ckpt.pt')} is intact). Lower --lr or check the data.")
        opt.zero_grad(set_to_none=True)
        return gnorm

    # -- logging -------------------------------------------------------------------------------
    def steps(self, start):
        """range(start, steps) with a progress bar on rank 0."""
        it = range(start, self.cfg["steps"])
        if self.is_main and sys.stderr.isatty():
            from tqdm import tqdm
            it = tqdm(it, initial=start, total=self.cfg["steps"], dynamic_ncols=True)
        self._t_last = time.time()
        return it

    def log(self, step, scalars):
        """Accumulate scalar tensors (no host sync); every log_every steps average them over steps and
        ranks and write one log.jsonl record."""
        for k, v in scalars.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            self._acc[k] = self._acc.get(k, 0) + v.to(self.device)
        self._acc_n += 1
        done = step + 1
        if done % self.cfg["log_every"] and done != self.cfg["steps"]:
            return None
        keys = sorted(self._acc)
        vec = all_reduce_mean(torch.stack([self._acc[k] for k in keys]) / self._acc_n)
        now = time.time()
        rec = {"step": done, "kimg": round(done * self.cfg["batch_size"] / 1000, 3)}
        rec.update({k: float(v) for k, v in zip(keys, vec.tolist())})
        if self._lr is not None:
            rec["lr"] = self._lr
        rec.update(sec_per_step=round((now - self._t_last) / self._acc_n, 5), skipped=self.skipped_total)
        self._acc, self._acc_n, self._t_last = {}, 0, now
        self.logger.write(rec)
        if self.is_main and not sys.stderr.isatty():
            print0(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
        return rec

    # -- checkpoints ---------------------------------------------------------------------------
    def _gather_rng(self):
        state = rng_state(self.device)
        if not self.dist.ddp:
            return [state]
        states = [None] * self.dist.world_size
        tdist.all_gather_object(states, state)
        return states

    def checkpoint(self, step, objects, path=None):
        """Save {name: obj.state_dict()} plus step, config, every rank's RNG and the skip counter,
        atomically, from rank 0. A state with non-finite weights is never written over a good file."""
        rng = self._gather_rng()                                     # collective: every rank calls
        if self.is_main:
            state = {name: obj.state_dict() for name, obj in objects.items()}
            weights = [s for s in state.values() if isinstance(s, dict) and all(torch.is_tensor(v) for v in s.values())]
            if all(all_finite(w) for w in weights):
                state.update(step=step, cfg=self.cfg, rng=rng, skipped=self.skipped_total)
                save_checkpoint(path or os.path.join(self.out, "ckpt.pt"), state)
            else:
                print0(f"warning: non-finite weights at step {step}; checkpoint not written")
        if self.dist.ddp:
            tdist.barrier()                                          # nobody reads it before it exists

    def restore(self, objects):
        """With --resume, load OUT/ckpt.pt into `objects` and the RNG streams; returns the start step."""
        if not self.cfg.get("resume"):
            return 0
        path = os.path.join(self.out, "ckpt.pt")
        ckpt = load_checkpoint(path, self.cfg["method"])
        for name, obj in objects.items():
            if name not in ckpt:
                raise UserError(f"{path} has no {name!r} state (written with other options?)")
            obj.load_state_dict(ckpt[name])
        rng = ckpt["rng"]
        if len(rng) == self.dist.world_size:
            set_rng_state(rng[self.dist.rank], self.device)
        else:
            print0(f"warning: checkpoint has RNG streams for {len(rng)} ranks, running on {self.dist.world_size}; "
                   f"the continuation will not be bit-identical")
            seed_everything(self.cfg["seed"] + ckpt["step"], self.dist)
        self.skipped_total = ckpt.get("skipped", 0)
        print0(f"resumed from {path} at step {ckpt['step']}")
        return ckpt["step"]

    # -- samples and evaluation ----------------------------------------------------------------
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

    def after_step(self, step, state, sample, data):
        """The loop's bookkeeping after update `step` (0-based): grids every sample_every updates, and a
        checkpoint of `state` every ckpt_every updates and after the last one."""
        done = step + 1
        if self.cfg["sample_every"] and done % self.cfg["sample_every"] == 0:
            self.save_samples(f"step{done}", sample, data)
        if done % self.cfg["ckpt_every"] == 0 or done == self.cfg["steps"]:
            self.checkpoint(done, state)

    def finish(self, tag, sample, data, close=True):
        """End of a run (or of --sample-only): grids tagged `tag`, eval.json, then the process group closes."""
        self.save_samples(tag, sample, data)
        self.evaluate(sample, data)
        if close:
            self.close()

    def save_samples(self, tag, samplers, data):
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
        (sample_fn, nfes)} as in save_samples. For every sampler and NFE, eval_samples samples are written
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
                        result.setdefault("swd" + suffix, {})[str(k)] = sliced_wasserstein(torch.from_numpy(x), held_out)
                    else:
                        save_npz(stem + ".npz", x, labels)
                    if quality is not None:
                        for key, value in quality.score(from_uint8(x)).items():
                            result.setdefault(key + suffix, {})[str(k)] = value
            if self.cfg.get("fid") and not toy:
                result["fid" + suffix] = {str(k): self.fid(sample_fn, data, k, name) for k in nfes}
        if self.is_main and result:
            path = os.path.join(self.out, "eval.json")
            previous = json.load(open(path)) if os.path.isfile(path) else {}
            with open(path, "w") as f:
                json.dump({**previous, **result}, f, indent=1)
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

    def close(self):
        if tdist.is_initialized():
            tdist.barrier()
            tdist.destroy_process_group()


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


def randn(shape, generator, device, std=1.0):
    """Gaussian noise drawn on the host from `generator` (device-independent), moved to `device`."""
    return (std * torch.randn(*shape, generator=generator)).to(device)


# ==============================================================================================
# Command line of common.py itself

def _main(argv=None):
    p = argparse.ArgumentParser(prog="common.py", description="data preparation for the method scripts")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("fid-ref", help="compute and cache FID reference statistics")
    r.add_argument("--dataset", default="cifar10", choices=["cifar10"])
    r.add_argument("--data-path", default="./data")
    r.add_argument("--fid-weights")
    r.add_argument("--batch-size", type=int, default=250)
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
    if args.cmd == "fid-ref":
        path = reference_stats_path(args.dataset, args.data_path)
        if os.path.isfile(path):
            os.remove(path)                                          # recompute on request
        mu, _ = fid_reference(args.dataset, args.data_path, weights=args.fid_weights, batch_size=args.batch_size)
        print(f"wrote {path} ({mu.shape[0]}-d statistics)")
    else:
        n = encode_latents(args.images, args.out, args.vae, args.image_size, args.batch_size, args.scale_factor,
                           args.shard_size, args.mode)
        print(f"wrote {n} latents to {args.out}")


if __name__ == "__main__":
    cli(_main)
