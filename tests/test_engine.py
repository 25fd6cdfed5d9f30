"""LLMEngine against the single-sequence path: every request run through continuous batching, chunked prefill, a paged
cache, preemption and prefix sharing gives the tokens `llm.generate` gives it alone (which test_default_model checks
against HF transformers)."""
import random
import threading
from pathlib import Path

import pytest
import torch

from tokenmill import SamplingParams
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.errors import InvalidRequestError
from tokenmill.engine.kv_cache import PagedKVCache

GREEDY = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
SENTENCES = [
    "The tower is 324 metres tall, about the same height as an 81-storey building.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "In 1969 the Apollo 11 mission landed the first humans on the Moon.",
    "The quick brown fox jumps over the lazy dog while the cat watches from the fence.",
    "Water boils at 100 degrees Celsius at sea level, but at lower temperatures on mountains.",
    "import numpy as np\nx = np.arange(10)\nprint(x.mean())",
    "Shakespeare wrote Hamlet, Macbeth, Othello and King Lear among many other plays.",
]


def make_prompts(n: int) -> list[str]:
    """n prompts of 1 to ~12 sentences (about 3 to 250 tokens), all different."""
    rng = random.Random(n)
    out = ["Hi", "The moon"]
    while len(out) < n:
        k = rng.choice([1, 1, 2, 3, 5, 8, 12])
        out.append(f"Note {len(out)}: " + " ".join(rng.choice(SENTENCES) for _ in range(k)))
    return out[:n]


PROMPTS = make_prompts(16)


def solo(llm, prompts, params=GREEDY) -> list[list[int]]:
    return [llm.generate(p, params).token_ids for p in prompts]


@pytest.fixture(scope="module")
def reference(llm) -> list[list[int]]:
    return solo(llm, PROMPTS)


def block_bytes(llm, block_size: int) -> int:
    return PagedKVCache.bytes_per_block(llm.config, block_size, llm.runner.dtype)


def assert_all_free(engine: LLMEngine):
    bm = engine.blocks
    assert bm.num_free == bm.num_blocks and set(bm.ref) == {0} and not bm.pending and not bm._seqs
    assert not engine.scheduler.waiting and not engine.scheduler.running and not engine.has_unfinished()


def test_batch_of_mixed_lengths_equals_each_prompt_alone(llm, reference):
    lengths = {len(llm.encode(p)) for p in PROMPTS}
    assert min(lengths) <= 3 and max(lengths) > 100 and len(lengths) >= 8
    # 6 at a time and 64 tokens a step: requests join as others finish, long prompts prefill in chunks beside decodes
    engine = LLMEngine(llm, kv_cache_memory="64MiB", max_num_seqs=6, max_num_batched_tokens=64)
    outs = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert all(o.finish_reason == "length" for o in outs)
    assert_all_free(engine)


@pytest.mark.slow
def test_64_prompts_equal_each_prompt_alone(llm):
    prompts = make_prompts(64)
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    engine = LLMEngine(llm, kv_cache_memory="256MiB", max_num_seqs=64, max_num_batched_tokens=512)
    assert [o.token_ids for o in engine.generate(prompts, params)] == solo(llm, prompts, params)


def test_preemption_on_a_full_cache_gives_the_same_tokens(llm, reference):
    short = [i for i, p in enumerate(PROMPTS) if len(llm.encode(p)) <= 70]  # recomputing is cheap
    prompts, ref = [PROMPTS[i] for i in short], [reference[i] for i in short]
    longest = max(len(llm.encode(p)) for p in prompts) + GREEDY.max_new_tokens
    blocks = longest // 4 + 8  # the longest request fits alone, with little room beside it
    engine = LLMEngine(llm, kv_cache_memory=blocks * block_bytes(llm, 4), block_size=4, max_num_seqs=len(prompts),
                       max_num_batched_tokens=64)
    assert engine.blocks.num_blocks == blocks
    outs = engine.generate(prompts, GREEDY)
    assert engine.stats().preemptions > 0
    assert [o.token_ids for o in outs] == ref
    assert_all_free(engine)


SYSTEM = ("You are a careful assistant for a museum. " + " ".join(SENTENCES) + " Answer briefly, in one sentence, and "
          "never invent facts. ") * 2


def test_common_system_prompt_is_prefilled_once(llm):
    questions = [f"Question {i}: what is {i} plus {i * 3}?" for i in range(32)]
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in questions]
    ids = [llm.encode(c) for c in chats]
    common = next(i for i in range(len(ids[0])) if ids[0][i] != ids[1][i])
    assert 250 <= common <= 400
    params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)
    shared = LLMEngine(llm, kv_cache_memory="128MiB", max_num_seqs=32, max_num_batched_tokens=512)
    unshared = LLMEngine(llm, kv_cache_memory="128MiB", max_num_seqs=32, max_num_batched_tokens=512,
                         prefix_caching=False)
    done = {}
    for i, out in shared.stream(chats, params):
        if out.finished:
            done[i] = out
    total = sum(len(x) for x in ids)
    computed = shared.stats().prompt_tokens_computed
    want = [o.token_ids for o in unshared.generate(chats, params)]
    assert unshared.stats().prompt_tokens_computed == total
    # the common part once, then each request's own tail (plus the partial block where they part)
    assert computed <= common + sum(len(x) - common + shared.blocks.block_size for x in ids)
    assert computed < total / 4
    assert sum(o.metrics.cached_tokens for o in done.values()) == total - computed
    assert done[0].metrics.cached_tokens == 0
    assert all(done[i].metrics.cached_tokens >= common - 16 for i in range(1, 32))
    assert [done[i].completion.token_ids for i in range(32)] == want
    assert shared.stats().prefix_cache_hit_rate > 0.75


def test_banned_string_rewinds_match_the_single_path(llm):
    # the rewind cuts the paged cache back, sometimes into a full (cached) block that must then be recomputed
    params = SamplingParams(temperature=0, max_new_tokens=24, banned_strings=["Paris", " is"])
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    want = llm.generate(prompt, params)
    engine = LLMEngine(llm, kv_cache_memory="32MiB", block_size=4)
    got = engine.generate([prompt, prompt], params)
    assert got[0].token_ids == want.token_ids and got[0].text == want.text and got[1].text == want.text
    assert "Paris" not in got[0].text
    assert_all_free(engine)


def test_seeded_sampling_and_stop_strings_match_the_single_path(llm):
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=s, max_new_tokens=12, stop=["."]) for s in range(3)]
    prompt = "Tell me about the sea"
    engine = LLMEngine(llm, kv_cache_memory="32MiB")
    for p in params:
        engine.add_request(prompt, p, request_id=str(p.seed))
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    for p in params:
        want = llm.generate(prompt, p)
        stream = outs[str(p.seed)]
        final = stream[-1]
        assert final.finished and final.completion.token_ids == want.token_ids and final.completion.text == want.text
        assert "".join(o.text for o in stream) == want.text
        assert final.finish_reason == want.finish_reason


def test_metrics_and_gauges(llm):
    engine = LLMEngine(llm, kv_cache_memory="32MiB", max_num_seqs=2)
    prompts = ["Hello there", "The capital of France is", "One two three"]
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True))
    engine.step()
    st = engine.stats()
    assert st.running == 2 and st.waiting == 1 and st.blocks_used == 2
    assert st.blocks_used + st.blocks_free == st.num_blocks
    final = []
    while engine.has_unfinished():
        final += [o for o in engine.step() if o.finished]
    for o, p in zip(sorted(final, key=lambda o: int(o.request_id)), prompts):
        m = o.metrics
        assert m.prompt_tokens == len(llm.encode(p)) and m.generated_tokens == 5 and m.finish_reason == "length"
        assert 0 <= m.queue_seconds <= m.ttft_seconds <= m.latency_seconds
        assert m.prompt_tps > 0 and m.generation_tps > 0 and m.cached_tokens == 0
    assert final[-1].metrics.queue_seconds > final[0].metrics.queue_seconds  # the third waited for a free slot


def test_abort(llm):
    engine = LLMEngine(llm, kv_cache_memory="32MiB")
    a = engine.add_request("Once upon a time", SamplingParams(max_new_tokens=50))
    b = engine.add_request("Twice upon a time", SamplingParams(max_new_tokens=3, temperature=0))
    engine.step()
    assert engine.abort(a) and not engine.abort("nope")
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == a]
    assert aborted and aborted[0].finished and aborted[0].finish_reason == "aborted"
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.finish_reason for o in outs if o.request_id == b and o.finished] == ["length"]
    assert_all_free(engine)


def test_request_that_never_fits_fails_alone(llm):
    block = block_bytes(llm, 16)
    engine = LLMEngine(llm, kv_cache_memory=8 * block)  # 128 tokens
    long_ids = llm.encode("word " * 200)
    too_long = engine.add_request(" ".join(["word"] * 9000), SamplingParams(max_new_tokens=2))
    too_big = engine.add_request(long_ids, SamplingParams(max_new_tokens=2))
    ok = engine.add_request("Hello", SamplingParams(max_new_tokens=2, temperature=0))
    finals = {}
    while engine.has_unfinished():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert "context is 8192 tokens" in finals[too_long].error and finals[too_long].finish_reason == "error"
    assert "KV cache holds 128 tokens" in finals[too_big].error
    assert finals[ok].error is None and finals[ok].completion.generated_tokens == 2
    with pytest.raises(InvalidRequestError, match="prompt 1: prompt has"):
        engine.generate(["Hello", long_ids], SamplingParams(max_new_tokens=2))
    assert_all_free(engine)


def test_bad_requests_are_typed_errors(llm):
    engine = LLMEngine(llm, kv_cache_memory="16MiB")
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        engine.add_request("")
    with pytest.raises(InvalidRequestError, match=r"token ids must be in \[0, 49152\), got 99999"):
        engine.add_request([1, 2, 99999])
    with pytest.raises(InvalidRequestError, match="SamplingParams"):
        engine.add_request("hi", {"temperature": 0})
    engine.add_request("hi", request_id="x")
    with pytest.raises(InvalidRequestError, match="'x' is already in flight"):
        engine.add_request("hello", request_id="x")
    with pytest.raises(InvalidRequestError, match="no prompts"):
        engine.generate([])
    with pytest.raises(InvalidRequestError, match="at least one block"):
        LLMEngine(llm, kv_cache_memory=1000)
    with pytest.raises(InvalidRequestError, match="KV cache memory must be a size"):
        LLMEngine(llm, kv_cache_memory="lots")
    with pytest.raises(InvalidRequestError, match="max_num_batched_tokens must be >= max_num_seqs"):
        LLMEngine(llm, kv_cache_memory="16MiB", max_num_seqs=64, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def tiny_llm(llm):
    """A 2-layer random llama on the default model's tokenizer: steps take milliseconds."""
    from tokenmill.model.config import ModelConfig
    from tokenmill.llm import LLM
    from tokenmill.model.loader import LoadedModel
    from tokenmill.model.transformer import Transformer

    cfg = ModelConfig("llama", vocab_size=llm.config.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = Transformer(cfg).eval().requires_grad_(False)
    return LLM(LoadedModel(model, cfg, llm.tokenizer, Path("tiny"), "hf"))


def test_no_leaks_after_1000_requests_with_random_aborts_from_another_thread(tiny_llm):
    engine = LLMEngine(tiny_llm, kv_cache_memory=24 * block_bytes(tiny_llm, 4), block_size=4, max_num_seqs=16,
                       max_num_batched_tokens=64)
    rng = random.Random(0)
    prefixes = [[rng.randrange(100, 40000) for _ in range(rng.randrange(4, 24))] for _ in range(5)]
    submitted, aborted = [], []

    def submit():
        for i in range(1000):
            ids = rng.choice(prefixes)[: rng.randrange(1, 24)]
            ids += [rng.randrange(100, 40000) for _ in range(rng.randrange(3))]
            params = SamplingParams(max_new_tokens=rng.randrange(1, 9), temperature=rng.choice([0.0, 1.0]),
                                    stop=["e"] if i % 7 == 0 else [])
            submitted.append(engine.add_request(ids, params))
            if rng.random() < 0.2:
                victim = rng.choice(submitted)
                if engine.abort(victim):
                    aborted.append(victim)

    thread = threading.Thread(target=submit)
    thread.start()
    finished = {}
    while thread.is_alive() or engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                assert o.request_id not in finished, "one final output per request"
                finished[o.request_id] = o
    thread.join()
    assert sorted(finished) == sorted(submitted)
    reasons = {o.finish_reason for o in finished.values()}
    assert "aborted" in reasons and "length" in reasons
    assert {r for r, o in finished.items() if o.finish_reason == "aborted"} <= set(aborted)
    assert engine.stats().preemptions > 0 and engine.stats().prompt_tokens_cached > 0
    assert_all_free(engine)
