"""`tokenmill batch`: results in input order, per-line errors, resuming, interrupted runs, bad input and output."""
import json
import os
import subprocess
import sys

import pytest

import tokenmill.llm
from tokenmill import SamplingParams
from tokenmill.cli import main as cli
from tokenmill.engine.llm_engine import LLMEngine

ARGS = ["--max-tokens", "4", "--temperature", "0", "--kv-cache-memory", "64MiB", "--no-progress"]


@pytest.fixture
def run(llm, monkeypatch):
    """`tokenmill batch` in this process, on the session's model."""
    monkeypatch.setattr(tokenmill.llm, "load", lambda *a, **k: llm)
    return lambda *argv: cli.main(["batch", *map(str, argv), *ARGS])


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def solo(llm, prompt, **kw):
    return llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=kw.pop("max_new_tokens", 4), **kw)).text


def test_text_file_in_input_order(llm, run, tmp_path, capsys):
    prompts = ["The capital of France is", "def square(x):", "", "Once upon a time, in a land far away, there lived"]
    src, dst = tmp_path / "in.txt", tmp_path / "out.jsonl"
    src.write_text("\n".join(prompts) + "\n")
    assert run(src, "-o", dst, "--max-concurrency", "2") == 0
    rows = read(dst)
    assert [r["id"] for r in rows] == ["1", "2", "4"]  # line numbers; the blank line is no request
    for r, p in zip(rows, [prompts[0], prompts[1], prompts[3]]):
        assert r["text"] == solo(llm, p) and r["finish_reason"] == "length"
        assert r["metrics"]["prompt_tokens"] == len(llm.encode(p)) and r["metrics"]["generated_tokens"] == 4
    err = capsys.readouterr().err
    assert "KV cache:" in err and "3 requests done, 0 failed" in err and "p95" in err


def test_jsonl_with_bad_lines_per_line_params_and_a_prompt_too_long(llm, run, tmp_path, capsys):
    lines = [
        json.dumps({"id": "a", "prompt": "Hello, my name is", "max_tokens": 2}),
        json.dumps({"id": 7, "messages": [{"role": "user", "content": "Say hi"}]}),
        "{not json",
        json.dumps({"id": "a", "prompt": "again"}),
        json.dumps({"id": "t", "prompt": "x", "temperature": -1}),
        json.dumps({"id": "long", "prompt": "word " * 9000}),
        json.dumps(["a list"]),
        json.dumps({"id": "z", "prompt": "The moon is"}),
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    assert run(src, "-o", dst) == 0
    rows = {r["id"]: r for r in read(dst)}
    assert [r["id"] for r in read(dst)] == ["a", "7", "long", "z"]
    assert rows["a"]["text"] == solo(llm, "Hello, my name is", max_new_tokens=2)
    assert rows["7"]["text"] == solo(llm, [{"role": "user", "content": "Say hi"}])
    assert rows["z"]["text"] == solo(llm, "The moon is")
    assert rows["long"] == {"id": "long", "finish_reason": "error",
                            "error": "prompt has 9001 tokens; the model's context is 8192 tokens"}
    err = capsys.readouterr().err
    for n, what in ((3, "not valid JSON"), (4, "id 'a' appears twice"), (5, "temperature must be in"),
                    (7, "expected a JSON object")):
        assert f"in.jsonl:{n}: {what}" in err
    assert "4 bad input lines skipped" in err and "1 failed" in err


def test_strict_fails_at_the_first_bad_line_before_any_work(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tokenmill.llm, "load", lambda *a, **k: pytest.fail("loaded the model"))
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"id": 1, "prompt": "ok"}) + "\n" + json.dumps({"id": 2}) + "\n")
    assert run(src, "-o", dst, "--strict") == 2
    assert capsys.readouterr().err.strip() == (
        f'tokenmill: error: {src}:2: give exactly one of "prompt" and "messages"')
    assert not dst.exists()


def test_rerun_skips_finished_ids_and_an_interrupted_run_loses_nothing(llm, run, tmp_path, monkeypatch):
    prompts = [f"Fact number {i} about the ocean:" for i in range(6)]
    src, dst = tmp_path / "in.txt", tmp_path / "out.jsonl"
    src.write_text("\n".join(prompts) + "\n")
    # crash after the first two requests finish: their lines must already be on disk
    step, finished = LLMEngine.step, []

    def crashing_step(self):
        if len(finished) >= 2:
            raise KeyboardInterrupt
        outs = step(self)
        finished.extend(o for o in outs if o.finished)
        return outs

    monkeypatch.setattr(LLMEngine, "step", crashing_step)
    assert run(src, "-o", dst, "--max-concurrency", "1") == 130
    first = read(dst)
    assert len(first) == len(finished) == 2
    monkeypatch.setattr(LLMEngine, "step", step)
    # a finished line is kept as it is; a torn line from a crash mid-write is dropped and redone
    kept = {"id": "5", "text": "FROM AN EARLIER RUN", "finish_reason": "length"}
    dst.write_text(dst.read_text() + json.dumps(kept) + "\n" + '{"id": "3", "text": "hal')
    assert run(src, "-o", dst) == 0
    rows = read(dst)
    assert [r["id"] for r in rows] == [str(i) for i in range(1, 7)]
    assert rows[:2] == first and rows[4] == kept
    assert [r["text"] for r in rows[2:4] + rows[5:]] == [solo(llm, prompts[i]) for i in (2, 3, 5)]


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "tokenmill", "batch", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env, stdin=subprocess.DEVNULL)


def assert_one_line_error(r, *needles):
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_unreadable_input_and_unwritable_output_fail_before_any_work(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    # -m points at nothing: reaching the model load would print a different error
    missing_model = ["-m", tmp_path / "no-model.gguf"]
    assert_one_line_error(run_cli(tmp_path / "nope.txt", "-o", tmp_path / "o.jsonl", *missing_model),
                          "cannot read input", "nope.txt")
    assert_one_line_error(run_cli(src, "-o", tmp_path / "no" / "dir" / "o.jsonl", *missing_model),
                          "cannot write output", "o.jsonl")
    assert_one_line_error(run_cli(src, "-o", tmp_path, *missing_model), "cannot write output", "is a directory")
    assert_one_line_error(run_cli(src, "-o", tmp_path / "o.jsonl", "--kv-cache-memory", "lots", *missing_model),
                          "KV cache memory must be a size", "'lots'")
    assert_one_line_error(run_cli(src, "-o", tmp_path / "o.jsonl", "--temperature", "-2", *missing_model),
                          "temperature must be in")
