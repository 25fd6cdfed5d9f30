"""SamplingMetadata: the per-row parameter tensors of one list of sequences, built once per batch composition.

Every step reads its parameters from here, vectorised over rows: a (B,) tensor per parameter, a flag saying whether
any row has the step on (steps off in every row are skipped), and the row lists of the steps that keep per-row state.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.nn.utils.rnn import pad_sequence

from tokenmill.errors import InvalidRequestError

if TYPE_CHECKING:
    from tokenmill.sampling.state import SeqSamplingState

# the truncation filters in the order they apply, each with when a row has it on
FILTERS = {"top_k": lambda p: p.top_k > 0, "top_p": lambda p: p.top_p < 1.0, "top_a": lambda p: p.top_a > 0,
           "min_p": lambda p: p.min_p > 0, "tfs": lambda p: p.tfs < 1.0, "typical_p": lambda p: p.typical_p < 1.0}


def h2d(values: list, dtype: torch.dtype, device) -> torch.Tensor:
    # a plain torch.tensor(..., device=cuda) copy waits for the stream; this one does not
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


class SamplingMetadata:
    """Per-row parameter tensors for one list of sequences; rebuilt only when the list changes.

    candidate_space: the rows take the CPU's candidate space (candidates.py), which smooths some rows' candidates only
    (smooth_late) instead of their whole rows (smooth_full).
    """

    def __init__(self, seqs: list[SeqSamplingState], vocab: int, device: torch.device, candidate_space: bool):
        ps = [s.params for s in seqs]
        self.seqs, self.params = list(seqs), ps
        B = len(ps)
        greedy = [p.is_greedy for p in ps]
        on = lambda pred: [not g and pred(p) for p, g in zip(ps, greedy)]  # sampling steps skip greedy rows
        vec = lambda xs, dtype=torch.float32: h2d(xs, dtype, device)
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
                    row[:] = -math.inf
                    row[p.allowed_tokens] = 0.0
                if p.logit_bias:
                    row[list(p.logit_bias)] += torch.tensor(list(p.logit_bias.values()))
                row[p.disallowed_tokens] = -math.inf
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
        for name, pred in FILTERS.items():
            mask = on(pred)
            if any(mask):
                dtype = torch.long if name == "top_k" else torch.float32
                all_on = all(m or g for m, g in zip(mask, greedy))  # greedy rows ignore the result
                self.filters[name] = (vec([getattr(p, name) for p in ps], dtype), vec(mask, torch.bool), all_on)
        # candidate space: each sampled row's first filter, and the filter that bounds its candidates: the first, or
        # min_p after top_p (min_p only compares with the top token, so top_p may keep more than the candidates
        # then); "": the full space (no filter, or tfs first)
        self.first = [next((n for n in FILTERS if not g and FILTERS[n](p)), "") for p, g in zip(ps, greedy)]
        self.bound = ["min_p" if f == "top_p" and p.min_p > 0 and p.top_a == 0 else "" if f == "tfs" else f
                      for p, f in zip(ps, self.first)]
        self.bound_on = {n: vec([b == n for b in self.bound], torch.bool) for n in set(self.bound) - {""}}
        self.top_k = [p.top_k for p in ps]
        # smoothed rows that stay in candidate space smooth their candidates only; the others rewrite whole rows
        late = lambda i: self.bound[i] in ("top_k", "min_p") and self.first[i] not in ("top_p", "top_a", "typical_p")
        self.smooth_late = {i for i in self.smooth_rows if candidate_space and late(i)}
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
        self.n_top = min(max(p.top_logprobs for p in ps), vocab)  # top logprobs reported per row

    def histories(self, seqs: list[SeqSamplingState]) -> torch.Tensor:
        """(B, L) each row's trailing prompt+output ids, right-aligned, -1 on the left where shorter: at least the
        window any row needs (older tokens are harmless: every step weighs a position by its distance). When every
        row has appended one token since the last call, that call's is extended by one column."""
        n = [len(s.output_ids) for s in seqs]
        h = self._hist
        if h is not None and all(k == k0 + 1 and (k0 == 0 or s.output_ids[k0 - 1] == last)
                                 for s, k, k0, last in zip(seqs, n, self._hist_n, self._hist_last)):
            new = h2d([s.output_ids[-1] for s in seqs], torch.long, self.device)[:, None]
            h = torch.cat([h[:, 1:] if h.shape[1] >= self.width(seqs, self.windows) else h, new], 1)
        else:
            h = self._gather_histories(seqs)
        self._hist, self._hist_n, self._hist_last = h, n, [s.output_ids[-1] if s.output_ids else None for s in seqs]
        return h

    def _gather_histories(self, seqs: list[SeqSamplingState]) -> torch.Tensor:
        """(B, L) each row's needed trailing prompt+output ids, right-aligned, -1 on the left where shorter."""
        rows = []
        for s, needs in zip(seqs, self.windows):
            if not needs:
                rows.append(torch.empty(0, dtype=torch.long, device=self.device))
                continue
            h = s.history(self.device)
            counts = [len(s.output_ids) if w == "out" else w for w in needs]
            w = None if None in counts else max(counts)
            rows.append(h if w is None else h[h.numel() - min(w, h.numel()):])
        return pad_sequence(rows, batch_first=True, padding_value=-1, padding_side="left")

    def width(self, seqs, windows) -> int:
        """The most trailing tokens any row needs (windows: self.windows or self.pen_windows)."""
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
        return slice(None) if len(rows) == self.B else h2d(rows, torch.long, self.device)
