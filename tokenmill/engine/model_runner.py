"""The model runner: owns the weights' device and dtype, the KV cache tensors, CUDA graphs and the forward call. It never
decides who runs (the scheduler does) and never samples (the sampler does).

Construction picks every implementation once: on the CPU the model is prepared by model/cpu.py (our C++ kernels
unless `kernels="torch"`), on CUDA by model/gpu.py (Triton kernels; programmatic dependent launch unless `pdl=False`),
and caches made by `new_kv_cache` carry the same choices (C++ or SDPA decode attention; CUDA graphs of the decode step).
"""
from __future__ import annotations

import time
import weakref

import torch

from tokenmill.engine.kv_cache import PagedKVCache
from tokenmill.errors import InvalidRequestError
from tokenmill.kernels.cpu import extension
from tokenmill.model.loader import LoadedModel

KERNELS = ("auto", "torch")


class ModelRunner:
    """Args:
        loaded: the model (prepared in place for its device).
        threads: CPU threads for torch. int4, compile: CPU paths (see tokenmill.load).
        kv_dtype: KV cache storage (default: the compute dtype; float16 with int4 on the CPU).
        kernels: "auto" (our C++ CPU kernels where they build) or "torch" (PyTorch everywhere on the CPU: the
            reference paths). pdl: CUDA decode kernels launch with programmatic dependent launch (Hopper and later).
    """

    def __init__(self, loaded: LoadedModel, *, threads: int | None = None, int4: bool = False, compile: bool = False,
                 kv_dtype: torch.dtype | None = None, kernels: str = "auto", pdl: bool = True):
        if kernels not in KERNELS:
            raise InvalidRequestError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
        self.model, self.config = loaded.model, loaded.config
        embed = self.model.model.embed_tokens.weight  # the lm_head may already be a block kernel (a second runner)
        self.device, self.dtype = embed.device, embed.dtype
        self.kernels = kernels
        if threads is not None:
            torch.set_num_threads(threads)
        # KV cache storage. On the CPU, float16 halves the bytes decode attention reads (the kernel widens to fp32;
        # default model: logits within 1.4e-2 of transformers', greedy tokens identical): the default with `int4`
        # (already inexact), while the default path keeps the compute dtype and stays exact
        if kv_dtype is None and int4 and self.device.type == "cpu":
            kv_dtype = torch.float16
        self.kv_dtype = kv_dtype or self.dtype
        self.quantized_layers = self.int4_layers = self.block_layers = 0
        self.compile_s: float | None = None
        self.compiled, self.pdl = False, False
        self._graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> its DecodeGraphs
        if self.device.type == "cuda":
            from tokenmill.kernels.gpu.matvec import pdl_supported
            from tokenmill.model.gpu import prepare_gpu_model

            self.pdl = pdl and pdl_supported(self.device)
            self.dtype = torch.float32 if self.dtype == torch.float32 else torch.bfloat16
            self.kv_dtype = kv_dtype or self.dtype
            self.quantized_layers = prepare_gpu_model(self.model, loaded.packed, dtype=self.dtype, pdl=self.pdl)
        else:
            from tokenmill.model.cpu import prepare_cpu_model

            form = prepare_cpu_model(self.model, loaded.packed, int4=int4, compile=compile, kernels=kernels == "auto")
            self.block_layers, self.int4_layers, self.compiled = form.block_layers, form.int4_layers, form.compiled
            if kernels == "auto":  # build our C++ kernels at load (once per machine), not inside the first request
                for source in ("attention", "sampler"):
                    extension.ops(source)

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens one forward takes at most by default (the engine's token budget for a single user)."""
        return 8192 if self.device.type == "cuda" else 2048

    def new_kv_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        """A block pool for this model (and, on CUDA, CUDA graphs of the decode step over it)."""
        cache = PagedKVCache(self.config, num_blocks, block_size, self.kv_dtype, self.device,
                             cpu_kernel=self.kernels == "auto", pdl=self.pdl)
        if self.device.type == "cuda":
            from tokenmill.engine.cuda_graphs import DecodeGraphs

            max_blocks = min(num_blocks, -(-self.config.max_position_embeddings // block_size))
            self._graphs[cache] = DecodeGraphs(self.model, cache, max_blocks)
        return cache

    def graphs(self, cache: PagedKVCache):
        """The cache's DecodeGraphs (CUDA), or None."""
        return self._graphs.get(cache)

    @torch.inference_mode()
    def forward(self, cache: PagedKVCache, chunks: list[list[int]], starts: list[int], tables: list[list[int]],
                logits_for: list[int] | None) -> torch.Tensor:
        """Run several sequences' new tokens as one packed row: sequence i appends chunks[i] after its starts[i] cached
        tokens, in the blocks tables[i] (one-token chunks first). Returns next-token logits (len(logits_for), V) fp32
        at the last new token of each sequence index in logits_for; logits_for=None: (N, V) at every new token."""
        lengths = [len(c) for c in chunks]
        g = self._graphs.get(cache)
        if g is not None and logits_for is not None and len(chunks) <= g.max_batch and all(n == 1 for n in lengths):
            return self._decode_graph(g, chunks, starts, tables)[logits_for]
        view = cache.view(starts, lengths, tables)
        ids = torch.tensor([[t for c in chunks for t in c]], device=self.device)
        rows = None
        if logits_for is not None:
            ends = torch.tensor(lengths).cumsum(0) - 1
            rows = ends[logits_for].to(self.device)
        logits = self.model(ids, view.positions, view, logits_at=rows)
        return logits if rows is not None else logits[0]

    def _decode_graph(self, g, chunks: list[list[int]], starts: list[int], tables: list[list[int]]) -> torch.Tensor:
        # one token per sequence: the step's inputs as one host tensor (token, position, slot, keys, table), one copy,
        # one graph replay -> (n, V) fp32, a view of the graph's output
        bs = g.cache.block_size
        width = max(s // bs for s in starts) + 1
        rows = [[c[0], s, t[s // bs] * bs + s % bs, s + 1] + t[:width] + [0] * (width - len(t[:width]))
                for c, s, t in zip(chunks, starts, tables)]
        dev = torch.tensor(rows, dtype=torch.long).pin_memory().to(self.device, non_blocking=True)
        return g.run(dev[:, 0], dev[:, 1], dev[:, 2], dev[:, 4:].int(), dev[:, 3].int())

    @torch.inference_mode()
    def score(self, ids: list[int], block_size: int = 16) -> torch.Tensor:
        """Logits (T, V) fp32 at every position of `ids`, from an empty cache of its own (perplexity, tests)."""
        n_blocks = -(-len(ids) // block_size)
        cache = PagedKVCache(self.config, n_blocks, block_size, self.kv_dtype, self.device,
                             cpu_kernel=self.kernels == "auto", pdl=self.pdl)
        return self.forward(cache, [list(ids)], [0], [list(range(n_blocks))], None)

    def warm_up(self) -> float:
        """Run the compiled CPU paths once (decodes and prefills of the shapes they compile for) so compilation is kept
        out of measurements; returns the seconds spent (0 when nothing is compiled)."""
        if self.compile_s is not None or not self.compiled:
            return self.compile_s or 0.0
        t = time.perf_counter()
        cache = self.new_kv_cache(8, 16)
        for n in (3, 17):  # a 1-token and a longer prefill: both compiled shapes
            self.forward(cache, [list(range(n))], [0], [[0, 1]], [0])
        for _ in range(2):
            self.forward(cache, [[1], [2]], [17, 17], [[0, 1], [2, 3]], [0, 1])
            self.forward(cache, [[1]], [18], [[0, 1]], [0])
        self.compile_s = time.perf_counter() - t
        return self.compile_s
