"""Every entry point is one request path: `LLM.generate`, `LLM.stream`, a `ChatSession` turn and `tokenmill batch` build
the same request (template, encoding, sampling state with DRY sequence breakers, stops) and run it on the engine, so the
same prompt and seed give the same text through each."""
import json

import pytest

import tokenmill.llm
from tokenmill import SamplingParams
from tokenmill.chat import ChatSession
from tokenmill.cli import main as cli

QUESTION = "Write a short poem about rain."
# DRY on, with its default sequence breakers ("\n", ":", '"', "*"): a repeat never spans them, so the model goes on
# repeating the lines; without breakers the repeat is penalised and the text changes
LINES = "Name: Bob\nName: Bob\nName: Bob\nName:"
DRY = dict(dry_multiplier=2.0, dry_allowed_length=2, max_new_tokens=16)


@pytest.fixture
def batch_cli(llm, monkeypatch, tmp_path):
    """Run `tokenmill batch` in this process on the session's model; returns each id's text."""
    monkeypatch.setattr(tokenmill.llm, "load", lambda *a, **k: llm)

    def run(lines: list[dict], *flags: str) -> dict[str, str]:
        src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        src.write_text("".join(json.dumps(x) + "\n" for x in lines))
        dst.unlink(missing_ok=True)
        assert cli.main(["batch", str(src), "-o", str(dst), "--no-progress", "--kv-cache-memory", "64MiB", *flags]) == 0
        return {r["id"]: r["text"] for r in map(json.loads, dst.read_text().splitlines())}

    return run


def test_dry_sequence_breakers_are_honoured_in_batch(llm, batch_cli):
    with_breakers = llm.generate(LINES, SamplingParams(temperature=0.0, **DRY)).text
    without = llm.generate(LINES, SamplingParams(temperature=0.0, dry_sequence_breakers=[], **DRY)).text
    assert with_breakers != without  # the breakers matter for this prompt
    got = batch_cli([{"id": "a", "prompt": LINES}], "--temperature", "0", "--dry-multiplier", "2",
                    "--dry-allowed-length", "2", "--max-tokens", "16")
    assert got["a"] == with_breakers


def test_same_prompt_and_seed_give_the_same_text_through_every_entry_point(llm, batch_cli):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=11, **DRY)
    generated = llm.generate(QUESTION, params, chat=True).text
    stream = llm.stream(QUESTION, params, chat=True)
    streamed = "".join(stream)
    reply = ChatSession(llm, params).send(QUESTION)
    chatted = "".join(reply)
    batched = batch_cli([{"id": "a", "prompt": QUESTION, **params.to_dict()}], "--chat")["a"]
    assert generated and streamed == stream.completion.text
    assert generated == streamed == chatted == batched


def test_a_batch_of_prompts_gives_each_prompt_its_own_text(llm):
    # generate(list) runs the prompts together on the engine; each gets what it gets alone (seeded rows own their RNG)
    params = [SamplingParams(temperature=0.8, seed=s, max_new_tokens=12) for s in (1, 2, 3)]
    prompts = ["Name a colour.", "Name a fruit.", QUESTION]
    together = [c.text for c in llm.generate(prompts, params, chat=True)]
    assert together == [llm.generate(p, s, chat=True).text for p, s in zip(prompts, params)]
