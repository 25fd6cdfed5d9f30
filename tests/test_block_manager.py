"""BlockManager bookkeeping (reference counts, chained prefix keys, LRU eviction, rewinds) and the Scheduler's decisions
(FCFS, chunked prefill, preemption, requests that never fit), on counts alone: no model, no tensors."""
from types import SimpleNamespace

from tokenmill.engine.block_manager import BlockManager, block_keys
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler

BS = 4


def admit(bm: BlockManager, sid, ids: list[int]) -> int:
    """Start a sequence on its cached prefix and give it blocks for all of ids; returns cached tokens."""
    cached, keys = bm.match(ids, len(ids) - 1)
    bm.start(sid, cached, keys)
    bm.grow(sid, len(ids))
    return len(cached) * BS


def test_refcounts_and_free():
    bm = BlockManager(8, BS)
    assert admit(bm, "a", list(range(10))) == 0
    assert len(bm.table("a")) == 3 and bm.num_free == 5
    assert all(bm.ref[b] == 1 for b in bm.table("a"))
    bm.grow("a", 13)  # one more block for tokens 12..12
    assert len(bm.table("a")) == 4 and bm.blocks_needed("a", 16) == 0 and bm.blocks_needed("a", 17) == 1
    bm.free("a")
    assert bm.num_free == 8 and bm.ref == [0] * 8
    bm.free("a")  # freeing twice is harmless
    assert bm.num_free == 8


def test_keys_chain_the_whole_prefix():
    a = block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], BS)
    b = block_keys([9, 9, 9, 9, 5, 6, 7, 8], BS)
    assert len(a) == 2 and len(b) == 2  # partial blocks get no key
    assert a[1][1] == b[1][1] and a[1] != b[1]  # same tokens, different prefix: different key
    assert block_keys([1, 2, 3, 4, 5, 6, 7, 8], BS, start=1, prev=a[0]) == a[1:]


def test_shared_prefix_blocks_are_reused_and_refcounted():
    bm = BlockManager(16, BS)
    prompt = list(range(100, 111))  # 2 full blocks + 3 tokens
    admit(bm, "a", prompt)
    bm.commit("a", prompt, 11)
    assert admit(bm, "b", prompt + [7, 8]) == 8
    shared = bm.table("a")[:2]
    assert bm.table("b")[:2] == shared and bm.table("b")[2] != bm.table("a")[2]
    assert [bm.ref[x] for x in shared] == [2, 2]
    bm.free("a")
    assert [bm.ref[x] for x in shared] == [1, 1]
    bm.free("b")
    assert bm.num_free == 16 and bm.num_used == 0
    # freed but still cached: a third sequence gets them back
    assert admit(bm, "c", prompt) == 8 and bm.table("c")[:2] == shared


def test_match_keeps_one_token_to_compute_and_stops_at_first_miss():
    bm = BlockManager(16, BS)
    ids = list(range(12))
    admit(bm, "a", ids)
    bm.commit("a", ids, 12)
    assert len(bm.match(ids, len(ids) - 1)[0]) == 2  # all 3 blocks cached, but the last token must be recomputed
    assert len(bm.match(ids + [99], 12)[0]) == 3
    other = [0, 1, 2, 3, 9, 9, 9, 9, 8, 9, 10, 11]
    assert len(bm.match(other, 12)[0]) == 1  # block 2 has equal tokens but follows a different block 1


def test_lru_eviction_takes_never_cached_blocks_first_then_least_recently_used():
    bm = BlockManager(4, BS)
    for sid, base in (("x", 0), ("y", 100)):
        ids = list(range(base, base + 4))
        admit(bm, sid, ids)
        bm.commit(sid, ids, 4)
    bx, by = bm.table("x")[0], bm.table("y")[0]
    bm.free("x")
    bm.free("y")  # y freed last: most recently used
    assert bm.num_free == 4
    admit(bm, "z", [7] * 9)  # 3 blocks: the 2 never-cached ones, then the LRU cached one (x's)
    assert bx in bm.table("z") and by not in bm.table("z")
    assert len(bm.match(list(range(4)) + [0], 4)[0]) == 0  # x's prefix is gone
    assert bm.match(list(range(100, 104)) + [0], 4)[0] == [by]  # y's survives
    # a cache hit makes a block recently used: touch y, then a new sequence must not evict it
    bm.free("z")
    admit(bm, "w", list(range(100, 104)) + [1])
    assert bm.ref[by] == 1


def test_truncate_never_writes_into_a_cached_block():
    bm = BlockManager(8, BS)
    ids = list(range(10))
    admit(bm, "a", ids)
    bm.commit("a", ids, 10)  # blocks 0, 1 cached; block 2 holds tokens 8, 9
    assert bm.truncate("a", 9) == 9 and len(bm.table("a")) == 3  # inside the private block: kept
    assert bm.truncate("a", 6) == 4 and len(bm.table("a")) == 1  # inside cached block 1: back to its start
    assert bm.ref.count(1) == 1 and bm.num_free == 7
    bm.free("a")
    assert bm.num_free == 8


def test_pending_blocks_until_committed_or_freed():
    bm = BlockManager(8, BS)
    ids = list(range(9))
    cached, keys = bm.match(ids, 8)
    bm.start("a", cached, keys)
    bm.grow("a", 4)
    assert bm.is_pending(keys, 0)
    bm.commit("a", ids, 4)
    assert not bm.is_pending(keys, 0) and bm.is_pending(keys, 1)
    bm.free("a")
    assert not bm.pending


def test_reset_prefix_cache():
    bm = BlockManager(4, BS)
    admit(bm, "a", list(range(5)))
    bm.commit("a", list(range(5)), 4)
    bm.free("a")
    bm.reset_prefix_cache()
    assert bm.match(list(range(5)), 4)[0] == [] and bm.num_free == 4


def test_prefix_caching_off():
    bm = BlockManager(8, BS, prefix_caching=False)
    admit(bm, "a", list(range(9)))
    bm.commit("a", list(range(9)), 9)
    bm.free("a")
    assert admit(bm, "b", list(range(9))) == 0


# -- the scheduler, with stand-in sequences (token ids only) --
def req(rid: str, n_prompt: int, max_new: int = 4, base: int = 0) -> Request:
    seq = SimpleNamespace(prompt_ids=list(range(base, base + n_prompt)), output_ids=[], max_new_tokens=max_new)
    return Request(rid, seq)


def run_step(s: Scheduler) -> dict[str, int]:
    """Schedule, then pretend the forward ran: advance num_computed, sample a token where the sequence caught up."""
    batch = s.schedule()
    for r, n in batch.items:
        r.num_computed += n
        s.blocks.commit(r.id, r.token_ids, r.num_computed)
        if r.num_computed == r.num_tokens:
            r.seq.output_ids.append(1)
            if len(r.seq.output_ids) >= r.seq.max_new_tokens:
                s.remove(r)
    return {r.id: n for r, n in batch.items}


def test_scheduler_chunks_prefill_and_keeps_decodes_going():
    s = Scheduler(BlockManager(64, BS), max_num_seqs=4, max_num_batched_tokens=8, max_model_len=1000)
    a, b = req("a", 3, max_new=10), req("b", 20, base=50)
    s.add(a)
    s.add(b)
    assert run_step(s) == {"a": 3, "b": 5}
    assert run_step(s) == {"a": 1, "b": 7}  # a decodes; b's prefill continues in chunks within the budget
    assert run_step(s) == {"a": 1, "b": 7}
    assert run_step(s) == {"a": 1, "b": 1}


def test_scheduler_is_fcfs_and_caps_running_requests():
    s = Scheduler(BlockManager(64, BS), max_num_seqs=2, max_num_batched_tokens=64, max_model_len=1000)
    for i in range(4):
        s.add(req(f"r{i}", 3, max_new=2, base=10 * i))
    assert list(run_step(s)) == ["r0", "r1"]
    assert list(run_step(s)) == ["r0", "r1"]  # both finish here
    assert list(run_step(s)) == ["r2", "r3"]


def test_scheduler_preempts_the_newest_and_recomputes_it():
    s = Scheduler(BlockManager(4, BS, prefix_caching=False), max_num_seqs=4, max_num_batched_tokens=64,
                  max_model_len=1000)
    a, b = req("a", 4, max_new=6), req("b", 4, max_new=6, base=50)
    s.add(a)
    s.add(b)
    run_step(s)  # a, b: one block each; each sampled a token
    run_step(s)  # decode: a and b each need a second block (4 blocks used)
    assert s.blocks.num_free == 0
    for _ in range(4):
        run_step(s)
    # a needed a third block: b (the newest) was preempted and waits at the front
    assert s.num_preemptions >= 1 and b.preemptions >= 1 and a.preemptions == 0
    while s.has_unfinished():
        run_step(s)
    assert len(a.seq.output_ids) == 6 and len(b.seq.output_ids) == 6
    assert s.blocks.num_free == 4


def test_scheduler_fails_requests_that_never_fit_without_blocking_others():
    s = Scheduler(BlockManager(8, BS), max_num_seqs=4, max_num_batched_tokens=64, max_model_len=20)
    too_long, too_big, ok = req("long", 20), req("big", 19), req("ok", 5, max_new=100)
    s.blocks.num_blocks = 4  # a pool of 16 tokens: "big" fits the context but never the pool
    s.blocks._free = type(s.blocks._free)(range(4))
    for r in (too_long, too_big, ok):
        s.add(r)
    batch = s.schedule()
    assert [r.id for r in batch.failed] == ["long", "big"]
    assert "context is 20 tokens" in too_long.error and "KV cache holds 16 tokens" in too_big.error
    assert [r.id for r, _ in batch.items] == ["ok"]
    assert ok.seq.max_new_tokens == 12  # capped so prompt + output - 1 fits the pool alone
