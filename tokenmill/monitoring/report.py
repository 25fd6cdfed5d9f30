"""`tokenmill bench report`: a bench result (and its comparison with a baseline) as PNG plots and one self-contained
HTML page (the plots embedded as base64, no external files or scripts).

Plots: decode tok/s vs context, throughput and latency vs concurrency, prefill tok/s vs prompt length, the chat curve,
and each figure's change against the baseline with its regression limit. A baseline's curves are drawn dashed.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

from tokenmill.errors import UnsupportedError

VERDICT_COLOURS = {"regression": "#c0392b", "improved": "#27ae60", "same": "#7f8c8d", "new": "#2980b9",
                   "missing": "#bdc3c7"}


def series(result: dict | None, suite: str, metric: str) -> tuple[list, list, list]:
    """x, median, spread of the figures of one suite and metric, by ascending x."""
    pts = sorted((f["x"], f["median"], f["spread"]) for f in (result or {}).get("figures", {}).values()
                 if f.get("suite") == suite and f.get("metric") == metric and f.get("x") is not None)
    return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]


def _plot_curves(plt, result, base, panels, title, path, log_x=True, mark=None) -> Path | None:
    """One figure with a panel per (suite, metrics, y label); None when the result has no such figures."""
    if not any(series(result, s, m)[0] for s, ms, _ in panels for m in ms):
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (suite, metrics, ylabel) in zip(axes[0], panels):
        for m in metrics:
            x, y, e = series(result, suite, m)
            colour = ax.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=3, label=m)[0].get_color() if x else None
            bx, by, _ = series(base, suite, m)
            if bx:
                ax.plot(bx, by, ls="--", color=colour, alpha=0.6, label=f"{m} (baseline)")
        if mark is not None:
            ax.axvline(mark, color="#c0392b", ls=":", label=f"recommended: {mark}")
        xs = sorted({v for m in metrics for v in series(result, suite, m)[0] + series(base, suite, m)[0]})
        if log_x:
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.set_xlabel({"context": "context tokens", "prefill": "prompt tokens", "batch": "concurrency"}[suite])
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, title, path)


def _save(plt, fig, title, path) -> Path:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_chat(plt, curve, base_curve, title, path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in zip(axes, ("generation_tps", "latency_s"), ("generation tok/s", "reply latency (s)")):
        ax.plot(curve["turn"], curve[key], marker="o", ms=3, label="current")
        if base_curve:
            ax.plot(base_curve["turn"], base_curve[key], ls="--", color="grey", label="baseline")
        ax.set_xlabel("turn")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, title, path)


def _plot_changes(plt, changes, title, path) -> Path | None:
    rows = [c for c in changes if c["verdict"] not in ("new", "missing")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh(y, [100 * c["change"] for c in rows], color=[VERDICT_COLOURS[c["verdict"]] for c in rows])
    for i, c in enumerate(rows):  # the band a change must leave to count: max(threshold, noise)
        ax.plot([-100 * c["limit"], 100 * c["limit"]], [i, i], color="black", lw=0.8, marker="|")
    ax.set_yticks(list(y), [c["name"] for c in rows], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.5)
    ax.set_xlabel("change vs baseline (%); bar ends mark the regression limit")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plots(result: dict, out: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        raise UnsupportedError("the bench report needs matplotlib: pip install 'tokenmill[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comp = result.get("comparison") or {}
    base = comp.get("baseline")
    env = result.get("env", {})
    tag = f"{Path(env.get('model', '?')).name} on {env.get('device', '?')}, {env.get('threads', '?')} threads"
    rec = (result.get("batch") or {}).get("recommended")
    made = [
        _plot_curves(plt, result, base, [("context", ["decode tok/s"], "decode tok/s")],
                     f"decode speed vs context length\n{tag}", out / "context.png"),
        _plot_curves(plt, result, base, [("batch", ["throughput tok/s"], "generated tok/s (all requests)"),
                                         ("batch", ["p50 latency s", "p95 latency s"], "request latency (s)")],
                     f"engine throughput and latency vs concurrency\n{tag}", out / "concurrency.png", mark=rec),
        _plot_curves(plt, result, base, [("prefill", ["prefill tok/s"], "prefill tok/s")],
                     f"prefill speed vs prompt length\n{tag}", out / "prefill.png"),
    ]
    chat = result.get("curves", {}).get("chat")
    if chat:
        made.append(_plot_chat(plt, chat, (base or {}).get("curves", {}).get("chat"),
                               f"multi-turn chat (KV prefix reused)\n{tag}", out / "chat.png"))
    if comp.get("changes"):
        made.append(_plot_changes(plt, comp["changes"], f"current vs baseline {comp.get('name', '')!r}",
                                  out / "compare.png"))
    return [p for p in made if p is not None]


def _table(head: list[str], rows: list[list]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _num(v, unit="") -> str:
    return "-" if v is None else f"{v:.4g} {html.escape(unit)}".strip()


def render(result: dict, out_dir: str | Path) -> Path:
    """Write the PNG plots and report.html into out_dir; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = plots(result, out)
    env, comp = result.get("env", {}), result.get("comparison") or {}
    parts = [f"<h1>tokenmill bench report</h1><p>{html.escape(env.get('date', ''))}</p>",
             _table(["environment", ""], [[html.escape(k), html.escape(str(v))] for k, v in env.items()])]
    summary = []
    if "batch" in result:
        b = result["batch"]
        summary.append(f"Recommended concurrency: <b>{b['recommended']}</b> ({html.escape(b['why'])}; KV memory "
                       f"{b['kv_memory_bytes'] / 2**30:.2f} GiB holds {b['kv_bound']} requests of {b['request_tokens']}"
                       f" tokens, {b['kv_bound_full_context']} at full context).")
    if "perplexity" in result:
        p = result["perplexity"]
        summary.append(f"Perplexity: <b>{p['ppl']:.4f}</b> +/- {p['error']:.4f} ({p['chunks']} chunks of "
                       f"{p['n_ctx']} tokens, llama.cpp protocol).")
    if comp:
        n = comp.get("regressions", 0)
        summary.append(f"Against baseline <b>{html.escape(str(comp.get('name')))}</b>: "
                       f"<b style='color:{'#c0392b' if n else '#27ae60'}'>{n} regression{'s' * (n != 1)}</b>.")
        summary += [f"Environment differs: {html.escape(d)}" for d in comp.get("env_differences", [])]
    parts.append("".join(f"<p>{s}</p>" for s in summary))
    for p in pngs:
        data = base64.b64encode(p.read_bytes()).decode()
        parts.append(f"<h2>{p.stem}</h2><img alt='{p.stem}' src='data:image/png;base64,{data}'>")
    figs = result.get("figures", {})
    parts.append("<h2>figures</h2>" + _table(
        ["figure", "median", "+/- spread", "runs"],
        [[html.escape(k), _num(f["median"], f["unit"]), _num(f["spread"]), len(f["runs"])] for k, f in figs.items()]))
    if comp.get("changes"):
        parts.append("<h2>comparison</h2>" + _table(
            ["figure", "baseline", "current", "change", "limit", "verdict"],
            [[html.escape(c["name"]), _num(c["base"], c["unit"]), _num(c["current"], c["unit"]),
              f"{100 * c['change']:+.1f}%", f"{100 * c['limit']:.1f}%",
              f"<span style='color:{VERDICT_COLOURS[c['verdict']]}'>{c['verdict']}</span>"] for c in comp["changes"]]))
    if comp.get("golden_lines"):
        parts.append("<h2>golden greedy outputs changed</h2><ul>" + "".join(
            f"<li>{html.escape(s)}</li>" for s in comp["golden_lines"]) + "</ul>")
    style = ("body{font-family:sans-serif;max-width:1150px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ddd;padding:3px 8px;font-size:13px;text-align:left}img{max-width:100%}")
    path = out / "report.html"
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>tokenmill bench report</title>"
                    f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n", encoding="utf-8")
    return path
