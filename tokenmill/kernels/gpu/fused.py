"""Fused Triton kernels of the GPU layers: residual-add + RMSNorm (adding the split-K partial sums of o_proj /
down_proj), RoPE (q, k and v of the fused qkv partial sums in one launch, k/v stored into the paged pool) and SiLU-mul.

Same math as the PyTorch layers (model/transformer.py); each kernel computes in fp32 and rounds once, where the PyTorch
version rounds after each bf16 op (with fp32 activations those roundings are no-ops). `*_reference` beside each kernel
is that PyTorch op. model/gpu.py builds the GPU layers from them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import triton  # CUDA path only (see gpu_linear.py)
import triton.language as tl

from tokenmill.kernels.gpu import matvec as matvec
from tokenmill.model.transformer import apply_rope

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


def add_norm(x: torch.Tensor, p: torch.Tensor | None, weight: torch.Tensor | None, eps: float = 0.0,
             pdl: bool = False):
    """x (..., N) [+ p (M, N), a product or an accumulator (zeroed)] -> (h = x + p, RMSNorm(h) * weight); h is x
    when p is None, the norm is skipped (None) when weight is None. pdl: launch with programmatic dependent launch."""
    x2 = x.reshape(-1, x.shape[-1])
    M, N = x2.shape
    h = torch.empty(M, N, dtype=x.dtype, device=x.device) if p is not None else x2
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if weight is not None else None
    _add_rmsnorm_kernel[(M,)](x2, p if p is not None else x2, weight if weight is not None else x2, h,
                              y if y is not None else h, N, x2.stride(0), eps, BLOCK=triton.next_power_of_2(N),
                              HAS_P=p is not None, ZERO=p is not None and matvec.pending(p), NORM=weight is not None,
                              PDL=pdl, launch_pdl=pdl, num_warps=4 if N <= 4096 else 8)
    return h.view(x.shape), (y.view(x.shape) if y is not None else None)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, pdl: bool = False) -> torch.Tensor:
    return add_norm(x, None, weight, eps, pdl)[1]


def silu_mul(x: torch.Tensor, dtype: torch.dtype | None = None, pdl: bool = False) -> torch.Tensor:
    """x (..., 2I) gate | up, a product or a split-K accumulator (zeroed) -> silu(gate) * up (..., I) in dtype
    (default x's)."""
    x2 = x.reshape(-1, x.shape[-1])
    M, I = x2.shape[0], x2.shape[1] // 2
    y = torch.empty(M, I, dtype=dtype or x.dtype, device=x.device)
    _silu_mul_kernel[(M, triton.cdiv(I, 1024))](x2, y, I, x2.stride(0), y.stride(0), BLOCK=1024,
                                                ZERO=matvec.pending(x2), PDL=pdl, launch_pdl=pdl, num_warps=4)
    return y.view(*x.shape[:-1], I)


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, H: int, KV: int, D: int, pool=None,
             pdl: bool = False):
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
                                      POOL=pool is not None, ZERO=matvec.pending(qkv), PDL=pdl, launch_pdl=pdl,
                                      num_warps=1)
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
