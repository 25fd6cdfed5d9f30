"""The decode kernels of `QuantLinear` (quant_linear.py's layout): up to 64 rows, one fused dequantize-and-multiply pass
over the weights, split over K so that every shape launches several programs per SM.

Each program takes BN columns and a contiguous run of `per` spans of 256 K and adds its fp32 partial sums atomically
into a persistent zeroed accumulator, which the consumer reads and zeroes (fused.py: RoPE, residual + RMSNorm,
SiLU-mul), so a split costs no extra launch. With one split the kernel writes the finished product in the output's
dtype.
One 4-bit row, bf16 x (`_gemv_w4h_kernel`): packed fp16 pair math in inline PTX, two nibbles per instruction (see
`_UNPACK8`), each thread's x converted once and shared by its columns; "gemvs" runs it as a stream (r programs per SM,
equal runs of the column tiles x spans units, no partial last wave), "gemvh" on the split grid. Otherwise one row
(fp32 x, padded K, GLU): `_gemv_w4_kernel`, fp32 FMA with q' = 128 + q read from the mantissa. More rows: tensor
cores, each group's partial product scaled after its last sub-tile. `GLU`: x is gate | up (M, 2K) and the kernel
multiplies by silu(gate) * up as it loads (down_proj without a SiLU launch; used up to GLU_ROWS rows). The decode
path launches with programmatic dependent launch (`pdl`, chosen at load).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from tokenmill.kernels.gpu.matvec_table import TABLE

SPAN = 256
# tensor-core operand type; fp32 under TRITON_INTERPRET=1 (the CPU interpreter mishandles bf16 conversions)
INTERP = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
DOT_T = tl.constexpr(tl.float32 if INTERP else tl.bfloat16)
# Programmatic dependent launch (Hopper and later; chosen at load, `tokenmill.load(pdl=...)`, and passed to each launch
# as `pdl`): a kernel so launched may start while the one before it in the stream still runs, and reads nothing that
# one writes before `gdc_wait`. The decode path's small kernels (norms, RoPE, attention, SiLU-mul) wait at once and let
# the next kernel launch at once, so a W4 product's programs load their first weights while the small kernel runs; the
# W4 kernel lets the next launch after its main loop. Kernels launched without it (torch's, the tensor-core ones) keep
# the usual full ordering.


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """Whether programmatic dependent launch works on this device (compute capability 9 or later)."""
    return not INTERP and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def pdl_start(PDL: tl.constexpr):
    # a small kernel's first step: the next kernel may launch; wait until the previous one has finished
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def nibble_f32(p, j: tl.constexpr):
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
        return nibble_f32(p, j)
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
                    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
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
                    part = nibble_f32(p, j) * x[None, :]
                    xs = x
                else:
                    part += nibble_f32(p, j) * x[None, :]
                    xs += x
                if (j + 1) % SUBS == 0:  # the group ends: q' x scaled, (zero - 128 scale) * sum(x) added
                    g = (s * 256 + j * 32) // GROUP
                    sc = tl.load(s_ptr + g * N + offs_n, mask=live, other=0.0).to(tl.float32)
                    zp = -128.0 * sc
                    if HAS_ZERO:
                        zp += tl.load(z_ptr + g * N + offs_n, mask=live, other=0.0).to(tl.float32)
                    acc += part * sc[:, None] + zp[:, None] * xs[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask & (pid_k == 0), other=0.0).to(tl.float32)
    if ATOMIC:
        tl.atomic_add(y_ptr + offs_n, y, mask=n_mask, sem="relaxed")
    else:
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


# Packed half math for one row (`_gemv_w4h_kernel`): PTX on int32 registers holding fp16 pairs (lo = bits 0-15).
# A word's nibbles j and j + 4 share a pair: OR-ing a nibble into fp16 1024.0's mantissa (0x6400) gives 1024 + q (bits
# 0-3) or 1024 + 16 q (bits 4-7) without a conversion; one packed FMA per pair makes that (q - 8) / 16, exact; the
# product with x's pairs is summed in fp16 over the word's 4 pairs (|q - 8| / 16 <= 1/2, so a half holds up to
# 4 * 0.5 * |x|: no overflow below |x| ~ 32k) and returned as two fp32 sums: nibbles 0-3 (lo) and 4-7 (hi), each one
# group (of 128 or 256) scaled after. Groups of 32 (GGUF Q4_0 / Q4_1 / Q4_K): each nibble is its own group, so the
# pairs become the fp16 weights themselves, (q - 8) scale + (zero + 8 scale), before the product (relative error
# 2^-11, below bf16's; a half holds 4 |w| |x|).
_UNPACK8 = """.reg .b32 a, b, c, d, t, m, lo4, hi4, k1, k2, k3, k4, acc;
mov.b32 m, 0x64006400;
mov.b32 lo4, 0x000F000F;
mov.b32 hi4, 0x00F000F0;
lop3.b32 a, $W, lo4, m, 0xEA;
lop3.b32 b, $W, hi4, m, 0xEA;
shr.u32 t, $W, 8;
lop3.b32 c, t, lo4, m, 0xEA;
lop3.b32 d, t, hi4, m, 0xEA;
"""  # the word $W's nibble pairs (0, 4) (1, 5) (2, 6) (3, 7) as 1024 + q in a, c and 1024 + 16 q in b, d


def _pairs_fma(k1: str, k2: str, k3: str, k4: str) -> str:
    # a, c = a, c * k1 + k2; b, d = b, d * k3 + k4 (constant fp16 pairs)
    return (f"mov.b32 k1, {k1};\nmov.b32 k2, {k2};\nmov.b32 k3, {k3};\nmov.b32 k4, {k4};\n"
            + "".join(f"fma.rn.f16x2 {r}, {r}, {m}, {c};\n" for r, m, c in
                      (("a", "k1", "k2"), ("b", "k3", "k4"), ("c", "k1", "k2"), ("d", "k3", "k4"))))


_TO_Q16 = _pairs_fma("0x2C002C00", "0xD408D408", "0x1C001C00", "0xC480C480")  # -> (q - 8) / 16, exact
# -> q - 8 (exact), then the weight (q - 8) scale + (zero + 8 scale) in fp16, each nibble's own group's
_TO_W = _pairs_fma("0x3C003C00", "0xE408E408", "0x2C002C00", "0xD480D480") + "".join(
    f"fma.rn.f16x2 {r}, {r}, $S{g}, $Z{g};\n" for r, g in (("a", "A"), ("b", "B"), ("c", "C"), ("d", "D")))
_DOT4 = """mul.rn.f16x2 acc, a, $XA;
fma.rn.f16x2 acc, b, $XB, acc;
fma.rn.f16x2 acc, c, $XC, acc;
fma.rn.f16x2 acc, d, $XD, acc;
"""  # times x's pairs $XA-$XD, the 4 pairs summed in fp16
_F32_OUT = ".reg .b16 l, h;\nmov.b32 {l, h}, acc;\ncvt.f32.f16 $0, l;\ncvt.f32.f16 $1, h;\n"  # (lo, hi) fp32
_PAIR_OUT = "mov.b32 $0, acc;\n"  # the fp16 pair itself, for a sum over words before one conversion (PRESUM)


def _dot8_asm(convert: str, tail: str) -> tl.constexpr:
    body, outputs = _UNPACK8 + convert + _DOT4 + tail, 2 if tail == _F32_OUT else 1
    names = ("$W", "$XA", "$XB", "$XC", "$XD", "$SA", "$SB", "$SC", "$SD", "$ZA", "$ZB", "$ZC", "$ZD")
    for i, name in enumerate(names):
        body = body.replace(name, f"${outputs + i}")
    return tl.constexpr("{\n" + body + "}")


_DOT8_ASM = _dot8_asm(_TO_Q16, _F32_OUT)  # operands: word, x pairs
_DOT8H_ASM = _dot8_asm(_TO_Q16, _PAIR_OUT)
_DOT8W_ASM = _dot8_asm(_TO_W, _F32_OUT)  # operands: word, x pairs, scale pairs, zero + 8 scale pairs
_DOT8WH_ASM = _dot8_asm(_TO_W, _PAIR_OUT)


@triton.jit
def _add_half2(a, b):
    return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _half2_f32(h):
    # int32 fp16 pair -> (lo, hi) fp32
    return tl.inline_asm_elementwise("{\n.reg .b16 l, h;\nmov.b32 {l, h}, $2;\ncvt.f32.f16 $0, l;\ncvt.f32.f16 $1, h;\n}",
                                     "=f,=f,r", [h], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)



@triton.jit
def _half2(lo, hi):
    # two fp32 tensors -> int32 tensor of fp16 pairs (lo in bits 0-15), rounded to nearest
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _group32_pairs(s_ptr, z_ptr, g, N, offs_n, n_mask, BN: tl.constexpr, HAS_ZERO: tl.constexpr):
    # groups g and g + 4 (nibbles j and j + 4 of a span's words): (scale pair, zero + 8 scale pair) as (BN, 32) int32
    sa = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    sb = tl.load(s_ptr + (g + 4) * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    za, zb = 8.0 * sa, 8.0 * sb
    if HAS_ZERO:
        za += tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zb += tl.load(z_ptr + (g + 4) * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    return (tl.broadcast_to(_half2(sa, sb)[:, None], (BN, 32)), tl.broadcast_to(_half2(za, zb)[:, None], (BN, 32)))


@triton.jit
def _w4h_tile(x_ptr, w_ptr, s_ptr, z_ptr, N, Kw, t, s_lo, s_hi,
              GROUP: tl.constexpr, BN: tl.constexpr, PF: tl.constexpr, HAS_ZERO: tl.constexpr, PDL: tl.constexpr,
              PRESUM: tl.constexpr = 0):
    # (BN,) fp32 partial sums of columns [BN t, +BN) over spans [s_lo, s_hi), one row. Word (s, i)'s nibbles 0-3 are
    # k = 256 s + i + {0, 32, 64, 96} (group (256 s) // GROUP), nibbles 4-7 the same + 128. w = q * scale + zero
    # = (q - 8) / 16 * 16 scale + (zero + 8 scale): the asm sums (q - 8) / 16 * x, the zero term takes the group's
    # sum of x (one reduction over the span's 32 lanes, shared by all columns). Loads are unmasked (columns clamped;
    # their scales load as 0). PF (0-2): the words of the next PF spans are loaded before this span's math, so they
    # stay in flight while it runs (x comes from L1: not needed).
    offs_n = t * BN + tl.arange(0, BN)
    offs_i = tl.arange(0, 32)
    n_mask = offs_n < N
    rows = w_ptr + tl.minimum(offs_n, N - 1)[:, None] * Kw + offs_i[None, :]
    last = tl.maximum(s_hi - 1, s_lo)
    acc = tl.zeros((BN, 32 // PRESUM if PRESUM else 32), tl.float32)
    zacc = tl.zeros((BN,), tl.float32)
    if PF >= 1:
        p = tl.load(rows + s_lo * 32)
    if PF == 2:
        p1 = tl.load(rows + tl.minimum(s_lo + 1, last) * 32)
    if PDL:  # the weights above load while the previous kernel finishes; x and the accumulator are its
        tl.extra.cuda.gdc_wait()
    for s in range(s_lo, s_hi):
        if PF >= 1:
            p_n = tl.load(rows + tl.minimum(s + PF, last) * 32)
        else:
            p = tl.load(rows + s * 32)
        xk = x_ptr + s * 256 + offs_i
        f0, f1 = tl.load(xk).to(tl.float32), tl.load(xk + 32).to(tl.float32)
        f2, f3 = tl.load(xk + 64).to(tl.float32), tl.load(xk + 96).to(tl.float32)
        f4, f5 = tl.load(xk + 128).to(tl.float32), tl.load(xk + 160).to(tl.float32)
        f6, f7 = tl.load(xk + 192).to(tl.float32), tl.load(xk + 224).to(tl.float32)
        xs = [p, tl.broadcast_to(_half2(f0, f4)[None, :], (BN, 32)), tl.broadcast_to(_half2(f1, f5)[None, :], (BN, 32)),
              tl.broadcast_to(_half2(f2, f6)[None, :], (BN, 32)), tl.broadcast_to(_half2(f3, f7)[None, :], (BN, 32))]
        if GROUP == 32:  # nibble j of the span's words is group 8 s + j: the scales go into the fp16 weights
            sa, za = _group32_pairs(s_ptr, z_ptr, s * 8, N, offs_n, n_mask, BN, HAS_ZERO)
            sb, zb = _group32_pairs(s_ptr, z_ptr, s * 8 + 1, N, offs_n, n_mask, BN, HAS_ZERO)
            sc, zc = _group32_pairs(s_ptr, z_ptr, s * 8 + 2, N, offs_n, n_mask, BN, HAS_ZERO)
            sd, zd = _group32_pairs(s_ptr, z_ptr, s * 8 + 3, N, offs_n, n_mask, BN, HAS_ZERO)
            xs = xs + [sa, sb, sc, sd, za, zb, zc, zd]
        if PRESUM:  # PRESUM neighbouring words (same span, so the same groups) summed in fp16, then converted
            if GROUP == 32:
                h = tl.inline_asm_elementwise(_DOT8WH_ASM, "=r" + 13 * ",r", xs, dtype=tl.int32, is_pure=True, pack=1)
            else:
                h = tl.inline_asm_elementwise(_DOT8H_ASM, "=r" + 5 * ",r", xs, dtype=tl.int32, is_pure=True, pack=1)
            lo, hi = _half2_f32(tl.reduce(tl.reshape(h, (BN, 32 // PRESUM, PRESUM)), 2, _add_half2))
        elif GROUP == 32:
            lo, hi = tl.inline_asm_elementwise(_DOT8W_ASM, "=f,=f" + 13 * ",r", xs, dtype=(tl.float32, tl.float32),
                                               is_pure=True, pack=1)
        else:
            lo, hi = tl.inline_asm_elementwise(_DOT8_ASM, "=f,=f" + 5 * ",r", xs, dtype=(tl.float32, tl.float32),
                                               is_pure=True, pack=1)
        if GROUP == 32:
            acc += lo
            acc += hi
        else:
            acc, zacc = _scale_groups(acc, zacc, lo, hi, s, s_ptr, z_ptr, N, offs_n, n_mask, f0 + f1 + f2 + f3,
                                      f4 + f5 + f6 + f7, GROUP, HAS_ZERO)
        if PF == 1:
            p = p_n
        if PF == 2:
            p, p1 = p1, p_n
    return (tl.sum(acc, 1) + zacc) * (1.0 if GROUP == 32 else 16.0)


@triton.jit
def _scale_groups(acc, zacc, lo, hi, s, s_ptr, z_ptr, N, offs_n, n_mask, xa, xb, GROUP: tl.constexpr,
                  HAS_ZERO: tl.constexpr):
    # groups of 128 / 256: span s's two halves (nibbles 0-3: xa, the lanes' x sums; 4-7: xb) scaled into acc; the
    # zero term (zero + 8 scale) / 16 times the group's x sum into zacc
    ga, gb = (s * 256) // GROUP, (s * 256 + 128) // GROUP
    sa = tl.load(s_ptr + ga * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    sb = tl.load(s_ptr + gb * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    acc += lo * sa[:, None]  # two FMAs, not a product, an FMA and an add
    acc += hi * sb[:, None]
    za, zb = 0.5 * sa, 0.5 * sb  # (zero + 8 scale) / 16, so the 16 at the end scales both terms
    if HAS_ZERO:
        za += tl.load(z_ptr + ga * N + offs_n, mask=n_mask, other=0.0).to(tl.float32) * 0.0625
        zb += tl.load(z_ptr + gb * N + offs_n, mask=n_mask, other=0.0).to(tl.float32) * 0.0625
    zacc += za * tl.sum(xa, 0) + zb * tl.sum(xb, 0)
    return acc, zacc


@triton.jit
def _gemv_w4h_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, Kw, spans, per,
                     GROUP: tl.constexpr, BN: tl.constexpr, PF: tl.constexpr, HAS_ZERO: tl.constexpr,
                     HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, STREAM: tl.constexpr, PDL: tl.constexpr,
                     PRESUM: tl.constexpr):
    # one row, K a multiple of 256 (Kw = K / 8 words a row), GROUP 128 or 256 (see _w4h_tile). Grid (tiles, splits):
    # columns [BN pid, +BN), spans [per pid_k, +per). STREAM (always ATOMIC), grid (P,): the tiles x spans units are
    # cut into P equal runs, one a program, each run's pieces of a tile added into y: no partial last wave.
    pid = tl.program_id(0)
    if STREAM:
        units = tl.cdiv(N, BN) * spans
        u0 = (pid * units) // tl.num_programs(0)
        u1 = ((pid + 1) * units) // tl.num_programs(0)
        for t in range(u0 // spans, tl.cdiv(u1, spans)):
            s_lo = tl.maximum(u0, t * spans) - t * spans
            y = _w4h_tile(x_ptr, w_ptr, s_ptr, z_ptr, N, Kw, t, s_lo, tl.minimum(u1, (t + 1) * spans) - t * spans,
                          GROUP, BN, PF, HAS_ZERO, PDL, PRESUM)
            if PDL:
                tl.extra.cuda.gdc_launch_dependents()
            offs_n = t * BN + tl.arange(0, BN)
            if HAS_BIAS:
                y += tl.load(b_ptr + offs_n, mask=(offs_n < N) & (s_lo == 0), other=0.0).to(tl.float32)
            tl.atomic_add(y_ptr + offs_n, y, mask=offs_n < N, sem="relaxed")
    else:
        s_lo = tl.program_id(1) * per
        y = _w4h_tile(x_ptr, w_ptr, s_ptr, z_ptr, N, Kw, pid, s_lo, tl.minimum(s_lo + per, spans), GROUP, BN, PF,
                      HAS_ZERO, PDL, PRESUM)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        offs_n = pid * BN + tl.arange(0, BN)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=(offs_n < N) & (s_lo == 0), other=0.0).to(tl.float32)
        if ATOMIC:
            tl.atomic_add(y_ptr + offs_n, y, mask=offs_n < N, sem="relaxed")
        else:
            tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _mm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, Kp, spans, per, stride_xm,
               BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
               GLU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr, ATOMIC: tl.constexpr,
               FP32: tl.constexpr):
    # rows [BM pid_m, +BM) x columns [BN pid_n, +BN), spans [per pid_k, +per). DOT 0: FMA; 1: tensor cores per
    # 32-wide sub-tile; 2 (4-bit): one product per group, its (GROUP, BN) operand gathered from the span's words.
    # FP32 (fp32 x): the products in full fp32 ("ieee", no TF32), else on DOT_T operands
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
    # FP32: one stage (fp32 x tiles multi-buffered in shared memory would exceed it at BM 64)
    for s in tl.range(s_lo, tl.minimum(s_lo + per, spans), num_stages=1 if FP32 else None):
        if DOT == 2:
            for h in tl.static_range(256 // GROUP):
                c = h * GROUP + tl.arange(0, GROUP)  # K within the span: word c % 32, nibble c // 32
                pw = tl.load(w_ptr + offs_n[None, :] * (Kp // 8) + (s * 32 + c % 32)[:, None], mask=n_mask[None, :],
                             other=0)
                k = s * 256 + c
                x = _load_x(xrows, k[None, :], m_mask[:, None] & (k < K)[None, :], K, GLU)
                if FP32:
                    part = tl.dot(x, _field_dot(pw, (4 * (c // 32))[:, None]).to(tl.float32), input_precision="ieee")
                else:
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
                if DOT > 0 and FP32:
                    part += tl.dot(x, q.to(tl.float32), input_precision="ieee")
                elif DOT > 0:
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
    """Launch config for m rows, n columns, padded K kp. One 4-bit row: ("gemvs", BN, U, warps, programs per SM
    [, PRESUM]) or ("gemvh", BN, U, warps, splits [, PRESUM]) (the packed-half kernel, see `launch` for where it
    applies) or ("gemv", BN, U, warps, splits); else
    ("mm", BM, BN, DOT (see _mm_kernel), warps, splits). Measured configs (matvec_table.py) first, else a rule."""
    table = TABLE if table is None else table
    for mb in (b for b in ROW_BUCKETS if b >= m):  # the nearest measured row count at or above m
        if (mb, n, kp, bits, group) in table:
            return table[mb, n, kp, bits, group]
    if m == 1 and bits == 4 and group in (32, 128, 256):  # the packed-half kernel (see `launch` for when it applies)
        # the Llama-3-8B sweep's best: a stream of programs, except for a vocabulary-sized head, whose logits are read
        # unsplit; groups of 32 (more per-group work a word) do best with smaller tiles and words summed 4 at a time
        if group == 32:
            return ("gemvh", 32, 2, 4, 1, 4) if n >= 65536 else ("gemvs", 32, 2, 2, 8, 4)
        return ("gemvh", 128, 2, 8, 1, 4) if n >= 65536 else ("gemvs", 64, 2, 4, 4)
    elif m == 1 and bits == 4:
        kind = ("gemv", 16, 4, 2)
    elif m == 1:
        kind = ("mm", 1, 16, 0, 1)
    else:
        kind = ("mm", 16 if m <= 16 else (32 if m <= 32 or bits == 8 else 64), 64 if n >= 8192 else 32, 1, 4)
    one_row = kind[0] == "gemv"
    tiles = -(-n // kind[1 if one_row else 2]) * (1 if one_row else -(-m // kind[1]))
    # about 4 programs per SM, each streaming at least 2 spans
    return (*kind, max(1, min(kp // SPAN // 2, -(-4 * sms // tiles))))


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def unsplit(cfg: tuple) -> tuple:
    """The same tile in one split: a finished product, never the accumulator (the stream kernel's one-split twin)."""
    kind, *c = cfg
    kind = "gemvh" if kind == "gemvs" else kind
    c[3 if kind in ("gemv", "gemvh") else 4] = 1
    return (kind, *c)


_ACCUMULATORS: dict[tuple, torch.Tensor] = {}


def accumulator(rows: int, n: int, device) -> torch.Tensor:
    """(rows, n) fp32 of a persistent zeroed (64, n) buffer that split-K programs add into. Its reader zeroes what it
    read (fused.py's norm and RoPE kernels, `QuantLinear.forward`), so it is zero again for the next product; n
    columns share one buffer, so two products of equal n must not be pending at once (a layer never does that)."""
    buf = _ACCUMULATORS.get((device, n))
    if buf is None:
        buf = _ACCUMULATORS[device, n] = torch.zeros(64, n, dtype=torch.float32, device=device)
    return buf[:rows]


def pending(y: torch.Tensor) -> bool:
    """Whether y is an accumulator (its reader must zero it) rather than a finished product."""
    return y.dtype == torch.float32 and any(y.data_ptr() == b.data_ptr() for b in _ACCUMULATORS.values())


def launch(x, qweight, scales, zeros, bias, bits: int, group: int, K: int, cfg: tuple, glu: bool, out_dtype,
           pdl: bool = False):
    """x (M, K) (or (M, 2K) with glu), contiguous rows -> (M, N): the product in out_dtype with one split; with more,
    the fp32 accumulator the splits added into, which its reader must zero (see `accumulator`). pdl: the one-row
    kernel launches with programmatic dependent launch (see `pdl_supported`)."""
    M, N = x.shape[0], qweight.shape[0]
    Kp = qweight.shape[1] * (8 if bits == 4 else 1)
    spans = Kp // SPAN
    kind, *c = cfg
    presum = c.pop() if kind in ("gemvh", "gemvs") and len(c) == 5 else 0  # optional: words summed in fp16
    if kind in ("gemvh", "gemvs") and (glu or K != Kp or group not in (32, 128, 256) or x.dtype == torch.float32):
        # the packed-half kernel takes unpadded K, groups of 32 / 128 / 256, no GLU, and rounds x to fp16 (so not for fp32
        # activations): else the fp32 one-row kernel, same tile (a stream config's programs per SM read as splits)
        kind = "gemv"
    per = -(-spans // c[-1])
    splits = -(-spans // per)  # none empty
    atomic = splits > 1 or kind == "gemvs"
    y = accumulator(M, N, x.device) if atomic else torch.empty(M, N, dtype=out_dtype, device=x.device)
    z = zeros if zeros is not None else scales
    b = bias if bias is not None else scales
    if kind in ("gemvh", "gemvs"):  # U - 1 spans' words loaded ahead (PF, see _w4h_tile)
        bn, u, warps, r = c  # gemvs: r programs per SM, each a run of the tiles x spans units (STREAM)
        grid = (r * sm_count(x.device),) if kind == "gemvs" else (triton.cdiv(N, bn), splits)
        _gemv_w4h_kernel[grid](x, qweight, scales, z, b, y, N, K, Kp // 8, spans, per, GROUP=group, BN=bn, PF=u - 1,
                               HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None, ATOMIC=atomic,
                               STREAM=kind == "gemvs", PDL=pdl, PRESUM=presum, launch_pdl=pdl,
                               num_warps=warps)
        return y
    if kind == "gemv":
        bn, u, warps, _ = c
        _gemv_w4_kernel[(triton.cdiv(N, bn), splits)](x, qweight, scales, z, b, y, N, K, Kp, spans, per, GROUP=group,
                                                      BN=bn, U=u, GLU=glu, HAS_ZERO=zeros is not None,
                                                      HAS_BIAS=bias is not None,
                                                      ATOMIC=atomic, num_warps=warps)
        return y
    bm, bn, dot, warps, _ = c
    _mm_kernel[(triton.cdiv(N, bn), triton.cdiv(M, bm), splits)](
        x, qweight, scales, z, b, y, M, N, K, Kp, spans, per, x.stride(0), BITS=bits, GROUP=group,
        HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None, GLU=glu, BM=bm, BN=bn, DOT=int(dot), ATOMIC=atomic,
        FP32=x.dtype == torch.float32,
        num_warps=warps)
    return y
