"""The metrics log: one JSON line appended per finished generation (`--metrics-log FILE.jsonl` on generate, chat and
batch), and the identity of the machine and model that every measurement carries.

A line is written after its generation ends, so it never lands inside a timed section; what it costs (a few dicts
and one json.dumps, ~0.1 ms) is checked against 1% of a generation's time in tests/test_metrics.py. The model's content
hash is computed once per file and cached (see `model_hash`).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import platform
import uuid
from pathlib import Path
from typing import Any

import torch

from tokenmill.errors import InvalidRequestError

_MIB = 2**20


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """'cuda: NVIDIA H100 80GB HBM3' or 'cpu: Intel(R) Xeon(R) ...'."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"{device.type}: {cpu_name()}"


@functools.lru_cache(maxsize=16)
def _fingerprint(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        if size > 2 * _MIB:
            f.seek(size - _MIB)
            h.update(f.read(_MIB))
        elif size > _MIB:
            h.update(f.read())
    return h.hexdigest()


def model_hash(path: str | Path) -> str:
    """A cheap content fingerprint of a model file or HF folder: sha256 over each file's size, first MiB and last MiB
    (2 MiB read per file, not gigabytes; a GGUF's first MiB holds its metadata and tensor table, so another quantization
    or fine-tune changes it). Cached per (path, size, mtime). 16 hex digits."""
    path = Path(path)
    parts = (".safetensors", ".json", ".gguf")
    files = sorted(p for p in path.iterdir() if p.suffix in parts) if path.is_dir() else [path]
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        name = p.name if path.is_dir() else ""  # a renamed copy of a file is the same model
        h.update(f"{name}:{_fingerprint(str(p.resolve()), st.st_size, st.st_mtime_ns)}".encode())
    return h.hexdigest()[:16]


def _sampling_summary(params) -> dict[str, Any]:
    """The sampler fields that differ from the defaults (a full SamplingParams is ~30 fields)."""
    if params is None:
        return {}
    default = type(params)()
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)
            if getattr(params, f.name) != getattr(default, f.name)}


class MetricsLog:
    """Appends one JSON line per finished generation to `path` (created if missing; opened once, in append mode)."""

    def __init__(self, path: str | Path, command: str = "generate"):
        self.path, self.command = Path(path), command
        try:
            self._f = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise InvalidRequestError(f"cannot write metrics log {str(path)!r}: {e.strerror}") from None
        self._models: dict[int, tuple[str, str, str]] = {}  # id(llm) -> (path, hash, device)

    def _model(self, llm) -> tuple[str, str, str]:
        key = id(llm)
        if key not in self._models:
            self._models[key] = (str(llm.loaded.path), model_hash(llm.loaded.path), device_name(llm.runner.device))
        return self._models[key]

    def record(self, completion, llm, *, request_id: str | None = None, params=None, preset: str | None = None,
               ttft_s: float | None = None, total_s: float | None = None, queue_s: float | None = None) -> dict:
        """Append the line for one finished generation and return it as a dict.

        Args:
            completion: the `Completion`. llm: the `LLM` that made it (model path, hash and device).
            ttft_s, total_s: override the Completion's own timing (prompt_seconds; prompt + generation seconds) when
                the caller measured from an earlier start (the engine: from arrival; chat: from send()).
        """
        c = completion
        path, digest, device = self._model(llm)
        ttft = c.prompt_seconds if ttft_s is None else ttft_s
        line = {
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "command": self.command,
            "request_id": request_id or uuid.uuid4().hex[:12],
            "model": path,
            "model_hash": digest,
            "device": device,
            "prompt_tokens": c.prompt_tokens,
            "cached_tokens": c.cached_tokens,
            "computed_tokens": c.prompt_tokens - c.cached_tokens,
            "generated_tokens": c.generated_tokens,
            "ttft_s": round(ttft, 5),
            "prompt_tps": round(c.prompt_tps, 2),
            "generation_tps": round(c.generation_tps, 2),
            "total_s": round(c.prompt_seconds + c.generation_seconds if total_s is None else total_s, 5),
            "context_start": c.prompt_tokens,  # tokens in context when decoding starts
            "context_end": c.prompt_tokens + c.generated_tokens,
            "finish_reason": c.finish_reason,
            "preset": preset,
            "sampling": _sampling_summary(params),
        }
        if queue_s is not None:
            line["queue_s"] = round(queue_s, 5)
        self._f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
        self._f.flush()
        return line

    def close(self):
        self._f.close()


def open_log(args, command: str) -> MetricsLog | None:
    """The log named by `--metrics-log`, or None."""
    path = getattr(args, "metrics_log", None)
    return MetricsLog(path, command) if path else None


def add_metrics_flag(p):
    p.add_argument("--metrics-log", metavar="FILE.jsonl",
                   help="append one JSON line of metrics per finished generation to this file")


def read_log(path: str | Path) -> list[dict]:
    """The lines of a metrics log (a torn last line is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out
