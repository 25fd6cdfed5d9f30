"""Quantized linear layers: GGUF 4-bit weights kept packed and multiplied by torch's int4 CPU kernel.

`Int4Linear` holds W (N, K) as 4-bit groups of 32 (repacked from Q4_0 / Q4_1 / Q4_K, never re-quantized) in the
layout of `torch.ops.aten._weight_int4pack_mm_for_cpu`, whose weight is w = (q - 8) * scale + zero. The kernel is fast
with bf16 activations only, so inputs are cast to bf16 for the product and the output cast back; scales are bf16 too.
It reads a quarter of the bytes of fp32 weights, which is what decode (a few rows) is bound by; for many rows (prefill)
MKL's fp32 GEMM is faster (measured here: 310 vs 132 GFLOP/s at 512 rows), so a dense weight, when kept, takes those.
`reference()` beside it is the plain PyTorch product the tests compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quants import INT4_GROUP_TYPES, QuantizedTensor, int4_groups

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


def pack_int4_linears(model: nn.Module, packed: dict[str, QuantizedTensor], keep_dense: bool = True) -> int:
    """Swap every nn.Linear whose GGUF weight is 4-bit for an Int4Linear (CPU), keeping the dense weight for prefill
    when `keep_dense`. Returns how many were swapped."""
    n = 0
    for name, module in list(model.named_modules()):
        qt = packed.get(f"{name}.weight")
        if not isinstance(module, nn.Linear) or qt is None or qt.qtype not in INT4_GROUP_TYPES:
            continue
        if module.in_features % GROUP:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dense = module.weight.data if keep_dense else None
        setattr(parent, child, Int4Linear.from_quantized(qt, module.bias, dense))
        n += 1
    return n
