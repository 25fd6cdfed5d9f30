"""`tokenmill bench` suites. Each measures one thing on a loaded LLM after a warm-up and returns
{"figures": {name: figure}, ...extras}; a figure is the median of `repeat` runs with its spread (baseline.figure).

    decode   batch 1, short prompt: tok/s of llm.generate (sampler and detokenizer included)
    context  decode tok/s with the KV cache filled to each step, up to the model's maximum (runner forward + argmax)
    prefill  prompt tok/s for each prompt length (one row, from an empty cache)
    batch    engine throughput and p50/p95 latency vs concurrency; the recommended concurrency (`recommend`)
    chat     the multi-turn curve: a ChatSession's replies turn after turn, the previous turn's KV prefix reused
    quality  perplexity (llama.cpp's protocol) and golden greedy outputs (quality.py)
"""
from __future__ import annotations

import statistics
import time

import torch

from tokenmill.engine.scratch import ScratchCache
from tokenmill.monitoring.baseline import QUALITY_THRESHOLD, figure
from tokenmill.sampling.params import SamplingParams

PROMPT = "The history of the city begins"
QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Name three colours.", "What is a prime number?",
             "How do bees make honey?", "What does a compiler do?", "Why do we have seasons?", "What is gravity?",
             "How do plants drink water?", "What is electricity?", "Who wrote Hamlet?", "What is a rainbow?"]


def ladder(top: int, start: int = 128) -> list[int]:
    """start, 4*start, 16*start ... below top, then top: the default context steps and prefill lengths."""
    out, n = [], start
    while n < top:
        out.append(n)
        n *= 4
    return out + [top]


def _sync(llm):
    if llm.runner.device.type == "cuda":
        torch.cuda.synchronize()


def _random_ids(llm, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, llm.config.vocab_size, (n,), generator=g).tolist()


def decode(llm, s: dict, log) -> dict:
    params = SamplingParams(temperature=0.0, max_new_tokens=s["decode_tokens"], ignore_eos=True)
    llm.generate(PROMPT, temperature=0.0, max_new_tokens=8)
    runs = []
    for _ in range(s["repeat"]):
        llm.reset_cache()
        runs.append(llm.generate(PROMPT, params).generation_tps)
    log(f"decode: {statistics.median(runs):.1f} tok/s")
    return {"figures": {"decode b1 tok/s": figure(runs, "tok/s", suite="decode", metric="decode tok/s")}}


def context(llm, s: dict, log) -> dict:
    k = s["context_tokens"]
    steps = sorted({min(c, llm.context_length - k) for c in s["context"]})
    ids = _random_ids(llm, steps[-1] + 1)
    cache = ScratchCache(llm.runner, 1, steps[-1] + k)
    figs, done = {}, 0
    for c in steps:
        cache.truncate(0, done)
        cache.prefill(0, ids[done:c])  # the cache grows step by step: one prefill of the largest in all
        done, runs = c, []
        for r in range(s["repeat"] + 1):  # the first is warm-up
            cache.truncate(0, c)
            tok = ids[c]
            _sync(llm)
            t = time.perf_counter()
            for _ in range(k):
                tok = int(cache.decode([0], [tok])[0].argmax())
            if r:
                runs.append(k / (time.perf_counter() - t))
        figs[f"context {c} decode tok/s"] = figure(runs, "tok/s", suite="context", x=c, metric="decode tok/s")
        log(f"context {c}: {statistics.median(runs):.1f} tok/s")
    return {"figures": figs}


def prefill(llm, s: dict, log) -> dict:
    figs = {}
    for n in s["prefill"]:
        n = min(n, llm.context_length)
        ids, cache, runs = _random_ids(llm, n), ScratchCache(llm.runner, 1, n), []
        for r in range(s["repeat"] + 1):
            cache.reset()
            _sync(llm)
            t = time.perf_counter()
            cache.prefill(0, ids)
            _sync(llm)
            if r:
                runs.append(n / (time.perf_counter() - t))
        figs[f"prefill {n} tok/s"] = figure(runs, "tok/s", suite="prefill", x=n, metric="prefill tok/s")
        log(f"prefill {n}: {statistics.median(runs):.0f} tok/s")
    return {"figures": figs}


def _pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def recommend(points: list[dict], kv_bound: int) -> tuple[int, str]:
    """The recommended concurrency from measured points [{c, throughput, p95}] (ascending c, best a geometric ladder).

    Walk up the ladder and stop before the first step that adds less than 10% total throughput (more requests at once
    then only make each one slower) or more than doubles p95 latency (users wait twice as long for the gain); then cap
    at `kv_bound`, the requests of this size whose KV cache fits the memory, so the choice never causes preemption."""
    best, why = points[0], "largest concurrency measured; throughput still rising"
    for prev, nxt in zip(points, points[1:]):
        gain, slower = nxt["throughput"] / prev["throughput"] - 1, nxt["p95"] / prev["p95"]
        if gain < 0.10:
            why = f"{nxt['c']} adds only {100 * gain:.0f}% throughput over {prev['c']}"
            break
        if slower > 2:
            why = f"p95 latency x{slower:.1f} from {prev['c']} to {nxt['c']}"
            break
        best = nxt
    if best["c"] > kv_bound:
        return kv_bound, f"KV memory holds {kv_bound} requests of this size"
    return best["c"], why


def batch(llm, s: dict, log) -> dict:
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.engine.kv_cache import PagedKVCache, default_kv_memory, parse_memory

    conc, new, plen = s["concurrency"], s["batch_tokens"], s["batch_prompt"]
    engine = LLMEngine(llm, kv_cache_memory=s.get("kv_cache_memory"), max_num_seqs=max(conc),
                       max_num_batched_tokens=max(512, max(conc)))
    prompts = [_random_ids(llm, plen, seed=i) for i in range(max(4, 2 * max(conc)))]
    params = SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True)
    figs, points = {}, []
    for c in conc:
        engine.scheduler.max_num_seqs = c
        n = max(4, 2 * c)  # two waves: every slot is refilled once, as under steady load
        engine.generate(prompts[:c], SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True))  # warm-up
        thr, p50, p95 = [], [], []
        for _ in range(s["repeat"]):
            engine.reset_prefix_cache()
            lat, t0 = [], time.perf_counter()
            for _, out in engine.stream(prompts[:n], params):
                if out.finished:  # service time: from being scheduled to the last token (queueing excluded)
                    lat.append(out.metrics.latency_seconds - out.metrics.queue_seconds)
            thr.append(n * new / (time.perf_counter() - t0))
            p50.append(_pct(lat, 50))
            p95.append(_pct(lat, 95))
        figs[f"batch c{c} throughput tok/s"] = figure(thr, "tok/s", suite="batch", x=c, metric="throughput tok/s")
        figs[f"batch c{c} p50 latency s"] = figure(p50, "s", suite="batch", x=c, metric="p50 latency s", better="lower")
        figs[f"batch c{c} p95 latency s"] = figure(p95, "s", suite="batch", x=c, metric="p95 latency s", better="lower")
        points.append({"c": c, "throughput": statistics.median(thr), "p95": statistics.median(p95)})
        log(f"batch concurrency {c}: {points[-1]['throughput']:.1f} tok/s, p95 {points[-1]['p95']:.2f} s")
    memory = parse_memory(s["kv_cache_memory"]) if s.get("kv_cache_memory") else default_kv_memory(llm.runner.device)
    per_token = PagedKVCache.bytes_per_block(llm.config, 1, llm.runner.kv_dtype)
    kv_bound = max(1, memory // (per_token * (plen + new)))
    c, why = recommend(points, kv_bound)
    rec = {"recommended": c, "why": why, "kv_memory_bytes": memory, "kv_bound": kv_bound,
           "kv_bound_full_context": memory // (per_token * llm.context_length), "request_tokens": plen + new}
    log(f"batch: recommended concurrency {c} ({why}; KV memory {memory / 2**30:.2f} GiB holds {kv_bound} such "
        f"requests, {rec['kv_bound_full_context']} at full context)")
    return {"figures": figs, "batch": rec}


def chat(llm, s: dict, log) -> dict:
    from tokenmill.chat import ChatSession

    params = SamplingParams(temperature=0.0, max_new_tokens=s["chat_tokens"])
    questions = (QUESTIONS * (s["chat_turns"] // len(QUESTIONS) + 1))[: s["chat_turns"]]
    llm.generate("Warm up.", params)
    plays = []  # plays[r][turn] = (generation tok/s, latency s, prompt tokens computed, context used)
    for _ in range(s["repeat"]):
        llm.reset_cache()
        session, rows = ChatSession(llm, params, system="You are a concise assistant."), []
        for q in questions:
            reply = session.send(q)
            for _ in reply:
                pass
            c = reply.completion
            rows.append((c.generation_tps, reply.seconds, c.prompt_tokens - c.cached_tokens, session.context_used))
        plays.append(rows)
    med = [[statistics.median(p[t][i] for p in plays) for i in range(4)] for t in range(len(questions))]
    curve = {"turn": list(range(1, len(questions) + 1)), "generation_tps": [m[0] for m in med],
             "latency_s": [m[1] for m in med], "new_tokens": [m[2] for m in med], "context": [m[3] for m in med]}
    head, tail = slice(0, 3), slice(-3, None)

    def per_play(i, part):
        return [statistics.median(r[i] for r in p[part]) for p in plays]

    figs = {"chat turns 1-3 generation tok/s": figure(per_play(0, head), "tok/s", suite="chat", metric="first turns"),
            "chat last 3 turns generation tok/s": figure(per_play(0, tail), "tok/s", suite="chat", metric="last turns"),
            "chat last 3 turns latency s": figure(per_play(1, tail), "s", suite="chat", better="lower",
                                                  metric="last turns latency")}
    log(f"chat: {curve['generation_tps'][0]:.1f} -> {curve['generation_tps'][-1]:.1f} tok/s over {len(questions)} "
        f"turns, context {curve['context'][-1]:.0f} tokens")
    return {"figures": figs, "curves": {"chat": curve}}


def quality(llm, s: dict, log) -> dict:
    from tokenmill.monitoring.quality import golden_outputs, perplexity, tokenize_text

    ids = tokenize_text(llm, s["ppl_file"])
    r = perplexity(llm, ids, s["ppl_ctx"], s["ppl_chunks"],
                   progress=lambda i, n, p: log(f"  [{i}/{n}] {p:.4f}") if i % 10 == 0 or i == n else None)
    log(r.line())
    golden = golden_outputs(llm, s["golden_tokens"])
    log(f"golden: {len(golden['items'])} prompts x {s['golden_tokens']} greedy tokens")
    figs = {"quality perplexity": figure([r.ppl], "ppl", suite="quality", better="lower",
                                         threshold=QUALITY_THRESHOLD)}
    return {"figures": figs, "golden": golden, "perplexity": r.__dict__}


def run(llm, suites: list[str], s: dict, log) -> dict:
    """Run the named suites in order; a result dict (without env) that baseline.save and report.render take."""
    result = {"settings": s, "figures": {}, "curves": {}}
    for name in suites:
        t = time.perf_counter()
        out = SUITES[name](llm, s, log)
        result["figures"].update(out.pop("figures"))
        result["curves"].update(out.pop("curves", {}))
        result.update(out)
        result.setdefault("seconds", {})[name] = round(time.perf_counter() - t, 1)
    return result


SUITES = {f.__name__: f for f in (decode, context, prefill, batch, chat, quality)}  # bench.SUITE_NAMES, in order
