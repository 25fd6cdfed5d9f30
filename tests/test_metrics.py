"""The metrics log: one JSON line per finished generation from generate, chat and batch, consistent with the Completion,
appended, and cheap; the model fingerprint."""
import io
import json
import sys
import time

import pytest

import tokenmill.llm
from tokenmill import SamplingParams
from tokenmill.cli import main as cli
from tokenmill.monitoring import metrics_log as metrics
from tokenmill.monitoring.metrics_log import MetricsLog, model_hash, read_log

FIELDS = {"timestamp", "command", "request_id", "model", "model_hash", "device", "prompt_tokens", "cached_tokens",
          "computed_tokens", "generated_tokens", "ttft_s", "prompt_tps", "generation_tps", "total_s", "context_start",
          "context_end", "finish_reason", "preset", "sampling"}


@pytest.fixture
def session_model(llm, monkeypatch):
    """The CLI commands in this process, on the session's model."""
    monkeypatch.setattr(tokenmill.llm, "load", lambda *a, **k: llm)
    return llm


def check_line(line: dict, c, llm, same_run: bool = True):
    """`line` against Completion `c`: counts always, timings when `c` is the very run the line logged (else only
    consistent among themselves)."""
    assert FIELDS <= set(line)
    assert line["model"] == str(llm.loaded.path) and line["model_hash"] == model_hash(llm.loaded.path)
    assert line["device"].startswith("cpu: ")
    assert line["prompt_tokens"] == c.prompt_tokens and line["cached_tokens"] == c.cached_tokens
    assert line["computed_tokens"] == c.prompt_tokens - c.cached_tokens
    assert line["generated_tokens"] == c.generated_tokens
    assert line["context_start"] == c.prompt_tokens and line["context_end"] == c.prompt_tokens + c.generated_tokens
    assert line["finish_reason"] == c.finish_reason
    assert 0 < line["ttft_s"] <= line["total_s"]
    if same_run:
        assert line["generation_tps"] == pytest.approx(c.generation_tps, abs=0.01)
        assert line["prompt_tps"] == pytest.approx(c.prompt_tps, abs=0.01)
    else:
        decode_s = line["total_s"] - line["ttft_s"]
        assert line["generation_tps"] == pytest.approx((line["generated_tokens"] - 1) / decode_s, rel=0.01)
        assert line["prompt_tps"] == pytest.approx(line["computed_tokens"] / line["ttft_s"], rel=0.01)


def test_record_matches_completion_appends_and_is_cheap(llm, tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"earlier": 1}\n')
    log = MetricsLog(path)
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    llm.reset_cache()
    c = llm.generate("The capital of France is", params)
    line = log.record(c, llm, request_id="r1", params=params, preset=None)
    t = time.perf_counter()
    for _ in range(100):
        log.record(c, llm, params=params)
    per_line = (time.perf_counter() - t) / 100
    log.close()
    lines = read_log(path)
    assert lines[0] == {"earlier": 1} and len(lines) == 102  # appended, nothing overwritten
    assert lines[1] == line and line["request_id"] == "r1"
    check_line(line, c, llm)
    assert line["generated_tokens"] == 6 and line["finish_reason"] == "length"
    assert line["total_s"] == pytest.approx(c.prompt_seconds + c.generation_seconds, abs=1e-4)
    assert line["sampling"] == {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}
    assert len({x["request_id"] for x in lines[2:]}) == 100  # fresh ids when none is given
    # written after the generation ends; even so, far below 1% of a 6-token generation's time
    assert per_line < 0.01 * (c.prompt_seconds + c.generation_seconds), per_line


def test_generate_cli_logs_one_line_per_run(session_model, tmp_path, capsys):
    path = tmp_path / "gen.jsonl"
    argv = ["generate", "Name a colour.", "--chat", "--temperature", "0", "--max-tokens", "5",
            "--metrics-log", str(path)]
    assert cli.main(argv) == 0
    assert cli.main(argv + ["--preset", "greedy"]) == 0
    lines = read_log(path)
    assert len(lines) == 2 and all(x["command"] == "generate" for x in lines)
    assert [x["preset"] for x in lines] == [None, "greedy"]
    session_model.reset_cache()
    c = session_model.generate("Name a colour.", chat=True, temperature=0, max_new_tokens=5)
    check_line(lines[0], c, session_model, same_run=False)
    # the second run reused the first one's prompt: all of it but the last token, in whole KV blocks
    block = session_model.engine.blocks.block_size
    assert lines[1]["cached_tokens"] == (c.prompt_tokens - 1) // block * block
    assert capsys.readouterr().out.split("\n")[0] == c.text.split("\n")[0]


def test_chat_cli_logs_each_reply(session_model, tmp_path, monkeypatch, capsys):
    path = tmp_path / "chat.jsonl"
    session_model.reset_cache()
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nName a fruit.\n"))
    assert cli.main(["chat", "--temperature", "0", "--max-tokens", "6", "--metrics-log", str(path)]) == 0
    lines = read_log(path)
    assert [x["request_id"] for x in lines] == ["turn-1", "turn-2"] and lines[0]["command"] == "chat"
    assert lines[1]["cached_tokens"] > 0  # the second turn reused the first turn's prefix
    assert lines[1]["context_start"] > lines[0]["context_end"] - 1
    assert all(x["total_s"] >= x["ttft_s"] for x in lines)


def test_batch_cli_logs_each_request_with_engine_timings(llm, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tokenmill.llm, "load", lambda *a, **k: llm)
    src, dst, path = tmp_path / "in.txt", tmp_path / "out.jsonl", tmp_path / "batch.jsonl"
    src.write_text("The moon is\ndef add(a, b):\nRoses are red,\n")
    assert cli.main(["batch", str(src), "-o", str(dst), "--max-tokens", "4", "--temperature", "0", "--no-progress",
                       "--kv-cache-memory", "64MiB", "--metrics-log", str(path)]) == 0
    out = {r["id"]: r for r in map(json.loads, dst.read_text().splitlines())}
    lines = read_log(path)
    assert sorted(x["request_id"] for x in lines) == ["1", "2", "3"]
    for x in lines:
        m = out[x["request_id"]]["metrics"]
        assert x["command"] == "batch" and "queue_s" in x
        assert x["prompt_tokens"] == m["prompt_tokens"] and x["generated_tokens"] == m["generated_tokens"] == 4
        assert x["ttft_s"] == pytest.approx(m["ttft_seconds"], abs=1e-3)
        assert x["total_s"] == pytest.approx(m["latency_seconds"], abs=1e-3)
        assert x["sampling"] == {"temperature": 0.0, "max_new_tokens": 4}


def test_bad_metrics_log_path_fails_before_loading(tmp_path, capsys):
    assert cli.main(["generate", "Hi", "--metrics-log", str(tmp_path)]) == 2
    assert "cannot write metrics log" in capsys.readouterr().err


def test_model_hash_is_cheap_cached_and_sees_content(tmp_path):
    a, b, c = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    body = bytes(range(256)) * 20000  # 5 MB: first and last MiB hashed
    a.write_bytes(body)
    b.write_bytes(body)
    c.write_bytes(body[:-1] + b"\x00")
    assert model_hash(a) == model_hash(b) != model_hash(c)
    hits = metrics._fingerprint.cache_info().hits
    model_hash(a)
    assert metrics._fingerprint.cache_info().hits == hits + 1  # not read again
