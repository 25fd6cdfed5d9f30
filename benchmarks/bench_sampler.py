"""Sampler time per call at batch 1, 16 and 64, against the default model's decode step at the same batch.

    python benchmarks/bench_sampler.py [--device cpu|cuda] [--threads 2] [--clock wall|cpu] [--history 640]
                                       [--synthetic] [--seeded] [--torch-sampler]

The logits are the model's own, captured from its decode steps (--synthetic: randn * 3, much flatter than a
model's, so top_p and min_p keep far more tokens); each row's history is `--history` random prompt tokens plus
the tokens sampled so far (--torch-sampler: the sampler's PyTorch path, without its C++ kernels). Timings are medians
over --iters calls. On a machine shared with other work, wall time
swings with the load (a parallel op can wait ~10 ms for its second thread); `--threads 1 --clock cpu` counts this
thread's CPU time instead, the model's and the sampler's alike.
"""

import argparse
import statistics
import time

import torch

from tokenmill.sampling.sampler import Sampler, SeqSamplingState
from tokenmill.sampling.params import SamplingParams

BATCHES = (1, 16, 64)
CONFIGS = {
    "exllama-default": SamplingParams.preset("exllama-default").to_dict(),
    "creative": SamplingParams.preset("creative").to_dict(),
    "T=1 (no filter)": dict(),
    "top_p 0.9": dict(top_p=0.9),
    "min_p 0.05": dict(min_p=0.05),
    "all steps": dict(
        temperature=0.8, top_k=200, top_p=0.9, min_p=0.02, typical_p=0.95, tfs=0.95, top_a=0.05,
        repetition_penalty=1.1, repetition_range=512, repetition_decay=64, frequency_penalty=0.2, presence_penalty=0.1,
        dry_multiplier=0.8, dry_range=1024, xtc_probability=0.5, xtc_threshold=0.1, mirostat_mode=2,
        smoothing_factor=0.2, dynatemp_min=0.5, dynatemp_max=1.5, skew=0.3, logit_bias={10: 1.0},
        disallowed_tokens=[0, 1], logprobs=True, top_logprobs=5),
    "greedy": dict(temperature=0.0),
}


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def model_steps(device: str, steps: int, clock) -> tuple[dict[int, float], dict[int, list[torch.Tensor]]]:
    """Median decode step (ms) per batch size, and the (B, V) logits of those steps."""
    import tokenmill

    llm = tokenmill.load(device=device)
    runner = llm.runner
    ids = llm.encode("The history of the printing press begins in")
    times, logits = {}, {}
    for B in BATCHES:
        cache = runner.new_cache(B, 512)
        tokens = [int(runner.prefill(cache, row, ids + [100 + row]).argmax()) for row in range(B)]
        ts, out = [], []
        for _ in range(2 + steps):  # two warm-up steps
            _sync(device)
            t0 = clock()
            step = runner.decode(cache, list(range(B)), tokens).float()
            _sync(device)
            ts.append(clock() - t0)
            out.append(step)
            tokens = torch.distributions.Categorical(logits=step).sample().tolist()  # varied continuations
        times[B], logits[B] = statistics.median(ts[2:]) * 1e3, out
    return times, logits


def bench(cfg: dict, logits: list[torch.Tensor], device: str, history: int, seeded: bool, iters: int, clock,
          kernels: str) -> float:
    B, V = logits[0].shape
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, V, (history,), generator=g).tolist()
    seqs = [SeqSamplingState.new(SamplingParams(**{**cfg, "seed": i if seeded else None}), prompt, device, eos_ids=[2])
            for i in range(B)]
    sampler = Sampler(V, kernels=kernels)
    ts = []
    for k in range(3 + iters):
        _sync(device)
        t0 = clock()
        tokens = sampler(logits[k % len(logits)], seqs).tokens.tolist()  # the caller reads the tokens every step
        ts.append(clock() - t0)
        for s, t in zip(seqs, tokens):
            s.output_ids.append(t)
    return statistics.median(ts[3:]) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--history", type=int, default=640, help="prompt tokens before the first step")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: this thread's CPU time")
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--steps", type=int, default=8, help="model decode steps timed (and logits kept) per batch")
    ap.add_argument("--synthetic", action="store_true", help="randn * 3 logits; skips the model")
    ap.add_argument("--seeded", action="store_true", help="also time seeded rows (their noise is drawn row by row)")
    ap.add_argument("--torch-sampler", action="store_true", help="the sampler without its C++ kernels")
    args = ap.parse_args()
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        ap.error("--clock cpu counts one thread: it needs --threads 1 and --device cpu")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    kernels = "torch" if args.torch_sampler else "auto"
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        step_ms = None
        logits = {B: [(torch.randn(B, 49152, generator=g) * 3).to(args.device) for _ in range(4)] for B in BATCHES}
    else:
        step_ms, logits = model_steps(args.device, args.steps, clock)
    V = logits[1][0].shape[-1]
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, V {V}, "
          f"history {args.history} tokens, {'synthetic' if args.synthetic else 'model'} logits, sampler "
          f"{'PyTorch only' if Sampler(V, kernels=kernels).ops is None else 'with C++ kernels'}; median {args.clock} ms "
          f"per call")
    if step_ms:
        print(f"  {'model decode step':26s}          " + "  ".join(f"B={B}: {step_ms[B]:7.1f}" for B in BATCHES))
    for name, cfg in CONFIGS.items():
        for seeded in (False, True) if args.seeded else (False,):
            ms = {B: bench(cfg, logits[B], args.device, args.history, seeded, args.iters, clock, kernels)
                  for B in BATCHES}
            share = lambda B: f" ({ms[B] / step_ms[B]:5.1%})" if step_ms else ""
            print(f"  {name:26s} {'seeded' if seeded else '':8s} "
                  + "  ".join(f"B={B}: {ms[B]:7.2f}{share(B)}" for B in BATCHES))


if __name__ == "__main__":
    main()
