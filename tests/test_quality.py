"""Quality checks: perplexity by llama.cpp's protocol against HF transformers fp32 on the same tokens (the reference
scores through transformers' own `labels` loss), and golden greedy outputs."""
import json
import math
import re

import pytest
import torch

import tokenmill.llm
from tokenmill.cli import main as cli
from tokenmill.monitoring.baseline import GoldenDiff, compare_golden
from tokenmill.monitoring.quality import (chunks_of, default_text_path, describe_diff, golden_outputs, nll_second_half,
                               tokenize_text)


def test_chunks_put_bos_first_only_when_the_model_adds_it():
    ids = list(range(10, 20))
    assert chunks_of(ids, 4, None, None) == [[10, 11, 12, 13], [14, 15, 16, 17]]  # the tail is no chunk
    assert chunks_of(ids, 4, 1, 1) == [[1, 11, 12, 13]]


def test_only_the_second_half_is_scored():
    chunk = [5, 6, 7, 8, 9, 3, 2, 1]  # n_ctx 8: logits at 4, 5, 6 predict tokens 3, 2, 1
    logits = torch.zeros(8, 10)
    for pos in range(7):
        logits[pos, chunk[pos + 1]] = 50.0  # certain of the right next token everywhere...
    logits[5] = 0.0  # ...except at position 5: uniform over 10 tokens
    nll = nll_second_half(logits, chunk)
    assert nll.shape == (3,)
    assert nll.tolist() == pytest.approx([0.0, math.log(10), 0.0], abs=1e-6)


def hf_perplexity(hf_model, ids: list[int], n_ctx: int, n_chunks: int) -> float:
    """transformers' own shifted cross-entropy, labels masked (-100) up to and including the middle of each chunk."""
    nll, count = 0.0, 0
    for i in range(n_chunks):
        x = torch.tensor([ids[i * n_ctx : (i + 1) * n_ctx]])
        labels = x.clone()
        labels[0, : n_ctx // 2 + 1] = -100
        with torch.no_grad():
            loss = hf_model(x, labels=labels).loss.item()
        nll += loss * (n_ctx // 2 - 1)
        count += n_ctx // 2 - 1
    return math.exp(nll / count)


def bench_quality(llm, monkeypatch, capsys, tmp_path, *flags) -> tuple[float, dict]:
    """`tokenmill bench quality` on the session's model: the perplexity it prints, and its saved result."""
    monkeypatch.setattr(tokenmill.llm, "load", lambda *a, **k: llm)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the latest run: tmp_path/tokenmill/bench-latest.json
    assert cli.main(["bench", "quality", "--golden-tokens", "4", *flags]) == 0
    printed = float(re.search(r"perplexity: (\d+\.\d+)", capsys.readouterr().out).group(1))
    return printed, json.loads((tmp_path / "tokenmill" / "bench-latest.json").read_text())


def check_against_transformers(llm, hf_model, hf_tokenizer, monkeypatch, capsys, tmp_path, n_ctx, n_chunks, flags):
    path = default_text_path()
    if path is None:
        pytest.skip("../shared/data/wikitext-2-raw-test.txt not present")
    assert not llm.tokenizer.add_bos  # SmolLM2's vocabulary adds no BOS: chunks are the plain token stream
    text = path.read_text(encoding="utf-8")[:20000]
    assert llm.tokenizer.encode(text, special=False) == hf_tokenizer.encode(text, add_special_tokens=False)
    printed, result = bench_quality(llm, monkeypatch, capsys, tmp_path, *flags)
    p = result["perplexity"]
    assert (p["chunks"], p["n_ctx"], p["tokens_scored"]) == (n_chunks, n_ctx, n_chunks * (n_ctx // 2 - 1))
    assert printed == pytest.approx(p["ppl"], abs=1e-4)
    ref = hf_perplexity(hf_model, tokenize_text(llm, None), n_ctx, n_chunks)
    print(f"tokenmill {p['ppl']:.4f}, transformers fp32 {ref:.4f} ({n_chunks} chunks of {n_ctx})")
    assert p["ppl"] == pytest.approx(ref, rel=0.01)
    return p["ppl"], ref


def test_perplexity_4_chunks_of_256_matches_transformers(llm, hf_model, hf_tokenizer, monkeypatch, capsys, tmp_path):
    ours, ref = check_against_transformers(llm, hf_model, hf_tokenizer, monkeypatch, capsys, tmp_path, 256, 4,
                                           ["--ppl-ctx", "256", "--ppl-chunks", "4"])
    assert ours == pytest.approx(ref, rel=1e-3)  # fp32 against fp32: far inside the 1% the issue asks


@pytest.mark.slow
def test_perplexity_40_chunks_of_512_matches_transformers(llm, hf_model, hf_tokenizer, monkeypatch, capsys, tmp_path):
    # llama.cpp reports 22.57 for this model and protocol, transformers fp32 22.50 (the issue)
    ours, _ = check_against_transformers(llm, hf_model, hf_tokenizer, monkeypatch, capsys, tmp_path, 512, 40, [])
    assert 22.0 < ours < 23.0


def test_golden_outputs_are_the_greedy_tokens_and_a_change_is_located(llm):
    prompts = [(True, "Name a fruit."), (False, "The moon is")]
    gold = golden_outputs(llm, 5, prompts)
    for (chat, text), item in zip(prompts, gold["items"]):
        llm.reset_cache()
        assert item["ids"] == llm.generate(text, chat=chat, temperature=0, max_new_tokens=5, ignore_eos=True).token_ids
    assert compare_golden(gold, golden_outputs(llm, 5, prompts)) == []  # deterministic
    changed = json.loads(json.dumps(gold))
    changed["items"][1]["ids"][4] = llm.encode(" cheese")[0]
    (d,) = compare_golden(gold, changed)
    assert d == GoldenDiff(1, "The moon is", 4, gold["items"][1]["ids"][4], changed["items"][1]["ids"][4])
    assert describe_diff(d, llm.tokenizer).startswith("prompt 1 ('The moon is'): first difference at token 4: ")
    assert "' cheese'" in describe_diff(d, llm.tokenizer)
