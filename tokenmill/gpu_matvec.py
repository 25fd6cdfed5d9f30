"""The decode kernels of `QuantLinear` (gpu_linear.py's layout): up to 64 rows, one fused dequantize-and-multiply pass
over the weights, split over K so that every shape launches several programs per SM.

Each program takes BN columns and a contiguous run of `per` spans of 256 K and adds its fp32 partial sums atomically
into a persistent zeroed accumulator, which the consumer reads and zeroes (gpu_layers.py: RoPE, residual + RMSNorm),
so a split costs no extra launch. With one split the kernel writes the finished product in the output's dtype.
One row: fp32 FMA, q' = 128 + q read from the mantissa (no int-to-float conversion), sum(q' x) per group scaled once
by the group's scale and corrected by (zero - 128 scale) * sum(x). More rows: tensor cores, each group's partial
product scaled after its last sub-tile. `GLU`: x is gate | up (M, 2K) and the kernel multiplies by silu(gate) * up,
computed as it loads (down_proj without a SiLU launch; used up to GLU_ROWS rows, where it measured faster).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .gpu_matvec_table import GLU_ROWS, TABLE  # noqa: F401 (GLU_ROWS read by gpu_layers as matvec.GLU_ROWS)

SPAN = 256
# tensor-core operand type; fp32 under TRITON_INTERPRET=1 (the CPU interpreter mishandles bf16 conversions)
INTERP = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
DOT_T = tl.constexpr(tl.float32 if INTERP else tl.bfloat16)


@triton.jit
def _nibble_f32(p, j: tl.constexpr):
    # nibble j of each word as fp32 128 + q, exactly: q lands in mantissa bits 16-19 under 128's exponent
    if j <= 4:
        b = (p << (16 - 4 * j)) & 0xF0000
    else:
        b = (p >> (4 * j - 16)) & 0xF0000
    return (b | 0x43000000).to(tl.float32, bitcast=True)


@triton.jit
def _nibble_dot(p, j: tl.constexpr):
    # nibble j as a tensor-core operand 128 + q: bf16 0x4300 is 128 and its last mantissa bits count ones
    if INTERP:
        return _nibble_f32(p, j)
    else:
        return (((p >> (4 * j)) & 15) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _field_dot(p, shift):
    # the nibble at bit `shift` (a tensor of shifts) as a tensor-core operand 128 + q (see _nibble_dot)
    if INTERP:
        return ((((p >> shift) & 15) << 16) | 0x43000000).to(tl.float32, bitcast=True)
    else:
        return (((p >> shift) & 15) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _load_x(ptr, k, mask, K, GLU: tl.constexpr):
    # x[k] in fp32; with GLU, silu(x[k]) * x[K + k] (gate | up)
    x = tl.load(ptr + k, mask=mask, other=0.0).to(tl.float32)
    if GLU:
        x = x * tl.sigmoid(x) * tl.load(ptr + K + k, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _gemv_w4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, Kp, spans, per,
                    GROUP: tl.constexpr, BN: tl.constexpr, U: tl.constexpr, GLU: tl.constexpr,
                    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    # one row; columns [BN pid_n, +BN), spans [per pid_k, +per); (BN, 32) lanes summed once at the end
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_i = tl.arange(0, 32)
    n_mask = offs_n < N
    SUBS: tl.constexpr = GROUP // 32
    s_lo = pid_k * per
    s_hi = tl.minimum(s_lo + per, spans)
    acc = tl.zeros((BN, 32), tl.float32)
    for s0 in range(s_lo, s_hi, U):
        for u in tl.static_range(U):
            s = s0 + u
            live = n_mask & (s < s_hi)
            p = tl.load(w_ptr + offs_n[:, None] * (Kp // 8) + (s * 32 + offs_i)[None, :], mask=live[:, None], other=0)
            for j in tl.static_range(8):
                k = s * 256 + j * 32 + offs_i
                x = _load_x(x_ptr, k, k < K, K, GLU)
                if j % SUBS == 0:
                    part = _nibble_f32(p, j) * x[None, :]
                    xs = x
                else:
                    part += _nibble_f32(p, j) * x[None, :]
                    xs += x
                if (j + 1) % SUBS == 0:  # the group ends: q' x scaled, (zero - 128 scale) * sum(x) added
                    g = (s * 256 + j * 32) // GROUP
                    sc = tl.load(s_ptr + g * N + offs_n, mask=live, other=0.0).to(tl.float32)
                    zp = tl.load(z_ptr + g * N + offs_n, mask=live, other=0.0).to(tl.float32) - 128.0 * sc
                    acc += part * sc[:, None] + zp[:, None] * xs[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask & (pid_k == 0), other=0.0).to(tl.float32)
    if ATOMIC:
        tl.atomic_add(y_ptr + offs_n, y, mask=n_mask, sem="relaxed")
    else:
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _mm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, Kp, spans, per, stride_xm,
               BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
               GLU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr, ATOMIC: tl.constexpr):
    # rows [BM pid_m, +BM) x columns [BN pid_n, +BN), spans [per pid_k, +per). DOT 0: FMA; 1: tensor cores per
    # 32-wide sub-tile; 2 (4-bit): one product per group, its (GROUP, BN) operand gathered from the span's words
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_i = tl.arange(0, 32)
    n_mask, m_mask = offs_n < N, offs_m < M
    SUBS: tl.constexpr = GROUP // 32
    MAGIC: tl.constexpr = 128.0 if BITS == 4 and DOT > 0 else 0.0  # the offset _nibble_dot adds, taken off via zero
    acc = tl.zeros((BM, BN), tl.float32)
    part = tl.zeros((BM, BN), tl.float32)
    xs = tl.zeros((BM,), tl.float32)
    xrows = x_ptr + offs_m[:, None] * stride_xm
    s_lo = pid_k * per
    for s in range(s_lo, tl.minimum(s_lo + per, spans)):
        if DOT == 2:
            for h in tl.static_range(256 // GROUP):
                c = h * GROUP + tl.arange(0, GROUP)  # K within the span: word c % 32, nibble c // 32
                pw = tl.load(w_ptr + offs_n[None, :] * (Kp // 8) + (s * 32 + c % 32)[:, None], mask=n_mask[None, :],
                             other=0)
                k = s * 256 + c
                x = _load_x(xrows, k[None, :], m_mask[:, None] & (k < K)[None, :], K, GLU)
                part = tl.dot(x.to(DOT_T), _field_dot(pw, (4 * (c // 32))[:, None]).to(DOT_T))
                g = s * (256 // GROUP) + h
                sc = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                z = -128.0 * sc
                if HAS_ZERO:
                    z += tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                acc += part * sc[None, :] + tl.sum(x, axis=1)[:, None] * z[None, :]
        else:
            if BITS == 4:  # (32, BN) words, each holding this span's 8 sub-tiles
                p = tl.load(w_ptr + offs_n[None, :] * (Kp // 8) + (s * 32 + offs_i)[:, None], mask=n_mask[None, :],
                            other=0)
            for j in tl.static_range(8):
                k = s * 256 + j * 32 + offs_i
                x = _load_x(xrows, k[None, :], m_mask[:, None] & (k < K)[None, :], K, GLU)
                if BITS == 4:
                    if DOT > 0:
                        q = _nibble_dot(p, j)
                    else:
                        q = (p >> (4 * j)) & 15
                else:
                    q = tl.load(w_ptr + offs_n[None, :] * Kp + k[:, None], mask=n_mask[None, :], other=0)
                if DOT > 0:
                    part += tl.dot(x.to(DOT_T), q.to(DOT_T))
                else:
                    part += tl.sum(x[:, :, None] * q.to(tl.float32)[None, :, :], axis=1)
                if HAS_ZERO:
                    xs += tl.sum(x, axis=1)
                if (j + 1) % SUBS == 0:  # the group ends: scale its partial product, add zero * sum(x)
                    g = (s * 256 + j * 32) // GROUP
                    sc = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                    acc += part * sc[None, :]
                    part = tl.zeros((BM, BN), tl.float32)
                    if HAS_ZERO:
                        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32) - MAGIC * sc
                        acc += xs[:, None] * z[None, :]
                        xs = tl.zeros((BM,), tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask & (pid_k == 0), other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask, sem="relaxed")
    else:
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def config(m: int, n: int, kp: int, bits: int, group: int, sms: int = 132, table: dict | None = None) -> tuple:
    """Launch config for m rows, n columns, padded K kp: ("gemv", BN, U, warps, splits) for one 4-bit row, else
    ("mm", BM, BN, DOT (see _mm_kernel), warps, splits). Measured configs (gpu_matvec_table.py) first, else a rule."""
    table = TABLE if table is None else table
    for mb in (b for b in ROW_BUCKETS if b >= m):  # the nearest measured row count at or above m
        if (mb, n, kp, bits, group) in table:
            return table[mb, n, kp, bits, group]
    if m == 1 and bits == 4:
        kind = ("gemv", 16, 4, 2)
    elif m == 1:
        kind = ("mm", 1, 16, 0, 1)
    else:
        kind = ("mm", 16 if m <= 16 else (32 if m <= 32 or bits == 8 else 64), 64 if n >= 8192 else 32, 1, 4)
    tiles = -(-n // kind[1 if kind[0] == "gemv" else 2]) * (1 if kind[0] == "gemv" else -(-m // kind[1]))
    # about 4 programs per SM, each streaming at least 2 spans
    return (*kind, max(1, min(kp // SPAN // 2, -(-4 * sms // tiles))))


_ACCUMULATORS: dict[tuple, torch.Tensor] = {}


def accumulator(rows: int, n: int, device) -> torch.Tensor:
    """(rows, n) fp32 of a persistent zeroed (64, n) buffer that split-K programs add into. Its reader zeroes what it
    read (gpu_layers' norm and RoPE kernels, `QuantLinear.forward`), so it is zero again for the next product; n
    columns share one buffer, so two products of equal n must not be pending at once (a layer never does that)."""
    buf = _ACCUMULATORS.get((device, n))
    if buf is None:
        buf = _ACCUMULATORS[device, n] = torch.zeros(64, n, dtype=torch.float32, device=device)
    return buf[:rows]


def pending(y: torch.Tensor) -> bool:
    """Whether y is an accumulator (its reader must zero it) rather than a finished product."""
    return y.dtype == torch.float32 and any(y.data_ptr() == b.data_ptr() for b in _ACCUMULATORS.values())


def launch(x, qweight, scales, zeros, bias, bits: int, group: int, K: int, cfg: tuple, glu: bool, out_dtype):
    """x (M, K) (or (M, 2K) with glu), contiguous rows -> (M, N): the product in out_dtype with one split; with more,
    the fp32 accumulator the splits added into, which its reader must zero (see `accumulator`)."""
    M, N = x.shape[0], qweight.shape[0]
    Kp = qweight.shape[1] * (8 if bits == 4 else 1)
    spans = Kp // SPAN
    kind, *c = cfg
    per = -(-spans // c[-1])
    splits = -(-spans // per)  # none empty
    atomic = splits > 1
    y = accumulator(M, N, x.device) if atomic else torch.empty(M, N, dtype=out_dtype, device=x.device)
    z = zeros if zeros is not None else scales
    b = bias if bias is not None else scales
    if kind == "gemv":
        bn, u, warps, _ = c
        _gemv_w4_kernel[(triton.cdiv(N, bn), splits)](x, qweight, scales, z, b, y, N, K, Kp, spans, per, GROUP=group,
                                                      BN=bn, U=u, GLU=glu, HAS_BIAS=bias is not None,
                                                      ATOMIC=atomic, num_warps=warps)
        return y
    bm, bn, dot, warps, _ = c
    _mm_kernel[(triton.cdiv(N, bn), triton.cdiv(M, bm), splits)](
        x, qweight, scales, z, b, y, M, N, K, Kp, spans, per, x.stride(0), BITS=bits, GROUP=group,
        HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None, GLU=glu, BM=bm, BN=bn, DOT=int(dot), ATOMIC=atomic,
        num_warps=warps)
    return y
