"""The scheduler: who runs in the next forward, and how many of their tokens. It thinks in token counts and block
counts, never tensors.

Each step packs, up to a token budget: first the running requests, oldest first (a decode is one token; a prompt being
prefilled in chunks takes what is left of the budget), then waiting requests in arrival order (FCFS), admitted only
when blocks for their first chunk are free. When a running request needs a block and none is free, the newest running
request is preempted: its blocks are freed and it goes back to the front of the waiting queue, to be recomputed (its
cached prefix blocks are often still there). A request that can never fit is failed at once instead of blocking others.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.request import Request


@dataclass
class ScheduledBatch:
    """One step's work: (request, number of its next tokens to compute), in scheduling order."""

    items: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._failed: list[Request] = []
        self.num_preemptions = 0
        self.prompt_tokens_cached = self.prompt_tokens_computed = 0

    def never_fits(self, num_prompt_tokens: int) -> str | None:
        """Why a prompt of this many tokens can never run, or None."""
        n, pool = num_prompt_tokens, self.blocks.num_blocks * self.blocks.block_size
        if n >= self.max_model_len:
            return f"prompt has {n} tokens; the model's context is {self.max_model_len} tokens"
        if n >= pool:
            return f"prompt has {n} tokens; the KV cache holds {pool} tokens (give it more memory)"
        return None

    def add(self, req: Request):
        """Queue a request; one that can never fit fails with `req.error` in the next step's ScheduledBatch.failed. Caps the
        request's max_new_tokens so it always fits alone."""
        n, pool = len(req.seq.prompt_ids), self.blocks.num_blocks * self.blocks.block_size
        req.error = self.never_fits(n)
        if req.error:
            self._failed.append(req)
            return
        # the last generated token is never cached, so prompt + max_new_tokens - 1 tokens must fit
        req.seq.max_new_tokens = min(req.seq.max_new_tokens, self.max_model_len - n, pool - n + 1)
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._failed)

    def schedule(self) -> ScheduledBatch:
        batch, budget = ScheduledBatch(failed=self._failed), self.max_num_batched_tokens
        self._failed = []
        i = 0
        while i < len(self.running) and budget:
            req = self.running[i]
            # a prefill chunk leaves one token of budget for each running request after it
            n = min(req.num_tokens - req.num_computed, max(1, budget - (len(self.running) - i - 1)))
            need = self.blocks.blocks_needed(req.id, req.num_computed + n)
            while need > self.blocks.num_free and self.running[-1] is not req:
                self._preempt(self.running.pop(), batch)
            if need > self.blocks.num_free:  # req is the newest: it yields to the older ones
                self._preempt(self.running.pop(), batch)
                break
            self.blocks.grow(req.id, req.num_computed + n)
            batch.items.append((req, n))
            budget -= n
            i += 1
        while self.waiting and budget and not batch.preempted and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            ids = req.token_ids
            cached, keys = self.blocks.match(ids, len(ids) - 1)  # at least one token is computed, for its logits
            if self.blocks.is_pending(keys, len(cached)):
                break  # a running request is computing the next block: take it from the cache next step
            start = len(cached) * self.blocks.block_size
            n = min(len(ids) - start, budget)
            if self.blocks.blocks_for(start + n) - len(cached) > self.blocks.free_after_match(cached):
                break
            self.waiting.popleft()
            self.blocks.start(req.id, cached, keys)
            self.blocks.grow(req.id, start + n)
            req.num_computed = start
            if req.cached_tokens < 0:
                req.cached_tokens, req.t_scheduled = start, time.perf_counter()
                self.prompt_tokens_cached += start
                self.prompt_tokens_computed += len(ids) - start
            self.running.append(req)
            batch.items.append((req, n))
            budget -= n
        return batch

    def _preempt(self, req: Request, batch: ScheduledBatch):
        self.blocks.free(req.id)
        req.num_computed = 0
        req.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        batch.preempted.append(req)

    def remove(self, req: Request):
        """Take a finished or aborted request out of the queues and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free(req.id)
        req.t_finished = time.perf_counter()
