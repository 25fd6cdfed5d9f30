"""The engine: continuous batching over a paged KV cache, built from a loaded `LLM`.

    engine = LLMEngine(llm, max_num_seqs=32)
    rid = engine.add_request("Hello", SamplingParams(max_new_tokens=32))
    while engine.has_unfinished():
        for out in engine.step(): ...

Each step: the scheduler picks who runs and how many tokens (scheduler.py), the runner runs them as one packed forward
over the paged cache (runner.forward_packed), and the post-processing samples, appends to each Sequence (EOS, stops,
banned-string rewinds) and frees finished requests. add_request and abort may be called from other threads while one
thread steps; they only touch an inbox under a lock.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from tokenmill.engine.block_manager import BlockManager
from tokenmill.errors import InvalidRequestError
from tokenmill.engine.kv_cache import PagedKVCache, default_kv_memory, parse_memory
from tokenmill.sampling.sampler import Sampler, SeqSamplingState
from tokenmill.sampling.params import SamplingParams
from tokenmill.engine.scheduler import Batch, Request, Scheduler
from tokenmill.engine.sequence import Completion, Sequence

Prompt = str | list[int] | list[dict[str, Any]]  # text, token ids, or chat messages


def _caught_up(batch: Batch) -> list[int]:
    """Indices of the batch's requests whose every token is computed after this step: they sample the next one."""
    return [i for i, (req, n) in enumerate(batch.items) if req.num_computed + n == req.num_tokens]


@dataclass
class RequestMetrics:
    queue_seconds: float  # arrival -> first scheduled
    ttft_seconds: float  # arrival -> first token
    prompt_tokens: int
    cached_tokens: int  # prompt tokens reused from the prefix cache
    prompt_tps: float  # computed prompt tokens / (first token - first scheduled)
    generated_tokens: int
    generation_tps: float  # tokens after the first / (last token - first token)
    latency_seconds: float  # arrival -> finished
    finish_reason: str
    preemptions: int

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    text: str  # text released by this step
    finished: bool
    finish_reason: str | None = None  # as Completion.finish_reason, or "error"
    completion: Completion | None = None  # once finished (not on error)
    metrics: RequestMetrics | None = None  # once finished
    error: str | None = None  # why the request could not run


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


class LLMEngine:
    def __init__(self, llm, *, kv_cache_memory: int | str | None = None, block_size: int = 16, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, prefix_caching: bool = True):
        """Args:
            llm: a loaded `tokenmill.LLM` (its model, tokenizer and chat template are shared).
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
        self.llm, self.runner, self.tokenizer = llm, llm.runner, llm.tokenizer
        cfg = llm.config
        if kv_cache_memory is None:
            memory = default_kv_memory(self.runner.device)
        else:
            memory = parse_memory(kv_cache_memory) if isinstance(kv_cache_memory, str) else int(kv_cache_memory)
        per_block = PagedKVCache.bytes_per_block(cfg, block_size, self.runner.kv_dtype or self.runner.dtype)
        useful = max_num_seqs * -(-llm.context_length // block_size)  # every request at full context
        num_blocks = min(memory // per_block, useful)
        if num_blocks < 1:
            raise InvalidRequestError(
                f"KV cache memory must hold at least one block of {per_block} bytes, got {memory}")
        self.cache = self.runner.new_paged_cache(num_blocks, block_size)
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens, max_model_len=llm.context_length)
        self.sampler = Sampler(cfg.vocab_size)
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
        if isinstance(prompt, list) and not prompt:
            raise InvalidRequestError("prompt is empty; give text, token ids or chat messages")
        vocab = self.llm.config.vocab_size
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"prompt token ids must be in [0, {vocab}), got {bad[0]}")
            return list(prompt)
        if not isinstance(prompt, str):
            odd = [m for m in prompt if not isinstance(m, dict)] if isinstance(prompt, list) else [prompt]
            if odd:
                raise InvalidRequestError("prompt must be a string, a list of token ids or a list of chat messages, "
                                          f"got {type(odd[0]).__name__}")
        return self.llm.encode(prompt, chat=chat)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None, *,
                    chat: bool = False) -> str:
        """Queue a request; returns its id. A prompt that can never run (longer than the context or the KV cache)
        comes back from `step` as a finished output with `error` set."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids = self.encode(prompt, chat=chat)
        state = SeqSamplingState.new(params, ids, self.runner.device, self.tokenizer.eos_ids)
        seq = Sequence(ids, params, state, self.tokenizer, max_new_tokens=params.max_new_tokens)
        with self._lock:
            rid = str(next(self._ids)) if request_id is None else str(request_id)
            if rid in self._live:
                raise InvalidRequestError(f"request id {rid!r} is already in flight")
            req = self._live[rid] = Request(rid, seq)
            self._inbox.append(req)
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request; its final output (finish reason "aborted") comes from the next step. False if unknown."""
        with self._lock:
            if request_id not in self._live:
                return False
            self._aborts.append(request_id)
            return True

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live)

    # -- the step (one thread) --
    def step(self) -> list[RequestOutput]:
        """Run one forward over the scheduled requests; returns an output for each request that sampled a token,
        finished, failed or was aborted."""
        aborted = self._take_submissions()
        batch = self.scheduler.schedule()
        logits = self._run(batch)
        return aborted + self._postprocess(batch, logits)

    def _take_submissions(self) -> list[RequestOutput]:
        with self._lock:
            new, aborts, self._inbox, self._aborts = self._inbox, self._aborts, [], []
            reqs = [self._live[rid] for rid in dict.fromkeys(aborts) if rid in self._live]
        for req in new:
            self.scheduler.add(req)
        outs = []
        for req in reqs:
            if req.error:
                continue  # reported as failed by this step
            self.scheduler.finish(req)
            outs.append(self._final(req))
        return outs

    def _run(self, batch: Batch):
        if not batch.items:
            return None
        # decodes first, shortest first, so the cache view can group them by length; then prefill chunks
        batch.items.sort(key=lambda item: (item[1] != 1, item[0].num_computed if item[1] == 1 else 0))
        return self.runner.forward_packed(
            self.cache,
            [req.next_tokens(n) for req, n in batch.items],
            [req.num_computed for req, _ in batch.items],
            [self.blocks.table(req.id) for req, _ in batch.items],
            _caught_up(batch),
        )

    def _postprocess(self, batch: Batch, logits) -> list[RequestOutput]:
        outs = [self._final(req) for req in batch.failed]
        reqs = [batch.items[i][0] for i in _caught_up(batch)]  # the rows of logits
        bs = self.blocks.block_size
        for req, n in batch.items:
            req.num_computed += n
            if req.num_computed // bs != (req.num_computed - n) // bs:  # a block filled up: cache it
                self.blocks.commit(req.id, req.token_ids, req.num_computed)
        if not reqs:
            return outs
        sampled = self.sampler(logits, [r.seq.state for r in reqs])
        tokens = sampled.tokens.tolist()
        lps = sampled.logprobs.tolist() if sampled.logprobs is not None else [None] * len(reqs)
        for req, token, lp in zip(reqs, tokens, lps):
            seq = req.seq
            if not seq.output_ids:
                seq.t_start, seq.cached_tokens = req.t_scheduled, req.cached_tokens
            text = seq.append(token, lp if seq.params.logprobs else None)
            if seq.rewound:  # a banned string took tokens back: so does the cache
                req.num_computed = self.blocks.truncate(req.id, min(req.num_computed, seq.cache_length))
            if seq.finished:
                self.scheduler.finish(req)
                outs.append(self._final(req, text))
            else:
                outs.append(RequestOutput(req.id, text, False))
        return outs

    def _final(self, req: Request, text: str = "") -> RequestOutput:
        with self._lock:
            self._live.pop(req.id, None)
        req.t_finished = req.t_finished or time.perf_counter()
        seq = req.seq
        if req.error:
            return RequestOutput(req.id, "", True, "error", metrics=self._metrics(req, "error"), error=req.error)
        c = seq.completion()
        return RequestOutput(req.id, text, True, c.finish_reason, c, self._metrics(req, c.finish_reason))

    @staticmethod
    def _metrics(req: Request, reason: str) -> RequestMetrics:
        seq, n_out = req.seq, len(req.seq.output_ids)
        first, last = seq.t_first or req.t_finished, seq.t_last or req.t_finished
        scheduled = req.t_scheduled or req.t_finished
        cached = max(req.cached_tokens, 0)
        prefill = first - scheduled
        return RequestMetrics(
            queue_seconds=scheduled - req.arrival,
            ttft_seconds=first - req.arrival if seq.t_first else 0.0,
            prompt_tokens=len(seq.prompt_ids),
            cached_tokens=cached,
            prompt_tps=(len(seq.prompt_ids) - cached) / prefill if seq.t_first and prefill > 0 else 0.0,
            generated_tokens=n_out,
            generation_tps=(n_out - 1) / (last - first) if n_out > 1 and last > first else 0.0,
            latency_seconds=req.t_finished - req.arrival,
            finish_reason=reason,
            preemptions=req.preemptions,
        )

    def stats(self) -> EngineStats:
        s, b = self.scheduler, self.blocks
        total = s.prompt_tokens_cached + s.prompt_tokens_computed
        return EngineStats(len(s.running), len(s.waiting), b.num_used, b.num_free, b.num_blocks, b.block_size,
                           s.prompt_tokens_cached / total if total else 0.0, s.prompt_tokens_cached,
                           s.prompt_tokens_computed, s.num_preemptions)

    def reset_prefix_cache(self):
        """Forget cached prefixes nobody is using (benchmarks: each run starts cold)."""
        self.blocks.reset_prefix_cache()

    # -- blocking and streaming helpers (they step the engine themselves) --
    def stream(self, prompts: Iterable[Prompt], params: SamplingParams | None = None, *, chat: bool = False
               ) -> Iterator[tuple[int, RequestOutput]]:
        """Submit every prompt, then step until all are done, yielding (prompt index, output) as outputs come.
        Prompts that can never run raise InvalidRequestError before any work; closing the iterator aborts the rest."""
        prompts = list(prompts)
        if not prompts:
            raise InvalidRequestError("no prompts given; pass a non-empty list of prompts")
        encoded = [self.encode(p, chat=chat) for p in prompts]
        for i, ids in enumerate(encoded):
            why = self.scheduler.never_fits(len(ids))
            if why:
                raise InvalidRequestError(f"prompt {i}: {why}")
        tag = next(self._ids)
        index = {self.add_request(ids, params, request_id=f"{tag}.{i}"): i for i, ids in enumerate(encoded)}
        pending = set(index)
        try:
            while pending:
                for out in self.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield index[out.request_id], out
        finally:
            for rid in pending:
                self.abort(rid)
            while pending and self.has_unfinished() and any(rid in self._live for rid in pending):
                self.step()

    def generate(self, prompts: Iterable[Prompt], params: SamplingParams | None = None, *, chat: bool = False
                 ) -> list[Completion]:
        """Run every prompt to completion with continuous batching; completions in prompt order."""
        done: dict[int, Completion] = {}
        for i, out in self.stream(prompts, params, chat=chat):
            if out.finished:
                if out.error:  # only if the pool shrank under it; never_fits is checked up front
                    raise InvalidRequestError(f"prompt {i}: {out.error}")
                done[i] = out.completion
        return [done[i] for i in range(len(done))]
