"""Paged KV cache: per layer one preallocated pool of fixed-size blocks, read and written through per-sequence block
tables (which blocks are whose is block_manager.BlockManager's business).

Layout per layer: k, v (num_blocks, block_size, n_kv, head_dim). One forward packs every sequence's new tokens into a
single row (input_ids and positions (1, N)); `PagedKVView.attend` writes their k/v into their slots, then attends:
sequences with one new token (decodes, placed first in the pack) together as one padded batch, each longer chunk
(prefill) on its own with a causal mask offset by its cached length. Decodes sorted by length attend in a few groups
of similar length, so short ones are not padded to the longest. Plain PyTorch gather + SDPA, any device; on CUDA the
k/v store and all decodes are Triton kernels reading through the block tables (kernels/gpu/attention.py), on the CPU
all decodes are one call of the C++ kernel that reads the blocks in place (kernels/cpu/attention.py) unless the cache
was built with `cpu_kernel=False` (the PyTorch path, the kernel's reference).
"""
from __future__ import annotations

import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu import attention as cpu_attention
from tokenmill.model.config import ModelConfig
from tokenmill.errors import InvalidRequestError

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'4GiB', '512MB', '1.5g', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise InvalidRequestError(f"KV cache memory must be a size such as 4GiB, 512MiB or 2GB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def available_memory(device: torch.device) -> int:
    """Bytes free for new allocations on the device (RAM: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_kv_memory(device: torch.device) -> int:
    """Half the free accelerator memory; on CPU a quarter of available RAM, at most 1 GiB (~23k tokens of a 135M
    model at fp32: raise it for big models or long prompts). RAM is only taken as blocks are first written."""
    free = available_memory(device)
    return free // 2 if device.type == "cuda" else min(free // 4, 2**30)


class PagedKVCache:
    """The block pools of every layer. cpu_kernel: CPU decodes through the C++ kernel where it built (else SDPA over
    gathered blocks); pdl: CUDA decode kernels launch with programmatic dependent launch (Hopper and later)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", *, cpu_kernel: bool = True, pdl: bool = False):
        self.cfg, self.num_blocks, self.block_size = cfg, num_blocks, block_size
        self.dtype, self.device = dtype, torch.device(device)
        self.cpu_kernel = cpu_kernel and cpu_attention.available(self.device, cfg.head_dim, dtype)
        self.pdl = pdl
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # zero-filled: padded keys are masked, but their values still enter the matmul (0 * NaN would be NaN)
        self.k, self.v = _zeros(shape, dtype, self.device), _zeros(shape, dtype, self.device)

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def view(self, starts: list[int], lengths: list[int], tables: list[list[int]]) -> PagedKVView:
        """The view one forward writes and reads: sequence i adds lengths[i] tokens after its starts[i] cached ones,
        in the blocks tables[i]. Sequences with one new token must come first, best sorted by starts (decodes of
        similar length attend together, padded to the longest of their group)."""
        return PagedKVView(self, starts, lengths, tables)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    # numpy's zeros is calloc: the OS hands out zero pages as they are first touched, so a 1 GiB pool costs no time
    # and no memory until its blocks are used (torch.zeros writes every byte up front)
    n = dtype.itemsize * math.prod(shape)
    return torch.from_numpy(np.zeros(n, dtype=np.uint8)).view(dtype).view(shape)


class PagedKVView:
    def __init__(self, cache: PagedKVCache, starts: list[int], lengths: list[int], tables: list[list[int]]):
        self.cache = cache
        dev, bs = cache.device, cache.block_size
        n_dec = next((i for i, n in enumerate(lengths) if n != 1), len(lengths))
        assert all(n > 1 for n in lengths[n_dec:]), "sequences with one new token go first"
        pos = [s + t for s, n in zip(starts, lengths) for t in range(n)]
        slots = [table[p // bs] * bs + p % bs for s, n, table in zip(starts, lengths, tables)
                 for p in range(s, s + n)]
        self.positions = torch.tensor([pos], dtype=torch.long, device=dev)  # (1, N)
        self._slots = torch.tensor(slots, dtype=torch.long, device=dev)  # (N,) flat slot per new token
        self._masks: dict[tuple, torch.Tensor | None] = {}  # (group offset, window) -> mask
        # decodes attend in groups of similar length, each padded to its longest: (offset, rows, block ids (B, width),
        # positions (B,)); then each prefill chunk alone: (offset, new tokens, cached tokens, block ids)
        self._decodes, self._chunks = [], []
        self._gpu = None  # CUDA: all decodes in one Triton launch, (count, tables (B, W) int32, keys (B,) int32, splits)
        self._cpu = None  # CPU kernel: all decodes in one call reading the blocks in place, (count, tables, keys)
        if n_dec and cache.cpu_kernel:
            width = max(s // bs for s in starts[:n_dec]) + 1
            padded = [t[:width] + [0] * (width - min(width, len(t))) for t in tables[:n_dec]]
            self._cpu = (n_dec, torch.tensor(padded, dtype=torch.long), torch.tensor(starts[:n_dec]) + 1)
        elif dev.type == "cuda" and n_dec:
            from tokenmill.kernels.gpu.attention import decode_splits

            width = max(s // bs for s in starts[:n_dec]) + 1
            padded = [t[:width] + [0] * (width - min(width, len(t))) for t in tables[:n_dec]]
            self._gpu = (n_dec, torch.tensor(padded, dtype=torch.int32, device=dev),
                         torch.tensor([s + 1 for s in starts[:n_dec]], dtype=torch.int32, device=dev),
                         decode_splits(n_dec, cache.cfg.num_kv_heads, max(starts[:n_dec]) + 1))
        grouped = self._gpu is None and self._cpu is None
        for lo, hi in _split_by_width([s // bs + 1 for s in starts[:n_dec]] if grouped else []):
            width = max(s // bs for s in starts[lo:hi]) + 1  # blocks up to the one holding the new token
            padded = [t[:width] + [0] * (width - min(width, len(t))) for t in tables[lo:hi]]
            self._decodes.append((lo, hi - lo, _blocks(padded[0] if hi - lo == 1 else padded, dev), starts[lo:hi]))
        off = n_dec
        for s, n, table in zip(starts[n_dec:], lengths[n_dec:], tables[n_dec:]):
            self._chunks.append((off, n, s, _blocks(table[: -(-(s + n) // bs)], dev)))
            off += n

    def _decode_mask(self, off: int, width: int, starts: list[int], window: int | None) -> torch.Tensor | None:
        # (B, 1, 1, width * bs) bool: key j is the sequence's own (j <= pos) and inside the window; None: all keys
        key = (off, window)
        if key not in self._masks:
            full = len(set(starts)) == 1 and starts[0] == width * self.cache.block_size - 1
            if full and (window is None or starts[0] < window):
                self._masks[key] = None
            else:
                j = torch.arange(width * self.cache.block_size, device=self.cache.device)
                pos = torch.tensor(starts, device=self.cache.device)[:, None]
                mask = j <= pos
                if window is not None:
                    mask = mask & (j > pos - window)
                self._masks[key] = mask[:, None, None]
        return self._masks[key]

    def _chunk_mask(self, off: int, n: int, start: int, window: int | None) -> torch.Tensor | None:
        # (n, start + n) bool: query t (at start + t) sees keys up to itself, inside the window; None: plain causal
        key = (off, window)
        if key not in self._masks:
            if start == 0 and (window is None or n <= window):
                self._masks[key] = None
            else:
                q = torch.arange(start, start + n, device=self.cache.device)[:, None]
                j = torch.arange(start + n, device=self.cache.device)
                mask = j <= q
                self._masks[key] = mask & (j > q - window) if window is not None else mask
        return self._masks[key]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
        # q (1, H, N, D), k/v (1, KV, N, D) for the packed new tokens -> (1, H, N, D)
        K, V = self.cache.k[layer], self.cache.v[layer]  # (blocks, bs, KV, D)
        bs, KV, D = K.shape[1:]
        gqa = q.shape[1] != KV
        outs = []
        H = q.shape[1]
        if self.cache.device.type == "cuda":
            from tokenmill.kernels.gpu.attention import paged_decode, store_kv

            store_kv(K, V, self._slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
            if self._gpu is not None:
                n_dec, tables, lengths, splits = self._gpu
                out = paged_decode(q[0, :, :n_dec].transpose(0, 1), K, V, tables, lengths, window, splits,
                                   pdl=self.cache.pdl)
                outs.append(out.transpose(0, 1)[None])  # (1, H, n_dec, D)
        else:
            K.view(-1, KV, D).index_copy_(0, self._slots, k[0].transpose(0, 1).to(K.dtype))
            V.view(-1, KV, D).index_copy_(0, self._slots, v[0].transpose(0, 1).to(V.dtype))
            if self._cpu is not None:
                n_dec, tables, lengths = self._cpu
                out = cpu_attention.decode_attention(q[0, :, :n_dec].transpose(0, 1), K, V, tables, lengths, window)
                outs.append(out.transpose(0, 1)[None])  # (1, H, n_dec, D)
        for off, B, blocks, starts in self._decodes:
            width = blocks.stop - blocks.start if isinstance(blocks, slice) else blocks.shape[-1]
            # the H / KV query heads sharing a kv head go in as that head's queries: (B, KV, H / KV, D), no GQA expand
            qd = q[0, :, off : off + B].transpose(0, 1).reshape(B, KV, H // KV, D)
            # (B, KV, L, D), widened when the pool is 16-bit under an fp32 model
            keys = _take(K, blocks).view(B, width * bs, KV, D).transpose(1, 2).to(q.dtype)
            values = _take(V, blocks).view(B, width * bs, KV, D).transpose(1, 2).to(q.dtype)
            mask = self._decode_mask(off, width, starts, window)
            out = F.scaled_dot_product_attention(qd, keys, values, attn_mask=mask)
            outs.append(out.reshape(B, H, D).transpose(0, 1)[None])  # (1, H, B, D)
        for off, n, start, blocks in self._chunks:
            end = start + n
            if start == 0 and self.cache.device.type == "cuda":  # flash-attn when installed, else SDPA
                from tokenmill.kernels.gpu.attention import prefill_attention

                outs.append(prefill_attention(q[:, :, off : off + n], k[:, :, off : off + n], v[:, :, off : off + n],
                                              window))
                continue
            if start == 0:  # nothing cached before the chunk: its keys are the new ones
                keys, values = k[:, :, off : off + n], v[:, :, off : off + n]
            else:
                keys = _take(K, blocks).view(1, -1, KV, D)[:, :end].transpose(1, 2)  # (1, KV, end, D)
                values = _take(V, blocks).view(1, -1, KV, D)[:, :end].transpose(1, 2)
                keys, values = keys.to(q.dtype), values.to(q.dtype)  # a 16-bit pool under an fp32 model
            mask = self._chunk_mask(off, n, start, window)
            outs.append(F.scaled_dot_product_attention(
                q[:, :, off : off + n], keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _blocks(table: list, device) -> slice | torch.Tensor:
    """A sequence's block ids as a slice of the pool when they are consecutive (read in place: no copy), else a tensor
    to gather by; a list of tables (several rows) is always a tensor."""
    if table and not isinstance(table[0], list) and table == list(range(table[0], table[0] + len(table))):
        return slice(table[0], table[0] + len(table))
    return torch.tensor(table, dtype=torch.long, device=device)


def _take(pool: torch.Tensor, blocks: slice | torch.Tensor) -> torch.Tensor:
    """pool (blocks, bs, KV, D) at the blocks: a view for a slice, a gathered copy for ids (any shape, flattened)."""
    return pool[blocks] if isinstance(blocks, slice) else pool.index_select(0, blocks.flatten())


def _split_by_width(widths: list[int], min_rows: int = 8) -> list[tuple[int, int]]:
    """[lo, hi) runs of rows to attend together. Rows come sorted by width (blocks per row); a run ends where the next
    row would pad the run's first rows by more than half again, unless the run or the rest is short."""
    runs, lo = [], 0
    for i in range(1, len(widths) + 1):
        if i == len(widths) or (widths[i] > 1.5 * widths[lo] + 1 and i - lo >= min_rows
                                and len(widths) - i >= min_rows):
            runs.append((lo, i))
            lo = i
    return runs if widths else []
