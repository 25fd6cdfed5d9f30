"""A few sequences on a paged KV cache of their own, each with a fixed block table: drives the runner directly, without
the scheduler or the sampler (perplexity, the bench suites' raw forward figures, parity tests).

    s = ScratchCache(llm.runner, rows=1, capacity=512)
    logits = s.score(0, ids)          # (T, V) at every position
    next_logits = s.decode([0], [t])  # (1, V)
"""
from __future__ import annotations

import torch


class ScratchCache:
    def __init__(self, runner, rows: int, capacity: int, block_size: int = 16):
        self.runner, self.capacity, self.block_size = runner, capacity, block_size
        per = -(-capacity // block_size)
        self.cache = runner.new_kv_cache(rows * per, block_size)
        self.tables = [list(range(r * per, (r + 1) * per)) for r in range(rows)]
        self.lengths = [0] * rows

    def length(self, row: int) -> int:
        return self.lengths[row]

    def truncate(self, row: int, n: int) -> None:
        """Keep the first n cached tokens of the row (the rest are overwritten by the next forward)."""
        if not 0 <= n <= self.lengths[row]:
            raise ValueError(f"truncate length must be in [0, {self.lengths[row]}], got {n}")
        self.lengths[row] = n

    def reset(self) -> None:
        self.lengths = [0] * len(self.lengths)

    def _room(self, row: int, n: int) -> None:
        if self.lengths[row] + n > self.capacity:
            raise ValueError(f"row {row} holds {self.capacity} tokens; {self.lengths[row]} + {n} do not fit")

    def score(self, row: int, ids: list[int]) -> torch.Tensor:
        """Append ids to the row; logits (T, V) fp32 at each of them."""
        self._room(row, len(ids))
        out = self.runner.forward(self.cache, [list(ids)], [self.lengths[row]], [self.tables[row]], None)
        self.lengths[row] += len(ids)
        return out

    def prefill(self, row: int, ids: list[int]) -> torch.Tensor:
        """Append ids to the row; the last position's logits (V,) fp32."""
        self._room(row, len(ids))
        out = self.runner.forward(self.cache, [list(ids)], [self.lengths[row]], [self.tables[row]], [0])
        self.lengths[row] += len(ids)
        return out[0]

    def decode(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
        """One new token for each row -> next-token logits (B, V) fp32 (rows in any order)."""
        for r in rows:
            self._room(r, 1)
        order = sorted(range(len(rows)), key=lambda i: self.lengths[rows[i]])  # the view wants decodes by length
        out = self.runner.forward(self.cache, [[tokens[i]] for i in order], [self.lengths[rows[i]] for i in order],
                                  [self.tables[rows[i]] for i in order], list(range(len(rows))))
        for r in rows:
            self.lengths[r] += 1
        return out[torch.tensor(order).argsort().to(out.device)]
