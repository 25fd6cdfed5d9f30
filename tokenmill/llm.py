"""The public entry point: `tokenmill.load(...)` returns an `LLM` that generates, streams and applies chat templates.

An LLM is a model runner, a request factory and one `LLMEngine` of its own: `generate` and `stream` submit requests to
that engine and step it until theirs are done, so a single prompt, a list of prompts and a chat turn take the same path
as `tokenmill batch` (continuous batching, the paged KV cache and its prefix cache: a prompt that starts like an
earlier one reuses the cached blocks of that prefix).
"""
from __future__ import annotations

import os
from collections import deque
from typing import Any, Iterator, Sequence as Seq

import torch

from tokenmill.engine.llm_engine import LLMEngine, RequestOutput
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.request import Prompt, RequestFactory
from tokenmill.engine.sequence import Completion
from tokenmill.errors import InvalidRequestError
from tokenmill.model.loader import LoadedModel, load_model
from tokenmill.sampling.params import SamplingParams


class TextStream:
    """Iterates over the text pieces of one generation; `.completion` holds the result once it is exhausted or
    closed (a generation stopped early ends with finish reason "aborted" and the text so far; one that could not go on
    with "error" and its `error`)."""

    def __init__(self, llm: LLM, request_id: str):
        self._llm, self._id = llm, request_id
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            while self.completion is None:
                out = self._llm._next_output(self._id)
                if out.finished:
                    self.completion = out.completion
                if out.text:
                    yield out.text
        finally:
            if self.completion is None:  # closed early (break, Ctrl-C): stop the request, keep what it made
                self.completion = self._llm._cancel(self._id)


class LLM:
    """A loaded model ready to generate. Args: see `tokenmill.load`."""

    def __init__(self, loaded: LoadedModel, *, threads: int | None = None, template: str | None = None,
                 int4: bool = False, compile: bool = False, kv_dtype: torch.dtype | None = None,
                 kernels: str = "auto", pdl: bool = True, kv_cache_memory: int | str | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int | None = None):
        self.loaded = loaded
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.runner = ModelRunner(loaded, threads=threads, int4=int4, compile=compile, kv_dtype=kv_dtype,
                                  kernels=kernels, pdl=pdl)
        self.requests = RequestFactory(self.tokenizer, self.config.vocab_size, self.runner.device, template)
        self._engine_args = dict(kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs,
                                 max_num_batched_tokens=max_num_batched_tokens or max(self.runner.prefill_chunk,
                                                                                      max_num_seqs))
        self._engine: LLMEngine | None = None
        self._outputs: dict[str, deque[RequestOutput]] = {}  # this LLM's requests in flight -> outputs not yet read

    @property
    def engine(self) -> LLMEngine:
        """The engine `generate` and `stream` run on (made on first use: its KV cache takes memory)."""
        if self._engine is None:
            self._engine = LLMEngine(self, **self._engine_args)
        return self._engine

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def template(self):
        """The chat template: `template` given to load(), else the model's own."""
        return self.requests.template

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kw) -> str:
        return self.requests.apply_chat_template(messages, add_generation_prompt, **kw)

    def encode(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        """Token ids for a prompt: text, chat messages or token ids. `chat` renders text as a user turn first."""
        return self.requests.encode(prompt, chat=chat)

    def stream(self, prompt: Prompt, sampling: SamplingParams | None = None, *, chat: bool = False,
               **overrides) -> TextStream:
        """Generate for one prompt, yielding text as it becomes final. Keyword overrides are SamplingParams fields."""
        return TextStream(self, self._submit([prompt], _params(sampling, overrides), chat)[0])

    def generate(self, prompts: Prompt | Seq[Prompt], sampling: SamplingParams | Seq[SamplingParams] | None = None, *,
                 chat: bool = False, **overrides) -> Completion | list[Completion]:
        """Generate for one prompt (-> Completion) or a list of prompts run together (-> list of Completion, in
        order). `sampling` is one SamplingParams for all prompts or one per prompt; keyword overrides apply to all."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and bool(prompts)
                                              and not isinstance(prompts[0], (str, list)))
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise InvalidRequestError("no prompts given; pass a string or a non-empty list of strings")
        params = ([_params(p, overrides) for p in sampling] if isinstance(sampling, (list, tuple))
                  else _params(sampling, overrides))
        streams = [TextStream(self, rid) for rid in self._submit(batch, params, chat)]
        try:
            for s in streams:
                for _ in s:
                    pass
        finally:
            for s in streams:
                if s.completion is None:
                    s.completion = self._cancel(s._id)
        out = [s.completion for s in streams]
        return out[0] if single else out

    def reset_cache(self):
        """Forget every cached prefix (the next prompt is computed from scratch)."""
        if self._engine is not None:
            self._engine.reset_prefix_cache()

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits (T, V) fp32 at every position of `ids`, computed from scratch."""
        return self.runner.score(ids)

    # -- this LLM's requests on its engine --
    def _submit(self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams], chat: bool) -> list[str]:
        ids = self.engine.submit(prompts, params, chat=chat)
        for rid in ids:
            self._outputs[rid] = deque()
        return ids

    def _next_output(self, rid: str) -> RequestOutput:
        """The request's next output, stepping the engine until there is one (outputs of this LLM's other requests
        are kept for their streams)."""
        queue = self._outputs[rid]
        while not queue:
            for out in self.engine.step():
                if out.request_id in self._outputs:
                    self._outputs[out.request_id].append(out)
        out = queue.popleft()
        if out.finished:
            del self._outputs[rid]
        return out

    def _cancel(self, rid: str) -> Completion:
        """Abort a request and return its Completion (finish reason "aborted", unless it had just finished)."""
        if rid not in self._outputs:
            raise KeyError(rid)
        self.engine.abort(rid)
        while True:
            out = self._next_output(rid)
            if out.finished:
                return out.completion


def _params(sampling: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
    if not overrides:
        return sampling or SamplingParams()
    return SamplingParams.from_dict({**(sampling or SamplingParams()).to_dict(), **overrides})


def load(model: str | None = None, *, device: str = "cpu", dtype: torch.dtype | str | None = None,
         threads: int | None = None, template: str | None = None, int4: bool = False, compile: bool = False,
         kv_dtype: torch.dtype | str | None = None, kernels: str | None = None, pdl: bool | None = None,
         kv_cache_memory: int | str | None = None, max_num_seqs: int = 64,
         max_num_batched_tokens: int | None = None) -> LLM:
    """Load a model: a .gguf file, a Hugging Face folder, or an alias (`smollm2`, the default).

    Args:
        dtype: the activations' (and dense weights') dtype, a torch.dtype or its name. Default: float32 on the CPU,
            bfloat16 on CUDA. CUDA takes float32 or bfloat16; float32 there keeps GGUF 4/8-bit weights quantized as
            bfloat16 does and gives the CPU's greedy tokens (bfloat16 may flip near-ties).
        int4: the fast CPU path: GGUF Q4_0/Q4_1/Q8_0 weights times int8-rounded activations (AVX-512 VNNI; Q4_K
            through torch's int4 kernel) and a float16 KV cache: about 1.2-1.6x faster than the default, not
            bit-exact (logits within ~2.5-3.5% of their range). Default: exact (fp32 activations, weights decoded in
            registers; logits match transformers to ~1e-6 of their range).
        compile: torch.compile the CPU layer code around attention and the head: exact; pays little since the
            block kernels landed. The first steps compile (seconds, then cached on disk).
        kv_dtype: KV cache storage on the CPU: "float32" (default; exact), "float16" (default with `int4`: half the
            bytes decode attention reads) or "bfloat16".
        kernels: "auto" (default: our C++ CPU kernels where this CPU and compiler can build them) or "torch" (the
            PyTorch reference paths). Default from $TOKENMILL_KERNELS when set.
        pdl: CUDA decode kernels launch with programmatic dependent launch on Hopper and later (default True;
            $TOKENMILL_PDL=0 sets the default to False).
        kv_cache_memory, max_num_seqs, max_num_batched_tokens: the engine of `generate` / `stream` (see LLMEngine;
            default token budget a step: 2048 on the CPU, 8192 on CUDA).
    """
    kernels = kernels or os.environ.get("TOKENMILL_KERNELS", "auto")
    pdl = os.environ.get("TOKENMILL_PDL", "1") != "0" if pdl is None else pdl
    if isinstance(kv_dtype, str):
        kv_dtype = parse_kv_dtype(kv_dtype)
    if kv_dtype is not None and device != "cpu":
        raise InvalidRequestError(f"kv_dtype applies to the CPU only (the GPU's cache keeps the model's dtype), "
                                  f"got device={device!r}")
    dtype = compute_dtype(dtype, device)  # checked before anything touches the device
    return LLM(load_model(model, dtype=dtype, device=device), threads=threads, template=template, int4=int4,
               compile=compile, kv_dtype=kv_dtype, kernels=kernels, pdl=pdl, kv_cache_memory=kv_cache_memory,
               max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # dtype and kv_dtype by name


def parse_kv_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InvalidRequestError(f"kv_dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def compute_dtype(dtype: torch.dtype | str | None, device: str | torch.device) -> torch.dtype:
    """`load`'s dtype: a torch.dtype, its name, or None (float32 on the CPU, bfloat16 on CUDA) -> a torch.dtype. CUDA
    takes float32 or bfloat16 only (its kernels' two activation types); on the CPU a torch.dtype passes as given."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    cuda = torch.device(device).type == "cuda"
    if dtype is None:
        return torch.bfloat16 if cuda else torch.float32
    if cuda and dtype not in (torch.float32, torch.bfloat16):
        raise InvalidRequestError(f"dtype on CUDA must be float32 or bfloat16, got {str(dtype).removeprefix('torch.')}")
    return dtype
