"""The model's layers for the GPU: fused Triton kernels for residual-add + RMSNorm (adding the split-K partial sums of
o_proj / down_proj), RoPE (q, k and v of the fused qkv partial sums in one launch, k/v stored into the paged pool) and
SiLU-mul, and `prepare_gpu_model`, which turns a loaded Transformer into its GPU form in place.

Same math as model.py (module names kept, so `Transformer.forward` runs unchanged); each kernel computes in fp32 and
rounds once, where the PyTorch version rounds after each bf16 op (with fp32 activations those roundings are no-ops).
`*_reference` beside each kernel is that PyTorch op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import triton  # CUDA path only (see gpu_linear.py)
import triton.language as tl

from . import gpu_matvec as matvec
from .gpu_linear import QuantLinear
from .model import MLP, Attention, DecoderLayer, RMSNorm, Transformer, apply_rope
from .quants import INT4_GROUP_TYPES, QuantizedTensor

QUANTS = {"bf16": None, "q4g128": (4, 128), "q4g32": (4, 32), "q8": (8, 32)}


@triton.jit
def _add_rmsnorm_kernel(x_ptr, p_ptr, w_ptr, h_ptr, y_ptr, N, stride_x, eps,
                        BLOCK: tl.constexpr, HAS_P: tl.constexpr, ZERO: tl.constexpr, NORM: tl.constexpr,
                        PDL: tl.constexpr):
    # row of x (+ the row of p (M, N), stored as h; ZERO: p is an accumulator, zeroed) -> y = RMSNorm(row) * w
    matvec.pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_P:
        x += tl.load(p_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
        if ZERO:
            # the load (laid out like x: 8 bf16 a thread) and this store (4 fp32 a thread) map elements to different
            # threads and warps: without the barrier a warp may zero partial sums another warp has not read yet
            tl.debug_barrier()
            tl.store(p_ptr + row * N + offs, tl.zeros((BLOCK,), tl.float32), mask=mask)
        x = x.to(h_ptr.dtype.element_ty)  # the residual stream, rounded as the bf16 add rounds it
        tl.store(h_ptr + row * N + offs, x, mask=mask)
        x = x.to(tl.float32)
    if NORM:
        xn = (x * tl.rsqrt(tl.sum(x * x, 0) / N + eps)).to(y_ptr.dtype.element_ty)  # rounded as HF rounds it
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        tl.store(y_ptr + row * N + offs, (w.to(tl.float32) * xn.to(tl.float32)).to(y_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, I, stride_x, stride_y, BLOCK: tl.constexpr, ZERO: tl.constexpr,
                     PDL: tl.constexpr):
    # x (M, 2I) = gate | up (ZERO: an accumulator, zeroed as read) -> y (M, I) = silu(gate) * up
    matvec.pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    if ZERO:
        tl.debug_barrier()  # every thread has read its partial sums before any are zeroed (see _add_rmsnorm_kernel)
        tl.store(x_ptr + row * stride_x + offs, tl.zeros((BLOCK,), tl.float32), mask=mask)
        tl.store(x_ptr + row * stride_x + I + offs, tl.zeros((BLOCK,), tl.float32), mask=mask)
        g = g.to(y_ptr.dtype.element_ty).to(tl.float32)  # the projection's output, rounded as it is unfused
        u = u.to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (g * tl.sigmoid(g) * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, slot_ptr, stride_x, stride_c,
                 H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, POOL: tl.constexpr, ZERO: tl.constexpr,
                 PDL: tl.constexpr):
    # token t, head h of x (T, (H + 2 KV) D) q|k|v (ZERO: an accumulator, zeroed as read): q heads -> q (T, H, D)
    # rotated; k heads rotated and v heads -> (T, KV, D), or with POOL straight into the pool at slots[t] (-1: nowhere)
    matvec.pdl_start(PDL)
    t, h = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, D // 2)
    src = x_ptr + t * stride_x + h * D
    x1 = tl.load(src + d).to(tl.float32)
    x2 = tl.load(src + D // 2 + d).to(tl.float32)
    if ZERO:
        tl.debug_barrier()  # every thread has read its partial sums before any are zeroed (see _add_rmsnorm_kernel)
        tl.store(src + d, tl.zeros((D // 2,), tl.float32))
        tl.store(src + D // 2 + d, tl.zeros((D // 2,), tl.float32))
    x1 = x1.to(q_ptr.dtype.element_ty).to(tl.float32)  # the projection's output, rounded as it is unfused
    x2 = x2.to(q_ptr.dtype.element_ty).to(tl.float32)
    ok = t >= 0
    if h < H + KV:
        c = tl.load(cos_ptr + t * stride_c + d).to(tl.float32)
        sn = tl.load(sin_ptr + t * stride_c + d).to(tl.float32)
        x1, x2 = x1 * c - x2 * sn, x2 * c + x1 * sn
    if h < H:
        dst = q_ptr + (t * H + h) * D
    else:
        hk = (h - H) % KV
        row = t
        if POOL:
            row = tl.load(slot_ptr + t)
            ok = row >= 0
        if h < H + KV:
            dst = k_ptr + (row.to(tl.int64) * KV + hk) * D
        else:
            dst = v_ptr + (row.to(tl.int64) * KV + hk) * D
    tl.store(dst + d, x1.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + D // 2 + d, x2.to(q_ptr.dtype.element_ty), mask=ok)


def add_norm(x: torch.Tensor, p: torch.Tensor | None, weight: torch.Tensor | None, eps: float = 0.0):
    """x (..., N) [+ p (M, N), a product or an accumulator (zeroed)] -> (h = x + p, RMSNorm(h) * weight); h is x
    when p is None, the norm is skipped (None) when weight is None."""
    x2 = x.reshape(-1, x.shape[-1])
    M, N = x2.shape
    h = torch.empty(M, N, dtype=x.dtype, device=x.device) if p is not None else x2
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if weight is not None else None
    _add_rmsnorm_kernel[(M,)](x2, p if p is not None else x2, weight if weight is not None else x2, h,
                              y if y is not None else h, N, x2.stride(0), eps, BLOCK=triton.next_power_of_2(N),
                              HAS_P=p is not None, ZERO=p is not None and matvec.pending(p), NORM=weight is not None,
                              PDL=matvec.pdl(x.device), launch_pdl=matvec.pdl(x.device),
                              num_warps=4 if N <= 4096 else 8)
    return h.view(x.shape), (y.view(x.shape) if y is not None else None)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return add_norm(x, None, weight, eps)[1]


def silu_mul(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (..., 2I) gate | up, a product or a split-K accumulator (zeroed) -> silu(gate) * up (..., I) in dtype
    (default x's)."""
    x2 = x.reshape(-1, x.shape[-1])
    M, I = x2.shape[0], x2.shape[1] // 2
    y = torch.empty(M, I, dtype=dtype or x.dtype, device=x.device)
    _silu_mul_kernel[(M, triton.cdiv(I, 1024))](x2, y, I, x2.stride(0), y.stride(0), BLOCK=1024,
                                                ZERO=matvec.pending(x2), PDL=matvec.pdl(x.device),
                                                launch_pdl=matvec.pdl(x.device), num_warps=4)
    return y.view(*x.shape[:-1], I)


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, H: int, KV: int, D: int, pool=None):
    """qkv (B, T, (H + 2 KV) D), a product or an accumulator (zeroed); cos/sin (B, 1, T, D) -> q (B, T, H, D) rotated,
    k (B, T, KV, D) rotated, v (B, T, KV, D). pool = (k_pool, v_pool, slots (B T,)): k and v go there instead (None)."""
    B, T, C = qkv.shape
    x = qkv.reshape(B * T, C)
    c, s = cos.reshape(B * T, D), sin.reshape(B * T, D)
    q = torch.empty(B, T, H, D, dtype=cos.dtype, device=qkv.device)
    if pool is None:
        k = torch.empty(B, T, KV, D, dtype=cos.dtype, device=qkv.device)
        v, slots = torch.empty_like(k), q  # slots unread
    else:
        k, v, slots = pool
    _rope_kernel[(B * T, H + 2 * KV)](x, c, s, q, k, v, slots, x.stride(0), c.stride(0), H=H, KV=KV, D=D,
                                      POOL=pool is not None, ZERO=matvec.pending(qkv), PDL=matvec.pdl(qkv.device),
                                      launch_pdl=matvec.pdl(qkv.device), num_warps=1)
    return (q, k, v) if pool is None else (q, None, None)


def rope_qkv_reference(qkv, cos, sin, H, KV, D):
    B, T, _ = qkv.shape
    q, k, v = qkv.split([H * D, KV * D, KV * D], dim=-1)
    q = apply_rope(q.view(B, T, H, D).transpose(1, 2).float(), cos.float(), sin.float()).transpose(1, 2)
    k = apply_rope(k.view(B, T, KV, D).transpose(1, 2).float(), cos.float(), sin.float()).transpose(1, 2)
    return q, k, v.reshape(B, T, KV, D)


def silu_mul_reference(x: torch.Tensor) -> torch.Tensor:
    g, u = x.float().chunk(2, dim=-1)
    return F.silu(g) * u


class GPURMSNorm(nn.Module):
    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x):
        return rmsnorm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, p: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h = x + p, RMSNorm(h)) in one launch; p a product or a split-K accumulator."""
        return add_norm(x, p, self.weight, self.eps)


def product(mod: nn.Module, x: torch.Tensor, glu: bool = False, split: bool = True) -> torch.Tensor:
    """x (M, K) -> mod(x) (M, N), or a split-K accumulator that its reader zeroes (QuantLinear.partials);
    glu: x is gate | up (M, 2K) and the input is silu(gate) * up."""
    if isinstance(mod, QuantLinear):
        return mod.product(x, glu, split=split)
    return mod(silu_mul(x) if glu else x)


class GPUAttention(nn.Module):
    """Attention: the fused qkv product's partial sums -> one RoPE launch (which also stores k/v into a paged pool
    when the KV view offers it) -> the view's attend -> o_proj's partial sums (added by the next norm)."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = attn.layer, attn.n_heads, attn.n_kv, attn.head_dim
        self.window, self.qkv_proj, self.o_proj = attn.window, attn.qkv_proj, attn.o_proj

    def forward(self, x, cos, sin, kv):
        B, T, C = x.shape
        p = product(self.qkv_proj, x.reshape(B * T, C))
        pool = kv.store_targets(self.layer) if hasattr(kv, "store_targets") else None
        q, k, v = rope_qkv(p.view(B, T, -1), cos, sin, self.n_heads, self.n_kv, self.head_dim, pool)
        t = lambda a: a.transpose(1, 2) if a is not None else None
        out = kv.attend(self.layer, t(q), t(k), t(v), self.window)  # (B, H, T, D)
        return product(self.o_proj, out.transpose(1, 2).reshape(B * T, self.n_heads * self.head_dim))


class GPUMLP(nn.Module):
    def __init__(self, mlp: MLP):
        super().__init__()
        self.gate_up_proj, self.down_proj = mlp.gate_up_proj, mlp.down_proj

    def forward(self, x):
        # x (B, T, C) -> down_proj's output (M, C); up to GLU_ROWS rows silu(gate) * up is computed as down_proj
        # loads gate | up (which is then unsplit), else by silu_mul, which also reads and zeroes a split-K accumulator
        x = x.reshape(-1, x.shape[-1])
        glu = x.shape[0] <= matvec.GLU_ROWS
        gu = product(self.gate_up_proj, x, split=not glu)
        if glu:
            return product(self.down_proj, gu, glu=True)
        return product(self.down_proj, silu_mul(gu, x.dtype))


class GPUDecoderLayer(nn.Module):
    """DecoderLayer whose skip additions ride in the norms: a layer passes on (hidden, down_proj's output, maybe a
    split-K accumulator) and the next layer's input norm adds them (the last layer adds them itself); o_proj's output
    likewise goes to the second norm."""

    def __init__(self, layer: DecoderLayer, last: bool):
        super().__init__()
        self.input_layernorm = GPURMSNorm(layer.input_layernorm)
        self.self_attn = GPUAttention(layer.self_attn)
        self.post_attention_layernorm = GPURMSNorm(layer.post_attention_layernorm)
        self.mlp = GPUMLP(layer.mlp)
        self.last = last

    def forward(self, x, cos, sin, kv):
        # x: hidden (B, T, C), or (hidden, the previous layer's down_proj output)
        h, y = self.input_layernorm.add(*(x if isinstance(x, tuple) else (x, None)))
        h, y = self.post_attention_layernorm.add(h, self.self_attn(y, cos, sin, kv))
        p = self.mlp(y)
        return add_norm(h, p, None)[0] if self.last else (h, p)


def _swap_linears(model: nn.Module, packed: dict[str, QuantizedTensor], quant: tuple[int, int] | None) -> int:
    """GGUF Q4_0/Q4_1/Q4_K/Q8_0 weights repacked exactly; with `quant`, every other linear rounded to it; else dense."""
    from gguf import GGMLQuantizationType as T

    n = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        qt = packed.get(f"{name}.weight")
        if qt is not None and (qt.qtype in INT4_GROUP_TYPES or qt.qtype == T.Q8_0):
            new = QuantLinear.from_gguf(qt, module.bias, device=module.weight.device)
        elif quant is not None:
            new = QuantLinear.quantize(module.weight.data, *quant, bias=module.bias)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        del module
        n += 1
    return n


@torch.no_grad()
def prepare_gpu_model(model: Transformer, packed: dict[str, QuantizedTensor] | None = None,
                      quant: str | None = None, device: str | torch.device = "cuda",
                      dtype: torch.dtype = torch.bfloat16) -> int:
    """In place: `dtype` (bf16, or fp32) on the current CUDA device, fused qkv / gate-up, quantized linears (GGUF
    4/8-bit repacked; `quant` one of QUANTS rounds the rest), Triton norms / RoPE / SiLU-mul. Returns how many linears
    are quantized."""
    assert dtype in (torch.bfloat16, torch.float32), dtype  # the activation types the kernels are written for
    packed = dict(packed or {})
    inv_freq = model.inv_freq.float()
    model.to(device=device, dtype=dtype)
    model.inv_freq = inv_freq.to(device)
    model.fuse_projections(packed)
    n = _swap_linears(model, packed, QUANTS[quant] if quant else None)
    body = model.model
    for i, layer in enumerate(body.layers):
        body.layers[i] = GPUDecoderLayer(layer, last=i == len(body.layers) - 1)
    body.norm = GPURMSNorm(body.norm)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return n
