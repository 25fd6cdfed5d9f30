"""Kernel sweep on the GPU: the W4/W8 decode kernels' launch configs (kernels/gpu/matvec.py: columns per program, spans per
iteration, warps, K splits) against bf16 cuBLAS and torch's int4 tinygemm on Llama-3-8B's linear shapes; dequantize +
cuBLAS at 4096 rows; paged decode attention. Times are CUDA-graph replays of 8 copies of each weight in turn (so the L2
cache holds none), median of 5 replays; GB/s = the layer's bytes (packed weights, scales, zeros) / time.

    PYTHONPATH=. python benchmarks/bench_gpu_kernels.py [--quick] [--write] [--table] [--rows 1,4]
    # quick: q4g128, rows 1/4/16/64, no prefill/attention; write: merge into tokenmill/kernels/gpu/matvec_table.py; table:
    # the configs in use timed, no sweep; rows: only these row counts; --half-only: one row, packed-half kernel only;
    # --group 32: --quick sweeps q4g32 instead
"""
import itertools
import statistics
import sys

import torch
import torch.nn.functional as F

from tokenmill.kernels.gpu import matvec as gpu_matvec
from tokenmill.kernels.gpu.attention import decode_splits, paged_decode
from tokenmill.monitoring.gpu_shapes import TinygemmLinear, copy_bandwidth
from tokenmill.kernels.gpu.fused import silu_mul
from tokenmill.kernels.gpu.quant_linear import QuantLinear

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
COPIES = 8
HALF_ONLY = "--half-only" in sys.argv
QUICK_FMT = (4, int(sys.argv[sys.argv.index("--group") + 1]) if "--group" in sys.argv else 128)  # --quick's format


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
    dots = (1, 2) if bits == 4 else (1,)
    mm16 = [("mm", 16, bn, d, w, sp) for bn in (16, 32, 64) for d in dots for w in (2, 4) for sp in splits[:4]
            if bn >= 8 * w]
    if m == 1 and bits == 4:
        tiles = [(bn, w) for bn in (32, 64, 128) for w in (2, 4, 8) if 8 <= bn // w <= 16]  # words a thread a span
        if split:  # the stream kernel: r programs per SM, always split
            half = [("gemvs", bn, u, w, r, pre) for bn, w in tiles for u in (2, 3) for r in (2, 4, 8) for pre in (0, 4)]
        else:
            half = [("gemvh", bn, u, w, 1, pre) for bn, w in tiles for u in (2, 3) for pre in (0, 4)]
        if HALF_ONLY:  # the packed-half kernel alone (plus the config in use, timed as "rule")
            return half
        return half + [("gemv", bn, u, w, sp) for bn in (16, 32) for u in (2, 4) for w in (1, 2, 4) for sp in splits
                       if bn * 32 // (32 * w) >= 4] + [c for c in mm16 if c[2] == 64]  # at least 4 words a thread
    if m == 1:
        return [("mm", 1, bn, 0, w, sp) for bn in (16, 32) for w in (1, 2) for sp in splits]
    if m > 16:
        return [("mm", 64, bn, d, w, sp) for bn in (32, 64) for d in dots for w in (4, 8) for sp in splits[:3]]
    return mm16


def best_config(layers, x, glu, cands):
    best = None
    for cfg in cands:
        try:
            t = graph_time([lambda L=L: L.product(x, glu, cfg) for L in layers])
        except Exception as e:  # a config the compiler rejects (shared memory, registers)
            print("  skip", cfg, type(e).__name__, str(e)[:120])
            continue
        if best is None or t < best[0]:
            best = (t, cfg)
    return best


def write_table(table: dict, glu_rows: int) -> None:
    table = {**gpu_matvec.TABLE, **table}  # entries not measured in this run are kept
    with open("tokenmill/kernels/gpu/matvec_table.py", "w") as f:
        f.write(f'"""Launch configs of matvec.py per (rows bucket, N, padded K, bits, group), measured on\n'
                f'{torch.cuda.get_device_name()} by benchmarks/bench_gpu_kernels.py --write over Llama-3-8B\'s shapes; '
                f'other shapes\ntake the rule in matvec.config. GLU_ROWS: up to this many rows down_proj computes '
                f'silu(gate) * up as it\nloads (0: never; the separate SiLU-mul launch measured faster)."""\n\n'
                f'TABLE = {{\n')
        for key, cfg in sorted(table.items()):
            f.write(f"    {key}: {cfg},\n")
        f.write("}\n")
        f.write(f"GLU_ROWS = {glu_rows}\n")


def main(quick: bool, write: bool, table_only: bool, rows: tuple[int, ...] | None = None):
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s")
    rows = rows or ((1, 4, 16, 64) if quick else (1, 2, 4, 8, 16, 32, 64))
    table, glu_rows = {}, 0
    print("shape fmt M | best config: us, GB/s, % of copy bw | config in use us | bf16 cuBLAS us | tinygemm us")
    for (name, (n, k)), fmt in itertools.product(SHAPES.items(), [(4, 128), (4, 32), (8, 32)]):
        if quick and fmt != QUICK_FMT:
            continue
        copies = COPIES if n * k < 2e8 else 2
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        layers = [QuantLinear.quantize(w, *fmt) for w in dense]
        tiny = [TinygemmLinear(w) for w in dense] if fmt == (4, 128) else None
        nbytes = layers[0].weight_bytes
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cands = candidates(m, fmt[0], name != "lm_head")  # the logits are read unsplit
            if table_only:  # time the configs in use only
                cands = [gpu_matvec.config(m, n, layers[0].padded_in, *fmt)]
            t, cfg = best_config(layers, x, False, cands)
            if name == "down" and not table_only:  # the model's down_proj may compute silu(gate) * up as it loads x
                xg = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16)
                t_silu = graph_time([lambda: silu_mul(xg)] * 8)
                t_glu, cfg_glu = best_config(layers, xg, True, cands)
                print(f"down {fmt} M={m}: silu_mul {t_silu * 1e6:.1f} + {t * 1e6:.1f} us {cfg} | fused silu "
                      f"{t_glu * 1e6:.1f} us {cfg_glu}")
                if t_glu < t + t_silu and fmt == (4, 128):
                    glu_rows, t, cfg = m, t_glu, cfg_glu
            table[(m, n, layers[0].padded_in, *fmt)] = cfg
            rule = gpu_matvec.config(m, n, layers[0].padded_in, *fmt)  # the config in use before this run
            t_def = graph_time([lambda L=L: L.product(x, False, rule) for L in layers])
            t_bf = graph_time([lambda w=w: F.linear(x, w) for w in dense])
            t_tg = graph_time([lambda L=L: L(x) for L in tiny]) if tiny else float("nan")
            print(f"{name} {fmt} M={m} | {t * 1e6:.1f} us {nbytes / t / 1e9:.0f} GB/s {100 * nbytes / t / bw:.0f}% "
                  f"{cfg} | {t_def * 1e6:.1f} {rule} | {t_bf * 1e6:.1f} | {t_tg * 1e6:.1f}", flush=True)
        for buf in gpu_matvec._ACCUMULATORS.values():
            buf.zero_()
        del dense, layers, tiny
        torch.cuda.empty_cache()
        if write:  # after every shape, so a cut-short run keeps what it measured
            write_table(table, glu_rows)
    if quick or len(rows) < 4:
        return
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
    rows = sys.argv[sys.argv.index("--rows") + 1] if "--rows" in sys.argv else None
    main("--quick" in sys.argv, "--write" in sys.argv, "--table" in sys.argv,
         tuple(int(r) for r in rows.split(",")) if rows else None)
