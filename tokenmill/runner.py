"""The model runner: owns the weights' device, the KV cache and the forward calls. It never decides who runs."""
from __future__ import annotations

import torch

from .kv_cache import KVCache
from .loader import LoadedModel


class ModelRunner:
    def __init__(self, loaded: LoadedModel, *, threads: int | None = None, prefill_chunk: int = 2048):
        self.model = loaded.model
        self.config = loaded.config
        self.device = self.model.lm_head.weight.device
        self.dtype = self.model.lm_head.weight.dtype
        self.prefill_chunk = prefill_chunk
        if threads is not None:
            torch.set_num_threads(threads)

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
