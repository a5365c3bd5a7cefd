"""The backbones: shapes for every registry entry, conditioning inputs, zero-init second time,
forward-mode AD through attention, and the JVP helpers against finite differences."""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import common
from oracles import jvp_finite_difference
import dit


def tiny(name, **kw):
    cfg = dit.DiT_models[name]
    return dit.build_model(name, (3, 8, 8), hidden_size=8 * cfg["num_heads"], depth=2, **kw)


def randomise(model, std=0.05, seed=0):
    """Give the zero-initialised layers weights, so every path of the network is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("name", list(dit.DiT_models))
def test_registry_forward_backward(name):
    model = tiny(name, num_classes=10, class_dropout=0.1, two_times=True, extra_cond=True)
    x = torch.randn(3, 3, 8, 8)
    out = model(x, torch.rand(3), torch.rand(3), torch.randint(0, 10, (3,)), torch.rand(3))
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    # adaLN-Zero: the untrained network outputs exactly zero
    assert out.abs().max() == 0


def test_registry_sizes():
    """Depth/width/heads of the DiT paper's Table 1 (parameter counts at 256px latents)."""
    counts = {name: sum(p.numel() for p in dit.build_model(name, (4, 32, 32)).parameters()) / 1e6
              for name in ("DiT-S/2", "DiT-B/2")}
    assert 32 < counts["DiT-S/2"] < 35 and 129 < counts["DiT-B/2"] < 133


def test_any_channels_and_size():
    model = dit.build_model("DiT-T/2", (4, 16, 16))
    assert model(torch.randn(2, 4, 16, 16), torch.rand(2)).shape == (2, 4, 16, 16)
    with pytest.raises(ValueError):
        dit.build_model("DiT-T/2", (3, 15, 15))
    mlp = dit.build_model("MLP", (2,), two_times=True)
    assert mlp(torch.randn(5, 2), torch.rand(5), torch.rand(5)).shape == (5, 2)


def test_inputs_must_match_construction():
    model = tiny("DiT-T/2")
    with pytest.raises(ValueError, match="input s"):
        model(torch.randn(1, 3, 8, 8), torch.rand(1), s=torch.rand(1))
    model2 = tiny("DiT-T/2", two_times=True)
    with pytest.raises(ValueError, match="input s"):
        model2(torch.randn(1, 3, 8, 8), torch.rand(1))


@pytest.mark.parametrize("backbone", ["DiT-T/2", "MLP"])
def test_second_time_starts_at_zero(backbone):
    """A one-time checkpoint loads into a two-time model and gives identical outputs for any s."""
    shape = (3, 8, 8) if backbone != "MLP" else (2,)
    kw = dict(hidden_size=32, depth=2) if backbone != "MLP" else dict(hidden_size=32, depth=2)
    one = randomise(dit.build_model(backbone, shape, num_classes=5, **kw))
    two = dit.build_model(backbone, shape, num_classes=5, two_times=True, extra_cond=True, **kw)
    dit.load_backbone(two, one.state_dict())
    one.eval(), two.eval()
    x, t, y = torch.randn(4, *shape), torch.rand(4), torch.randint(0, 5, (4,))
    for s in (torch.rand(4), torch.zeros(4)):
        assert torch.equal(one(x, t, y=y), two(x, t, s, y, torch.rand(4)))
    # and the new embedder is trainable: its last layer gets a gradient
    two(x, t, torch.rand(4), y, torch.rand(4)).square().sum().backward()
    assert two.cond.s_embedder.mlp[2].weight.grad.abs().sum() > 0


def test_load_backbone_rejects_other_shapes():
    a = tiny("DiT-T/2")
    b = dit.build_model("DiT-T/2", (4, 8, 8), hidden_size=32, depth=2)
    with pytest.raises(ValueError, match="shape mismatch"):
        dit.load_backbone(b, a.state_dict())
    with pytest.raises(ValueError, match="missing"):
        dit.load_backbone(tiny("DiT-T/2", num_classes=3), a.state_dict())


def test_label_dropout_and_null_label():
    model = randomise(tiny("DiT-T/2", num_classes=4, class_dropout=1.0))
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    null = torch.full((2,), model.null_label)
    model.train()
    assert torch.equal(model(x, t, y=torch.tensor([0, 1])), model(x, t, y=null))   # all dropped in training
    model.eval()
    assert not torch.allclose(model(x, t, y=torch.tensor([0, 1])), model(x, t, y=null))


def test_double_normalisation_is_identity_at_init_and_trains():
    model = tiny("DiT-T/2", adanorm="double")
    x = torch.randn(2, 3, 8, 8)
    h = model.x_embedder(x).flatten(2).transpose(1, 2) + model.pos_embed
    c = model.cond(torch.rand(2))
    assert torch.equal(model.blocks[0](h, c), h)      # gates start at zero
    ada = model.blocks[0].ada
    shift, scale = torch.randn(2, 8 * 4), torch.randn(2, 8 * 4)
    y = ada.modulate(torch.ones(2, 5, 32), 3 * shift, 3 * scale)
    # pixel norm: the result does not change when the modulation is rescaled
    assert torch.allclose(y, ada.modulate(torch.ones(2, 5, 32), shift, scale), atol=1e-5)


def test_attention_forward_ad_path_matches_fused():
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=torch.float64) for _ in range(3))
    fused = dit.attention(q, k, v)
    dq, dk, dv = (torch.randn_like(q) for _ in range(3))
    out, tangent = torch.func.jvp(dit.attention, (q, k, v), (dq, dk, dv))
    assert torch.allclose(out, fused, atol=1e-12)
    h = 1e-6
    fd = (dit.attention(q + h * dq, k + h * dk, v + h * dv) - dit.attention(q - h * dq, k - h * dk, v - h * dv)) / (2 * h)
    assert torch.allclose(tangent, fd, atol=1e-7)



def _explicit_attention(q, k, v):
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v


def test_lean_attention_jvp_matches_pytorch_rules():
    """Under no_grad (how common.jvp runs) attention takes _AttentionJVP: its tangent equals PyTorch's own
    forward-mode rules on the explicit maths, through torch.func.jvp and through forward_ad duals with a
    tangent on q only (the other tangents absent)."""
    g = torch.Generator().manual_seed(0)
    q, k, v, dq, dk, dv = (torch.randn(2, 3, 10, 8, dtype=torch.float64, generator=g) for _ in range(6))
    ref_out, ref_tan = torch.func.jvp(_explicit_attention, (q, k, v), (dq, dk, dv))
    with torch.no_grad():
        out, tan = torch.func.jvp(dit.attention, (q, k, v), (dq, dk, dv))
        _, q_only_ref = torch.func.jvp(lambda a: _explicit_attention(a, k, v), (q,), (dq,))
        with fwAD.dual_level():
            q_only = fwAD.unpack_dual(dit.attention(fwAD.make_dual(q, dq), k, v)).tangent
    assert torch.allclose(out, ref_out, atol=1e-12) and torch.allclose(tan, ref_tan, atol=1e-12)
    assert torch.allclose(q_only, q_only_ref, atol=1e-12)
    assert tan.abs().mean() > 0.1


def test_lean_rules_are_taken_only_without_weight_gradients(monkeypatch):
    """Linear takes the lean rule (weights as constants) under no_grad, and PyTorch's rule when a gradient
    to the weights is being recorded; both give the same tangent."""
    calls = []
    rule = dit._LinearJVP.jvp
    monkeypatch.setattr(dit._LinearJVP, "jvp", staticmethod(lambda ctx, *t: calls.append(1) or rule(ctx, *t)))
    lin = dit.Linear(5, 4).double()
    x, dx = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        lean = torch.func.jvp(lin, (x,), (dx,))
    assert len(calls) == 1
    with torch.enable_grad():
        full = torch.func.jvp(lin, (x,), (dx,))
    assert len(calls) == 1
    assert torch.allclose(lean[0], full[0]) and torch.allclose(lean[1], full[1])
    assert torch.allclose(lean[1], dx @ lin.weight.T)


def test_lean_rules_backward_is_exact():
    """The lean Functions also differentiate backwards correctly (gradcheck in float64)."""
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: dit._LinearJVP.apply(a, (w, b)), (x,))
    qkv = [torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(dit._AttentionJVP.apply, qkv)


def test_dit_jvp_with_lean_rules_equals_pytorch_rules():
    """The whole DiT (float64): common.jvp (lean rules, no_grad) against torch.func.jvp with gradients on,
    where every layer uses PyTorch's own forward-mode rules."""
    model, x, t, s, y, tangents = _dit_and_inputs()
    model = model.double()
    primals, tangents = (x.double(), t.double(), s.double()), tuple(v.double() for v in tangents)
    fn = lambda a, b, c: model(a, b, c, y)
    out, tan = common.jvp(fn, primals, tangents)
    ref_out, ref_tan = torch.func.jvp(fn, primals, tangents)
    assert ref_tan.requires_grad                                   # PyTorch's rules were the ones run
    assert torch.allclose(out, ref_out.detach(), atol=1e-12)
    assert torch.allclose(tan, ref_tan.detach(), atol=1e-10)
    assert tan.abs().mean() > 1e-2

def _dit_and_inputs(dropout=0.0):
    torch.manual_seed(0)                                        # the same network whatever ran before
    model = randomise(dit.build_model("DiT-T/2", (3, 8, 8), num_classes=5, two_times=True, dropout=dropout,
                                      hidden_size=32, depth=2), std=0.1).eval()
    g = torch.Generator().manual_seed(3)
    x, t, s = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g), torch.rand(2, generator=g)
    y = torch.randint(0, 5, (2,), generator=g)
    tangents = (torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g), -torch.rand(2, generator=g))
    return model, x, t, s, y, tangents


def test_jvp_through_dit_matches_finite_differences():
    """Full DiT, two time inputs, class labels, dropout off: the analytic JVP (fp32) against the
    finite-difference helper run on a float64 copy of the same network."""
    model, x, t, s, y, tangents = _dit_and_inputs()
    out, tangent = common.jvp(lambda a, b, c: model(a, b, c, y), (x, t, s), tangents)
    m64 = copy.deepcopy(model).double()
    out64, fd = jvp_finite_difference(lambda a, b, c: m64(a, b, c, y), (x.double(), t.double(), s.double()),
                                             tuple(v.double() for v in tangents), eps=1e-6)
    assert not out.requires_grad and not tangent.requires_grad
    assert tangent.abs().mean() > 1e-2                          # a non-trivial tangent
    with torch.no_grad():
        assert torch.equal(out, model(x, t, s, y))              # the JVP's primal is the plain forward, bit for bit
    # fp32 against fp64: rounding only (measured 3e-6 to 7e-6 of the largest output over six networks; the
    # former per-element check at an absolute 1e-5 failed once in about twenty identical runs)
    assert (out.double() - out64).abs().max() / out64.abs().max() < 1e-4
    assert (tangent.double() - fd).abs().max() / fd.abs().max() < 1e-4


def test_finite_difference_helper_is_second_order():
    """Central differences: halving eps divides the error by about 4."""
    fn = lambda a, b: torch.sin(3 * a) * torch.exp(b)
    p = (torch.tensor([0.3, -0.7], dtype=torch.float64), torch.tensor([0.2, 0.1], dtype=torch.float64))
    v = (torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([-0.3, 2.0], dtype=torch.float64))
    _, exact = common.jvp(fn, p, v)
    errs = [(jvp_finite_difference(fn, p, v, eps)[1] - exact).abs().max() for eps in (1e-2, 5e-3)]
    assert 3.5 < errs[0] / errs[1] < 4.5


def test_time_tangent_is_not_ignored():
    """Only the time tangent nonzero: the JVP equals the derivative in t alone."""
    model, x, t, s, y, _ = _dit_and_inputs()
    zero = torch.zeros_like(x)
    _, dt_only = common.jvp(lambda a, b: model(a, b, s, y), (x, t), (zero, torch.ones_like(t)))
    m64, h = copy.deepcopy(model).double(), 1e-6
    with torch.no_grad():
        fd = (m64(x.double(), t.double() + h, s.double(), y) - m64(x.double(), t.double() - h, s.double(), y)) / (2 * h)
    assert dt_only.abs().max() > 1e-3
    assert (dt_only.double() - fd).abs().max() / fd.abs().max() < 1e-4


def test_same_dropout_mask_for_jvp_and_gradient_pass():
    """With dropout on, the primal output of the JVP equals the gradient pass when both run inside
    the same SameRandomness snapshot, and differs without it."""
    model, x, t, s, y, (dx, dt, ds) = _dit_and_inputs(dropout=0.3)
    model.train()
    same = common.SameRandomness()
    with same:
        out_jvp, _ = common.jvp(lambda a, b, c: model(a, b, c, y), (x, t, s), (dx, dt, ds))
    with same:
        out_grad = model(x, t, s, y)
    assert out_grad.requires_grad
    assert torch.allclose(out_jvp, out_grad.detach(), atol=1e-5)
    out_other = model(x, t, s, y)
    assert not torch.allclose(out_other.detach(), out_grad.detach(), atol=1e-3)
