"""Contiguous KV cache: a fixed number of rows (sequences), each with room for `capacity` tokens.

Layout per layer: k, v (rows, n_kv, capacity, head_dim). The cache remembers each row's token ids, so a new prompt can
reuse the longest cached prefix (chat turns) and the cache can be reset or truncated (ExLlamaV2's
`cache.current_seq_len = 0`). The model only sees `KVView.attend`; a paged cache can replace this class behind it.
Decode steps (one new token per row) on the CPU read the rows in place through the C++ kernel (cpu_attention.py);
prompts, and decodes where the kernel is missing, run SDPA over the rows' slices. The storage dtype may be 16-bit under
an fp32 model (fp32 arithmetic either way).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu import attention as cpu_attention
from tokenmill.model.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, rows: int, capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.rows, self.capacity = 0, 0
        self.k: torch.Tensor = torch.empty(0)
        self.v: torch.Tensor = torch.empty(0)
        self.tokens: list[list[int]] = []  # per row: the ids whose k/v are stored
        self._allocate(capacity, rows)

    def _allocate(self, capacity: int, rows: int | None = None):
        # (re)allocate, keeping every cached entry; zero-filled so masked-out slots are finite
        c, old_rows, rows = self.cfg, self.rows, rows or self.rows
        shape = (c.num_layers, rows, c.num_kv_heads, capacity, c.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.capacity:
            k[:, :old_rows, :, : self.capacity] = self.k
            v[:, :old_rows, :, : self.capacity] = self.v
        self.k, self.v, self.capacity, self.rows = k, v, capacity, rows
        self.tokens += [[] for _ in range(rows - old_rows)]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def length(self, row: int) -> int:
        return len(self.tokens[row])

    def ensure(self, rows: int, capacity: int):
        """Grow to at least `rows` rows of `capacity` tokens, keeping what is cached."""
        if capacity > self.capacity or rows > self.rows:
            grown = max(capacity, min(self.capacity * 3 // 2, self.cfg.max_position_embeddings))
            grown = grown if capacity > self.capacity else self.capacity
            self._allocate(grown, max(rows, self.rows))

    def reset(self, row: int | None = None):
        """Forget the cached tokens of one row, or of every row."""
        for r in range(self.rows) if row is None else [row]:
            self.tokens[r] = []

    def truncate(self, row: int, length: int):
        """Keep only the first `length` cached tokens of a row."""
        if not 0 <= length <= self.length(row):
            raise ValueError(f"truncate length must be in [0, {self.length(row)}], got {length}")
        del self.tokens[row][length:]

    def reuse_prefix(self, row: int, ids: list[int]) -> int:
        """Truncate the row to its longest common prefix with `ids` and return that length (at most len(ids) - 1, so
        at least one token is recomputed and yields logits)."""
        cached, n = self.tokens[row], 0
        limit = min(len(cached), len(ids) - 1)
        while n < limit and cached[n] == ids[n]:
            n += 1
        self.truncate(row, n)
        return n

    def begin(self, rows: list[int], new_ids: list[list[int]]) -> "ContiguousKVView":
        """Reserve room for `new_ids[i]` after row `rows[i]`'s cached tokens (all the same count) and return the view
        one forward writes and reads. Token ids are recorded now: the forward that follows stores their k/v."""
        n_new = len(new_ids[0])
        assert all(len(ids) == n_new for ids in new_ids), "rows of one forward take the same number of tokens"
        starts = [self.length(r) for r in rows]
        self.ensure(self.rows, max(starts) + n_new)
        for r, ids in zip(rows, new_ids):
            self.tokens[r].extend(ids)
        return ContiguousKVView(self, rows, starts, n_new)


class ContiguousKVView:
    """One forward's window onto a KVCache: rows, their start positions and the number of new tokens T."""

    def __init__(self, cache: KVCache, rows: list[int], starts: list[int], n_new: int):
        self.cache, self.rows, self.starts, self.n_new = cache, rows, starts, n_new
        dev = cache.device
        self.end = max(starts) + n_new  # keys beyond this are never read
        self.positions = (torch.tensor(starts, device=dev)[:, None] + torch.arange(n_new, device=dev)).long()  # (B, T)
        first = rows[0]
        self._slice = rows == list(range(first, first + len(rows))) and len(set(starts)) == 1
        self._rows_t = torch.tensor(rows, device=dev)
        self._masks: dict[int | None, torch.Tensor | None] = {}
        # decode on the CPU kernel: each row is one "block" of the permuted cache (rows, capacity, KV, D)
        c = cache.cfg
        self._kernel = n_new == 1 and cpu_attention.available(dev, c.head_dim, cache.dtype)
        if self._kernel:
            self._tables = self._rows_t[:, None]  # (B, 1)
            self._lengths = torch.tensor(starts, device=dev) + 1  # (B,) keys per row, the new one included

    def _mask(self, window: int | None) -> torch.Tensor | None:
        # (B, 1, T, end) bool, True where query t of row b may attend key j; None when plain causal/full suffices
        if window in self._masks:
            return self._masks[window]
        T = self.n_new
        uniform = len(set(self.starts)) == 1
        needs_window = window is not None and self.end > window
        if uniform and not needs_window and (T == 1 or self.starts[0] == 0):
            mask = None
        else:
            q_pos = self.positions[:, None, :, None]  # (B, 1, T, 1)
            j = torch.arange(self.end, device=self.positions.device)
            mask = j <= q_pos
            if needs_window:
                mask = mask & (j > q_pos - window)
        self._masks[window] = mask
        return mask

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
        K, V = self.cache.k[layer], self.cache.v[layer]  # (rows, KV, capacity, D)
        T, end = self.n_new, self.end
        if self._slice:
            r0, r1, s = self.rows[0], self.rows[-1] + 1, self.starts[0]
            K[r0:r1, :, s : s + T] = k
            V[r0:r1, :, s : s + T] = v
            if self._kernel:
                return self._decode(q, K, V, window)
            keys, values = K[r0:r1, :, :end], V[r0:r1, :, :end]
        else:
            # scatter each row's T new entries at its own positions; (B, T) advanced indices -> (B, T, KV, D)
            K[self._rows_t[:, None], :, self.positions] = k.transpose(1, 2).to(K.dtype)
            V[self._rows_t[:, None], :, self.positions] = v.transpose(1, 2).to(V.dtype)
            if self._kernel:
                return self._decode(q, K, V, window)
            keys, values = K[self._rows_t, :, :end], V[self._rows_t, :, :end]
        mask = self._mask(window)
        return attention(q, keys, values, mask)

    def _decode(self, q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, window: int | None) -> torch.Tensor:
        # q (B, H, 1, D) over the rows' cached keys, read in place -> (B, H, 1, D)
        out = cpu_attention.decode_attention(q[:, :, 0], K.transpose(1, 2), V.transpose(1, 2), self._tables,
                                             self._lengths, window)
        return out[:, :, None]


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA of q (B, H, T, D) over keys/values (B, KV, S, D); mask (B, 1, T, S) bool or None (plain causal)."""
    B, H, T, D = q.shape
    KV = keys.shape[1]
    keys, values = keys.to(q.dtype), values.to(q.dtype)  # a 16-bit cache under an fp32 model
    if T == 1 and H != KV:
        # decode with grouped-query attention: each kv head's G = H / KV query heads become G query rows of one
        # head, so the keys are read once per kv head instead of once per query head (mask (B,1,1,S) broadcasts)
        out = F.scaled_dot_product_attention(q.reshape(B, KV, H // KV, D), keys, values, attn_mask=mask)
        return out.reshape(B, H, 1, D)
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=H != KV
    )
