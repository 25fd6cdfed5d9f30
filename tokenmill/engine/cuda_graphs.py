"""CUDA graphs of the decode step, one per batch-size bucket, so a token costs one graph launch instead of a few hundred
kernel launches from Python (the runner owns them; see model_runner.py).

A graph reads its inputs from static buffers: token ids and positions (B, 1), the slot each new k/v goes to (B,), block
tables (B, W) and key counts (B,). `run` copies a step's inputs in, pads the bucket (padding rows write nowhere and
attend over one key), replays, and returns the live rows' logits.
"""
from __future__ import annotations

import torch

from tokenmill.kernels.gpu.attention import PagedDecodeView, decode_splits

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, cache, max_blocks: int, buckets: tuple[int, ...] = BUCKETS):
        self.model, self.cache, self.buckets = model, cache, buckets
        B, dev = buckets[-1], cache.device
        self.max_blocks = max_blocks
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.slots = torch.full((B,), -1, dtype=torch.long, device=dev)
        self.tables = torch.zeros(B, max_blocks, dtype=torch.int32, device=dev)
        self.lengths = torch.ones(B, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._sms = torch.cuda.get_device_properties(dev).multi_processor_count

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _forward(self, B: int) -> torch.Tensor:
        cfg = self.cache.cfg
        splits = decode_splits(B, cfg.num_kv_heads, self.max_blocks * self.cache.block_size, self._sms)
        view = PagedDecodeView(self.cache, self.slots[:B], self.tables[:B], self.lengths[:B], splits)
        return self.model(self.ids[:B], self.positions[:B], view)  # (B, 1, V) fp32

    @torch.inference_mode()
    def capture(self, B: int) -> None:
        self.slots[:B] = -1  # warm-up and capture write no k/v
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compiles the Triton kernels, creates cuBLAS handles
            for _ in range(2):
                self._forward(B)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(B)
        self._pool = graph.pool()
        self.graphs[B] = (graph, logits)

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
            lengths: torch.Tensor) -> torch.Tensor:
        """ids, positions, slots (n,) long; tables (n, <= W) int32; lengths (n,) int32, all on the device ->
        logits (n, V) fp32 (a view of the graph's output: read it before the next run)."""
        n = ids.shape[0]
        B = self.bucket(n)
        if B not in self.graphs:
            self.capture(B)
        self.ids[:n, 0].copy_(ids)
        self.positions[:n, 0].copy_(positions)
        self.slots[:n].copy_(slots)
        self.slots[n:B] = -1
        self.tables[:n, : tables.shape[1]].copy_(tables)
        self.lengths[:n].copy_(lengths)
        self.lengths[n:B] = 1
        graph, logits = self.graphs[B]
        graph.replay()
        return logits[:n, -1]
