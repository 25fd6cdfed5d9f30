"""Bench results saved as named baselines, and the comparison of a new run against one.

A result is a dict: `settings` (what was run), `env` (where), `figures` (name -> median, spread, runs, unit, which way
is better), plus suite extras (`golden`: greedy token ids per prompt; `batch`: the recommended concurrency; `curves`).
Baselines live in `default_dir()/NAME.json` (`~/.cache/tokenmill/baselines/`, or `--baseline-dir`).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmill.errors import InvalidRequestError

# A speed figure regresses only when it got worse by more than max(THRESHOLD, noise), noise being the two runs'
# spreads added (so the runs' ranges do not overlap). 5%: on the shared 2-core VM this project measures on, the medians
# of identical code drift 2-4% between sessions (other tenants, frequency), drift that a run's own spread does not show;
# the regressions worth an alarm (a lost kernel, an extra copy per step, a sync in the loop) cost 10% or more.
THRESHOLD = 0.05
# Perplexity is deterministic on one machine (spread 0); 1% is the tolerance the issue accepts between correct
# implementations (tokenmill vs HF transformers fp32; llama.cpp and transformers differ by 0.3%); a bug moves it more.
QUALITY_THRESHOLD = 0.01
ENV_KEYS = ("device", "cores", "threads", "omp_wait_policy", "torch", "tokenmill", "model_hash", "dtype", "int4",
            "compile")


def default_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "tokenmill" / "baselines"


def figure(runs: list[float], unit: str, *, suite: str, x: float | None = None, metric: str = "",
           better: str = "higher", threshold: float | None = None) -> dict:
    """A figure: the median of `runs` and its spread (half the range: with 3 runs, the median +- spread covers all)."""
    runs = [float(r) for r in runs]
    f = {"median": statistics.median(runs), "spread": (max(runs) - min(runs)) / 2, "runs": runs, "unit": unit,
         "better": better, "suite": suite, "x": x, "metric": metric or unit}
    if threshold is not None:
        f["threshold"] = threshold
    return f


def environment(llm) -> dict:
    """Where a result was measured: device, cores, threads, versions, model path and content hash."""
    from tokenmill import __version__
    from tokenmill.monitoring.metrics_log import device_name, model_hash

    dev = llm.runner.device
    return {
        "device": device_name(dev), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "tokenmill": __version__, "python": platform.python_version(),
        "model": str(llm.loaded.path), "model_hash": model_hash(llm.loaded.path),
        "dtype": str(llm.runner.dtype).removeprefix("torch."), "int4": bool(llm.runner.int4_layers),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # PASSIVE: no spinning threads on a shared machine
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def path_for(name: str, directory: str | Path | None = None) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise InvalidRequestError(f"baseline name must be a plain name such as 'main' or 'cpu-2026', got {name!r}")
    return Path(directory or default_dir()) / f"{name}.json"


def save(result: dict, name: str, directory: str | Path | None = None) -> Path:
    path = path_for(name, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return path


def load(name: str, directory: str | Path | None = None) -> dict:
    path = Path(name) if name.endswith(".json") else path_for(name, directory)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        have = sorted(p.stem for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
        raise InvalidRequestError(f"no baseline {name!r} at {path}" + (f"; saved: {', '.join(have)}" if have else "")
                                  ) from None
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"baseline {str(path)!r} is not JSON: {e}") from None


@dataclass
class Change:
    name: str
    base: float | None
    current: float | None
    change: float  # relative, signed: (current - base) / base
    noise: float  # relative: both spreads added
    limit: float  # max(threshold, noise): a worse change beyond this regresses
    verdict: str  # "regression" | "improved" | "same" | "new" | "missing"
    unit: str = ""


def compare_figure(name: str, base: dict, cur: dict, threshold: float | None = None) -> Change:
    """One figure against its baseline. 'worse' follows the figure's `better` (higher tok/s, lower latency)."""
    b, c = base["median"], cur["median"]
    thr = threshold if threshold is not None else cur.get("threshold", base.get("threshold", THRESHOLD))
    scale = abs(b) or 1.0
    change, noise = (c - b) / scale, (base["spread"] + cur["spread"]) / scale
    limit = max(thr, noise)
    worse = -change if cur.get("better", "higher") == "higher" else change
    verdict = "regression" if worse > limit else "improved" if -worse > limit else "same"
    return Change(name, b, c, change, noise, limit, verdict, cur.get("unit", ""))


def compare(base: dict, cur: dict, threshold: float | None = None) -> list[Change]:
    """Every figure of either result: those in both compared, the others marked new or missing."""
    bf, cf = base.get("figures", {}), cur.get("figures", {})
    out = []
    for name in list(bf) + [n for n in cf if n not in bf]:
        if name in bf and name in cf:
            out.append(compare_figure(name, bf[name], cf[name], threshold))
        else:
            f = cf.get(name) or bf[name]
            out.append(Change(name, bf.get(name, {}).get("median"), cf.get(name, {}).get("median"), 0.0, 0.0, 0.0,
                              "new" if name in cf else "missing", f.get("unit", "")))
    return out


@dataclass
class GoldenDiff:
    index: int
    prompt: str
    position: int  # first differing token position; -1 when equal
    base_token: int | None  # None: that output ended here
    current_token: int | None


def compare_golden(base: dict | None, cur: dict | None) -> list[GoldenDiff]:
    """Greedy outputs against the saved ones: one GoldenDiff per changed prompt, at its first differing position."""
    if not base or not cur:
        return []
    out = []
    for i, (b, c) in enumerate(zip(base["items"], cur["items"])):
        if b["prompt"] != c["prompt"] or b.get("chat") != c.get("chat"):
            raise InvalidRequestError(f"golden prompt {i} differs from the baseline's; save a new baseline")
        x, y = b["ids"], c["ids"]
        if x != y:
            pos = next((k for k, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            x, y = x + [None], y + [None]  # an output that ended at pos has no token there
            out.append(GoldenDiff(i, b["prompt"], pos, x[pos], y[pos]))
    return out


def env_differences(base: dict, cur: dict) -> list[str]:
    """'threads: 2 -> 4' for each environment key that changed (speed figures then compare different setups)."""
    be, ce = base.get("env", {}), cur.get("env", {})
    return [f"{k}: {be.get(k)} -> {ce.get(k)}" for k in ENV_KEYS if be.get(k) != ce.get(k)]


def summarize(changes: list[Change], golden: list[GoldenDiff]) -> dict:
    """The comparison as stored beside a result (for reports) and its exit status."""
    return {"changes": [c.__dict__ for c in changes], "golden": [g.__dict__ for g in golden],
            "regressions": sum(c.verdict == "regression" for c in changes) + len(golden)}
