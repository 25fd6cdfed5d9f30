"""The public entry point: `tokenmill.load(...)` returns an `LLM` that generates, streams and applies chat templates."""
from __future__ import annotations

from typing import Any, Iterator, Sequence as Seq

import torch

from tokenmill.kernels.cpu import extension as cpu_extension
from tokenmill.errors import InvalidRequestError
from tokenmill.engine.generator import generate_steps
from tokenmill.engine.contiguous_cache import KVCache
from tokenmill.model.loader import LoadedModel, load_model
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.sampling.sampler import Sampler, SeqSamplingState, dry_breaker_ids
from tokenmill.sampling.params import SamplingParams
from tokenmill.engine.sequence import Completion, Sequence

Prompt = str | list[dict[str, Any]]  # plain text, or chat messages [{"role": ..., "content": ...}]


class TextStream:
    """Iterates over the text pieces of one generation; `.completion` holds the result once it is exhausted."""

    def __init__(self, steps: Iterator[tuple[int, str]], seq: Sequence, cache: KVCache):
        self._steps, self._seq, self._cache = steps, seq, cache
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        good = None  # cached tokens whose k/v a finished step wrote
        try:
            for _, text in self._steps:
                good = self._cache.length(self._seq.row)
                if text:
                    yield text
        finally:
            self._steps.close()
            # an exception (Ctrl-C) inside a forward leaves its tokens recorded with partial k/v: drop them
            row = self._seq.row
            keep = self._seq.cached_tokens if good is None else good
            self._cache.truncate(row, min(keep, self._cache.length(row)))
            self.completion = self._seq.completion()


class LLM:
    def __init__(self, loaded: LoadedModel, *, threads: int | None = None, template: str | None = None,
                 int4: bool = False, compile: bool = False, kv_dtype: torch.dtype | None = None):
        self.loaded = loaded
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.runner = ModelRunner(loaded, threads=threads, int4=int4, compile=compile, kv_dtype=kv_dtype)
        self.sampler = Sampler(self.config.vocab_size)
        if self.runner.device.type == "cpu":  # build our C++ kernels at load (once per machine), not inside a request
            for source in ("attention", "sampler"):
                cpu_extension.ops(source)
        self._template_name = template
        self._template = None
        self._cache: KVCache | None = None
        self._pieces: list[str] | None = None  # each token's text, for DRY's sequence breakers
        self._breakers: dict[tuple[str, ...], frozenset[int]] = {}

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def template(self):
        """The chat template: `template` given to load(), else the model's own."""
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
        """Token ids for a prompt. `chat` (or a message list) renders the chat template first."""
        if isinstance(prompt, list):
            text, special = self.apply_chat_template(prompt), self.template.encode_special
        elif chat:
            text, special = self.apply_chat_template([{"role": "user", "content": prompt}]), self.template.encode_special
        else:
            text, special = prompt, True
        if not isinstance(text, str) or not text:
            raise InvalidRequestError("prompt is empty; give at least one character of text")
        # a rendered template already carries its BOS when the model wants one
        add_bos = False if (chat or isinstance(prompt, list)) else None
        ids = self.tokenizer.encode(text, special=special, add_bos=add_bos)
        if not ids:
            raise InvalidRequestError("prompt encodes to no tokens; give at least one character of text")
        return ids

    def _params(self, sampling: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
        if not overrides:
            return sampling or SamplingParams()
        return SamplingParams.from_dict({**(sampling or SamplingParams()).to_dict(), **overrides})

    def _dry_breakers(self, params: SamplingParams) -> frozenset[int]:
        if params.dry_multiplier == 0:
            return frozenset()
        key = tuple(params.dry_sequence_breakers)
        if key not in self._breakers:
            if self._pieces is None:
                self._pieces = [self.tokenizer.decode([i]) for i in range(self.config.vocab_size)]
            self._breakers[key] = dry_breaker_ids(key, self._pieces)
        return self._breakers[key]

    def _sequences(self, prompts: Seq[Prompt], params: list[SamplingParams], chat: bool) -> list[Sequence]:
        seqs = []
        for row, (prompt, params) in enumerate(zip(prompts, params, strict=True)):
            ids = self.encode(prompt, chat=chat)
            room = self.context_length - len(ids)
            if room <= 0:
                raise InvalidRequestError(
                    f"prompt {row} has {len(ids)} tokens; the model's context is {self.context_length} tokens"
                )
            state = SeqSamplingState.new(params, ids, self.runner.device, self.tokenizer.eos_ids, self._dry_breakers(params))
            seqs.append(Sequence(ids, params, state, self.tokenizer, row=row, max_new_tokens=min(params.max_new_tokens, room)))
        # one cache, kept between calls: a prompt that starts like the previous one in its row reuses that prefix
        need = max(len(s.prompt_ids) + s.max_new_tokens for s in seqs)
        if self._cache is None:
            self._cache = self.runner.new_cache(len(seqs), need)
        self._cache.ensure(len(seqs), need)
        return seqs

    def stream(self, prompt: Prompt, sampling: SamplingParams | None = None, *, chat: bool = False, **overrides) -> TextStream:
        """Generate for one prompt, yielding text as it becomes final. Keyword overrides are SamplingParams fields."""
        seqs = self._sequences([prompt], [self._params(sampling, overrides)], chat)
        return TextStream(generate_steps(self.runner, self.sampler, self._cache, seqs), seqs[0], self._cache)

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        chat: bool = False,
        **overrides,
    ) -> Completion | list[Completion]:
        """Generate for one prompt (-> Completion) or a list of prompts run as one batch (-> list of Completion).
        `sampling` is one SamplingParams for all prompts or one per prompt; keyword overrides apply to all."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise InvalidRequestError("no prompts given; pass a string or a non-empty list of strings")
        per_prompt = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(batch)
        if len(per_prompt) != len(batch):
            raise InvalidRequestError(f"got {len(per_prompt)} SamplingParams for {len(batch)} prompts; give one or one per prompt")
        seqs = self._sequences(batch, [self._params(p, overrides) for p in per_prompt], chat)
        for _ in generate_steps(self.runner, self.sampler, self._cache, seqs):
            pass
        out = [s.completion() for s in seqs]
        return out[0] if single else out

    def reset_cache(self):
        """Forget every cached prefix (the next prompt is computed from scratch)."""
        if self._cache is not None:
            self._cache.reset()

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits (T, V) fp32 at every position of `ids`, computed from scratch."""
        cache = self.runner.new_cache(1, len(ids))
        return self.runner.score(cache, 0, ids)


def load(model: str | None = None, *, device: str = "cpu", dtype: torch.dtype | str | None = None,
         threads: int | None = None, template: str | None = None, int4: bool = False, compile: bool = False,
         kv_dtype: torch.dtype | str | None = None) -> LLM:
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
    """
    if isinstance(kv_dtype, str):
        kv_dtype = parse_kv_dtype(kv_dtype)
    if kv_dtype is not None and device != "cpu":
        raise InvalidRequestError(f"kv_dtype applies to the CPU only (the GPU's cache keeps the model's dtype), "
                                  f"got device={device!r}")
    dtype = compute_dtype(dtype, device)  # checked before anything touches the device
    return LLM(load_model(model, dtype=dtype, device=device), threads=threads, template=template, int4=int4,
               compile=compile, kv_dtype=kv_dtype)


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
