"""`tokenmill batch INPUT -o OUTPUT`: a file of prompts through the engine, one JSON line of results per request.

INPUT is a text file (one prompt a line; ids are line numbers) or JSONL: {"id", "prompt"} or {"id", "messages"}, plus
any SamplingParams fields for that line. Each finished request is appended to OUTPUT and flushed at once, so Ctrl-C or a
crash loses nothing already done; a rerun skips ids already in OUTPUT. When every request is done OUTPUT is rewritten in
input order. OUTPUT `-`, a pipe or a device is streamed instead: lines in the order they finish, no resume. Bad lines
are reported with their line number and skipped (`--strict`: the first one fails the run); a prompt that can never run
gets an error line of its own while the others complete.
"""
from __future__ import annotations

import argparse
import json
import os
import stat
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.cli.flags import add_load_flags, add_sampler_flags, load_llm, positive_int, sampling_from_args
from tokenmill.errors import InvalidRequestError


@dataclass
class Item:
    index: int  # position among the input's requests
    id: str
    line: int
    prompt: str | list[dict[str, Any]]
    params: Any  # SamplingParams


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `batch` on the CLI's subparsers."""
    from tokenmill.monitoring.metrics_log import add_metrics_flag

    b = subparsers.add_parser("batch", help="run a file of prompts with continuous batching, writing JSONL results",
                              description=__doc__.split("\n\n", 1)[1])
    b.add_argument("input", help="prompts: a text file (one a line) or JSONL ({\"id\", \"prompt\" | \"messages\"})")
    b.add_argument("-o", "--output", required=True,
                   help="results, JSONL: a file (appended to and resumed from), or - for stdout")
    b.add_argument("--format", choices=("auto", "text", "jsonl"), default="auto",
                   help="input format (default: jsonl if the first line is a JSON object)")
    b.add_argument("--chat", action="store_true", help="wrap plain prompts in the chat template as a user turn")
    b.add_argument("--template", help="chat template: a built-in name or a .jinja file (default: the model's own)")
    b.add_argument("--max-concurrency", type=positive_int, default=32, help="requests running at once (default 32)")
    b.add_argument("--max-batched-tokens", type=positive_int, default=512,
                   help="tokens per forward pass; longer prompts prefill in chunks (default 512)")
    b.add_argument("--kv-cache-memory",
                   help="KV cache size, e.g. 2GiB (default: 1/4 of free RAM up to 1 GiB; GPU: half of free memory)")
    b.add_argument("--strict", action="store_true", help="stop at the first malformed input line")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_metrics_flag(b)
    add_load_flags(b)
    add_sampler_flags(b)
    b.set_defaults(func=cmd_batch)
    return b


def _warn(msg: str):
    print(f"tokenmill batch: {msg}", file=sys.stderr)


def read_input(path: Path, fmt: str, base, strict: bool) -> tuple[list[Item], int]:
    """The requests in INPUT and the number of bad lines skipped."""
    from tokenmill.sampling.params import SamplingParams

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"cannot read input {str(path)!r}: {getattr(e, 'strerror', None) or e}") from None
    if fmt == "auto":
        first = next((line for line in lines if line.strip()), "")
        fmt = "jsonl" if first.lstrip().startswith("{") else "text"
    items, seen, bad = [], set(), 0
    base_dict = base.to_dict()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            if fmt == "text":
                rid, prompt, params = str(n), line, base
            else:
                rid, prompt, params = _parse_json_line(line, n, base_dict, SamplingParams)
            if rid in seen:
                raise InvalidRequestError(f"id {rid!r} appears twice")
        except (InvalidRequestError, TypeError) as e:
            if strict:
                raise InvalidRequestError(f"{path}:{n}: {e}") from None
            _warn(f"{path}:{n}: {e}; line skipped")
            bad += 1
            continue
        seen.add(rid)
        items.append(Item(len(items), rid, n, prompt, params))
    return items, bad


def _parse_json_line(line: str, n: int, base: dict, SamplingParams):
    from tokenmill.sampling.params import ALIASES  # per-line fields may use aliases (max_tokens) of the base's names

    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(d, dict):
        raise InvalidRequestError(f"expected a JSON object, got {type(d).__name__}")
    rid = d.pop("id", n)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise InvalidRequestError(f"id must be a string or an integer, got {rid!r}")
    if ("prompt" in d) == ("messages" in d):
        raise InvalidRequestError('give exactly one of "prompt" and "messages"')
    if "prompt" in d:
        prompt = d.pop("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequestError(f"prompt must be a non-empty string, got {prompt!r}")
    else:
        prompt = d.pop("messages")
        if not isinstance(prompt, list) or not prompt or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt):
            raise InvalidRequestError('messages must be a non-empty list of {"role": str, "content": str}')
    given = {ALIASES.get(k, k) for k in d}  # the line's own fields go through from_dict as written: both of
    base = {k: v for k, v in base.items() if k not in given}  # max_tokens and max_new_tokens is an error there too
    return str(rid), prompt, SamplingParams.from_dict({**base, **d})


class Output:
    """Where result lines go. A regular file (symlinks followed) is resumed: the ids already in it are `done`, and
    `path` is set so the caller can put it in input order at the end. `-`, a pipe or a device is streamed: nothing is
    read back, nothing renamed. Refused: a directory, the input file itself, a file that is not one of our results."""

    def __init__(self, name: str, src: Path):
        self.name, self.path, self.done = name, None, set()
        if name == "-":
            self.file = sys.stdout
            return
        try:
            st = os.stat(name)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise InvalidRequestError(f"cannot write output {name!r}: {e.strerror}") from None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise InvalidRequestError(f"cannot write output {name!r}: it is a directory")
        if st is not None and os.path.samestat(st, os.stat(src)):
            raise InvalidRequestError(f"output {name!r} is the input file {str(src)!r}; write the results to "
                                      "another file")
        if st is None or stat.S_ISREG(st.st_mode):
            self.path = Path(os.path.realpath(name))
        try:
            self.done = read_done(self.path, name) if self.path and st else set()
            self.file = open(self.path or name, "a", encoding="utf-8")
        except OSError as e:
            raise InvalidRequestError(f"cannot write output {name!r}: {e.strerror}") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not sys.stdout:
            self.file.close()


def _result_id(line: bytes) -> str | None:
    """The id of a result line as `result_line` writes it, else None."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return str(row["id"]) if isinstance(row, dict) and "id" in row and "finish_reason" in row else None


def read_done(path: Path, name: str) -> set[str]:
    """Ids already in OUTPUT. A torn last line (a crash mid-write) is cut off so appending starts on a fresh line;
    any other line that is not a result means the file is not ours, and it is refused before anything is changed."""
    done, whole = set(), 0  # whole: bytes up to the end of the last complete line
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            torn = not line.endswith(b"\n")
            rid = _result_id(line)
            if rid is None and line.strip() and not (torn and line.startswith(b'{"id": ')):
                raise InvalidRequestError(
                    f"output {name!r} exists and is not a `tokenmill batch` results file (line {n} is not a result); "
                    "give another file, or remove it to start over")
            if torn:
                break
            if rid is not None:
                done.add(rid)
            whole += len(line)
    if whole < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(whole)
    return done


def reorder(path: Path, order: dict[str, int]):
    """Rewrite OUTPUT in input order (ids not in the input last) through a new file in its folder, with its permissions,
    renamed over it. If that file cannot be written the results stay as they are, in the order they finished."""
    with open(path, "rb") as f:
        rows = [(order.get(rid, len(order) + i), line) for i, line in enumerate(f)
                if (rid := _result_id(line)) is not None]
    rows.sort(key=lambda r: r[0])
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.writelines(line for _, line in rows)
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            os.unlink(tmp)
        _warn(f"{path} left in the order requests finished: cannot write a reordered copy beside it ({e.strerror})")


def result_line(item: Item, out) -> dict[str, Any]:
    if out.error:
        return {"id": item.id, "error": out.error, "finish_reason": "error"}
    c = out.completion
    return {"id": item.id, "text": c.text, "finish_reason": c.finish_reason, "metrics": out.metrics.to_dict()}


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]




def cmd_batch(args) -> int:
    from tokenmill.engine.kv_cache import parse_memory

    params = sampling_from_args(args)  # bad flags, input and output fail before the model loads
    if args.kv_cache_memory is not None:
        parse_memory(args.kv_cache_memory)
    src = Path(args.input)
    items, bad = read_input(src, args.format, params, args.strict)
    with Output(args.output, src) as out:
        todo = [it for it in items if it.id not in out.done]
        resumed = len(items) - len(todo)
        if resumed:
            _warn(f"{resumed} of {len(items)} requests already in {args.output}; running the other {len(todo)}")
        summary = _run(args, todo, out) if todo else None
    if out.path is not None:
        reorder(out.path, {it.id: it.index for it in items})
    if summary is not None:
        print(summary + (f" | {bad} bad input lines skipped" if bad else ""), file=sys.stderr)
    elif not items:
        _warn(f"no requests in {src}" + (f" ({bad} bad lines skipped)" if bad else ""))
    return 0


def _run(args, todo: list[Item], output: Output) -> str:
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.monitoring.metrics_log import open_log

    err = Console(stderr=True, soft_wrap=True)
    log = open_log(args, "batch")
    llm = load_llm(args)
    engine = LLMEngine(llm, kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_concurrency,
                       max_num_batched_tokens=max(args.max_batched_tokens, args.max_concurrency))
    err.print(f"[dim]{engine.describe()}[/dim]", highlight=False)
    by_id = {it.id: it for it in todo}
    t0 = time.perf_counter()
    prompt_tok = cached_tok = gen_tok = errors = 0
    latencies, ttfts = [], []
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=err,
                        disable=args.no_progress or not err.is_terminal)

    def write(item: Item, res) -> None:
        nonlocal prompt_tok, cached_tok, gen_tok, errors
        output.file.write(json.dumps(result_line(item, res), ensure_ascii=False) + "\n")
        output.file.flush()
        if res.error:
            errors += 1
        else:
            m = res.metrics
            if log:
                log.record(res.completion, llm, request_id=item.id, params=item.params, preset=args.preset,
                           ttft_s=m.ttft_seconds, total_s=m.latency_seconds, queue_s=m.queue_seconds)
            prompt_tok, cached_tok = prompt_tok + m.prompt_tokens, cached_tok + m.cached_tokens
            gen_tok += m.generated_tokens
            latencies.append(m.latency_seconds)
            ttfts.append(m.ttft_seconds)

    queue = iter(todo)
    in_flight = 0
    task = progress.add_task("requests", total=len(todo), rate="")
    try:
        with progress:
            while True:
                while in_flight < 2 * args.max_concurrency:  # submit lazily: prompts are encoded as they are needed
                    item = next(queue, None)
                    if item is None:
                        break
                    try:
                        engine.add_request(item.prompt, item.params, request_id=item.id, chat=args.chat)
                        in_flight += 1
                    except InvalidRequestError as e:
                        write(item, _Failed(str(e)))
                        progress.advance(task)
                if not in_flight:
                    break
                for res in engine.step():
                    if res.finished:
                        in_flight -= 1
                        write(by_id[res.request_id], res)
                        progress.advance(task)
                wall = time.perf_counter() - t0
                st = engine.stats()
                progress.update(task, rate=f"prompt {st.prompt_tokens_computed / wall:.0f} tok/s | "
                                           f"gen {gen_tok / wall:.0f} tok/s")
    except KeyboardInterrupt:
        _warn(f"interrupted: finished results are in {output.name}; "
              + ("run the same command again to resume" if output.path else "a stream cannot be resumed"))
        raise
    wall = time.perf_counter() - t0
    done = len(todo) - errors
    return (f"batch: {done} requests done, {errors} failed, in {wall:.1f} s | "
            f"prompt {prompt_tok} tok ({cached_tok} cached), {(prompt_tok - cached_tok) / wall:.1f} tok/s | "
            f"generated {gen_tok} tok, {gen_tok / wall:.1f} tok/s | "
            f"latency p50 {_percentile(latencies, 50):.2f} s, p95 {_percentile(latencies, 95):.2f} s | "
            f"time to first token p50 {_percentile(ttfts, 50):.2f} s")


@dataclass
class _Failed:
    error: str
