"""One generation in flight: its tokens, sampling state, text stream state (detokenizer, stop strings, banned strings)
and finish reason; and the Completion it becomes, with its RequestMetrics."""
from __future__ import annotations

import time
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

from tokenmill.sampling.sampler import SeqSamplingState
from tokenmill.sampling.params import SamplingParams
from tokenmill.engine.stops import StopMatcher, find_banned
from tokenmill.formats.tokenizer import StreamDecoder, Tokenizer

MAX_REWINDS_PER_POSITION = 32


@dataclass
class RequestMetrics:
    """One request's timings, from its arrival in the engine (computed once, by Request.completion)."""

    queue_seconds: float  # arrival -> first scheduled
    ttft_seconds: float  # arrival -> first token
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose k/v came from the prefix cache
    prompt_seconds: float  # first scheduled -> first token (prefill, and any wait between its chunks)
    prompt_tps: float  # computed prompt tokens / prompt_seconds
    generated_tokens: int
    generation_seconds: float  # first token -> last
    generation_tps: float  # tokens after the first / generation_seconds (the first comes out of prefill)
    latency_seconds: float  # arrival -> finished
    finish_reason: str
    preemptions: int

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()
                if k not in ("prompt_seconds", "generation_seconds")}


@dataclass
class Completion:
    """The result of one generation."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "stop_string" | "length" | "banned_rewind_limit" | "aborted" | "error"
    stop: str | int | None  # the stop string or token id that ended it
    metrics: RequestMetrics
    logprobs: list[float] | None = None
    error: str | None = None  # why it failed (finish reason "error")

    @property
    def prompt_tokens(self) -> int:
        return self.metrics.prompt_tokens

    @property
    def cached_tokens(self) -> int:
        return self.metrics.cached_tokens

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_seconds(self) -> float:
        return self.metrics.prompt_seconds

    @property
    def generation_seconds(self) -> float:
        return self.metrics.generation_seconds

    @property
    def prompt_tps(self) -> float:
        return self.metrics.prompt_tps

    @property
    def generation_tps(self) -> float:
        return self.metrics.generation_tps

    def stats_line(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tok ({self.cached_tokens} cached) {self.prompt_tps:.1f} tok/s | "
            f"generated {self.generated_tokens} tok {self.generation_tps:.1f} tok/s | finish {self.finish_reason}"
        )


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    state: SeqSamplingState
    tokenizer: Tokenizer
    max_new_tokens: int = 0
    finish_reason: str | None = None
    stop: str | int | None = None
    text: str = ""  # text released to the caller
    logprobs: list[float] = field(default_factory=list)
    t_first: float = 0.0
    t_last: float = 0.0
    rewound: bool = False  # set by append(): the caller must truncate the KV cache to cache_length

    def __post_init__(self):
        self.decoder = StreamDecoder(self.tokenizer)
        self.stops = StopMatcher(list(self.params.stop))
        self.banned = list(self.params.banned_strings)
        # banned-string filter state: decoded text of the output tokens, each token's end offset in it, and how much of
        # it has been passed on (only ever up to a token boundary, so a rewind never takes back released text)
        self._decoded = ""
        self._ends: list[int] = []
        self._passed = 0
        self._bans: dict[int, set[int]] = {}  # output position -> tokens banned there after rewinds

    @property
    def output_ids(self) -> list[int]:
        return self.state.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cache_length(self) -> int:
        """Tokens whose k/v the cache must hold before the next decode step (all but the last token)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    def end(self, reason: str, stop: str | int | None = None):
        if self.finish_reason is None:
            self.finish_reason, self.stop = reason, stop

    def append(self, token: int, logprob: float | None = None) -> str:
        """Record a sampled token; return the text it releases. Stop strings are held back and cut; a banned string
        rewinds the sequence (see `rewound`), releasing nothing."""
        now = time.perf_counter()
        self.t_first = self.t_first or now
        self.t_last = now
        self.rewound = False
        self.state.banned_now = set()  # a rewind's ban holds for one draw
        self.output_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        p = self.params
        piece = ""
        if token in p.stop_token_ids:
            self.end("stop", token)
        elif token in self.state.eos_ids and not p.ignore_eos:
            self.end("eos", token)
        else:
            piece = self.decoder.push(token)
            if len(self.output_ids) >= self.max_new_tokens:
                self.end("length")
        if self.finished:
            piece += self.decoder.flush()
        self._decoded += piece
        self._ends.append(len(self._decoded))
        if self.banned and self._check_banned():
            return ""
        released, matched = self.stops.feed(self._pass_on())
        if matched is not None:
            self.finish_reason, self.stop = "stop_string", matched
        elif self.finished:
            released += self.stops.flush()
        self.text += released
        return released

    def _pass_on(self) -> str:
        # text past the banned-string filter: all of it when finished, else up to the token where a possible
        # banned-string prefix begins
        cut = len(self._decoded)
        if self.banned and not self.finished:
            tail = self._decoded[self._passed :]
            hold = max((k for b in self.banned for k in range(1, len(b)) if tail.endswith(b[:k])), default=0)
            if hold:
                i = bisect_right(self._ends, cut - hold)
                cut = self._ends[i - 1] if i else 0
        out, self._passed = self._decoded[self._passed : cut], max(self._passed, cut)
        return out

    def _check_banned(self) -> bool:
        """Rewind to the token where the earliest banned string starts, banning that token there. True if rewound."""
        found = find_banned(self._decoded[self._passed :], self.banned)
        if found is None:
            return False
        offset = self._passed + found[0]
        pos = bisect_right(self._ends, offset)  # the output token whose text contains the banned string's start
        self._bans = {k: v for k, v in self._bans.items() if k <= pos}
        banned_here = self._bans.setdefault(pos, set())
        banned_here.add(self.output_ids[pos])
        self.finish_reason = self.stop = None
        if len(banned_here) > MAX_REWINDS_PER_POSITION:
            self.finish_reason, self.stop = "banned_rewind_limit", found[1]
        del self.output_ids[pos:]
        del self.logprobs[pos:]
        self.decoder = StreamDecoder(self.tokenizer)
        self._decoded = ""
        self._ends = []
        for t in self.output_ids:
            self._decoded += self.decoder.push(t)
            self._ends.append(len(self._decoded))
        self.state.banned_now = set(banned_here)
        self.rewound = True
        if self.finished:  # out of retries: release what was kept
            self.text += self.stops.feed(self._pass_on())[0] + self.stops.flush()
        return True

    def completion(self, finish_reason: str, metrics: RequestMetrics, error: str | None = None) -> Completion:
        ids = self.output_ids
        if finish_reason in ("eos", "stop") and ids:
            ids = ids[:-1]  # the stop token itself is not part of the answer
        return Completion(self.text, list(ids), finish_reason, self.stop, metrics, self.logprobs or None, error)
