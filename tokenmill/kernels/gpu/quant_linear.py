"""Quantized linear layers on the GPU: 4-bit groups (32 or 128) and 8-bit groups of 32, kept quantized in memory.

Format, chosen for the kernel and converted once at load. K is padded to a multiple of SPAN = 256 (pad weights are
zero and the kernel masks x there). 4-bit: `qweight` (N, Kp / 8) int32, where int32 i of span s holds, in nibble j,
element k = 256 s + 32 j + i; so nibble j of a span's 32 words is one contiguous 32-wide sub-tile of K, unpacked with a
shift and a mask, no reshuffle. 8-bit: `qweight` (N, Kp) int8. `scales` / `zeros` (Kp / group, N): w = q * scale + zero.
GGUF Q4_0 / Q4_1 / Q4_K repack exactly (fp16 scales for Q4_0/Q4_1, fp32 for Q4_K's 6-bit x fp16 products); Q8_0 too.

Up to DECODE_ROWS rows the fused dequantize-and-multiply kernels of matvec.py (split over K into an accumulator
that the consumer reads and zeroes: `QuantLinear.product`); more rows (prefill) dequantize to x's dtype (bf16 or
fp32) and call cuBLAS.
`reference()` is the plain PyTorch product.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

import triton  # imported only on the CUDA path (runner's GPU branch, GPU tests): never a CPU dependency
import triton.language as tl

from tokenmill.kernels.gpu import matvec as matvec
from tokenmill.kernels.gpu.matvec import SPAN, nibble_f32, sm_count

DECODE_ROWS = 64  # up to this many rows the fused kernels (matvec.py), above it dequantize + cuBLAS


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, Kp,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BN: tl.constexpr):
    # (BN rows, one span) of the weight -> out (N, K) in its dtype
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    s = tl.program_id(1)
    offs_i = tl.arange(0, 32)
    n_mask = offs_n < N
    if BITS == 4:
        p = tl.load(w_ptr + offs_n[:, None] * (Kp // 8) + (s * 32 + offs_i)[None, :], mask=n_mask[:, None], other=0)
    for j in tl.static_range(8):
        k = s * 256 + j * 32 + offs_i
        g = (s * 256 + j * 32) // GROUP
        sc = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        if BITS == 4:
            w = nibble_f32(p, j) * sc - 128.0 * sc
        else:
            w = tl.load(w_ptr + offs_n[:, None] * Kp + k[None, :], mask=n_mask[:, None], other=0).to(tl.float32) * sc
        if HAS_ZERO:
            w += tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + offs_n[:, None] * K + k[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & (k < K)[None, :])


class QuantLinear(nn.Module):
    """y = x @ W.T (+ bias) with W kept as 4-bit or 8-bit groups (see the module docstring for the layout)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group: int,
                 in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.bits, self.group, self.in_features = bits, group, in_features
        self.out_features = qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.pdl = False  # one-row products launch with programmatic dependent launch (set by prepare_gpu_model)

    @property
    def padded_in(self) -> int:
        return self.qweight.shape[1] * (8 if self.bits == 4 else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) bf16 or fp32 -> (..., N)."""
        y = self.product(x.reshape(-1, self.in_features))
        if matvec.pending(y):
            y, acc = y.to(x.dtype, copy=True), y  # a copy also for fp32 x: the accumulator is zeroed next
            acc.zero_()
        return y.view(*x.shape[:-1], self.out_features)

    def product(self, x: torch.Tensor, glu: bool = False, config: tuple | None = None, split: bool = True
                 ) -> torch.Tensor:
        """x (M, K) -> x @ W.T + bias (M, N): in x's dtype, or, split over K, the fp32 accumulator that the reader
        must zero (`matvec.pending`; never so when not split). glu: x is gate | up (M, 2K), the input
        silu(gate) * up."""
        if x.stride(-1) != 1:
            x = x.contiguous()
        M, N = x.shape[0], self.out_features
        if M > DECODE_ROWS:
            from tokenmill.kernels.gpu.fused import silu_mul

            w = self.dequantize(x.dtype)
            x = silu_mul(x) if glu else x
            return torch.addmm(self.bias.to(x.dtype), x, w.t()) if self.bias is not None else F.linear(x, w)
        cfg = config or matvec.config(M, N, self.padded_in, self.bits, self.group, sm_count(x.device))
        cfg = cfg if split else matvec.unsplit(cfg)
        return matvec.launch(x, self.qweight, self.scales, self.zeros, self.bias, self.bits, self.group,
                             self.in_features, cfg, glu, x.dtype, self.pdl)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight as (N, K) in dtype, one Triton pass (computed in fp32, rounded once)."""
        N, K = self.out_features, self.in_features
        out = torch.empty(N, K, dtype=dtype, device=self.qweight.device)
        grid = (triton.cdiv(N, 32), self.padded_in // SPAN)
        _dequant_kernel[grid](self.qweight, self.scales, self.zeros if self.zeros is not None else self.scales, out,
                              N, K, self.padded_in, BITS=self.bits, GROUP=self.group,
                              HAS_ZERO=self.zeros is not None, BN=32, num_warps=4)
        return out

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    # -- conversions --
    @classmethod
    def from_groups(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group: int,
                    bias: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.float16) -> "QuantLinear":
        """q (N, K) integers (4-bit: [0, 15]; 8-bit: [-128, 127]), scale / zero (N, K / group) -> packed layer."""
        N, K = q.shape
        Kp = -(-K // SPAN) * SPAN
        q = F.pad(q.to(torch.int64), (0, Kp - K))
        pad_g = lambda t: F.pad(t.float(), (0, Kp // group - t.shape[1])).t().contiguous().to(scale_dtype)
        if bits == 4:
            # (N, Kp/256, 8 sub-tiles, 32) -> nibble j of word (span, i); wrap to int32
            words = (q.view(N, Kp // SPAN, 8, 32) << (4 * torch.arange(8, device=q.device)).view(1, 1, 8, 1)).sum(2)
            qweight = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).view(N, Kp // 8)
        else:
            qweight = q.to(torch.int8)
        return cls(qweight.contiguous(), pad_g(scale), pad_g(zero) if zero is not None else None, bits, group, K, bias)

    @classmethod
    def from_gguf(cls, qt, bias: torch.Tensor | None = None, device: str | torch.device = "cuda") -> "QuantLinear":
        """Repack a GGUF Q4_0 / Q4_1 / Q4_K (4-bit groups of 32) or Q8_0 (8-bit groups of 32) weight exactly."""
        from gguf import GGMLQuantizationType as T

        from tokenmill.formats.quants import QuantizedTensor, int4_groups

        qt = QuantizedTensor(qt.qtype, qt.shape, qt.data.to(device))
        if qt.qtype == T.Q8_0:
            b = qt.data.reshape(-1, 34)
            q = b[:, 2:].contiguous().view(torch.int8).reshape(qt.shape)
            scale = b[:, :2].contiguous().view(torch.float16).reshape(qt.shape[0], -1)
            return cls.from_groups(q, scale, None, 8, 32, bias)
        q, scale, mins = int4_groups(qt)
        return cls.from_groups(q, scale, mins, 4, 32, bias,
                               scale_dtype=torch.float32 if qt.qtype == T.Q4_K else torch.float16)

    @classmethod
    def quantize(cls, w: torch.Tensor, bits: int, group: int, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Round a dense (N, K) weight to groups (for benches on random weights): 4-bit asymmetric min/max, 8-bit
        symmetric absmax; fp16 scales."""
        N, K = w.shape
        Kp = -(-K // group) * group
        g = F.pad(w.float(), (0, Kp - K)).view(N, Kp // group, group)
        if bits == 4:
            lo, hi = g.amin(-1), g.amax(-1)
            scale = ((hi - lo) / 15).clamp_min(1e-8).half().float()
            lo = lo.half().float()
            q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15)
            return cls.from_groups(q.view(N, Kp)[:, :K], scale, lo, 4, group, bias)
        scale = (g.abs().amax(-1) / 127).clamp_min(1e-8).half().float()
        q = (g / scale[..., None]).round().clamp(-128, 127)
        return cls.from_groups(q.view(N, Kp)[:, :K], scale, None, 8, group, bias)


def unpack(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Plain PyTorch inverse of the layout: q (N, K) int, scale / zero (N, K / group) fp32 (pad groups dropped)."""
    N, K, Kp = layer.out_features, layer.in_features, layer.padded_in
    if layer.bits == 4:
        w = layer.qweight.view(N, Kp // SPAN, 1, 32).to(torch.int64) & 0xFFFFFFFF
        q = ((w >> (4 * torch.arange(8, device=w.device)).view(1, 1, 8, 1)) & 15).view(N, Kp)
    else:
        q = layer.qweight.to(torch.int64)
    ng = -(-K // layer.group)
    z = layer.zeros[:ng].t().float() if layer.zeros is not None else None
    return q[:, :K], layer.scales[:ng].t().float(), z


def reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """x @ W.T in fp32 with W = q * scale + zero, group-wise along K: what every kernel above must compute."""
    q, scale, zero = unpack(layer)
    w = q.float() * scale.repeat_interleave(layer.group, 1)[:, : q.shape[1]]
    if zero is not None:
        w = w + zero.repeat_interleave(layer.group, 1)[:, : q.shape[1]]
    y = F.linear(x.float(), w)
    return y + layer.bias.float() if layer.bias is not None else y
