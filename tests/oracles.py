"""Closed-form networks for the precision tests: for Gaussian data N(MU, STD^2 I) every method's exact
network output is an affine function of x per coordinate (common.GaussianFlow). `AffineOracle` wraps such
a function as an nn.Module that computes it through a matrix product, `x @ I`, which autocast runs in
bf16 like every linear layer of a real network. A target computed under --bf16 from these modules
therefore carries bf16 errors (about 4e-3 relative) unless the code runs that pass in fp32; the JVPs go
through them as through any module (the coefficients depend on t and s)."""
import math

import torch
import torch.nn as nn

import common

MU_IMG = 0.3 * torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(1, 8, 8)   # per-pixel means, (C, H, W)
STD_IMG = 0.5


class AffineOracle(nn.Module):
    """out = A(t, s) * (x @ I) + B(t, s), where fn(x, t, s) (elementwise, float64) is affine in x:
    B = fn(0), A = fn(1) - fn(0). `null_label` lets the methods' CFG code call it with labels, which it
    ignores (the conditional and unconditional velocities are then equal). On a CUDA GPU with TF32 on, the
    product x @ I rounds x to TF32's 10 mantissa bits, as a real network's fp32 layers would. With `calls` a
    list, every forward appends (bf16 autocast on, TF32 on) as it found them."""

    def __init__(self, fn, width, num_classes=10, device="cpu"):
        super().__init__()
        self.fn = fn
        self.register_buffer("eye", torch.eye(width, dtype=torch.float32, device=device))
        self.num_classes = num_classes
        self.calls = None

    @property
    def null_label(self):
        return self.num_classes

    def forward(self, x, t, s=None, y=None, w=None):
        if self.calls is not None:
            self.calls.append((torch.is_autocast_enabled(x.device.type), common.tf32_enabled()))
        like = torch.zeros_like(x, dtype=torch.float64)
        B = self.fn(like, t, s)
        A = self.fn(like + 1, t, s) - B
        lin = x @ self.eye.to(x.dtype)                       # (..., W): bf16 under autocast, like a linear layer
        return (A * lin.double() + B).to(lin.dtype)


def decm_flow():
    return common.GaussianFlow(common.NoiseAt0(), MU_IMG, STD_IMG)


def gcm_flow():
    return common.GaussianFlow(common.NoiseAt1(), MU_IMG, STD_IMG)


def trig_flow(sigma_d):
    return common.GaussianFlow(common.TrigFlow(sigma_d), MU_IMG, STD_IMG)


def average_velocity(flow):
    """(flow_map(x, t, s) - x) / (s - t), the exact F of a flow-map network (DE-CM, GCM's f); the
    velocity itself where s = t."""
    def fn(x, t, s):
        gap = common.bcast(s.double() - t.double(), x)
        safe = torch.where(gap == 0, torch.ones_like(gap), gap)
        avg = (flow.flow_map(x, t.double(), s.double()) - x) / safe
        return torch.where(gap == 0, flow.velocity(x, t.double()), avg)
    return fn


def velocity(flow):
    return lambda x, t, s=None: flow.velocity(x, t.double())


def trig_consistency_F(flow, sigma_d):
    """sCM's F(u, t) with f(x_t, t) = cos t x_t - sin t sigma_d F(x_t / sigma_d, t) = flow_map(x_t, t, 0)."""
    def fn(u, t, s=None):
        t = t.double()
        x = sigma_d * u
        cos, sin = common.bcast(torch.cos(t), u), common.bcast(torch.sin(t), u)
        return (cos * x - flow.flow_map(x, t, torch.zeros_like(t))) / (sigma_d * sin)
    return fn


def trig_teacher_F(flow, sigma_d):
    """sCM's teacher: sigma_d F_pretrain(x_t / sigma_d, t) = the exact PF-ODE velocity."""
    return lambda u, t, s=None: flow.velocity(sigma_d * u, t.double()) / sigma_d


def direct_w(flow):
    """Direct's exact residual field: w(x0, t) = (phi(x0, t) - x0) / t, phi the flow map from noise."""
    def fn(x0, t, s=None):
        t = t.double()
        return (flow.flow_map(x0, torch.zeros_like(t), t) - x0) / common.bcast(t, x0)
    return fn


def gcm_net(flow, cfg):
    """The raw network F(c_in x, c(t), c(s)) whose f_theta (gcm.py) is the exact average velocity: the
    preconditioning is undone (t recovered from c(t))."""
    import gcm
    fn_f = average_velocity(flow)

    def c_inverse(c):
        return torch.log1p(cfg["mu"] * c) / cfg["mu"] if cfg["time_precond"] == "exp" else c

    def fn(u, ct, cs=None):
        t = c_inverse(ct.double())
        s = c_inverse(cs.double()) if cs is not None else torch.full_like(t, cfg["t0"])
        c_in, c_out = (common.bcast(c, u) for c in gcm.precond(cfg["precond"], t, cfg["sigma_d"]))
        return fn_f(u / c_in, t, s) / c_out
    return fn


def rel(a, b):
    """||a - b|| / ||b|| over the whole batch."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def bf16(device="cpu", targets="fp32"):
    """--bf16 on `device` (the CPU autocast the tests run, or CUDA's), with the target policy `targets`."""
    return common.mixed_precision(device, bf16=True, targets=targets)


def images(n, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (MU_IMG + STD_IMG * torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)).float().to(device)


def noise(n, seed=1, device="cpu"):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)).to(device)


def pi_half():
    return math.pi / 2


def jvp_finite_difference(fn, primals, tangents, eps=1e-3):
    """Central finite difference (f(p + eps v) - f(p - eps v)) / (2 eps), O(eps^2), against which the analytic
    JVPs are checked: (f(p), the difference). All three evaluations see the same random draws (dropout), so the
    difference measures the function only; IEEE fp32 at least, autocast off."""
    with torch.no_grad(), torch.autocast(primals[0].device.type, enabled=False), common.ieee_fp32():
        same = common.SameRandomness(primals[0].device)
        primals, tangents = tuple(map(common.wide, primals)), tuple(map(common.wide, tangents))
        shifted = [tuple(p + sign * eps * t for p, t in zip(primals, tangents)) for sign in (1, -1)]
        with same:
            out = fn(*primals)
        with same:
            plus = fn(*shifted[0])
        with same:
            minus = fn(*shifted[1])
        return out, (plus - minus) / (2 * eps)
