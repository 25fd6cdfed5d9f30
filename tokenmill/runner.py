"""The model runner: owns the weights' device, the KV cache and the forward calls. It never decides who runs."""
from __future__ import annotations

import torch

from .kv_cache import KVCache
from .loader import LoadedModel
from .quant_linear import has_int4_cpu_kernel, pack_int4_linears


class ModelRunner:
    def __init__(self, loaded: LoadedModel, *, threads: int | None = None, prefill_chunk: int = 2048,
                 int4: bool = False):
        self.model = loaded.model
        self.config = loaded.config
        self.device = self.model.lm_head.weight.device
        self.dtype = self.model.lm_head.weight.dtype
        self.prefill_chunk = prefill_chunk
        if threads is not None:
            torch.set_num_threads(threads)
        # GGUF 4-bit weights through torch's int4 CPU kernel for decode (not bit-exact: bf16 activations)
        self.int4_layers = 0
        if int4 and self.device.type == "cpu" and has_int4_cpu_kernel():
            self.int4_layers = pack_int4_linears(self.model, loaded.packed)

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        return KVCache(self.config, rows, capacity, self.dtype, self.device)

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
        from .paged_cache import PagedKVCache

        return PagedKVCache(self.config, num_blocks, block_size, self.dtype, self.device)

    @torch.inference_mode()
    def forward_packed(self, cache: "PagedKVCache", chunks: list[list[int]], starts: list[int], tables: list[list[int]],
                       logits_for: list[int]) -> torch.Tensor:
        """Run several sequences' new tokens as one packed row: sequence i appends chunks[i] after its starts[i] cached
        tokens, in the blocks tables[i] (one-token chunks first). Returns next-token logits (len(logits_for), V) fp32 at
        the last new token of each sequence index in logits_for."""
        lengths = [len(c) for c in chunks]
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
        return m.lm_head(m.model.norm(x[0, rows])).float()
