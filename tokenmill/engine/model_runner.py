"""The model runner: owns the weights' device, the KV cache and the forward calls. It never decides who runs."""
from __future__ import annotations

import functools
import time

import torch
from gguf import GGMLQuantizationType

from tokenmill.engine.contiguous_cache import KVCache
from tokenmill.model.loader import LoadedModel
from tokenmill.model.transformer import DecoderLayer, Transformer
from tokenmill.kernels.cpu.linear import Q8Linear, block_kernels, has_int4_cpu_kernel, pack_int4_linears, use_block_linears
from tokenmill.formats.quants import INT4_GROUP_TYPES


class ModelRunner:
    def __init__(self, loaded: LoadedModel, *, threads: int | None = None, prefill_chunk: int = 2048,
                 int4: bool = False, compile: bool = False, kv_dtype: torch.dtype | None = None):
        self.model = loaded.model
        self.config = loaded.config
        embed = self.model.model.embed_tokens.weight  # the lm_head may already be a block kernel (a second runner)
        self.device, self.dtype = embed.device, embed.dtype
        # KV cache storage. On the CPU, float16 halves the bytes decode attention reads (the kernel widens to fp32;
        # default model: logits within 1.4e-2 of transformers', greedy tokens identical): the default with `int4`
        # (already inexact), while the default path keeps the compute dtype and stays exact
        if kv_dtype is None and int4 and self.device.type == "cpu":
            kv_dtype = torch.float16
        self.kv_dtype: torch.dtype | None = kv_dtype
        self.prefill_chunk = prefill_chunk
        if threads is not None:
            torch.set_num_threads(threads)
        # CUDA: bf16 activations (fp32 when the weights came as fp32: `load(dtype=torch.float32)`), fused projections,
        # GGUF 4/8-bit weights kept quantized (Triton kernels), Triton norms / RoPE / paged decode attention; decode
        # steps of the paged cache replay CUDA graphs (made with new_paged_cache)
        self.graphs = None
        self.quantized_layers = 0
        if self.device.type == "cuda":
            from tokenmill.model.gpu import prepare_gpu_model

            self.dtype = torch.float32 if self.dtype == torch.float32 else torch.bfloat16
            self.quantized_layers = prepare_gpu_model(self.model, loaded.packed, dtype=self.dtype)
            self.prefill_chunk = max(prefill_chunk, 8192)
        # CPU: q/k/v and gate/up fused (exact); GGUF Q4_0/Q4_1/Q8_0 weights through our AVX-512 block kernels
        # (exact; `int4`: int8 activations x 4-bit weights, VNNI, inexact), without them through torch's int4 CPU
        # kernel (`int4`, bf16 activations); `compile`: each layer's two halves around the KV cache and the head compiled
        self.int4_layers, self.block_layers, self.compile_s = 0, 0, None
        if self.device.type == "cpu":
            self.model.fuse_projections(loaded.packed)
            if block_kernels() is not None:
                self.block_layers = use_block_linears(self.model, loaded.packed, int8=int4)
                self.int4_layers = sum(getattr(m, "int8", False) and m.qt.qtype in INT4_GROUP_TYPES
                                       for m in self.model.modules())
            if int4 and has_int4_cpu_kernel():  # what the block kernels don't take (Q4_K), or all without them
                self.int4_layers += pack_int4_linears(self.model, loaded.packed)
            if compile:
                self._compile_cpu(loaded)

    def _compile_cpu(self, loaded: LoadedModel):
        """torch.compile (inductor, C++) of the per-layer code around attention and of the head: fuses the small
        elementwise ops (norms, RoPE, SiLU * up, residuals) and cuts the per-op host cost that dominates decode of a
        small model. One compiled graph serves every layer (the layer is an argument, not a constant); the KV cache's
        bookkeeping stays eager. Compilation happens on the first calls (the first two decode steps and prefills),
        cached on disk by inductor for later processes; `warm_up()` runs it and reports the seconds in `compile_s`."""
        m = self.model
        # (guards on the modules stay: dynamo's cache is per code object, shared by every runner in the process, and
        # another model's layers may hold other module types)
        pre = torch.compile(DecoderLayer.attention_inputs, dynamic=True)
        post = torch.compile(DecoderLayer.finish, dynamic=True)
        for layer in m.model.layers:
            layer.attention_inputs = functools.partial(pre, layer)
            layer.finish = functools.partial(post, layer)
        tied = self.config.tie_word_embeddings or "lm_head.weight" not in loaded.packed
        qt = loaded.packed.get("model.embed_tokens.weight" if tied else "lm_head.weight")
        if (qt is not None and qt.qtype == GGMLQuantizationType.Q8_0 and isinstance(m.lm_head, torch.nn.Linear)
                and m.lm_head.in_features % 32 == 0):
            m.lm_head = Q8Linear(qt, m.lm_head.weight)  # compiled below; exact up to summation order
        m.head = functools.partial(torch.compile(Transformer.head, dynamic=True), m)

    def warm_up(self) -> float:
        """Run the compiled paths once (decode and a prefill chunk) so compilation is kept out of measurements; returns
        the seconds spent (0 when nothing is compiled)."""
        if self.compile_s is not None or not isinstance(self.model.head, functools.partial):
            return self.compile_s or 0.0
        t = time.perf_counter()
        cache = self.new_cache(2, 64)
        for n in (3, 17):  # a 1-token and a longer prefill: both compiled shapes
            self.prefill(cache, 0, list(range(n)))
        for _ in range(2):
            self.decode(cache, [0, 1], [1, 2])
            self.decode(cache, [0], [1])
        self.compile_s = time.perf_counter() - t
        return self.compile_s

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        return KVCache(self.config, rows, capacity, self.kv_dtype or self.dtype, self.device)

    @torch.inference_mode()
    def prefill(self, cache: KVCache, row: int, ids: list[int]) -> torch.Tensor:
        """Append `ids` to the row's cached tokens, in chunks, and return the last position's logits (V,) fp32."""
        logits = None
        for i in range(0, len(ids), self.prefill_chunk):
            chunk = ids[i : i + self.prefill_chunk]
            view = cache.begin([row], [chunk])
            x = torch.tensor([chunk], device=self.device)
            logits = self.model(x, view.positions, view, last_only=True)
        return logits[0, -1]

    @torch.inference_mode()
    def decode(self, cache: KVCache, rows: list[int], tokens: list[int]) -> torch.Tensor:
        """One new token for each row -> next-token logits (B, V) fp32."""
        view = cache.begin(rows, [[t] for t in tokens])
        x = torch.tensor(tokens, device=self.device)[:, None]
        return self.model(x, view.positions, view)[:, -1]

    @torch.inference_mode()
    def score(self, cache: KVCache, row: int, ids: list[int]) -> torch.Tensor:
        """Logits at every position (T, V) fp32 for `ids` appended to the row (perplexity, parity tests)."""
        view = cache.begin([row], [ids])
        return self.model(torch.tensor([ids], device=self.device), view.positions, view)[0]

    # -- the engine's paged KV cache (see engine.py) --
    def new_paged_cache(self, num_blocks: int, block_size: int) -> "PagedKVCache":
        from tokenmill.engine.kv_cache import PagedKVCache

        cache = PagedKVCache(self.config, num_blocks, block_size, self.kv_dtype or self.dtype, self.device)
        if self.device.type == "cuda":
            from tokenmill.engine.cuda_graphs import DecodeGraphs

            max_blocks = min(num_blocks, -(-self.config.max_position_embeddings // block_size))
            self.graphs = DecodeGraphs(self.model, cache, max_blocks)
        return cache

    @torch.inference_mode()
    def forward_packed(self, cache: "PagedKVCache", chunks: list[list[int]], starts: list[int], tables: list[list[int]],
                       logits_for: list[int]) -> torch.Tensor:
        """Run several sequences' new tokens as one packed row: sequence i appends chunks[i] after its starts[i] cached
        tokens, in the blocks tables[i] (one-token chunks first). Returns next-token logits (len(logits_for), V) fp32 at
        the last new token of each sequence index in logits_for."""
        lengths = [len(c) for c in chunks]
        g = self.graphs
        if g is not None and g.cache is cache and len(chunks) <= g.max_batch and all(n == 1 for n in lengths):
            return self._decode_graph(chunks, starts, tables)[logits_for]
        view = cache.view(starts, lengths, tables)
        ids = torch.tensor([[t for c in chunks for t in c]], device=self.device)
        ends, total = [], 0
        for n in lengths:
            total += n
            ends.append(total - 1)
        rows = torch.tensor([ends[i] for i in logits_for], dtype=torch.long, device=self.device)
        # Transformer.forward, with the head run on the sampled rows only (a prefill chunk needs no per-token logits)
        m = self.model
        x = m.model.embed_tokens(ids)
        cos, sin = m.rope(view.positions, x.dtype)
        for layer in m.model.layers:
            x = layer(x, cos, sin, view)
        return m.head(x[0, rows])

    def _decode_graph(self, chunks: list[list[int]], starts: list[int], tables: list[list[int]]) -> torch.Tensor:
        # one token per sequence: the step's inputs as one host tensor (token, position, slot, keys, table), one copy,
        # one graph replay -> (n, V) fp32, a view of the graph's output
        bs = self.graphs.cache.block_size
        width = max(s // bs for s in starts) + 1
        rows = [[c[0], s, t[s // bs] * bs + s % bs, s + 1] + t[:width] + [0] * (width - len(t[:width]))
                for c, s, t in zip(chunks, starts, tables)]
        dev = torch.tensor(rows, dtype=torch.long).pin_memory().to(self.device, non_blocking=True)
        return self.graphs.run(dev[:, 0], dev[:, 1], dev[:, 2], dev[:, 4:].int(), dev[:, 3].int())
