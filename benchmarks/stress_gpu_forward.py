"""Repeat one eager 32-token prefill forward of a one-layer random model on the GPU and count the forwards whose
logits are off the median of the first five by more than 1% (relative norm): split-K's atomic order moves them by
~1e-6, so any count above zero is a bug (issue 6: a race in the norm kernel lost partial sums in ~1-3% of forwards).

    PYTHONPATH=. python benchmarks/stress_gpu_forward.py [--models llama3-8b-layer:q4g128,qwen2-7b-layer:q8]
        [--n 800] [--split all|none|qkv|o|down|head]   # split: which products may split K (the (N, K) of qwen2's)
"""
import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from tests.test_gpu import random_model  # noqa: E402
from tests.test_gpu_kernels import SHAPES  # noqa: E402
from tokenmill.kernels.gpu import matvec as gpu_matvec  # noqa: E402
from tokenmill.model.config import ModelConfig  # noqa: E402
from tokenmill.model.gpu import prepare_gpu_model  # noqa: E402
from tokenmill.engine.kv_cache import PagedKVCache  # noqa: E402

QWEN2 = {"qkv": (4608, 3584), "o": (3584, 3584), "down": (3584, 18944), "head": (4096, 3584)}


def forward(gpu, ids, T=32):
    cache = PagedKVCache(gpu.config, -(-len(ids) // 16), 16, torch.bfloat16, "cuda")
    with torch.inference_mode():
        view = cache.view([0], [T], [list(range(cache.num_blocks))])
        return gpu(torch.tensor([ids[:T]], device="cuda"), view.positions, view)[0].float()


def main(args):
    rule = gpu_matvec.config
    if args.split != "all":  # every other product unsplit (one program per column block writes its output)
        keep = QWEN2.get(args.split)
        gpu_matvec.config = lambda m, n, kp, *a, **k: (rule(m, n, kp, *a, **k) if (n, kp) == keep
                                                       else (*rule(m, n, kp, *a, **k)[:-1], 1))
    print(torch.cuda.get_device_name(), torch.__version__, f"split: {args.split}")
    for arg in args.models.split(","):
        shape, quant = arg.split(":")
        cfg = ModelConfig(max_position_embeddings=512, **SHAPES[shape])
        gpu = copy.deepcopy(random_model(cfg))
        prepare_gpu_model(gpu, quant=quant)
        ids = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
        ref = torch.stack([forward(gpu, ids) for _ in range(5)]).median(0).values
        off = [e for e in (((forward(gpu, ids) - ref).norm() / ref.norm()).item() for _ in range(args.n)) if e > 1e-2]
        print(f"{arg}: {len(off)} of {args.n} forwards off by > 1% {[round(e, 3) for e in off[:6]]}", flush=True)
        del gpu
        torch.cuda.empty_cache()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="llama3-8b-layer:q4g128,qwen2-7b-layer:q4g32,qwen2-7b-layer:q8")
    p.add_argument("--n", type=int, default=800)
    p.add_argument("--split", default="all", choices=["all", "none", *QWEN2])
    main(p.parse_args())
