"""`tokenmill bench report`: PNG plots and one self-contained HTML page from a synthetic result and its comparison;
the recommended-concurrency rule."""
import base64
from html.parser import HTMLParser

import pytest

from tokenmill.monitoring.baseline import compare, figure, summarize
from tokenmill.monitoring.report import render
from tokenmill.monitoring.suites import ladder, recommend

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


def synthetic(scale: float = 1.0) -> dict:
    f = {}
    for c, tps in ((128, 36.0), (512, 33.0), (2048, 25.0), (8192, 12.0)):
        f[f"context {c} decode tok/s"] = figure([tps * scale * k for k in (0.98, 1, 1.02)], "tok/s", suite="context",
                                                x=c, metric="decode tok/s")
        f[f"prefill {c} tok/s"] = figure([800 * scale, 790 * scale], "tok/s", suite="prefill", x=c,
                                         metric="prefill tok/s")
    for c, thr, p95 in ((1, 30, 1.1), (2, 55, 1.2), (4, 90, 1.5), (8, 95, 2.9)):
        f[f"batch c{c} throughput tok/s"] = figure([thr * scale], "tok/s", suite="batch", x=c,
                                                   metric="throughput tok/s")
        for q, v in (("p50", p95 * 0.9), ("p95", p95)):
            f[f"batch c{c} {q} latency s"] = figure([v / scale], "s", suite="batch", x=c, metric=f"{q} latency s",
                                                    better="lower")
    f["quality perplexity"] = figure([22.5], "ppl", suite="quality", better="lower", threshold=0.01)
    return {"settings": {"repeat": 3}, "env": {"device": "cpu: Test CPU", "threads": 2, "model": "/m/x.gguf",
                                               "date": "2026-11-26T00:00:00"},
            "figures": f, "curves": {"chat": {"turn": [1, 2, 3], "generation_tps": [30, 28, 25],
                                              "latency_s": [1.0, 1.1, 1.3], "new_tokens": [20, 15, 16],
                                              "context": [40, 90, 140]}},
            "batch": {"recommended": 4, "why": "8 adds only 6% throughput over 4", "kv_memory_bytes": 2**30,
                      "kv_bound": 240, "kv_bound_full_context": 2, "request_tokens": 96},
            "perplexity": {"ppl": 22.5, "error": 0.3, "chunks": 40, "n_ctx": 512}}


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.open = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        elif tag not in ("meta", "br"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open.pop() == tag  # well nested


def test_report_has_valid_pngs_and_a_self_contained_html(tmp_path):
    base, cur = synthetic(), synthetic(scale=0.8)  # everything 20% slower
    cur["comparison"] = {"name": "main", "baseline": base, "env_differences": [], "golden_lines": [
        "prompt 1 ('The moon is'): first difference at token 4: 11 'a' -> 12 'b'"], **summarize(compare(base, cur), [])}
    page = render(cur, tmp_path)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["chat.png", "compare.png", "concurrency.png", "context.png", "prefill.png"]
    for p in tmp_path.glob("*.png"):
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "http" not in text  # nothing fetched
    tags = Tags()
    tags.feed(text)
    assert not tags.open and len(tags.imgs) == len(pngs)
    for src in tags.imgs:
        assert base64.b64decode(src.removeprefix("data:image/png;base64,")).startswith(PNG)
    assert "Recommended concurrency: <b>4</b>" in text and "Perplexity: <b>22.5000</b>" in text
    n = cur["comparison"]["regressions"]
    assert n == 20 and f"{n} regressions" in text  # 4 context, 4 prefill, 12 batch figures; perplexity unchanged
    assert "first difference at token 4" in text and text.count(">regression<") == n


def test_report_without_comparison_or_some_suites(tmp_path):
    res = synthetic()
    res["figures"] = {k: v for k, v in res["figures"].items() if k.startswith("context")}
    del res["curves"], res["batch"]
    render(res, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["context.png"]
    assert "Recommended" not in (tmp_path / "report.html").read_text()


def pts(*rows):
    return [{"c": c, "throughput": t, "p95": p} for c, t, p in rows]


def test_recommended_concurrency_rule():
    # stops where throughput gains < 10%: 4 -> 8 adds 5.6%
    assert recommend(pts((1, 30, 1.0), (2, 55, 1.1), (4, 90, 1.3), (8, 95, 2.5)), 1000)[0] == 4
    # stops where p95 more than doubles even though throughput still rises 30%
    c, why = recommend(pts((1, 30, 1.0), (2, 55, 1.1), (4, 72, 2.5)), 1000)
    assert c == 2 and "p95" in why
    # still gaining at the top of the ladder: the top, said so
    c, why = recommend(pts((1, 30, 1.0), (2, 55, 1.1)), 1000)
    assert c == 2 and "still rising" in why
    # capped by the requests whose KV cache fits
    c, why = recommend(pts((1, 30, 1.0), (2, 55, 1.1), (4, 90, 1.3)), 3)
    assert c == 3 and "KV memory" in why


@pytest.mark.parametrize("top,steps", [(8192, [128, 512, 2048, 8192]), (2048, [128, 512, 2048]), (100, [100])])
def test_ladder(top, steps):
    assert ladder(top) == steps
