"""Chat slowdown over a long conversation: 30 scripted turns played three ways, tok/s and latency per turn.

    python benchmarks/bench_chat.py [--turns 30] [--max-context 2048] [--max-tokens 48] [--threads 2] [--repeat 3]
                                    [--out docs/perf/chat-cpu]

Modes: `no-reuse` (full history, the KV cache reset before each turn, so the whole prompt is computed), `reuse` (full
history, the previous turn's KV prefix reused) and `amnesia` (system prompt + the new message only). Each mode has its
own LLM over the same weights and the modes take turns, so a burst of load on a shared machine hits all three alike.
Per turn the fastest of `--repeat` plays is reported (other jobs on a shared machine only ever slow a turn down); the
median and every play's raw figures are in the JSON too. Writes OUT.json and OUT.png (matplotlib, imported only here).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import tokenmill
from tokenmill.monitoring.metrics_log import cpu_name
from tokenmill.chat import ChatSession
from tokenmill.llm import LLM
from tokenmill.sampling.params import SamplingParams

SYSTEM = "You are a concise assistant."
QUESTIONS = [
    "What is a black hole?", "How do vaccines work?", "Why is the sky blue?", "What causes earthquakes?",
    "How does a rainbow form?", "What is photosynthesis?", "Why do we dream?", "How do airplanes fly?",
    "What is inflation?", "How do tides work?", "What is DNA?", "Why do leaves change color?",
    "How does the internet work?", "What is gravity?", "How do bees make honey?", "What is a volcano?",
    "Why is the ocean salty?", "How do magnets work?", "What is climate change?", "How do muscles grow?",
    "What is a star?", "Why do cats purr?", "How does a battery work?", "What is an atom?",
    "How do clouds form?", "What is a neuron?", "Why do we sleep?", "How does soap clean?",
    "What is electricity?", "How do plants drink water?",
]
MODES = ("no-reuse", "reuse", "amnesia")
FIELDS = ("prompt_tokens", "cached_tokens", "new_tokens", "prompt_tps", "generated_tokens", "generation_tps",
          "latency_s", "end_to_end_tps", "context_used", "left_out")
BEST = {"prompt_tps": max, "generation_tps": max, "end_to_end_tps": max, "latency_s": min}


def play_turn(session: ChatSession, mode: str, question: str) -> dict:
    if mode == "no-reuse":
        session.llm.reset_cache()
    reply = session.send(question)
    for _ in reply:
        pass
    c = reply.completion
    return {
        "prompt_tokens": c.prompt_tokens, "cached_tokens": c.cached_tokens, "new_tokens": c.prompt_tokens - c.cached_tokens,
        "prompt_tps": c.prompt_tps, "generated_tokens": c.generated_tokens, "generation_tps": c.generation_tps,
        "latency_s": reply.seconds, "end_to_end_tps": c.generated_tokens / reply.seconds,
        "context_used": session.context_used, "left_out": reply.turn.left_out, "reply": c.text,
    }


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if x in flags]


def run(args) -> dict:
    load_start = os.getloadavg()
    base = tokenmill.load(args.model, threads=args.threads)
    params = SamplingParams(temperature=0.0, max_new_tokens=args.max_tokens)
    llms = {m: LLM(base.loaded, threads=args.threads) for m in MODES}  # own caches, shared weights
    llms["reuse"].generate("Warm up.", params)
    plays = []  # plays[r][mode] -> list of per-turn dicts
    questions = (QUESTIONS * (args.turns // len(QUESTIONS) + 1))[: args.turns]
    for r in range(args.repeat):
        sessions = {}
        for m, llm in llms.items():
            llm.reset_cache()
            sessions[m] = ChatSession(llm, params, system=SYSTEM, max_context=args.max_context, amnesia=m == "amnesia")
        rows = {m: [] for m in MODES}
        for i, q in enumerate(questions):
            for m in MODES:
                rows[m].append(play_turn(sessions[m], m, q))
            print(f"play {r + 1}/{args.repeat} turn {i + 1:2d}: " + " | ".join(
                f"{m} {rows[m][-1]['new_tokens']:4d} new {rows[m][-1]['generation_tps']:5.1f} tok/s "
                f"{rows[m][-1]['latency_s']:5.2f} s" for m in MODES), flush=True)
        plays.append(rows)
    def per_turn(pick):
        return {m: [{k: round(pick(k)(p[m][i][k] for p in plays), 3) for k in FIELDS} | {"turn": i + 1}
                    for i in range(args.turns)] for m in MODES}

    turns = per_turn(lambda k: BEST.get(k, statistics.median_low))  # token counts: equal in every play (greedy)
    medians = per_turn(lambda k: statistics.median if k in BEST else statistics.median_low)
    same = sum(a["reply"] == b["reply"] for a, b in zip(plays[0]["no-reuse"], plays[0]["reuse"]))
    return {
        "machine": {"cpu": cpu_name(), "cores_visible": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "cpu_flags": cpu_flags(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": base.loaded.path.name,
        "settings": {"turns": args.turns, "max_context": args.max_context, "max_tokens": args.max_tokens,
                     "temperature": 0.0, "repeat": args.repeat, "system": SYSTEM},
        "greedy_replies_identical_reuse_vs_no_reuse": f"{same}/{args.turns}",
        "summary": {m: summarize(turns[m]) for m in MODES},
        "summary_of_medians": {m: summarize(medians[m]) for m in MODES},
        "turns": turns,
        "turns_median": medians,
        "plays": [{m: [[round(row[k], 3) for k in FIELDS] for row in p[m]] for m in MODES} for p in plays],
        "plays_fields": FIELDS,
        "replies_first_play": {m: [row["reply"] for row in plays[0][m]] for m in MODES},
    }


def summarize(rows: list[dict]) -> dict:
    """Turns 1-3 against the last 3 (medians), so one noisy turn does not decide the figure."""
    out = {}
    for k in ("generation_tps", "end_to_end_tps", "prompt_tps", "latency_s", "new_tokens"):
        first = statistics.median(r[k] for r in rows[:3])
        last = statistics.median(r[k] for r in rows[-3:])
        out[k] = {"first3": round(first, 3), "last3": round(last, 3),
                  "change_pct": round(100 * (last - first) / first, 1) if first else None}
    out["turn1_vs_last_generation_tps"] = [round(rows[0]["generation_tps"], 2), round(rows[-1]["generation_tps"], 2)]
    out["max_context_used"] = max(r["context_used"] for r in rows)
    out["turns_with_history_left_out"] = sum(r["left_out"] > 0 for r in rows)
    return out


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("generation_tps", "generation tok/s"), ("end_to_end_tps", "generated tok / turn latency (tok/s)"),
              ("latency_s", "turn latency (s)"), ("new_tokens", "prompt tokens computed"))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (key, label) in zip(axes.flat, panels):
        for m, rows in result["turns"].items():
            ax.plot([r["turn"] for r in rows], [r[key] for r in rows], marker="o", ms=3, label=m)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    for ax in axes[1]:
        ax.set_xlabel("turn")
    axes[0][0].legend()
    mc = result["machine"]
    fig.suptitle(f"tokenmill chat, {result['model']}, greedy replies of <= {result['settings']['max_tokens']} tokens, "
                 f"max context {result['settings']['max_context']}, fastest of {result['settings']['repeat']} plays "
                 f"per turn\n{mc['cpu']}, {mc['threads']} threads, torch {mc['torch']}, {result['date'][:10]}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--turns", type=int, default=30)
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="docs/perf/chat-cpu", help="writes OUT.json and OUT.png")
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = run(args)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    for m, s in result["summary"].items():
        print(f"{m:9s} gen tok/s {s['generation_tps']['first3']:.1f} -> {s['generation_tps']['last3']:.1f} "
              f"({s['generation_tps']['change_pct']:+.0f}%) | end-to-end tok/s {s['end_to_end_tps']['first3']:.1f} -> "
              f"{s['end_to_end_tps']['last3']:.1f} ({s['end_to_end_tps']['change_pct']:+.0f}%) | latency "
              f"{s['latency_s']['first3']:.2f} -> {s['latency_s']['last3']:.2f} s")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
