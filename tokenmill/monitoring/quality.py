"""Quality checks: perplexity with llama.cpp's protocol, and golden greedy outputs.

llama.cpp `perplexity` protocol: tokenize the whole text once (BOS first only if the vocabulary adds one), cut it into
chunks of n_ctx tokens, run each chunk from an empty cache (its first token replaced by BOS when the vocabulary adds
one), and score only the second half: the logits at positions n_ctx/2 .. n_ctx-2 predict the tokens after them, so
every scored token has at least n_ctx/2 tokens of context. Perplexity = exp(mean negative log-likelihood).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmill.engine.scratch import ScratchCache
from tokenmill.errors import InvalidRequestError

DEFAULT_TEXT = "shared/data/wikitext-2-raw-test.txt"  # beside the repository: ../shared/data/...
GOLDEN_PROMPTS = [  # (chat?, text): chat-templated and raw; prose, code, a list, another language
    (True, "What is the capital of France?"),
    (True, "Give me three tips for staying focused while studying."),
    (False, "def fibonacci(n):\n    "),
    (False, "The history of the Roman Empire"),
    (False, "La capitale de l'Italie est"),
]


def default_text_path() -> Path | None:
    """../shared/data/wikitext-2-raw-test.txt next to the repository or the working directory, if present."""
    repo = Path(__file__).resolve().parents[1]
    for root in (repo.parent, Path.cwd().parent, Path.cwd()):
        p = root / DEFAULT_TEXT
        if p.is_file():
            return p
    return None


def tokenize_text(llm, path: str | Path | None) -> list[int]:
    """The whole text as llama.cpp tokenizes it: special-token parsing off, BOS first if the vocabulary adds one."""
    path = Path(path) if path else default_text_path()
    if path is None:
        raise InvalidRequestError(f"no text for perplexity: give --ppl-file (default ../{DEFAULT_TEXT} not found)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"cannot read {str(path)!r}: {getattr(e, 'strerror', None) or e}") from None
    if text.endswith("\n"):  # llama.cpp drops one trailing newline of a prompt file
        text = text[:-1]
    return llm.tokenizer.encode(text, special=False)


@dataclass
class Perplexity:
    ppl: float
    error: float  # standard error of ppl (from the per-token NLL spread, as llama.cpp prints it)
    chunks: int
    n_ctx: int
    tokens_scored: int
    chunk_nll: list[float]  # mean NLL of each chunk's scored half
    seconds: float

    def line(self) -> str:
        return (f"perplexity {self.ppl:.4f} +/- {self.error:.4f} over {self.chunks} chunks of {self.n_ctx} tokens "
                f"({self.tokens_scored} scored, {self.chunks * self.n_ctx / self.seconds:.0f} tok/s)")


def chunks_of(ids: list[int], n_ctx: int, n_chunks: int | None, bos_id: int | None) -> list[list[int]]:
    """llama.cpp's chunks: consecutive n_ctx-token slices, the first token of each set to BOS when the model adds it."""
    if n_ctx < 4 or n_ctx % 2:
        raise InvalidRequestError(f"perplexity context must be an even number >= 4, got {n_ctx}")
    n = len(ids) // n_ctx if n_chunks is None else min(n_chunks, len(ids) // n_ctx)
    if n < 1:
        raise InvalidRequestError(f"the text has {len(ids)} tokens, fewer than one chunk of {n_ctx}")
    out = [ids[i * n_ctx : (i + 1) * n_ctx] for i in range(n)]
    return [[bos_id] + c[1:] for c in out] if bos_id is not None else out


def nll_second_half(logits: torch.Tensor, chunk: list[int]) -> torch.Tensor:
    """NLL (n_ctx/2 - 1,) of the tokens after positions n_ctx/2 .. n_ctx-2, from a chunk's logits (n_ctx, V)."""
    first = len(chunk) // 2
    lp = torch.log_softmax(logits[first:-1].double(), dim=-1)  # fp64 sums over the vocabulary, as llama.cpp
    target = torch.tensor(chunk[first + 1 :], device=lp.device)[:, None]
    return -lp.gather(1, target)[:, 0].cpu()


def perplexity(llm, ids: list[int], n_ctx: int = 512, n_chunks: int | None = None, progress=None) -> Perplexity:
    """Perplexity of `llm` on token ids (llama.cpp's protocol, see the module docstring); `progress(i, n, ppl)` after
    each chunk."""
    tok = llm.tokenizer
    chunks = chunks_of(ids, n_ctx, n_chunks, tok.bos_id if tok.add_bos else None)
    cache = ScratchCache(llm.runner, 1, n_ctx)
    nll, per_chunk, t0 = [], [], time.perf_counter()
    for i, chunk in enumerate(chunks):
        cache.reset()
        x = nll_second_half(cache.score(0, chunk), chunk)
        nll.append(x)
        per_chunk.append(x.mean().item())
        if progress:
            progress(i + 1, len(chunks), math.exp(torch.cat(nll).mean().item()))
    all_nll = torch.cat(nll)
    mean = all_nll.mean().item()
    err = all_nll.std().item() / math.sqrt(len(all_nll)) if len(all_nll) > 1 else 0.0
    ppl = math.exp(mean)
    return Perplexity(ppl, ppl * err, len(chunks), n_ctx, len(all_nll), per_chunk, time.perf_counter() - t0)


def golden_outputs(llm, n_tokens: int = 32, prompts=GOLDEN_PROMPTS) -> dict:
    """Each prompt's greedy continuation of exactly n_tokens (EOS ignored), from an empty cache."""
    from tokenmill.sampling.params import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=n_tokens, ignore_eos=True)
    items = []
    for chat, text in prompts:
        llm.reset_cache()
        c = llm.generate(text, params, chat=chat)
        items.append({"prompt": text, "chat": chat, "ids": c.token_ids, "text": c.text})
    return {"n_tokens": n_tokens, "items": items}


def describe_diff(d, tokenizer=None) -> str:
    """'prompt 2 ('def fibonacci...'): first difference at token 17: 1234 'foo' -> 567 'bar'' for a GoldenDiff."""
    def tok(t):
        if t is None:
            return "(end)"
        return f"{t} {tokenizer.decode([t])!r}" if tokenizer is not None else str(t)

    clip = d.prompt if len(d.prompt) <= 30 else d.prompt[:27] + "..."
    return (f"prompt {d.index} ({clip!r}): first difference at token {d.position}: "
            f"{tok(d.base_token)} -> {tok(d.current_token)}")
