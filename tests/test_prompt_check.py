"""The prompt-format checker: silent on well-formed prompts rendered from real templates; finds each planted mistake.

Vocabularies are real `tokenizers.Tokenizer`s: the default model's (SmolLM2, as transformers builds it from the GGUF)
for ChatML, and byte-level tokenizers holding each family's special tokens for the other formats.
"""
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from tokenmill.formats.prompt_check import Finding, check_prompt, detect_format
from tokenmill.formats.template import get_template, list_templates

FIXTURES = Path(__file__).parent / "fixtures" / "templates"


class TokVocab:
    """tokenmill's vocab interface (token_to_id, encode(text, special)) over a tokenizers.Tokenizer."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def token_to_id(self, text):
        return self.tok.token_to_id(text)

    def encode(self, text, special):
        before = self.tok.encode_special_tokens
        self.tok.encode_special_tokens = not special  # True: special tokens are split like plain text
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = before


def family_vocab(*specials: str) -> TokVocab:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(list(specials))
    return TokVocab(tok)


@pytest.fixture(scope="module")
def smollm2(hf_tokenizer) -> TokVocab:
    return TokVocab(hf_tokenizer.backend_tokenizer)


SENTENCEPIECE = ("<unk>", "<s>", "</s>")  # Llama-2 / Mistral v0.1 / Zephyr / CodeLlama
VOCABS = {
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
               "<|python_tag|>"),
    "gemma": ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
    "phi3": SENTENCEPIECE + ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "granite": ("<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"),
    "cohere": ("<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>",
               "<|CHATBOT_TOKEN|>"),
    "openchat": SENTENCEPIECE + ("<|end_of_turn|>",),
    "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<|EOT|>"),
    "sentencepiece": SENTENCEPIECE,
}

# (template: fixture file or built-in name, bos, eos, vocab: key of VOCABS or "smollm2")
TEMPLATES = [
    ("Qwen-Qwen2.5-0.5B-Instruct.jinja", None, "<|im_end|>", "smollm2"),
    ("cognitivecomputations-dolphin-2.5-mixtral-8x7b.jinja", None, "<|im_end|>", "smollm2"),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", "llama3"),
    ("meta-llama-Llama-3.2-3B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", "llama3"),
    ("mistralai-Mistral-7B-Instruct-v0.1.jinja", "<s>", "</s>", "sentencepiece"),
    ("meta-llama-Llama-2-13b-chat-hf.jinja", "<s>", "</s>", "sentencepiece"),
    ("google-gemma-2-2b-it.jinja", "<bos>", "<eos>", "gemma"),
    ("microsoft-Phi-3.5-mini-instruct.jinja", "<s>", "<|endoftext|>", "phi3"),
    ("HuggingFaceH4-zephyr-7b-beta.jinja", "<s>", "</s>", "sentencepiece"),
    ("ibm-granite-granite-3.3-2B-Instruct.jinja", None, "<|end_of_text|>", "granite"),
    ("openchat-openchat-3.5-0106.jinja", "<s>", "<|end_of_turn|>", "openchat"),
    ("codellama-CodeLlama-70b-Instruct-hf.jinja", "<s>", "</s>", "sentencepiece"),
    ("deepseek-ai-deepseek-coder-33b-instruct.jinja", "<｜begin▁of▁sentence｜>", "<|EOT|>", "deepseek"),
    ("chatml", None, None, "smollm2"), ("llama3", None, None, "llama3"), ("llama2", None, None, "sentencepiece"),
    ("mistral", None, None, "sentencepiece"), ("gemma", None, None, "gemma"), ("phi3", None, None, "phi3"),
    ("zephyr", None, None, "sentencepiece"), ("tinyllama", None, None, "sentencepiece"),
    ("codellama", None, None, "sentencepiece"), ("deepseek", None, None, "deepseek"),
    ("openchat", None, None, "openchat"), ("vicuna", None, None, "sentencepiece"),
    ("alpaca", None, None, "sentencepiece"), ("cohere", None, None, "cohere"), ("granite", None, None, "granite"),
    ("raw", None, None, "smollm2"),
]
assert {t[0] for t in TEMPLATES} >= set(list_templates())

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello — 你好."}, {"role": "user", "content": "Bye"}],
]


def vocab_for(key, smollm2) -> TokVocab:
    return smollm2 if key == "smollm2" else family_vocab(*VOCABS[key])


def template_for(name, bos, eos):
    path = FIXTURES / name
    return get_template(str(path) if path.suffix == ".jinja" else name, None, bos, eos)


def summary(findings: list[Finding]) -> list[tuple[str, int]]:
    assert all("\n" not in str(f) for f in findings)  # each finding reads as one line
    return [(f.code, f.offset) for f in findings]


@pytest.mark.parametrize("name,bos,eos,vocab_key", TEMPLATES, ids=[t[0].removesuffix(".jinja") for t in TEMPLATES])
def test_correct_prompts_have_no_findings(smollm2, name, bos, eos, vocab_key):
    template, vocab = template_for(name, bos, eos), vocab_for(vocab_key, smollm2)
    rendered = 0
    for messages in CONVERSATIONS:
        if messages[0]["role"] == "system" and not template.system_role:
            continue
        prompt = template.render(messages)
        rendered += 1
        assert check_prompt(prompt, vocab=vocab, template=template, messages=messages,
                            encode_special=template.encode_special) == []
        assert check_prompt(prompt, vocab=vocab) == []  # format detected from the prompt's own markers
    assert rendered >= 1


def test_default_model_prompt_is_clean(smollm2, hf_tokenizer):
    messages = CONVERSATIONS[2]
    prompt = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    template = get_template(None, hf_tokenizer.chat_template, hf_tokenizer.bos_token, hf_tokenizer.eos_token)
    assert check_prompt(prompt, vocab=smollm2, template=template, messages=messages) == []


CHATML_OK = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_unbalanced_role_tags(smollm2):
    # <|im_start|> without <|im_end|>: the user turn runs into the next header.
    assert summary(check_prompt("<|im_start|>user\nHi<|im_start|>assistant\n", vocab=smollm2)) == [("unbalanced_tag", 0)]
    # A stray closing tag.
    stray = "<|im_start|>user\nHi<|im_end|>\n<|im_end|>\n<|im_start|>assistant\n"
    assert summary(check_prompt(stray, vocab=smollm2)) == [("unbalanced_tag", stray.index("<|im_end|>\n<|im_start|>"))]
    # [INST] format: a reply not closed with </s> before the next [INST].
    inst = "<s>[INST] a [/INST] reply [INST] b [/INST]"
    assert summary(check_prompt(inst, vocab=family_vocab(*SENTENCEPIECE))) == [("unbalanced_tag", inst.index("[/INST]"))]
    # Llama-3 header closed by the wrong marker (no <|eot_id|>).
    ll3 = "<|start_header_id|>user<|end_header_id|>\n\nHi<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert summary(check_prompt(ll3, vocab=family_vocab(*VOCABS["llama3"]))) == [("unbalanced_tag", 0)]


def test_missing_role_tags(smollm2):
    found = check_prompt("What is 2+2?", vocab=smollm2, template=get_template("chatml"))
    assert summary(found) == [("missing_role_tags", 0)] and "chatml" in found[0].message


@pytest.mark.parametrize("prompt,vocab_key,offset", [
    ("<|im_start|>user Hi<|im_end|>\n<|im_start|>assistant\n", "smollm2", len("<|im_start|>user")),
    ("<|im_start|>userHi<|im_end|>\n<|im_start|>assistant\n", "smollm2", len("<|im_start|>user")),
    ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant", "smollm2", len(CHATML_OK) - 1),
    ("<|start_header_id|>user<|end_header_id|>\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "llama3",
     len("<|start_header_id|>user<|end_header_id|>")),
    ("<bos><start_of_turn>user Hi<end_of_turn>\n<start_of_turn>model\n", "gemma", len("<bos><start_of_turn>user")),
    ("<|user|>Hi<|end|>\n<|assistant|>\n", "phi3", len("<|user|>")),
])
def test_role_tag_without_its_newline(smollm2, prompt, vocab_key, offset):
    assert summary(check_prompt(prompt, vocab=vocab_for(vocab_key, smollm2))) == [("missing_newline", offset)]


def test_special_tokens_split_when_special_encoding_is_off(smollm2):
    found = check_prompt(CHATML_OK, vocab=smollm2, encode_special=False)
    assert summary(found) == [("special_token_split", 0), ("special_token_split", CHATML_OK.index("<|im_end|>"))]
    n_plain = len(smollm2.encode("<|im_start|>", special=False))
    assert n_plain > 1 and f"{n_plain} plain tokens" in found[0].message
    # With parsing on (the default) the same prompt is clean; a template's own flag is what the caller passes.
    assert check_prompt(CHATML_OK, vocab=smollm2, encode_special=True) == []
    raw = get_template("raw")
    assert not raw.encode_special
    assert [f.code for f in check_prompt(CHATML_OK, vocab=smollm2, template=raw, encode_special=raw.encode_special)] == [
        "special_token_split", "special_token_split"]
    # The same for BOS/EOS text in an [INST] prompt when the vocabulary has them as special tokens.
    inst = "<s>[INST] Hi [/INST]"
    assert summary(check_prompt(inst, vocab=family_vocab(*SENTENCEPIECE), encode_special=False)) == [("special_token_split", 0)]


def test_template_tokens_missing_from_the_vocabulary(smollm2):
    # ChatML on a Llama-2-style model that has no <|im_start|>/<|im_end|>.
    found = check_prompt(CHATML_OK, vocab=family_vocab(*SENTENCEPIECE), template=get_template("chatml"))
    assert summary(found) == [("token_not_in_vocab", 0), ("token_not_in_vocab", CHATML_OK.index("<|im_end|>"))]
    assert "'<|im_start|>'" in found[0].message
    # Gemma's format on the default model (SmolLM2 has no <start_of_turn>).
    gemma = get_template("gemma")
    prompt = gemma.render(CONVERSATIONS[0])
    found = check_prompt(prompt, vocab=smollm2, template=gemma)
    assert summary(found) == [("token_not_in_vocab", len("<bos>")), ("token_not_in_vocab", prompt.index("<end_of_turn>"))]


def test_prompt_without_the_assistant_header(smollm2):
    closed = get_template("chatml").render(CONVERSATIONS[0], add_generation_prompt=False)
    assert summary(check_prompt(closed, vocab=smollm2)) == [("no_generation_prompt", len(closed))]
    open_user = "<|im_start|>user\nWrite a poem about"
    found = check_prompt(open_user, vocab=smollm2)
    assert summary(found) == [("no_generation_prompt", len(open_user))] and "continue" in found[0].message
    mistral = get_template("mistral")
    ended = mistral.render(CONVERSATIONS[0] + [{"role": "assistant", "content": "4"}])
    assert summary(check_prompt(ended, vocab=family_vocab(*SENTENCEPIECE), template=mistral)) == [
        ("no_generation_prompt", len(ended))]
    # A prefilled assistant turn (open, after the header) is a valid generation prompt.
    assert check_prompt(CHATML_OK + "Sure, here", vocab=smollm2) == []


def test_roles_that_do_not_alternate(smollm2):
    sp = family_vocab(*SENTENCEPIECE)
    inst = "<s>[INST] first [/INST][INST] second [/INST]"
    assert summary(check_prompt(inst, vocab=sp)) == [("roles_not_alternating", inst.index("[INST] second"))]
    gemma_prompt = ("<bos><start_of_turn>user\nfirst<end_of_turn>\n<start_of_turn>user\nsecond<end_of_turn>\n"
                    "<start_of_turn>model\n")
    second = gemma_prompt.index("<start_of_turn>user\nsecond")
    assert summary(check_prompt(gemma_prompt, vocab=family_vocab(*VOCABS["gemma"]))) == [("roles_not_alternating", second)]
    # From the messages, for a model template that demands alternation (Mistral v0.1 raises on user, user).
    mistral = get_template(str(FIXTURES / "mistralai-Mistral-7B-Instruct-v0.1.jinja"), None, "<s>", "</s>")
    assert mistral.requires_alternation
    merged = "<s>[INST] first\n\nsecond [/INST]"
    messages = [{"role": "user", "content": "first"}, {"role": "user", "content": "second"}]
    found = check_prompt(merged, vocab=sp, template=mistral, messages=messages)
    assert summary(found) == [("roles_not_alternating", merged.index("second"))]
    # ChatML does not demand alternation: two user turns are fine there.
    two_users = get_template("chatml").render(messages)
    assert check_prompt(two_users, vocab=smollm2, template=get_template("chatml"), messages=messages) == []


def test_system_prompt_for_a_template_without_system_role():
    gemma_vocab = family_vocab(*VOCABS["gemma"])
    with_system = ("<bos><start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>user\nHi<end_of_turn>\n"
                   "<start_of_turn>model\n")
    assert summary(check_prompt(with_system, vocab=gemma_vocab)) == [("system_not_supported", len("<bos>"))]
    # Gemma-2's own template has no system role (it raises); a prompt built around it gets the finding from messages.
    gemma2 = get_template(str(FIXTURES / "google-gemma-2-2b-it.jinja"), None, "<bos>", "<eos>")
    assert not gemma2.system_role
    merged = get_template("gemma").render(CONVERSATIONS[1])  # the built-in folds the system text into the user turn
    found = check_prompt(merged, vocab=gemma_vocab, template=gemma2, messages=CONVERSATIONS[1])
    assert summary(found) == [("system_not_supported", merged.index("Be brief."))]
    assert check_prompt(merged, vocab=gemma_vocab, template=get_template("gemma"), messages=CONVERSATIONS[1]) == []


@pytest.mark.parametrize("name,family", [
    ("Qwen-Qwen2.5-0.5B-Instruct.jinja", "chatml"), ("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama3"),
    ("mistralai-Mistral-7B-Instruct-v0.1.jinja", "mistral"), ("meta-llama-Llama-2-13b-chat-hf.jinja", "llama2"),
    ("google-gemma-2-2b-it.jinja", "gemma"), ("microsoft-Phi-3.5-mini-instruct.jinja", "phi3"),
    ("HuggingFaceH4-zephyr-7b-beta.jinja", "zephyr"), ("ibm-granite-granite-3.3-2B-Instruct.jinja", "granite"),
    ("openchat-openchat-3.5-0106.jinja", "openchat"), ("codellama-CodeLlama-70b-Instruct-hf.jinja", "codellama"),
    ("deepseek-ai-deepseek-coder-33b-instruct.jinja", "deepseek"),
])
def test_detect_format(name, family):
    source = (FIXTURES / name).read_text(encoding="utf-8")
    assert detect_format(source) == family
    assert detect_format("just some text") is None


def test_finding_reads_as_one_line():
    f = Finding("no_generation_prompt", "the prompt ends without the assistant header", 42, "add '<|im_start|>assistant\\n'")
    assert str(f) == ("no_generation_prompt at offset 42: the prompt ends without the assistant header; "
                      "fix: add '<|im_start|>assistant\\n'")


def test_works_with_tokenmills_tokenizer(gguf_path):
    tokenizer_mod = pytest.importorskip("tokenmill.formats.tokenizer")
    import gguf

    meta = {k: f.contents() for k, f in gguf.GGUFReader(gguf_path).fields.items()}
    tok = tokenizer_mod.Tokenizer.from_gguf(meta)
    template = get_template(None, tok.chat_template, tok.id_to_token(tok.bos_id), tok.id_to_token(min(tok.eos_ids)))
    prompt = template.render(CONVERSATIONS[0])
    assert check_prompt(prompt, vocab=tok, template=template, messages=CONVERSATIONS[0]) == []
    found = check_prompt(prompt, vocab=tok, template=template, encode_special=False)
    assert [f.code for f in found] == ["special_token_split", "special_token_split"]
    n_plain = len(tok.encode("<|im_start|>", special=False, add_bos=False))
    assert f"{n_plain} plain tokens" in found[0].message
