"""The classic `tokenmill bench` table (no suite named): decode and prefill tok/s for the exact fp32 path and the int4
decode kernel, beside the memory-bandwidth bound and HF transformers fp32 on the same weights (`--peers`).

Bound for decode: measured copy bandwidth / bytes of weights read per token.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from tokenmill.monitoring.metrics_log import cpu_name


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
    """Bytes of weights one decode step reads: every tensor once (tied embeddings once, as the lm_head read); for an
    Int4Linear its packed weight and scales, not the dense copy kept for prefill."""
    from tokenmill.kernels.cpu.linear import BlockLinear, Int4Linear

    seen, total = set(), 0
    skip = {m.dense.data_ptr() for m in model.modules()
            if isinstance(m, (Int4Linear, BlockLinear)) and m.dense is not None}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen and t.data_ptr() not in skip and t.numel() > 64:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _median(xs):
    return statistics.median(xs), (max(xs) - min(xs)) / 2


def bench_tokenmill(llm, s: dict) -> dict[str, tuple[float, float]]:
    from tokenmill.monitoring import suites

    figs = {**suites.decode(llm, s, lambda _: None)["figures"], **suites.prefill(llm, s, lambda _: None)["figures"]}
    rename = {"decode b1 tok/s": f"decode b1 ({s['decode_tokens']} tok)"}
    return {rename.get(k, k.removesuffix(" tok/s")): (f["median"], f["spread"]) for k, f in figs.items()}


def bench_hf(path, s: dict) -> dict[str, tuple[float, float]] | None:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    kw = {"gguf_file": path.name} if path.is_file() else {}
    model = AutoModelForCausalLM.from_pretrained(path.parent if path.is_file() else path, dtype=torch.float32, **kw)
    model.eval()
    res, n_dec, repeat = {}, s["decode_tokens"], s["repeat"]
    ids = torch.tensor([[1, 504, 3575, 282, 260, 3327, 3513]])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        runs = []
        for _ in range(repeat):
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=n_dec, min_new_tokens=n_dec, do_sample=False)
            runs.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t))
        res[f"decode b1 ({n_dec} tok)"] = _median(runs)
        g = torch.Generator().manual_seed(0)
        for n in s["prefill"]:
            x = torch.randint(100, model.config.vocab_size, (1, n), generator=g)
            runs = []
            for i in range(repeat + 1):
                t = time.perf_counter()
                model(x, logits_to_keep=1)
                if i:
                    runs.append(n / (time.perf_counter() - t))
            res[f"prefill {n}"] = _median(runs)
    return res


def run_cpu_bench(args, s: dict):
    """Print the table; `s` holds decode_tokens, prefill (lengths) and repeat."""
    from rich.console import Console
    from rich.table import Table

    from tokenmill.llm import load

    con = Console(soft_wrap=True)
    bw = copy_bandwidth_gbs()
    variants = {}
    for name, int4 in (("fp32 (exact)", False), ("int4", True)):
        llm = load(args.model, threads=args.threads, int4=int4)
        if not variants:
            con.print(f"[bold]{cpu_name()}[/bold], {torch.get_num_threads()} threads, torch {torch.__version__}, "
                      f"{os.cpu_count()} cores visible, copy bandwidth {bw:.1f} GB/s")
        if int4 and not llm.runner.int4_layers:
            continue
        wbytes = weight_bytes_per_token(llm.runner.model)
        bound = bw * 1e9 / wbytes
        con.print(f"{name}: {wbytes / 2**20:.0f} MiB of weights read per token -> decode bound {bound:.0f} tok/s")
        variants[name] = (bound, bench_tokenmill(llm, s))
    peer = bench_hf(llm.loaded.path, s) if args.peers else None
    t = Table(title=f"tokenmill bench: {llm.loaded.path.name} (median of {s['repeat']} runs, +- half the range)")
    t.add_column("figure")
    for name in variants:
        t.add_column(f"{name} tok/s", justify="right")
        t.add_column("% of bound", justify="right")
    if peer:
        t.add_column("HF transformers fp32 tok/s", justify="right")
        t.add_column("best / HF", justify="right")
    for k in next(iter(variants.values()))[1]:
        row = [k]
        for bound, res in variants.values():
            med, spread = res[k]
            row += [f"{med:.1f} +- {spread:.1f}", f"{100 * med / bound:.0f}%" if k.startswith("decode") else "-"]
        if peer:
            best = max(res[k][0] for _, res in variants.values())
            row += [f"{peer[k][0]:.1f} +- {peer[k][1]:.1f}", f"{best / peer[k][0]:.2f}x"]
        t.add_row(*row)
    con.print(t)
    return variants, peer
