"""Where a batch-B decode step's GPU time goes: kernel times of one eager step of a shape with random weights
(torch.profiler), summed by kernel over the step, beside the CUDA-graph step time.

    PYTHONPATH=. python benchmarks/profile_decode.py [--shape llama3-8b] [--quant q4g128] [--batch 1]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from tokenmill.cuda_graphs import DecodeGraphs
from tokenmill.gpu_bench import BLOCK, build_model, decode_tps
from tokenmill.paged_cache import PagedKVCache


def main(args):
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
    main(p.parse_args())
