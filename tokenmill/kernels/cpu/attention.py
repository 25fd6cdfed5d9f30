"""Decode attention on the CPU: one query per sequence over its cached keys, read in place through block tables.

The paged KV cache calls this for its one-token queries, with its pool (blocks, bs, KV, D) and block tables. The C++
kernel (csrc/attention.cpp) is used when it built for this CPU (`available`) and the cache was built to use it; else
the cache keeps its SDPA path. `reference` is the same computation in plain PyTorch, for the tests.
"""
from __future__ import annotations

import functools
import math

import torch

from tokenmill.kernels.cpu.extension import ops

HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _kernel():
    lib = ops("attention")
    if lib is None:
        return None

    @torch.library.register_fake("tokenmill::decode_attention")
    def _(q, k, v, tables, lengths, window, scale):
        return q.new_empty(q.shape)

    return lib.decode_attention


def available(device: torch.device, head_dim: int, kv_dtype: torch.dtype) -> bool:
    """Whether `decode_attention` can serve this cache here (False: keep the SDPA path)."""
    return device.type == "cpu" and head_dim in HEAD_DIMS and kv_dtype in DTYPES and _kernel() is not None


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor,
                     window: int | None) -> torch.Tensor:
    """q (B, H, D) -> (B, H, D): softmax(q k^T / sqrt(D)) v over each sequence's keys, in fp32.

    Args:
        k, v: (N, bs, KV, D) block pools (fp32, fp16 or bf16; D contiguous, other strides free).
        tables: (B, W) int64; sequence b's key j is in block tables[b, j // bs], slot j % bs.
        lengths: (B,) int64 keys per sequence; the query sits at position lengths[b] - 1.
        window: sliding window (keys j > lengths[b] - 1 - window), or None.
    """
    out = _kernel()(q.float(), k, v, tables, lengths, window or 0, 1.0 / math.sqrt(q.shape[-1]))
    return out.to(q.dtype)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor,
              window: int | None) -> torch.Tensor:
    """`decode_attention` in plain PyTorch (fp32 softmax), one sequence at a time."""
    B, H, D = q.shape
    bs, KV = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    for b in range(B):
        n = int(lengths[b])
        lo = max(0, n - window) if window else 0
        blocks = tables[b, : -(-n // bs)]
        keys = k[blocks].reshape(-1, KV, D)[lo:n].float()  # (S, KV, D)
        values = v[blocks].reshape(-1, KV, D)[lo:n].float()
        kv_of = torch.arange(H) // (H // KV)
        scores = torch.einsum("hd,shd->hs", q[b], keys[:, kv_of]) / math.sqrt(D)
        out[b] = torch.einsum("hs,shd->hd", scores.softmax(-1), values[:, kv_of])
    return out
