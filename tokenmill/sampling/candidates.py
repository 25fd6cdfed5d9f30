"""Candidate space: steps 4-6 for the CPU's sampled rows whose filters bound their survivors from below.

On the CPU torch's sort of V costs ~7 ms a row, and each pass over (B, V) about a millisecond at B = 64, while
reading a tensor on the host is free. So a sampled row whose filters bound its survivors from below runs steps 4-11
on its tokens with logit >= tau: below the blocks that hold k tokens (top_k), the threshold less a margin (min_p, also
after top_p; top_a), or a bound checked afterwards (top_p: below the blocks holding about top_p of the whole mass, from
a histogram of the block maxima weighted by the block masses; typical: every token outside is further from the whole
entropy than the last one kept). Ties with tau are candidates too, and each row checks that its survivors lie
strictly above every token outside, so the result is exact; rows whose check fails retry with a lower bound (the next
tier), then join the rows with no such filter (or tfs first) in the full space. Candidates are found with numpy's
flatnonzero (~2x torch's nonzero) and sorted in groups of rows of similar counts by numpy's sort of int64 keys (value
bits, then id: ~10x torch's sort).

Where csrc/sampler.cpp builds (`lib`, chosen by the sampler at construction), its ops replace the (B, V) passes, with
the PyTorch code beside each as their reference: the block maxima (`block_max`, or taken on the working copy's way:
`copy_block_max`), the whole-row masses and entropy (`block_masses`, `masses`) and the candidates' compaction and sort
(a stable radix sort on the value bits: `candidates`), one pass each per row.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tokenmill.sampling.filters import Group, smooth_, sort_cpu, truncate
from tokenmill.sampling.metadata import SamplingMetadata, h2d

# candidate tiers, tried in turn: (block size, a power of two; blocks at or above tau for typical rows; top_p rows:
# tau's margin below the block-histogram estimate, in logits after temperature; most candidates a row may have).
# With V = 49152 and a model's logits at T = 1, top_p = 0.9, the first holds ~86% of rows and the second the rest.
TIERS = ((32, 256, 1.5, 16384), (32, 1024, 5.0, 32768))
BINS = 8  # bins per unit of logit (top_p: after temperature) of the block-maxima histogram that places tau
WIDTHS = (512, 2048, 8192)  # rows whose candidates fit the same width are sorted together; the rest as one more
CHUNK = 8  # rows per step of the whole-vocabulary pass (masses): 8 x V floats stay in a core's L2 cache


class CandidateSpace:
    """Truncates rows in candidate space (module docstring) through `tiers` (TIERS' form), with `lib`'s ops (None:
    their PyTorch reference)."""

    def __init__(self, tiers=TIERS, lib=None):
        self.tiers, self.lib = tiers, lib

    def block(self, V: int) -> int:
        """The first tier's block size for V columns."""
        return min(self.tiers[0][0], 1 << V.bit_length() - 1)

    def __call__(self, x, t1, smooth, meta: SamplingMetadata, tmp, blocks, smoothed: list[int]):
        """Steps 4-6 for the sampled rows that have a bounding filter (meta.bound); x (B, V) is still to be smoothed
        by smooth (B,) where > 0, and divided by t1 (B,). Returns the truncated groups and the rows left for the full
        space. blocks: x's block maxima known so far, by block size; smoothed: gets the widths smoothed."""
        B, V = x.shape
        pending = [i for i in meta.sampled if meta.bound[i]]
        rest = [i for i in meta.sampled if not meta.bound[i]]
        blocks = dict(blocks)  # block size -> (B, nb) block maxima
        lse, entropy, mass = self._whole(x, pending, t1, meta, tmp, blocks)
        groups = []
        for G, K, margin, cap in self.tiers:
            if not pending:
                break
            G = min(G, 1 << V.bit_length() - 1)
            if G not in blocks:
                blocks[G] = block_max(x, G, self.lib)
            sl = meta.index(pending)
            bm, t, s = blocks[G][sl], t1[sl], smooth[sl]  # (R, nb), (R,), (R,)
            xmax = bm.amax(-1)
            tau = _tau(pending, meta, sl, bm, xmax, t, s, mass, lse, K, margin)
            classes, counts = gather(x, pending, bm, tau, G, cap, self.lib)
            rest += [i for i, c in zip(pending, counts) if not 0 < c <= cap]
            retry = []
            for sel, vals, ids in classes:
                rows, j = [pending[r] for r in sel], h2d(sel, torch.long, x.device)
                group, failed = _truncate_class(rows, vals, ids, xmax[j, None], t[j, None], s[j, None], tau[j, None],
                                                meta, lse, entropy, smoothed)
                if group:
                    groups.append(group)
                retry += failed
            pending = sorted(retry)
        return groups, sorted(rest + pending)

    def _whole(self, x, pending, t1, meta: SamplingMetadata, tmp, blocks):
        """Rows with top_p, top_a or typical first measure x / t1 over the whole vocabulary: their lse and entropy
        (B,) (NaN in other rows), and top_p's block masses (B, nb), in units of exp(top / t); Nones if no row does."""
        whole = [i for i in pending if meta.first[i] in ("top_p", "top_a", "typical_p")]
        if not whole:
            return None, None, None
        B, V = x.shape
        dev = x.device
        G = self.block(V)
        sl = meta.index(whole)
        lse, entropy = torch.full((2, B), math.nan, device=dev).unbind(0)
        typical = any(meta.first[i] == "typical_p" for i in whole)
        if G not in blocks and self.lib is not None:  # the block maxima and masses in one pass
            t = torch.zeros(B, device=dev).index_copy_(0, torch.tensor(whole), t1[sl])
            blocks[G], mass, h = self.lib.block_masses(x, t, G, typical)
            h, t = h[sl], t1[sl, None]
            top = blocks[G][sl].amax(-1, keepdim=True)
        else:
            if G not in blocks:
                blocks[G] = block_max(x, G, self.lib)
            top, t = blocks[G][sl].amax(-1, keepdim=True), t1[sl, None]
            mass = torch.zeros(B, blocks[G].shape[1], device=dev)
            mass[sl], h = masses(x, whole, top, t, G, typical, tmp, self.lib)
        lse[sl] = (top / t).squeeze(1) + mass[sl].sum(-1).log()
        if typical:
            entropy[sl] = h
        return lse, entropy, mass


def _tau(rows, meta: SamplingMetadata, sl, bm, xmax, t, s, mass, lse, K: int, margin: float) -> torch.Tensor:
    """(R,) each row's bound from its block maxima bm (R, nb), maximum xmax, temperature t and smoothing s (R,)."""
    bounds = {meta.bound[i] for i in rows}
    # tau below the blocks that hold k tokens at least (top_k; typical: K blocks), or about top_p of the mass
    counts = h2d([meta.top_k[i] if meta.bound[i] == "top_k" else K for i in rows], torch.float32, bm.device)
    if "top_p" in bounds:
        on = meta.bound_on["top_p"][sl]
        weights = torch.where(on[:, None], mass[sl], 1.0)
        target = torch.where(on, meta.filters["top_p"][0][sl] * mass[sl].sum(-1), counts)
        tau = _edge(bm, xmax, torch.where(on, t, 1.0), weights, target) - t * margin * on
    else:
        tau = _edge(bm, xmax, torch.ones_like(t), torch.ones_like(bm), counts)
    if "min_p" in bounds:  # p >= min_p * p_max: log(min_p) below the top after smoothing and temperature
        log_p = t * meta.filters["min_p"][0][sl].log()
        drop = torch.where(s > 0, -(-log_p / s.clamp(min=1e-30)).sqrt(), log_p)
        tau = torch.where(meta.bound_on["min_p"][sl], xmax + drop, tau)
    if "top_a" in bounds:  # p >= top_a * p_max ** 2
        tau = torch.where(meta.bound_on["top_a"][sl], t * (meta.filters["top_a"][0][sl].log() - lse[sl]) + 2 * xmax,
                          tau)
    # lower tau a little, so that the survivors lie strictly above it (truncate checks) despite rounding
    return tau - 1e-4 * (1 + xmax.abs() + tau.abs())


def _truncate_class(rows, vals, ids, top, t, s, tau, meta: SamplingMetadata, lse, entropy, smoothed):
    """Steps 4-6 on one class of rows' sorted candidates vals, ids (R, C), with their maximum, temperature, smoothing
    and bound (R, 1): the Group of the rows whose check held (or None), and the rows whose check failed."""
    sl = meta.index(rows)
    y, tau_y = vals / t, tau / t  # the candidates and tau, smoothed and divided alike
    if (s > 0).any():
        smoothed.append(vals.shape[-1])
        y = torch.where(s > 0, smooth_(vals, top, s, t), y)
        tau_y = torch.where(s > 0, smooth_(tau, top, s, t), tau_y)
    x_c, ok = truncate(y, meta, sl, sort_cpu, is_sorted=True, lse=None if lse is None else lse[sl],
                       entropy=None if entropy is None else entropy[sl], tau=tau_y.squeeze(1))
    ok = ok.tolist()
    good = [r for r, o in enumerate(ok) if o]
    failed = [rows[r] for r, o in enumerate(ok) if not o]
    if not good:
        return None, failed
    ids = ids[:, :x_c.shape[1]]
    n = (x_c > -math.inf).flip(-1).to(torch.uint8).argmax(-1)  # -inf columns after each row's last survivor
    if len(good) < len(rows):
        k = h2d(good, torch.long, x_c.device)
        x_c, ids, n = x_c[k], ids[k], n[k]
    rows_ok = [rows[r] for r in good]
    return Group(rows_ok, meta.index(rows_ok), x_c, ids, (x_c.shape[1] - n).tolist()), failed


def block_reduce(x: torch.Tensor, G: int, reduce) -> torch.Tensor:
    """(B, ceil(V / G)) reduce (torch.amax or torch.sum) of each run of G columns (the last run may be shorter)."""
    B, V = x.shape
    n = V // G
    m = reduce(x.unfold(1, G, G), -1)
    return m if n * G == V else torch.cat([m, reduce(x[:, n * G:], -1, keepdim=True)], 1)


def block_max(x: torch.Tensor, G: int, lib=None) -> torch.Tensor:
    """block_reduce(x, G, torch.amax), through lib's `block_max` where given."""
    if lib is not None:
        return lib.block_max(x, G)
    return block_reduce(x, G, torch.amax)


def masses(x, rows: list[int], top, t, G: int, entropy: bool, tmp, lib=None):
    """Block masses (R, nb) of p = exp((x[rows] - top) / t), and if asked the entropy of p / sum(p) (R,); CHUNK rows
    at a time in tmp, where p stays in the cache between the passes over it (lib: its `masses`, one pass a row)."""
    R = len(rows)
    if lib is not None:
        m, h = lib.masses(x, torch.tensor(rows), top.reshape(-1), t.reshape(-1), G, entropy)
        return m, h if entropy else None
    scaled = bool((t != 1).any())
    out, entropies = [], []
    for i in range(0, R, CHUNK):
        n = min(CHUNK, R - i)
        if R == x.shape[0]:
            p = torch.sub(x[i:i + n], top[i:i + n], out=tmp[:n])
        else:
            p = torch.index_select(x, 0, h2d(rows[i:i + n], torch.long, x.device), out=tmp[:n]).sub_(top[i:i + n])
        if scaled:
            p.div_(t[i:i + n])
        out.append(block_reduce(p.exp_(), G, torch.sum))
        if entropy:
            entropies.append(-p.div_(out[-1].sum(-1, keepdim=True)).xlogy_(p).sum(-1))
    return torch.cat(out), torch.cat(entropies) if entropy else None


def _edge(blocks, top, scale, weights, target) -> torch.Tensor:
    """(R,) the highest bin edge e = top - scale * j / BINS (j = 1, 2, ...) such that the blocks (R, nb) whose maxima
    lie above e hold `target` (R,) of `weights` (R, nb); -inf where only the deepest bin, 40 * scale down, does."""
    n = 40 * BINS
    j = ((top[:, None] - blocks) * (BINS / scale)[:, None]).nan_to_num_(n).clamp_(0, n - 1).long()
    cum = torch.zeros(len(top), n, device=blocks.device).scatter_add_(1, j, weights).cumsum_(-1)
    j = (cum < target[:, None]).sum(-1)
    return torch.where(j < n - 1, top - scale * (j + 1) / BINS, -math.inf)


def gather(y, rows: list[int], blocks, tau, G: int, cap: int, lib=None):
    """Each of `rows`' finite tokens with logit >= tau, from its blocks (R, nb) whose maximum reaches tau (lib: its
    `candidates`, which also sorts them).

    Returns classes of rows by their count (1..cap candidates; a class's rows share a padded width from WIDTHS):
    each the indices into rows it holds, their candidates (R', C) sorted descending (ties in id order, -inf padding
    on the right) and token ids; and every row's count."""
    B, V = y.shape
    R = len(rows)
    dev = y.device
    if lib is not None:
        x_c, ids, counts = lib.candidates(y, torch.tensor(rows), blocks, tau, G, cap)
        return _classes(x_c, ids, counts.tolist(), cap, sort=False), counts.tolist()
    if V % G:  # whole blocks: pad the short last one with -inf
        y = torch.nn.functional.pad(y, (0, G - V % G), value=-math.inf)
    tau = tau.clamp(min=torch.finfo(y.dtype).min)  # tau = -inf takes every finite token
    r, b = (blocks >= tau[:, None]).nonzero(as_tuple=True)
    nb = blocks.shape[1]
    vals = y.view(-1, G).index_select(0, h2d(rows, torch.long, dev)[r] * nb + b)  # (n, G)
    # ascending flat indices where vals >= tau, row-major (ids ascending within each row): numpy's, ~2x torch's
    k = torch.from_numpy(np.flatnonzero(vals.numpy() >= tau[r, None].numpy()))
    i = k >> G.bit_length() - 1  # G is a power of two: k // G, without the CPU's slow integer division
    r, cols, vals = r[i], b[i] * G + (k & G - 1), vals.view(-1)[k]
    counts = torch.bincount(r, minlength=R)
    pos = torch.arange(r.numel(), device=dev) - (counts.cumsum(0) - counts)[r]
    counts = counts.tolist()
    C = max([c for c in counts if c <= cap], default=0)
    x_c = torch.full((R, C), -math.inf, device=dev)
    ids = torch.zeros(R, C, dtype=torch.long, device=dev)
    if C < max(counts):  # drop the rows over cap
        k = (pos < C).nonzero().squeeze(1)
        r, pos, cols, vals = r[k], pos[k], cols[k], vals[k]
    x_c.index_put_((r, pos), vals)
    ids.index_put_((r, pos), cols)
    return _classes(x_c, ids, counts, cap, sort=True), counts


def _classes(x_c, ids, counts: list[int], cap: int, sort: bool):
    """gather's classes from every row's candidates x_c, ids (R, C), sorted there unless `sort`."""
    classes = {}  # width -> indices into rows
    for i, c in enumerate(counts):
        if 0 < c <= cap:
            classes.setdefault(next((w for w in WIDTHS if c <= w), cap), []).append(i)
    out = []
    for sel in classes.values():
        width = max(counts[i] for i in sel)
        xs, ids_s = x_c[:, :width], ids[:, :width]
        if len(sel) < len(counts):
            j = h2d(sel, torch.long, x_c.device)
            xs, ids_s = xs[j], ids_s[j]
        out.append((sel, *sort_cpu(xs, True, ids_s)) if sort else (sel, xs, ids_s))
    return out
