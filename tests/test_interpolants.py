"""Interpolant identities and the closed-form Gaussian flow."""
import math

import pytest
import torch

import common

INTERPOLANTS = {
    "noise-at-0": (common.NoiseAt0(), 0.0, 1.0),      # (interpolant, noise end, data end)
    "noise-at-1": (common.NoiseAt1(), 1.0, 0.0),
    "trigflow": (common.TrigFlow(0.5), math.pi / 2, 0.0),
}


@pytest.mark.parametrize("name", INTERPOLANTS)
def test_endpoints_and_velocity(name):
    interp, t_noise, t_data = INTERPOLANTS[name]
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    ones = torch.ones(16, dtype=torch.float64)
    assert torch.allclose(interp(x, z, t_noise * ones)[0], z, atol=1e-12)
    assert torch.allclose(interp(x, z, t_data * ones)[0], x, atol=1e-12)
    # the conditional velocity is d x_t / dt at fixed (x, z): central difference
    t = torch.rand(16, generator=g, dtype=torch.float64) * 0.8 * max(t_noise, t_data) + 0.05
    h = 1e-6
    fd = (interp(x, z, t + h)[0] - interp(x, z, t - h)[0]) / (2 * h)
    assert torch.allclose(interp(x, z, t)[1], fd, atol=1e-8)


def test_conventions_written_out():
    x, z, t = torch.tensor([[2.0]]), torch.tensor([[-1.0]]), torch.tensor([0.25])
    assert torch.allclose(common.NoiseAt0()(x, z, t)[0], 0.75 * z + 0.25 * x)
    assert torch.allclose(common.NoiseAt0()(x, z, t)[1], x - z)
    assert torch.allclose(common.NoiseAt1()(x, z, t)[0], 0.75 * x + 0.25 * z)
    assert torch.allclose(common.NoiseAt1()(x, z, t)[1], z - x)
    xt, v = common.TrigFlow(0.5)(x, z, t)
    assert torch.allclose(xt, math.cos(0.25) * x + math.sin(0.25) * z)
    assert torch.allclose(v, math.cos(0.25) * z - math.sin(0.25) * x)
    assert common.TrigFlow(0.5).noise_std == 0.5


@pytest.mark.parametrize("name", INTERPOLANTS)
def test_gaussian_flow_is_the_pf_ode(name):
    interp, t_noise, t_data = INTERPOLANTS[name]
    mu, std = torch.tensor([0.7, -1.2, 0.1]), 0.6
    flow = common.GaussianFlow(interp, mu, std)
    lo, hi = sorted([t_noise, t_data])
    g = torch.Generator().manual_seed(1)
    n = 64
    t = (lo + (hi - lo) * (0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)))
    s = (lo + (hi - lo) * (0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)))
    r = (lo + (hi - lo) * (0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)))
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    # identity, semigroup property, and d/ds flow_map(x, t, s)|_{s=t} = velocity(x, t)
    assert torch.allclose(flow.flow_map(x, t, t), x, atol=1e-12)
    assert torch.allclose(flow.flow_map(flow.flow_map(x, t, r), r, s), flow.flow_map(x, t, s), atol=1e-10)
    h = 1e-6
    fd = (flow.flow_map(x, t, t + h) - flow.flow_map(x, t, t - h)) / (2 * h)
    assert torch.allclose(fd, flow.velocity(x, t), atol=1e-7)
    # the ODE along the map: d/ds flow_map(x, t, s) = velocity(flow_map(x, t, s), s)
    fd_s = (flow.flow_map(x, t, s + h) - flow.flow_map(x, t, s - h)) / (2 * h)
    assert torch.allclose(fd_s, flow.velocity(flow.flow_map(x, t, s), s), atol=1e-7)
    # the data end maps to data statistics: push noise from the noise end to the data end
    N = 200_000
    zz = interp.noise_std * torch.randn(N, 3, generator=g, dtype=torch.float64)
    xd = flow.flow_map(zz, torch.full((N,), t_noise * 0.999 + t_data * 0.001, dtype=torch.float64),
                       torch.full((N,), float(t_data), dtype=torch.float64))
    assert torch.allclose(xd.mean(0), mu.double(), atol=0.01)
    assert torch.allclose(xd.std(0), torch.full((3,), std, dtype=torch.float64), atol=0.01)


@pytest.mark.parametrize("name", INTERPOLANTS)
def test_gaussian_velocity_is_conditional_expectation(name):
    """E[v_cond | x_t] is affine in x_t for Gaussian data, so velocity(x_t) must leave a residual
    v_cond - velocity orthogonal to 1 and to x_t (Monte Carlo, many samples at one t)."""
    interp, t_noise, t_data = INTERPOLANTS[name]
    mu, std = torch.tensor([0.5, -0.3]), 0.8
    flow = common.GaussianFlow(interp, mu, std)
    g = torch.Generator().manual_seed(2)
    N = 400_000
    x = flow.sample_data(N, generator=g).double()
    z = interp.noise_std * torch.randn(N, 2, generator=g, dtype=torch.float64)
    t = torch.full((N,), 0.4 * t_noise + 0.6 * t_data, dtype=torch.float64)
    xt, v = interp(x, z, t)
    resid = v - flow.velocity(xt, t)
    assert resid.mean(0).abs().max() < 0.01
    assert (resid * (xt - xt.mean(0))).mean(0).abs().max() < 0.01
    assert resid.var(0).min() > 0.01          # the conditional velocity is noisy: the test is not vacuous
