"""Kernel sweep on the GPU: the W4/W8 decode kernels' launch configs (gpu_matvec.py: columns per program, spans per
iteration, warps, K splits) against bf16 cuBLAS and torch's int4 tinygemm on Llama-3-8B's linear shapes; dequantize +
cuBLAS at 4096 rows; paged decode attention. Times are CUDA-graph replays of 8 copies of each weight in turn (so the L2
cache holds none), median of 5 replays; GB/s = the layer's bytes (packed weights, scales, zeros) / time.

    PYTHONPATH=. python benchmarks/bench_gpu_kernels.py [--quick] [--write]   # --write: tokenmill/gpu_matvec_table.py
"""
import itertools
import statistics
import sys

import torch
import torch.nn.functional as F

from tokenmill import gpu_matvec
from tokenmill.gpu_attention import decode_splits, paged_decode
from tokenmill.gpu_bench import TinygemmLinear, copy_bandwidth
from tokenmill.gpu_linear import QuantLinear

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
COPIES = 8


def graph_time(fns) -> float:
    """Seconds per call of fns (a list of no-arg callables), replayed as one CUDA graph."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    times = []
    for _ in range(6):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times[1:]) / len(fns)


def candidates(m: int, bits: int, split: bool) -> list[tuple]:
    splits = (1, 2, 4, 8, 16) if split else (1,)
    if m == 1 and bits == 4:
        return [("gemv", bn, u, w, sp) for bn in (8, 16, 32) for u in (2, 4) for w in (1, 2, 4) for sp in splits
                if bn * 32 // (32 * w) >= 4]  # at least 4 words a thread
    if m == 1:
        return [("mm", 1, bn, False, w, sp) for bn in (16, 32) for w in (1, 2) for sp in splits]
    if m > 16:
        return [("mm", 64, bn, True, w, sp) for bn in (32, 64) for w in (4, 8) for sp in splits[:3]]
    return [("mm", 16, bn, True, w, sp) for bn in (16, 32, 64) for w in (2, 4, 8) for sp in splits[:4] if bn >= 8 * w]


def write_table(table: dict) -> None:
    with open("tokenmill/gpu_matvec_table.py", "w") as f:
        f.write(f'"""Launch configs of gpu_matvec.py per (rows bucket, N, padded K, bits, group), measured on\n'
                f'{torch.cuda.get_device_name()} by benchmarks/bench_gpu_kernels.py --write."""\n\nTABLE = {{\n')
        for key, cfg in sorted(table.items()):
            f.write(f"    {key}: {cfg},\n")
        f.write("}\n")


def main(quick: bool, write: bool):
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s")
    rows = (1, 4, 16, 64) if quick else (1, 2, 4, 8, 16, 32, 64)
    table = {}
    print("shape fmt M | best config: us, GB/s, % of copy bw | rule's config us | bf16 cuBLAS us | tinygemm us")
    for (name, (n, k)), fmt in itertools.product(SHAPES.items(), [(4, 128), (4, 32), (8, 32)]):
        if quick and fmt != (4, 128):
            continue
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(COPIES if n * k < 2e8 else 2)]
        layers = [QuantLinear.quantize(w, *fmt) for w in dense]
        tiny = [TinygemmLinear(w) for w in dense] if fmt == (4, 128) else None
        nbytes = layers[0].weight_bytes
        glu = name == "down"  # the model's down_proj computes silu(gate) * up as it loads x
        for m in rows:
            x = torch.randn(m, 2 * k if glu else k, device="cuda", dtype=torch.bfloat16)
            best = None
            for cfg in candidates(m, fmt[0], name not in ("gate_up", "lm_head")):  # their outputs unsplit
                try:
                    t = graph_time([lambda L=L: L.partials(x, glu, cfg) for L in layers])
                except Exception as e:  # a config the compiler rejects (shared memory, registers)
                    print("  skip", cfg, type(e).__name__, str(e)[:120])
                    continue
                if best is None or t < best[0]:
                    best = (t, cfg)
            table[(m, n, layers[0].padded_in, *fmt)] = best[1]
            rule = gpu_matvec.config(m, n, layers[0].padded_in, *fmt, table={})
            t_def = graph_time([lambda L=L: L.partials(x, glu, rule) for L in layers])
            xk = x[:, :k].contiguous()
            t_bf = graph_time([lambda w=w: F.linear(xk, w) for w in dense])
            t_tg = graph_time([lambda L=L: L(xk) for L in tiny]) if tiny else float("nan")
            print(f"{name} {fmt} M={m} | {best[0] * 1e6:.1f} us {nbytes / best[0] / 1e9:.0f} GB/s "
                  f"{100 * nbytes / best[0] / bw:.0f}% {best[1]} | {t_def * 1e6:.1f} {rule} | {t_bf * 1e6:.1f} | "
                  f"{t_tg * 1e6:.1f}", flush=True)
        del dense, layers, tiny
        torch.cuda.empty_cache()
        if write:  # after every shape, so a cut-short run keeps what it measured
            write_table(table)
    # prefill: dequantize + cuBLAS at 4096 rows
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        L = QuantLinear.quantize(w, 4, 128)
        x = torch.randn(4096, k, device="cuda", dtype=torch.bfloat16)
        t_q = graph_time([lambda: L(x)] * 4)
        t_d = graph_time([lambda: L.dequantize()] * 4)
        t_b = graph_time([lambda: F.linear(x, w)] * 4)
        print(f"prefill {name} M=4096: q4 {t_q * 1e6:.0f} us (dequant {t_d * 1e6:.0f}) | bf16 {t_b * 1e6:.0f} us "
              f"= {2 * 4096 * n * k / t_b / 1e12:.0f} TFLOP/s")
    # paged decode attention, Llama-3-8B heads
    H, KV, D, bs = 32, 8, 128, 16
    for B, L in ((1, 128), (1, 4096), (16, 4096), (64, 128), (64, 4096)):
        nblk = B * (L // bs + 1)
        kp = torch.randn(nblk, bs, KV, D, device="cuda", dtype=torch.bfloat16)
        vp = torch.randn_like(kp)
        tables = torch.randperm(nblk, device="cuda").view(B, -1).int()
        lengths = torch.full((B,), L, dtype=torch.int32, device="cuda")
        q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
        for splits in sorted({1, 4, 16, decode_splits(B, KV, 8192)}):
            t = graph_time([lambda: paged_decode(q, kp, vp, tables, lengths, None, splits)] * 8)
            print(f"attn B={B} L={L} splits={splits}: {t * 1e6:.1f} us, {2 * B * L * KV * D * 2 / t / 1e9:.0f} GB/s")


if __name__ == "__main__":
    main("--quick" in sys.argv, "--write" in sys.argv)
