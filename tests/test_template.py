"""tokenmill.formats.template against HF transformers' chat-template renderer on the same template strings.

Reference: `PreTrainedTokenizerFast.apply_chat_template(..., chat_template=SOURCE, tokenize=False)` (the path HF users
take), on real templates of several families stored in tests/fixtures/templates/ (sources in its README.md) and on the
default model's own template read from its GGUF. Where transformers raises, tokenmill must raise ChatTemplateError.
"""
import functools
from datetime import datetime
from pathlib import Path

import gguf
import pytest

from tokenmill.errors import InvalidRequestError
from tokenmill.formats.template import ChatTemplate, ChatTemplateError, builtin_template, get_template, list_templates

transformers = pytest.importorskip("transformers")
from transformers.utils import chat_template_utils  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "templates"
NOW = datetime(2025, 3, 5, 14, 30)


class _FrozenDatetime(datetime):
    @classmethod
    def now(cls, tz=None):
        return NOW


@pytest.fixture(autouse=True)
def frozen_hf_clock(monkeypatch):
    # transformers' strftime_now reads this module's `datetime` at call time; tokenmill gets clock=lambda: NOW.
    monkeypatch.setattr(chat_template_utils, "datetime", _FrozenDatetime)


@pytest.fixture(scope="module")
def ref():
    """A transformers tokenizer used only for its apply_chat_template (byte-level vocab, nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def hf(ref, source, messages, *, bos, eos, add_generation_prompt, **kw):
    """transformers' rendering, or ("raises", message)."""
    try:
        return ref.apply_chat_template(
            messages, chat_template=source, tokenize=False, add_generation_prompt=add_generation_prompt,
            bos_token=bos, eos_token=eos, **kw,
        )
    except Exception as e:  # jinja2 TemplateError from raise_exception, or the template's own failure
        return ("raises", str(e))


def ours(template, messages, *, add_generation_prompt, **kw):
    try:
        return template.render(messages, add_generation_prompt=add_generation_prompt, **kw)
    except ChatTemplateError as e:
        return ("raises", str(e))


def assert_same(expected, got, same_message=True):
    if isinstance(expected, tuple):
        assert isinstance(got, tuple), f"transformers raised {expected[1]!r}; tokenmill rendered {got!r}"
        assert not same_message or expected[1] in got[1]  # tokenmill's typed error carries the template's message
    else:
        assert got == expected


SYSTEM = {"role": "system", "content": "You are terse. Réponds en français si on te parle français."}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is 2+2?"}],
    "system+user": [SYSTEM, {"role": "user", "content": "Bonjour, ça va ?"}],
    "multi-turn": [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue — 青 (ao)."},
        {"role": "user", "content": "  Another one, with spaces around.  "},
    ],
    "system+multi-turn": [
        SYSTEM,
        {"role": "user", "content": "Translate: cat"},
        {"role": "assistant", "content": "chat 🐈"},
        {"role": "user", "content": "dog?"},
    ],
    "user+user": [{"role": "user", "content": "first"}, {"role": "user", "content": "second"}],
    "ends-with-assistant": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
}

# (fixture file, bos, eos): the tokens each model's tokenizer passes as bos_token / eos_token.
REAL = [
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    ("meta-llama-Llama-3.2-3B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    ("mistralai-Mistral-7B-Instruct-v0.1.jinja", "<s>", "</s>"),
    ("mistralai-Mixtral-8x7B-Instruct-v0.1.jinja", "<s>", "</s>"),
    ("meta-llama-Llama-2-13b-chat-hf.jinja", "<s>", "</s>"),
    ("google-gemma-2-2b-it.jinja", "<bos>", "<eos>"),
    ("microsoft-Phi-3.5-mini-instruct.jinja", "<s>", "<|endoftext|>"),
    ("Qwen-Qwen2.5-0.5B-Instruct.jinja", None, "<|im_end|>"),
    ("cognitivecomputations-dolphin-2.5-mixtral-8x7b.jinja", "<s>", "<|im_end|>"),
    ("teknium-OpenHermes-2.5-Mistral-7B.jinja", "<s>", "<|im_end|>"),
    ("HuggingFaceH4-zephyr-7b-beta.jinja", "<s>", "</s>"),
    ("ibm-granite-granite-3.3-2B-Instruct.jinja", None, "<|end_of_text|>"),
    ("openchat-openchat-3.5-0106.jinja", "<s>", "<|end_of_turn|>"),
    ("codellama-CodeLlama-70b-Instruct-hf.jinja", "<s>", "</s>"),
    ("deepseek-ai-deepseek-coder-33b-instruct.jinja", "<｜begin▁of▁sentence｜>", "<|EOT|>"),
]


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


@functools.cache
def load(name, bos, eos) -> ChatTemplate:
    return get_template(str(FIXTURES / name), None, bos, eos, clock=lambda: NOW)


@pytest.fixture(scope="module")
def smollm2_template(gguf_path) -> str:
    return gguf.GGUFReader(gguf_path).fields["tokenizer.chat_template"].contents()


# ---- rendering identical to transformers ---------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_default_model_template_matches_transformers(hf_tokenizer, smollm2_template, conv, add_generation_prompt):
    # The reference here is the default model's own transformers tokenizer, with the template it read from the GGUF.
    assert hf_tokenizer.chat_template == smollm2_template
    template = get_template(None, smollm2_template, hf_tokenizer.bos_token, hf_tokenizer.eos_token)
    expected = hf_tokenizer.apply_chat_template(
        CONVERSATIONS[conv], tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert template.render(CONVERSATIONS[conv], add_generation_prompt=add_generation_prompt) == expected
    assert template.name == "model" and template.stop_strings == ["<|im_end|>"]
    assert template.system_role and not template.requires_alternation and template.encode_special


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("name,bos,eos", REAL, ids=[r[0].removesuffix(".jinja") for r in REAL])
def test_real_templates_match_transformers(ref, name, bos, eos, conv, add_generation_prompt):
    messages = CONVERSATIONS[conv]
    expected = hf(ref, fixture(name), messages, bos=bos, eos=eos, add_generation_prompt=add_generation_prompt)
    assert_same(expected, ours(load(name, bos, eos), messages, add_generation_prompt=add_generation_prompt))


def test_templates_that_raise_raise_typed_errors(ref):
    # Mistral and Gemma refuse non-alternating roles through raise_exception; Gemma-2 also refuses a system message.
    for name, bos, eos in (REAL[2], REAL[5]):
        assert name in ("mistralai-Mistral-7B-Instruct-v0.1.jinja", "google-gemma-2-2b-it.jinja")
        template = load(name, bos, eos)
        with pytest.raises(ChatTemplateError, match="Conversation roles must alternate") as err:
            template.render(CONVERSATIONS["user+user"])
        assert isinstance(err.value, InvalidRequestError) and name.removesuffix(".jinja") in str(err.value)
        assert hf(ref, fixture(name), CONVERSATIONS["user+user"], bos=bos, eos=eos, add_generation_prompt=True)[0] == "raises"
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        load("google-gemma-2-2b-it.jinja", "<bos>", "<eos>").render(CONVERSATIONS["system+user"])


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo actuelle d'une ville (°C)",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "Ville, e.g. Zürich"}},
            "required": ["city"],
        },
    },
}
TOOL_CALL_CONV = [
    {"role": "system", "content": "Use tools when useful."},
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "name": "get_weather", "content": "{\"temp_c\": 21}"},
]


@pytest.mark.parametrize("name,bos,eos,kw,with_calls", [
    ("Qwen-Qwen2.5-0.5B-Instruct.jinja", None, "<|im_end|>", {}, True),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", {}, True),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", {"tools_in_user_message": False}, True),
    ("meta-llama-Llama-3.2-3B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", {}, True),
    ("ibm-granite-granite-3.3-2B-Instruct.jinja", None, "<|end_of_text|>", {}, False),  # its tool calls are text
])
def test_tools_match_transformers(ref, name, bos, eos, kw, with_calls):
    source, template = fixture(name), load(name, bos, eos)
    for messages in (TOOL_CALL_CONV, TOOL_CALL_CONV[1:2])[not with_calls:]:
        expected = hf(ref, source, messages, bos=bos, eos=eos, add_generation_prompt=True, tools=[WEATHER_TOOL], **kw)
        assert isinstance(expected, str)
        got = template.render(messages, tools=[WEATHER_TOOL], **kw)
        assert got == expected
        assert "Météo actuelle d'une ville (°C)" in got  # tojson keeps non-ASCII, as transformers' filter does


def test_llama31_builtin_tools_and_date_kwargs(ref):
    name, bos, eos = REAL[0]
    kw = {"builtin_tools": ["brave_search", "wolfram_alpha"], "date_string": "01 Jan 2025"}
    messages = [
        {"role": "user", "content": "Search the news"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "brave_search", "arguments": {"query": "news"}}}]},
        {"role": "ipython", "content": "no news"},
    ]
    expected = hf(ref, fixture(name), messages, bos=bos, eos=eos, add_generation_prompt=True, **kw)
    got = load(name, bos, eos).render(messages, **kw)
    assert got == expected
    assert "Tools: brave_search, wolfram_alpha" in got and "<|python_tag|>brave_search.call(query=\"news\")<|eom_id|>" in got
    assert "Today Date: 01 Jan 2025" in got


def test_strftime_now_is_pinned_in_both():
    # Llama-3.2 takes today's date from strftime_now; with the clock pinned the output is deterministic.
    template = load("meta-llama-Llama-3.2-3B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>")
    assert "Today Date: 05 Mar 2025\n" in template.render(CONVERSATIONS["user"])
    later = get_template(str(FIXTURES / "meta-llama-Llama-3.2-3B-Instruct.jinja"), clock=lambda: datetime(2031, 12, 24))
    assert "Today Date: 24 Dec 2031\n" in later.render(CONVERSATIONS["user"])


def test_documents_reach_the_template(ref):
    name, bos, eos = REAL[11]  # Granite 3.3 renders documents as their own turns
    docs = [{"doc_id": 1, "title": "Zürich", "text": "Zürich liegt am Zürichsee."}]
    expected = hf(ref, fixture(name), CONVERSATIONS["user"], bos=bos, eos=eos, add_generation_prompt=True, documents=docs)
    got = load(name, bos, eos).render(CONVERSATIONS["user"], documents=docs)
    assert got == expected and "Zürich liegt am Zürichsee." in got


@pytest.mark.parametrize("source", [
    "{{ x | tojson }}|{{ x | tojson(indent=2, sort_keys=True) }}|{{ x | tojson(separators=(',', ':')) }}",
    "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% if loop.index > 1 %}{% break %}{% endif %}{% endfor %}{{ ns.n }}",
    "{{ dict(a=1, b='é') | tojson }}",
    "{% for m in messages %}{{ m.reasoning_content }}/{{ m.thinking }}{% endfor %}",
    "{{ bos_token }}|{{ eos_token }}|{{ custom_var }}",
    "{% for m in messages %}[{{ 'content' in m }}:{{ m.content }}]{% endfor %}",
    "{% for m in messages %}\n    {% if m.role == 'user' %}\n    U: {{ m.content }}\n    {% endif %}\n{% endfor %}",
    "{{ ''.__class__.__mro__ }}",
    "{% set ns = namespace() %}{% set ns._secret = 1 %}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ raise_exception('custom refusal: ' ~ messages | length) }}",
])
def test_environment_matches_transformers(ref, source):
    # tojson keeps non-ASCII and <>& unescaped; {% generation %} renders its body; loopcontrols; namespace; dict();
    # `thinking` is aliased to `reasoning_content`; None-valued keys count as absent; extra kwargs pass through;
    # trim_blocks/lstrip_blocks; the sandbox refuses the same things.
    messages = [
        {"role": "assistant", "content": "<b>a&b</b>", "thinking": "hmm"},
        {"role": "user", "content": "é"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
    ]
    kw = {"x": {"b": "é <tag> & 'q'", "a": [1, 2.5, None, True]}, "custom_var": "cv"}
    expected = hf(ref, source, messages, bos="<s>", eos="</s>", add_generation_prompt=False, **kw)
    got = ours(ChatTemplate(source, bos_token="<s>", eos_token="</s>"), messages, add_generation_prompt=False, **kw)
    assert_same(expected, got, same_message="raise_exception" in source)


# ---- built-in formats ---------------------------------------------------------------------------------------------

# (built-in, real template of that family, bos, eos, conversations on which they must agree, add_generation_prompt)
FAMILY = [
    ("chatml", "teknium-OpenHermes-2.5-Mistral-7B.jinja", None, "<|im_end|>", list(CONVERSATIONS), (True, False)),
    ("llama2", "meta-llama-Llama-2-13b-chat-hf.jinja", "<s>", "</s>",
     ["user", "system+user", "multi-turn", "system+multi-turn", "ends-with-assistant"], (True, False)),
    ("mistral", "mistralai-Mixtral-8x7B-Instruct-v0.1.jinja", "<s>", "</s>",
     ["user", "multi-turn", "ends-with-assistant"], (True, False)),
    ("gemma", "google-gemma-2-2b-it.jinja", "<bos>", "<eos>", ["user", "multi-turn", "ends-with-assistant"], (True, False)),
    ("zephyr", "HuggingFaceH4-zephyr-7b-beta.jinja", "<s>", "</s>", list(CONVERSATIONS), (True, False)),
    ("tinyllama", "HuggingFaceH4-zephyr-7b-beta.jinja", "<s>", "</s>", list(CONVERSATIONS), (True, False)),
    ("phi3", "microsoft-Phi-3.5-mini-instruct.jinja", "<s>", "<|endoftext|>", list(CONVERSATIONS), (True,)),
    ("openchat", "openchat-openchat-3.5-0106.jinja", "<s>", "<|end_of_turn|>", list(CONVERSATIONS), (True, False)),
    ("codellama", "codellama-CodeLlama-70b-Instruct-hf.jinja", "<s>", "</s>",
     ["user", "system+user", "multi-turn", "system+multi-turn"], (True,)),
    ("deepseek", "deepseek-ai-deepseek-coder-33b-instruct.jinja", "", "<|EOT|>",
     ["user", "multi-turn", "user+user"], (True,)),
    ("granite", "ibm-granite-granite-3.3-2B-Instruct.jinja", None, "<|end_of_text|>",
     ["system+user", "system+multi-turn"], (True, False)),
]


@pytest.mark.parametrize("builtin,name,bos,eos,convs,gens", FAMILY, ids=[f[0] for f in FAMILY])
def test_builtins_render_like_their_familys_real_template(ref, builtin, name, bos, eos, convs, gens):
    template = get_template(builtin, None, bos, eos)
    for conv in convs:
        for gen in gens:
            expected = hf(ref, fixture(name), CONVERSATIONS[conv], bos=bos, eos=eos, add_generation_prompt=gen)
            assert template.render(CONVERSATIONS[conv], add_generation_prompt=gen) == expected, (conv, gen)


CHAT = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]


@pytest.mark.parametrize("name,bos,eos,expected", [
    # Llama-3 Instruct (model card): header, blank line, trimmed content, <|eot_id|>.
    ("llama3", "<|begin_of_text|>", "<|eot_id|>",
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + SYSTEM["content"] + "<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    # Command-R (model card): <BOS_TOKEN> then START_OF_TURN + role token ... END_OF_TURN.
    ("cohere", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>",
     "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>" + SYSTEM["content"] + "<|END_OF_TURN_TOKEN|>"
     "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hello.<|END_OF_TURN_TOKEN|>"
     "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Bye<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"),
    # Vicuna v1.1 (FastChat): system, "USER: ... ASSISTANT: ...</s>".
    ("vicuna", "<s>", "</s>", "<s>" + SYSTEM["content"] + " USER: Hi ASSISTANT: Hello.</s>USER: Bye ASSISTANT:"),
    # Alpaca (Stanford): instruction/response blocks separated by blank lines.
    ("alpaca", "<s>", "</s>",
     "<s>" + SYSTEM["content"] + "\n\n### Instruction:\nHi\n\n### Response:\nHello.</s>\n\n### Instruction:\nBye\n\n### Response:\n"),
    ("raw", None, None, SYSTEM["content"] + "\nHi\nHello.\nBye"),
])
def test_builtins_without_a_stored_template(name, bos, eos, expected):
    assert get_template(name, None, bos, eos).render(CHAT) == expected


def test_builtin_defaults_and_flags():
    assert list_templates() == sorted([
        "raw", "chatml", "llama2", "llama3", "mistral", "codellama", "gemma", "phi3", "zephyr", "tinyllama",
        "deepseek", "openchat", "vicuna", "alpaca", "cohere", "granite",
    ])
    for name in list_templates():
        t = builtin_template(name)
        probed = ChatTemplate(t.source, bos_token=t.bos_token, eos_token=t.eos_token)
        # The declared flags agree with what the template actually does with a system message / two user turns.
        assert (t.system_role, t.requires_alternation) == (probed.system_role, probed.requires_alternation), name
        assert t.encode_special == (name != "raw")
    assert builtin_template("llama2").stop_strings == ["</s>"] and builtin_template("llama2", eos="<eos>").stop_strings == ["<eos>"]
    assert builtin_template("chatml").stop_strings == ["<|im_end|>"]
    assert get_template("gemma").render(CONVERSATIONS["user"]).startswith("<bos><start_of_turn>user\n")
    assert get_template("gemma", None, "<BOS>").render(CONVERSATIONS["user"]).startswith("<BOS><start_of_turn>")
    # Multimodal content parts collapse to their text for the text-only built-ins.
    parts = [{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image"}, {"type": "text", "text": "!"}]}]
    assert get_template("chatml").render(parts) == "<|im_start|>user\nlook!<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("name,stops,system_role,alternation", [
    ("google-gemma-2-2b-it.jinja", ["<end_of_turn>"], False, True),
    ("mistralai-Mistral-7B-Instruct-v0.1.jinja", ["</s>"], False, True),
    ("meta-llama-Llama-2-13b-chat-hf.jinja", ["</s>"], True, True),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", ["<|eot_id|>", "<|eom_id|>"], True, False),
    ("Qwen-Qwen2.5-0.5B-Instruct.jinja", ["<|im_end|>"], True, False),
    ("microsoft-Phi-3.5-mini-instruct.jinja", ["<|end|>", "<|endoftext|>"], True, False),
])
def test_model_template_flags(name, stops, system_role, alternation):
    bos, eos = next((b, e) for n, b, e in REAL if n == name)
    t = load(name, bos, eos)
    assert (t.stop_strings, t.system_role, t.requires_alternation) == (stops, system_role, alternation)


# ---- resolution and errors ----------------------------------------------------------------------------------------


def test_get_template_resolution(tmp_path, smollm2_template):
    assert get_template("chatml").name == "chatml"
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}", encoding="utf-8")
    assert get_template(str(path)).name == "mine" and get_template(path).render(CONVERSATIONS["user"]) == "<user>What is 2+2?"
    assert get_template("{{ messages[0].content }}!").render(CONVERSATIONS["user"]) == "What is 2+2?!"
    assert get_template(None, smollm2_template).name == "model"
    assert get_template("chatml", smollm2_template).name == "chatml"  # --template wins over the model's own


def test_errors_are_typed_and_name_the_bad_value(tmp_path):
    with pytest.raises(InvalidRequestError, match="--template chatml"):
        get_template(None, None)
    with pytest.raises(InvalidRequestError, match="'chatlm'.*chatml"):
        get_template("chatlm")
    with pytest.raises(InvalidRequestError, match="nope.jinja"):
        get_template(str(tmp_path / "nope.jinja"))
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        ChatTemplate("{% for m in messages %}{{ m }}", name="broken")
    t = get_template("chatml")
    for bad in ([], None, [{"content": "no role"}], ["hi"]):
        with pytest.raises(InvalidRequestError):
            t.render(bad)
    with pytest.raises(InvalidRequestError, match="object"):
        t.render([{"role": "user", "content": object()}])
    with pytest.raises(InvalidRequestError, match="tools"):
        t.render(CONVERSATIONS["user"], tools="get_weather")
    with pytest.raises(ChatTemplateError, match="mistral.*alternating"):
        get_template("mistral").render(CONVERSATIONS["user+user"])
    with pytest.raises(ChatTemplateError, match="phi3.*no tool role"):
        get_template("phi3").render(TOOL_CALL_CONV)
