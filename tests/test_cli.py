"""The CLI as a user meets it: bad input gives one line on stderr and a non-zero exit, never a traceback."""
import json
import os
import subprocess
import sys

import pytest


def run_cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "tokenmill", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


def assert_one_line_error(r, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_truncated_gguf(tmp_path, gguf_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(gguf_path.read_bytes()[: 5_000_000])
    assert_one_line_error(run_cli("generate", "hi", "-m", str(bad)), "truncated")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("this is not a model")
    assert_one_line_error(run_cli("generate", "hi", "-m", str(bad)), "not a GGUF file")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 32, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2}))
    assert_one_line_error(run_cli("generate", "hi", "-m", str(tmp_path)), "no weights")


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    assert_one_line_error(run_cli("generate", "hi", "-m", str(tmp_path)), "gpt_neox", "llama, mistral, qwen2")


def test_missing_model_path(tmp_path):
    assert_one_line_error(run_cli("generate", "hi", "-m", str(tmp_path / "nope.gguf")), "not found")


def test_empty_prompt(gguf_path):
    assert_one_line_error(run_cli("generate", "", "-m", str(gguf_path)), "prompt is empty")


@pytest.mark.parametrize("value", ["-1", "0", "many"])
def test_bad_max_tokens(value):
    assert_one_line_error(run_cli("generate", "hi", "--max-tokens", value), "--max-tokens")


def test_bad_sampler_value():
    assert_one_line_error(run_cli("generate", "hi", "--top-p", "1.5"), "top_p")


def test_help_reads_well():
    r = run_cli("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "demo" in r.stdout
    r = run_cli("generate", "--help")
    assert r.returncode == 0 and "--max-tokens" in r.stdout and "--chat" in r.stdout


def test_generate_streams_text_and_stats(gguf_path):
    r = run_cli("generate", "What is the capital of France?", "--chat", "--temperature", "0", "--max-tokens", "16",
                "-m", str(gguf_path))
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tok/s" in r.stderr and "peak memory" in r.stderr


def test_bad_dtype():
    assert_one_line_error(run_cli("generate", "hi", "--dtype", "float16"), "--dtype", "float32", "bfloat16")
