"""`tokenmill bench` (CPU): decode and prefill speed on a loaded model, beside the memory-bandwidth bound.

Bound for decode: measured copy bandwidth / bytes of weights read per token. Peers (`--peers`): HF transformers fp32 on the
same weights, measured in the same run when transformers is installed.
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def copy_bandwidth_gbs(mb: int = 256, repeat: int = 5) -> float:
    """Read+write bandwidth of a large tensor copy, GB/s (best of `repeat`)."""
    a = torch.empty(mb * 2**20 // 4)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best / 1e9


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of parameters one decode step reads: every weight once (tied embeddings once, as the lm_head read)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median(xs):
    return statistics.median(xs), (max(xs) - min(xs)) / 2


def bench_tokenmill(llm, decode_tokens: int, prefill_lens: list[int], repeat: int) -> dict[str, tuple[float, float]]:
    from .sampling import SamplingParams

    res = {}
    params = SamplingParams(temperature=0.0, max_new_tokens=decode_tokens, ignore_eos=True)
    prompt = "The history of the city begins"
    llm.generate(prompt, params.__class__(temperature=0.0, max_new_tokens=8))  # warm-up
    runs = []
    for _ in range(repeat):
        llm.reset_cache()
        runs.append(llm.generate(prompt, params).generation_tps)
    res[f"decode b1 ({decode_tokens} tok)"] = _median(runs)
    g = torch.Generator().manual_seed(0)
    for n in prefill_lens:
        ids = torch.randint(100, llm.config.vocab_size, (n,), generator=g).tolist()
        cache = llm.runner.new_cache(1, n)
        runs = []
        for i in range(repeat + 1):
            cache.reset()
            t = time.perf_counter()
            llm.runner.prefill(cache, 0, ids)
            if i:  # the first run is warm-up
                runs.append(n / (time.perf_counter() - t))
        res[f"prefill {n}"] = _median(runs)
    return res


def bench_hf(path, decode_tokens: int, prefill_lens: list[int], repeat: int) -> dict[str, tuple[float, float]] | None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": path.name} if path.is_file() else {}
    model = AutoModelForCausalLM.from_pretrained(path.parent if path.is_file() else path, dtype=torch.float32, **kw)
    model.eval()
    res = {}
    ids = torch.tensor([[1, 504, 3575, 282, 260, 3327, 3513]])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        runs = []
        for _ in range(repeat):
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False)
            runs.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t))
        res[f"decode b1 ({decode_tokens} tok)"] = _median(runs)
        g = torch.Generator().manual_seed(0)
        for n in prefill_lens:
            x = torch.randint(100, model.config.vocab_size, (1, n), generator=g)
            runs = []
            for i in range(repeat + 1):
                t = time.perf_counter()
                model(x, logits_to_keep=1)
                if i:
                    runs.append(n / (time.perf_counter() - t))
            res[f"prefill {n}"] = _median(runs)
    return res


def run_cpu_bench(args):
    from rich.console import Console
    from rich.table import Table

    from .llm import load

    con = Console()
    llm = load(args.model, threads=args.threads)
    threads = torch.get_num_threads()
    bw = copy_bandwidth_gbs()
    wbytes = weight_bytes_per_token(llm.runner.model)
    bound = bw * 1e9 / wbytes
    con.print(f"[bold]{cpu_name()}[/bold], {threads} threads, torch {torch.__version__}, {os.cpu_count()} cores visible")
    con.print(f"model {llm.loaded.path.name}: {wbytes / 2**20:.0f} MiB of {llm.runner.dtype} weights read per token; "
              f"copy bandwidth {bw:.1f} GB/s -> decode bound {bound:.0f} tok/s")
    ours = bench_tokenmill(llm, args.decode_tokens, args.prefill, args.repeat)
    peer = bench_hf(llm.loaded.path, args.decode_tokens, args.prefill, args.repeat) if args.peers else None
    t = Table(title="tokenmill bench (median of runs, ± half the range)")
    t.add_column("figure")
    t.add_column("tokenmill tok/s", justify="right")
    t.add_column("% of bound", justify="right")
    if peer:
        t.add_column("HF transformers fp32", justify="right")
        t.add_column("ratio", justify="right")
    for k, (med, spread) in ours.items():
        row = [k, f"{med:.1f} ± {spread:.1f}", f"{100 * med / bound:.0f}%" if k.startswith("decode") else "-"]
        if peer:
            pm = peer[k][0]
            row += [f"{pm:.1f} ± {peer[k][1]:.1f}", f"{med / pm:.2f}x"]
        t.add_row(*row)
    con.print(t)
    return ours, peer
