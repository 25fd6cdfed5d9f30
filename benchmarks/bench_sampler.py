"""Sampler time per call at batch 1, 16 and 64, V = 49152 (SmolLM2's vocabulary).

    python benchmarks/bench_sampler.py [--device cpu|cuda] [--threads 2] [--history 640]
"""

import argparse
import time

import torch

from tokenmill.sampler import Sampler, SeqSamplingState
from tokenmill.sampling import SamplingParams

V = 49152
CONFIGS = {
    "all steps": dict(
        temperature=0.8, top_k=200, top_p=0.9, min_p=0.02, typical_p=0.95, tfs=0.95, top_a=0.05,
        repetition_penalty=1.1, repetition_range=512, repetition_decay=64, frequency_penalty=0.2, presence_penalty=0.1,
        dry_multiplier=0.8, dry_range=1024, xtc_probability=0.5, xtc_threshold=0.1, mirostat_mode=2,
        smoothing_factor=0.2, dynatemp_min=0.5, dynatemp_max=1.5, skew=0.3, logit_bias={10: 1.0},
        disallowed_tokens=[0, 1], logprobs=True, top_logprobs=5),
    "typical (T, top_k, top_p, rep)": dict(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.05),
    "greedy": dict(temperature=0.0),
}


def bench(cfg: dict, batch: int, device: str, history: int, seeded: bool, iters: int) -> float:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, V, (history,), generator=g).tolist()
    seqs = [SeqSamplingState.new(SamplingParams(**cfg, seed=i if seeded else None), prompt, device, eos_ids=[2])
            for i in range(batch)]
    sampler = Sampler(V)
    logits = [torch.randn(batch, V, generator=g).to(device) * 3 for _ in range(4)]
    for k in range(3 + iters):
        if k == 3:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        tokens = sampler(logits[k % 4], seqs).tokens.tolist()  # the caller reads the tokens every step
        for s, t in zip(seqs, tokens):
            s.output_ids.append(t)
    return (time.perf_counter() - t0) / iters * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--history", type=int, default=640, help="prompt tokens before the first step")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, V {V}, "
          f"history {args.history} tokens; ms per call (seeded rows draw their noise one row at a time)")
    for name, cfg in CONFIGS.items():
        for seeded in (False, True):
            times = [bench(cfg, b, args.device, args.history, seeded, args.iters) for b in (1, 16, 64)]
            print(f"  {name:32s} {'seeded' if seeded else 'unseeded':9s} "
                  + "  ".join(f"B={b}: {t:7.2f}" for b, t in zip((1, 16, 64), times)))


if __name__ == "__main__":
    main()
