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
 11. draw          argmax(p / q), q ~ Exponential(1), without a host sync (see below for the CPU)

Every step is vectorised over rows with per-row parameter tensors; a step whose parameter is off in every row is
skipped, and rows with it off pass through unchanged. Per-row Python loops remain only where a row owns state:
seeded rows draw their noise (and XTC coin) from their own generator, one row at a time, so a seeded row gives the
same tokens alone or in any batch; mirostat mu is read and written per row; histories are gathered per row (and,
while every row just appends a token, extended by one column a step). Penalties touch only the history's tokens:
gather, adjust, scatter on (B, L) index tensors, each token's newest position found through a (B, V) map that is
never cleared. Filters keep ties: a token tied with the last one kept is kept too.

On the CPU (CPU_DEVICES) torch's sort of V costs ~7 ms a row, a random number ~20 ns, argmax ~10x an amax, a fresh
(B, V) tensor thousands of page faults, and each pass over (B, V) about a millisecond at B = 64, while reading a
tensor on the host is free. So there:
  - the caller's logits are the working tensor: the sparse edits of steps 1-3 are undone before returning (a copy
    in a reused buffer instead where the penalties' window is long enough that scattered writes cost more);
  - a sampled row whose filters bound its survivors from below runs steps 4-11 in candidate space, on its tokens
    with logit >= tau: below the blocks that hold k tokens (top_k), the threshold less a margin (min_p, also after
    top_p; top_a), or a bound checked afterwards (top_p: below the blocks holding about top_p of the whole mass,
    from a histogram of the block maxima weighted by the block masses; typical: every token outside is further from
    the whole entropy than the last one kept). Ties with tau are candidates too, and each row checks that its
    survivors lie strictly above every token outside, so the result is exact; rows whose check fails retry with a
    lower bound, then join the rows with no such filter (or tfs first) in the full space. Candidates are found with
    numpy's flatnonzero (~2x torch's nonzero) and sorted in groups of rows of similar counts by numpy's sort of int64
    keys (value bits, then id: ~10x torch's sort);
  - rows draw by inverse cdf with one uniform each (a seeded row's from its own generator), and DRY compares only
    the positions whose previous token is the newest;
  - where csrc/sampler.cpp builds (`_kernels`), its ops replace the (B, V) passes, with this PyTorch code as their
    reference and fallback: the working copy takes the block maxima on the way (`copy_block_max`), which the
    penalties (one pass per row over its window: `penalties`, instead of gather/owners/scatter) and every other
    edit keep current; the whole-row masses and entropy (`block_masses`, `masses`) and the candidates' compaction
    and sort (a stable radix sort on the value bits: `candidates`) are one pass each per row.
Other devices run every row in the full space: a sort is cheap there, and choosing rows would need a host sync.
The (B, V) working tensors are buffers kept across calls.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from tokenmill.kernels.cpu.extension import ops
from tokenmill.errors import InvalidRequestError
from tokenmill.sampling.params import SamplingParams

DRY_MAX_MATCH = 50  # longest repeat DRY measures: bounds base ** length and the work per step
_MIN_TEMP = 1e-4  # dynamic temperature floor (dynatemp_min may be 0)
_NEG_INF = float("-inf")
_BLOCK = 32  # tokens per block: the CPU's greedy argmax and inverse cdf
CPU_DEVICES = ("cpu",)  # device types that take the CPU's paths (module docstring)
# candidate tiers, tried in turn: (block size, a power of two; blocks at or above tau for typical rows; top_p rows:
# tau's margin below the block-histogram estimate, in logits after temperature; most candidates a row may have).
# With V = 49152 and a model's logits at T = 1, top_p = 0.9, the first holds ~86% of rows and the second the rest.
_TIERS = ((32, 256, 1.5, 16384), (32, 1024, 5.0, 32768))
_BINS = 8  # bins per unit of logit (top_p: after temperature) of the block-maxima histogram that places tau
_WIDTHS = (512, 2048, 8192)  # rows whose candidates fit the same width are sorted together; the rest as one more
_UNDO_RATIO = 256  # a (B, V) copy costs about as much as writing V / _UNDO_RATIO scattered entries per row, twice
_CHUNK = 8  # rows per step of the whole-vocabulary pass (_masses): 8 x V floats stay in a core's L2 cache
_FILTERS = {"top_k": lambda p: p.top_k > 0, "top_p": lambda p: p.top_p < 1.0, "top_a": lambda p: p.top_a > 0,
            "min_p": lambda p: p.min_p > 0, "tfs": lambda p: p.tfs < 1.0, "typical_p": lambda p: p.typical_p < 1.0}


@functools.cache
def _kernels():
    """torch.ops.tokenmill with csrc/sampler.cpp's ops loaded, or None: keep the PyTorch path (their reference)."""
    return ops("sampler")


def _kernel(x: torch.Tensor):
    """The C++ ops where they can take x (a contiguous float32 (B, V) CPU tensor), else None."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and not x.requires_grad:
        return _kernels()
    return None


def _h2d(values: list, dtype: torch.dtype, device) -> torch.Tensor:
    # a plain torch.tensor(..., device=cuda) copy waits for the stream; this one does not
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


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
            mu = _h2d(2.0 * params.mirostat_tau, torch.float32, device)
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
            self._hist[start:start + len(new)] = _h2d(new, torch.long, device)
            self._n_out = n
        self._last = self.output_ids[n - 1] if n else -1
        return self._hist[:n_prompt + n]


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor | None = None  # (B,) logprob of the chosen token under the final distribution
    top_ids: torch.Tensor | None = None  # (B, N), N = the largest top_logprobs asked for in the batch
    top_logprobs: torch.Tensor | None = None  # (B, N)


class _Plan:
    """Per-row parameter tensors for one list of sequences; rebuilt only when the list changes."""

    def __init__(self, seqs: list[SeqSamplingState], vocab: int, device: torch.device):
        ps = [s.params for s in seqs]
        self.seqs, self.params = list(seqs), ps
        B = len(ps)
        greedy = [p.is_greedy for p in ps]
        on = lambda pred: [not g and pred(p) for p, g in zip(ps, greedy)]  # sampling steps skip greedy rows
        vec = lambda xs, dtype=torch.float32: _h2d(xs, dtype, device)
        self.B, self.vocab, self.device = B, vocab, device
        self.any_greedy, self.all_greedy = any(greedy), all(greedy)
        self.sampled = [i for i, g in enumerate(greedy) if not g]
        self.greedy_rows = [i for i, g in enumerate(greedy) if g]

        # penalties and DRY read the history; the window is how many trailing tokens each row needs (None: all)
        rep = [p.repetition_penalty != 1.0 for p in ps]
        fp = [p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in ps]
        dry = [p.dry_multiplier > 0.0 for p in ps]
        self.any_rep, self.any_fp, self.any_dry = any(rep), any(fp), any(dry)
        self.rep = vec([p.repetition_penalty for p in ps])
        self.rep_range = vec([p.repetition_range or math.inf for p in ps])
        self.rep_decay = vec([p.repetition_decay if p.repetition_range else 0 for p in ps])
        self.freq, self.pres = vec([p.frequency_penalty for p in ps]), vec([p.presence_penalty for p in ps])
        self.dry_mult, self.dry_base = vec([p.dry_multiplier for p in ps]), vec([p.dry_base for p in ps])
        self.dry_allowed = vec([p.dry_allowed_length for p in ps])
        self.dry_range = vec([p.dry_range or math.inf for p in ps])
        # per row: lists of needs, each an int count of trailing tokens, "out" or None (all); the penalties' alone
        self.pen_windows = [([p.repetition_range + p.repetition_decay if p.repetition_range else None] if r else [])
                            + (["out"] if f else []) for p, r, f in zip(ps, rep, fp)]
        self.windows = [w + ([p.dry_range or None] if d else []) for p, w, d in zip(ps, self.pen_windows, dry)]
        self.any_hist = any(self.windows)
        if self.any_dry:
            self.breakers = torch.zeros(B, vocab, dtype=torch.bool)
            for i, s in enumerate(seqs):
                if dry[i] and s.dry_breaker_ids:
                    self.breakers[i, list(s.dry_breaker_ids)] = True
            self.breakers = self.breakers.to(device)

        # sparse (rows, cols, values), added to the logits: logit_bias, -inf outside allowed_tokens and on disallowed
        self.bias = None
        biased = [i for i, p in enumerate(ps) if p.logit_bias or p.disallowed_tokens or p.allowed_tokens is not None]
        if biased:
            bias = torch.zeros(len(biased), vocab)
            for row, i in zip(bias, biased):
                p = ps[i]
                for name, ids in (("logit_bias", p.logit_bias), ("disallowed_tokens", p.disallowed_tokens),
                                  ("allowed_tokens", p.allowed_tokens or [])):
                    if any(t >= vocab for t in ids):
                        raise InvalidRequestError(
                            f"{name} token ids must be < vocab size {vocab}, got {max(ids)}")
                if p.allowed_tokens is not None:
                    row[:] = _NEG_INF
                    row[p.allowed_tokens] = 0.0
                if p.logit_bias:
                    row[list(p.logit_bias)] += torch.tensor(list(p.logit_bias.values()))
                row[p.disallowed_tokens] = _NEG_INF
            r, c = bias.nonzero(as_tuple=True)
            self.bias = (torch.tensor(biased)[r].to(device), c.to(device), bias[r, c].to(device))

        smooth = on(lambda p: p.smoothing_factor > 0)
        self.smooth_rows = [i for i, s in enumerate(smooth) if s]
        self.smooth = vec([p.smoothing_factor for p in ps])
        dyn = on(lambda p: p.dynatemp_max > p.dynatemp_min)
        late = [d or (not g and p.temperature_last) for p, g, d in zip(ps, greedy, dyn)]
        t1 = [1.0 if g or l else p.temperature for p, g, l in zip(ps, greedy, late)]
        t2 = [p.temperature if l and not d else 1.0 for p, l, d in zip(ps, late, dyn)]
        self.any_t1, self.t1 = any(t != 1.0 for t in t1), vec(t1)
        self.any_t2, self.t2 = any(t != 1.0 for t in t2) or any(dyn), vec(t2)
        self.any_dyn, self.dyn = any(dyn), vec(dyn, torch.bool)
        self.dyn_min, self.dyn_max = vec([p.dynatemp_min for p in ps]), vec([p.dynatemp_max for p in ps])
        self.dyn_exp = vec([p.dynatemp_exponent for p in ps])

        self.filters = {}  # name -> (per-row value, per-row on, on in every sampled row) for filters on in some row
        for name, pred in _FILTERS.items():
            mask = on(pred)
            if any(mask):
                dtype = torch.long if name == "top_k" else torch.float32
                all_on = all(m or g for m, g in zip(mask, greedy))  # greedy rows ignore the result
                self.filters[name] = (vec([getattr(p, name) for p in ps], dtype), vec(mask, torch.bool), all_on)
        # candidate space (_candidate_groups): each sampled row's first filter, and the filter that bounds its
        # candidates: the first, or min_p after top_p (min_p only compares with the top token, so top_p may keep
        # more than the candidates then); "": the full space (no filter, or tfs first)
        self.first = [next((n for n in _FILTERS if not g and _FILTERS[n](p)), "") for p, g in zip(ps, greedy)]
        self.bound = ["min_p" if f == "top_p" and p.min_p > 0 and p.top_a == 0 else "" if f == "tfs" else f
                      for p, f in zip(ps, self.first)]
        self.bound_on = {n: vec([b == n for b in self.bound], torch.bool) for n in set(self.bound) - {""}}
        self.top_k = [p.top_k for p in ps]
        # smoothed rows that stay in candidate space smooth their candidates only; the others rewrite whole rows
        late = lambda i: self.bound[i] in ("top_k", "min_p") and self.first[i] not in ("top_p", "top_a", "typical_p")
        cpu = torch.device(device).type in CPU_DEVICES
        self.smooth_late = {i for i in self.smooth_rows if cpu and late(i)}
        self.smooth_full = [i for i in self.smooth_rows if i not in self.smooth_late]
        self._needs = {}  # id(windows) -> width()'s summary of them
        self._hist = None  # the last call's histories (B, L), with each row's output length and last token then

        self.xtc_rows = {i for i, x in enumerate(on(lambda p: p.xtc_probability > 0)) if x}
        self.xtc_prob, self.xtc_thr = vec([p.xtc_probability for p in ps]), vec([p.xtc_threshold for p in ps])
        miro = on(lambda p: p.mirostat_mode == 2)
        self.miro_rows, self.miro_on = {i for i, m in enumerate(miro) if m}, vec(miro, torch.bool)
        self.tau, self.eta = vec([p.mirostat_tau for p in ps]), vec([p.mirostat_eta for p in ps])
        skew = on(lambda p: p.skew != 0)
        self.skew_rows, self.skew_on = {i for i, s in enumerate(skew) if s}, vec(skew, torch.bool)
        self.skew_exp = vec([math.exp(p.skew) for p in ps])

        self.seeded_rows = {i for i, s in enumerate(seqs) if not greedy[i] and s.generator is not None}
        self.any_logprobs = any(p.logprobs for p in ps)
        self.n_top = max(p.top_logprobs for p in ps)

    def histories(self, seqs: list[SeqSamplingState]) -> torch.Tensor:
        """(B, L) each row's trailing prompt+output ids, right-aligned, -1 on the left where shorter: at least the
        window any row needs (older tokens are harmless: every step weighs a position by its distance). When every
        row has appended one token since the last call, that call's is extended by one column."""
        n = [len(s.output_ids) for s in seqs]
        h = self._hist
        if h is not None and all(k == k0 + 1 and (k0 == 0 or s.output_ids[k0 - 1] == last)
                                 for s, k, k0, last in zip(seqs, n, self._hist_n, self._hist_last)):
            new = _h2d([s.output_ids[-1] for s in seqs], torch.long, self.device)[:, None]
            h = torch.cat([h[:, 1:] if h.shape[1] >= self.width(seqs, self.windows) else h, new], 1)
        else:
            h = _histories(seqs, self, self.device)
        self._hist, self._hist_n, self._hist_last = h, n, [s.output_ids[-1] if s.output_ids else None for s in seqs]
        return h

    def width(self, seqs, windows) -> int:
        """The most trailing tokens any row needs (windows: plan.windows or plan.pen_windows)."""
        if id(windows) not in self._needs:  # per row: its longest fixed window (-1: all), and whether "out"
            self._needs[id(windows)] = [(-1 if None in w else max([c for c in w if c != "out"], default=0), "out" in w)
                                        if w else None for w in windows]
        width = 0
        for s, needs in zip(seqs, self._needs[id(windows)]):
            if needs:
                fixed, out = needs
                k = len(s.output_ids)
                total = len(s.prompt_ids) + k
                width = max(width, total if fixed < 0 else min(max(fixed, k if out else 0), total))
        return width

    def matches(self, seqs, vocab, device) -> bool:
        return (len(seqs) == self.B and vocab == self.vocab and device == self.device
                and all(a is b and a.params is p for a, b, p in zip(seqs, self.seqs, self.params)))

    def index(self, rows: list[int]) -> slice | torch.Tensor:
        """Indexes the per-row tensors at `rows` (ascending)."""
        return slice(None) if len(rows) == self.B else _h2d(rows, torch.long, self.device)


@dataclass
class _Group:
    """Rows of the batch sampled together over C columns each: candidates, or the whole vocabulary."""

    rows: list[int]  # batch rows, ascending
    sl: slice | torch.Tensor  # the same rows, to index per-row tensors
    x: torch.Tensor  # (R, C) logits; -inf where truncated
    ids: torch.Tensor | None  # (R, C) token id of each column; None: column j is token j
    n: list[int]  # per row, the columns in use (how many exponentials a seeded row draws)
    probs: torch.Tensor | None = None  # (R, C) the distribution to draw from
    miro_probs: torch.Tensor | None = None  # (R, C) mirostat's (before skew), for its mu update
    mu: torch.Tensor | None = None  # (R,) mirostat mu before the draw

    def tokens(self, cols: torch.Tensor) -> torch.Tensor:
        return cols if self.ids is None else self.ids.gather(1, cols[:, None]).squeeze(1)


class _Edits:
    """Sparse in-place edits of the working logits x (B, V). When undoable (x is the caller's tensor) each edit keeps
    what it overwrote and undo() puts it back, newest first: the CPU then needs no (B, V) working copy. `blocks`
    (G, (B, nb) block maxima of x, from the kernel that made x), if given, is kept current through the edits."""

    def __init__(self, x: torch.Tensor, undoable: bool, blocks: tuple[int, torch.Tensor] | None = None):
        self.x, self.undoable, self.saved = x, undoable, []
        self.blocks = blocks

    def fill_tail(self, start: int) -> None:  # columns start.. (a padded head) to -inf
        if self.undoable:
            self.saved.append((start, self.x[:, start:].clone()))
        self.x[:, start:] = _NEG_INF
        if self.blocks:
            G, blocks = self.blocks
            k = start // G
            blocks[:, k:] = _NEG_INF
            if start % G:
                blocks[:, k] = self.x[:, k * G:start].amax(-1)

    def scatter(self, ids: torch.Tensor, values: torch.Tensor, old: torch.Tensor) -> None:  # (B, L), old = x at ids
        if self.undoable:
            self.saved.append((ids, old))
        self.x.scatter_(1, ids, values)
        if self.blocks:
            _kernels().block_max_update(self.x, self.blocks[1], torch.arange(len(ids)), ids, old, self.blocks[0])

    def put(self, rows: torch.Tensor, cols: torch.Tensor, values, accumulate=False) -> None:  # (n,) each
        old = self.x[rows, cols] if self.undoable or self.blocks else None
        if self.undoable:
            self.saved.append(((rows, cols), old))
        self.x.index_put_((rows, cols), torch.as_tensor(values, device=self.x.device), accumulate=accumulate)
        if self.blocks:
            _kernels().block_max_update(self.x, self.blocks[1], rows, cols[:, None], old[:, None], self.blocks[0])

    def block_max(self) -> dict[int, torch.Tensor]:
        """{G: (B, nb) maxima of x's runs of G columns} where kept, else {}."""
        return {} if self.blocks is None else dict([self.blocks])

    def undo(self) -> None:
        for where, old in reversed(self.saved):
            if isinstance(where, int):
                self.x[:, where:] = old
            elif isinstance(where, tuple):
                self.x.index_put_(where, old)
            else:
                self.x.scatter_(1, where, old)
        self.saved.clear()


class Sampler:
    """Callable sampler. `vocab_size` is the tokenizer's; logits columns beyond it (padded heads) are never drawn."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._plan: _Plan | None = None
        self._buffers: dict[str, torch.Tensor] = {}  # by name
        self._stamp = 1  # offset of this call's positions in the "owners" map

    @torch.inference_mode()  # the runner's logits are inference tensors, which only inference mode edits in place
    def __call__(self, logits: torch.Tensor, seqs: list[SeqSamplingState]) -> SampleOutput:
        """Sample one token per row of `logits` (B, V); row i uses seqs[i]. `logits` is left as it was."""
        plan, x, edits = self._prepare(logits, seqs)
        try:
            return self._sample(plan, x, edits, seqs)
        finally:
            edits.undo()
            for s in seqs:
                s.banned_now.clear()

    def _sample(self, plan: _Plan, x: torch.Tensor, edits: _Edits, seqs) -> SampleOutput:
        (B, V), dev, n = x.shape, x.device, min(plan.n_top, x.shape[1])
        blocks = edits.block_max()
        out = SampleOutput(_argmax(x, blocks) if plan.any_greedy else torch.empty(B, dtype=torch.long, device=dev))
        if plan.any_logprobs:
            out.logprobs = torch.empty(B, device=dev)
            if n:
                out.top_logprobs, out.top_ids = torch.empty(B, n, device=dev), torch.empty(B, n, dtype=torch.long,
                                                                                           device=dev)
            if plan.any_greedy:  # greedy rows report the processed logits at temperature 1
                sl = plan.index(plan.greedy_rows)
                xg = x[sl]
                lse = torch.logsumexp(xg, -1, keepdim=True)
                out.logprobs[sl] = (xg.gather(1, out.tokens[sl][:, None]) - lse).squeeze(1)
                if n:
                    top, out.top_ids[sl] = xg.topk(n, dim=-1)
                    out.top_logprobs[sl] = top - lse
        if not plan.all_greedy:
            for g in self._distribution(x, plan, seqs, edits.undoable, blocks):
                cols = _draw(g, plan, seqs, self._buffer)
                out.tokens[g.sl] = g.tokens(cols)
                if g.mu is not None:
                    surprise = -torch.log2(g.miro_probs.gather(1, cols[:, None]).squeeze(1))
                    mu = g.mu - plan.eta[g.sl] * (surprise - plan.tau[g.sl])
                    for i, m in zip(g.rows, mu.unbind(0)):
                        if i in plan.miro_rows:
                            seqs[i].mirostat_mu = m
                if plan.any_logprobs:
                    out.logprobs[g.sl], top = _logprobs(g, cols, n, V)
                    if n:
                        out.top_logprobs[g.sl], out.top_ids[g.sl] = top
        return out

    @torch.inference_mode()
    def probs(self, logits: torch.Tensor, seqs: list[SeqSamplingState]) -> torch.Tensor:
        """(B, V) distribution the next draw would use; greedy rows are one-hot at their argmax.

        Like a real step it draws the XTC coin from seeded rows' generators; it changes no other state.
        """
        plan, x, edits = self._prepare(logits, seqs)
        try:
            blocks = edits.block_max()
            out = torch.zeros_like(x).scatter_(1, _argmax(x, blocks)[:, None], 1.0)
            for g in [] if plan.all_greedy else self._distribution(x, plan, seqs, edits.undoable, blocks):
                out[g.sl] = g.probs if g.ids is None else torch.zeros_like(out[g.sl]).scatter_add_(1, g.ids, g.probs)
            return out
        finally:
            edits.undo()

    # steps 1-3: logits after penalties, masks and DRY
    def _prepare(self, logits: torch.Tensor, seqs: list[SeqSamplingState]) -> tuple[_Plan, torch.Tensor, _Edits]:
        B, V = logits.shape
        if B != len(seqs) or V < self.vocab_size:
            raise ValueError(f"logits {tuple(logits.shape)} do not fit {len(seqs)} seqs, vocab {self.vocab_size}")
        dev = logits.device
        if self._plan is None or not self._plan.matches(seqs, V, dev):
            self._plan = _Plan(seqs, V, dev)
        plan = self._plan
        for s in seqs:
            if s.params.mirostat_mode and s.mirostat_mu is None:
                s.mirostat_mu = _h2d(2.0 * s.params.mirostat_tau, torch.float32, dev)
        hist = plan.histories(seqs) if plan.any_hist else None
        width = plan.width(seqs, plan.pen_windows) if hist is not None and (plan.any_rep or plan.any_fp) else 0
        # the working tensor: on the CPU the caller's logits themselves, edited sparsely and restored after the call,
        # unless the penalties' window is long enough that its scattered writes, and their undoing, to memory the
        # caller left cold cost more than a copy; a copy in a reused buffer elsewhere, and where smoothing rewrites
        # whole rows
        undoable = (dev.type in CPU_DEVICES and logits.dtype == torch.float32 and logits.is_contiguous()
                    and not logits.requires_grad and not plan.smooth_full and width * _UNDO_RATIO < V)
        blocks = None
        if undoable:
            x = logits
        elif (lib := _kernel(logits)) is not None:  # the copy also takes the block maxima _candidate_groups needs
            x = self._buffer("x", B, V, dev)
            G = _tier_block(V)
            blocks = G, lib.copy_block_max(logits, x, G)
        else:
            x = self._buffer("x", B, V, dev).copy_(logits)
        edits = _Edits(x, undoable, blocks)
        try:
            self._edit(edits, plan, seqs, hist, width)
        except BaseException:
            edits.undo()
            raise
        return plan, x, edits

    def _edit(self, edits: _Edits, plan: _Plan, seqs, hist, width: int) -> None:
        """Steps 1-3 on edits.x: -inf beyond the vocabulary, penalties over their window, DRY, bias and bans."""
        x, dev = edits.x, edits.x.device
        if x.shape[1] > self.vocab_size:
            edits.fill_tail(self.vocab_size)
        if width and (edits.blocks or _kernel(x) is not None):  # each row's penalties in one pass over its window
            G, blocks = edits.blocks or (_tier_block(x.shape[1]), None)
            h = hist[:, max(hist.shape[1] - width, 0):]
            n_out = _h2d([len(s.output_ids) for s in seqs], torch.long, dev)
            old = _kernels().penalties(x, blocks, h, plan.rep, plan.rep_range, plan.rep_decay, plan.freq, plan.pres,
                                       n_out, G)
            if edits.undoable:
                edits.saved.append((h.clamp(min=0), old))
        elif width:  # over the penalties' window (DRY may read further back)
            h = hist[:, max(hist.shape[1] - width, 0):]
            ids = h.clamp(min=0)
            seen = x.gather(1, ids)  # (B, L)
            # a token seen twice gets the same value written twice
            edits.scatter(ids, _penalties(seen, h, self._owners(ids), plan, seqs), seen)
        if hist is not None and plan.any_dry:  # DRY only subtracts: it commutes with the masks after it
            rows, tokens, penalty = _dry(hist, plan)
            edits.put(rows, tokens, x[rows, tokens] - penalty)  # one value per token, however often listed
        if plan.bias is not None:
            edits.put(*plan.bias, accumulate=True)
        rows, cols = [], []
        for i, s in enumerate(seqs):
            banned = list(s.banned_now)
            if s.eos_ids and (s.params.ignore_eos or len(s.output_ids) < s.params.min_new_tokens):
                banned += list(s.eos_ids)
            rows += [i] * len(banned)
            cols += banned
        if rows:
            edits.put(_h2d(rows, torch.long, dev), _h2d(cols, torch.long, dev), _NEG_INF)

    def _owners(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L): the position in its row of each id's newest occurrence (ids right-aligned by age).

        Through a reused (B, V) int32 map that is never cleared: each call's positions are offset by a stamp above
        every value an earlier call left there, so the amax sees only this call's."""
        B, L = ids.shape
        m = self._buffers.get("owners")
        if m is None or m.shape[0] < B or m.shape[1] != self._plan.vocab or m.device != ids.device:
            m, self._stamp = torch.zeros(max(B, 1), self._plan.vocab, dtype=torch.int32, device=ids.device), 1
            self._buffers["owners"] = m
        if self._stamp + L >= 2 ** 31:
            m.zero_()
            self._stamp = 1
        m, stamp = m[:B], self._stamp
        self._stamp += L
        pos = torch.arange(stamp, stamp + L, dtype=torch.int32, device=ids.device).expand(B, L)
        m.scatter_reduce_(1, ids, pos, "amax")
        return m.gather(1, ids).sub_(stamp).long()

    def _buffer(self, name: str, B: int, V: int, dev) -> torch.Tensor:
        # reused (B, V) float32 buffers: on the CPU a fresh one costs ~V * B / 1024 page faults every call
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < B or buf.shape[1] != V or buf.device != dev:
            buf = self._buffers[name] = torch.zeros(B, V, device=dev)
        return buf[:B]

    def _rows(self, x: torch.Tensor, sl, name: str, copy: bool) -> torch.Tensor:
        """x[sl] in buffer `name`; x itself for all rows unless `copy`."""
        if isinstance(sl, slice):
            return self._buffer(name, x.shape[0], x.shape[1], x.device).copy_(x) if copy else x
        return torch.index_select(x, 0, sl, out=self._buffer(name, len(sl), x.shape[1], x.device))

    # steps 4-10 for the sampled rows, in groups: the distribution to draw from, and mirostat's (before skew)
    def _distribution(self, x, plan, seqs, borrowed: bool, blocks: dict[int, torch.Tensor]) -> list[_Group]:
        """`borrowed`: x is the caller's tensor, only to be read; blocks: x's block maxima known so far."""
        B, V = x.shape
        cpu = x.device.type in CPU_DEVICES
        # smoothing and temperature keep each row's order, so candidate rows apply them to their candidates only;
        # rows that measure the whole vocabulary's mass or entropy, or use the full space, transform it all here
        late, full, t1 = plan.smooth_late, plan.smooth_full, plan.t1
        if full:
            assert not borrowed
            sl = plan.index(full)
            xs = self._rows(x, sl, "smooth", copy=False)
            _smooth_(xs, xs.amax(-1, keepdim=True), plan.smooth[sl, None], t1[sl, None])
            if not isinstance(sl, slice):
                x[sl] = xs
            t1 = t1.index_fill(0, _h2d(full, torch.long, x.device), 1.0)
            blocks = {}
        groups, rest = [], plan.sampled
        if cpu and any(plan.bound[i] for i in rest):
            smooth = plan.smooth * _h2d([i in late for i in range(B)], torch.float32, x.device)
            groups, rest = _candidate_groups(x, t1, smooth, plan, self._buffer("tmp", min(B, _CHUNK), V, x.device),
                                             blocks)
        if rest:
            sl = plan.index(rest)
            back = [r for r, i in enumerate(rest) if i in late]  # left candidate space unsmoothed
            edit = back or plan.any_t1 or plan.any_t2 or any(plan.first[i] for i in rest)  # xr in place, below
            xr = self._rows(x, sl, "rest", copy=borrowed and edit)
            if back:
                k, rows = _h2d(back, torch.long, x.device), _h2d([rest[r] for r in back], torch.long, x.device)
                xb = xr[k]
                xr[k] = _smooth_(xb, xb.amax(-1, keepdim=True), plan.smooth[rows, None], t1[rows, None])
                t1 = t1.index_fill(0, rows, 1.0)
            if plan.any_t1:
                xr.div_(t1[sl, None])
            if any(plan.first[i] for i in rest):
                xr, _ = _truncate(xr, plan, sl)
            groups.append(_Group(rest, sl, xr, None, [V] * len(rest)))
        for g in groups:
            _finish(g, plan, seqs, self._buffer)
        return groups


def _smooth_(x: torch.Tensor, top, s, t) -> torch.Tensor:
    """(top - s (x - top)^2) / t, in place; top, s and t broadcast against x."""
    return x.sub_(top).square_().mul_(-s / t).add_(top / t)


def _argmax(x: torch.Tensor, blocks: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """x.argmax(-1) (the first maximum); on the CPU through block maxima (blocks: those known, by block size), as its
    argmax is ~10x slower than amax."""
    if x.device.type not in CPU_DEVICES:
        return x.argmax(-1)
    B, V = x.shape
    G = min(_BLOCK, V)
    block = (blocks[G] if blocks and G in blocks else _blocks(x, G, torch.amax)).argmax(-1)
    cols = block[:, None] * G + torch.arange(G, device=x.device)
    vals = x.gather(1, cols.clamp(max=V - 1)).masked_fill(cols >= V, _NEG_INF)
    return cols.gather(1, vals.argmax(-1, keepdim=True)).squeeze(1)


def _blocks(x: torch.Tensor, G: int, reduce) -> torch.Tensor:
    """(B, ceil(V / G)) reduce (torch.amax or torch.sum) of each run of G columns (the last run may be shorter)."""
    if reduce is torch.amax and (lib := _kernel(x)) is not None:
        return lib.block_max(x, G)
    B, V = x.shape
    n = V // G
    m = reduce(x.unfold(1, G, G), -1)
    return m if n * G == V else torch.cat([m, reduce(x[:, n * G:], -1, keepdim=True)], 1)


def _histories(seqs, plan: _Plan, dev) -> torch.Tensor:
    """(B, L) each row's needed trailing prompt+output ids, right-aligned, -1 on the left where shorter."""
    rows = []
    for s, needs in zip(seqs, plan.windows):
        if not needs:
            rows.append(torch.empty(0, dtype=torch.long, device=dev))
            continue
        h = s.history(dev)
        counts = [len(s.output_ids) if w == "out" else w for w in needs]
        w = None if None in counts else max(counts)
        rows.append(h if w is None else h[h.numel() - min(w, h.numel()):])
    return pad_sequence(rows, batch_first=True, padding_value=-1, padding_side="left")


def _per_token(owner: torch.Tensor, src: torch.Tensor, reduce: str) -> torch.Tensor:
    """(B, L) -> (B, L): src reduced ("sum" or "amax", src >= 0) over each row's positions holding the same id."""
    return torch.zeros_like(src).scatter_reduce_(1, owner, src, reduce).gather(1, owner)


def _penalties(seen, hist, owner, plan: _Plan, seqs) -> torch.Tensor:
    """(B, L) the history positions' logits `seen` after the repetition, frequency and presence penalties."""
    B, L = hist.shape
    valid = hist >= 0
    dist = torch.arange(L - 1, -1, -1, device=seen.device, dtype=torch.float32)  # tokens back from the newest
    if plan.any_rep:
        # full penalty within the range, fading linearly over the decay tokens before it
        r, d = plan.rep_range[:, None], plan.rep_decay[:, None]
        w = (((r + d - dist) / (d + 1)).clamp(0, 1) * valid).gather(1, owner)  # at the newest occurrence
        pen = 1 + (plan.rep[:, None] - 1) * w
        seen = torch.where(seen > 0, seen / pen, seen * pen)
    if plan.any_fp:
        n_out = _h2d([len(s.output_ids) for s in seqs], torch.float32, seen.device)
        count = _per_token(owner, (valid & (dist < n_out[:, None])).float(), "sum")
        seen = seen - plan.freq[:, None] * count - plan.pres[:, None] * (count > 0)
    return seen


def _dry(hist, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DRY's penalty, mult * base ** (n - allowed), on each token that would extend an n-token repeat of the recent
    context (n >= allowed): (rows, token ids, penalty) at history positions (n,); a token listed twice in a row has
    the same penalty each time."""
    B, L = hist.shape
    K = min(DRY_MAX_MATCH, L)
    dev = hist.device
    dist = torch.arange(L - 1, -1, -1, device=dev)
    h = hist.masked_fill((dist >= plan.dry_range[:, None]) | (plan.dry_mult[:, None] == 0), -1)
    ref = h[:, L - K:]  # the newest K tokens; breakers and padding match nothing
    ref = ref.masked_fill((ref < 0) | plan.breakers.gather(1, ref.clamp(min=0)), -2)
    windows = torch.cat([h.new_full((B, K), -1), h], 1).unfold(1, K, 1)[:, :L]  # (B, L, K): the K tokens before i
    cpu = dev.type in CPU_DEVICES
    if cpu:  # compare only where the previous token is the newest: few positions
        b, i = (windows[:, :, -1] == ref[:, -1:]).nonzero(as_tuple=True)
    else:  # every position, without a host sync
        b, i = torch.arange(B, device=dev).repeat_interleave(L), torch.arange(L, device=dev).repeat(B)
    same = (windows[b, i] == ref[b]).flip(-1)  # (n, K), column k: k + 1 tokens back
    run = torch.where(same.all(-1), K, (~same).to(torch.uint8).argmax(-1))  # repeat length before each position
    tokens = h[b, i].clamp(min=0)
    run = run.masked_fill((h[b, i] < 0) | plan.breakers[b, tokens], 0).float()
    # the longest repeat each (row, token) extends: over the distinct keys of the few positions, or (without a host
    # sync) over every (row, token) slot
    slot = b * plan.vocab + tokens
    keys, slot = torch.unique(slot, return_inverse=True) if cpu else (None, slot)
    n = len(keys) if cpu else B * plan.vocab
    run = torch.zeros(n, device=dev).scatter_reduce_(0, slot, run, "amax")[slot]
    over = run - plan.dry_allowed[b]
    penalty = torch.where(over >= 0, plan.dry_mult[b] * torch.exp(over * plan.dry_base[b].log()), 0.0)
    if cpu:
        k = (over >= 0).nonzero().squeeze(1)
        b, tokens, penalty = b[k], tokens[k], penalty[k]
    return b, tokens, penalty


def _tier_block(V: int) -> int:
    """The first candidate tier's block size for V columns."""
    return min(_TIERS[0][0], 1 << V.bit_length() - 1)


def _candidate_groups(x, t1, smooth, plan: _Plan, tmp, blocks=None) -> tuple[list[_Group], list[int]]:
    """Truncate the sampled rows that have a bounding filter (plan.bound) in candidate space (module docstring); x
    (B, V) is still to be smoothed by smooth (B,) where > 0, and divided by t1 (B,). Returns the truncated groups and
    the rows left for the full space. blocks: x's block maxima known so far, by block size."""
    B, V = x.shape
    dev = x.device
    pending = [i for i in plan.sampled if plan.bound[i]]
    rest = [i for i in plan.sampled if not plan.bound[i]]
    blocks = dict(blocks or {})  # block size -> (B, nb) block maxima
    lse = entropy = mass = None
    whole = [i for i in pending if plan.first[i] in ("top_p", "top_a", "typical_p")]
    if whole:  # top_p, top_a and typical first: mass and entropy of x / t1 over the whole vocabulary
        G = _tier_block(V)
        sl = plan.index(whole)
        lse, entropy = torch.full((2, B), math.nan, device=dev).unbind(0)
        typical = any(plan.first[i] == "typical_p" for i in whole)
        if G not in blocks and (lib := _kernel(x)) is not None:  # the block maxima and masses in one pass
            t = torch.zeros(B, device=dev).index_copy_(0, torch.tensor(whole), t1[sl])
            blocks[G], mass, h = lib.block_masses(x, t, G, typical)
            h, t = h[sl], t1[sl, None]
            top = blocks[G][sl].amax(-1, keepdim=True)
        else:
            if G not in blocks:
                blocks[G] = _blocks(x, G, torch.amax)
            top, t = blocks[G][sl].amax(-1, keepdim=True), t1[sl, None]
            mass = torch.zeros(B, blocks[G].shape[1], device=dev)  # top_p's block masses, in units of exp(top / t)
            mass[sl], h = _masses(x, whole, top, t, G, typical, tmp)
        lse[sl] = (top / t).squeeze(1) + mass[sl].sum(-1).log()
        if typical:
            entropy[sl] = h
    groups = []
    for G, K, margin, cap in _TIERS:
        if not pending:
            break
        G = min(G, 1 << V.bit_length() - 1)
        if G not in blocks:
            blocks[G] = _blocks(x, G, torch.amax)
        sl = plan.index(pending)
        bm, t, s = blocks[G][sl], t1[sl], smooth[sl]  # (R, nb), (R,), (R,)
        xmax = bm.amax(-1)
        bounds = {plan.bound[i] for i in pending}
        # tau below the blocks that hold k tokens at least (top_k; typical: K blocks), or about top_p of the mass
        counts = _h2d([plan.top_k[i] if plan.bound[i] == "top_k" else K for i in pending], torch.float32, dev)
        if "top_p" in bounds:
            on = plan.bound_on["top_p"][sl]
            weights = torch.where(on[:, None], mass[sl], 1.0)
            target = torch.where(on, plan.filters["top_p"][0][sl] * mass[sl].sum(-1), counts)
            tau = _edge(bm, xmax, torch.where(on, t, 1.0), weights, target) - t * margin * on
        else:
            tau = _edge(bm, xmax, torch.ones_like(t), torch.ones_like(bm), counts)
        if "min_p" in bounds:  # p >= min_p * p_max: log(min_p) below the top after smoothing and temperature
            log_p = t * plan.filters["min_p"][0][sl].log()
            drop = torch.where(s > 0, -(-log_p / s.clamp(min=1e-30)).sqrt(), log_p)
            tau = torch.where(plan.bound_on["min_p"][sl], xmax + drop, tau)
        if "top_a" in bounds:  # p >= top_a * p_max ** 2
            tau = torch.where(plan.bound_on["top_a"][sl], t * (plan.filters["top_a"][0][sl].log() - lse[sl]) + 2 * xmax,
                              tau)
        # lower tau a little, so that the survivors lie strictly above it (_truncate checks) despite rounding
        tau = tau - 1e-4 * (1 + xmax.abs() + tau.abs())
        classes, counts = _gather(x, pending, bm, tau, G, cap)
        rest += [i for i, c in zip(pending, counts) if not 0 < c <= cap]
        retry = []
        for sel, vals, ids in classes:
            rows, j = [pending[r] for r in sel], _h2d(sel, torch.long, dev)
            sl = plan.index(rows)
            top, tc, sc, tau_c = xmax[j, None], t[j, None], s[j, None], tau[j, None]
            y, tau_y = vals / tc, tau_c / tc  # the candidates and tau, smoothed and divided alike
            if (sc > 0).any():
                y = torch.where(sc > 0, _smooth_(vals, top, sc, tc), y)
                tau_y = torch.where(sc > 0, _smooth_(tau_c, top, sc, tc), tau_y)
            x_c, ok = _truncate(y, plan, sl, is_sorted=True, lse=None if lse is None else lse[sl],
                                entropy=None if entropy is None else entropy[sl], tau=tau_y.squeeze(1))
            ok = ok.tolist()
            good = [r for r, o in enumerate(ok) if o]
            if good:
                ids = ids[:, :x_c.shape[1]]
                n = (x_c > _NEG_INF).flip(-1).to(torch.uint8).argmax(-1)  # -inf columns after each row's last survivor
                if len(good) < len(rows):
                    k = _h2d(good, torch.long, dev)
                    x_c, ids, n = x_c[k], ids[k], n[k]
                rows_ok = [rows[r] for r in good]
                groups.append(_Group(rows_ok, plan.index(rows_ok), x_c, ids, (x_c.shape[1] - n).tolist()))
            retry += [rows[r] for r, o in enumerate(ok) if not o]
        pending = sorted(retry)
    return groups, sorted(rest + pending)


def _masses(x, rows: list[int], top, t, G: int, entropy: bool, tmp):
    """Block masses (R, nb) of p = exp((x[rows] - top) / t), and if asked the entropy of p / sum(p) (R,); _CHUNK rows
    at a time in tmp, where p stays in the cache between the passes over it."""
    R = len(rows)
    if (lib := _kernel(x)) is not None:
        m, h = lib.masses(x, torch.tensor(rows), top.reshape(-1), t.reshape(-1), G, entropy)
        return m, h if entropy else None
    scaled = bool((t != 1).any())
    masses, entropies = [], []
    for i in range(0, R, _CHUNK):
        n = min(_CHUNK, R - i)
        if R == x.shape[0]:
            p = torch.sub(x[i:i + n], top[i:i + n], out=tmp[:n])
        else:
            p = torch.index_select(x, 0, _h2d(rows[i:i + n], torch.long, x.device), out=tmp[:n]).sub_(top[i:i + n])
        if scaled:
            p.div_(t[i:i + n])
        masses.append(_blocks(p.exp_(), G, torch.sum))
        if entropy:
            entropies.append(-p.div_(masses[-1].sum(-1, keepdim=True)).xlogy_(p).sum(-1))
    return torch.cat(masses), torch.cat(entropies) if entropy else None


def _edge(blocks, top, scale, weights, target) -> torch.Tensor:
    """(R,) the highest bin edge e = top - scale * j / _BINS (j = 1, 2, ...) such that the blocks (R, nb) whose maxima
    lie above e hold `target` (R,) of `weights` (R, nb); -inf where only the deepest bin, 40 * scale down, does."""
    n = 40 * _BINS
    j = ((top[:, None] - blocks) * (_BINS / scale)[:, None]).nan_to_num_(n).clamp_(0, n - 1).long()
    cum = torch.zeros(len(top), n, device=blocks.device).scatter_add_(1, j, weights).cumsum_(-1)
    j = (cum < target[:, None]).sum(-1)
    return torch.where(j < n - 1, top - scale * (j + 1) / _BINS, _NEG_INF)


def _gather(y, rows: list[int], blocks, tau, G: int, cap: int):
    """Each of `rows`' finite tokens with logit >= tau, from its blocks (R, nb) whose maximum reaches tau.

    Returns classes of rows by their count (1..cap candidates; a class's rows share a padded width from _WIDTHS):
    each the indices into rows it holds, their candidates (R', C) sorted descending (ties in id order, -inf padding
    on the right) and token ids; and every row's count."""
    B, V = y.shape
    R = len(rows)
    dev = y.device
    if (lib := _kernel(y)) is not None:
        x_c, ids, counts = lib.candidates(y, torch.tensor(rows), blocks, tau, G, cap)
        return _classes(x_c, ids, counts.tolist(), cap, sort=False), counts.tolist()
    if V % G:  # whole blocks: pad the short last one with -inf
        y = torch.nn.functional.pad(y, (0, G - V % G), value=_NEG_INF)
    tau = tau.clamp(min=torch.finfo(y.dtype).min)  # tau = -inf takes every finite token
    r, b = (blocks >= tau[:, None]).nonzero(as_tuple=True)
    nb = blocks.shape[1]
    vals = y.view(-1, G).index_select(0, _h2d(rows, torch.long, dev)[r] * nb + b)  # (n, G)
    k = _flat_where_ge(vals, tau[r, None])  # row-major: ids ascending within each row
    i = k >> G.bit_length() - 1  # G is a power of two: k // G, without the CPU's slow integer division
    r, cols, vals = r[i], b[i] * G + (k & G - 1), vals.view(-1)[k]
    counts = torch.bincount(r, minlength=R)
    pos = torch.arange(r.numel(), device=dev) - (counts.cumsum(0) - counts)[r]
    counts = counts.tolist()
    C = max([c for c in counts if c <= cap], default=0)
    x_c = torch.full((R, C), _NEG_INF, device=dev)
    ids = torch.zeros(R, C, dtype=torch.long, device=dev)
    if C < max(counts):  # drop the rows over cap
        k = (pos < C).nonzero().squeeze(1)
        r, pos, cols, vals = r[k], pos[k], cols[k], vals[k]
    x_c.index_put_((r, pos), vals)
    ids.index_put_((r, pos), cols)
    return _classes(x_c, ids, counts, cap, sort=True), counts


def _classes(x_c, ids, counts: list[int], cap: int, sort: bool):
    """_gather's classes from every row's candidates x_c, ids (R, C), sorted there unless `sort`."""
    classes = {}  # width -> indices into rows
    for i, c in enumerate(counts):
        if 0 < c <= cap:
            classes.setdefault(next((w for w in _WIDTHS if c <= w), cap), []).append(i)
    out = []
    for sel in classes.values():
        width = max(counts[i] for i in sel)
        xs, ids_s = x_c[:, :width], ids[:, :width]
        if len(sel) < len(counts):
            j = _h2d(sel, torch.long, x_c.device)
            xs, ids_s = xs[j], ids_s[j]
        out.append((sel, *_sort(xs, True, ids_s)) if sort else (sel, xs, ids_s))
    return out


def _flat_where_ge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Ascending flat indices of a (n, G) where a >= b (n, 1); on the CPU through numpy: ~2x faster than torch there."""
    if a.device.type in CPU_DEVICES:
        return torch.from_numpy(np.flatnonzero(a.numpy() >= b.numpy()))
    return (a >= b).view(-1).nonzero().squeeze(1)


def _sort(values: torch.Tensor, descending: bool, ids: torch.Tensor | None = None):
    """values (R, C) sorted along each row, and ids (R, C) (< 2 ** 31; default: the column indices) in the same order,
    ties in id order: a stable sort where ids ascend along each row. On the CPU through one int64 key per entry (the
    float's bits made monotone, then the id) and numpy's sort: ~10x faster than torch's there."""
    R, C = values.shape
    if ids is None:
        ids = torch.arange(C, device=values.device).expand(R, C)
    if values.device.type not in CPU_DEVICES:
        values, order = values.sort(dim=-1, descending=descending, stable=True)
        return values, ids.gather(1, order)
    bits = (values + 0.0).view(torch.int32).long()  # + 0.0: -0.0 sorts as 0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats' magnitude bits flipped: monotone
    key = ((-bits if descending else bits) << 32) | ids
    key.numpy().sort(axis=-1)
    bits = -(key >> 32) if descending else key >> 32
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).int().view(torch.float32), key & 0xFFFFFFFF


def _truncate(x, plan: _Plan, sl, is_sorted=False, lse=None, entropy=None, tau=None):
    """Top-k, top-p, top-a, min-p, tfs and typical, in that order, in descending-sorted space; -inf where dropped.

    In candidate space (tau: every token outside has a logit <= tau) a row's first filter measures mass (top_p,
    top_a) and entropy (typical) against the whole vocabulary: lse and entropy (NaN in rows that do not need them).
    Returns the truncated x and, per row, whether its bounding filter (plan.bound) kept only candidates, strictly
    above tau, so that no token outside could have been kept or tied (None outside candidate space)."""
    vals, order = (x, None) if is_sorted else _sort(x, True)
    R, C = vals.shape
    if tau is None:
        p = torch.softmax(vals, -1)
    else:  # p against the whole vocabulary where lse is given, else against the candidates
        own = torch.logsumexp(vals, -1)
        lse = own if lse is None else torch.where(torch.isnan(lse), own, lse)
        p = torch.exp(vals - lse[:, None])
    keep = torch.ones_like(p, dtype=torch.bool)
    ok = None if tau is None else torch.ones(R, 1, dtype=torch.bool, device=x.device)
    bound = {} if tau is None else {n: b[sl][:, None] for n, b in plan.bound_on.items()}
    first = torch.ones(R, 1, dtype=torch.bool, device=x.device)  # no filter has acted on the row yet

    def at(t, n):  # t[row, n - 1]: the last kept value when keeping n
        return t.gather(1, (n - 1).clamp(0, C - 1))

    def exclusive_cumsum(t):
        return torch.cat([torch.zeros_like(t[:, :1]), t.cumsum(-1)[:, :-1]], 1)

    last = list(plan.filters)[-1]
    for name, (value, on, all_on) in plan.filters.items():
        if tau is not None and name != "typical_p":  # survivors so far are a prefix: drop the columns after them
            C = int(keep.sum(-1).max())
            vals, p, keep = vals[:, :C], p[:, :C], keep[:, :C]
        v, on = value[sl][:, None], on[sl][:, None]
        if name == "top_k":
            k = at(vals, v) <= vals
        elif name == "top_p":
            k = p >= at(p, (exclusive_cumsum(p) < v).sum(-1, keepdim=True))
        elif name == "top_a":
            k = p >= v * p[:, :1] ** 2
        elif name == "min_p":
            k = p >= v * p[:, :1]
        elif name == "tfs":
            if C < 3:
                continue
            # normalised |2nd difference| of the sorted probs; keep 1 + the count whose cumsum stays <= tfs
            n = (p > 0).sum(-1, keepdim=True)
            i = torch.arange(C - 2, device=x.device)
            d = (p[:, :-2] - 2 * p[:, 1:-1] + p[:, 2:]).abs() * (i < n - 2)
            total = d.sum(-1, keepdim=True)
            cum = d.cumsum(-1) / total.clamp(min=1e-30)
            cnt = torch.where(total > 0, 1 + ((cum <= v) & (i < n - 2)).sum(-1, keepdim=True), n)
            k = (p >= at(p, cnt)) | (n < 3)
        else:  # typical: keep tokens closest to the entropy until their mass reaches typical_p
            logp = torch.log(p)
            h = -torch.special.xlogy(p, p).sum(-1, keepdim=True)
            if entropy is not None:
                h = torch.where(first & ~torch.isnan(entropy[:, None]), entropy[:, None], h)
            dev = (-logp - h).abs()
            dev_sorted, by_dev = _sort(dev, False)
            thr = at(dev_sorted, (exclusive_cumsum(p.gather(1, by_dev)) < v).sum(-1, keepdim=True))
            k = dev <= thr
        if name in bound:
            if name == "typical_p":  # the mass is reached, and every token outside (p <= e^(tau - lse)) is further
                sure = (p.sum(-1, keepdim=True) >= v) & (thr < (lse - tau)[:, None] - h)
            else:  # every survivor lies above every token outside; top_p: the candidates hold the mass it keeps
                sure = vals.masked_fill(~(keep & k), math.inf).amin(-1, keepdim=True) > tau[:, None]
                if name == "top_p":
                    sure &= p.sum(-1, keepdim=True) >= v
            ok &= ~bound[name] | sure
        keep &= k if all_on else k | ~on
        first &= ~on
        if name != last:  # rows no filter has acted on keep their whole-vocabulary normalisation
            p = torch.where(first, p, p * keep / (p * keep).sum(-1, keepdim=True))
    if order is not None:
        return x.masked_fill(~torch.zeros_like(keep).scatter_(1, order, keep), _NEG_INF), None
    return vals.masked_fill(~keep, _NEG_INF), None if ok is None else ok.squeeze(1) | (tau == _NEG_INF)


def _finish(g: _Group, plan: _Plan, seqs, buffer) -> None:
    """Steps 7-10 on a truncated group: sets g.probs (and g.miro_probs, g.mu for mirostat). A full-space group's x
    may be the caller's logits (where no step before the softmax edits it in place): its softmax goes to a buffer."""
    x, sl = g.x, g.sl
    if plan.any_t2:
        t2 = plan.t2[sl]
        if plan.any_dyn:
            t2 = torch.where(plan.dyn[sl], _dynamic_temperature(x, plan, sl), t2)
        x = x.div_(t2[:, None])
    if plan.xtc_rows.intersection(g.rows):
        x = _xtc(x, plan, seqs, g)
    miro = plan.miro_rows.intersection(g.rows)
    if miro:
        g.mu = torch.stack([seqs[i].mirostat_mu if i in miro else plan.tau[0] for i in g.rows])
        p = torch.softmax(x, -1)
        keep = (p >= torch.exp2(-g.mu)[:, None]) | (p >= p.amax(-1, keepdim=True)) | ~plan.miro_on[sl, None]
        x = x.masked_fill(~keep, _NEG_INF)
    if x.device.type in CPU_DEVICES and g.ids is None:  # into a reused buffer: no fresh (R, V) tensor to fault in
        g.probs = torch.ops.aten._softmax.out(x, -1, False, out=buffer("probs", *x.shape, x.device))
    elif x.device.type in CPU_DEVICES:  # softmax in place (g owns x)
        g.probs = x.sub_(x.amax(-1, keepdim=True)).exp_()
        g.probs.div_(g.probs.sum(-1, keepdim=True))
    else:
        g.probs = torch.softmax(x, -1)
    if miro:
        g.miro_probs = g.probs
    if plan.skew_rows.intersection(g.rows):
        g.probs = torch.where(plan.skew_on[sl, None], _skew(g.probs, plan.skew_exp[sl]), g.probs)


def _dynamic_temperature(x, plan: _Plan, sl) -> torch.Tensor:
    """(R,) min + (max - min) * (H / log n) ** exponent over the n tokens still possible."""
    p = torch.softmax(x, -1)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    n = (x > _NEG_INF).sum(-1)
    max_entropy = torch.where(n > 1, torch.log(n.float()), 1.0)
    h = (entropy / max_entropy).clamp(0, 1)
    t = plan.dyn_min[sl] + (plan.dyn_max[sl] - plan.dyn_min[sl]) * h ** plan.dyn_exp[sl]
    return t.clamp(min=_MIN_TEMP)


def _xtc(x, plan: _Plan, seqs, g: _Group) -> torch.Tensor:
    # one coin per XTC row per step, from the row's own generator when seeded (drawn before the row's noise)
    coins = torch.rand(len(g.rows), device=x.device)
    own = [(r, seqs[i].generator) for r, i in enumerate(g.rows) if i in plan.xtc_rows and seqs[i].generator]
    if own:
        coins[_h2d([r for r, _ in own], torch.long, x.device)] = torch.cat(
            [torch.rand(1, device=x.device, generator=gen) for _, gen in own])
    fire = coins < plan.xtc_prob[g.sl]  # xtc_prob is 0 in rows without XTC
    p = torch.softmax(x, -1)
    above = p >= plan.xtc_thr[g.sl, None]
    least = p.masked_fill(~above, math.inf).amin(-1, keepdim=True)
    drop = above & (p > least) & (above.sum(-1, keepdim=True) >= 2) & fire[:, None]
    return x.masked_fill(drop, _NEG_INF)


def _skew(probs, exponent) -> torch.Tensor:
    """Sorted descending with cdf C, token j gets C_j ** e - C_(j-1) ** e; tied tokens share their group's mass."""
    ps, order = _sort(probs, True)
    ps = ps / ps.sum(-1, keepdim=True)
    cdf = ps.cumsum(-1)
    new_group = torch.cat([torch.zeros_like(ps[:, :1]), (ps[:, 1:] != ps[:, :-1]).float()], 1)
    group = new_group.cumsum(-1).long()  # (R, C) index of each token's tie group
    hi = torch.zeros_like(ps).scatter_reduce_(1, group, cdf, "amax").clamp(0, 1)
    lo = torch.ones_like(ps).scatter_reduce_(1, group, cdf - ps, "amin").clamp(0, 1)
    size = torch.zeros_like(ps).scatter_add_(1, group, torch.ones_like(ps))
    e = exponent[:, None]
    mass = ((hi ** e - lo ** e) / size.clamp(min=1)).clamp(min=0)
    return torch.zeros_like(probs).scatter_(1, order, mass.gather(1, group))


def _draw(g: _Group, plan: _Plan, seqs, buffer) -> torch.Tensor:
    """(R,) column drawn from each row of g.probs without a host sync: argmax(p / q), q ~ Exponential(1), a seeded row
    drawing its q over its g.n columns from its own generator (so its draw does not depend on its batch). On the CPU,
    where each random number costs ~20 ns, every row draws by inverse cdf with one uniform instead, a seeded row's
    uniform from its own generator (one number per step, whatever the batch)."""
    probs = g.probs
    R, C = probs.shape
    dev = probs.device
    own = [(r, seqs[i].generator) for r, i in enumerate(g.rows) if i in plan.seeded_rows]
    if dev.type in CPU_DEVICES:
        u = torch.rand(R, 1, device=dev)
        for r, gen in own:
            u[r] = torch.rand(1, device=dev, generator=gen)
        return _inverse_cdf(probs, u)
    q = buffer("noise", R, C, dev) if C == plan.vocab else torch.empty_like(probs)
    if len(own) < R:
        q.exponential_()
    for r, gen in own:
        row = q[r]
        if g.n[r] < C:
            row[g.n[r]:] = 1.0  # where p = 0
            row = row[:g.n[r]]
        row.exponential_(generator=gen)
    return _argmax(torch.div(probs, q.clamp_(min=1e-30), out=q))


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(R,) the column where each row's cdf first exceeds u (R, 1) * total: a block of _BLOCK columns through the
    cdf of block sums, then the column in the block; never a column with p = 0."""
    R, C = probs.shape
    G = _BLOCK if C % _BLOCK == 0 else C
    blocks = probs.view(R, -1, G)
    sums = blocks.sum(-1)  # (R, nb)
    cdf = sums.cumsum(-1)
    total = cdf[:, -1:]
    u = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))  # u < total: a block with mass
    b = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)  # the clamps only act on NaN rows
    inner = blocks.gather(1, b[:, :, None].expand(R, 1, G)).squeeze(1).cumsum(-1)  # (R, G)
    u = (u - cdf.gather(1, b) + sums.gather(1, b)).clamp(min=0)  # what is left to pass inside the block
    u = torch.minimum(u, inner[:, -1:].nextafter(torch.zeros_like(u)))
    return (b * G + torch.searchsorted(inner, u, right=True).clamp_(max=G - 1)).squeeze(1)


def _logprobs(g: _Group, cols, n_top: int, V: int):
    """Logprob of each row's drawn column, and the n_top largest (logprobs, token ids)."""
    lp = g.probs.gather(1, cols[:, None]).squeeze(1).log()
    if not n_top:
        return lp, None
    if g.probs.shape[-1] < n_top:  # fewer candidates than asked for: the rest are -inf, as in the full vocabulary
        probs = torch.zeros(len(g.rows), V, device=lp.device).scatter_add_(1, g.ids, g.probs)  # padding adds 0
        top, ids = probs.topk(n_top, dim=-1)
        return lp, (top.log(), ids)
    top, j = g.probs.topk(n_top, dim=-1)
    return lp, (top.log(), j if g.ids is None else g.ids.gather(1, j))
