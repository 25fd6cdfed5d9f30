"""CPU speed on the default model: tokenmill's paths beside HF transformers (and llama.cpp when `llama-cpp-python`
is installed), measured in the same run on the same GGUF file.

    python benchmarks/bench_cpu.py [--threads 2] [--repeat 3] [--variants exact compiled int4] [--no-peers]
                                   [--write docs/perf/cpu-speed.md]

Figures (the issue's list): decode batch 1 after a short prompt and at 2,048 tokens of context, prefill of 512 and
2,048 tokens, batched decode at 16 and 64 rows (total tok/s). Each is the median of --repeat runs after a warm-up;
the spread is half the range. Decode figures time the runner's forward + argmax (no sampler or detokenizer), the same
for every engine: HF runs `model(...)` with its DynamicCache step by step, llama.cpp `Llama.eval` token by token.
Compilation (`compiled`, `int4`) is run once before timing and reported on its own line.

tokenmill variants (with our C++ kernels, kernels/cpu/csrc/quant_matmul.cpp, when they build; `torch-` variants
without them, `tokenmill.load(kernels="torch")`):
  exact     fused q/k/v and gate/up; Q4_1 layers and the Q8_0 lm_head kept as GGUF blocks, multiplied by our AVX-512
            kernel with fp32 activations (weights dequantized in registers) below 32 rows, MKL's fp32 GEMM on the
            dequantized weights from 32 rows (prefill). Exact up to summation order (parity tests hold)
  compiled  exact + torch.compile of each layer's halves and the head (exact)
  int4      int8 activations (per block of 32) x the 4-bit layers and the Q8_0 lm_head, VNNI dot products, at every
            row count (~2.5-3.5% of the logit range with the fp16 KV cache it implies, like llama.cpp's Q4 x Q8 products); int4+compiled: both
  torch-*   the same without our kernels: fp32 weights (MKL), the compiled Q8_0 lm_head, torch's int4 CPU kernel
            (bf16 activations, ~1% logit error) for fewer than 32 rows
"""
import argparse
import datetime
import os
import platform
import statistics
import time

import torch

import tokenmill
from tokenmill.engine.scratch import ScratchCache
from tokenmill.monitoring.metrics_log import cpu_name

CONTEXT = 2048


def stats(xs):
    return statistics.median(xs), (max(xs) - min(xs)) / 2


def timed(fn, repeat: int):
    fn()  # warm-up
    return stats([fn() for _ in range(repeat)])


def the_figures(decode, prefill, a, batched: bool = True) -> dict:
    """decode(ctx, rows, steps) and prefill(n) make timed runs returning tok/s; -> {figure: (median, spread)}."""
    out = {"decode b1, short prompt": timed(decode(16, 1, a.tokens), a.repeat),
           f"decode b1, {CONTEXT} context": timed(decode(CONTEXT, 1, a.tokens // 2), a.repeat),
           "prefill 512": timed(prefill(512), a.repeat),
           "prefill 2048": timed(prefill(2048), a.repeat)}
    if batched:
        out["decode b16 (total)"] = timed(decode(64, 16, 16), a.repeat)
        out["decode b64 (total)"] = timed(decode(64, 64, 8), a.repeat)
    return out


def tokenmill_figures(llm, a) -> dict:
    r, V = llm.runner, llm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, V, (CONTEXT + 64,), generator=g).tolist()

    def decode(ctx: int, rows: int, steps: int):
        def run():
            cache = ScratchCache(r, rows, ctx + steps + 1)
            cache.lengths = [ctx] * rows  # k/v content does not change the speed; lengths do
            toks = [ids[ctx]] * rows
            t = time.perf_counter()
            for _ in range(steps):
                toks = cache.decode(list(range(rows)), toks).argmax(-1).tolist()
            return rows * steps / (time.perf_counter() - t)
        return run

    def prefill(n: int):
        def run():
            cache = ScratchCache(r, 1, n)
            t = time.perf_counter()
            cache.prefill(0, ids[:n])
            return n / (time.perf_counter() - t)
        return run

    return the_figures(decode, prefill, a)


def hf_figures(path, a) -> dict | None:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, V, (CONTEXT + 64,), generator=g)

    def decode(ctx: int, rows: int, steps: int):
        def run():
            with torch.inference_mode():
                o = model(ids[:ctx].repeat(rows, 1), use_cache=True, logits_to_keep=1)
                past, tok = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
                t = time.perf_counter()
                for _ in range(steps):
                    o = model(tok, past_key_values=past, use_cache=True)
                    past, tok = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
                return rows * steps / (time.perf_counter() - t)
        return run

    def prefill(n: int):
        def run():
            with torch.inference_mode():
                t = time.perf_counter()
                model(ids[None, :n], logits_to_keep=1)
                return n / (time.perf_counter() - t)
        return run

    return the_figures(decode, prefill, a)


def llama_cpp_figures(path, a) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(str(path), n_ctx=CONTEXT + 128, n_threads=a.threads, n_batch=2048, verbose=False)
    V = llm.n_vocab()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, V, (CONTEXT + 64,), generator=g).tolist()

    def decode(ctx: int, steps: int):
        def run():
            llm.reset()
            llm.eval(ids[:ctx])
            t = time.perf_counter()
            for i in range(steps):
                llm.eval([ids[ctx + i]])
            return steps / (time.perf_counter() - t)
        return run

    def prefill(n: int):
        def run():
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids[:n])
            return n / (time.perf_counter() - t)
        return run

    return the_figures(lambda ctx, rows, steps: decode(ctx, steps), prefill, a, batched=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per batch-1 run (half at long context)")
    variants = ["exact", "compiled", "int4", "int4+compiled"]
    ap.add_argument("--variants", nargs="+", default=variants + ["torch-compiled", "torch-int4+compiled"],
                    choices=variants + [f"torch-{v}" for v in variants])
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--write", help="append the markdown table to this file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    head = (f"{cpu_name()}, {os.cpu_count()} cores, {a.threads} threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
            f"load average at start {os.getloadavg()[0]:.2f}")
    print(head, flush=True)
    cols: dict[str, dict] = {}
    notes = []
    for v in a.variants:
        torch._dynamo.reset()  # each variant compiles afresh: dynamo's cache is per code object, shared by every model
        # torch-*: session 2's paths as they were (fp32 KV cache: SDPA would widen a 16-bit cache every step)
        llm = tokenmill.load(threads=a.threads, compile="compiled" in v, int4="int4" in v,
                             kv_dtype="float32" if v.startswith("torch-") else None,
                             kernels="torch" if v.startswith("torch-") else "auto")
        if "compiled" in v:
            notes.append(f"{v}: compile/warm-up {llm.runner.warm_up():.1f} s (kept out of the figures)")
            print(notes[-1], flush=True)
        cols[f"tokenmill {v}"] = tokenmill_figures(llm, a)
        print(v, {k: round(m, 1) for k, (m, _) in cols[f"tokenmill {v}"].items()}, flush=True)
        path = llm.loaded.path
        del llm
    if not a.no_peers:
        for name, fn in (("HF transformers fp32", hf_figures), ("llama.cpp", llama_cpp_figures)):
            res = fn(path, a)
            if res is None:
                notes.append(f"{name}: not installed, not run")
            else:
                cols[name] = res
                print(name, {k: round(m, 1) for k, (m, _) in res.items()}, flush=True)
    rows = list(next(iter(cols.values())))
    hf = cols.get("HF transformers fp32")
    lines = ["| figure | " + " | ".join(cols) + (" | best tokenmill / HF |" if hf else " |"),
             "| --- |" + " ---: |" * (len(cols) + bool(hf))]
    for k in rows:
        cells = [f"{c[k][0]:.1f} ± {c[k][1]:.1f}" if k in c else "-" for c in cols.values()]
        best = max(c[k][0] for n, c in cols.items() if n.startswith("tokenmill"))
        lines.append(f"| {k} | " + " | ".join(cells) + (f" | {best / hf[k][0]:.2f}x |" if hf else " |"))
    table = "\n".join(lines)
    tail = f"load average at end {os.getloadavg()[0]:.2f}"
    print(table, "\n" + "\n".join(notes), "\n" + tail)
    if a.write:
        with open(a.write, "a", encoding="utf-8") as f:
            f.write(f"\n## Run {datetime.date.today()}\n\n{head}\n\n" + "\n".join(f"- {n}" for n in notes)
                    + f"\n\n{table}\n\n{tail}\n")


if __name__ == "__main__":
    main()
