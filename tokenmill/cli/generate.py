"""`tokenmill generate` (one prompt, streamed) and `tokenmill demo` (a few prompts in one batch)."""
from __future__ import annotations

import sys
import time

from tokenmill.cli.flags import add_load_flags, add_sampler_flags, load_llm, sampling_from_args, stats_line
from tokenmill.errors import GenerationError
from tokenmill.monitoring.metrics_log import add_metrics_flag, open_log


def cmd_generate(args) -> int:
    from rich.console import Console

    err = Console(stderr=True, soft_wrap=True)
    params = sampling_from_args(args)  # bad flags fail before the model loads
    log = open_log(args, "generate")
    llm = load_llm(args)
    stream = llm.stream(args.prompt, params, chat=args.chat)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if stream.completion.finish_reason == "error":
        raise GenerationError(stream.completion.error)
    err.print(stats_line(stream.completion), style="dim", highlight=False)
    if log:
        log.record(stream.completion, llm, params=params, preset=args.preset)
    return 0


DEMO_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a Python function that checks whether a number is prime.",
    "Translate 'good morning' into Spanish and German.",
]


def cmd_demo(args) -> int:
    from rich.console import Console

    con = Console(soft_wrap=True)
    params = sampling_from_args(args, temperature=0.0, max_new_tokens=96)
    t0 = time.perf_counter()
    llm = load_llm(args)
    con.print(f"[dim]loaded {llm.loaded.path.name} ({llm.loaded.format}, {llm.config.architecture}, "
              f"{llm.config.num_layers} layers) in {time.perf_counter() - t0:.1f} s[/dim]")
    t0 = time.perf_counter()
    outs = llm.generate(DEMO_PROMPTS, params, chat=True)
    wall = time.perf_counter() - t0
    for prompt, c in zip(DEMO_PROMPTS, outs):
        con.print(f"\n[bold cyan]> {prompt}[/bold cyan]")
        con.print(c.text.strip(), markup=False, highlight=False)
        con.print(stats_line(c), style="dim", highlight=False)
    total = sum(c.generated_tokens for c in outs)
    con.print(f"\n[bold]{len(outs)} prompts in one batch: {total} tokens in {wall:.1f} s "
              f"({total / wall:.1f} tok/s overall)[/bold]")
    return 0


def add_parser(sub):
    """Register `generate` and `demo`."""
    g = sub.add_parser("generate", help="generate text for one prompt, streaming it", description=(
        "Generate a continuation of PROMPT (or, with --chat, the model's reply to it) and print it as it streams, "
        "then one stats line on stderr."))
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user turn")
    g.add_argument("--template", help="chat template: a built-in name or a .jinja file (default: the model's own)")
    add_metrics_flag(g)
    add_load_flags(g)
    add_sampler_flags(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="answer a few independent prompts in one batch, with their stats")
    add_load_flags(d)
    add_sampler_flags(d)
    d.set_defaults(func=cmd_demo)
