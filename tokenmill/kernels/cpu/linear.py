"""Quantized CPU linear layers: GGUF weights kept packed and multiplied without a dense copy.

`BlockLinear` (when our C++ kernels build, `csrc/quant_matmul.cpp`): Q4_0 / Q4_1 / Q8_0 weights repacked once in strips
of 16 rows, multiplied by our AVX-512 kernels; exact (fp32, the default) or int8 activations (VNNI, opt-in `--int4`).
The rest is the fallback when they don't build:

`Int4Linear` holds W (N, K) as 4-bit groups of 32 (repacked from Q4_0 / Q4_1 / Q4_K, never re-quantized) in the
layout of `torch.ops.aten._weight_int4pack_mm_for_cpu`, whose weight is w = (q - 8) * scale + zero. The kernel is fast
with bf16 activations only, so inputs are cast to bf16 for the product and the output cast back; scales are bf16 too.
It reads a quarter of the bytes of fp32 weights, which is what decode (a few rows) is bound by; for many rows (prefill)
MKL's fp32 GEMM is faster (measured here: 310 vs 132 GFLOP/s at 512 rows), so a dense weight, when kept, takes those.
`reference()` beside it is the plain PyTorch product the tests compare against.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from torch import nn

from tokenmill.kernels.cpu.extension import ops
from tokenmill.formats.quants import QuantizedTensor, int4_groups

GROUP = 32
DENSE_ROWS = 32  # from this many rows up, the dense fp32 weight (if kept) is faster than the int4 kernel


def has_int4_cpu_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class Int4Linear(nn.Module):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, bias: torch.Tensor | None = None,
                 dense: torch.Tensor | None = None):
        super().__init__()
        self.dense = dense  # (N, K) in the activation dtype, used for large row counts
        self.out_features, self.in_features = q.shape
        # (N, K) uint8 -> the kernel's packed layout; scale/zero (K/32, N, 2) bf16
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        zero = mins + 8 * scale
        self.register_buffer("scale_zero", torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous())
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                       dense: torch.Tensor | None = None) -> "Int4Linear":
        return cls(*int4_groups(qt), bias=bias, dense=dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.numel() >= DENSE_ROWS * self.in_features:
            return F.linear(x, self.dense, self.bias)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP, self.scale_zero)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class Q8Linear(nn.Module):
    """A GGUF Q8_0 weight (N, K) kept as int8 blocks of 32 with an fp32 scale each (what the file stores; the lm_head of
    most GGUF models). `forward` is per-block dot products scaled and summed in fp32, so the result equals the dense
    product up to summation order; it reads 1.06 bytes per weight instead of 4, but is only fast once compiled (the
    runner compiles it; eager it would materialise (rows, N, K) products), and only for a few rows: from `dense_rows`
    rows up the dense weight is used."""

    def __init__(self, qt: QuantizedTensor, dense: torch.Tensor):
        super().__init__()
        n, k = qt.shape
        b = qt.data.reshape(n, k // GROUP, 34)
        self.register_buffer("q", b[..., 2:].contiguous().view(torch.int8))  # (N, K/32, 32)
        self.register_buffer("d", b[..., :2].contiguous().view(torch.float16).float()[..., 0])  # (N, K/32)
        self.dense, self.in_features, self.out_features = dense, k, n

    dense_rows = 4  # block dot products are compute-bound: from 4 rows up MKL's dense GEMM is faster

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() >= self.dense_rows * self.in_features:
            return F.linear(x, self.dense)
        xb = x.reshape(-1, 1, self.in_features // GROUP, GROUP)  # (rows, 1, K/32, 32)
        y = ((self.q.float() * xb).sum(-1) * self.d).sum(-1)  # (rows, N)
        return y.view(*x.shape[:-1], self.out_features)


def reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """x @ W.T in fp32 with W = q * scale + min, groups of 32 along K."""
    w = q.float() * scale.repeat_interleave(GROUP, 1) + mins.repeat_interleave(GROUP, 1)
    return F.linear(x.float(), w)


# -- our AVX-512 kernels (csrc/quant_matmul.cpp) --
BLOCK_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q8_0})
STRIP = 16  # output rows per strip: one AVX-512 register of fp32 lanes


@functools.cache
def block_kernels():
    """`torch.ops.tokenmill` with quant_matmul / quant_matmul_int8 (and their fake impls for torch.compile), or None
    (not built here: runners keep torch's paths)."""
    kernels = ops("quant_matmul")
    if kernels is not None:
        for name in ("quant_matmul", "quant_matmul_int8"):
            torch.library.register_fake(f"tokenmill::{name}")(
                lambda x, packed, qtype, n: x.new_empty(*x.shape[:-1], n))
    return kernels


def pack_strips(qt: QuantizedTensor) -> torch.Tensor:
    """GGUF blocks of W (N, K) -> uint8 (ceil(N/16), K/32, bytes): per strip of 16 rows and block of 32 columns, the
    16 fp16 scales d, (Q4_1) the 16 fp16 mins m, then the quants with one 4-byte lane per row (layout in
    csrc/quant_matmul.cpp). A pure byte permutation of the file's blocks (N padded with zero rows)."""
    if qt.qtype not in BLOCK_TYPES:
        raise ValueError(f"pack_strips: {qt.qtype.name} not supported, only Q4_0, Q4_1, Q8_0")
    n, k = qt.shape
    b = qt.data.reshape(n, k // GROUP, -1)  # (N, K/32, block bytes)
    b = torch.cat([b, b.new_zeros(-n % STRIP, *b.shape[1:])])
    s = b.shape[0] // STRIP
    b = b.view(s, STRIP, k // GROUP, -1).transpose(1, 2)  # (S, K/32, 16 rows, block bytes)
    n_f16 = 2 if qt.qtype == T.Q4_1 else 1
    parts = [b[..., 2 * i:2 * i + 2].reshape(s, k // GROUP, 2 * STRIP) for i in range(n_f16)]
    qs = b[..., 2 * n_f16:]  # Q4: byte j = q[j] | q[j + 16] << 4; Q8_0: byte j = q[j]
    parts.append(qs.reshape(s, k // GROUP, STRIP, -1, 4).transpose(2, 3).reshape(s, k // GROUP, -1))
    return torch.cat(parts, -1).contiguous()


class BlockLinear(nn.Module):
    """y = x @ W.T for a GGUF Q4_0 / Q4_1 / Q8_0 weight (N, K) kept as its blocks (0.56-1.06 bytes per weight).

    int8=False: fp32 activations, each weight dequantized in registers (w = d*q + m) and FMA'd: the dense product up
    to summation order (the default path; the parity tests hold). int8=True: activations rounded to int8 per block
    of 32 with a scale, u8 x s8 VNNI dot products — about 3x fewer instructions, and as inexact as llama.cpp's
    Q4 x Q8 products (opt-in). `dense` (N, K), when kept, takes `dense_rows` rows and more in the exact
    mode, where MKL's GEMM is faster than the block kernel."""

    dense_rows = 32

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None, dense: torch.Tensor | None = None,
                 int8: bool = False):
        super().__init__()
        self.qt, self.qtype, self.int8 = qt, int(qt.qtype), int8
        self.out_features, self.in_features = qt.shape
        self.register_buffer("packed", pack_strips(qt))
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.dense = None if int8 else dense
        assert block_kernels() is not None, "BlockLinear needs the C++ kernels (extension.ops)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # lean on purpose: a decode step makes ~120 of these calls, and each Python-level op costs about a microsecond
        if self.dense is not None and x.numel() >= self.dense_rows * self.in_features:
            return F.linear(x, self.dense, self.bias)
        x2 = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
        mm = torch.ops.tokenmill.quant_matmul_int8.default if self.int8 else torch.ops.tokenmill.quant_matmul.default
        y = mm(x2, self.packed, self.qtype, self.out_features)  # (..., N) fp32
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same product in plain PyTorch: gguf-order dequantized W, and x rounded as the int8 kernel rounds it."""
        x = x.float()
        if self.int8:  # a = round(x * 127 / amax) per block of 32, read back as a * amax / 127
            xb = x.reshape(*x.shape[:-1], -1, GROUP)
            amax = xb.abs().amax(-1, keepdim=True)
            a = torch.round(xb * torch.where(amax > 0, 127 / amax, 0))
            x = (a.double() * (amax / 127).double()).reshape(x.shape)
        y = F.linear(x.double(), self.qt.dequantize().double()).float()
        return y + self.bias if self.bias is not None else y
