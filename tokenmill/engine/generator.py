"""The token step: prefill each sequence, then decode every unfinished one together, one token per step.

Yields (sequence index, released text) after every sampled token. Finishing, stop strings and banned-string rewinds are
decided by `Sequence.append`; this loop only keeps the KV cache in step with each sequence's tokens.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch

from tokenmill.engine.contiguous_cache import KVCache
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.sampling.sampler import Sampler
from tokenmill.engine.sequence import Sequence


def _sample(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence]) -> list[str]:
    out = sampler(logits, [s.state for s in seqs])
    tokens = out.tokens.tolist()
    lps = out.logprobs.tolist() if out.logprobs is not None else [None] * len(seqs)
    return [s.append(t, lp if s.params.logprobs else None) for s, t, lp in zip(seqs, tokens, lps)]


def generate_steps(runner: ModelRunner, sampler: Sampler, cache: KVCache, seqs: list[Sequence]) -> Iterator[tuple[int, str]]:
    for i, s in enumerate(seqs):
        s.t_start = time.perf_counter()
        s.cached_tokens = cache.reuse_prefix(s.row, s.prompt_ids)
        logits = runner.prefill(cache, s.row, s.prompt_ids[s.cached_tokens :])
        yield i, _sample(sampler, logits[None], [s])[0]
    while True:
        active = [(i, s) for i, s in enumerate(seqs) if not s.finished]
        if not active:
            return
        for _, s in active:
            if cache.length(s.row) != s.cache_length:  # after a banned-string rewind
                cache.truncate(s.row, s.cache_length)
        act = [s for _, s in active]
        logits = runner.decode(cache, [s.row for s in act], [s.last_token for s in act])
        for (i, _), text in zip(active, _sample(sampler, logits, act)):
            yield i, text
