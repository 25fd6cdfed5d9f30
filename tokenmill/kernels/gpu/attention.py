"""Attention on the GPU: paged decode attention (Triton) reading the KV pool through block tables, the k/v store into
the pool, and prefill attention (flash-attn's varlen kernel when installed, else PyTorch SDPA).

Pool layout per layer (engine/kv_cache.py): (num_blocks, block_size, KV, D). Decode (one query per sequence) is split over
the keys (flash-decoding): program (b, kv head, split) runs an online softmax over its share of the sequence for the
H / KV query heads of that kv head, writing (max, sum, acc); a second kernel merges the splits. The number of splits is
fixed per launch (a CUDA graph replays it at any length), each split's share follows the sequence's length.
`decode_reference()` is the plain PyTorch computation the tests compare against.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import triton  # CUDA path only (see gpu_linear.py)
import triton.language as tl

from tokenmill.kernels.gpu.matvec import pdl_start

try:  # used when installed, never required
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

KEYS_PER_TILE = 64


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     KV: tl.constexpr, D: tl.constexpr):
    # token t, kv head h: k/v (T, KV, D) strided -> pool slot (slots[t], h); slot -1 (a padded row) writes nothing
    t, h = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, D)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    dst = (slot * KV + h) * D + d
    tl.store(kc_ptr + dst, tl.load(k_ptr + t * stride_kt + h * stride_kh + d), mask=slot >= 0)
    tl.store(vc_ptr + dst, tl.load(v_ptr + t * stride_vt + h * stride_vh + d), mask=slot >= 0)


def store_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """k/v (T, KV, D), last dim contiguous -> the pool's flat slots (T,) (-1: skip)."""
    T, KV, D = k.shape
    _store_kv_kernel[(T, KV)](k, v, k_pool, v_pool, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                              KV=KV, D=D, num_warps=1)


@triton.jit
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, table_ptr, len_ptr, acc_ptr, ml_ptr, out_ptr,
                   stride_qb, stride_qh, stride_tb, stride_ob, stride_oh, sm_scale, window,
                   KV: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                   BN: tl.constexpr, SPLITS: tl.constexpr, WINDOW: tl.constexpr, FP32: tl.constexpr,
                   PDL: tl.constexpr):
    # FP32: an fp32 pool, its products in full fp32 ("ieee": Triton's default for fp32 operands is TF32)
    pdl_start(PDL)
    b, kvh, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    L = tl.load(len_ptr + b)  # keys, the new token's included; the query sits at L - 1
    lo = 0
    if WINDOW:
        lo = tl.maximum(L - window, 0)
    first = lo // BN
    tiles = tl.cdiv(L, BN) - first
    per = tl.cdiv(tiles, SPLITS)
    t0 = first + sp * per
    t1 = tl.minimum(t0 + per, first + tiles)
    g, d = tl.arange(0, BG), tl.arange(0, D)
    heads = kvh * G + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None], other=0.0)
    m_i = tl.full((BG,), float("-inf"), tl.float32)
    l_i = tl.zeros((BG,), tl.float32)
    acc = tl.zeros((BG, D), tl.float32)
    scale = sm_scale * 1.4426950408889634  # exp2
    for t in range(t0, t1):
        keys = t * BN + tl.arange(0, BN)
        valid = (keys < L) & (keys >= lo)
        blk = tl.load(table_ptr + b * stride_tb + keys // BS, mask=valid, other=0).to(tl.int64)
        rows = ((blk * BS + keys % BS) * KV + kvh) * D
        k = tl.load(kc_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)  # (BN, D)
        if FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # (BG, BN)
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    gm = g < G
    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=gm[:, None])
    else:
        # partials (B, H, SPLITS, D) and (B, H, SPLITS, 2): an empty split leaves max -inf, sum 0
        row = (b * (KV * G) + heads) * SPLITS + sp
        tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=gm[:, None])
        tl.store(ml_ptr + row * 2, m_i, mask=gm)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=gm)


@triton.jit
def _merge_kernel(acc_ptr, ml_ptr, out_ptr, stride_ob, stride_oh, H: tl.constexpr, D: tl.constexpr,
                  SPLITS: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    b, h = tl.program_id(0), tl.program_id(1)
    sp, d = tl.arange(0, SPLITS), tl.arange(0, D)
    row = (b * H + h) * SPLITS + sp
    m = tl.load(ml_ptr + row * 2)
    l = tl.load(ml_ptr + row * 2 + 1)
    w = tl.exp2(m - tl.max(m, 0))  # 0 for empty splits
    acc = tl.load(acc_ptr + row[:, None] * D + d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def decode_splits(batch: int, kv_heads: int, max_len: int, sms: int = 132) -> int:
    """Key splits per (sequence, kv head): enough programs to fill the GPU twice, at most one per key tile."""
    want = max(1, (2 * sms) // (batch * kv_heads))
    tiles = max(1, -(-max_len // KEYS_PER_TILE))
    return min(1 << (min(want, tiles) - 1).bit_length(), 64)


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                 lengths: torch.Tensor, window: int | None, splits: int, out: torch.Tensor | None = None,
                 pdl: bool = False) -> torch.Tensor:
    """q (B, H, D) one query per sequence (any strides, last dim contiguous); pools (blocks, bs, KV, D); tables (B, W)
    int32 block ids; lengths (B,) int32 keys per sequence (the query's own included) -> (B, H, D)."""
    B, H, D = q.shape
    _, bs, KV, _ = k_pool.shape
    G = H // KV
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device) if out is None else out
    acc = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device) if splits > 1 else out
    ml = torch.empty(B, H, splits, 2, dtype=torch.float32, device=q.device) if splits > 1 else out
    _decode_kernel[(B, KV, splits)](
        q, k_pool, v_pool, tables, lengths, acc, ml, out, q.stride(0), q.stride(1), tables.stride(0),
        out.stride(0), out.stride(1), 1.0 / math.sqrt(D), window or 0,
        KV=KV, G=G, BG=max(16, triton.next_power_of_2(G)), D=D, BS=bs, BN=KEYS_PER_TILE, SPLITS=splits,
        WINDOW=window is not None, FP32=k_pool.dtype == torch.float32, PDL=pdl, launch_pdl=pdl,
        num_warps=4)
    if splits > 1:
        _merge_kernel[(B, H)](acc, ml, out, out.stride(0), out.stride(1), H=H, D=D, SPLITS=splits,
                              PDL=pdl, launch_pdl=pdl, num_warps=1)
    return out


def decode_reference(q, k_pool, v_pool, tables, lengths, window):
    """Plain PyTorch: gather each sequence's keys through its table, softmax attention in fp32 -> (B, H, D) fp32."""
    B, H, D = q.shape
    bs, KV = k_pool.shape[1], k_pool.shape[2]
    outs = []
    for b in range(B):
        L = int(lengths[b])
        idx = torch.arange(L, device=q.device)
        slots = tables[b].long()[idx // bs] * bs + idx % bs
        k = k_pool.flatten(0, 1)[slots].float().repeat_interleave(H // KV, 1)  # (L, H, D)
        v = v_pool.flatten(0, 1)[slots].float().repeat_interleave(H // KV, 1)
        s = torch.einsum("hd,lhd->hl", q[b].float(), k) / math.sqrt(D)
        if window is not None:
            s[:, : max(0, L - window)] = float("-inf")
        outs.append(torch.einsum("hl,lhd->hd", s.softmax(-1), v))
    return torch.stack(outs)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """A chunk with nothing cached before it: q (1, H, T, D), k/v (1, KV, T, D) -> (1, H, T, D), causal. fp32: SDPA
    (flash-attn takes 16-bit only)."""
    if flash_attn_func is not None and q.dtype != torch.float32:
        w = (window - 1, 0) if window is not None else (-1, -1)
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, window_size=w)
        return out.transpose(1, 2)
    if window is not None and q.shape[2] > window:
        T = q.shape[2]
        i = torch.arange(T, device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


class PagedDecodeView:
    """The KV view of a decode step held in tensors only (what a CUDA graph captures): B sequences, one new token each,
    written at slots (B,) (-1 for padding rows), attending over lengths (B,) keys through tables (B, W)."""

    def __init__(self, cache, slots: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor, splits: int):
        self.cache, self.slots, self.tables, self.lengths, self.splits = cache, slots, tables, lengths, splits

    def store_targets(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k pool, v pool, slots): where the caller may write the new k/v itself (fused.rope_qkv does), then
        calling attend with k = v = None."""
        return self.cache.k[layer], self.cache.v[layer], self.slots

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
               window: int | None) -> torch.Tensor:
        # q (B, H, 1, D), k/v (B, KV, 1, D) or None (already stored) -> (B, H, 1, D)
        K, V = self.cache.k[layer], self.cache.v[layer]
        if k is not None:
            store_kv(K, V, self.slots, k[:, :, 0], v[:, :, 0])
        return paged_decode(q[:, :, 0], K, V, self.tables, self.lengths, window, self.splits,
                            pdl=self.cache.pdl)[:, :, None]
