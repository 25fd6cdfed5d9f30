"""The sampler: picks one token per row of a (B, V) logits tensor, each row with its own SamplingParams.

Steps, in ExLlamaV2's order (XTC, which ExLlamaV2 lacks, goes after temperature; skew reshapes the final draw):

  1. penalties     repetition over prompt+output (last `repetition_range` tokens, fading out over the
                   `repetition_decay` tokens before them); frequency and presence over output tokens only (OpenAI)
  2. masks         logit_bias, allowed/disallowed tokens, banned_now, EOS until min_new_tokens (always with ignore_eos)
  3. DRY           penalise the token that would extend a repeat of the recent context (it only subtracts, so it
                   is applied right after the penalties)
     -- greedy rows (temperature 0) take the argmax here --
  4. smoothing     quadratic: l' = max - s * (l - max)^2
  5. temperature   l / T, unless temperature_last or dynamic temperature (then after step 6)
  6. truncation    top_k, top_p, top_a, min_p, tfs, typical, each on the renormalised survivors of the previous
  7. temperature   temperature_last rows, and dynamic temperature: T from the normalised entropy of the survivors
  8. XTC           with probability xtc_probability, drop every token with p >= xtc_threshold but the least likely
  9. mirostat v2   keep tokens with surprise <= mu (at least the top one); mu moves towards tau after the draw
 10. skew          the draw's cdf C becomes C ** exp(skew) (ExLlamaV2's u ** exp(-skew) in inverse-cdf form)
 11. draw          argmax(p / q), q ~ Exponential(1), without a host sync (inverse cdf on the CPU)

Steps 1-3 are sparse edits of the working logits (penalties.py); steps 4-10 run on groups of sampled rows
(filters.py), each group over the whole vocabulary or, on the CPU, over its rows' candidates (candidates.py); step
11 and the logprobs are draw.py's. Every step is vectorised over rows with per-row parameter tensors (metadata.py); a
step whose parameter is off in every row is skipped, and rows with it off pass through unchanged. Per-row Python loops
remain only where a row owns state: seeded rows draw their noise (and XTC coin) from their own generator, one row at
a time, so a seeded row gives the same tokens alone or in any batch; mirostat mu is read and written per row;
histories are gathered per row (and, while every row just appends a token, extended by one column a step).

Each step's plain PyTorch form is the reference, and what other devices run: every row in the full space, no host
sync. On the CPU a sort of V, a random number, an argmax and a fresh (B, V) tensor cost far more and reading a
tensor on the host costs nothing, so CPU tensors take other forms of some steps (a Route): the caller's logits as the
working tensor, DRY at few positions, candidate space, numpy sorts, the inverse-cdf draw and, where csrc/sampler.cpp
builds, its ops. The Sampler builds both routes at construction (`kernels`, `cpu_paths`, `tiers`); a call takes its
logits' device's. The (B, V) working tensors are buffers kept across calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from tokenmill.kernels.cpu.extension import ops
from tokenmill.sampling.candidates import CHUNK, TIERS, CandidateSpace
from tokenmill.sampling.draw import argmax, block_argmax, draw, draw_cpu, logprobs
from tokenmill.sampling.filters import (Group, distribution, mirostat_update, smooth_, softmax, softmax_cpu, sort, sort_cpu,
                                        truncate)
from tokenmill.sampling.metadata import SamplingMetadata, h2d
from tokenmill.sampling.penalties import Edits, Owners, dry, dry_sparse, mask, penalize, penalize_kernel
from tokenmill.sampling.state import SeqSamplingState, dry_breaker_ids

__all__ = ["SampleOutput", "Sampler", "SeqSamplingState", "dry_breaker_ids"]

_UNDO_RATIO = 256  # a (B, V) copy costs about as much as writing V / _UNDO_RATIO scattered entries per row, twice


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor | None = None  # (B,) logprob of the chosen token under the final distribution
    top_ids: torch.Tensor | None = None  # (B, N), N = the largest top_logprobs asked for in the batch
    top_logprobs: torch.Tensor | None = None  # (B, N)
    exhausted: list[int] = field(default_factory=list)  # rows whose masks left no token (their token is meaningless)


@dataclass(frozen=True)
class Route:
    """The forms of the steps that the CPU's route and the reference route do differently."""

    penalize: Callable  # (edits, window (B, L), meta, seqs): step 1 over each row's trailing history
    dry: Callable  # (history (B, L), meta) -> (rows, token ids, penalty) (n,): step 3
    argmax: Callable  # (x (B, V), x's block maxima by block size) -> (B,)
    sort: Callable  # (values (R, C), descending, ids) -> sorted values and ids, ties in id order
    softmax: Callable  # (x (R, C), owned: x may be overwritten, buffer) -> probs
    draw: Callable  # (group, meta, seqs, buffer) -> (R,) columns: step 11
    candidates: CandidateSpace | None = None  # None: every row in the full space
    lib: object = None  # csrc/sampler.cpp's ops, or None
    borrow: bool = False  # the caller's logits may be the working tensor (their edits undone)


@dataclass
class Trace:
    """What the last call did, for tests and benchmarks to read."""

    routes: tuple[list[list[int]], list[int]] | None = None  # candidate groups' rows, rows left for the full space
    smoothed: list[int] = field(default_factory=list)  # widths of the logits smoothed (V: whole rows)


class Sampler:
    """Callable sampler. `vocab_size` is the tokenizer's; logits columns beyond it (padded heads) are never drawn.

    Args:
        kernels: "auto": csrc/sampler.cpp's ops on CPU tensors where they build (an AVX-512 VNNI and BF16 CPU);
            "torch": their PyTorch reference.
        cpu_paths: False: CPU tensors take the reference route too, as other devices do.
        tiers: the candidate space's tiers, in candidates.TIERS' form.
    """

    def __init__(self, vocab_size: int, *, kernels: str = "auto", cpu_paths: bool = True, tiers=TIERS):
        if kernels not in ("auto", "torch"):
            raise ValueError(f"kernels must be 'auto' or 'torch', got {kernels!r}")
        self.vocab_size = vocab_size
        self.ops = ops("sampler") if kernels == "auto" else None  # None too where they did not build
        self._owners = Owners()  # the reference penalties' (B, V) map
        self._reference = Route(partial(penalize, owners=self._owners), dry, argmax, sort, softmax, draw)
        self._cpu = self._cpu_route(tiers) if cpu_paths else self._reference
        self._meta: SamplingMetadata | None = None
        self._buffers: dict[str, torch.Tensor] = {}  # by name
        self.trace = Trace()

    def _cpu_route(self, tiers) -> Route:
        """The CPU's forms of the steps, with csrc/sampler.cpp's ops where self.ops holds them."""
        lib, space = self.ops, CandidateSpace(tiers, self.ops)
        penalize_cpu = partial(penalize_kernel, lib=lib, block=space.block) if lib else self._reference.penalize
        return Route(penalize_cpu, dry_sparse, partial(block_argmax, lib=lib), sort_cpu, softmax_cpu, draw_cpu,
                     candidates=space, lib=lib, borrow=True)

    @torch.inference_mode()  # the runner's logits are inference tensors, which only inference mode edits in place
    def __call__(self, logits: torch.Tensor, seqs: list[SeqSamplingState]) -> SampleOutput:
        """Sample one token per row of `logits` (B, V); row i uses seqs[i]. `logits` is left as it was."""
        route = self._route(logits)
        meta, x, edits = self._prepare(logits, seqs, route)  # steps 1-3: penalties, masks, DRY
        try:
            out = self._greedy(x, meta, route, edits)  # greedy rows: the argmax
            out.exhausted = exhausted(x, seqs)
            for g in self._groups(x, meta, seqs, route, edits):  # steps 4-10, for groups of sampled rows
                cols = route.draw(g, meta, seqs, self._buffer)  # step 11
                self._emit(out, g, cols, meta, seqs)
            return out
        finally:
            edits.undo()
            for s in seqs:
                s.banned_now.clear()

    @torch.inference_mode()
    def probs(self, logits: torch.Tensor, seqs: list[SeqSamplingState]) -> torch.Tensor:
        """(B, V) distribution the next draw would use; greedy rows are one-hot at their argmax.

        Like a real step it draws the XTC coin from seeded rows' generators; it changes no other state.
        """
        route = self._route(logits)
        meta, x, edits = self._prepare(logits, seqs, route)
        try:
            out = torch.zeros_like(x).scatter_(1, route.argmax(x, edits.block_max())[:, None], 1.0)
            for g in self._groups(x, meta, seqs, route, edits):
                out[g.sl] = g.probs if g.ids is None else torch.zeros_like(out[g.sl]).scatter_add_(1, g.ids, g.probs)
            return out
        finally:
            edits.undo()

    def _route(self, logits: torch.Tensor) -> Route:
        return self._cpu if logits.device.type == "cpu" else self._reference

    def _prepare(self, logits, seqs, route: Route) -> tuple[SamplingMetadata, torch.Tensor, Edits]:
        """Steps 1-3: the metadata, and the working tensor x (B, V) with its edits (undone if a step fails)."""
        B, V = logits.shape
        if B != len(seqs) or V < self.vocab_size:
            raise ValueError(f"logits {tuple(logits.shape)} do not fit {len(seqs)} seqs, vocab {self.vocab_size}")
        dev = logits.device
        if self._meta is None or not self._meta.matches(seqs, V, dev):
            self._meta = SamplingMetadata(seqs, V, dev, candidate_space=route.candidates is not None)
        meta, self.trace = self._meta, Trace()
        for s in seqs:
            if s.params.mirostat_mode and s.mirostat_mu is None:
                s.mirostat_mu = h2d(2.0 * s.params.mirostat_tau, torch.float32, dev)
        hist = meta.histories(seqs) if meta.any_hist else None
        width = meta.width(seqs, meta.pen_windows) if hist is not None and (meta.any_rep or meta.any_fp) else 0
        edits = self._working(logits, meta, width, route)
        try:
            if V > self.vocab_size:  # a padded head
                edits.fill_tail(self.vocab_size)
            if width:  # over the penalties' window (DRY may read further back)
                route.penalize(edits, hist[:, max(hist.shape[1] - width, 0):], meta, seqs)
            if hist is not None and meta.any_dry:  # DRY only subtracts: it commutes with the masks after it
                rows, tokens, penalty = route.dry(hist, meta)
                edits.put(rows, tokens, edits.x[rows, tokens] - penalty)  # one value per token, however often listed
            mask(edits, meta, seqs)
        except BaseException:
            edits.undo()
            raise
        return meta, edits.x, edits

    def _working(self, logits, meta: SamplingMetadata, width: int, route: Route) -> Edits:
        """The working tensor's Edits: where the route borrows, the caller's logits themselves, edited sparsely and
        restored after the call, unless the penalties' window is long enough that its scattered writes, and their
        undoing, to memory the caller left cold cost more than a copy; a copy in a reused buffer elsewhere, and where
        smoothing rewrites whole rows."""
        B, V = logits.shape
        plain = logits.dtype == torch.float32 and logits.is_contiguous() and not logits.requires_grad
        if route.borrow and plain and not meta.smooth_full and width * _UNDO_RATIO < V:
            return Edits(logits, undoable=True)
        x = self._buffer("x", B, V, logits.device)
        if route.lib is not None and plain:  # the copy also takes the block maxima the candidate space needs
            G = route.candidates.block(V)
            return Edits(x, False, (G, route.lib.copy_block_max(logits, x, G)), route.lib)
        return Edits(x.copy_(logits), undoable=False)

    def _greedy(self, x, meta: SamplingMetadata, route: Route, edits: Edits) -> SampleOutput:
        """The output with every row's argmax where any row is greedy (sampled rows overwrite theirs), and the greedy
        rows' logprobs: of the processed logits at temperature 1."""
        B, n, dev = x.shape[0], meta.n_top, x.device
        out = SampleOutput(route.argmax(x, edits.block_max()) if meta.any_greedy
                           else torch.empty(B, dtype=torch.long, device=dev))
        if meta.any_logprobs:
            out.logprobs = torch.empty(B, device=dev)
            if n:
                out.top_logprobs = torch.empty(B, n, device=dev)
                out.top_ids = torch.empty(B, n, dtype=torch.long, device=dev)
            if meta.any_greedy:
                sl = meta.index(meta.greedy_rows)
                xg = x[sl]
                lse = torch.logsumexp(xg, -1, keepdim=True)
                out.logprobs[sl] = (xg.gather(1, out.tokens[sl][:, None]) - lse).squeeze(1)
                if n:
                    top, out.top_ids[sl] = xg.topk(n, dim=-1)
                    out.top_logprobs[sl] = top - lse
        return out

    def _groups(self, x, meta: SamplingMetadata, seqs, route: Route, edits: Edits) -> list[Group]:
        """Steps 4-10 for the sampled rows, in groups: candidate space where the route has it, the rest in the full
        space; sets each group's distribution to draw from (and mirostat's, before skew)."""
        if meta.all_greedy:
            return []
        blocks, t1 = edits.block_max(), meta.t1
        if meta.smooth_full:  # rows that measure the whole vocabulary's mass or entropy, or use the full space
            t1, blocks = self._smooth_rows(x, meta, edits.undoable), {}
        groups, rest = [], meta.sampled
        if route.candidates and any(meta.bound[i] for i in rest):
            # smoothing and temperature keep each row's order, so candidate rows apply them to their candidates only
            smooth = meta.smooth * h2d([i in meta.smooth_late for i in range(meta.B)], torch.float32, x.device)
            tmp = self._buffer("tmp", min(meta.B, CHUNK), x.shape[1], x.device)
            groups, rest = route.candidates(x, t1, smooth, meta, tmp, blocks, self.trace.smoothed)
            self.trace.routes = [g.rows for g in groups], rest
        if rest:
            groups.append(self._full_space(x, rest, t1, meta, edits.undoable, route.sort))
        for g in groups:
            distribution(g, meta, seqs, route.sort, route.softmax, self._buffer)
        return groups

    def _smooth_rows(self, x, meta: SamplingMetadata, borrowed: bool) -> torch.Tensor:
        """Steps 4-5 on the whole rows meta.smooth_full of x, in place; returns t1 (B,) with theirs done (1)."""
        assert not borrowed
        sl = meta.index(meta.smooth_full)
        xs = self._rows(x, sl, "smooth", copy=False)
        self.trace.smoothed.append(xs.shape[-1])
        smooth_(xs, xs.amax(-1, keepdim=True), meta.smooth[sl, None], meta.t1[sl, None])
        if not isinstance(sl, slice):
            x[sl] = xs
        return meta.t1.index_fill(0, h2d(meta.smooth_full, torch.long, x.device), 1.0)

    def _full_space(self, x, rows: list[int], t1, meta: SamplingMetadata, borrowed: bool, sort) -> Group:
        """Steps 4-6 for `rows` over the whole vocabulary (smoothing for those that left candidate space unsmoothed):
        their Group, on x itself where no step edits it, else on a copy where x is `borrowed`."""
        V = x.shape[1]
        sl = meta.index(rows)
        back = [r for r, i in enumerate(rows) if i in meta.smooth_late]  # left candidate space unsmoothed
        edit = back or meta.any_t1 or meta.any_t2 or any(meta.first[i] for i in rows)  # xr in place, below
        xr = self._rows(x, sl, "rest", copy=borrowed and edit)
        if back:
            k, idx = h2d(back, torch.long, x.device), h2d([rows[r] for r in back], torch.long, x.device)
            xb = xr[k]
            self.trace.smoothed.append(V)
            xr[k] = smooth_(xb, xb.amax(-1, keepdim=True), meta.smooth[idx, None], t1[idx, None])
            t1 = t1.index_fill(0, idx, 1.0)
        if meta.any_t1:
            xr.div_(t1[sl, None])
        if any(meta.first[i] for i in rows):
            xr, _ = truncate(xr, meta, sl, sort)
        return Group(rows, sl, xr, None, [V] * len(rows))

    def _emit(self, out: SampleOutput, g: Group, cols, meta: SamplingMetadata, seqs) -> None:
        """Group g's drawn columns cols (R,) into out (tokens, logprobs); mirostat's mu moved."""
        out.tokens[g.sl] = g.tokens(cols)
        if g.mu is not None:
            mirostat_update(g, cols, meta, seqs)
        if meta.any_logprobs:
            out.logprobs[g.sl], top = logprobs(g, cols, meta.n_top, meta.vocab)
            if meta.n_top:
                out.top_logprobs[g.sl], out.top_ids[g.sl] = top

    def _buffer(self, name: str, B: int, V: int, dev) -> torch.Tensor:
        # reused (B, V) float32 buffers: on the CPU a fresh one costs ~V * B / 1024 page faults every call
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < B or buf.shape[1] != V or buf.device != dev:
            buf = self._buffers[name] = torch.zeros(B, V, dtype=torch.float32, device=dev)
        return buf[:B]

    def _rows(self, x: torch.Tensor, sl, name: str, copy: bool) -> torch.Tensor:
        """x[sl] in buffer `name`; x itself for all rows unless `copy`."""
        if isinstance(sl, slice):
            return self._buffer(name, x.shape[0], x.shape[1], x.device).copy_(x) if copy else x
        return torch.index_select(x, 0, sl, out=self._buffer(name, len(sl), x.shape[1], x.device))


def exhausted(x: torch.Tensor, seqs: list[SeqSamplingState]) -> list[int]:
    """Rows of x (B, V), after the masks, with every token at -inf: only rows with allowed_tokens can get there (their
    allowed ids all disallowed, biased to -inf, banned after a rewind, or EOS held back by min_new_tokens)."""
    rows = [i for i, s in enumerate(seqs) if s.params.allowed_tokens is not None]
    if not rows:
        return []
    empty = (x[rows].amax(-1) == float("-inf")).tolist()
    return [r for r, e in zip(rows, empty) if e]
