"""`tokenmill chat` and `tokenmill check-prompt`: the CLI as a subprocess with scripted stdin, and ChatSession in-process.

What the model was given is checked against prompts recomputed here from the transcript (`llm.encode`), and replies
built on a reused KV prefix against the same reply computed from scratch.
"""
import io
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time

import pytest
import torch

from tokenmill.chat import ChatSession
from tokenmill.cli.chat import ChatREPL, FenceStyler
from tokenmill.errors import InvalidRequestError
from tokenmill.llm import LLM
from tokenmill.sampling.params import SamplingParams

STATS = re.compile(r"prompt (\d+) tok \((\d+) cached, (\d+) new\).*\| reply (\d+) tok .*\| context (\d+)/(\d+)")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the test machine's 2 cores are shared: 2 OpenMP threads spin against other jobs and decode slows 10x or more
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Chat:
    """`tokenmill chat` as a subprocess: stdin lines are sent at once or one by one; stdout is read as it arrives
    (each read kept with its time), stderr line by line."""

    def __init__(self, gguf_path, *args):
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        cmd = [sys.executable, "-m", "tokenmill", "chat", "-m", str(gguf_path), "--threads", "1", *args]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.p.stdout, selectors.EVENT_READ, "out")
        self.sel.register(self.p.stderr, selectors.EVENT_READ, "err")
        self.out: list[tuple[float, bytes]] = []
        self.err = b""
        self.err_lines: list[tuple[float, str]] = []

    def send(self, *lines: str, close: bool = False):
        self.p.stdin.write("".join(line + "\n" for line in lines).encode())
        self.p.stdin.flush()
        if close:
            self.p.stdin.close()

    def pump(self, until=lambda: False, timeout: float = 240) -> bool:
        """Read output until `until()` holds or both pipes close; False on timeout."""
        end = time.monotonic() + timeout
        while self.sel.get_map() and not until():
            if time.monotonic() > end:
                return False
            for key, _ in self.sel.select(timeout=1):
                data = os.read(key.fd, 65536)
                if not data:
                    self.sel.unregister(key.fileobj)
                elif key.data == "out":
                    self.out.append((time.monotonic(), data))
                else:
                    self.err += data
                    *done, self.err = self.err.split(b"\n")
                    self.err_lines += [(time.monotonic(), line.decode()) for line in done]
        return True

    def finish(self, timeout: float = 240) -> int:
        assert self.pump(timeout=timeout), "chat did not exit in time:\n" + self.stderr
        return self.p.wait(timeout=10)

    @property
    def stdout(self) -> str:
        return b"".join(d for _, d in self.out).decode()

    @property
    def stderr(self) -> str:
        return "\n".join(line for _, line in self.err_lines)

    def replies(self) -> list[str]:
        """stdout cut at the times the stats lines arrived: each reply as printed (with the newline after it)."""
        cuts = [t for t, line in self.err_lines if STATS.search(line)]
        return [b"".join(d for t, d in self.out if lo <= t < hi).decode() for lo, hi in zip([0.0] + cuts, cuts)]

    def stats(self) -> list[tuple[int, ...]]:
        return [tuple(map(int, m.groups())) for _, line in self.err_lines if (m := STATS.search(line))]


def chatml(messages):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


# ---- the CLI --------------------------------------------------------------------------------------------------------

def test_chat_streams_reuses_prefix_stops_on_ctrl_c_and_runs_commands(gguf_path, llm, tmp_path):
    saved, after_undo = tmp_path / "chat.json", tmp_path / "undone.json"
    system = [{"role": "system", "content": "You are a helpful assistant."}]
    c = Chat(gguf_path, "--temperature", "0", "--max-tokens", "32", "--system", system[0]["content"])
    c.send("Hi, my name is Ada.", "What is my name?")
    assert c.pump(until=lambda: len(c.stats()) == 2), c.stderr
    n_out = len(c.out)
    c.send("Tell me a long story about a dragon.")
    assert c.pump(until=lambda: len(c.out) >= n_out + 4), c.stderr
    c.p.send_signal(signal.SIGINT)  # Ctrl-C in the middle of the third reply
    assert c.pump(until=lambda: "(stopped" in c.stderr, timeout=60), c.stderr
    c.send("Continue the story.", f"/save {saved}", "/undo", f"/save {after_undo}", "/retry", "/bogus", "/system",
           close=True)
    assert c.finish() == 0, c.stderr
    assert "Traceback" not in c.stderr
    stats = c.stats()
    assert len(stats) == 5, c.stderr  # four turns and the retry
    history = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in history] == ["user", "assistant"] * 4

    # streamed: the first reply came in several reads, all before its stats line; each reply printed is the one kept
    first_stats_t = next(t for t, line in c.err_lines if STATS.search(line))
    assert len([d for t, d in c.out if t < first_stats_t]) >= 4
    replies = c.replies()
    assert replies[:4] == [m["content"] + "\n" for m in history[1::2]]

    # what the model was given, recomputed from the transcript; each turn reused the previous prompt from the cache
    # (the engine's prefix cache holds whole blocks: up to a block's worth less than the previous prompt)
    prompts = [llm.encode(system + history[: 2 * i + 1]) for i in range(4)]
    assert stats[0][:3] == (len(prompts[0]), 0, len(prompts[0]))
    block = llm.engine.blocks.block_size
    for i in (1, 2, 3):
        prompt, cached, new = stats[i][:3]
        assert prompt == len(prompts[i]) and prompts[i][: len(prompts[i - 1])] == prompts[i - 1]
        assert whole_blocks(llm, len(prompts[i - 1])) <= cached < prompt
        assert new <= len(llm.encode(history[2 * i]["content"])) + 12 + block - 1  # the new turn's tokens, no more

    # Ctrl-C kept the partial reply (what was printed); the next turn, built on its cached tokens, equals a recompute
    partial = history[5]["content"]
    assert partial and stats[2][3] < 32
    assert "the partial reply is kept" in c.stderr
    llm.reset_cache()
    assert llm.generate(system + history[:7], temperature=0.0, max_new_tokens=32).text == history[7]["content"]

    # /undo dropped the last exchange; /retry regenerated the stopped reply from the cached prompt (greedy: it
    # starts with what was stopped)
    assert json.loads(after_undo.read_text())["messages"] == history[:6]
    assert stats[4][:2] == (len(prompts[2]), whole_blocks(llm, len(prompts[2]) - 1))
    assert replies[4].startswith(partial) and len(replies[4]) > len(partial) + 1
    lines = c.stderr.splitlines()
    assert sum("error: unknown command '/bogus'" in line for line in lines) == 1
    assert "system prompt: 'You are a helpful assistant.'" in c.stderr


def test_amnesia_forgets(gguf_path, llm, tmp_path):
    saved = tmp_path / "a.json"
    c = Chat(gguf_path, "--amnesia", "--temperature", "0", "--max-tokens", "12", "--system", "You are terse.")
    c.send("My name is Zorblax.", "What is my name?", f"/save {saved}", close=True)
    assert c.finish() == 0, c.stderr
    data = json.loads(saved.read_text())
    assert [m["content"] for m in data["messages"][::2]] == ["My name is Zorblax.", "What is my name?"]
    system = [{"role": "system", "content": "You are terse."}]
    alone = llm.encode(system + [{"role": "user", "content": "What is my name?"}])
    with_history = llm.encode(system + data["messages"][:3])
    s1, s2 = c.stats()
    assert s2[0] == len(alone) < len(with_history)  # the model saw the system prompt and the question, nothing else
    assert "Zorblax" not in data["messages"][3]["content"]


def test_fifty_turns_in_a_small_context(gguf_path, llm, tmp_path):
    """Never overflows, never crashes, keeps the system prompt: each turn's prompt equals the one recomputed here from
    the saved transcript (system + the most recent exchanges that leave room for the reply)."""
    saved, max_ctx, reserve, system = tmp_path / "long.json", 96, 2, "You are a pirate."
    c = Chat(gguf_path, "--temperature", "0", "--max-tokens", str(reserve), "--max-context", str(max_ctx),
             "--system", system)
    questions = [f"Question {i}: name a colour." for i in range(50)]
    c.send(*questions, f"/save {saved}", close=True)
    assert c.finish(timeout=300) == 0, c.stderr
    assert "Traceback" not in c.stderr and "error" not in c.stderr
    stats = c.stats()
    assert len(stats) == 50
    history = json.loads(saved.read_text())["messages"]
    assert len(history) == 100
    head = [{"role": "system", "content": system}]
    for i, (prompt, cached, new, generated, used, ctx) in enumerate(stats):
        past = history[: 2 * i]
        user = history[2 * i : 2 * i + 1]
        expected = next(ids for k in range(i + 1) if len(ids := llm.encode(head + past[2 * k :] + user)) + reserve
                        <= max_ctx)
        assert prompt == len(expected), f"turn {i + 1}"
        assert used == prompt + generated <= max_ctx and ctx == max_ctx
    assert "left out the 1 oldest exchange" in c.stderr


# ---- ChatSession in-process -----------------------------------------------------------------------------------------

def drain(reply):
    for _ in reply:
        pass
    return reply


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def whole_blocks(llm, n: int) -> int:
    """Tokens of n that the engine's prefix cache can hold: whole KV blocks only."""
    bs = llm.engine.blocks.block_size
    return n // bs * bs


def test_prefix_reuse_matches_recompute(llm):
    params = SamplingParams(temperature=0.0, max_new_tokens=32)
    s = ChatSession(llm, params, system="You are a helpful assistant.")
    r1 = drain(s.send("Name three colours."))
    r2 = drain(s.send("Which of them is the warmest?"))
    # the cache after turn 1: prompt and reply tokens but the last sampled one (never fed), unless that was the EOS
    c1, c2 = r1.completion, r2.completion
    held = r1.turn.ids + (c1.token_ids if c1.finish_reason in ("eos", "stop") else c1.token_ids[:-1])
    assert c2.cached_tokens >= whole_blocks(llm, len(r1.turn.ids))
    assert c2.cached_tokens == whole_blocks(llm, min(common_prefix(held, r2.turn.ids), len(r2.turn.ids) - 1))
    assert c2.prompt_tokens == len(r2.turn.ids) == len(llm.encode(r2.turn.messages))
    llm.reset_cache()
    scratch = llm.generate(r2.turn.messages, params)
    assert scratch.cached_tokens == 0 and scratch.text == r2.text


def test_trimming_keeps_system_and_falls_back_to_a_correct_recompute(llm):
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    s = ChatSession(llm, params, system="You answer in one sentence.", max_context=120)
    replies = [drain(s.send(q)) for q in ("What is rain?", "What is snow?", "What is hail?", "What is fog?")]
    trimmed = next(r for r in replies if r.turn.left_out > 0)
    before = replies[replies.index(trimmed) - 1]
    assert trimmed.turn.messages[0] == {"role": "system", "content": "You answer in one sentence."}
    assert trimmed.turn.prompt.startswith("<|im_start|>system\nYou answer in one sentence.<|im_end|>")
    assert len(trimmed.turn.ids) + 16 <= 120
    # the prefix changed after the system prompt: only the common part is reused
    common = common_prefix(before.turn.ids, trimmed.turn.ids)
    assert trimmed.completion.cached_tokens == whole_blocks(llm, common) and common < len(before.turn.ids)
    llm.reset_cache()
    assert llm.generate(trimmed.turn.messages, params).text == trimmed.text


def test_amnesia_prompt_holds_only_system_and_message(llm):
    s = ChatSession(llm, SamplingParams(temperature=0.0, max_new_tokens=4), system="Be brief.", amnesia=True)
    drain(s.send("My name is Ada."))
    r = s.send("What is my name?")
    r.close()
    assert r.turn.prompt == chatml([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is my name?"}])
    assert len(s.history) == 4  # the transcript is kept; only the prompt forgets


def test_undo_retry_reset(llm):
    s = ChatSession(llm, SamplingParams(temperature=0.0, max_new_tokens=8))
    with pytest.raises(InvalidRequestError, match="nothing to undo"):
        s.undo()
    with pytest.raises(InvalidRequestError, match="nothing to retry"):
        s.retry()
    a = drain(s.send("Say hello.")).text
    b = drain(s.send("Say goodbye.")).text
    again = drain(s.retry())
    assert again.text == b
    assert again.completion.cached_tokens == whole_blocks(llm, again.completion.prompt_tokens - 1)
    assert [m["content"] for m in s.history] == ["Say hello.", a, "Say goodbye.", b]
    assert s.undo()["content"] == "Say goodbye." and [m["content"] for m in s.history] == ["Say hello.", a]
    s.reset()
    assert s.history == []
    first = s.send("Count to ten.")
    partial = next(iter(first))
    drain(s.send("Stop."))  # a reply still streaming is stopped and recorded before the next turn starts
    assert [m["content"] for m in s.history[:3]] == ["Count to ten.", partial, "Stop."] and first.interrupted


def test_bad_input_loses_nothing(llm, tmp_path):
    s = ChatSession(llm, SamplingParams(temperature=0.0, max_new_tokens=8), system="Hi.", max_context=64)
    drain(s.send("Hello."))
    kept = [dict(m) for m in s.history]
    with pytest.raises(InvalidRequestError, match="--max-context 64"):
        s.send("word " * 80)
    bad = tmp_path / "bad.json"
    for text in ("{not json", json.dumps([{"role": "assistant", "content": "x"}]), json.dumps({"messages": 3})):
        bad.write_text(text)
        with pytest.raises(InvalidRequestError, match="bad.json"):
            s.load(bad)
    with pytest.raises(InvalidRequestError, match="cannot read"):
        s.load(tmp_path / "missing.json")
    assert s.history == kept and s.system == "Hi."
    with pytest.raises(InvalidRequestError, match="--max-tokens 64 leaves no room"):
        ChatSession(llm, SamplingParams(max_new_tokens=64), max_context=64)


def test_save_load_round_trip(llm, tmp_path):
    s = ChatSession(llm, SamplingParams(temperature=0.0, max_new_tokens=4), system="Sys.")
    drain(s.send("One."))
    s.save(tmp_path / "c.json")
    t = ChatSession(llm, SamplingParams(temperature=0.0, max_new_tokens=4))
    t.load(tmp_path / "c.json")
    assert t.system == "Sys." and t.history == s.history
    assert t.prompt_for("Two.").prompt == chatml([{"role": "system", "content": "Sys."}, *s.history,
                                                  {"role": "user", "content": "Two."}])
    (tmp_path / "list.json").write_text(json.dumps([{"role": "system", "content": "Other."}, *s.history]))
    t.load(tmp_path / "list.json")
    assert t.system == "Other." and t.history == s.history


def test_first_prompt_is_checked_and_findings_shown(llm, monkeypatch, capsys):
    wrong = LLM(llm.loaded, template="llama3")  # Llama-3 markers are not SmolLM2 tokens
    s = ChatSession(wrong, SamplingParams(temperature=0.0, max_new_tokens=2))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nHi again\n"))
    assert ChatREPL(s, tty=False).loop() == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: prompt format:")]
    assert warnings and all("token_not_in_vocab" in w or "special_token_split" in w for w in warnings)
    assert sum("<|start_header_id|>" in w for w in warnings) == 1  # once, on the first prompt only
    good = ChatSession(llm, SamplingParams(temperature=0.0, max_new_tokens=2))
    r = good.send("Hi")
    r.close()
    assert r.turn.findings == []


def test_fence_styler_keeps_text_and_styles_code():
    out = []
    f = FenceStyler(lambda text, style: out.append((text, style)))
    text = "Here:\n```python\nprint(1)\n```\nDone ``` inline.\n  ```\nx\n  ```\n"
    for i in range(0, len(text), 3):  # pieces cut anywhere, as tokens are
        f.feed(text[i : i + 3])
    f.flush()
    assert "".join(t for t, _ in out) == text
    styled = {}
    for t, style in out:
        styled[style] = styled.get(style, "") + t
    assert styled["green"] == "print(1)\nx\n"
    assert styled["dim"] == "```python\n```\n  ```\n  ```\n"


# ---- check-prompt ---------------------------------------------------------------------------------------------------

def check_cli(*args, stdin=None):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "tokenmill", "check-prompt", *args], capture_output=True, text=True,
                          timeout=120, env=env, input=stdin)


def test_check_prompt_finds_planted_mistake_and_is_silent_on_good_prompts(gguf_path, tmp_path, capsys, monkeypatch):
    import functools

    from tokenmill.cli import check_prompt
    from tokenmill.cli.main import main

    # in-process runs read the GGUF vocabulary once (gguf-py takes seconds to parse it)
    monkeypatch.setattr(check_prompt, "_tokenizer_and_template", functools.lru_cache(check_prompt._tokenizer_and_template))

    good = chatml([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}])
    planted = good.replace("<|im_start|>user\n", "<|im_start|>user")  # the role tag lost its newline
    r = check_cli("--file", "-", "-m", str(gguf_path), stdin=planted)
    offset = planted.index("<|im_start|>user") + len("<|im_start|>user")
    assert r.returncode == 1, r.stderr
    assert r.stdout.startswith(f"missing_newline at offset {offset} (line 3, column 17): ")
    assert "fix: insert '\\n' right after the role tag" in r.stdout and "1 finding" in r.stderr

    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Again"}]))
    for args in ([good], ["--messages", str(msgs)]):  # ChatML takes two user turns in a row
        assert main(["check-prompt", *args, "-m", str(gguf_path)]) == 0
        out = capsys.readouterr()
        assert out.out == "" and "0 findings" in out.err
    for args in (["--messages", str(msgs), "--template", "gemma"], ["--file", str(tmp_path / "nope.txt")],
                 ["--messages", str(tmp_path / "nope.json")]):
        assert main(["check-prompt", *args, "-m", str(gguf_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("tokenmill: error:"), err
