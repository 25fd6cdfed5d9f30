"""Step 11 and what the caller reads of it: the argmax (greedy rows), the draw, logprobs.

The reference draws argmax(p / q), q ~ Exponential(1), without a host sync. On the CPU, where a random number costs
~20 ns and argmax ~10x an amax, rows draw by inverse cdf with one uniform each, and the argmax goes through block
maxima; both find a row's column through blocks of BLOCK columns.
"""

from __future__ import annotations

import math

import torch

from tokenmill.sampling.candidates import block_max
from tokenmill.sampling.filters import Group
from tokenmill.sampling.metadata import SamplingMetadata

BLOCK = 32  # tokens per block: the CPU's greedy argmax and inverse cdf


def argmax(x: torch.Tensor, blocks: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """(B,) x.argmax(-1), the first maximum (blocks: ignored, as in block_argmax)."""
    return x.argmax(-1)


def block_argmax(x: torch.Tensor, blocks: dict[int, torch.Tensor] | None = None, lib=None) -> torch.Tensor:
    """argmax through block maxima (blocks: those known, by block size; lib: csrc/sampler.cpp's ops, to take them)."""
    B, V = x.shape
    G = min(BLOCK, V)
    block = (blocks[G] if blocks and G in blocks else block_max(x, G, lib)).argmax(-1)
    cols = block[:, None] * G + torch.arange(G, device=x.device)
    vals = x.gather(1, cols.clamp(max=V - 1)).masked_fill(cols >= V, -math.inf)
    return cols.gather(1, vals.argmax(-1, keepdim=True)).squeeze(1)


def _seeded(g: Group, meta: SamplingMetadata, seqs) -> list[tuple[int, torch.Generator]]:
    """(row in g, its generator) for g's seeded rows."""
    return [(r, seqs[i].generator) for r, i in enumerate(g.rows) if i in meta.seeded_rows]


def draw(g: Group, meta: SamplingMetadata, seqs, buffer) -> torch.Tensor:
    """(R,) column drawn from each row of g.probs without a host sync: argmax(p / q), q ~ Exponential(1), a seeded row
    drawing its q over its g.n columns from its own generator (so its draw does not depend on its batch)."""
    probs = g.probs
    R, C = probs.shape
    own = _seeded(g, meta, seqs)
    q = buffer("noise", R, C, probs.device) if C == meta.vocab else torch.empty_like(probs)
    if len(own) < R:
        q.exponential_()
    for r, gen in own:
        row = q[r]
        if g.n[r] < C:
            row[g.n[r]:] = 1.0  # where p = 0
            row = row[:g.n[r]]
        row.exponential_(generator=gen)
    return argmax(torch.div(probs, q.clamp_(min=1e-30), out=q))


def draw_cpu(g: Group, meta: SamplingMetadata, seqs, buffer) -> torch.Tensor:
    """draw by inverse cdf with one uniform per row, a seeded row's from its own generator (one number per step,
    whatever the batch)."""
    probs = g.probs
    u = torch.rand(probs.shape[0], 1, device=probs.device)
    for r, gen in _seeded(g, meta, seqs):
        u[r] = torch.rand(1, device=probs.device, generator=gen)
    return inverse_cdf(probs, u)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(R,) the column where each row's cdf first exceeds u (R, 1) * total: a block of BLOCK columns through the
    cdf of block sums, then the column in the block; never a column with p = 0."""
    R, C = probs.shape
    G = BLOCK if C % BLOCK == 0 else C
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


def logprobs(g: Group, cols, n_top: int, V: int):
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
