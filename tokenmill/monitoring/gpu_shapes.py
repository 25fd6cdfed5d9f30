"""`tokenmill bench --shape ... --quant ...` (GPU): decode and prefill speed of a model shape with random weights built on
the GPU (nothing to download), beside the bandwidth bound and the peers measured in the same run.

Bound: measured device copy bandwidth (bytes read + written) / bytes one decode step reads (every weight once, the
embedding row, and the KV cache of each sequence at that context), times the batch. Decode runs the runner's CUDA
graphs over a paged cache whose blocks hold random values; each step feeds back its greedy token on the GPU.
Peers: torch's int4 tinygemm (`_weight_int4pack_mm`, g128) swapped into the same graphs, and HF transformers bf16 on the
same shape (eager, and static cache + torch.compile) with `--peers`.
"""
from __future__ import annotations

import json
import statistics
import time

import torch
from torch import nn

from tokenmill.model.config import ModelConfig

SHAPES = {
    "llama3-8b": dict(architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=500000.0, max_position_embeddings=8192),
    "mistral-7b": dict(architecture="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=1e6, max_position_embeddings=8192),
    "qwen2-7b": dict(architecture="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                     num_heads=28, num_kv_heads=4, rope_theta=1e6, attention_bias=True, max_position_embeddings=8192),
    "smollm2-135m": dict(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=9, num_kv_heads=3, rope_theta=100000.0, tie_word_embeddings=True,
                         max_position_embeddings=8192),
}
BLOCK = 16


def add_arguments(p) -> None:
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--quant", default="q4g128", help="q4g128 | q4g32 | q8 | bf16, or several joined by commas")
    p.add_argument("--contexts", default="128,4096", help="batch-1 decode at these context lengths")
    p.add_argument("--batches", default="16,64", help="decode batch sizes (at the first context)")
    p.add_argument("--prefill", type=int, default=4096, help="prefill length (0: skip)")
    p.add_argument("--steps", type=int, default=128, help="decode steps timed per figure")
    p.add_argument("--peers", action="store_true", help="also HF transformers bf16 eager and static+compiled")
    p.add_argument("--no-tinygemm", action="store_true", help="skip the torch int4 tinygemm peer")
    p.add_argument("--json", help="write every figure to this file")


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 20 copies of 1 GiB)."""
    a = torch.randn(2**28, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(22):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * a.nbytes / statistics.median(times[2:])


def random_model(shape: str, seed: int = 0):
    """The plain Transformer of a shape with random bf16 weights made on the GPU (std 0.02, norms 1)."""
    from tokenmill.model.transformer import Transformer, rope_inv_freq

    cfg = ModelConfig(**SHAPES[shape])
    with torch.device("meta"):
        model = Transformer(cfg).to(torch.bfloat16)
    model.to_empty(device="cuda")
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).cuda()
    return model.eval(), cfg


def build_model(shape: str, quant: str, seed: int = 0):
    """random_model, then the runner's GPU preparation with `quant` (and programmatic dependent launch where the GPU
    has it, as tokenmill.load does)."""
    from tokenmill.kernels.gpu.matvec import pdl_supported
    from tokenmill.model.gpu import prepare_gpu_model

    model, cfg = random_model(shape, seed)
    prepare_gpu_model(model, quant=None if quant == "bf16" else quant, pdl=pdl_supported(torch.device("cuda")))
    return model, cfg


def bytes_per_step(model: nn.Module, cfg: ModelConfig, batch: int, context: int) -> int:
    """Weights once (the embedding: one row per sequence), plus each sequence's k and v at `context`."""
    emb = model.model.embed_tokens.weight
    total = 0
    seen = {emb.data_ptr()} if emb is not getattr(model.lm_head, "weight", None) else set()
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen and t.numel() > 64:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    kv = 2 * cfg.num_layers * context * cfg.num_kv_heads * cfg.head_dim * 2
    return total + batch * (kv + cfg.hidden_size * 2)


def decode_tps(model, cfg, batch: int, context: int, steps: int) -> float:
    """Tokens per second over `steps` graph replays at `context` cached tokens per sequence (greedy, fed back on GPU)."""
    from tokenmill.engine.cuda_graphs import DecodeGraphs
    from tokenmill.engine.kv_cache import PagedKVCache
    from tokenmill.kernels.gpu.matvec import pdl_supported

    per = -(-(context + steps + 8) // BLOCK)
    cache = PagedKVCache(cfg, batch * per, BLOCK, torch.bfloat16, "cuda", pdl=pdl_supported(torch.device("cuda")))
    cache.k.normal_(0, 1)
    cache.v.normal_(0, 1)
    graphs = DecodeGraphs(model, cache, per, buckets=(batch,))
    tables = torch.randperm(batch * per, device="cuda").view(batch, per).int()  # blocks scattered over the pool
    ids = torch.randint(0, cfg.vocab_size, (batch,), device="cuda")
    pos = torch.full((batch,), context, device="cuda")

    def step(ids, pos):
        slot = tables.gather(1, (pos // BLOCK)[:, None]).squeeze(1).long() * BLOCK + pos % BLOCK
        return graphs.run(ids, pos, slot, tables, (pos + 1).int()).argmax(-1), pos + 1

    for _ in range(4):  # capture + warm-up
        ids, pos = step(ids, pos)
    pos.fill_(context)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        ids, pos = step(ids, pos)
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def prefill_tps(model, cfg, n: int, repeat: int = 3) -> float:
    from tokenmill.engine.kv_cache import PagedKVCache

    cache = PagedKVCache(cfg, -(-n // BLOCK), BLOCK, torch.bfloat16, "cuda")
    table = list(range(cache.num_blocks))
    ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda")
    last = torch.tensor([n - 1], device="cuda")
    times = []
    with torch.inference_mode():
        for i in range(repeat + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            view = cache.view([0], [n], [table])
            model(ids, view.positions, view, logits_at=last)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return n / statistics.median(times[1:])


class TinygemmLinear(nn.Module):
    """Peer: torch's int4 CUDA kernel (w = (q - 8) * scale + zero, groups along K) on a dense weight rounded to it."""

    def __init__(self, w: torch.Tensor, group: int = 128):
        super().__init__()
        N, K = w.shape
        g = w.float().view(N, K // group, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(N, K)
        self.group, self.out_features, self.in_features = group, N, K
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack(
            (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8))
        sz = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1)  # (K / group, N, 2)
        self.register_buffer("scale_zero", sz.to(torch.bfloat16).contiguous())

    def forward(self, x):
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.packed, self.group, self.scale_zero)
        return y.view(*x.shape[:-1], self.out_features)


def tinygemm_model(shape: str):
    """The bf16 GPU model with every linear (lm_head included) swapped for TinygemmLinear."""
    model, cfg = build_model(shape, "bf16")
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and mod.in_features % 128 == 0 and mod.out_features % 8 == 0:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, TinygemmLinear(mod.weight.data))
    torch.cuda.empty_cache()
    return model, cfg


def hf_peers(shape: str, steps: int) -> dict[str, float]:
    """HF transformers bf16 on the same shape (random weights): batch-1 decode tok/s, eager and static+compiled."""
    import transformers

    s = SHAPES[shape]
    conf = transformers.AutoConfig.for_model(
        {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}[s["architecture"]],
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
        rope_theta=s["rope_theta"], tie_word_embeddings=s.get("tie_word_embeddings", False), max_position_embeddings=8192)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, s["vocab_size"], (1, 128), device="cuda")
    out = {}

    def tps(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t)

    with torch.inference_mode():
        tps(4)
        out["HF eager bf16"] = tps(min(steps, 32))
        # static cache: generate compiles the forward itself (torch.compile, CUDA graphs) on the first calls
        model.generation_config.cache_implementation = "static"
        t = time.perf_counter()
        try:
            tps(steps), tps(steps)
            out["HF static+compile warm-up s"] = time.perf_counter() - t
            out["HF static+compile bf16"] = tps(steps)
        except Exception as e:  # report the peer as missing, keep the rest of the run
            print(f"HF static+compile failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    del model
    torch.cuda.empty_cache()
    return out


def measure(model, cfg, args, bw: float) -> dict[str, dict[str, float]]:
    """{figure: {tok_s, bound_tok_s}} for one model."""
    res = {}
    contexts = [int(c) for c in args.contexts.split(",") if c]
    for ctx in contexts:
        tps = decode_tps(model, cfg, 1, ctx, args.steps)
        res[f"decode b1 ctx {ctx}"] = dict(tok_s=tps, bound=bw / bytes_per_step(model, cfg, 1, ctx))
    for b in [int(b) for b in args.batches.split(",") if b]:
        tps = decode_tps(model, cfg, b, contexts[0], args.steps)
        res[f"decode b{b} ctx {contexts[0]}"] = dict(tok_s=tps, bound=b * bw / bytes_per_step(model, cfg, b, contexts[0]))
    if args.prefill:
        res[f"prefill {args.prefill}"] = dict(tok_s=prefill_tps(model, cfg, args.prefill), bound=float("nan"))
    return res


def main(args) -> dict:
    """Run the GPU bench; prints one table, returns (and with --json writes) every figure."""
    if not torch.cuda.is_available():
        raise SystemExit("tokenmill bench --shape needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    report = dict(card=props.name, torch=torch.__version__, date=time.strftime("%Y-%m-%d"), shape=args.shape,
                  copy_bandwidth_gbs=bw / 1e9, variants={})
    print(f"{props.name}, torch {torch.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s, shape {args.shape}", flush=True)
    variants = [q for q in args.quant.split(",") if q and q != "none"] + ([] if args.no_tinygemm else
                                                                          ["tinygemm-int4-g128"])
    for quant in variants:
        torch.cuda.reset_peak_memory_stats()
        model, cfg = tinygemm_model(args.shape) if quant.startswith("tinygemm") else build_model(args.shape, quant)
        res = measure(model, cfg, args, bw)
        res["peak memory GiB"] = torch.cuda.max_memory_allocated() / 2**30
        report["variants"][quant] = res
        print(quant, json.dumps({k: v if isinstance(v, float) else {a: round(b, 1) for a, b in v.items()}
                                 for k, v in res.items()}), flush=True)
        del model
        torch.cuda.empty_cache()
    if args.peers:
        report["hf"] = hf_peers(args.shape, args.steps)
        print("hf", json.dumps(report["hf"]), flush=True)
    _print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def _print_table(report: dict) -> None:
    names = list(report["variants"])
    if not names:
        return print(json.dumps(report.get("hf", {})))
    figures = [k for k in report["variants"][names[0]] if k != "peak memory GiB"]
    print(f"\n| figure | " + " | ".join(f"{n} tok/s (% of bound)" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for k in figures:
        cells = []
        for n in names:
            v = report["variants"][n][k]
            pct = f" ({100 * v['tok_s'] / v['bound']:.0f}%)" if v["bound"] == v["bound"] else ""
            cells.append(f"{v['tok_s']:.0f}{pct}")
        print(f"| {k} | " + " | ".join(cells) + " |")
    print("| peak memory GiB | " + " | ".join(f"{report['variants'][n]['peak memory GiB']:.1f}" for n in names) + " |")
    for k, v in report.get("hf", {}).items():
        print(f"| {k} | {v:.1f} |")


if __name__ == "__main__":  # python -m tokenmill.monitoring.gpu_shapes --shape llama3-8b --quant q4g128,bf16
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    main(parser.parse_args())
