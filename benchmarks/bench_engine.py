"""Engine throughput: wikitext prompts through LLMEngine at several concurrencies, beside HF transformers' batched
`generate` in the same run.

    python benchmarks/bench_engine.py [--prompts 256] [--new-tokens 64] [--concurrency 1 8 32 64] [--write FILE]

Every request decodes exactly --new-tokens tokens (greedy, EOS ignored; transformers: min_new_tokens). Throughput is
generated tokens / wall time of the whole run, prefill included; tokens per CPU-second (all threads' time) is printed
beside it, as a check on a machine shared with other work. Concurrency 1 runs only --prompts-c1 prompts (its
tok/s does not depend on how many run one after another).
"""
import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch

import tokenmill
from tokenmill import SamplingParams
from tokenmill.monitoring.metrics_log import cpu_name
from tokenmill.engine.llm_engine import LLMEngine

REPO = Path(__file__).resolve().parents[1]
DATA = [REPO.parent / "shared/data/wikitext-2-raw-test.txt", Path("/work/shared/data/wikitext-2-raw-test.txt")]


def load_prompts(llm, path: Path | None, n: int, min_tokens: int, max_tokens: int) -> list[list[int]]:
    path = path or next((p for p in DATA if p.is_file()), DATA[0])
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        ids = llm.encode(line)
        if len(ids) >= min_tokens:
            out.append(ids[:max_tokens])
            if len(out) == n:
                return out
    raise SystemExit(f"{path} has only {len(out)} lines of >= {min_tokens} tokens, {n} wanted")


def bench_engine(engine: LLMEngine, prompts, new_tokens: int, concurrency: int) -> dict:
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    engine.scheduler.max_num_seqs = concurrency
    engine.reset_prefix_cache()
    t0, c0 = time.perf_counter(), time.process_time()
    outs = engine.generate(prompts, params)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    gen = sum(o.generated_tokens for o in outs)
    assert gen == len(prompts) * new_tokens
    return {"prompts": len(prompts), "tokens": gen, "wall": wall, "tps": gen / wall, "cpu": cpu}


def bench_hf(gguf: Path, prompts, new_tokens: int, batch: int, pad_id: int) -> dict:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    gen, t0, c0 = 0, time.perf_counter(), time.process_time()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
        gen += (out.shape[1] - width) * len(chunk)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"prompts": len(prompts), "tokens": gen, "wall": wall, "tps": gen / wall, "cpu": cpu}


def report(row):
    name, r = row
    print(f"  {name:42s} {r['prompts']:4d} prompts {r['wall']:7.1f} s {r['tps']:7.1f} tok/s "
          f"({r['tokens'] / r['cpu']:.1f} tok per CPU-second)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--prompts-c1", type=int, default=16, help="prompts for concurrency 1")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--min-prompt-tokens", type=int, default=32)
    ap.add_argument("--max-prompt-tokens", type=int, default=256, help="longer lines are cut to this many tokens")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--hf-batch", type=int, default=16, help="0: skip transformers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-cache-memory", default="1GiB")
    ap.add_argument("--max-batched-tokens", type=int, default=512, help="tokens per engine step (chunked prefill)")
    ap.add_argument("--data", type=Path)
    ap.add_argument("--compile", action="store_true", help="torch.compile the layers (exact; compiled before timing)")
    ap.add_argument("--int4", action="store_true", help="the fast CPU path: int8 activations x 4-bit weights (VNNI) "
                    "and a float16 KV cache (not exact)")
    ap.add_argument("--write", type=Path, help="also write the results as markdown to this file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    llm = tokenmill.load(compile=args.compile, int4=args.int4)
    if args.compile:
        print(f"compile/warm-up {llm.runner.warm_up():.1f} s (kept out of the figures)")
    prompts = load_prompts(llm, args.data, args.prompts, args.min_prompt_tokens, args.max_prompt_tokens)
    lens = sorted(len(p) for p in prompts)
    engine = LLMEngine(llm, kv_cache_memory=args.kv_cache_memory, max_num_seqs=max(args.concurrency),
                       max_num_batched_tokens=max(args.max_batched_tokens, max(args.concurrency)))
    head = (f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {datetime.date.today()}\n"
            f"model {llm.loaded.path.name} (fp32 compute, fused q/k/v and gate/up"
            f"{', compiled' if args.compile else ''}{', int4: int8 activations, fp16 KV' if args.int4 else ''}); {len(prompts)} wikitext-2 test lines, prompt tokens "
            f"min {lens[0]} / median {lens[len(lens) // 2]} / max {lens[-1]}; {args.new_tokens} new tokens each\n"
            f"{engine.describe()}\n"
            f"load average at start {os.getloadavg()[0]:.2f} (work other than this benchmark on the machine)")
    print(head, flush=True)
    rows = []
    engine.generate([prompts[0][:8]], SamplingParams(temperature=0, max_new_tokens=4))  # warm-up
    for c in args.concurrency:
        subset = prompts[: args.prompts_c1] if c == 1 else prompts
        r = bench_engine(engine, subset, args.new_tokens, c)
        rows.append((f"tokenmill engine, concurrency {c}", r))
        report(rows[-1])
    if args.hf_batch:
        import transformers

        r = bench_hf(llm.loaded.path, prompts, args.new_tokens, args.hf_batch, llm.tokenizer.eos_ids and
                     min(llm.tokenizer.eos_ids) or 0)
        rows.append((f"transformers {transformers.__version__} generate, batch {args.hf_batch}", r))
        report(rows[-1])
        base = r["tps"]
        for name, r in rows[:-1]:
            print(f"  {name:42s} {r['tps'] / base:5.2f}x transformers")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.write:
        base = rows[-1][1]["tps"] if args.hf_batch else None
        lines = ["| run | prompts | generated tokens | wall s | generation tok/s | vs transformers | tok per CPU-s |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, r in rows:
            rel = f"{r['tps'] / base:.2f}x" if base else "-"
            lines.append(f"| {name} | {r['prompts']} | {r['tokens']} | {r['wall']:.1f} | {r['tps']:.1f} | {rel} "
                         f"| {r['tokens'] / r['cpu']:.1f} |")
        tail = f"load average at end {os.getloadavg()[0]:.2f}"
        args.write.write_text("\n".join(["```", head, tail, "```", "", *lines, ""]), encoding="utf-8")


if __name__ == "__main__":
    main()
