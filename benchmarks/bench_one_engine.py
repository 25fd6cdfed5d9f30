"""Before / after a change to the request path, in one run: the user-facing figures of two source trees, measured
alternately (A B A B ...) in fresh processes on the same machine, so load from other work hits both alike.

    python benchmarks/bench_one_engine.py --trees OLD_TREE NEW_TREE [--rounds 2] [--out docs/perf/one-engine-cpu.json]

Figures (the default model, 2 threads; every generation greedy with EOS ignored):
  decode b1 exact / int4   generation tok/s of `llm.generate` after a short prompt (sampler and detokenizer included)
  prefill 512              prompt tok/s of `llm.generate` on a 512-token text prompt from an empty cache
  chat turn 1 / turn 30    generation tok/s of a ChatSession's replies, KV prefix of the earlier turns reused
  engine c64               LLMEngine throughput: --prompts wikitext lines x --new-tokens at concurrency 64
Each figure is the median of --repeat runs after a warm-up. Only the public API both trees have is used
(tokenmill.load, LLM.generate, ChatSession, LLMEngine).
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared/data/wikitext-2-raw-test.txt"
PROMPT = "The history of the city begins"


def chat_script() -> tuple[list[str], str]:
    """bench_chat.py's questions and system prompt, read without importing it (it imports this tree's layout)."""
    tree = ast.parse((REPO / "benchmarks/bench_chat.py").read_text())
    found = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name) and t.id in ("QUESTIONS", "SYSTEM")}
    return found["QUESTIONS"], found["SYSTEM"]


def measure(args) -> dict:
    """Runs inside one tree (PYTHONPATH points at it); one figure group per call."""
    import torch

    import tokenmill
    from tokenmill import SamplingParams

    torch.set_num_threads(args.threads)
    greedy = lambda n: SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)  # noqa: E731
    med = statistics.median
    out = {}
    if args.figure in ("decode", "int4"):
        llm = tokenmill.load(int4=args.figure == "int4")
        llm.generate(PROMPT, greedy(8))
        runs = []
        for _ in range(args.repeat):
            llm.reset_cache()
            runs.append(llm.generate(PROMPT, greedy(args.decode_tokens)).generation_tps)
        out[f"decode b1 {'int4' if args.figure == 'int4' else 'exact'} tok/s"] = (med(runs), runs)
    elif args.figure == "prefill":
        llm = tokenmill.load()
        text = DATA.read_text(encoding="utf-8")[:20000]
        ids = llm.encode(text)[:512]
        prompt = llm.tokenizer.decode(ids)
        n = len(llm.encode(prompt))
        llm.generate(prompt, greedy(1))
        runs = []
        for _ in range(args.repeat):
            llm.reset_cache()
            c = llm.generate(prompt, greedy(1))
            assert c.cached_tokens == 0
            runs.append(c.prompt_tps)
        out[f"prefill {n} tok/s"] = (med(runs), runs)
    elif args.figure == "chat":
        from tokenmill.chat import ChatSession

        QUESTIONS, SYSTEM = chat_script()
        llm = tokenmill.load()
        params = SamplingParams(temperature=0.0, max_new_tokens=48)
        llm.generate("Warm up.", params)
        plays = []
        for _ in range(args.repeat):
            llm.reset_cache()
            s = ChatSession(llm, params, system=SYSTEM, max_context=2048)
            turns = []
            for q in QUESTIONS[:30]:
                t = time.perf_counter()
                reply = s.send(q)
                for _ in reply:
                    pass
                c = reply.completion
                turns.append((c.generation_tps, c.generated_tokens / (time.perf_counter() - t), c.prompt_tokens,
                               c.cached_tokens))
            plays.append(turns)
        best = [max(p[i][0] for p in plays) for i in range(30)]  # other jobs only ever slow a turn down
        e2e = [max(p[i][1] for p in plays) for i in range(30)]
        out["chat turn 1-3 gen tok/s"] = (med(best[:3]), best[:3])
        out["chat turn 28-30 gen tok/s"] = (med(best[-3:]), best[-3:])
        out["chat turn 1-3 end-to-end tok/s"] = (med(e2e[:3]), e2e[:3])
        out["chat turn 28-30 end-to-end tok/s"] = (med(e2e[-3:]), e2e[-3:])
        out["chat turn 30 prompt / cached tokens"] = (plays[0][-1][2], [plays[0][-1][3]])
    elif args.figure == "engine":
        try:
            from tokenmill.engine.llm_engine import LLMEngine
        except ImportError:  # the flat layout before the package was split by concern
            from tokenmill.engine import LLMEngine
        llm = tokenmill.load()
        prompts = []
        for line in DATA.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("=") and len(llm.encode(line)) >= 32:
                prompts.append(llm.tokenizer.decode(llm.encode(line)[:256]))
                if len(prompts) == args.prompts:
                    break
        engine = LLMEngine(llm, kv_cache_memory="1GiB", max_num_seqs=64, max_num_batched_tokens=512)
        engine.generate(prompts[:2], greedy(4))
        runs = []
        for _ in range(args.repeat):
            engine.reset_prefix_cache()
            t = time.perf_counter()
            outs = engine.generate(prompts, greedy(args.new_tokens))
            runs.append(sum(c.generated_tokens for c in outs) / (time.perf_counter() - t))
        out[f"engine c64 tok/s ({args.prompts} x {args.new_tokens})"] = (med(runs), runs)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", nargs=2, metavar=("BEFORE", "AFTER"), help="two source trees (their roots)")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two trees per figure")
    ap.add_argument("--figures", nargs="+", default=["decode", "int4", "prefill", "chat", "engine"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--figure", help=argparse.SUPPRESS)  # internal: measure one group in this process
    args = ap.parse_args()
    if args.figure:
        print(json.dumps(measure(args)))
        return
    from tokenmill.monitoring.metrics_log import cpu_name

    result = {"machine": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "trees": args.trees, "runs": []}
    print(f"{result['machine']}, {args.threads} threads, {result['date']}", flush=True)
    for fig in args.figures:
        for r in range(args.rounds):
            for tree in args.trees:
                load = os.getloadavg()[0]
                cmd = [sys.executable, __file__, "--figure", fig, *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in
                       vars(args).items() if k in ("repeat", "threads", "decode_tokens", "prompts", "new_tokens")),
                       [])]
                t = time.perf_counter()
                p = subprocess.run(cmd, capture_output=True, text=True, cwd=tree,
                                   env={**os.environ, "PYTHONPATH": str(Path(tree).resolve())})
                if p.returncode:
                    sys.exit(f"{tree} {fig}: {p.stderr[-2000:]}")
                figs = json.loads(p.stdout.strip().splitlines()[-1])
                row = {"figure": fig, "round": r, "tree": tree, "load_before": round(load, 2),
                       "load_after": round(os.getloadavg()[0], 2), "seconds": round(time.perf_counter() - t, 1),
                       "figures": figs}
                result["runs"].append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
