"""A bad request fails alone and never wedges the engine: requests are checked whole when added (token ids against the
vocabulary, text as valid Unicode, constraints that leave a token to sample); a step that raises finishes its own
requests with an error and the engine serves the rest; ids compare as strings."""
import json

import pytest

import tokenmill.llm
from tokenmill import SamplingParams
from tokenmill.cli import main as cli
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.errors import InvalidRequestError

SHORT = SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)


def run_all(engine: LLMEngine) -> dict:
    finals = {}
    while engine.has_unfinished():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    return finals


def assert_all_free(engine: LLMEngine):
    bm = engine.blocks
    assert bm.num_free == bm.num_blocks and not bm._seqs and not engine.has_unfinished()


@pytest.mark.parametrize("field, value", [("logit_bias", {60000: 1.0}), ("disallowed_tokens", [49152]),
                                          ("allowed_tokens", [1, 99999]), ("stop_token_ids", [10 ** 6])])
def test_out_of_vocabulary_ids_fail_at_add_and_the_engine_runs_on(llm, field, value):
    engine = LLMEngine(llm, kv_cache_memory="16MiB")
    ok = engine.add_request("Hello", SHORT)
    with pytest.raises(InvalidRequestError, match=rf"{field} token ids must be in \[0, 49152\)"):
        engine.add_request("Hello", SamplingParams(**{field: value}))
    finals = run_all(engine)
    assert finals[ok].finish_reason == "length" and finals[ok].completion.generated_tokens == 3
    assert_all_free(engine)


def test_lone_surrogate_in_a_prompt_or_stop_string_is_a_clear_error(llm):
    with pytest.raises(InvalidRequestError, match="prompt is not valid Unicode"):
        llm.generate("Hi \ud800 there", SHORT)
    with pytest.raises(InvalidRequestError, match="stop is not valid Unicode"):
        llm.generate("Hi", SamplingParams(stop=["\udfff"]))
    assert llm.generate("Hi", SHORT).generated_tokens == 3


def test_constraints_that_leave_no_token_are_refused(llm):
    with pytest.raises(InvalidRequestError, match="leave no token to sample"):
        llm.generate("Hi", SamplingParams(allowed_tokens=[5], logit_bias={5: float("-inf")}))
    with pytest.raises(InvalidRequestError, match="leave no token to sample"):
        llm.generate("Hi", SamplingParams(allowed_tokens=[5, 6], disallowed_tokens=[6], logit_bias={5: float("-inf")}))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constraints_that_run_out_mid_generation_end_the_request_with_an_error(llm, temperature):
    eos = min(llm.tokenizer.eos_ids)
    # only EOS is allowed, but min_new_tokens holds EOS back: nothing is left at the first token
    params = SamplingParams(temperature=temperature, allowed_tokens=[eos], min_new_tokens=2, max_new_tokens=4)
    c = llm.generate("Hi", params)
    assert c.finish_reason == "error" and "leave no token to sample at output token 0" in c.error
    assert c.token_ids == []
    ok = llm.generate("Hi", SamplingParams(temperature=temperature, allowed_tokens=[eos, 42], min_new_tokens=2,
                                            max_new_tokens=4, ignore_eos=True))
    assert ok.token_ids == [42] * 4


def test_a_failing_step_fails_its_requests_and_the_engine_serves_the_others(llm):
    engine = LLMEngine(llm, kv_cache_memory="16MiB", max_num_seqs=2)
    real, calls = engine.sampler, []

    def sampler(logits, states):
        calls.append(len(states))
        if len(calls) == 1:
            raise RuntimeError("injected sampler failure")
        return real(logits, states)

    engine.sampler = sampler
    a = engine.add_request("The moon", SHORT)
    b = engine.add_request("The sun", SHORT)
    c = engine.add_request("The stars", SHORT)  # waits: two run at once
    first = {o.request_id: o for o in engine.step()}
    assert set(first) == {a, b} and all(o.finished and o.finish_reason == "error" for o in first.values())
    assert "injected sampler failure" in first[a].error
    d = engine.add_request("The sea", SHORT)
    finals = run_all(engine)
    assert {finals[r].finish_reason for r in (c, d)} == {"length"}
    assert finals[c].completion.text == llm.generate("The stars", SHORT).text
    assert_all_free(engine)


def test_request_ids_compare_as_strings(llm):
    engine = LLMEngine(llm, kv_cache_memory="16MiB")
    rid = engine.add_request("Hello", SHORT, request_id=7)
    assert rid == "7" and engine.abort(7)
    assert run_all(engine)["7"].finish_reason == "aborted"
    with pytest.raises(InvalidRequestError, match="already in flight"):
        engine.add_request("Hello", SHORT, request_id=8)
        engine.add_request("Hello", SHORT, request_id="8")


def test_a_bad_line_in_a_batch_fails_alone(llm, monkeypatch, tmp_path):
    monkeypatch.setattr(tokenmill.llm, "load", lambda *a, **k: llm)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": "a", "prompt": "The moon is"}, {"id": "bad", "prompt": "Hi", "logit_bias": {"60000": 2}},
             {"id": "b", "prompt": "Roses are red,"}]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert cli.main(["batch", str(src), "-o", str(dst), "--max-tokens", "3", "--temperature", "0", "--no-progress",
                     "--kv-cache-memory", "16MiB"]) == 0
    rows = {r["id"]: r for r in map(json.loads, dst.read_text().splitlines())}
    assert rows["bad"]["finish_reason"] == "error" and "logit_bias token ids must be in" in rows["bad"]["error"]
    assert rows["a"]["finish_reason"] == rows["b"]["finish_reason"] == "length"


def test_cli_generate_with_no_token_left_is_a_one_line_error(llm, monkeypatch, capsys):
    monkeypatch.setattr(tokenmill.llm, "load", lambda *a, **k: llm)
    assert cli.main(["generate", "Hi", "--allow-token", "5", "--logit-bias", "5=-inf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "leave no token to sample" in err[0] and "finish" not in err[0]
    eos = min(llm.tokenizer.eos_ids)
    assert cli.main(["generate", "Hi", "--allow-token", str(eos), "--min-new-tokens", "1", "--temperature", "0"]) == 2
    assert "leave no token to sample at output token 0" in capsys.readouterr().err
