"""`tokenmill bench`: speed and quality suites, saved baselines, comparisons and reports.

    tokenmill bench --threads 2 --peers            decode / prefill beside the bandwidth bound and HF transformers
    tokenmill bench decode context batch ...       suites (monitoring/suites.py); `all` runs every one
    tokenmill bench ... --save-baseline NAME       store the result with its environment (monitoring/baseline.py)
    tokenmill bench --compare NAME                 rerun NAME's suites with its settings; exit 1 on a regression
    tokenmill bench report [--compare NAME]        the latest result as PNG plots + one HTML page (monitoring/report.py)

The decode bound: measured copy bandwidth / bytes of weights read per token. Peers (`--peers`): HF transformers fp32
on the same weights, measured in the same run when transformers is installed.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import time
from pathlib import Path

from tokenmill.cli.flags import Parser, add_load_flags, positive_int
from tokenmill.errors import InvalidRequestError, UnsupportedError

SUITE_NAMES = ("decode", "context", "prefill", "batch", "chat", "quality")
# settings of a suite run; None = derived from the model (context steps and prefill lengths: 128, 512, ... max)
DEFAULTS = {"decode_tokens": 256, "prefill": None, "repeat": 3, "context": None, "context_tokens": 32,
            "concurrency": [1, 2, 4, 8, 16, 32], "batch_prompt": 64, "batch_tokens": 32, "kv_cache_memory": None,
            "chat_turns": 10, "chat_tokens": 32, "ppl_file": None, "ppl_ctx": 512, "ppl_chunks": 40,
            "golden_tokens": 32, "model": None, "threads": None, "int4": False, "compile": False, "device": "cpu",
            "dtype": None}


def _fraction(s: str) -> float:
    x = float(s)
    if not 0 < x < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1) such as 0.1, got {s}")
    return x


def add_parser(sub):
    """Register `bench` on the CLI's subparsers."""
    b = sub.add_parser("bench", help="measure speed and quality; save baselines, compare, report",
                       description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="Exit status: 0, 1 when --compare finds a "
                       "regression, 2 on an error. Baselines: --baseline-dir, default ~/.cache/tokenmill/baselines.")
    b.add_argument("suites", nargs="*", metavar="SUITE", help=f"{', '.join(SUITE_NAMES)}, all, or report")
    add_load_flags(b)
    n, ns = dict(type=positive_int), dict(type=positive_int, nargs="+")
    b.add_argument("--repeat", **n, help="runs per figure after a warm-up; the median is reported (default 3)")
    b.add_argument("--decode-tokens", **n, help="decode: tokens to generate (default 256)")
    b.add_argument("--prefill", **ns, help="prefill: prompt lengths (default 512 2048; suites: 128, 512 ... max)")
    b.add_argument("--context", **ns, help="context: cache lengths to decode at (default 128, 512 ... max)")
    b.add_argument("--context-tokens", **n, help="context: tokens decoded at each length (default 32)")
    b.add_argument("--concurrency", **ns, help="batch: concurrencies, a x2 ladder (default 1 2 4 8 16 32)")
    b.add_argument("--batch-prompt", **n, help="batch: prompt tokens per request (default 64)")
    b.add_argument("--batch-tokens", **n, help="batch: tokens generated per request (default 32)")
    b.add_argument("--kv-cache-memory", help="batch: KV cache size, e.g. 2GiB (default: the engine's)")
    b.add_argument("--chat-turns", **n, help="chat: turns (default 10)")
    b.add_argument("--chat-tokens", **n, help="chat: reply tokens at most (default 32)")
    b.add_argument("--ppl-file", help="quality: text for perplexity (default ../shared/data/wikitext-2-raw-test.txt)")
    b.add_argument("--ppl-ctx", **n, help="quality: tokens per perplexity chunk (default 512)")
    b.add_argument("--ppl-chunks", **n, help="quality: chunks scored (default 40)")
    b.add_argument("--golden-tokens", **n, help="quality: greedy tokens per golden prompt (default 32)")
    b.add_argument("--peers", action="store_true", help="also run HF transformers fp32 in the same run (if installed)")
    b.add_argument("--save-baseline", metavar="NAME", help="save the result as baseline NAME")
    b.add_argument("--compare", metavar="NAME", help="compare with baseline NAME (or a .json file); rerun its suites "
                   "with its settings unless suites and flags are given")
    b.add_argument("--threshold", type=_fraction, help="--compare: smallest relative change that can regress "
                   "(default 0.05; raise it on a shared machine whose runs drift more than their own spread)")
    b.add_argument("--baseline-dir", help="where baselines are (default ~/.cache/tokenmill/baselines)")
    b.add_argument("--report", metavar="DIR", help="write report.html and PNG plots to DIR (bench report: default "
                   "./bench-report)")
    b.add_argument("--results", help="bench report: the result JSON to render (default: the latest run)")
    for flag in ("--shape", "--quant"):  # the GPU bench parses its own flags (they overlap these: --prefill)
        b.add_argument(flag, dest=f"gpu_{flag[2:]}", nargs=argparse.REMAINDER, metavar="...",
                       help="GPU bench of a model shape with random weights: this flag and every argument after it go "
                       "to tokenmill.monitoring.gpu_shapes (tokenmill bench --shape NAME --help lists them)")
    b.set_defaults(func=cmd_bench)
    return b


def run_gpu_bench(args) -> int:
    """`--shape` / `--quant`: monitoring/gpu_shapes.py's bench, its flags (gpu_shapes.add_arguments) parsed from the
    first of the two on; gpu_shapes.main(args) prints its table. Imported here only: it needs triton."""
    flag, rest = ("--shape", args.gpu_shape) if args.gpu_shape is not None else ("--quant", args.gpu_quant)
    if importlib.util.find_spec("triton") is None:
        raise UnsupportedError(f"{flag} needs triton and a CUDA device (the GPU bench); this install has no triton")
    gpu = importlib.import_module("tokenmill.monitoring.gpu_shapes")
    p = Parser(prog="tokenmill bench --shape/--quant")
    gpu.add_arguments(p)
    gpu.main(p.parse_args([flag, *rest, *(["--peers"] if args.peers else [])]))
    return 0


def latest_path() -> Path:
    """The last suite run, for `bench report`: ~/.cache/tokenmill/bench-latest.json (whatever --baseline-dir says)."""
    from tokenmill.monitoring.baseline import default_dir

    return default_dir().parent / "bench-latest.json"


def cmd_bench(args) -> int:
    if args.gpu_shape is not None or args.gpu_quant is not None:
        return run_gpu_bench(args)
    suites = list(dict.fromkeys(SUITE_NAMES if "all" in args.suites else args.suites))
    bad = [s for s in suites if s not in SUITE_NAMES + ("report",)]
    if bad:
        raise InvalidRequestError(f"unknown suite {bad[0]!r}; choose from {', '.join(SUITE_NAMES)}, all, report")
    if "report" in suites:
        if len(suites) > 1:
            raise InvalidRequestError("`bench report` renders a saved result; run the suites first, or add --report")
        return cmd_report(args)
    if not suites and not args.save_baseline and not args.compare:
        from tokenmill.monitoring.peers import run_cpu_bench

        run_cpu_bench(args, {k: getattr(args, k) or v for k, v in
                             {"decode_tokens": 256, "prefill": [512, 2048], "repeat": 3}.items()})
        return 0
    return run_suites(args, suites)


def settings_from(args, base: dict | None) -> dict:
    """Explicit flags first, then the baseline's settings (a comparison reruns what was saved), then DEFAULTS."""
    saved = (base or {}).get("settings", {})
    out = {k: next((v for v in (getattr(args, k, None), saved.get(k)) if v is not None), d)
           for k, d in DEFAULTS.items()}
    for flag in ("int4", "compile"):  # store_true flags: absent means "as saved"
        out[flag] = bool(getattr(args, flag, False) or saved.get(flag))
    return out


def run_suites(args, suites: list[str]) -> int:
    from rich.console import Console

    from tokenmill.monitoring import baseline
    from tokenmill.monitoring import suites as S
    from tokenmill.llm import load

    con = Console(soft_wrap=True, highlight=False)
    base = baseline.load(args.compare, args.baseline_dir) if args.compare else None
    suites = suites or (base["settings"]["suites"] if base else list(SUITE_NAMES))
    s = settings_from(args, base)
    llm = load(s["model"], device=s["device"], threads=s["threads"], int4=s["int4"], compile=s["compile"],
               dtype=s["dtype"])
    s["prefill"] = s["prefill"] or S.ladder(llm.context_length)
    s["context"] = s["context"] or S.ladder(llm.context_length)
    s["suites"] = suites
    env = baseline.environment(llm) | {"compile": s["compile"]}
    con.print(f"[bold]{env['device']}[/bold], {env['threads']} threads, torch {env['torch']}, {env['cores']} cores "
              f"visible, load average {env['loadavg'][0]} | {llm.loaded.path.name} ({env['model_hash']})"
              + (", int4" if env["int4"] else "") + (", compiled" if s["compile"] else ""))
    t0 = time.perf_counter()
    result = S.run(llm, suites, s, lambda msg: con.print(msg, style="dim", markup=False))
    result["env"], result["seconds"]["total"] = env, round(time.perf_counter() - t0, 1)
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]  # other work on the machine during the run
    print_figures(con, result)
    status = 0
    if base is not None:
        status = compare_and_print(con, base, result, args.compare, llm.tokenizer, args.threshold)
    if args.save_baseline:
        con.print(f"saved baseline {args.save_baseline!r}: "
                  f"{baseline.save(result, args.save_baseline, args.baseline_dir)}")
    latest = latest_path()
    latest.parent.mkdir(parents=True, exist_ok=True)
    latest.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.report:
        _render(con, result, args.report)
    return status


def print_figures(con, result: dict):
    from rich.table import Table

    t = Table(title=f"median of {result['settings']['repeat']} runs after a warm-up, +- half the range")
    for col in ("figure", "median", "+-", "unit"):
        t.add_column(col, justify="left" if col == "figure" else "right")
    for name, f in result["figures"].items():
        t.add_row(name, f"{f['median']:.4g}", f"{f['spread']:.2g}", f["unit"])
    con.print(t)
    if "batch" in result:
        b = result["batch"]
        con.print(f"recommended concurrency: [bold]{b['recommended']}[/bold] ({b['why']})")
    if "perplexity" in result:
        p = result["perplexity"]
        con.print(f"perplexity: [bold]{p['ppl']:.4f}[/bold] +/- {p['error']:.4f} ({p['chunks']} chunks of "
                  f"{p['n_ctx']} tokens)")


def compare_and_print(con, base: dict, result: dict, name: str, tokenizer=None, threshold: float | None = None) -> int:
    """Compare, print, store the comparison in `result`; returns 1 on a regression, else 0."""
    from rich.table import Table

    from tokenmill.monitoring.baseline import compare, compare_golden, env_differences, summarize
    from tokenmill.monitoring.quality import describe_diff
    from tokenmill.monitoring.report import VERDICT_COLOURS

    changes = compare(base, result, threshold)
    golden = compare_golden(base.get("golden"), result.get("golden"))
    t = Table(title=f"against baseline {name!r} ({base.get('env', {}).get('date', '?')})")
    for col in ("figure", "baseline", "current", "change", "limit", "verdict"):
        t.add_column(col, justify="left" if col in ("figure", "verdict") else "right")
    for c in changes:
        fmt = (lambda v: "-" if v is None else f"{v:.4g}")
        t.add_row(c.name, fmt(c.base), fmt(c.current), f"{100 * c.change:+.1f}%", f"{100 * c.limit:.1f}%",
                  f"[{VERDICT_COLOURS[c.verdict]}]{c.verdict}[/]")
    con.print(t)
    diffs = env_differences(base, result)
    for d in diffs:
        con.print(f"environment differs: {d}", style="yellow", markup=False)
    lines = [describe_diff(g, tokenizer) for g in golden]
    for line in lines:
        con.print(f"golden output changed: {line}", style="red", markup=False)
    result["comparison"] = {"name": name, "env_differences": diffs, "golden_lines": lines,
                            "baseline": {k: v for k, v in base.items() if k != "comparison"},
                            **summarize(changes, golden)}
    n = result["comparison"]["regressions"]
    con.print(f"[bold {'red' if n else 'green'}]{n} regression{'s' * (n != 1)}[/]")
    return 1 if n else 0


def _render(con, result: dict, out_dir: str):
    from tokenmill.monitoring.report import render

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "results.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    con.print(f"report: {render(result, out_dir)}")


def cmd_report(args) -> int:
    from rich.console import Console

    from tokenmill.monitoring.baseline import load

    con = Console(soft_wrap=True, highlight=False)
    path = Path(args.results) if args.results else latest_path()
    if not path.is_file():
        raise InvalidRequestError(f"no bench result at {path}; run `tokenmill bench SUITE ...` first or give --results")
    result = json.loads(path.read_text(encoding="utf-8"))
    status = 0
    if args.compare:
        status = compare_and_print(con, load(args.compare, args.baseline_dir), result, args.compare,
                                   threshold=args.threshold)
    _render(con, result, args.report or "bench-report")
    return status

