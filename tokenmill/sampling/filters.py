"""Steps 4-10 on a Group of rows: smoothing, temperature, truncation, late and dynamic temperature, XTC, mirostat, skew.

Each step works on a group's (R, C) logits, C the whole vocabulary or the rows' candidates (candidates.py), with the
per-row parameters from SamplingMetadata. Filters keep ties: a token tied with the last one kept is kept too. Two
steps have a CPU form beside the reference: sort_cpu (numpy's sort of int64 keys, ~10x torch's sort there) and
softmax_cpu (in place or into a reused buffer: a fresh (R, V) tensor costs thousands of page faults).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenmill.sampling.metadata import SamplingMetadata, h2d

_MIN_TEMP = 1e-4  # dynamic temperature floor (dynatemp_min may be 0)


@dataclass
class Group:
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


def sort(values: torch.Tensor, descending: bool, ids: torch.Tensor | None = None):
    """values (R, C) sorted along each row, and ids (R, C) (< 2 ** 31; default: the column indices) in the same order,
    ties in id order: a stable sort where ids ascend along each row."""
    values, order = values.sort(dim=-1, descending=descending, stable=True)
    return values, _column_ids(order, ids).gather(1, order)


def sort_cpu(values: torch.Tensor, descending: bool, ids: torch.Tensor | None = None):
    """sort through one int64 key per entry (the float's bits made monotone, then the id) and numpy's sort."""
    ids = _column_ids(values, ids)
    bits = (values + 0.0).view(torch.int32).long()  # + 0.0: -0.0 sorts as 0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats' magnitude bits flipped: monotone
    key = ((-bits if descending else bits) << 32) | ids
    key.numpy().sort(axis=-1)
    bits = -(key >> 32) if descending else key >> 32
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).int().view(torch.float32), key & 0xFFFFFFFF


def _column_ids(like: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    return torch.arange(like.shape[1], device=like.device).expand(like.shape) if ids is None else ids


def smooth_(x: torch.Tensor, top, s, t) -> torch.Tensor:
    """Steps 4-5: (top - s (x - top)^2) / t, in place; top, s and t broadcast against x."""
    return x.sub_(top).square_().mul_(-s / t).add_(top / t)


def truncate(x, meta: SamplingMetadata, sl, sort=sort, is_sorted=False, lse=None, entropy=None, tau=None):
    """Step 6: top-k, top-p, top-a, min-p, tfs and typical, in that order, in descending-sorted space; -inf where
    dropped.

    In candidate space (tau: every token outside has a logit <= tau) a row's first filter measures mass (top_p,
    top_a) and entropy (typical) against the whole vocabulary: lse and entropy (NaN in rows that do not need them).
    Returns the truncated x and, per row, whether its bounding filter (meta.bound) kept only candidates, strictly
    above tau, so that no token outside could have been kept or tied (None outside candidate space)."""
    vals, order = (x, None) if is_sorted else sort(x, True)
    R, C = vals.shape
    if tau is None:
        p = torch.softmax(vals, -1)
    else:  # p against the whole vocabulary where lse is given, else against the candidates
        own = torch.logsumexp(vals, -1)
        lse = own if lse is None else torch.where(torch.isnan(lse), own, lse)
        p = torch.exp(vals - lse[:, None])
    keep = torch.ones_like(p, dtype=torch.bool)
    ok = None if tau is None else torch.ones(R, 1, dtype=torch.bool, device=x.device)
    bound = {} if tau is None else {n: b[sl][:, None] for n, b in meta.bound_on.items()}
    first = torch.ones(R, 1, dtype=torch.bool, device=x.device)  # no filter has acted on the row yet

    def at(t, n):  # t[row, n - 1]: the last kept value when keeping n
        return t.gather(1, (n - 1).clamp(0, C - 1))

    def exclusive_cumsum(t):
        return torch.cat([torch.zeros_like(t[:, :1]), t.cumsum(-1)[:, :-1]], 1)

    last = list(meta.filters)[-1]
    for name, (value, on, all_on) in meta.filters.items():
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
            dev_sorted, by_dev = sort(dev, False)
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
        return x.masked_fill(~torch.zeros_like(keep).scatter_(1, order, keep), -math.inf), None
    return vals.masked_fill(~keep, -math.inf), None if ok is None else ok.squeeze(1) | (tau == -math.inf)


def distribution(g: Group, meta: SamplingMetadata, seqs, sort, softmax, buffer) -> None:
    """Steps 7-10 on a truncated group: sets g.probs (and g.miro_probs, g.mu for mirostat). A full-space group's x
    may be the caller's logits (where no step before the softmax edits it in place)."""
    x, sl = g.x, g.sl
    if meta.any_t2:
        t2 = meta.t2[sl]
        if meta.any_dyn:
            t2 = torch.where(meta.dyn[sl], dynamic_temperature(x, meta, sl), t2)
        x = x.div_(t2[:, None])
    if meta.xtc_rows.intersection(g.rows):
        x = xtc(x, meta, seqs, g)
    miro = meta.miro_rows.intersection(g.rows)
    if miro:
        g.mu = torch.stack([seqs[i].mirostat_mu if i in miro else meta.tau[0] for i in g.rows])
        x = mirostat(x, g.mu, meta.miro_on[sl])
    g.probs = softmax(x, g.ids is not None, buffer)
    if miro:
        g.miro_probs = g.probs
    if meta.skew_rows.intersection(g.rows):
        g.probs = torch.where(meta.skew_on[sl, None], skew(g.probs, meta.skew_exp[sl], sort), g.probs)


def dynamic_temperature(x, meta: SamplingMetadata, sl) -> torch.Tensor:
    """Step 7: (R,) min + (max - min) * (H / log n) ** exponent over the n tokens still possible."""
    p = torch.softmax(x, -1)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    n = (x > -math.inf).sum(-1)
    max_entropy = torch.where(n > 1, torch.log(n.float()), 1.0)
    h = (entropy / max_entropy).clamp(0, 1)
    t = meta.dyn_min[sl] + (meta.dyn_max[sl] - meta.dyn_min[sl]) * h ** meta.dyn_exp[sl]
    return t.clamp(min=_MIN_TEMP)


def xtc(x, meta: SamplingMetadata, seqs, g: Group) -> torch.Tensor:
    """Step 8: with probability xtc_probability, drop every token with p >= xtc_threshold but the least likely."""
    # one coin per XTC row per step, from the row's own generator when seeded (drawn before the row's noise)
    coins = torch.rand(len(g.rows), device=x.device)
    own = [(r, seqs[i].generator) for r, i in enumerate(g.rows) if i in meta.xtc_rows and seqs[i].generator]
    if own:
        coins[h2d([r for r, _ in own], torch.long, x.device)] = torch.cat(
            [torch.rand(1, device=x.device, generator=gen) for _, gen in own])
    fire = coins < meta.xtc_prob[g.sl]  # xtc_prob is 0 in rows without XTC
    p = torch.softmax(x, -1)
    above = p >= meta.xtc_thr[g.sl, None]
    least = p.masked_fill(~above, math.inf).amin(-1, keepdim=True)
    drop = above & (p > least) & (above.sum(-1, keepdim=True) >= 2) & fire[:, None]
    return x.masked_fill(drop, -math.inf)


def mirostat(x, mu, on) -> torch.Tensor:
    """Step 9, mirostat v2: keep tokens with surprise -log2 p <= mu (R,), and the top one, in rows `on` (R,)."""
    p = torch.softmax(x, -1)
    keep = (p >= torch.exp2(-mu)[:, None]) | (p >= p.amax(-1, keepdim=True)) | ~on[:, None]
    return x.masked_fill(~keep, -math.inf)


def mirostat_update(g: Group, cols, meta: SamplingMetadata, seqs) -> None:
    """After the draw of cols (R,): mu moves towards tau by eta times the drawn token's surprise's excess."""
    surprise = -torch.log2(g.miro_probs.gather(1, cols[:, None]).squeeze(1))
    mu = g.mu - meta.eta[g.sl] * (surprise - meta.tau[g.sl])
    for i, m in zip(g.rows, mu.unbind(0)):
        if i in meta.miro_rows:
            seqs[i].mirostat_mu = m


def skew(probs, exponent, sort=sort) -> torch.Tensor:
    """Step 10: sorted descending with cdf C, token j gets C_j ** e - C_(j-1) ** e; tied tokens share their group's
    mass."""
    ps, order = sort(probs, True)
    # normalised by the cumsum's last entry: a row's sum must not depend on its batch (torch splits a lone row's
    # sum over threads, so ps.sum(-1) rounds differently alone and in a batch), cumsum runs along each row in order
    cum = ps.cumsum(-1)
    total = cum[:, -1:]
    ps, cdf = ps / total, cum / total
    new_group = torch.cat([torch.zeros_like(ps[:, :1]), (ps[:, 1:] != ps[:, :-1]).float()], 1)
    group = new_group.cumsum(-1).long()  # (R, C) index of each token's tie group
    hi = torch.zeros_like(ps).scatter_reduce_(1, group, cdf, "amax").clamp(0, 1)
    lo = torch.ones_like(ps).scatter_reduce_(1, group, cdf - ps, "amin").clamp(0, 1)
    size = torch.zeros_like(ps).scatter_add_(1, group, torch.ones_like(ps))
    e = exponent[:, None]
    mass = ((hi ** e - lo ** e) / size.clamp(min=1)).clamp(min=0)
    return torch.zeros_like(probs).scatter_(1, order, mass.gather(1, group))


def softmax(x: torch.Tensor, owned: bool, buffer) -> torch.Tensor:
    """x's softmax over its last dimension (owned: x may be overwritten; buffer: the sampler's reused buffers)."""
    return torch.softmax(x, -1)


def softmax_cpu(x: torch.Tensor, owned: bool, buffer) -> torch.Tensor:
    """softmax in place where x is the group's own, else into a reused buffer: no fresh (R, V) tensor to fault in."""
    if not owned:
        return torch.ops.aten._softmax.out(x, -1, False, out=buffer("probs", *x.shape, x.device))
    probs = x.sub_(x.amax(-1, keepdim=True)).exp_()
    return probs.div_(probs.sum(-1, keepdim=True))
