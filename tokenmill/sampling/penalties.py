"""Steps 1-3: penalties, masks and DRY, as sparse edits of the working logits x (B, V).

The penalties touch only the history's tokens: gather, adjust, scatter on (B, L) index tensors, each token's newest
position found through a (B, V) map that is never cleared (Owners); where csrc/sampler.cpp builds, its `penalties` op
does each row's window in one pass instead (penalize_kernel). DRY compares the newest tokens with every position
(dry: no host sync) or, on the CPU, only the positions whose previous token is the newest (dry_sparse).

On the CPU the working tensor is the caller's logits themselves: every edit keeps what it overwrote, and Edits.undo
puts it back before the sampler returns, so no (B, V) copy is made.
"""

from __future__ import annotations

import math

import torch

from tokenmill.sampling.metadata import SamplingMetadata, h2d

DRY_MAX_MATCH = 50  # longest repeat DRY measures: bounds base ** length and the work per step


class Edits:
    """Sparse in-place edits of the working logits x (B, V). When undoable (x is the caller's tensor) each edit keeps
    what it overwrote and undo() puts it back, newest first. `blocks` (G, (B, nb) block maxima of x, from the kernel
    that made x), if given, is kept current through the edits by `lib`'s block_max_update."""

    def __init__(self, x: torch.Tensor, undoable: bool, blocks: tuple[int, torch.Tensor] | None = None, lib=None):
        self.x, self.undoable, self.saved = x, undoable, []
        self.blocks, self.lib = blocks, lib

    def fill_tail(self, start: int) -> None:  # columns start.. (a padded head) to -inf
        if self.undoable:
            self.saved.append((start, self.x[:, start:].clone()))
        self.x[:, start:] = -math.inf
        if self.blocks:
            G, blocks = self.blocks
            k = start // G
            blocks[:, k:] = -math.inf
            if start % G:
                blocks[:, k] = self.x[:, k * G:start].amax(-1)

    def scatter(self, ids: torch.Tensor, values: torch.Tensor, old: torch.Tensor) -> None:  # (B, L), old = x at ids
        self.scattered(ids, old)
        self.x.scatter_(1, ids, values)
        if self.blocks:
            self.lib.block_max_update(self.x, self.blocks[1], torch.arange(len(ids)), ids, old, self.blocks[0])

    def scattered(self, ids: torch.Tensor, old: torch.Tensor) -> None:
        """Record a scatter made elsewhere (a kernel): x at ids (B, L) was old."""
        if self.undoable:
            self.saved.append((ids, old))

    def put(self, rows: torch.Tensor, cols: torch.Tensor, values, accumulate=False) -> None:  # (n,) each
        old = self.x[rows, cols] if self.undoable or self.blocks else None
        if self.undoable:
            self.saved.append(((rows, cols), old))
        self.x.index_put_((rows, cols), torch.as_tensor(values, device=self.x.device), accumulate=accumulate)
        if self.blocks:
            self.lib.block_max_update(self.x, self.blocks[1], rows, cols[:, None], old[:, None], self.blocks[0])

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


class Owners:
    """(B, L) -> (B, L): the position in its row of each id's newest occurrence (ids right-aligned by age).

    Through a reused (B, V) int32 map that is never cleared: each call's positions are offset by a stamp above every
    value an earlier call left there, so the amax sees only this call's."""

    def __init__(self):
        self.map: torch.Tensor | None = None
        self.stamp = 1

    def __call__(self, ids: torch.Tensor, vocab: int) -> torch.Tensor:
        B, L = ids.shape
        m = self.map
        if m is None or m.shape[0] < B or m.shape[1] != vocab or m.device != ids.device:
            m, self.stamp = torch.zeros(max(B, 1), vocab, dtype=torch.int32, device=ids.device), 1
            self.map = m
        if self.stamp + L >= 2 ** 31:
            m.zero_()
            self.stamp = 1
        m, stamp = m[:B], self.stamp
        self.stamp += L
        pos = torch.arange(stamp, stamp + L, dtype=torch.int32, device=ids.device).expand(B, L)
        m.scatter_reduce_(1, ids, pos, "amax")
        return m.gather(1, ids).sub_(stamp).long()


def penalize(edits: Edits, window: torch.Tensor, meta: SamplingMetadata, seqs, owners: Owners) -> None:
    """Step 1 over each row's window (B, L) of trailing history ids (-1: none): gather, adjust, scatter."""
    ids = window.clamp(min=0)
    seen = edits.x.gather(1, ids)  # (B, L)
    # a token seen twice gets the same value written twice
    edits.scatter(ids, penalties(seen, window, owners(ids, meta.vocab), meta, seqs), seen)


def penalize_kernel(edits: Edits, window: torch.Tensor, meta: SamplingMetadata, seqs, lib, block) -> None:
    """penalize in csrc/sampler.cpp's `penalties`: one pass per row over its window, keeping edits.blocks current
    (block(V): the block size to pass where none are kept)."""
    G, blocks = edits.blocks or (block(edits.x.shape[1]), None)
    n_out = h2d([len(s.output_ids) for s in seqs], torch.long, edits.x.device)
    old = lib.penalties(edits.x, blocks, window, meta.rep, meta.rep_range, meta.rep_decay, meta.freq, meta.pres,
                        n_out, G)
    edits.scattered(window.clamp(min=0), old)


def _per_token(owner: torch.Tensor, src: torch.Tensor, reduce: str) -> torch.Tensor:
    """(B, L) -> (B, L): src reduced ("sum" or "amax", src >= 0) over each row's positions holding the same id."""
    return torch.zeros_like(src).scatter_reduce_(1, owner, src, reduce).gather(1, owner)


def penalties(seen, hist, owner, meta: SamplingMetadata, seqs) -> torch.Tensor:
    """(B, L) the history positions' logits `seen` after the repetition, frequency and presence penalties."""
    B, L = hist.shape
    valid = hist >= 0
    dist = torch.arange(L - 1, -1, -1, device=seen.device, dtype=torch.float32)  # tokens back from the newest
    if meta.any_rep:
        # full penalty within the range, fading linearly over the decay tokens before it
        r, d = meta.rep_range[:, None], meta.rep_decay[:, None]
        w = (((r + d - dist) / (d + 1)).clamp(0, 1) * valid).gather(1, owner)  # at the newest occurrence
        pen = 1 + (meta.rep[:, None] - 1) * w
        seen = torch.where(seen > 0, seen / pen, seen * pen)
    if meta.any_fp:
        n_out = h2d([len(s.output_ids) for s in seqs], torch.float32, seen.device)
        count = _per_token(owner, (valid & (dist < n_out[:, None])).float(), "sum")
        seen = seen - meta.freq[:, None] * count - meta.pres[:, None] * (count > 0)
    return seen


def mask(edits: Edits, meta: SamplingMetadata, seqs) -> None:
    """Step 2: logit_bias, allowed/disallowed tokens, banned_now, and EOS until min_new_tokens (always with
    ignore_eos)."""
    if meta.bias is not None:
        edits.put(*meta.bias, accumulate=True)
    rows, cols = [], []
    for i, s in enumerate(seqs):
        banned = list(s.banned_now)
        if s.eos_ids and (s.params.ignore_eos or len(s.output_ids) < s.params.min_new_tokens):
            banned += list(s.eos_ids)
        rows += [i] * len(banned)
        cols += banned
    if rows:
        dev = edits.x.device
        edits.put(h2d(rows, torch.long, dev), h2d(cols, torch.long, dev), -math.inf)


# Step 3, DRY: penalise by mult * base ** (n - allowed) each token that would extend an n-token repeat of the recent
# context (n >= allowed). Both forms return (rows, token ids, penalty) at history positions (n,); a token listed twice
# in a row has the same penalty each time.

def dry(hist: torch.Tensor, meta: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DRY at every position of hist (B, L), without a host sync."""
    B, L = hist.shape
    dev = hist.device
    h, ref, windows = _dry_context(hist, meta)
    b, i = torch.arange(B, device=dev).repeat_interleave(L), torch.arange(L, device=dev).repeat(B)
    tokens, run = _repeats(h, ref, windows, b, i, meta)
    # the longest repeat each (row, token) extends, over every (row, token) slot
    slot = b * meta.vocab + tokens
    run = torch.zeros(B * meta.vocab, device=dev).scatter_reduce_(0, slot, run, "amax")[slot]
    return b, tokens, _dry_penalty(run, b, meta)[1]


def dry_sparse(hist: torch.Tensor, meta: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dry comparing only the positions whose previous token is the newest (few), and returning only the tokens it
    penalises; the CPU's."""
    h, ref, windows = _dry_context(hist, meta)
    b, i = (windows[:, :, -1] == ref[:, -1:]).nonzero(as_tuple=True)
    tokens, run = _repeats(h, ref, windows, b, i, meta)
    # the longest repeat each (row, token) extends, over the distinct keys of the few positions
    keys, slot = torch.unique(b * meta.vocab + tokens, return_inverse=True)
    run = torch.zeros(len(keys), device=hist.device).scatter_reduce_(0, slot, run, "amax")[slot]
    over, penalty = _dry_penalty(run, b, meta)
    k = (over >= 0).nonzero().squeeze(1)
    return b[k], tokens[k], penalty[k]


def _dry_context(hist, meta: SamplingMetadata):
    """h (B, L): hist within each row's dry_range (-1 elsewhere, and in rows without DRY); ref (B, K): its newest K
    tokens, breakers and padding -2 (they match nothing); windows (B, L, K): the K tokens before each position."""
    B, L = hist.shape
    K = min(DRY_MAX_MATCH, L)
    dist = torch.arange(L - 1, -1, -1, device=hist.device)
    h = hist.masked_fill((dist >= meta.dry_range[:, None]) | (meta.dry_mult[:, None] == 0), -1)
    ref = h[:, L - K:]
    ref = ref.masked_fill((ref < 0) | meta.breakers.gather(1, ref.clamp(min=0)), -2)
    windows = torch.cat([h.new_full((B, K), -1), h], 1).unfold(1, K, 1)[:, :L]
    return h, ref, windows


def _repeats(h, ref, windows, b, i, meta: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """At positions (b, i) (n,): the token there, and the length of the repeat of ref it would extend (0 at padding
    and breakers)."""
    K = ref.shape[1]
    same = (windows[b, i] == ref[b]).flip(-1)  # (n, K), column k: k + 1 tokens back
    run = torch.where(same.all(-1), K, (~same).to(torch.uint8).argmax(-1))  # repeat length before each position
    tokens = h[b, i].clamp(min=0)
    return tokens, run.masked_fill((h[b, i] < 0) | meta.breakers[b, tokens], 0).float()


def _dry_penalty(run, b, meta: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) how far each repeat is over the allowed length, and its penalty (0 where under)."""
    over = run - meta.dry_allowed[b]
    return over, torch.where(over >= 0, meta.dry_mult[b] * torch.exp(over * meta.dry_base[b].log()), 0.0)
