"""The sampler: picks one token per row of a (B, V) logits tensor, each row with its own SamplingParams.

Steps, in ExLlamaV2's order (XTC, which ExLlamaV2 lacks, goes after temperature; skew reshapes the final draw):

  1. penalties     repetition over prompt+output (last `repetition_range` tokens, fading out over the
                   `repetition_decay` tokens before them); frequency and presence over output tokens only (OpenAI)
  2. masks         logit_bias, allowed/disallowed tokens, banned_now, EOS until min_new_tokens (always with ignore_eos)
  3. DRY           penalise the token that would extend a repeat of the recent context
     -- greedy rows (temperature 0) take the argmax here --
  4. smoothing     quadratic: l' = max - s * (l - max)^2
  5. temperature   l / T, unless temperature_last or dynamic temperature (then after step 6)
  6. truncation    top_k, top_p, top_a, min_p, tfs, typical, each on the renormalised survivors of the previous
  7. temperature   temperature_last rows, and dynamic temperature: T from the normalised entropy of the survivors
  8. XTC           with probability xtc_probability, drop every token with p >= xtc_threshold but the least likely
  9. mirostat v2   keep tokens with surprise <= mu (at least the top one); mu moves towards tau after the draw
 10. skew          the draw's cdf C becomes C ** exp(skew) (ExLlamaV2's u ** exp(-skew) in inverse-cdf form)
 11. draw          argmax(p / Exponential(1)), no host sync

Every step is vectorised over rows with per-row parameter tensors; a step whose parameter is off in every row is
skipped, and rows with it off pass through unchanged. Per-row Python loops remain only where a row owns state:
seeded rows draw their noise (and XTC coin) from their own generator, one row at a time, so a seeded row gives the
same tokens alone or in any batch; mirostat mu is read and written per row; histories are gathered per row.
Filters keep ties: a token tied with the last one kept is kept too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling import SamplingParams

DRY_MAX_MATCH = 50  # longest repeat DRY measures: bounds base ** length and the work per step
_MIN_TEMP = 1e-4  # dynamic temperature floor (dynatemp_min may be 0)
_NEG_INF = float("-inf")


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
        self.greedy, self.any_greedy, self.all_greedy = vec(greedy, torch.bool), any(greedy), all(greedy)

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
        self.windows = []  # per row: list of needs, each an int count of trailing tokens, "out" or None (all)
        for p, r, f, d in zip(ps, rep, fp, dry):
            needs = ([p.repetition_range + p.repetition_decay if p.repetition_range else None] if r else []) \
                + (["out"] if f else []) + ([p.dry_range or None] if d else [])
            self.windows.append(needs)
        self.any_hist = any(self.windows)
        if self.any_dry:
            self.breakers = torch.zeros(B, vocab, dtype=torch.bool)
            for i, s in enumerate(seqs):
                if dry[i] and s.dry_breaker_ids:
                    self.breakers[i, list(s.dry_breaker_ids)] = True
            self.breakers = self.breakers.to(device)

        self.bias = None  # (B, V) additive: logit_bias, -inf outside allowed_tokens and on disallowed_tokens
        if any(p.logit_bias or p.disallowed_tokens or p.allowed_tokens is not None for p in ps):
            bias = torch.zeros(B, vocab)
            for i, p in enumerate(ps):
                for name, ids in (("logit_bias", p.logit_bias), ("disallowed_tokens", p.disallowed_tokens),
                                  ("allowed_tokens", p.allowed_tokens or [])):
                    if any(t >= vocab for t in ids):
                        raise InvalidRequestError(
                            f"{name} token ids must be < vocab size {vocab}, got {max(ids)}")
                if p.allowed_tokens is not None:
                    bias[i] = _NEG_INF
                    bias[i, p.allowed_tokens] = 0.0
                if p.logit_bias:
                    bias[i, list(p.logit_bias)] += torch.tensor(list(p.logit_bias.values()))
                bias[i, p.disallowed_tokens] = _NEG_INF
            self.bias = bias.to(device)

        smooth = on(lambda p: p.smoothing_factor > 0)
        self.any_smooth, self.smooth_on = any(smooth), vec(smooth, torch.bool)
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

        filters = {"top_k": lambda p: p.top_k > 0, "top_p": lambda p: p.top_p < 1.0, "top_a": lambda p: p.top_a > 0,
                   "min_p": lambda p: p.min_p > 0, "tfs": lambda p: p.tfs < 1.0, "typical_p": lambda p: p.typical_p < 1.0}
        self.filters = {}  # name -> (per-row value, per-row on) for filters on in some row
        for name, pred in filters.items():
            mask = on(pred)
            if any(mask):
                dtype = torch.long if name == "top_k" else torch.float32
                all_on = all(m or g for m, g in zip(mask, greedy))  # greedy rows ignore the result
                self.filters[name] = (vec([getattr(p, name) for p in ps], dtype), vec(mask, torch.bool), all_on)

        self.xtc_rows = {i for i, x in enumerate(on(lambda p: p.xtc_probability > 0)) if x}
        self.xtc_prob, self.xtc_thr = vec([p.xtc_probability for p in ps]), vec([p.xtc_threshold for p in ps])
        miro = on(lambda p: p.mirostat_mode == 2)
        self.miro_rows, self.miro_on = [i for i, m in enumerate(miro) if m], vec(miro, torch.bool)
        self.tau, self.eta = vec([p.mirostat_tau for p in ps]), vec([p.mirostat_eta for p in ps])
        skew = on(lambda p: p.skew != 0)
        self.any_skew, self.skew_on, self.skew_exp = any(skew), vec(skew, torch.bool), vec([math.exp(p.skew) for p in ps])

        self.seeded_rows = [i for i, s in enumerate(seqs) if not greedy[i] and s.generator is not None]
        self.any_unseeded = any(not g and s.generator is None for s, g in zip(seqs, greedy))
        self.any_logprobs = any(p.logprobs for p in ps)
        self.n_top = max(p.top_logprobs for p in ps)

    def matches(self, seqs, vocab, device) -> bool:
        return (len(seqs) == self.B and vocab == self.vocab and device == self.device
                and all(a is b and a.params is p for a, b, p in zip(seqs, self.seqs, self.params)))


class Sampler:
    """Callable sampler. `vocab_size` is the tokenizer's; logits columns beyond it (padded heads) are never drawn."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._plan: _Plan | None = None

    def __call__(self, logits: torch.Tensor, seqs: list[SeqSamplingState]) -> SampleOutput:
        """Sample one token per row of `logits` (B, V); row i uses seqs[i]."""
        plan, x = self._prepare(logits, seqs)
        tokens = greedy_tok = x.argmax(-1) if plan.any_greedy else None
        if not plan.all_greedy:
            probs, miro_probs = self._distribution(x, plan, seqs)
            tokens = _draw(probs, plan, seqs)
            if plan.any_greedy:
                tokens = torch.where(plan.greedy, greedy_tok, tokens)
            if plan.miro_rows:
                surprise = -torch.log2(miro_probs.gather(1, tokens[:, None]).squeeze(1))
                mu = torch.stack([seqs[i].mirostat_mu for i in plan.miro_rows])
                rows = _h2d(plan.miro_rows, torch.long, x.device)
                mu = mu - plan.eta[rows] * (surprise[rows] - plan.tau[rows])
                for i, m in zip(plan.miro_rows, mu.unbind(0)):
                    seqs[i].mirostat_mu = m
        for s in seqs:
            s.banned_now.clear()
        out = SampleOutput(tokens)
        if plan.any_logprobs:
            # greedy rows report the processed logits at temperature 1: their own final distribution is one-hot
            logp = torch.log_softmax(x, -1) if plan.all_greedy else torch.log(probs)
            if plan.any_greedy and not plan.all_greedy:
                logp = torch.where(plan.greedy[:, None], torch.log_softmax(x, -1), logp)
            out.logprobs = logp.gather(1, tokens[:, None]).squeeze(1)
            if plan.n_top:
                out.top_logprobs, out.top_ids = logp.topk(min(plan.n_top, logp.shape[-1]), dim=-1)
        return out

    def probs(self, logits: torch.Tensor, seqs: list[SeqSamplingState]) -> torch.Tensor:
        """(B, V) distribution the next draw would use; greedy rows are one-hot at their argmax.

        Like a real step it draws the XTC coin from seeded rows' generators; it changes no other state.
        """
        plan, x = self._prepare(logits, seqs)
        onehot = torch.zeros_like(x).scatter_(1, x.argmax(-1, keepdim=True), 1.0)
        if plan.all_greedy:
            return onehot
        probs, _ = self._distribution(x, plan, seqs)
        return torch.where(plan.greedy[:, None], onehot, probs)

    # steps 1-3: logits after penalties, masks and DRY
    def _prepare(self, logits: torch.Tensor, seqs: list[SeqSamplingState]) -> tuple[_Plan, torch.Tensor]:
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
        x = logits.to(torch.float32, copy=True)
        if V > self.vocab_size:
            x[:, self.vocab_size:] = _NEG_INF
        if plan.any_hist:
            hist = _histories(seqs, plan, dev)
            if plan.any_rep or plan.any_fp:
                x = _penalties(x, hist, plan, seqs)
        if plan.bias is not None:
            x += plan.bias
        rows, cols = [], []
        for i, s in enumerate(seqs):
            banned = list(s.banned_now)
            if s.eos_ids and (s.params.ignore_eos or len(s.output_ids) < s.params.min_new_tokens):
                banned += list(s.eos_ids)
            rows += [i] * len(banned)
            cols += banned
        if rows:
            x[_h2d(rows, torch.long, dev), _h2d(cols, torch.long, dev)] = _NEG_INF
        if plan.any_dry:
            x = _dry(x, hist, plan)
        return plan, x

    # steps 4-10: the distribution to draw from, and mirostat's (before skew) for its mu update
    def _distribution(self, x, plan, seqs) -> tuple[torch.Tensor, torch.Tensor | None]:
        if plan.any_smooth:
            top = x.amax(-1, keepdim=True)
            x = torch.where(plan.smooth_on[:, None], top - plan.smooth[:, None] * (x - top) ** 2, x)
        if plan.any_t1:
            x = x / plan.t1[:, None]
        if plan.filters:
            x = _truncate(x, plan.filters)
        if plan.any_t2:
            t2 = plan.t2
            if plan.any_dyn:
                t2 = torch.where(plan.dyn, _dynamic_temperature(x, plan), t2)
            x = x / t2[:, None]
        if plan.xtc_rows:
            x = _xtc(x, plan, seqs)
        miro_probs = None
        if plan.miro_rows:
            mu = torch.stack([s.mirostat_mu if s.params.mirostat_mode else plan.tau[0] for s in seqs])
            p = torch.softmax(x, -1)
            keep = (p >= torch.exp2(-mu)[:, None]) | (p >= p.amax(-1, keepdim=True)) | ~plan.miro_on[:, None]
            x = x.masked_fill(~keep, _NEG_INF)
        probs = torch.softmax(x, -1)
        if plan.miro_rows:
            miro_probs = probs
        if plan.any_skew:
            probs = torch.where(plan.skew_on[:, None], _skew(probs, plan.skew_exp), probs)
        return probs, miro_probs


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


def _penalties(x, hist, plan: _Plan, seqs) -> torch.Tensor:
    """Penalise the history tokens' logits: computed at the (B, L) history positions and scattered back (a token
    seen twice gets the same value written twice)."""
    B, L = hist.shape
    if L == 0:
        return x
    valid = hist >= 0
    ids = hist.clamp(min=0)
    dist = torch.arange(L - 1, -1, -1, device=x.device, dtype=torch.float32)  # tokens back from the newest
    seen = x.gather(1, ids)  # (B, L)
    if plan.any_rep:
        # full penalty within the range, fading linearly over the decay tokens before it
        r, d = plan.rep_range[:, None], plan.rep_decay[:, None]
        w = ((r + d - dist) / (d + 1)).clamp(0, 1) * valid
        w = torch.zeros_like(x).scatter_reduce_(1, ids, w, "amax").gather(1, ids)  # at the newest occurrence
        pen = 1 + (plan.rep[:, None] - 1) * w
        seen = torch.where(seen > 0, seen / pen, seen * pen)
    if plan.any_fp:
        n_out = _h2d([len(s.output_ids) for s in seqs], torch.float32, x.device)
        out = (valid & (dist < n_out[:, None])).float()
        count = torch.zeros_like(x).scatter_add_(1, ids, out).gather(1, ids)
        seen = seen - plan.freq[:, None] * count - plan.pres[:, None] * (count > 0)
    return x.scatter(1, ids, seen)


def _dry(x, hist, plan: _Plan) -> torch.Tensor:
    """Subtract mult * base ** (n - allowed) from each token that would extend an n-token repeat, n >= allowed."""
    B, L = hist.shape
    if L < 2:
        return x
    K = min(DRY_MAX_MATCH, L)
    dist = torch.arange(L - 1, -1, -1, device=x.device)
    h = hist.masked_fill((dist >= plan.dry_range[:, None]) | (plan.dry_mult[:, None] == 0), -1)
    ids = h.clamp(min=0)
    brk = plan.breakers.gather(1, ids) & (h >= 0)
    ref = h.masked_fill(brk | (h < 0), -2)[:, L - K:]  # the newest K tokens; breakers and padding match nothing
    padded = torch.cat([h.new_full((B, K), -1), h], 1)
    windows = padded.unfold(1, K, 1)[:, :L]  # (B, L, K): windows[:, i] = the K tokens before position i
    same = (windows == ref[:, None, :]).flip(-1)  # (B, L, K), k = 0 compares the newest token
    run = torch.where(same.all(-1), K, (~same).to(torch.uint8).argmax(-1))  # (B, L) repeat length before i
    run = run.masked_fill(brk | (h < 0), 0).float()
    n = torch.zeros_like(x).scatter_reduce_(1, ids, run, "amax").gather(1, ids)  # longest repeat each token extends
    allowed = plan.dry_allowed[:, None]
    pen = torch.where(n >= allowed, plan.dry_mult[:, None] * plan.dry_base[:, None] ** (n - allowed).clamp(min=0), 0.0)
    return x.scatter(1, ids, x.gather(1, ids) - pen)


def _truncate(x, filters: dict) -> torch.Tensor:
    """Top-k, top-p, top-a, min-p, tfs and typical, in that order, in descending-sorted space."""
    vals, order = x.sort(-1, descending=True)
    p = torch.softmax(vals, -1)
    keep = torch.ones_like(p, dtype=torch.bool)
    V = x.shape[-1]

    def at(t, n):  # t[row, n - 1]: the last kept value when keeping n
        return t.gather(1, (n - 1).clamp(0, V - 1))

    def exclusive_cumsum(t):
        return torch.cat([torch.zeros_like(t[:, :1]), t.cumsum(-1)[:, :-1]], 1)

    last = list(filters)[-1]
    for name, (value, on, all_on) in filters.items():
        v = value[:, None]
        if name == "top_k":
            k = at(vals, v) <= vals
        elif name == "top_p":
            k = p >= at(p, (exclusive_cumsum(p) < v).sum(-1, keepdim=True))
        elif name == "top_a":
            k = p >= v * p[:, :1] ** 2
        elif name == "min_p":
            k = p >= v * p[:, :1]
        elif name == "tfs":
            if V < 3:
                continue
            # normalised |2nd difference| of the sorted probs; keep 1 + the count whose cumsum stays <= tfs
            n = (p > 0).sum(-1, keepdim=True)
            i = torch.arange(V - 2, device=x.device)
            d = (p[:, :-2] - 2 * p[:, 1:-1] + p[:, 2:]).abs() * (i < n - 2)
            total = d.sum(-1, keepdim=True)
            cum = d.cumsum(-1) / total.clamp(min=1e-30)
            cnt = torch.where(total > 0, 1 + ((cum <= v) & (i < n - 2)).sum(-1, keepdim=True), n)
            k = (p >= at(p, cnt)) | (n < 3)
        else:  # typical: keep tokens closest to the entropy until their mass reaches typical_p
            logp = torch.log(p)
            entropy = -torch.special.xlogy(p, p).sum(-1, keepdim=True)
            dev = (-logp - entropy).abs()
            dev_sorted, by_dev = dev.sort(-1)
            n = (exclusive_cumsum(p.gather(1, by_dev)) < v).sum(-1, keepdim=True)
            k = dev <= at(dev_sorted, n)
        keep &= k if all_on else k | ~on[:, None]
        if name != last:
            p = p * keep
            p = p / p.sum(-1, keepdim=True)
    keep = torch.zeros_like(keep).scatter_(1, order, keep)
    return x.masked_fill(~keep, _NEG_INF)


def _dynamic_temperature(x, plan: _Plan) -> torch.Tensor:
    """(B,) min + (max - min) * (H / log n) ** exponent over the n tokens still possible."""
    p = torch.softmax(x, -1)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    n = (x > _NEG_INF).sum(-1)
    max_entropy = torch.where(n > 1, torch.log(n.float()), 1.0)
    h = (entropy / max_entropy).clamp(0, 1)
    t = plan.dyn_min + (plan.dyn_max - plan.dyn_min) * h ** plan.dyn_exp
    return t.clamp(min=_MIN_TEMP)


def _xtc(x, plan: _Plan, seqs) -> torch.Tensor:
    # one coin per XTC row per step, from the row's own generator when seeded (drawn before the row's noise)
    one = torch.ones(1, device=x.device)
    coins = [torch.rand(1, device=x.device, generator=seqs[i].generator) if i in plan.xtc_rows else one
             for i in range(plan.B)]
    fire = torch.cat(coins) < plan.xtc_prob
    p = torch.softmax(x, -1)
    above = p >= plan.xtc_thr[:, None]
    least = p.masked_fill(~above, math.inf).amin(-1, keepdim=True)
    drop = above & (p > least) & (above.sum(-1, keepdim=True) >= 2) & fire[:, None]
    return x.masked_fill(drop, _NEG_INF)


def _skew(probs, exponent) -> torch.Tensor:
    """Sorted descending with cdf C, token j gets C_j ** e - C_(j-1) ** e; tied tokens share their group's mass."""
    ps, order = probs.sort(-1, descending=True)
    ps = ps / ps.sum(-1, keepdim=True)
    cdf = ps.cumsum(-1)
    new_group = torch.cat([torch.zeros_like(ps[:, :1]), (ps[:, 1:] != ps[:, :-1]).float()], 1)
    group = new_group.cumsum(-1).long()  # (B, V) index of each token's tie group
    hi = torch.zeros_like(ps).scatter_reduce_(1, group, cdf, "amax").clamp(0, 1)
    lo = torch.ones_like(ps).scatter_reduce_(1, group, cdf - ps, "amin").clamp(0, 1)
    size = torch.zeros_like(ps).scatter_add_(1, group, torch.ones_like(ps))
    e = exponent[:, None]
    mass = ((hi ** e - lo ** e) / size.clamp(min=1)).clamp(min=0)
    return torch.zeros_like(probs).scatter_(1, order, mass.gather(1, group))


def _draw(probs, plan: _Plan, seqs) -> torch.Tensor:
    """argmax(p / q), q ~ Exponential(1): an exact draw from p without a host sync."""
    q = torch.empty_like(probs)
    if plan.any_unseeded:
        q.exponential_()
    for i in plan.seeded_rows:  # one noise row per generator, so a row's draw does not depend on its batch
        q[i].exponential_(generator=seqs[i].generator)
    return (probs / q.clamp(min=1e-30)).argmax(-1)
