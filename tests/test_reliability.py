"""Issue 24, "never lose the user's data, never wedge": one test per guarantee in docs/reliability.md."""
import io
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

import tokenmill.llm
from tokenmill import SamplingParams
from tokenmill.chat import ChatSession
from tokenmill.cli import main as cli
from tokenmill.cli.chat import ChatREPL
from tokenmill.errors import InvalidRequestError, ModelLoadError
from tokenmill.formats.prompt_check import check_prompt
from tokenmill.formats.template import get_template
from tokenmill.kernels.cpu import extension
from tokenmill.model import loader
from tokenmill.model.config import ModelConfig
from tokenmill.model.transformer import Transformer

BATCH = ["--max-tokens", "1", "--temperature", "0", "--kv-cache-memory", "64MiB", "--no-progress"]


def one_line_error(capsys, *needles) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tokenmill: error: "), lines
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---- 1. batch -o: a regular file of our results, or a stream; never the input, never renamed over a non-file ----

def batch_without_model(tmp_path, *argv):
    return cli.main(["batch", *map(str, argv), "-m", str(tmp_path / "no-model.gguf"), *BATCH])


def test_batch_refuses_its_input_and_files_that_are_not_its_results(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The sky is\nHello\n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "prompt": f"line {i}"}) + "\n" for i in range(60)))
    (tmp_path / "link.txt").symlink_to(prompts)
    for src, dst in ((prompts, prompts), (jsonl, jsonl), (prompts, tmp_path / "link.txt")):
        before = src.read_bytes()
        assert batch_without_model(tmp_path, src, "-o", dst) == 2
        one_line_error(capsys, "is the input file", "another file")
        assert src.read_bytes() == before
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nnot results, no newline at the end")
    assert batch_without_model(tmp_path, prompts, "-o", notes) == 2
    one_line_error(capsys, "notes.txt", "is not a `tokenmill batch` results file (line 1")
    assert notes.read_text() == "my notes\nnot results, no newline at the end"


@pytest.fixture
def batch(llm, monkeypatch):
    """`tokenmill batch` in this process on the session's model, in a thread: a run that hangs (reading a pipe back)
    fails the test instead of wedging the suite."""
    monkeypatch.setattr(tokenmill.llm, "load", lambda *a, **k: llm)

    def run(*argv):
        out = {}

        def target():
            try:
                out["rc"] = cli.main(["batch", *map(str, argv), *BATCH])
            except BaseException as e:
                out["error"] = e

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(120)
        if "error" in out:
            raise out["error"]
        assert "rc" in out, "tokenmill batch hung"
        return out["rc"]

    return run


def ids(text: str) -> list[str]:
    return [json.loads(line)["id"] for line in text.splitlines()]


def test_batch_streams_to_stdout_a_pipe_and_a_fifo(batch, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a file named "-" would land here
    src = tmp_path / "in.txt"
    src.write_text("The sky is\n")
    assert batch(src, "-o", "-") == 0
    assert ids(capsys.readouterr().out) == ["1"] and not (tmp_path / "-").exists()

    # what /dev/stdout is when stdout is piped: a symlink to /proc/self/fd/N, a pipe that reading back would hang on
    r, w = os.pipe()
    link = tmp_path / "stdout"
    link.symlink_to(f"/proc/self/fd/{w}")
    try:
        assert batch(src, "-o", link) == 0
    finally:
        os.close(w)
    with os.fdopen(r) as f:
        assert ids(f.read()) == ["1"]
    assert link.is_symlink()

    fifo, got = tmp_path / "fifo", []
    os.mkfifo(fifo)
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    assert batch(src, "-o", fifo) == 0
    reader.join(30)
    assert ids(got[0]) == ["1"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_batch_writes_through_a_symlink_to_a_regular_file(batch, tmp_path):
    src, real, link = tmp_path / "in.txt", tmp_path / "results.jsonl", tmp_path / "link.jsonl"
    src.write_text("The sky is\nHello\nOnce upon a time\n")
    real.write_text("")
    real.chmod(0o640)
    link.symlink_to(real)
    assert batch(src, "-o", link) == 0
    assert link.is_symlink() and ids(real.read_text()) == ["1", "2", "3"]  # reordered into the file, not the link
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "link.jsonl", "results.jsonl"]  # no temp left


# ---- 2. a killed kernel build: the lock dies with its holder ----

SLOW_BUILD = """
import pathlib, sys, time
from torch.utils import cpp_extension
from tokenmill.kernels.cpu import extension

def stuck(**kw):  # cpp_extension holds its lock file (build_dir/lock) while this runs
    pathlib.Path(sys.argv[2]).touch()
    time.sleep(600)

cpp_extension._write_ninja_file_and_build_library = stuck
extension._build(pathlib.Path(sys.argv[1]))
"""
BUILD = """
import pathlib, sys
from tokenmill.kernels.cpu import extension
extension._build(pathlib.Path(sys.argv[1]))
print("built")
"""


def test_a_killed_kernel_build_does_not_wedge_later_runs(tmp_path, monkeypatch, capsys):
    src, started = tmp_path / "probe.cpp", tmp_path / "started"
    src.write_text('extern "C" int tokenmill_probe() { return 7; }\n')
    env = {**os.environ, "TOKENMILL_EXT_DIR": str(tmp_path / "ext"), "PYTHONPATH": os.getcwd()}
    monkeypatch.setenv("TOKENMILL_EXT_DIR", env["TOKENMILL_EXT_DIR"])
    first = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, src, started], env=env)
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first build never started"
            time.sleep(0.1)
        # while it builds, another process waits, says for whom, and gives up after its timeout
        with pytest.raises(TimeoutError, match=f"process {first.pid}"):
            extension._build(src, wait_s=1)
        assert f"building CPU kernels, waiting for process {first.pid}" in capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert list((tmp_path / "ext").glob("*/lock"))  # cpp_extension's lock file, left behind as by a real kill
    second = subprocess.run([sys.executable, "-c", BUILD, src], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and second.stdout.strip() == "built", second.stderr


# ---- 4, 5. model files: lying sizes fail before anything is built; damaged files are refused ----

VOCAB = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["he", "ll", "hell", "hello", "<|endoftext|>"]
MERGES = ["h e", "l l", "he ll", "hell o"]
TINY = dict(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1)


def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return Transformer(ModelConfig("llama", **TINY)).state_dict()


def tiny_gguf(path: Path, *, merges: bool = True, **claims) -> Path:
    """A 2-layer llama GGUF with a byte-level BPE vocabulary; `claims` override what the metadata says."""
    meta = {"block_count": 2, "embedding_length": 16, **claims}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(meta["block_count"])
    w.add_embedding_length(meta["embedding_length"])
    w.add_context_length(64)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(VOCAB)
    w.add_token_types([gguf.TokenType.NORMAL] * (len(VOCAB) - 1) + [gguf.TokenType.CONTROL])
    if merges:
        w.add_token_merges(MERGES)
    w.add_eos_token_id(len(VOCAB) - 1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for name, t in tiny_state().items():
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_hf(path: Path, **claims) -> Path:
    path.mkdir()
    config = {"model_type": "llama", "vocab_size": len(VOCAB), "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, **claims}
    (path / "config.json").write_text(json.dumps(config))
    save_file(tiny_state(), path / "model.safetensors")
    vocab = {t: i for i, t in enumerate(VOCAB)}
    Backend(models.BPE(vocab, [tuple(m.split()) for m in MERGES])).save(str(path / "tokenizer.json"))
    return path


@pytest.fixture
def no_big_model(monkeypatch):
    """Building a model of more than the file's 2 layers fails the test at once (the old loader spent 100 s here)."""
    real = loader.Transformer

    def build(cfg):
        assert cfg.num_layers <= 2, f"built a {cfg.num_layers}-layer model before checking the weights"
        return real(cfg)

    monkeypatch.setattr(loader, "Transformer", build)


@pytest.mark.parametrize("fmt,claims,error", [
    ("gguf", {"block_count": 100_000}, "the config says 100000 layers (num_hidden_layers / block_count) but the file "
                                       "holds weights for 2"),
    ("hf", {"num_hidden_layers": 100_000}, "the config says 100000 layers"),
    ("gguf", {"embedding_length": 4096}, "tensor model.embed_tokens.weight has shape (261, 16), expected (261, 4096)"),
])
def test_lying_sizes_fail_before_the_model_is_built(tmp_path, no_big_model, fmt, claims, error):
    path = tiny_gguf(tmp_path / "m.gguf", **claims) if fmt == "gguf" else tiny_hf(tmp_path / "m", **claims)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match=error.replace("(", r"\(").replace(")", r"\)")):
        loader.load_model(str(path))
    assert time.perf_counter() - t0 < 10


def shift_tensor(path: Path, name: str, by: int):
    """Move one tensor's data offset in the header by `by` bytes, as a damaged or badly written file would."""
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    at += 4 + 8 * struct.unpack_from("<I", data, at)[0] + 4  # n_dims, dims, type
    struct.pack_into("<Q", data, at, struct.unpack_from("<Q", data, at)[0] + by)
    path.write_bytes(data)


def test_damaged_gguf_files_are_refused(tmp_path):
    good = tiny_gguf(tmp_path / "good.gguf")
    ok = loader.load_model(str(good))
    assert ok.tokenizer.encode("hello", add_bos=False) == [VOCAB.index("hello")]

    shifted = tiny_gguf(tmp_path / "shifted.gguf")
    shift_tensor(shifted, "blk.0.attn_q.weight", 8)
    with pytest.raises(ModelLoadError, match=r"tensor blk.0.attn_q.weight starts at data offset [\d,]+, not a "
                                             r"multiple of the file's alignment 32 \(general.alignment\)"):
        loader.load_model(str(shifted))

    no_merges = tiny_gguf(tmp_path / "no-merges.gguf", merges=False)
    with pytest.raises(ModelLoadError, match="has no tokenizer.ggml.merges, so every character would be its own"):
        loader.load_model(str(no_merges))


# ---- 8. check-prompt is linear in the prompt's length ----

class NoSpecialTokens:
    def token_to_id(self, text):
        return None

    def encode(self, text, special):
        return []


def test_check_prompt_is_linear(tmp_path, gguf_path, capsys):
    # [/INST][INST] drops an empty reply turn: the old list.remove made this ~2 min for 0.7 MB
    prompt = "[INST] hi [/INST][INST] x [/INST] ok</s>" * 17_500
    t0 = time.perf_counter()
    found = check_prompt(prompt, vocab=NoSpecialTokens(), template=get_template("mistral", None, "<s>", "</s>"))
    assert time.perf_counter() - t0 < 15 and found
    # 56k findings, each with its line and column: counted from the start, the old CLI took ~1 min on these 2.8 MB
    text = tmp_path / "p.txt"
    text.write_text("<|im_start|>user\nhello there<|im_end|>\n<|im_end|>\n" * 56_000)
    t0 = time.perf_counter()
    assert cli.main(["check-prompt", "--file", str(text), "-m", str(gguf_path)]) == 1
    assert time.perf_counter() - t0 < 20
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("no_generation_prompt at offset 2800000 (line 168001, column 1)")


# ---- 9. chat keeps the conversation through bad input; batch lines follow the API's rules ----

def test_chat_survives_invalid_utf8_and_a_nul_byte_in_a_file_name(llm, tmp_path, monkeypatch, capsys):
    saved = tmp_path / "chat.json"
    script = b"Hi\n\xff\xfe not UTF-8\n/save bad\x00name.json\n/load bad\x00name.json\n/save " + str(saved).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(script + b"\n"), encoding="utf-8"))  # strict
    session = ChatSession(llm, SamplingParams(temperature=0, max_new_tokens=1))
    assert ChatREPL(session, tty=False).loop() == 0
    err = capsys.readouterr().err
    assert "error: that line is not valid UTF-8; it was not sent" in err
    assert "error: cannot save to 'bad\\x00name.json': embedded null byte" in err
    assert "error: cannot read 'bad\\x00name.json': embedded null byte" in err
    assert [m["content"] for m in json.loads(saved.read_text())["messages"]][0] == "Hi"


@pytest.mark.parametrize("system", [5, ["a list"], "\ud800 lone surrogate"])
def test_chat_load_refuses_a_system_message_that_is_not_text(llm, tmp_path, system):
    session = ChatSession(llm, SamplingParams(max_new_tokens=2), system="be brief")
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"role": "system", "content": system}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}]))
    with pytest.raises(InvalidRequestError, match="the system prompt must be a string of text"):
        session.load(path)
    assert session.system == "be brief" and session.history == []


def test_batch_line_with_both_max_tokens_and_max_new_tokens_is_refused(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "hi", "max_tokens": 3, "max_new_tokens": 5}) + "\n")
    assert batch_without_model(tmp_path, src, "-o", tmp_path / "out.jsonl", "--strict") == 2
    one_line_error(capsys, f"{src}:1: ", "max_new_tokens")
