"""Time samplers draw from the density they report (KS tests), and the densities integrate to 1."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import common

CONTINUOUS = {
    "uniform": common.Uniform(0.2, 0.9),
    "logit-normal": common.LogitNormal(-0.4, 1.1),
    "sine": common.Sine(1.0, 0.01, 0.006, 0.994),           # GCM default, Eq. (15)
    "sine-b0.1": common.Sine(1.0, 0.1),
    "cosh": common.Cosh(1.5, 0.0, 0.006, 0.994),             # GCM Table 7g, Eq. (16)
    "uniform-power-4": common.UniformPower(4.0, 0.006, 0.994),  # GCM Eq. (17)
    "uniform-power-2": common.UniformPower(2.0),
}


@pytest.mark.parametrize("name", CONTINUOUS)
def test_ks_and_density(name):
    smp = CONTINUOUS[name]
    torch.manual_seed(0)
    x = smp.sample(20_000).double()
    assert x.min() >= smp.lo and x.max() <= smp.hi
    p = stats.kstest(x.numpy(), lambda v: smp.cdf(torch.from_numpy(np.asarray(v))).numpy()).pvalue
    assert p > 1e-3, f"KS p-value {p}"
    grid = torch.linspace(smp.lo + 1e-7, smp.hi, 400_001, dtype=torch.float64)
    assert abs(float(torch.trapezoid(smp.pdf(grid), grid)) - 1) < 2e-3
    # pdf is the derivative of cdf
    g = torch.linspace(smp.lo + 0.02, smp.hi - 0.02, 40, dtype=torch.float64)
    h = 1e-6
    assert torch.allclose((smp.cdf(g + h) - smp.cdf(g - h)) / (2 * h), smp.pdf(g), rtol=1e-4, atol=1e-5)


def test_ks_rejects_a_wrong_density():
    """The KS check has power: sine samples are not uniform-power samples."""
    torch.manual_seed(0)
    x = common.Sine(1.0, 0.01).sample(20_000).double().numpy()
    up = common.UniformPower(4.0)
    assert stats.kstest(x, lambda v: up.cdf(torch.from_numpy(np.asarray(v))).numpy()).pvalue < 1e-6


def test_lognormal():
    smp = common.LogNormal(-1.0, 1.4)                          # sCM CIFAR-10 (P_mean, P_std)
    torch.manual_seed(1)
    x = smp.sample(20_000).double().numpy()
    assert stats.kstest(x, lambda v: smp.cdf(torch.from_numpy(np.asarray(v))).numpy()).pvalue > 1e-3
    normal = lambda v: 0.5 * (1 + torch.erf((torch.from_numpy(np.asarray(v)) + 1.0) / (1.4 * math.sqrt(2))))  # noqa: E731
    assert stats.kstest(np.log(x), lambda v: normal(v).numpy()).pvalue > 1e-3        # log sigma ~ N(-1, 1.4^2)
    grid = torch.logspace(-8, 4, 200_001, dtype=torch.float64)
    assert abs(float(torch.trapezoid(smp.pdf(grid), grid)) - 1) < 1e-4


def test_sine_inverse_cdf_matches_paper_formula():
    """Eq. (41) written out once more, for a = 1, b = 0.01 on [0, 1]."""
    a, b = 1.0, 0.01
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    t = 2 / (math.pi * (a - b)) * (torch.arccos(math.cos(math.pi * b / 2) - u * (math.cos(math.pi * b / 2) - math.cos(math.pi * a / 2))) - math.pi * b / 2)
    assert torch.allclose(common.Sine(a, b).cdf(t), u, atol=1e-12)


def test_sine_and_cosh_favour_high_t():
    torch.manual_seed(2)
    assert common.Sine(1.0, 0.01).sample(10_000).mean() > 0.6
    assert common.Cosh(1.5, 0.0).sample(10_000).mean() > 0.55
    assert common.UniformPower(4.0).sample(10_000).mean() < 0.15    # mass near lo (s near t0)


def test_uniform_power_per_sample_range():
    s = torch.tensor([0.1, 0.5, 0.9])
    smp = common.Sine(1.0, 0.01, lo=s, hi=0.994)
    torch.manual_seed(0)
    t = smp.sample(3)
    assert ((t >= s) & (t <= 0.994)).all()


def test_segments():
    smp = common.Segments(4)
    torch.manual_seed(0)
    x = smp.sample(50_000)
    values, counts = torch.unique(x, return_counts=True)
    assert torch.allclose(values, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    assert torch.allclose(smp.pdf(values.double()), torch.full((5,), 0.2, dtype=torch.float64))
    assert float(smp.pdf(torch.tensor([0.3], dtype=torch.float64))) == 0.0
