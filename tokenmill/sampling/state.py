"""One sequence's sampling state (SeqSamplingState), owned by the caller and updated by the sampler."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tokenmill.sampling.metadata import h2d
from tokenmill.sampling.params import SamplingParams


def dry_breaker_ids(breakers: Sequence[str], pieces: Sequence[str]) -> frozenset[int]:
    """Token ids whose decoded text (pieces[id]) contains any of `breakers`; DRY matches never cross them."""
    return frozenset(i for i, piece in enumerate(pieces) if any(b in piece for b in breakers))


@dataclass
class SeqSamplingState:
    """One sequence's sampling state, owned by the caller and updated by the sampler.

    The caller appends each sampled token to output_ids; it may also truncate output_ids (rewind), but not
    rewrite tokens in place. banned_now is cleared after each draw.
    """

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    mirostat_mu: torch.Tensor | None = None  # () float32 on the logits' device
    banned_now: set[int] = field(default_factory=set)
    eos_ids: frozenset[int] = frozenset()
    dry_breaker_ids: frozenset[int] = frozenset()
    _hist: torch.Tensor | None = field(default=None, repr=False)  # prompt + output ids on device, with spare room
    _n_out: int = field(default=0, repr=False)  # output ids copied into _hist
    _last: int = field(default=-1, repr=False)  # output_ids[_n_out - 1] when copied

    @classmethod
    def new(cls, params: SamplingParams, prompt_ids: Sequence[int], device: torch.device | str,
            eos_ids: Sequence[int] = (), dry_breaker_ids: frozenset[int] = frozenset()) -> SeqSamplingState:
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed)
        mu = None
        if params.mirostat_mode:
            mu = h2d(2.0 * params.mirostat_tau, torch.float32, device)
        return cls(params, list(prompt_ids), [], generator, mu, set(), frozenset(eos_ids), frozenset(dry_breaker_ids))

    def history(self, device: torch.device) -> torch.Tensor:
        """(L,) int64 prompt + output ids on `device`; only tokens added since the last call are copied."""
        device = torch.device(device)
        n, n_prompt = len(self.output_ids), len(self.prompt_ids)
        stale = (self._hist is None or self._hist.device != device
                 or (0 < self._n_out <= n and self.output_ids[self._n_out - 1] != self._last))
        if stale:
            self._hist, self._n_out = torch.empty(0, dtype=torch.long, device=device), 0
        self._n_out = min(self._n_out, n)
        if stale or n > self._n_out:
            new = (self.prompt_ids if stale else []) + self.output_ids[self._n_out:]
            start = 0 if stale else n_prompt + self._n_out
            if start + len(new) > self._hist.numel():
                grown = torch.empty(max(64, 2 * (start + len(new))), dtype=torch.long, device=device)
                grown[:start] = self._hist[:start]
                self._hist = grown
            self._hist[start:start + len(new)] = h2d(new, torch.long, device)
            self._n_out = n
        self._last = self.output_ids[n - 1] if n else -1
        return self._hist[:n_prompt + n]
