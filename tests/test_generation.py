"""Sampler controls wired end to end through generate() on the default model."""
import pytest

from tokenmill import SamplingParams

QUESTION = "What is the capital of France?"


def test_banned_string_rewinds_and_resamples(llm):
    plain = llm.generate(QUESTION, chat=True, temperature=0, max_new_tokens=30)
    assert "Paris" in plain.text  # greedy decoding would produce the banned word
    banned = llm.generate(QUESTION, chat=True, temperature=0, max_new_tokens=30, banned_strings=["Paris"])
    assert "Paris" not in banned.text
    head = plain.text[: plain.text.index("Paris")]
    assert banned.text.startswith(head)  # everything before the banned word is kept...
    assert banned.text[len(head):].strip() not in ("", ".")  # ...and something else is generated in its place
    assert llm.tokenizer.decode(banned.token_ids) == banned.text  # the rewound tokens are gone, not just hidden


def test_stop_string_across_tokens_is_cut_and_reported(llm):
    plain = llm.generate(QUESTION, chat=True, temperature=0, max_new_tokens=30)
    stop = "of Fra"  # spans the tokens " of" and " France"
    out = llm.generate(QUESTION, chat=True, temperature=0, max_new_tokens=30, stop=[stop, "never-seen"])
    assert out.finish_reason == "stop_string" and out.stop == stop
    assert out.text == plain.text[: plain.text.index(stop)]


def test_stream_never_shows_part_of_a_stop_string(llm):
    stream = llm.stream(QUESTION, chat=True, temperature=0, max_new_tokens=30, stop=["France is Par"])
    pieces = list(stream)
    assert "".join(pieces) == stream.completion.text == "The capital of "
    assert not any("Fr" in p for p in pieces)


def test_disallowed_tokens_and_min_new_tokens(llm):
    plain = llm.generate(QUESTION, chat=True, temperature=0, max_new_tokens=30)
    first = plain.token_ids[0]
    out = llm.generate(QUESTION, chat=True, temperature=0, max_new_tokens=30, disallowed_tokens=[first])
    assert first not in out.token_ids
    eos = sorted(llm.tokenizer.eos_ids)
    held = llm.generate(QUESTION, chat=True, temperature=0, max_new_tokens=40, min_new_tokens=len(plain.token_ids) + 8)
    assert len(held.token_ids) >= len(plain.token_ids) + 8
    assert not set(held.token_ids[: len(plain.token_ids) + 8]) & set(eos)


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(llm):
    params = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=1234, max_new_tokens=24, ignore_eos=True)
    alone = llm.generate("Write a short poem about rain.", params, chat=True)
    again = llm.generate("Write a short poem about rain.", params, chat=True)
    assert alone.token_ids == again.token_ids
    others = SamplingParams(temperature=0.7, seed=7, max_new_tokens=24, ignore_eos=True)
    batch = llm.generate(["Say hi.", "Write a short poem about rain.", "Count to five."],
                         [others, params, others], chat=True)  # per-prompt parameters
    assert batch[1].token_ids == alone.token_ids
    unseeded = [llm.generate("Write a short poem about rain.", chat=True, temperature=1.0, max_new_tokens=24,
                             ignore_eos=True).token_ids for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_logprobs_are_log_probabilities_of_the_chosen_tokens(llm):
    import torch

    out = llm.generate(QUESTION, chat=True, temperature=0, max_new_tokens=6, logprobs=True)
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) + (out.finish_reason == "eos")
    ids = llm.encode(QUESTION, chat=True)
    logits = llm.logits(ids + out.token_ids)
    ref = torch.log_softmax(logits[len(ids) - 1 : len(ids) - 1 + len(out.token_ids)], -1)
    expected = ref[torch.arange(len(out.token_ids)), torch.tensor(out.token_ids)]
    assert torch.allclose(torch.tensor(out.logprobs[: len(out.token_ids)]), expected, atol=1e-4)


def test_bad_sampling_values_are_named(llm):
    from tokenmill import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="top_p"):
        llm.generate("hi", top_p=1.5)
    with pytest.raises(InvalidRequestError, match="no_such_knob"):
        llm.generate("hi", no_such_knob=1)
