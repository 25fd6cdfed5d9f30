"""The engine: continuous batching over a paged KV cache, the one request path under every entry point (LLM.generate,
LLM.stream, ChatSession, every CLI command).

    engine = LLMEngine(llm, max_num_seqs=32)
    rid = engine.add_request("Hello", SamplingParams(max_new_tokens=32))
    while engine.has_unfinished():
        for out in engine.step(): ...

`add_request` builds the request whole (engine/request.py) and rejects a bad one at once, alone. Each step: the
scheduler picks who runs and how many tokens (scheduler.py), the runner runs them as one packed forward over the paged
cache (model_runner.py), and the post-processing samples, appends to each Sequence (EOS, stops, banned-string rewinds)
and frees finished requests. A step that fails finishes the requests in it with an error and leaves the engine usable.
add_request and abort may be called from other threads while one thread steps; they only touch an inbox under a lock.
"""
from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence as Seq

from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.kv_cache import PagedKVCache, default_kv_memory, parse_memory
from tokenmill.engine.request import Prompt, Request
from tokenmill.engine.scheduler import ScheduledBatch, Scheduler
from tokenmill.engine.sequence import Completion, RequestMetrics
from tokenmill.errors import InvalidRequestError
from tokenmill.sampling.params import SamplingParams
from tokenmill.sampling.sampler import Sampler

log = logging.getLogger("tokenmill")


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    text: str  # text released by this step
    finished: bool
    completion: Completion | None = None  # once finished (on an error too: finish reason "error")

    @property
    def finish_reason(self) -> str | None:
        return self.completion.finish_reason if self.completion else None

    @property
    def error(self) -> str | None:
        """Why the request could not run, or None."""
        return self.completion.error if self.completion else None

    @property
    def metrics(self) -> RequestMetrics | None:
        return self.completion.metrics if self.completion else None


@dataclass
class EngineStats:
    running: int
    waiting: int
    blocks_used: int
    blocks_free: int
    num_blocks: int
    block_size: int
    prefix_cache_hit_rate: float  # cached / all prompt tokens admitted so far
    prompt_tokens_cached: int
    prompt_tokens_computed: int
    preemptions: int


def _caught_up(batch: ScheduledBatch) -> list[int]:
    """Indices of the batch's requests whose every token is computed after this step: they sample the next one."""
    return [i for i, (req, n) in enumerate(batch.items) if req.num_computed + n == req.num_tokens]


class LLMEngine:
    def __init__(self, llm, *, kv_cache_memory: int | str | None = None, block_size: int = 16, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, prefix_caching: bool = True):
        """Args:
            llm: a loaded `tokenmill.LLM` (its runner, tokenizer and chat template are shared).
            kv_cache_memory: bytes (or a size such as '2GiB') for the KV block pool; default: see default_kv_memory.
            max_num_seqs: requests running at once. max_num_batched_tokens: tokens per forward (chunked prefill).
        """
        for name, v in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                        ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidRequestError(f"{name} must be an integer >= 1, got {v!r}")
        if max_num_batched_tokens < max_num_seqs:
            raise InvalidRequestError(f"max_num_batched_tokens must be >= max_num_seqs ({max_num_seqs}) so every "
                                      f"running request gets a token each step, got {max_num_batched_tokens}")
        self.runner, self.requests, self.tokenizer = llm.runner, llm.requests, llm.tokenizer
        cfg = llm.config
        if kv_cache_memory is None:
            memory = default_kv_memory(self.runner.device)
        else:
            memory = parse_memory(kv_cache_memory) if isinstance(kv_cache_memory, str) else int(kv_cache_memory)
        per_block = PagedKVCache.bytes_per_block(cfg, block_size, self.runner.kv_dtype)
        useful = max_num_seqs * -(-llm.context_length // block_size)  # every request at full context
        num_blocks = min(memory // per_block, useful)
        if num_blocks < 1:
            raise InvalidRequestError(
                f"KV cache memory must hold at least one block of {per_block} bytes, got {memory}")
        self.cache = self.runner.new_kv_cache(num_blocks, block_size)
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens, max_model_len=llm.context_length)
        self.sampler = Sampler(cfg.vocab_size, kernels=self.runner.kernels)
        self._lock = threading.Lock()
        self._inbox: list[Request] = []
        self._aborts: list[str] = []
        self._live: dict[str, Request] = {}  # submitted and not yet reported finished
        self._ids = itertools.count()

    def describe(self) -> str:
        b = self.blocks
        return (f"KV cache: {b.num_blocks} blocks x {b.block_size} tokens = {b.num_blocks * b.block_size} tokens "
                f"({self.cache.nbytes / 2**30:.2f} GiB, {str(self.cache.dtype).removeprefix('torch.')}); "
                f"up to {self.scheduler.max_num_seqs} requests, {self.scheduler.max_num_batched_tokens} tokens a step")

    # -- submission (any thread) --
    def encode(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        """Token ids for text, chat messages or token ids (checked against the vocabulary)."""
        return self.requests.encode(prompt, chat=chat)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | int | None = None, *,
                    chat: bool = False) -> str:
        """Queue a request; returns its id. A request that is invalid (bad token ids, text, messages or parameters)
        raises InvalidRequestError here, alone; one that can never run (longer than the context or the KV cache)
        comes back from `step` as a finished output with `error` set."""
        with self._lock:
            rid = str(next(self._ids)) if request_id is None else str(request_id)
            if rid in self._live:
                raise InvalidRequestError(f"request id {rid!r} is already in flight")
        req = self.requests.request(rid, prompt, params or SamplingParams(), chat=chat)
        with self._lock:
            if rid in self._live:
                raise InvalidRequestError(f"request id {rid!r} is already in flight")
            self._live[rid] = req
            self._inbox.append(req)
        return rid

    def abort(self, request_id: str | int) -> bool:
        """Stop a request; its final output (finish reason "aborted") comes from the next step. False if unknown."""
        rid = str(request_id)
        with self._lock:
            if rid not in self._live:
                return False
            self._aborts.append(rid)
            return True

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live)

    # -- the step (one thread) --
    def step(self) -> list[RequestOutput]:
        """Run one forward over the scheduled requests; returns an output for each request that sampled a token,
        finished, failed or was aborted."""
        outs = self._take_submissions()
        batch = self.scheduler.schedule()
        try:
            return outs + self._postprocess(batch, self._run(batch))
        except Exception as e:  # noqa: BLE001 - the requests in this step fail; the engine stays usable
            return outs + self._fail(batch, e)

    def _take_submissions(self) -> list[RequestOutput]:
        with self._lock:
            new, aborts, self._inbox, self._aborts = self._inbox, self._aborts, [], []
            reqs = [self._live[rid] for rid in dict.fromkeys(aborts) if rid in self._live]
        for req in new:
            self.scheduler.add(req)
        outs = []
        for req in reqs:
            if not req.error:  # (a failed one is reported by this step)
                outs.append(self._final(req))
        return outs

    def _run(self, batch: ScheduledBatch):
        if not batch.items:
            return None
        # decodes first, shortest first, so the cache view can group them by length; then prefill chunks
        batch.items.sort(key=lambda item: (item[1] != 1, item[0].num_computed if item[1] == 1 else 0))
        return self.runner.forward(
            self.cache,
            [req.next_tokens(n) for req, n in batch.items],
            [req.num_computed for req, _ in batch.items],
            [self.blocks.table(req.id) for req, _ in batch.items],
            _caught_up(batch),
        )

    def _postprocess(self, batch: ScheduledBatch, logits) -> list[RequestOutput]:
        outs = [self._final(req) for req in batch.failed]
        reqs = [batch.items[i][0] for i in _caught_up(batch)]  # the rows of logits
        sampled = self.sampler(logits, [r.seq.state for r in reqs]) if reqs else None
        bs = self.blocks.block_size
        for req, n in batch.items:
            req.num_computed += n
            if req.num_computed // bs != (req.num_computed - n) // bs:  # a block filled up: cache it
                self.blocks.commit(req.id, req.token_ids, req.num_computed)
        if sampled is None:
            return outs
        tokens = sampled.tokens.tolist()
        lps = sampled.logprobs.tolist() if sampled.logprobs is not None else [None] * len(reqs)
        for req in (reqs[i] for i in sampled.exhausted):
            req.error = (f"the sampling constraints leave no token to sample at output token {len(req.seq.output_ids)}: "
                         "every allowed token is disallowed, biased to -inf, banned after a rewind or held back "
                         "(EOS before min_new_tokens); allow more tokens")
        for req, token, lp in zip(reqs, tokens, lps):
            seq = req.seq
            if req.error:
                outs.append(self._final(req))
                continue
            text = seq.append(token, lp if seq.params.logprobs else None)
            if seq.rewound:  # a banned string took tokens back: so does the cache
                req.num_computed = self.blocks.truncate(req.id, min(req.num_computed, seq.cache_length))
            if seq.finished:
                outs.append(self._final(req, text))
            else:
                outs.append(RequestOutput(req.id, text, False))
        return outs

    def _fail(self, batch: ScheduledBatch, exc: Exception) -> list[RequestOutput]:
        """Finish every request of a step that raised with an error; their blocks are freed, the others run on."""
        log.error("tokenmill engine: a step failed (%s: %s); its %d requests end with an error",
                  type(exc).__name__, exc, len(batch.items), exc_info=log.isEnabledFor(logging.DEBUG))
        outs = []
        for req in [*batch.failed, *(req for req, _ in batch.items)]:
            if req.id not in self._live:
                continue  # already reported by this step
            req.error = req.error or f"the engine step running this request failed: {type(exc).__name__}: {exc}"
            outs.append(self._final(req))
        return outs

    def _final(self, req: Request, text: str = "") -> RequestOutput:
        """The request's last output; it leaves the queues and its blocks are freed."""
        with self._lock:
            self._live.pop(req.id, None)
        self.scheduler.remove(req)
        return RequestOutput(req.id, text, True, req.completion())

    def stats(self) -> EngineStats:
        s, b = self.scheduler, self.blocks
        total = s.prompt_tokens_cached + s.prompt_tokens_computed
        return EngineStats(len(s.running), len(s.waiting), b.num_used, b.num_free, b.num_blocks, b.block_size,
                           s.prompt_tokens_cached / total if total else 0.0, s.prompt_tokens_cached,
                           s.prompt_tokens_computed, s.num_preemptions)

    def reset_prefix_cache(self):
        """Forget cached prefixes nobody is using (the next prompt is computed from scratch)."""
        self.blocks.reset_prefix_cache()

    # -- blocking and streaming helpers (they step the engine themselves) --
    def submit(self, prompts: Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None, *,
               chat: bool = False) -> list[str]:
        """Queue every prompt (one SamplingParams for all, or one each) after checking them all: an invalid prompt, or
        one that can never run, raises InvalidRequestError naming it before any is queued. Returns their ids."""
        prompts = list(prompts)
        if not prompts:
            raise InvalidRequestError("no prompts given; pass a non-empty list of prompts")
        per = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per) != len(prompts):
            raise InvalidRequestError(f"got {len(per)} SamplingParams for {len(prompts)} prompts; give one or one "
                                      "per prompt")
        tag = next(self._ids)
        reqs = []
        for i, (prompt, p) in enumerate(zip(prompts, per)):
            try:
                req = self.requests.request(f"{tag}.{i}", prompt, p or SamplingParams(), chat=chat)
                why = self.scheduler.never_fits(len(req.seq.prompt_ids))
                if why:
                    raise InvalidRequestError(why)
            except InvalidRequestError as e:
                raise InvalidRequestError(f"prompt {i}: {e}" if len(prompts) > 1 else str(e)) from None
            reqs.append(req)
        with self._lock:
            for req in reqs:
                self._live[req.id] = req
                self._inbox.append(req)
        return [req.id for req in reqs]

    def stream(self, prompts: Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None, *,
               chat: bool = False) -> Iterator[tuple[int, RequestOutput]]:
        """Submit every prompt, then step until all are done, yielding (prompt index, output) as outputs come.
        Closing the iterator aborts the rest."""
        index = {rid: i for i, rid in enumerate(self.submit(prompts, params, chat=chat))}
        pending = set(index)
        try:
            while pending:
                for out in self.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield index[out.request_id], out
        finally:
            self.drain(pending)

    def drain(self, request_ids: Iterable[str]):
        """Abort these requests and step until the engine has let go of each (their outputs are dropped)."""
        pending = {rid for rid in request_ids if self.abort(rid)}
        while pending:
            for out in self.step():
                if out.finished:
                    pending.discard(out.request_id)

    def generate(self, prompts: Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None, *,
                 chat: bool = False) -> list[Completion]:
        """Run every prompt to completion with continuous batching; completions in prompt order."""
        done: dict[int, Completion] = {}
        for i, out in self.stream(prompts, params, chat=chat):
            if out.finished:
                if out.error:  # only if the pool shrank under it; never_fits is checked up front
                    raise InvalidRequestError(f"prompt {i}: {out.error}")
                done[i] = out.completion
        return [done[i] for i in range(len(done))]
