"""Where a batch-B decode step's time goes.

GPU: kernel times of one eager step of a shape with random weights (torch.profiler), summed by kernel over the step,
beside the CUDA-graph step time. CPU (`--cpu`): the default model (or --model) on the CPU runner, host time per op
over 10 decode steps, per token, and the share of the quantized matmuls.

    PYTHONPATH=. python benchmarks/profile_decode.py [--shape llama3-8b] [--quant q4g128] [--batch 1]
    PYTHONPATH=. python benchmarks/profile_decode.py --cpu [--int4] [--compile] [--threads 2] [--batch 1]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from tokenmill.engine.cuda_graphs import DecodeGraphs
from tokenmill.monitoring.gpu_shapes import BLOCK, build_model, decode_tps
from tokenmill.engine.kv_cache import PagedKVCache
from tokenmill.engine.scratch import ScratchCache


def profile_cpu(args):
    import tokenmill

    llm = tokenmill.load(args.model, threads=args.threads, int4=args.int4, compile=args.compile)
    r, B, steps = llm.runner, args.batch, 10
    r.warm_up()
    cache = ScratchCache(r, B, 160)
    for row in range(B):
        cache.prefill(row, list(range(100, 228)))
    with torch.inference_mode():
        for _ in range(3):
            cache.decode(list(range(B)), [5] * B)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                cache.decode(list(range(B)), [5] * B)
    ops = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ops)
    mm = sum(e.self_cpu_time_total for e in ops if "quant_matmul" in e.key or e.key in ("aten::addmm", "aten::mm"))
    print(f"B={B} int4={args.int4} compile={args.compile} threads={torch.get_num_threads()}: "
          f"{total / steps / 1e3:.2f} ms host time per step (profiled), matmuls {mm / total:.0%}")
    print(ops.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))


def main(args):
    if args.cpu:
        return profile_cpu(args)
    model, cfg = build_model(args.shape, args.quant)
    B, ctx = args.batch, 128
    print(f"{args.shape} {args.quant} B={B}: graph decode {decode_tps(model, cfg, B, ctx, 64):.0f} tok/s")
    per = -(-(ctx + 8) // BLOCK)
    cache = PagedKVCache(cfg, B * per, BLOCK, torch.bfloat16, "cuda")
    graphs = DecodeGraphs(model, cache, per, buckets=(B,))
    graphs.positions[:B] = ctx
    graphs.lengths[:B] = ctx + 1
    with torch.inference_mode():
        for _ in range(3):
            graphs._forward(B)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                graphs._forward(B)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--quant", default="q4g128")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cpu", action="store_true", help="profile the CPU runner on a real model instead")
    p.add_argument("--model", default=None, help="--cpu: a path or alias (default: the default model)")
    p.add_argument("--int4", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    main(p.parse_args())
