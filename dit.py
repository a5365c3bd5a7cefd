"""The backbones: DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers", arXiv 2212.09748)
and a small residual MLP with the same call signature for 2D toy data.

    out = model(x, t, s=None, y=None, w=None)        # out has the shape of x

- t:  the (first) time, a [B] tensor, fed through a sinusoidal embedding of `time_scale * t`.
- s:  an optional second time (flow maps f(x, t, s)); its embedder's last layer starts at zero, so
      a checkpoint of a one-time model loads into a two-time model (`load_backbone`) and gives the
      same outputs until training moves that layer.
- y:  optional class labels [B] (int64). Index `num_classes` is the null label used for
      classifier-free guidance; during training labels are dropped to it with `class_dropout`.
- w:  an optional extra scalar condition [B] (e.g. the guidance scale, sCM Section 5.2), embedded
      like a time and also zero-initialised.

Conditioning is adaLN-Zero (DiT Section 3.2): every block's shift/scale/gate come from a linear map
of the summed condition embedding; the gates (and the final projection) start at zero so every
block is the identity at initialisation. `adanorm="double"` swaps in sCM's adaptive double
normalisation (sCM Section 4.1): y = norm(x) * pnorm(scale) + pnorm(shift), pnorm = pixel norm.

Attention uses PyTorch's fused kernel for the ordinary forward pass. That kernel has no forward-mode
AD rule (torch.func.jvp raises NotImplementedError on CPU and CUDA). Inside the losses' JVPs (no_grad,
common.jvp) attention and the linear layers take forward-mode rules of their own (`_AttentionJVP`,
`_LinearJVP`): the fused kernel for the primal, and one matmul per tangent in the linear layers where
PyTorch's rule also multiplies by the weights' zero tangents. Under forward AD with a gradient being
recorded, attention falls back to explicit matmul + softmax and the layers to PyTorch's own rules.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.autograd.forward_ad as fwAD

try:  # a private helper, present in every PyTorch with torch.func; fall back to "no transform"
    from torch._C._functorch import is_functorch_wrapped_tensor
except ImportError:  # pragma: no cover
    def is_functorch_wrapped_tensor(x):
        return False


# ----------------------------------------------------------------------------------------------
# Building blocks

def _under_forward_ad(x):
    """True when x carries a forward-mode tangent (torch.func.jvp wraps tensors; forward_ad makes duals). Inside
    torch.compile (--compile: the gradient passes) there is none: the JVPs run eagerly (common.jvp), and the
    check itself, a C++ helper Dynamo cannot trace, would break the graph at every layer."""
    if torch.compiler.is_compiling():
        return False
    return is_functorch_wrapped_tensor(x) or fwAD.unpack_dual(x).tangent is not None


class _AttentionJVP(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v by the fused kernel, with a hand-written forward-mode rule.

    With P = softmax(S), S = q k^T / sqrt(d), o = P v, the tangent is
        dS = (q_t k^T + q k_t^T) / sqrt(d),   o_t = (P * dS) v - rowsum(P * dS) * o + P v_t,
    since dP = P * (dS - rowsum(P * dS)) (softmax's Jacobian). Five batched matmuls, and the primal is
    the ordinary forward's fused kernel, so the JVP's primal output matches the plain forward pass."""
    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(*inputs, output)
        ctx.save_for_backward(*inputs)

    @staticmethod
    def jvp(ctx, q_t, k_t, v_t):
        q, k, v, out = ctx.saved_tensors
        q_t, k_t, v_t = (torch.zeros_like(a) if a_t is None else a_t for a, a_t in ((q, q_t), (k, k_t), (v, v_t)))
        scale = q.shape[-1] ** -0.5
        # Under bf16 autocast (the faster precision policy) the matmuls run in bf16, the softmax and the
        # elementwise products in fp32, like the fused kernel's own softmax.
        P = _wide((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)            # (B, h, T, T)
        # dS as one matmul over the concatenated head dimension: [q_t, q] [k, k_t]^T = q_t k^T + q k_t^T
        dS = torch.cat([q_t * scale, q * scale], -1) @ torch.cat([k, k_t], -1).transpose(-2, -1)
        PdS = _wide(dS).mul_(P)                                                   # P * dS, (B, h, T, T)
        out_t = PdS @ v - PdS.sum(dim=-1, keepdim=True) * out + P @ v_t          # (B, h, T, d)
        return out_t.to(out.dtype)

    @staticmethod
    def backward(ctx, grad):
        with torch.enable_grad():
            q, k, v = (a.detach().requires_grad_() for a in ctx.saved_tensors)
            out = F.scaled_dot_product_attention(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad)


def attention(q, k, v, dropout_p=0.0):
    """softmax(q k^T / sqrt(d)) v for q, k, v of shape (B, heads, T, d)."""
    if not _under_forward_ad(q):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if dropout_p == 0 and not torch.is_grad_enabled():
        return _AttentionJVP.apply(q, k, v)                   # the JVPs of the losses (common.jvp)
    # Forward AD with a gradient recorded (or attention dropout): the same maths from differentiable
    # primitives, which PyTorch can differentiate to any order. No preset uses attention dropout.
    a = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)     # (B, h, T, T)
    a = a.softmax(dim=-1)
    if dropout_p > 0:
        a = F.dropout(a, dropout_p)
    return a @ v                                              # (B, h, T, d)


class _LinearJVP(torch.autograd.Function):
    """F.linear(x, weight, bias) with the weights held as constants, for forward-mode AD in x only.

    Inside torch.func.jvp, PyTorch's rule for a linear layer (and a custom Function that takes the weights
    as inputs) also gets zero tangents for the weights and multiplies by them: twice the matmuls of the
    JVP. The JVPs of our losses never differentiate with respect to the weights, so `Linear` uses this
    rule there: one matmul for the tangent, F.linear(x_t, weight). The weights are passed inside a tuple,
    which autograd does not track; `Linear` takes this path only when no gradient can flow to them."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, params):
        weight, bias = params
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.weight = inputs[1][0]

    @staticmethod
    def jvp(ctx, x_t, _):
        return F.linear(x_t, ctx.weight)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.weight, None


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) that takes the lean rule `_LinearJVP` when x carries
    a forward-mode tangent, the weights do not, and no gradient is being recorded for the weights."""

    def forward(self, x):
        if (_under_forward_ad(x) and not _under_forward_ad(self.weight)
                and not (torch.is_grad_enabled() and self.weight.requires_grad)):
            return _LinearJVP.apply(x, (self.weight, self.bias))
        return F.linear(x, self.weight, self.bias)


def _wide(x):
    """At least fp32 (float64 stays float64): the parts of a pass that stay fp32 under bf16 autocast."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def pixel_norm(x, eps=1e-8):
    """Karras et al. 2017 pixel norm over the channel (last) dimension: x / rms(x), in fp32 at least."""
    x = _wide(x)
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed in fp32 at least, also under bf16 autocast (CUDA's autocast does so for layer_norm,
    the CPU's does not): a norm divides by a spread that bf16 resolves to about three digits."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(_wide(x), self.normalized_shape, self.weight, self.bias, self.eps)


def sinusoidal_embedding(t, dim, max_period=10000.0):
    """Positional (transformer) embedding of a [B] tensor: [cos(t f_k), sin(t f_k)], f_k = max_period^(-k/half)."""
    half = dim // 2
    t = t.to(torch.promote_types(t.dtype, torch.float32))     # at least fp32, float64 kept for tests
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = t[:, None] * freqs[None]                           # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ScalarEmbedder(nn.Module):
    """Embeds a scalar per sample (a time, or the guidance scale): sinusoid -> MLP.

    `scale` multiplies the scalar before the sinusoid (DiT uses 1000 for t in [0, 1]; sCM keeps the
    frequencies low, Section 4.1). `zero_init` zeroes the last layer so a new input starts inert."""

    def __init__(self, hidden_size, scale=1000.0, freq_dim=256, zero_init=False):
        super().__init__()
        self.scale, self.freq_dim = scale, freq_dim
        self.mlp = nn.Sequential(Linear(freq_dim, hidden_size), nn.SiLU(), Linear(hidden_size, hidden_size))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)
        if zero_init:
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t):
        # fp32 at least, also under bf16 autocast: high-frequency features of t (and, inside the JVPs, their
        # derivatives in t) would lose most of their digits in bf16; the layer is tiny.
        with torch.autocast(t.device.type, enabled=False):
            return self.mlp(sinusoidal_embedding(self.scale * t, self.freq_dim))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, the null label (index num_classes), for CFG."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.table = nn.Embedding(num_classes + 1, hidden_size)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, y):
        if self.training and self.dropout_prob > 0:           # label dropout trains the unconditional model
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.table(y)


class Conditioner(nn.Module):
    """Sums the embeddings of t, s, y and w into one vector c per sample (shared by DiT and MLP)."""

    def __init__(self, hidden_size, num_classes=0, class_dropout=0.0, two_times=False, extra_cond=False,
                 time_scale=1000.0):
        super().__init__()
        self.t_embedder = ScalarEmbedder(hidden_size, time_scale)
        self.s_embedder = ScalarEmbedder(hidden_size, time_scale, zero_init=True) if two_times else None
        self.w_embedder = ScalarEmbedder(hidden_size, 1.0, zero_init=True) if extra_cond else None
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout) if num_classes > 0 else None

    def forward(self, t, s=None, y=None, w=None):
        c = self.t_embedder(t)
        for name, value, emb in (("s", s, self.s_embedder), ("y", y, self.y_embedder), ("w", w, self.w_embedder)):
            if (value is None) != (emb is None):
                raise ValueError(f"input {name} is {'missing' if value is None else 'given'} but the model was "
                                 f"built {'with' if value is None else 'without'} it")
            if value is not None:
                c = c + emb(value)
        return c                                                  # (B, D)


class Modulation(nn.Module):
    """adaLN: (shift, scale) from c applied after a parameter-free LayerNorm, plus a gate.

    "zero":   y = norm(x) * (1 + scale) + shift; the whole linear map starts at zero (adaLN-Zero).
    "double": y = norm(x) * pnorm(scale) + pnorm(shift) (sCM, adaptive double normalisation); the
              shift/scale rows keep their random init (pnorm of zero is undefined), the gate rows start
              at zero, so the block is still the identity at initialisation."""

    def __init__(self, hidden_size, n_chunks, kind="zero"):
        super().__init__()
        if kind not in ("zero", "double"):
            raise ValueError(f"adanorm must be 'zero' or 'double', got {kind!r}")
        self.kind, self.n_chunks = kind, n_chunks
        self.linear = Linear(hidden_size, n_chunks * hidden_size)
        if kind == "zero":
            nn.init.zeros_(self.linear.weight)
        else:
            nn.init.normal_(self.linear.weight, std=0.02)
            gate_rows = [slice(i * hidden_size, (i + 1) * hidden_size) for i in range(2, n_chunks, 3)]
            with torch.no_grad():
                for rows in gate_rows:
                    self.linear.weight[rows].zero_()
        nn.init.zeros_(self.linear.bias)

    def forward(self, c):
        return self.linear(F.silu(c)).chunk(self.n_chunks, dim=-1)

    def modulate(self, x, shift, scale):
        """x: (B, T, D) or (B, D); shift, scale: (B, D)."""
        if x.dim() == 3:
            shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
        if self.kind == "double":
            return x * pixel_norm(scale) + pixel_norm(shift)
        return x * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------
# DiT

def sincos_pos_embed_2d(dim, grid):
    """Fixed 2D sin-cos position embedding (MAE/DiT): half the channels encode rows, half columns."""
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")   # (grid, grid) each

    def embed_1d(pos, d):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]              # (grid*grid, d/2)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([embed_1d(rows, dim // 2), embed_1d(cols, dim // 2)], dim=1).float()  # (T, dim)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, dropout=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, B, h, T, d)
        x = attention(qkv[0], qkv[1], qkv[2])                     # (B, h, T, d)
        x = x.transpose(1, 2).reshape(B, T, D)                    # (B, T, D)
        return self.drop(self.proj(x))


class DiTBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, dropout=0.0, adanorm="zero"):
        super().__init__()
        self.norm1 = LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 Linear(hidden, dim), nn.Dropout(dropout))
        self.ada = Modulation(dim, 6, adanorm)

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)
        x = x + gate1.unsqueeze(1) * self.attn(self.ada.modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(self.ada.modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim, patch_size, out_channels, adanorm="zero"):
        super().__init__()
        self.norm = LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = Modulation(dim, 2, adanorm)
        self.linear = Linear(dim, patch_size * patch_size * out_channels)
        nn.init.zeros_(self.linear.weight)                       # adaLN-Zero: the network outputs 0 at init
        nn.init.zeros_(self.linear.bias)

    def forward(self, x, c):
        shift, scale = self.ada(c)
        return self.linear(self.ada.modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=3, hidden_size=384, depth=12, num_heads=6,
                 mlp_ratio=4.0, num_classes=0, class_dropout=0.0, two_times=False, extra_cond=False,
                 time_scale=1000.0, adanorm="zero", dropout=0.0):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.in_channels, self.patch_size, self.input_size = in_channels, patch_size, input_size
        self.num_classes = num_classes
        self.grid = input_size // patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        self.cond = Conditioner(hidden_size, num_classes, class_dropout, two_times, extra_cond, time_scale)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, dropout, adanorm) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, adanorm)
        w = self.x_embedder.weight.data                            # patch embedding initialised like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for block in self.blocks:
            for lin in (block.attn.qkv, block.attn.proj, block.mlp[0], block.mlp[3]):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)

    @property
    def null_label(self):
        return self.num_classes

    def unpatchify(self, x):
        B, p, C, g = x.shape[0], self.patch_size, self.in_channels, self.grid
        x = x.reshape(B, g, g, p, p, C)                            # (B, gh, gw, p, p, C)
        x = torch.einsum("bhwpqc->bchpwq", x)                      # (B, C, gh, p, gw, p)
        return x.reshape(B, C, g * p, g * p)                       # (B, C, H, W)

    def forward(self, x, t, s=None, y=None, w=None):
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed   # (B, T, D)
        c = self.cond(t, s, y, w)                                              # (B, D)
        for block in self.blocks:
            h = block(h, c)                                                    # (B, T, D)
        h = self.final_layer(h, c)                                             # (B, T, p*p*C)
        return self.unpatchify(h)                                              # (B, C, H, W)


# DiT-T/2 is ours (tests and CPU runs); the others are Table 1 of the DiT paper.
DiT_models = {
    "DiT-T/2": dict(depth=4, hidden_size=128, patch_size=2, num_heads=4),
    "DiT-S/2": dict(depth=12, hidden_size=384, patch_size=2, num_heads=6),
    "DiT-B/2": dict(depth=12, hidden_size=768, patch_size=2, num_heads=12),
    "DiT-L/2": dict(depth=24, hidden_size=1024, patch_size=2, num_heads=16),
    "DiT-XL/2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
}


# ----------------------------------------------------------------------------------------------
# Toy MLP

class MLP(nn.Module):
    """Residual MLP for low-dimensional data with the DiT's call signature and conditioning."""

    def __init__(self, dim=2, hidden_size=128, depth=3, num_classes=0, class_dropout=0.0, two_times=False,
                 extra_cond=False, time_scale=1000.0, dropout=0.0, **_unused):
        super().__init__()
        self.num_classes = num_classes
        self.inp = Linear(dim, hidden_size)
        self.cond = Conditioner(hidden_size, num_classes, class_dropout, two_times, extra_cond, time_scale)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(norm=LayerNorm(hidden_size), fc1=Linear(hidden_size, hidden_size),
                               cproj=Linear(hidden_size, hidden_size), fc2=Linear(hidden_size, hidden_size)))
            for _ in range(depth))
        self.drop = nn.Dropout(dropout)
        self.out = Linear(hidden_size, dim)
        nn.init.zeros_(self.out.weight)                            # start at F = 0, like the DiT
        nn.init.zeros_(self.out.bias)

    @property
    def null_label(self):
        return self.num_classes

    def forward(self, x, t, s=None, y=None, w=None):
        c = self.cond(t, s, y, w)                                   # (B, D)
        h = self.inp(x)                                             # (B, D)
        for b in self.blocks:
            u = F.silu(b["fc1"](b["norm"](h)) + b["cproj"](F.silu(c)))
            h = h + b["fc2"](self.drop(u))
        return self.out(F.silu(h))                                  # (B, dim)


# ----------------------------------------------------------------------------------------------
# Construction and loading

def build_model(name, data_shape, **kwargs):
    """`name` is a DiT_models key or "MLP"; data_shape is (C, H, W) for images or (dim,) for toy data.
    kwargs go to the constructor and override the registry entry (tests shrink widths this way)."""
    if name == "MLP":
        if len(data_shape) != 1:
            raise ValueError(f"the MLP backbone takes vectors, not data of shape {tuple(data_shape)}")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("adanorm",)}
        return MLP(dim=data_shape[0], **kwargs)
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(list(DiT_models) + ['MLP'])}")
    if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
        raise ValueError(f"the DiT takes square images (C, H, H), not data of shape {tuple(data_shape)}")
    C, H, _ = data_shape
    return DiT(input_size=H, in_channels=C, **{**DiT_models[name], **kwargs})


# Parameters a checkpoint may lack: embedders of inputs it was trained without. They start at zero,
# which is why loading leaves the function unchanged.
_OPTIONAL_PREFIXES = ("cond.s_embedder.", "cond.w_embedder.")


def load_backbone(model, state_dict):
    """Load weights, allowing a one-time checkpoint into a model with the extra s/w inputs.

    Any other missing or unexpected key, or a shape mismatch, raises ValueError naming it."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.startswith(_OPTIONAL_PREFIXES)]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in state_dict if k in own and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if keys]
        raise ValueError("checkpoint does not fit this model (" + "; ".join(parts) + ")")
    model.load_state_dict(state_dict, strict=False)
