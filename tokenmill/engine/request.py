"""Requests: what every entry point (LLM.generate / stream, ChatSession, the CLI commands, LLMEngine.add_request)
turns a prompt into before the engine runs it, built in one place.

`RequestFactory` owns the prompt side: the chat template, encoding text / chat messages / token ids, validating a
request whole (token ids against the vocabulary, text that is valid Unicode, the sampler's token lists) and building
its Sequence (sampling state with DRY sequence breakers, stop strings, banned strings). `Request` is a Sequence as the
scheduler sees it: how many of its tokens are cached, when it arrived and ran, and its Completion once done.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.sequence import Completion, RequestMetrics, Sequence
from tokenmill.errors import InvalidRequestError
from tokenmill.sampling.params import SamplingParams
from tokenmill.sampling.sampler import SeqSamplingState, dry_breaker_ids

Prompt = str | list[int] | list[dict[str, Any]]  # text, token ids, or chat messages [{"role": ..., "content": ...}]


@dataclass(eq=False)
class Request:
    """One request in the engine: its Sequence (token ids, text, finish state) and how many tokens are cached."""

    id: str
    seq: Sequence
    arrival: float = field(default_factory=time.perf_counter)
    num_computed: int = 0  # leading tokens of token_ids whose k/v are in the cache
    cached_tokens: int = -1  # prompt tokens taken from the prefix cache at first admission (-1: not admitted yet)
    t_scheduled: float = 0.0  # first admission
    t_finished: float = 0.0
    preemptions: int = 0
    error: str | None = None  # why it could not run (finish reason "error")

    @property
    def token_ids(self) -> list[int]:
        return self.seq.prompt_ids + self.seq.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.seq.prompt_ids) + len(self.seq.output_ids)

    def next_tokens(self, n: int) -> list[int]:
        """The n tokens after the cached ones."""
        p, start = self.seq.prompt_ids, self.num_computed
        if start >= len(p):
            return self.seq.output_ids[start - len(p) : start - len(p) + n]
        return (p + self.seq.output_ids)[start : start + n] if start + n > len(p) else p[start : start + n]

    def completion(self) -> Completion:
        """The result so far (finish reason "aborted" while unfinished), with the request's timings."""
        seq = self.seq
        end = self.t_finished or time.perf_counter()
        first, last = seq.t_first or end, seq.t_last or end
        scheduled = self.t_scheduled or end
        cached, n_out = max(self.cached_tokens, 0), len(seq.output_ids)
        prefill = first - scheduled
        reason = "error" if self.error else seq.finish_reason or "aborted"
        metrics = RequestMetrics(
            queue_seconds=scheduled - self.arrival,
            ttft_seconds=first - self.arrival if seq.t_first else 0.0,
            prompt_tokens=len(seq.prompt_ids),
            cached_tokens=cached,
            prompt_seconds=max(0.0, prefill) if seq.t_first else 0.0,
            prompt_tps=(len(seq.prompt_ids) - cached) / prefill if seq.t_first and prefill > 0 else 0.0,
            generated_tokens=n_out,
            generation_seconds=max(0.0, last - first),
            generation_tps=(n_out - 1) / (last - first) if n_out > 1 and last > first else 0.0,
            latency_seconds=end - self.arrival,
            finish_reason=reason,
            preemptions=self.preemptions,
        )
        return seq.completion(reason, metrics, self.error)


class RequestFactory:
    """Prompts -> Requests for one model: its tokenizer, chat template and vocabulary.

    Args:
        tokenizer: the model's `Tokenizer`. vocab_size: the logits' width (token ids must be below it).
        device: where the sampler's per-request state lives. template: a built-in name or a .jinja file (None: the
            model's own).
    """

    def __init__(self, tokenizer, vocab_size: int, device, template: str | None = None):
        self.tokenizer, self.vocab_size, self.device = tokenizer, vocab_size, device
        self._template_name, self._template = template, None
        self._pieces: list[str] | None = None  # each token's text, for DRY's sequence breakers
        self._breakers: dict[tuple[str, ...], frozenset[int]] = {}

    @property
    def template(self):
        """The chat template: `template` given at construction, else the model's own."""
        if self._template is None:
            from tokenmill.formats.template import get_template

            tok = self.tokenizer
            bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None else ""
            eos = tok.id_to_token(min(tok.eos_ids)) if tok.eos_ids else ""
            self._template = get_template(self._template_name, tok.chat_template, bos, eos)
        return self._template

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kw) -> str:
        return self.template.render(messages, add_generation_prompt=add_generation_prompt, **kw)

    def encode(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        """Token ids for text, chat messages or token ids. `chat` (or a message list) renders the chat template."""
        if isinstance(prompt, list) and not prompt:
            raise InvalidRequestError("prompt is empty; give text, token ids or chat messages")
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            self._check_ids("prompt token ids", prompt)
            return list(prompt)
        if isinstance(prompt, list):
            odd = next((m for m in prompt if not isinstance(m, dict)), None)
            if odd is not None:
                raise InvalidRequestError("prompt must be a string, a list of token ids or a list of chat messages, "
                                          f"got a list holding {type(odd).__name__}")
            text, special = self.apply_chat_template(prompt), self.template.encode_special
        elif not isinstance(prompt, str):
            raise InvalidRequestError("prompt must be a string, a list of token ids or a list of chat messages, "
                                      f"got {type(prompt).__name__}")
        elif chat:
            text, special = self.apply_chat_template([{"role": "user", "content": prompt}]), self.template.encode_special
        else:
            text, special = prompt, True
        if not text:
            raise InvalidRequestError("prompt is empty; give at least one character of text")
        _check_text("prompt", text)
        # a rendered template already carries its BOS when the model wants one
        ids = self.tokenizer.encode(text, special=special, add_bos=False if isinstance(prompt, list) or chat else None)
        if not ids:
            raise InvalidRequestError("prompt encodes to no tokens; give at least one character of text")
        return ids

    def request(self, request_id: str, prompt: Prompt, params: SamplingParams, *, chat: bool = False) -> Request:
        """A Request checked whole: its prompt encoded and every token id and string in its parameters valid."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        self.check_params(params)
        ids = self.encode(prompt, chat=chat)
        breakers = self._dry_breakers(params) if params.dry_multiplier else frozenset()
        state = SeqSamplingState.new(params, ids, self.device, self.tokenizer.eos_ids, breakers)
        return Request(request_id, Sequence(ids, params, state, self.tokenizer, max_new_tokens=params.max_new_tokens))

    def check_params(self, params: SamplingParams) -> None:
        """Token ids below the vocabulary size, strings valid Unicode, and some token left to sample (raises
        InvalidRequestError)."""
        for name in ("logit_bias", "disallowed_tokens", "allowed_tokens", "stop_token_ids"):
            self._check_ids(f"{name} token ids", list(getattr(params, name) or ()))
        for name in ("stop", "banned_strings", "dry_sequence_breakers"):
            for s in getattr(params, name):
                _check_text(name, s)
        if params.allowed_tokens is not None:
            gone = set(params.disallowed_tokens) | {t for t, b in params.logit_bias.items() if b == float("-inf")}
            if not set(params.allowed_tokens) - gone:
                raise InvalidRequestError(
                    "the sampling constraints leave no token to sample: every allowed_tokens id is disallowed or has "
                    "a logit_bias of -inf; allow a token that is not excluded")

    def _check_ids(self, name: str, ids: list[int]) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"{name} must be in [0, {self.vocab_size}), got {bad}")

    def _dry_breakers(self, params: SamplingParams) -> frozenset[int]:
        key = tuple(params.dry_sequence_breakers)
        if key not in self._breakers:
            if self._pieces is None:
                self._pieces = [self.tokenizer.decode([i]) for i in range(self.vocab_size)]
            self._breakers[key] = dry_breaker_ids(key, self._pieces)
        return self._breakers[key]


def _check_text(name: str, text: str) -> None:
    # a lone surrogate (from a JSON "\ud800" escape or a decoding with surrogateescape) cannot be encoded as UTF-8
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(f"{name} is not valid Unicode: {text[e.start:e.end]!r} at character {e.start} "
                                  "(a lone surrogate); send UTF-8 text") from None
