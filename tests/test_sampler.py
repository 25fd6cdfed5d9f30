"""Sampler and SamplingParams against a plain numpy re-implementation written here, row by row."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from tokenmill.errors import InvalidRequestError
from tokenmill.kernels.cpu.extension import ops
from tokenmill.sampling.candidates import TIERS, block_max, gather, masses
from tokenmill.sampling.draw import block_argmax, inverse_cdf
from tokenmill.sampling.filters import sort_cpu
from tokenmill.sampling.penalties import DRY_MAX_MATCH
from tokenmill.sampling.sampler import Sampler, SeqSamplingState, dry_breaker_ids
from tokenmill.sampling.params import PRESETS, SamplingParams as P

NEG = -np.inf


# ---------------------------------------------------------------- numpy reference, one row at a time

def softmax(l):
    l = np.asarray(l, dtype=np.float64)
    e = np.where(np.isfinite(l), np.exp(l - l[np.isfinite(l)].max()), 0.0)
    return e / e.sum()


def ref_penalties(l, p, prompt, output):
    l = l.copy()
    hist = list(prompt) + list(output)
    if p.repetition_penalty != 1.0:
        seen = set()
        for dist, t in enumerate(reversed(hist)):  # newest first: a token's newest occurrence decides its weight
            if t in seen:
                continue
            seen.add(t)
            r, d = p.repetition_range, p.repetition_decay
            if r == 0 or dist < r:
                w = 1.0
            elif dist < r + d:
                w = 1.0 - (dist - r + 1) / (d + 1)
            else:
                continue
            pen = 1.0 + (p.repetition_penalty - 1.0) * w
            l[t] = l[t] / pen if l[t] > 0 else l[t] * pen
    for t, c in Counter(output).items():
        l[t] -= c * p.frequency_penalty + p.presence_penalty
    return l


def ref_masks(l, p, output, eos, banned_now=()):
    l = l.copy()
    if p.allowed_tokens is not None:
        for t in range(len(l)):
            if t not in p.allowed_tokens:
                l[t] = NEG
    for t, b in p.logit_bias.items():
        l[t] += b
    for t in list(p.disallowed_tokens) + list(banned_now):
        l[t] = NEG
    if p.ignore_eos or len(output) < p.min_new_tokens:
        for t in eos:
            l[t] = NEG
    return l


def ref_dry(l, p, hist, breakers):
    l = l.copy()
    if p.dry_multiplier == 0:
        return l
    if p.dry_range:
        hist = hist[-p.dry_range:]
    n = len(hist)
    longest = {}
    for j in range(1, n):  # hist[j] follows hist[:j]; how long a tail of hist[:j] equals the tail of hist?
        if hist[j] in breakers:
            continue
        m = 0
        while m < DRY_MAX_MATCH and j - 1 - m >= 0 and hist[n - 1 - m] not in breakers \
                and hist[j - 1 - m] == hist[n - 1 - m]:
            m += 1
        longest[hist[j]] = max(longest.get(hist[j], 0), m)
    for t, m in longest.items():
        if m >= p.dry_allowed_length:
            l[t] -= p.dry_multiplier * p.dry_base ** (m - p.dry_allowed_length)
    return l


def keep_ties(probs, kept):
    """Extend a kept set to every token whose prob equals the smallest kept one."""
    thr = min(probs[t] for t in kept)
    return {t for t in range(len(probs)) if probs[t] >= thr and probs[t] > 0} | set(kept)


def renorm(probs, kept):
    out = np.array([probs[t] if t in kept else 0.0 for t in range(len(probs))])
    return out / out.sum()


def ref_filters(probs, p):
    live = lambda: [t for t in range(len(probs)) if probs[t] > 0]
    by_prob = lambda: sorted(live(), key=lambda t: -probs[t])
    if p.top_k:
        order = by_prob()
        kept = keep_ties(probs, order[:p.top_k])
        probs = renorm(probs, kept)
    if p.top_p < 1:
        kept, cum = [], 0.0
        for t in by_prob():
            if cum < p.top_p:
                kept.append(t)
                cum += probs[t]
        probs = renorm(probs, keep_ties(probs, kept))
    if p.top_a > 0:
        top = probs.max()
        probs = renorm(probs, {t for t in live() if probs[t] >= p.top_a * top * top})
    if p.min_p > 0:
        top = probs.max()
        probs = renorm(probs, {t for t in live() if probs[t] >= p.min_p * top})
    if p.tfs < 1:
        order = by_prob()
        s = [probs[t] for t in order]
        if len(s) >= 3:
            d = [abs(s[i] - 2 * s[i + 1] + s[i + 2]) for i in range(len(s) - 2)]
            if sum(d) > 0:
                k, c = 0, 0.0
                while k < len(s) - 2:
                    c += d[k] / sum(d)
                    if c > p.tfs:
                        break
                    k += 1
                probs = renorm(probs, keep_ties(probs, order[:k + 1]))
    if p.typical_p < 1:
        h = -sum(probs[t] * math.log(probs[t]) for t in live())
        dev = {t: abs(-math.log(probs[t]) - h) for t in live()}
        kept, cum = [], 0.0
        for t in sorted(live(), key=lambda t: dev[t]):
            if cum < p.typical_p:
                kept.append(t)
                cum += probs[t]
        thr = max(dev[t] for t in kept)
        probs = renorm(probs, {t for t in live() if dev[t] <= thr})
    return probs


def ref_probs(logits, p, prompt=(), output=(), eos=(), breakers=frozenset(), banned_now=(), mu=None, xtc_fire=True):
    """The distribution the sampler draws from for one row (one-hot for greedy rows)."""
    l = np.asarray(logits, dtype=np.float64)
    l = ref_penalties(l, p, prompt, output)
    l = ref_masks(l, p, output, eos, banned_now)
    l = ref_dry(l, p, list(prompt) + list(output), breakers)
    if p.temperature == 0:
        return np.eye(len(l))[int(np.argmax(l))]
    if p.smoothing_factor > 0:
        top = l[np.isfinite(l)].max()
        l = np.array([top - p.smoothing_factor * (x - top) ** 2 if np.isfinite(x) else NEG for x in l])
    dyn = p.dynatemp_max > p.dynatemp_min
    late = dyn or p.temperature_last
    if not late:
        l = l / p.temperature
    probs = ref_filters(softmax(l), p)
    if late:
        t = p.temperature
        if dyn:
            n = int((probs > 0).sum())
            h = -sum(x * math.log(x) for x in probs if x > 0)
            norm = min(max(h / math.log(n), 0.0), 1.0) if n > 1 else 0.0
            t = max(p.dynatemp_min + (p.dynatemp_max - p.dynatemp_min) * norm ** p.dynatemp_exponent, 1e-4)
        probs = softmax(np.where(probs > 0, np.log(np.maximum(probs, 1e-300)) / t, NEG))
    if p.xtc_probability > 0 and xtc_fire:
        above = [t for t in range(len(probs)) if probs[t] >= p.xtc_threshold]
        if len(above) >= 2:
            least = min(probs[t] for t in above)
            probs = renorm(probs, {t for t in range(len(probs)) if probs[t] > 0 and not (t in above and probs[t] > least)})
    if p.mirostat_mode == 2:
        probs = renorm(probs, {t for t in range(len(probs)) if probs[t] > 0 and (probs[t] >= 2.0 ** -mu or probs[t] == probs.max())})
    if p.skew != 0:  # inverse-cdf draw with u -> u ** exp(-skew); tied tokens share their interval equally
        out, cum = np.zeros(len(probs)), 0.0
        for value in sorted(set(probs[probs > 0]), reverse=True):
            tied = [t for t in range(len(probs)) if probs[t] == value]
            lo, cum = cum, cum + value * len(tied)
            for t in tied:
                out[t] = (min(cum, 1.0) ** math.exp(p.skew) - lo ** math.exp(p.skew)) / len(tied)
        probs = out
    return probs


# ---------------------------------------------------------------- helpers

def tie_logits(rng, b, v, n_inf=3):
    """Random logits rounded to 0.25 (many ties) with a few -inf entries per row."""
    x = np.round(rng.normal(0, 2.0, (b, v)) * 4) / 4
    for row in x:
        row[rng.choice(v, n_inf, replace=False)] = NEG
    return x


def states(params, prompt=(), outputs=None, eos=(), breakers=frozenset(), device="cpu"):
    outs = outputs or [[] for _ in params]
    ss = [SeqSamplingState.new(p, list(prompt), device, eos, breakers) for p in params]
    for s, o in zip(ss, outs):
        s.output_ids.extend(o)
    return ss


def assert_rows(probs, refs, atol=2e-5):
    for i, ref in enumerate(refs):
        np.testing.assert_allclose(probs[i].double().numpy(), ref, atol=atol, err_msg=f"row {i}")


# ---------------------------------------------------------------- pipeline vs reference

MIXED_BATCH = [
    P(top_k=5), P(top_p=0.7), P(), P(min_p=0.1, temperature=0.5), P(temperature=0),
    P(typical_p=0.6), P(tfs=0.8), P(top_a=0.3), P(smoothing_factor=0.4), P(top_k=12, temperature=1.7),
    P(top_k=30, top_p=0.9, min_p=0.02, temperature=0.8), P(temperature=0.6, temperature_last=True, top_p=0.8),
    P(dynatemp_min=0.3, dynatemp_max=2.0, dynatemp_exponent=1.5, top_k=20), P(dynatemp_min=0.0, dynatemp_max=1.0),
    P(skew=0.7, top_k=10), P(skew=-1.0), P(xtc_probability=1.0, xtc_threshold=0.05, temperature=1.2),
    P(smoothing_factor=0.2, typical_p=0.9, tfs=0.95, top_a=0.1, min_p=0.05),
]


def test_mixed_batch_matches_reference():
    rng = np.random.default_rng(0)
    logits = tie_logits(rng, len(MIXED_BATCH), 200)
    probs = Sampler(200).probs(torch.tensor(logits, dtype=torch.float32), states(MIXED_BATCH))
    assert_rows(probs, [ref_probs(logits[i], p) for i, p in enumerate(MIXED_BATCH)])
    # the filters really filtered: rows 0, 1, 3 keep far fewer than the 197 finite tokens
    assert (probs[0] > 0).sum() == (ref_probs(logits[0], P(top_k=5)) > 0).sum() <= 8
    assert (probs[1] > 0).sum() < 100 and (probs[3] > 0).sum() < 100


def test_each_row_is_independent_of_its_batch():
    rng = np.random.default_rng(1)
    logits = torch.tensor(tie_logits(rng, len(MIXED_BATCH), 200), dtype=torch.float32)
    together = Sampler(200).probs(logits, states(MIXED_BATCH))
    for i, p in enumerate(MIXED_BATCH):
        alone = Sampler(200).probs(logits[i:i + 1], states([p]))
        torch.testing.assert_close(alone[0], together[i], rtol=0, atol=1e-6)


def test_penalties_dry_and_masks_in_one_batch():
    rng = np.random.default_rng(2)
    v = 60
    prompt = list(rng.integers(0, v, 40))
    outputs = [list(rng.integers(0, v, 25)) for _ in range(6)]
    params = [
        P(repetition_penalty=1.3, repetition_range=6, repetition_decay=4, top_k=40),
        P(frequency_penalty=0.4, presence_penalty=0.3),
        P(repetition_penalty=0.8, frequency_penalty=-0.5, logit_bias={3: 2.0, 7: -1.5}),
        P(dry_multiplier=0.7, dry_allowed_length=1, dry_range=30, disallowed_tokens=[1, 2]),
        P(allowed_tokens=list(range(10, 30)), min_new_tokens=100, repetition_penalty=1.1),
        P(temperature=0, repetition_penalty=1.5, ignore_eos=True, dry_multiplier=1.0),
    ]
    eos, breakers = [0, 5], frozenset({4, 9})
    ss = states(params, prompt, outputs, eos, breakers)
    ss[2].banned_now = {11, 12}
    logits = tie_logits(rng, len(params), v, n_inf=1)
    probs = Sampler(v).probs(torch.tensor(logits, dtype=torch.float32), ss)
    assert_rows(probs, [ref_probs(logits[i], p, prompt, outputs[i], eos, breakers, ss[i].banned_now)
                        for i, p in enumerate(params)])


def recovered_logits(probs, anchor):
    """Logits up to the constant that makes the anchor token's logit 0."""
    lp = torch.log(probs.double())
    return (lp - lp[:, anchor:anchor + 1]).numpy()


def test_repetition_penalty_only_within_range_and_decay():
    v = 40
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (1, v))
    logits[0, 39] = 0.0  # anchor token, never in the history
    prompt, output = [1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 2]  # token 2: old in the prompt, newest in output
    p = P(repetition_penalty=1.5, repetition_range=4, repetition_decay=3)
    probs = Sampler(v).probs(torch.tensor(logits, dtype=torch.float32), states([p], prompt, [output]))
    changed = np.flatnonzero(~np.isclose(recovered_logits(probs, 39)[0], logits[0], atol=1e-5))
    # distances back from the newest: 2:0, 13:1, 12:2, 11:3 (full); 10:4, 9:5, 8:6 (fading); 7 and older: untouched
    assert sorted(changed) == [2, 8, 9, 10, 11, 12, 13]
    np.testing.assert_allclose(recovered_logits(probs, 39)[0], ref_penalties(logits[0], p, prompt, output), atol=1e-5)
    for tok, w in ((11, 1.0), (10, 0.75), (8, 0.25)):
        pen = 1 + 0.5 * w
        want = logits[0, tok] / pen if logits[0, tok] > 0 else logits[0, tok] * pen
        assert recovered_logits(probs, 39)[0, tok] == pytest.approx(want, abs=1e-5)


def test_frequency_presence_count_output_only_and_logit_bias():
    v = 20
    logits = np.zeros((1, v))
    p = P(frequency_penalty=0.5, presence_penalty=0.25, logit_bias={15: 1.5, 16: -2.0})
    probs = Sampler(v).probs(torch.tensor(logits, dtype=torch.float32), states([p], [1, 1, 2], [[2, 3, 3, 3]]))
    got = recovered_logits(probs, 19)[0]
    want = np.zeros(v)
    want[2], want[3], want[15], want[16] = -0.75, -1.75, 1.5, -2.0  # token 1 is only in the prompt
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_dry_penalises_the_planted_repeat():
    v = 100
    seq = [50, 51, 52, 53, 54, 55]
    hist = list(range(10, 30)) + seq + [77] + list(range(30, 45)) + seq  # ... seq 77 ... seq -> 77 continues it
    logits = np.zeros((1, v))
    p = P(dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2)
    probs = Sampler(v).probs(torch.tensor(logits, dtype=torch.float32), states([p], hist[:30], [hist[30:]]))
    got = recovered_logits(probs, 99)[0]
    assert got[77] == pytest.approx(-0.8 * 1.75 ** (6 - 2), abs=1e-4)
    np.testing.assert_allclose(got, ref_dry(logits[0], p, hist, frozenset()), atol=1e-4)
    assert np.flatnonzero(np.abs(got) > 1e-5).tolist() == [77]  # only 55's earlier successor extends a repeat
    # a breaker inside the repeat cuts the match there
    probs = Sampler(v).probs(torch.tensor(logits, dtype=torch.float32),
                             states([p], hist[:30], [hist[30:]], breakers=frozenset({52})))
    got = recovered_logits(probs, 99)[0]
    assert got[77] == pytest.approx(-0.8 * 1.75 ** (3 - 2), abs=1e-4)  # only 53 54 55 matches now
    np.testing.assert_allclose(got, ref_dry(logits[0], p, hist, frozenset({52})), atol=1e-4)
    # a breaker is never penalised as the continuation
    probs = Sampler(v).probs(torch.tensor(logits, dtype=torch.float32),
                             states([p], hist[:30], [hist[30:]], breakers=frozenset({77})))
    assert np.abs(recovered_logits(probs, 99)[0]).max() < 1e-5


@pytest.mark.parametrize("sparse", [True, False])  # the CPU compares only the likely positions; others all
def test_dry_random_histories_vs_reference(sparse):
    rng = np.random.default_rng(4)
    v = 12  # small vocab: many accidental repeats
    params = [P(dry_multiplier=0.5, dry_allowed_length=a, dry_range=r, dry_base=b)
              for a, r, b in ((1, 0, 1.5), (2, 20, 1.75), (3, 0, 2.0), (2, 7, 1.2), (1, 0, 1.3), (1, 0, 1.1))]
    prompt = list(rng.integers(0, v, 30))
    outputs = [list(rng.integers(0, v, n)) for n in (5, 40, 70, 3, 50, 90)]
    breakers = frozenset({0, 1})
    logits = rng.normal(0, 1, (len(params), v))
    probs = Sampler(v, cpu_paths=sparse).probs(torch.tensor(logits, dtype=torch.float32),
                                               states(params, prompt, outputs, (), breakers))
    assert_rows(probs, [ref_probs(logits[i], p, prompt, outputs[i], (), breakers) for i, p in enumerate(params)], 1e-4)


def test_dry_breaker_ids_from_pieces():
    assert dry_breaker_ids(["\n", ":"], ["a", "b\n", "::", "c", "x:y"]) == {1, 2, 4}


# ---------------------------------------------------------------- draws

def wilson_hilferty_999(df):
    """Chi-square critical value at alpha = 0.001 (z = 3.0902), Wilson-Hilferty; within 1% of tables for df >= 3
    (df 5: 20.52, df 7: 24.32, df 10: 29.59)."""
    return df * (1 - 2 / (9 * df) + 3.0902 * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("cpu_paths", [True, False])  # False: the draw other devices use
@pytest.mark.parametrize("seeded", [False, True])
def test_draws_follow_the_filtered_distribution(seeded, cpu_paths):
    torch.manual_seed(0)
    rng = np.random.default_rng(5)
    v, n = 48, 20000
    logits = rng.normal(0, 1.5, v)
    p = P(temperature=0.7, top_k=9, top_p=0.95, seed=None)
    ref = ref_probs(logits, p)
    kept = np.flatnonzero(ref > 0)
    params = [P(temperature=0.7, top_k=9, top_p=0.95, seed=i if seeded else None) for i in range(n)]
    out = Sampler(v, cpu_paths=cpu_paths)(torch.tensor(np.tile(logits, (n, 1)), dtype=torch.float32), states(params))
    counts = np.bincount(out.tokens.numpy(), minlength=v)
    assert counts[ref == 0].sum() == 0, "drew a filtered-out token"
    expected = ref[kept] * n
    assert expected.min() >= 5
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum()
    df = len(kept) - 1
    assert 3 <= df and chi2 < wilson_hilferty_999(df), f"chi2 {chi2:.1f} with df {df}"


@pytest.mark.parametrize("cpu_paths", [True, False])
def test_unfiltered_draws_follow_the_distribution(cpu_paths):
    # the whole vocabulary: on the CPU an inverse cdf through blocks of 32 tokens, two of them all zero here
    torch.manual_seed(3)
    rng = np.random.default_rng(12)
    v, n = 128, 30000
    logits = rng.normal(0, 1.0, v)
    logits[32:64] = NEG
    logits[100:] = NEG
    logits[[40, 101]] = 0.5, 1.0  # alone in their blocks
    p = P(temperature=0.9)
    ref = ref_probs(logits, p)
    out = Sampler(v, cpu_paths=cpu_paths)(torch.tensor(np.tile(logits, (n, 1)), dtype=torch.float32), states([p] * n))
    counts = np.bincount(out.tokens.numpy(), minlength=v)
    assert counts[ref == 0].sum() == 0, "drew an impossible token"
    kept = np.flatnonzero(ref * n >= 5)
    chi2 = ((counts[kept] - ref[kept] * n) ** 2 / (ref[kept] * n)).sum()
    assert chi2 < wilson_hilferty_999(len(kept) - 1), f"chi2 {chi2:.1f} with df {len(kept) - 1}"


@pytest.mark.parametrize("cpu_paths", [True, False])
def test_a_row_with_nothing_left_still_returns_a_token(cpu_paths):
    logits = torch.zeros(3, 64)
    logits[:, 5] = 8.0  # p = 0.98
    ss = states([P(allowed_tokens=[7]), P(top_k=5, allowed_tokens=[7]), P(top_p=0.5)])
    ss[0].banned_now = ss[1].banned_now = {7}  # every token is -inf in rows 0 and 1
    tokens = Sampler(64, cpu_paths=cpu_paths)(logits, ss).tokens.tolist()
    assert all(0 <= t < 64 for t in tokens) and tokens[2] == 5


def test_disallowed_banned_now_and_allowed_never_drawn():
    torch.manual_seed(1)
    v, n = 30, 3000
    logits = torch.zeros(n, v)
    logits[:, :5] = 8.0  # the favourites are all forbidden
    params = [P(disallowed_tokens=[0, 1, 2]) if i % 3 == 0 else P(allowed_tokens=[3, 20, 21]) if i % 3 == 1
              else P() for i in range(n)]
    ss = states(params)
    for i in range(2, n, 3):
        ss[i].banned_now = {0, 1, 2, 3, 4}
    tok = Sampler(v)(logits, ss).tokens.numpy()
    assert not np.isin(tok[0::3], [0, 1, 2]).any() and np.isin(tok[0::3], [3, 4]).mean() > 0.97
    assert np.isin(tok[1::3], [3, 20, 21]).all() and (tok[1::3] == 3).mean() > 0.9
    assert not np.isin(tok[2::3], [0, 1, 2, 3, 4]).any()
    assert all(not s.banned_now for s in ss), "banned_now holds for one draw only"


def test_min_new_tokens_holds_eos_off():
    v, eos = 10, 7
    logits = torch.zeros(2, v)
    logits[:, eos] = 20.0
    sampler = Sampler(v)
    ss = states([P(min_new_tokens=3, seed=0), P(ignore_eos=True, temperature=0)], eos=[eos])
    drawn = []
    for _ in range(5):
        tok = sampler(logits, ss).tokens.tolist()
        for s, t in zip(ss, tok):
            s.output_ids.append(t)
        drawn.append(tok)
    assert [t[0] == eos for t in drawn] == [False, False, False, True, True]
    assert all(t[1] != eos for t in drawn)


def test_greedy_takes_argmax_and_logprobs():
    rng = np.random.default_rng(6)
    logits = torch.tensor(rng.normal(0, 1, (3, 50)), dtype=torch.float32)
    ss = states([P(temperature=0, logprobs=True, top_logprobs=4), P(top_k=1, seed=3), P(temperature=0)])
    out = Sampler(50)(logits, ss)
    assert out.tokens.tolist() == logits.argmax(-1).tolist()
    lsm = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logprobs[0], lsm[0, out.tokens[0]])
    torch.testing.assert_close(out.top_logprobs[0], lsm[0].topk(4).values)
    assert out.top_ids[0].tolist() == lsm[0].topk(4).indices.tolist()
    assert out.logprobs[1].item() == 0.0  # top_k=1: the final distribution is one token


def test_sampled_logprobs_are_of_the_final_distribution():
    rng = np.random.default_rng(7)
    v = 40
    logits = rng.normal(0, 2, (2, v))
    params = [P(top_k=6, temperature=0.5, logprobs=True, top_logprobs=6, seed=1), P(min_p=0.2, logprobs=True, seed=2)]
    out = Sampler(v)(torch.tensor(logits, dtype=torch.float32), states(params))
    for i, p in enumerate(params):
        ref = ref_probs(logits[i], p)
        assert out.logprobs[i].item() == pytest.approx(math.log(ref[out.tokens[i]]), abs=1e-4)
    ref0 = ref_probs(logits[0], params[0])
    np.testing.assert_allclose(np.exp(out.top_logprobs[0].double().numpy()), np.sort(ref0)[::-1][:6], atol=1e-5)


def run_steps(sampler, logits_per_step, ss, rows=None, device="cpu", routes=None):
    got = []
    for step_logits in logits_per_step:
        step_logits = step_logits.to(device)
        tok = sampler(step_logits if rows is None else step_logits[rows], ss).tokens.tolist()
        if routes is not None and sampler.trace.routes:  # each step's candidate groups' rows, and rows left over
            routes.append(sampler.trace.routes)
        for s, t in zip(ss, tok):
            s.output_ids.append(t)
        got.append(tok)
    return got


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_seeded_rows_reproduce_alone_and_in_any_batch(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(8)
    v, steps = 300, 25
    target = P(seed=1234, top_p=0.9, temperature=1.3, repetition_penalty=1.2, dry_multiplier=0.5,
               xtc_probability=0.5, xtc_threshold=0.05, mirostat_mode=2, mirostat_tau=4.0, skew=0.3)
    others = [P(temperature=0), P(seed=7, top_k=4), P(), P(min_p=0.05, seed=9, skew=0.5), P(typical_p=0.5),
              P(xtc_probability=0.7, seed=11), P(tfs=0.9, frequency_penalty=0.3)]
    batch = others[:3] + [target] + others[3:]
    logits = [torch.tensor(rng.normal(0, 2, (8, v)), dtype=torch.float32) for _ in range(steps)]
    prompt = list(rng.integers(0, v, 20))
    alone = run_steps(Sampler(v), logits, states([target], prompt, device=device), [3], device)
    again = run_steps(Sampler(v), logits, states([target], prompt, device=device), [3], device)
    batched = run_steps(Sampler(v), logits, states(batch, prompt, device=device), None, device)
    assert alone == again
    assert [t[0] for t in alone] == [t[3] for t in batched]
    assert len({t[0] for t in alone}) > 5  # really sampled


@pytest.mark.parametrize("kw", [dict(skew=0.7), dict(skew=-1.0, top_p=0.95), dict(top_p=0.9), dict()])
def test_a_rows_distribution_is_bitwise_the_same_alone_and_in_a_batch(kw):
    # a full vocabulary: torch splits a lone row's reductions over threads, so a step that sums a row on its own (skew
    # did) rounds differently alone and in a batch, and a seeded request's text then depends on its batch
    torch.set_num_threads(2)
    v, target, other = 49152, P(temperature=1.0, seed=3, **kw), P(temperature=0.8)
    for seed in range(8):
        logits = torch.randn(3, v, generator=torch.Generator().manual_seed(seed)) * 3
        alone = Sampler(v).probs(logits[1:2].clone(), states([target]))
        batched = Sampler(v).probs(logits.clone(), states([other, target, other]))
        assert torch.equal(alone[0], batched[1]), seed


def test_xtc_with_a_fixed_random_stream():
    rng = np.random.default_rng(9)
    v, steps, seed = 30, 40, 77
    p = P(xtc_probability=0.5, xtc_threshold=0.06, seed=seed)
    logits = [rng.normal(0, 1.0, v) for _ in range(steps)]
    sampler, ss = Sampler(v), states([p])
    g = torch.Generator().manual_seed(seed)  # replays the row's stream: one coin, then one uniform per step (CPU)
    fired = []
    for l in logits:
        tok = sampler(torch.tensor(l[None], dtype=torch.float32), ss).tokens.item()
        coin = torch.rand(1, generator=g).item()
        u = torch.rand(1, generator=g).item()
        fire = coin < 0.5
        ref = ref_probs(l, p, xtc_fire=fire)
        assert tok == int(np.searchsorted(np.cumsum(ref) / ref.sum(), u, side="right"))  # inverse cdf
        fired.append(fire and (ref != softmax(l)).any())
        ss[0].output_ids.append(tok)
    assert 5 < sum(fired) < 35


def test_mirostat_v2_truncation_and_mu_update():
    rng = np.random.default_rng(10)
    v = 50
    p = P(mirostat_mode=2, mirostat_tau=3.0, mirostat_eta=0.2, seed=5)
    sampler, ss = Sampler(v), states([p])
    mu = 2 * p.mirostat_tau
    for _ in range(30):
        l = rng.normal(0, 2.5, v)
        x = torch.tensor(l[None], dtype=torch.float32)
        ref = ref_probs(l, p, mu=mu)
        np.testing.assert_allclose(sampler.probs(x, ss)[0].double().numpy(), ref, atol=2e-5)
        tok = sampler(x, ss).tokens.item()
        assert ref[tok] > 0
        mu -= p.mirostat_eta * (-math.log2(ref[tok]) - p.mirostat_tau)
        assert ss[0].mirostat_mu.item() == pytest.approx(mu, abs=1e-4)
        ss[0].output_ids.append(tok)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_the_reference():
    rng = np.random.default_rng(11)
    logits = tie_logits(rng, len(MIXED_BATCH), 200)
    probs = Sampler(200).probs(torch.tensor(logits, dtype=torch.float32).cuda(), states(MIXED_BATCH, device="cuda"))
    assert_rows(probs.cpu(), [ref_probs(logits[i], p) for i, p in enumerate(MIXED_BATCH)])
    v = 60
    prompt = list(rng.integers(0, v, 40))
    outputs = [list(rng.integers(0, v, 25)) for _ in range(4)]
    params = [P(repetition_penalty=1.3, repetition_range=6, repetition_decay=4, top_k=40, logprobs=True),
              P(frequency_penalty=0.4, presence_penalty=0.3, logit_bias={3: 2.0}, mirostat_mode=2, seed=3),
              P(dry_multiplier=0.7, dry_allowed_length=1, disallowed_tokens=[1, 2], min_new_tokens=99),
              P(temperature=0, repetition_penalty=1.5, dry_multiplier=1.0, logprobs=True, top_logprobs=3)]
    ss = states(params, prompt, outputs, [0, 5], frozenset({4, 9}), "cuda")
    logits = tie_logits(rng, len(params), v, n_inf=1)
    probs = Sampler(v).probs(torch.tensor(logits, dtype=torch.float32).cuda(), ss)
    refs = [ref_probs(logits[i], p, prompt, outputs[i], [0, 5], frozenset({4, 9}), mu=2 * p.mirostat_tau)
            for i, p in enumerate(params)]
    assert_rows(probs.cpu(), refs)
    out = Sampler(v)(torch.tensor(logits, dtype=torch.float32).cuda(), ss)
    assert out.tokens.device.type == "cuda" and all(refs[i][t] > 0 for i, t in enumerate(out.tokens.tolist()))
    torch.manual_seed(0)
    n, p = 20000, P(temperature=0.7, top_k=9, top_p=0.95)
    logits = rng.normal(0, 1.5, 48)
    ref = ref_probs(logits, p)
    ss = states([P(temperature=0.7, top_k=9, top_p=0.95, seed=i % 2 * i or None) for i in range(n)], device="cuda")
    tok = Sampler(48)(torch.tensor(np.tile(logits, (n, 1)), dtype=torch.float32).cuda(), ss).tokens.cpu().numpy()
    counts = np.bincount(tok, minlength=48)
    kept = np.flatnonzero(ref > 0)
    assert counts[ref == 0].sum() == 0
    chi2 = ((counts[kept] - ref[kept] * n) ** 2 / (ref[kept] * n)).sum()
    assert chi2 < wilson_hilferty_999(len(kept) - 1)


def test_history_follows_appends_and_rewinds():
    v = 30
    s = states([P(repetition_penalty=2.0, temperature=0)], [1, 2])[0]
    sampler = Sampler(v)
    logits = torch.full((1, v), -1.0)
    logits[0, 5], logits[0, 6], logits[0, 7] = 1.0, 0.9, 0.8
    s.output_ids += [5]
    assert sampler(logits, [s]).tokens.item() == 6  # 5 penalised to 0.5
    s.output_ids += [6]
    assert sampler(logits, [s]).tokens.item() == 7
    del s.output_ids[:]  # rewind
    assert sampler(logits, [s]).tokens.item() == 5
    s.output_ids += [6]
    assert sampler(logits, [s]).tokens.item() == 5


def test_penalties_follow_the_history_step_by_step():
    # the history kept between calls (one column more each step) against the reference, through rewinds
    rng = np.random.default_rng(30)
    v = 40  # small: many repeats
    params = [P(repetition_penalty=1.5, repetition_range=6, repetition_decay=3, frequency_penalty=0.3,
                presence_penalty=0.2, dry_multiplier=0.7, dry_allowed_length=2, dry_range=25),
              P(repetition_penalty=1.3), P(temperature=0.7, dry_multiplier=0.5, dry_allowed_length=1), P(top_k=5),
              P(top_k=3, logit_bias={7: 4.0, 8: -2.0}, disallowed_tokens=[1, 2], repetition_penalty=1.1, min_p=0.1,
                dry_multiplier=0.9, dry_allowed_length=1), P(temperature=0, logit_bias={33: 9.0}, presence_penalty=0.5)]
    prompt = list(rng.integers(0, v, 12))
    ss, sampler = states(params, prompt), Sampler(v)
    for step in range(40):
        logits = rng.normal(0, 1, (len(params), v))
        probs = sampler.probs(torch.tensor(logits, dtype=torch.float32), ss)
        assert_rows(probs, [ref_probs(logits[i], p, prompt, s.output_ids) for i, (p, s) in enumerate(zip(params, ss))],
                    1e-4)
        for s in ss:
            s.output_ids.append(int(rng.integers(0, 6)) if step % 3 else int(rng.integers(0, v)))
        if step in (15, 30):  # a rewind in one row, then in all
            for s in ss[:1] if step == 15 else ss:
                del s.output_ids[-3:]


def test_padded_vocab_columns_never_drawn():
    logits = torch.zeros(1, 12)
    logits[0, 10:] = 50.0
    assert Sampler(10)(logits, states([P(temperature=0)])).tokens.item() < 10


def test_plan_is_reused_for_the_same_seqs():
    sampler = Sampler(20)
    ss = states([P(top_k=3), P()])
    sampler(torch.zeros(2, 20), ss)
    plan = sampler._meta
    sampler(torch.zeros(2, 20), list(ss))
    assert sampler._meta is plan
    sampler(torch.zeros(2, 20), ss[::-1])
    assert sampler._meta is not plan


def test_logit_bias_out_of_vocab_is_rejected():
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        Sampler(10)(torch.zeros(1, 10), states([P(logit_bias={12: 1.0})]))


# ---------------------------------------------------------------- candidate space (the CPU's fast path)

CANDIDATE_BATCH = [
    P(top_k=3), P(top_k=40, temperature=0.7), P(top_p=0.3), P(top_p=0.6), P(top_p=0.97), P(min_p=0.2),
    P(min_p=0.01, temperature=1.5), P(top_a=0.2), P(typical_p=0.3), P(typical_p=0.9),
    P(top_k=20, top_p=0.8, min_p=0.05, typical_p=0.9, tfs=0.9), P(tfs=0.8), P(), P(top_k=10, skew=0.5),
    P(top_p=0.9, temperature=0.5, temperature_last=True), P(top_k=30, dynatemp_min=0.5, dynatemp_max=1.5),
    P(min_p=0.1, xtc_probability=1.0, xtc_threshold=0.05), P(top_k=25, mirostat_mode=2, mirostat_tau=3.0),
    P(temperature=0), P(smoothing_factor=0.3, top_k=15), P(smoothing_factor=0.5, top_p=0.5),
    P(top_p=0.97, min_p=0.05), P(top_p=0.97, min_p=0.05, top_a=0.01, temperature=0.7),
    P(smoothing_factor=0.4, min_p=0.1, temperature=0.7), P(smoothing_factor=0.3, top_k=15, temperature=1.6),
]
SMALL_TIERS = ((4, 6, 0.0, 200), (4, 40, 2.0, 600))  # V = 1000: 250 blocks, so the bounds cut and some rows fall back


def small_tiers_sampler(v):
    """A sampler with small candidate tiers; its trace.routes: which rows the last call put in candidate groups and
    which it left over."""
    return Sampler(v, tiers=SMALL_TIERS)


def test_candidate_space_matches_reference_and_falls_back():
    rng = np.random.default_rng(20)
    logits = tie_logits(rng, len(CANDIDATE_BATCH), 1000)  # ties everywhere, a few -inf per row
    sampler = small_tiers_sampler(1000)
    probs = sampler.probs(torch.tensor(logits, dtype=torch.float32), states(CANDIDATE_BATCH))
    assert_rows(probs, [ref_probs(logits[i], p, mu=2 * p.mirostat_tau) for i, p in enumerate(CANDIDATE_BATCH)])
    groups, rest = sampler.trace.routes
    assert groups[0][:3] == [0, 1, 2] and groups[1] == [3, 22]  # top_p 0.6 and 0.97 needed the second tier's margin
    # top_p 0.97 at T 1 spreads over too many tokens, so does min_p 0.01 at T 1.5, and typical 0.3 over this flat a
    # row; tfs first and no filter (rows 11, 12) always use the full vocabulary. Row 21 takes min_p's bound instead of
    # top_p's (row 22 cannot: top_a between them measures mass).
    assert {4, 6, 8, 11, 12} <= set(rest) and 18 not in rest and not set(rest) & set(sum(groups, []))
    assert 21 in groups[0] and {19, 23, 24} <= set(groups[0])  # smoothed in candidate space (not 20: top_p first)


def test_candidate_space_typical_first_uses_the_whole_entropy():
    rng = np.random.default_rng(21)
    logits = tie_logits(rng, 3, 1000) * 4  # peaked: the typical set lies among the top tokens
    params = [P(typical_p=0.5), P(typical_p=0.2, temperature=2.0), P(typical_p=0.9, top_a=0.01)]
    sampler = small_tiers_sampler(1000)
    probs = sampler.probs(torch.tensor(logits, dtype=torch.float32), states(params))
    assert_rows(probs, [ref_probs(logits[i], p) for i, p in enumerate(params)])
    groups, rest = sampler.trace.routes
    assert sorted(sum(groups, [])) == [0, 1, 2] and rest == []


@pytest.mark.parametrize("cpu_paths", [True, False])
def test_smoothing_in_candidate_space(cpu_paths):
    rng = np.random.default_rng(28)
    logits = tie_logits(rng, 3, 1000)
    params = [P(smoothing_factor=0.3, top_k=15, temperature=1.6), P(smoothing_factor=0.4, min_p=0.1, temperature=0.7),
              P(smoothing_factor=2.0, min_p=0.3, temperature=0.5)]
    sampler = Sampler(1000, cpu_paths=cpu_paths)
    probs = sampler.probs(torch.tensor(logits, dtype=torch.float32), states(params))
    widths = sampler.trace.smoothed
    assert_rows(probs, [ref_probs(logits[i], p) for i, p in enumerate(params)])
    assert widths and (max(widths) < 1000 if cpu_paths else widths == [1000])  # candidates only, or every token
    # a row with too many candidates falls back to the full space, and is smoothed there
    params.append(P(smoothing_factor=0.01, min_p=0.001, temperature=0.9))
    logits = tie_logits(rng, 4, 1000)
    sampler = Sampler(1000, cpu_paths=cpu_paths, tiers=SMALL_TIERS)
    probs = sampler.probs(torch.tensor(logits, dtype=torch.float32), states(params))
    widths = sampler.trace.smoothed
    assert_rows(probs, [ref_probs(logits[i], p) for i, p in enumerate(params)])
    assert 1000 in widths


def test_candidate_space_keeps_ties_at_the_bound():
    v = 512
    logits = np.full((4, v), -5.0)
    logits[:, [7, 301]] = 3.0
    logits[:, 11::17] = 1.0  # 30 tokens tied for 3rd place, one or none per block of 4
    params = [P(top_k=5), P(top_p=0.5), P(top_k=3, top_p=0.99), P(min_p=0.13)]
    sampler = small_tiers_sampler(v)
    probs = sampler.probs(torch.tensor(logits, dtype=torch.float32), states(params))
    refs = [ref_probs(logits[i], p) for i, p in enumerate(params)]
    assert_rows(probs, refs)
    assert [(r > 0).sum() for r in refs] == [32, 32, 32, 32]  # the whole tie group, although top_k is 5
    assert sampler.trace.routes == ([[0, 1, 2, 3]], [])


def test_candidate_space_with_mostly_infinite_rows():
    rng = np.random.default_rng(22)
    v = 1000
    logits = rng.normal(0, 2, (5, v))
    logits[:, 100:900] = NEG  # 200 whole blocks of -inf
    params = [P(top_k=50, allowed_tokens=[5, 17, 400, 650, 999]), P(top_p=0.9, allowed_tokens=[3, 950]),
              P(min_p=0.3, disallowed_tokens=list(range(0, 100))), P(top_k=300), P(typical_p=0.5, top_k=400)]
    sampler = small_tiers_sampler(v)
    probs = sampler.probs(torch.tensor(logits, dtype=torch.float32), states(params))
    assert_rows(probs, [ref_probs(logits[i], p) for i, p in enumerate(params)])
    assert (probs[0] > 0).sum() == 3 and set(probs[1].nonzero().flatten().tolist()) <= {3, 950}  # 400, 650: -inf
    # top_k 300 > 200 finite tokens: every finite token is a candidate
    assert sampler.trace.routes == ([[0, 1, 2, 3, 4]], [])


def random_params(rng):
    d = {}
    choices = (("top_k", 0.5, [1, 5, 40]), ("top_p", 0.5, [0.3, 0.6, 0.9, 0.97]), ("min_p", 0.3, [0.01, 0.05, 0.2]),
               ("top_a", 0.2, [0.05, 0.3]), ("tfs", 0.2, [0.8]), ("typical_p", 0.2, [0.3, 0.9]),
               ("temperature", 0.3, [0.5, 1.3, 2.0]), ("smoothing_factor", 0.2, [0.1, 2.0]), ("skew", 0.1, [0.5]),
               ("mirostat_mode", 0.1, [2]))
    for name, chance, values in choices:
        if rng.random() < chance:
            d[name] = values[rng.integers(len(values))]
    if rng.random() < 0.1:
        d.update(xtc_probability=1.0, xtc_threshold=0.05)
    return P(**d)


def test_random_batches_in_candidate_space_match_reference():
    rng = np.random.default_rng(29)
    for trial in range(20):
        first = (4, int(rng.integers(2, 10)), float(rng.choice([0.0, 0.5, 2.0])), int(rng.integers(20, 300)))
        tiers = (first, (4, 40, 4.0, 600), (4, 1 << 30, 40.0, 2000))
        v = int(rng.choice([64, 300, 1003]))
        params = [random_params(rng) for _ in range(int(rng.integers(1, 8)))]
        logits = tie_logits(rng, len(params), v) * rng.choice([1, 3])
        probs = Sampler(v, tiers=tiers).probs(torch.tensor(logits, dtype=torch.float32), states(params))
        assert_rows(probs, [ref_probs(logits[i], p, mu=2 * p.mirostat_tau) for i, p in enumerate(params)])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_full_space_path_matches_reference(device):
    # the path other devices take (and CPU rows that fall back), for every kind of row
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(23)
    logits = tie_logits(rng, len(CANDIDATE_BATCH), 300)
    sampler = Sampler(300, cpu_paths=False)
    probs = sampler.probs(torch.tensor(logits, dtype=torch.float32, device=device),
                          states(CANDIDATE_BATCH, device=device))
    assert sampler.trace.routes is None  # candidate space never ran
    assert_rows(probs.cpu(), [ref_probs(logits[i], p, mu=2 * p.mirostat_tau) for i, p in enumerate(CANDIDATE_BATCH)])


def test_seeded_rows_reproduce_across_candidate_groups():
    rng = np.random.default_rng(24)
    v, steps = 1000, 12
    target = P(seed=99, top_p=0.6, temperature=1.1, xtc_probability=0.5, xtc_threshold=0.02, skew=0.4)
    others = [P(top_k=100), P(top_p=0.97, seed=3), P(), P(min_p=0.05, seed=4)]  # wider and fallback rows
    logits = [torch.tensor(rng.normal(0, 2, (5, v)), dtype=torch.float32) for _ in range(steps)]
    routes = []
    alone = run_steps(small_tiers_sampler(v), logits, states([target], [1, 2, 3]), [2])
    batched = run_steps(small_tiers_sampler(v), logits, states(others[:2] + [target] + others[2:], [1, 2, 3]),
                        routes=routes)
    assert [t[0] for t in alone] == [t[2] for t in batched]
    assert len({t[0] for t in alone}) > 3
    assert any(2 in sum(groups, []) for groups, _ in routes) and any(1 in rest for _, rest in routes)


@pytest.mark.parametrize("kernels", [False, True])
def test_sampler_buffers_are_reused_and_the_logits_left_unchanged(kernels):
    if kernels:
        kernel_or_skip()
    choice = "auto" if kernels else "torch"
    rng = np.random.default_rng(25)
    v = 1 << 14  # long enough for the history's edits to go into the caller's logits (and be undone)
    sampler = Sampler(v - 2, kernels=choice)  # a padded head: two columns set to -inf, and put back
    for b in (2, 6, 3):
        params = [P(repetition_penalty=1.3, repetition_range=5, repetition_decay=2, frequency_penalty=0.2,
                    dry_multiplier=0.5, dry_allowed_length=1, seed=i, logit_bias={3: 2.0}, disallowed_tokens=[4],
                    min_new_tokens=20, top_k=5 + i) for i in range(b)]
        prompt, outputs = list(rng.integers(0, v, 30)), [list(rng.integers(0, v, 10)) for _ in range(b)]
        logits = torch.tensor(rng.normal(0, 1, (b, v)), dtype=torch.float32)
        before = logits.clone()
        if b == 3:  # the owners map's stamp wraps around: the map is cleared
            sampler._owners.stamp = 2 ** 31 - 10
        ss = states(params, prompt, outputs, eos=[7])
        ss[0].banned_now.add(9)
        got = sampler.probs(logits, ss)
        torch.testing.assert_close(logits, before, rtol=0, atol=0)
        ss = states(params, prompt, outputs, eos=[7])
        ss[0].banned_now.add(9)
        torch.testing.assert_close(got, Sampler(v - 2, kernels=choice).probs(logits, ss), rtol=0, atol=0)
        sampler(logits, ss)
        torch.testing.assert_close(logits, before, rtol=0, atol=0)
    if not kernels:  # the kernel's penalties need no owners map
        assert sampler._owners.map.shape[0] == 6 and sampler._owners.stamp < 2 ** 20
    assert "x" not in sampler._buffers  # the caller's logits served as the working tensor


def test_inference_tensors_from_the_runner_are_edited_and_restored():
    v = 1 << 12
    with torch.inference_mode():  # as the runner's decode returns them
        logits = torch.randn(3, v)
    before = logits.clone()
    ss = states([P(logit_bias={5: 3.0}, disallowed_tokens=[6], repetition_penalty=1.2, top_p=0.9)] * 3, [5, 6, 7])
    assert set(Sampler(v)(logits, ss).tokens.tolist()) <= set(range(v)) - {6}
    torch.testing.assert_close(logits, before, rtol=0, atol=0)
    ss[1].banned_now.add(v + 5)  # out of range: the call fails after some edits, and undoes them
    with pytest.raises((IndexError, RuntimeError)):
        Sampler(v)(logits, ss)
    torch.testing.assert_close(logits, before, rtol=0, atol=0)


def test_argmax_takes_the_first_maximum():
    rng = np.random.default_rng(26)
    for v in (7, 32, 1000, 1003):  # ragged last block too
        x = torch.tensor(np.round(rng.normal(0, 1, (50, v)) * 2) / 2, dtype=torch.float32)
        x[0, :] = NEG
        x[1, -1] = 99.0
        x[2, [3, v - 1]] = 99.0
        assert torch.equal(block_argmax(x), x.argmax(-1))


@pytest.mark.parametrize("descending", [True, False])
def test_sort_is_stable_and_matches_torch(descending):
    rng = np.random.default_rng(31)
    x = torch.tensor(np.round(rng.normal(0, 3, (20, 300)) * 2) / 2, dtype=torch.float32)  # many ties
    x[0, :5], x[1, 7], x[2, 9] = NEG, -0.0, np.inf
    x[3] = 0.0
    ids = torch.tensor(rng.integers(0, 2 ** 31 - 1, x.shape)).sort(-1).values  # ascending, as the candidates' ids
    values, got = sort_cpu(x, descending, ids)
    want_values, order = x.sort(dim=-1, descending=descending, stable=True)
    assert torch.equal(values, want_values) and torch.equal(got, ids.gather(1, order))
    assert torch.equal(sort_cpu(x, descending)[1], order)


# ---------------------------------------------------------------- C++ kernels (csrc/sampler.cpp) vs the PyTorch path

def kernel_or_skip():
    from tokenmill.kernels.cpu.extension import unavailable_reason
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    lib = ops("sampler")
    assert lib is not None, "csrc/sampler.cpp did not build"
    return lib


@pytest.mark.parametrize("v, G", [(1000, 4), (1003, 32), (4096, 32), (4096, 64)])
def test_kernels_match_the_torch_path(v, G):
    lib = kernel_or_skip()
    rng = np.random.default_rng(32)
    x = torch.tensor(tie_logits(rng, 12, v, n_inf=30), dtype=torch.float32)  # ties everywhere, -inf in places
    x[0, :] = NEG
    x[1, : v // 2] = NEG  # whole blocks of -inf
    x[2, 5] = -0.0
    x[3, :] = 1.5  # one value throughout
    rows = [0, 1, 2, 3, 5, 7, 8, 11]
    paths = (None, lib)  # the PyTorch path, the kernels

    blocks = block_max(x, G)
    assert torch.equal(block_max(x, G, lib), blocks)

    bm = blocks[rows]
    top = bm[:, :1].clone()
    top[0] = 0.0  # a finite top for the all -inf row
    top[1:] = bm[1:].amax(-1, keepdim=True)
    t = torch.tensor([[1.0], [0.7], [1.0], [2.0], [1.0], [1.3], [1.0], [0.5]])
    want = [None, None]
    for k, path in enumerate(paths):
        want[k] = masses(x, rows, top, t, G, True, torch.empty(8, v), path)
    torch.testing.assert_close(want[1][0], want[0][0], rtol=1e-5, atol=1e-30)
    torch.testing.assert_close(want[1][1], want[0][1], rtol=1e-4, atol=1e-5, equal_nan=True)
    # block maxima, masses and entropy in one pass, from each row's own maximum (rows 1.. : row 0's is -inf)
    t_all = torch.zeros(len(x)).index_copy_(0, torch.tensor(rows), t.view(-1))
    got_blocks, got_mass, got_h = lib.block_masses(x, t_all, G, True)
    assert torch.equal(got_blocks, blocks) and not got_mass[[4, 6, 9, 10]].any()
    top = bm.amax(-1, keepdim=True)
    mass, h = masses(x, rows[1:], top[1:], t[1:], G, True, torch.empty(8, v))
    torch.testing.assert_close(got_mass[rows[1:]], mass, rtol=1e-5, atol=1e-30)
    torch.testing.assert_close(got_h[rows[1:]], h, rtol=1e-4, atol=1e-5)
    assert got_mass[0].isnan().all()  # as torch's: -inf - -inf

    for tau, cap in (([NEG, 2.0, -0.0, 1.5, 3.25, 2.5, 4.0, 1.0], v), ([0.0] * 8, 300), ([9.0] * 8, v)):
        tau = torch.tensor(tau)
        out = [None, None]
        for k, path in enumerate(paths):
            out[k] = gather(x, rows, bm, tau, G, cap, path)
        (want_classes, want_counts), (got_classes, got_counts) = out
        assert [min(c, cap + 1) for c in want_counts] == got_counts
        assert len(got_classes) == len(want_classes)
        for (sel, vals, ids), (sel_w, vals_w, ids_w) in zip(got_classes, want_classes):
            assert sel == sel_w and torch.equal(vals, vals_w) and torch.equal(ids, ids_w)


def test_sampler_with_and_without_kernels():
    kernel_or_skip()
    rng = np.random.default_rng(33)
    default_tiers = TIERS
    for v, tiers in ((1000, SMALL_TIERS), (4096, default_tiers)):  # G = 4, and the default tiers' G = 32
        logits = torch.tensor(tie_logits(rng, len(CANDIDATE_BATCH), v) * 2, dtype=torch.float32)
        probs = []
        for kernels in ("torch", "auto"):
            probs.append(Sampler(v, kernels=kernels, tiers=tiers).probs(logits, states(CANDIDATE_BATCH)))
        torch.testing.assert_close(probs[1], probs[0], rtol=1e-4, atol=1e-6)
    # penalties over a window long enough for the copy (the kernel's penalties), DRY, bias and bans after them
    v = 4096
    prompt = rng.integers(0, 300, 400).tolist()  # many repeats
    params = [P(repetition_penalty=1.3, top_k=40), P(repetition_penalty=1.1, repetition_range=64, repetition_decay=32,
                                                     frequency_penalty=0.3, presence_penalty=-0.5, top_p=0.9),
              P(frequency_penalty=-0.4, logit_bias={5: 2.0}, disallowed_tokens=[7], min_p=0.05),
              P(repetition_penalty=1.2, dry_multiplier=0.8, temperature=0), P(top_k=5)]
    outputs = [rng.integers(0, 300, n).tolist() for n in (0, 30, 80, 10, 5)]
    logits = torch.tensor(tie_logits(rng, len(params), v), dtype=torch.float32)
    padded = logits.clone()
    padded[:, -5:] = 50.0  # the block maxima must not keep these
    for vocab, lg in ((v - 5, padded), (v, logits)):  # a padded head too: its columns set to -inf
        probs = []
        for kernels in ("torch", "auto"):
            probs.append(Sampler(vocab, kernels=kernels).probs(lg, states(params, prompt, outputs)))
        torch.testing.assert_close(probs[1], probs[0], rtol=1e-4, atol=1e-6)
    assert_rows(probs[1], [ref_probs(logits[i].numpy(), p, prompt, outputs[i]) for i, p in enumerate(params)])


def test_inverse_cdf_draws_only_positive_probabilities_in_proportion():
    torch.manual_seed(2)
    v, n = 256, 40000
    p = torch.zeros(v)
    p[[0, 31, 32, 100, 101, 223, 255]] = torch.tensor([0.1, 0.25, 0.05, 0.2, 0.15, 0.05, 0.2])  # block 7 all zero
    probs = p.repeat(n, 1)
    cols = inverse_cdf(probs, torch.rand(n, 1))
    counts = np.bincount(cols.numpy(), minlength=v)
    kept = np.flatnonzero(p.numpy() > 0)
    assert counts[p.numpy() == 0].sum() == 0
    expected = p.numpy()[kept] * n
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum()
    assert chi2 < wilson_hilferty_999(len(kept) - 1)
    # the ends of [0, 1) land on the first and the last token with mass
    edges = inverse_cdf(probs[:2], torch.tensor([[0.0], [1.0 - 2 ** -24]]))
    assert edges.tolist() == [0, 255]


def test_top_logprobs_beyond_the_candidates():
    rng = np.random.default_rng(27)
    v = 1000
    logits = rng.normal(0, 2, (2, v))
    params = [P(top_k=2, logprobs=True, top_logprobs=6, seed=1), P(top_k=3, logprobs=True, seed=2)]
    sampler = small_tiers_sampler(v)
    out = sampler(torch.tensor(logits, dtype=torch.float32), states(params))
    ref = ref_probs(logits[0], params[0])
    np.testing.assert_allclose(np.exp(out.top_logprobs[0, :2].double().numpy()), np.sort(ref)[::-1][:2], atol=1e-6)
    assert out.top_ids[0, :2].tolist() == np.argsort(-ref)[:2].tolist()
    assert torch.isneginf(out.top_logprobs[0, 2:]).all() and len(set(out.top_ids[0].tolist())) == 6
    assert sampler.trace.routes and sampler.trace.routes[1] == []


# ---------------------------------------------------------------- SamplingParams

@pytest.mark.parametrize("field,value,fragment", [
    ("temperature", -0.1, "temperature must be in [0, inf)"),
    ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
    ("top_p", 0.0, "top_p must be in (0, 1]"),
    ("top_k", -1, "top_k must be in [0, inf)"),
    ("top_k", 2.5, "top_k must be an integer"),
    ("min_p", 1.2, "min_p must be in [0, 1]"),
    ("typical_p", 0.0, "typical_p must be in (0, 1]"),
    ("tfs", 2.0, "tfs must be in (0, 1]"),
    ("top_a", -1.0, "top_a must be in [0, 1]"),
    ("repetition_penalty", 0.0, "repetition_penalty must be in (0, inf)"),
    ("repetition_range", -5, "repetition_range must be in [0, inf)"),
    ("repetition_decay", -1, "repetition_decay"),
    ("frequency_penalty", 3.0, "frequency_penalty must be in [-2, 2]"),
    ("presence_penalty", -2.5, "presence_penalty must be in [-2, 2]"),
    ("dry_multiplier", -1.0, "dry_multiplier"),
    ("dry_base", 0.5, "dry_base must be in [1, inf)"),
    ("dry_allowed_length", 0, "dry_allowed_length must be in [1, inf)"),
    ("dry_range", -1, "dry_range"),
    ("dry_sequence_breakers", [""], "dry_sequence_breakers must hold non-empty strings"),
    ("xtc_probability", 1.5, "xtc_probability must be in [0, 1]"),
    ("xtc_threshold", -0.1, "xtc_threshold"),
    ("mirostat_mode", 1, "mirostat_mode must be 0 (off) or 2"),
    ("mirostat_tau", -1.0, "mirostat_tau"),
    ("mirostat_eta", 0.0, "mirostat_eta must be in (0, 1]"),
    ("smoothing_factor", -0.5, "smoothing_factor"),
    ("dynatemp_exponent", 0.0, "dynatemp_exponent must be in (0, inf)"),
    ("skew", float("nan"), "skew must be in [-10, 10]"),
    ("skew", 11.0, "skew must be in [-10, 10], got 11"),
    ("temperature", float("inf"), "temperature must be in [0, inf)"),
    ("temperature", "hot", "temperature must be a number"),
    ("logit_bias", {-1: 1.0}, "logit_bias keys must be token ids"),
    ("logit_bias", {3: float("inf")}, "logit_bias[3] must be a finite number"),
    ("disallowed_tokens", [1, -2], "disallowed_tokens must hold token ids"),
    ("allowed_tokens", [], "allowed_tokens must be None or a non-empty list"),
    ("stop_token_ids", "abc", "stop_token_ids must be a list of token ids"),
    ("stop", ["ok", ""], "stop must hold non-empty strings"),
    ("banned_strings", [3], "banned_strings must hold non-empty strings"),
    ("max_new_tokens", 0, "max_new_tokens must be in [1, inf)"),
    ("top_logprobs", 21, "top_logprobs must be in [0, 20]"),
    ("seed", -3, "seed must be None or an integer"),
    ("ignore_eos", "yes", "ignore_eos must be true or false"),
])
def test_bad_field_raises_naming_it(field, value, fragment):
    kwargs = {field: value}
    if field == "top_logprobs":
        kwargs["logprobs"] = True
    with pytest.raises(InvalidRequestError) as e:
        P(**kwargs)
    assert fragment in str(e.value)
    assert isinstance(e.value, ValueError)


def test_cross_field_checks():
    with pytest.raises(InvalidRequestError, match="dynatemp_max must be >= dynatemp_min"):
        P(dynatemp_min=1.5, dynatemp_max=1.0)
    with pytest.raises(InvalidRequestError, match="min_new_tokens must be <= max_new_tokens"):
        P(min_new_tokens=10, max_new_tokens=5)
    with pytest.raises(InvalidRequestError, match="top_logprobs needs logprobs"):
        P(top_logprobs=3)


def test_from_dict_aliases_unknown_keys_and_round_trip():
    p = P.from_dict({"max_tokens": 12, "token_repetition_penalty": 1.1, "top_p": 0.5, "stop": "END",
                     "logit_bias": {"17": -1}})
    assert (p.max_new_tokens, p.repetition_penalty, p.top_p, p.stop, p.logit_bias) == (12, 1.1, 0.5, ["END"], {17: -1.0})
    with pytest.raises(InvalidRequestError, match="unknown sampling parameter.*bogus.*zzz"):
        P.from_dict({"zzz": 1, "bogus": 2, "top_k": 3})
    with pytest.raises(InvalidRequestError, match="max_new_tokens given twice"):
        P.from_dict({"max_tokens": 3, "max_new_tokens": 4})
    assert P.from_dict(p.to_dict()) == p
    assert P.from_dict({"mirostat": True}).mirostat_mode == 2


def test_presets_and_is_greedy():
    assert P.preset("greedy").is_greedy and not P().is_greedy
    ex = P.preset("exllama-default")
    assert (ex.temperature, ex.top_k, ex.top_p, ex.repetition_penalty) == (0.8, 50, 0.8, 1.025)
    assert P.preset("precise", top_k=5).top_k == 5
    assert set(PRESETS) == {"greedy", "exllama-default", "creative", "precise"}
    with pytest.raises(InvalidRequestError, match="preset must be one of"):
        P.preset("wild")
