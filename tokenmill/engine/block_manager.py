"""Block bookkeeping for the paged KV cache: allocation, reference counts, a prefix cache and LRU eviction.

A sequence's KV lives in fixed-size blocks listed in its block table. A full block whose k/v are computed is registered
under a key chained with its prefix, (key of the previous block, its token ids), so equal keys mean equal whole prefixes
and a new sequence can take the longest run of cached blocks and prefill only the rest. Blocks nobody references stay
cached until their slots are needed: never-cached blocks are handed out first, then cached ones, least recently used
first. Pure bookkeeping in block ids and token ids: the tensors live in kv_cache.PagedKVCache.
"""
from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Hashable

Key = tuple  # (previous block's key hash, token ids of the block)


def block_keys(token_ids: list[int], block_size: int, start: int = 0, prev: Key | None = None) -> list[Key]:
    """Chained keys of the full blocks start, start+1, ... of `token_ids`; `prev` is block start-1's key."""
    keys = []
    for i in range(start * block_size, len(token_ids) - block_size + 1, block_size):
        prev = (hash(prev) if prev is not None else None, tuple(token_ids[i : i + block_size]))
        keys.append(prev)
    return keys


@dataclass
class _SeqBlocks:
    table: list[int] = field(default_factory=list)
    keys: list[Key] = field(default_factory=list)  # keys of the full blocks known so far (computed or planned)
    n_cached: int = 0  # leading blocks registered in the prefix cache (or duplicates of a registered block)
    n_pending: int = 0  # keys[n_cached:n_pending] are counted in BlockManager.pending


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.key: list[Key | None] = [None] * num_blocks
        # unreferenced, holding nothing cached; taken from the left, and a released block goes back on the left: the
        # blocks used last are used next (their memory is warm; on the CPU the pool's untouched pages are not even
        # mapped yet), and a sequence that continues a finished one's prefix gets the block after it back
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced but cached; least recently used first
        self._cached: dict[Key, int] = {}  # key -> block id
        self.pending: Counter[Key] = Counter()  # keys of prompt blocks some running sequence is about to compute
        self._seqs: dict[Hashable, _SeqBlocks] = {}

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (evicting cached ones if need be)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def table(self, seq_id: Hashable) -> list[int]:
        return self._seqs[seq_id].table

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq_id: Hashable, num_tokens: int) -> int:
        """New blocks the sequence needs to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self._seqs[seq_id].table))

    # -- prefix cache --
    def match(self, token_ids: list[int], max_tokens: int) -> tuple[list[int], list[Key]]:
        """The longest run of cached blocks that starts `token_ids`, covering at most `max_tokens` tokens, and the keys
        of every full block of `token_ids` (pass both to `start`)."""
        keys = block_keys(token_ids, self.block_size) if self.prefix_caching else []
        blocks = []
        for k in keys[: max_tokens // self.block_size]:
            b = self._cached.get(k)
            if b is None:
                break
            blocks.append(b)
        return blocks, keys

    def is_pending(self, keys: list[Key], n_matched: int) -> bool:
        """Whether the first unmatched block is being computed by a running sequence (waiting a step shares it)."""
        return n_matched < len(keys) and self.pending[keys[n_matched]] > 0

    def free_after_match(self, blocks: list[int]) -> int:
        """num_free once the matched `blocks` are taken (those nobody referenced stop being evictable)."""
        return self.num_free - sum(1 for b in blocks if self.ref[b] == 0)

    def reset_prefix_cache(self):
        """Forget every cached block nobody references."""
        for b in self._evictable:  # least recently used first: the most recent end up first in line
            del self._cached[self.key[b]]
            self.key[b] = None
            self._free.appendleft(b)
        self._evictable.clear()

    # -- a sequence's blocks --
    def start(self, seq_id: Hashable, cached: list[int], keys: list[Key]):
        """Begin a sequence on the cached blocks from `match`; the other full-block keys become pending."""
        assert seq_id not in self._seqs, f"sequence {seq_id!r} already has blocks"
        for b in cached:
            if self.ref[b] == 0:
                del self._evictable[b]
            self.ref[b] += 1
        s = self._seqs[seq_id] = _SeqBlocks(list(cached), list(keys), len(cached), len(keys))
        self.pending.update(s.keys[s.n_cached :])

    def grow(self, seq_id: Hashable, num_tokens: int):
        """Give the sequence enough blocks for `num_tokens` tokens (check `blocks_needed` <= `num_free` first)."""
        s = self._seqs[seq_id]
        n = self.blocks_for(num_tokens) - len(s.table)
        assert n <= self.num_free, f"{n} blocks needed, {self.num_free} free"
        for _ in range(n):
            s.table.append(self._take(s.table[-1] + 1 if s.table else None))

    def commit(self, seq_id: Hashable, token_ids: list[int], num_computed: int):
        """Register the sequence's full blocks among its first `num_computed` tokens (their k/v now written)."""
        s = self._seqs[seq_id]
        full = num_computed // self.block_size
        if not self.prefix_caching or full <= s.n_cached:
            return
        if full > len(s.keys):
            s.keys += block_keys(token_ids, self.block_size, len(s.keys), s.keys[-1] if s.keys else None)
        for i in range(s.n_cached, full):
            k, b = s.keys[i], s.table[i]
            if i < s.n_pending:
                self.pending[k] -= 1
                if not self.pending[k]:
                    del self.pending[k]
            if k not in self._cached:  # else an equal block computed at the same time: this one stays private
                self._cached[k], self.key[b] = b, k
        s.n_cached, s.n_pending = full, max(s.n_pending, full)

    def truncate(self, seq_id: Hashable, num_tokens: int) -> int:
        """Keep the sequence's first `num_tokens` tokens (a rewind). Returns how many stay valid: fewer, down to a block
        boundary, when the last kept block is a cached block that must not be written into."""
        s = self._seqs[seq_id]
        keep = self.blocks_for(num_tokens)
        if num_tokens % self.block_size and keep <= s.n_cached:
            keep -= 1
            num_tokens = keep * self.block_size
        self._unpend(s, min(keep, len(s.keys)))
        for b in reversed(s.table[keep:]):
            self._release(b)
        del s.table[keep:]
        del s.keys[num_tokens // self.block_size :]
        s.n_cached = min(s.n_cached, len(s.keys))
        s.n_pending = max(s.n_cached, min(s.n_pending, len(s.keys)))
        return num_tokens

    def free(self, seq_id: Hashable):
        """Drop the sequence's blocks; cached ones stay reusable until evicted."""
        s = self._seqs.pop(seq_id, None)
        if s is None:
            return
        self._unpend(s, s.n_cached)
        for b in reversed(s.table):  # the tail is evicted before the prefix others are likelier to share
            self._release(b)

    def _unpend(self, s: _SeqBlocks, upto: int):
        for k in s.keys[max(upto, s.n_cached) : s.n_pending]:
            self.pending[k] -= 1
            if not self.pending[k]:
                del self.pending[k]
        s.n_pending = max(s.n_cached, min(s.n_pending, upto))

    def _take(self, prefer: int | None = None) -> int:
        """A block for a sequence: `prefer` (the one after its last) when nobody holds it, even evicting it from the
        prefix cache (in a conversation it holds the previous reply's tail, which the next prompt did not match), so a
        sequence's blocks stay consecutive and attention reads them in place; else a free block, else the least
        recently used cached one."""
        if prefer is not None and prefer < self.num_blocks and self.ref[prefer] == 0:
            b = prefer
            if self.key[b] is not None:
                del self._evictable[b]
                del self._cached[self.key[b]]
                self.key[b] = None
            elif self._free[0] == b:
                self._free.popleft()
            else:
                self._free.remove(b)
        elif self._free:
            b = self._free.popleft()
        else:
            b, _ = self._evictable.popitem(last=False)
            del self._cached[self.key[b]]
            self.key[b] = None
        self.ref[b] = 1
        return b

    def _release(self, b: int):
        self.ref[b] -= 1
        assert self.ref[b] >= 0, f"block {b} released more often than taken"
        if self.ref[b] == 0:
            if self.key[b] is not None:
                self._evictable[b] = None
            else:
                self._free.appendleft(b)
