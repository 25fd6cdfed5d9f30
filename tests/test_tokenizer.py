"""tokenmill.formats.tokenizer against transformers' tokenizers built from the same GGUF / HF files.

Where transformers departs from the model's own tokenizer, the reference is named at the test:
- pre "smollm": transformers ignores it (plain GPT-2 split); SmolLM2's tokenizer.json splits every digit first.
- SentencePiece dummy prefix: transformers' Metaspace("first") skips it for text that starts with a space and after
  special tokens; SentencePiece and llama.cpp add it (a ▁ before every stretch of text).
"""
import json
import random

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import pre_tokenizers

from tokenmill.errors import UnsupportedError
from tokenmill.formats.tokenizer import _PRE_SPLITS, StreamDecoder, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "The capital of France is Paris. I'm sure they'll say it's fine, DON'T you think?",
    "  leading spaces and trailing   ",
    "runs of\n\n\n\nnewlines\r\nand    spaces \n \n",
    "\ttabs\t\tand\tmore",
    "x = 12345 + 3.14159 - 1e-9; 2024-06-01 99%",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(10))",
    "Ünïcödé façade naïve résumé Ångström",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷 done",
    "中文测试，日本語のテキスト、한국어 텍스트입니다",
    "Россия Ελληνικά עברית العربية",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>after <|endoftext|> and <repo_name> tags",
    "a",
    "",
]
NUMERICS = ["١٢٣ ½ ² Ⅻ ⑦", "x½ 3¾ 10²"]  # \p{N} beyond ASCII digits


def read_meta(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}


def write_gguf(path, tokenizer_kv: dict, vocab_size: int):
    """A minimal llama-arch GGUF: the given tokenizer.* keys and one tiny F32 tensor."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(4)
    w.add_vocab_size(vocab_size)
    for key, value in tokenizer_kv.items():
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def stream(tok: Tokenizer, ids, skip_special=False) -> list[str]:
    decoder = StreamDecoder(tok, skip_special=skip_special)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


# ---------------------------------------------------------------- byte-level BPE: the default model (pre "smollm")

@pytest.fixture(scope="module")
def smol_meta(gguf_path):
    return read_meta(gguf_path)


@pytest.fixture(scope="module")
def smol(smol_meta):
    return Tokenizer.from_gguf(smol_meta)


@pytest.mark.parametrize("special", [True, False])
def test_smollm_encode_matches_transformers(smol, hf_tokenizer, special):
    for text in TEXTS:
        expected = hf_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=not special)
        assert smol.encode(text, special=special) == expected, text
    assert smol.encode("<|im_start|>", special=True) == [1]
    assert len(smol.encode("<|im_start|>", special=False)) > 1


def test_smollm_digits_follow_the_models_own_pretokenizer(smol, hf_tokenizer):
    # SmolLM2's tokenizer.json: Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]. transformers'
    # GGUF loader drops the Digits step, so it differs on non-ASCII numerics (" ½" one piece there, two here).
    original = Backend.from_str(hf_tokenizer.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    for text in TEXTS + NUMERICS:
        assert smol.encode(text) == original.encode(text, add_special_tokens=False).ids, text


def test_smollm_decode(smol, hf_tokenizer):
    for text in TEXTS + NUMERICS:
        ids = smol.encode(text)
        assert smol.decode(ids) == text
        assert smol.decode(ids, skip_special=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>")
    assert smol.decode(ids, skip_special=True) == "user\nhi"


def test_smollm_special_ids_and_template(smol, smol_meta, hf_tokenizer):
    assert smol.vocab_size == len(hf_tokenizer) == 49152
    assert smol.bos_id == hf_tokenizer.bos_token_id == 1
    assert smol.pad_id == hf_tokenizer.pad_token_id
    # eos (<|im_end|>) plus <|endoftext|>, which llama.cpp also treats as end of generation
    assert smol.eos_ids == {hf_tokenizer.eos_token_id, hf_tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    assert smol.add_bos is False and smol.encode("hi") == hf_tokenizer.encode("hi")
    assert smol.encode("hi", add_bos=True) == [1] + hf_tokenizer.encode("hi")
    assert smol.chat_template == hf_tokenizer.chat_template == smol_meta["tokenizer.chat_template"]
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= smol.special_tokens
    for i in (0, 1, 2, 100, 4093, 49151):
        assert smol.id_to_token(i) == hf_tokenizer.convert_ids_to_tokens(i)
        assert smol.token_to_id(smol.id_to_token(i)) == i
    assert smol.token_to_id("no such token") is None


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "tekken", "gpt-4o"])
def test_pre_tokenizer_regexes_match_transformers(smol_meta, tmp_path, pre):
    # The default model's vocabulary and merges, split by another model family's regex.
    kv = {k: smol_meta[k] for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                     "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                                     "tokenizer.ggml.eos_token_id")}
    kv["tokenizer.ggml.pre"] = pre
    write_gguf(tmp_path / "t.gguf", kv, len(kv["tokenizer.ggml.tokens"]))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    tok = Tokenizer.from_gguf(kv)  # what read_meta gives back for that file, without the slow re-read
    for text in TEXTS + NUMERICS + ["CamelCaseWords HTTPServer iPhone ÉCOLE", "a/b/c\n/path", "I'M HERE'S"]:
        assert tok.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False), text


def test_every_known_pre_builds_and_keeps_all_text(smol_meta):
    # Every regex must compile in Oniguruma and the splits must not drop text; one build per distinct split.
    names = {}
    for name, split in _PRE_SPLITS.items():
        names.setdefault(repr(split), name)
    for name in names.values():
        tok = Tokenizer.from_gguf({**smol_meta, "tokenizer.ggml.pre": name})
        for text in TEXTS + NUMERICS + ["Ὗὰ ΐ ᾳ Ωmega Kelvin ℭ ！？。“quotes”"]:
            assert tok.decode(tok.encode(text)) == text, (name, text)


def test_deepseek_llm_split(smol_meta):
    # The deepseek-llm splits in order: newlines, cased-letter runs, ASCII/fullwidth punctuation (its ':-~' range
    # includes the ASCII letters), trailing whitespace, CJK, digits.
    tok = Tokenizer.from_gguf({**smol_meta, "tokenizer.ggml.pre": "deepseek-llm"})
    text = "Ὗὰ ok, 中文 12\nend  "
    pieces = [text[a:b] for _, (a, b) in tok._backend.pre_tokenizer.pre_tokenize_str(text)]
    assert pieces == ["Ὗὰ", " ok", ",", " ", "中文", " ", "12", "\n", "end", "  "]


def test_unknown_pre_falls_back_to_gpt2_with_warning(smol_meta):
    with pytest.warns(UserWarning, match="no-such-pre"):
        tok = Tokenizer.from_gguf({**smol_meta, "tokenizer.ggml.pre": "no-such-pre"})
    gpt2 = Tokenizer.from_gguf({**smol_meta, "tokenizer.ggml.pre": "gpt-2"})
    for text in TEXTS + NUMERICS:
        assert tok.encode(text) == gpt2.encode(text)
    assert tok.encode(" ½") != Tokenizer.from_gguf(smol_meta).encode(" ½")  # no digit split


def test_unsupported_tokenizer_model_is_named():
    with pytest.raises(UnsupportedError, match=r"'bert'.*gpt2.*llama"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


# ---------------------------------------------------------------- SentencePiece-style ("llama") GGUF

SPM_WORDS = ["hello", "world", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "token", "mill",
             "is", "a", "test", "ing", "er"]


def spm_vocab():
    """(tokens, scores, types): <unk>/<s>/</s>, 256 byte pieces, controls, a user-defined token, ▁-words, chars."""
    pieces = []
    for word in ("▁" + w for w in SPM_WORDS):
        pieces += [word[:n] for n in range(2, len(word) + 1)]  # ▁h, ▁he, ..., ▁hello
        pieces += [word[-n:] for n in range(2, len(word) - 1)]  # suffixes: some unreachable by merges
    pieces = list(dict.fromkeys(pieces + ["▁▁", "▁▁▁▁", "▁"]))
    pieces += sorted(set("".join(SPM_WORDS) + "abcdefghijklmnopqrstuvwxyzHTW.,!?'0123456789") - set(pieces))
    pieces += ["中", "文"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    tokens += ["<|im_start|>", "<|im_end|>", "<think>"]
    types += [3, 3, 4]
    scores = [0.0] * len(tokens) + [-float(k) for k in range(len(pieces))] + [0.0]
    tokens += pieces + ["[UNUSED]"]
    types += [1] * len(pieces) + [5]
    return tokens, scores, types


@pytest.fixture(scope="module")
def spm_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    tokens, scores, types = spm_vocab()
    for name, prefix in (("spm.gguf", True), ("spm_noprefix.gguf", False)):
        write_gguf(folder / name, {
            "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_space_prefix": prefix, "tokenizer.chat_template": "{{ messages }}"}, len(tokens))
    return folder


@pytest.fixture(scope="module")
def spm(spm_files):
    return Tokenizer.from_gguf(read_meta(spm_files / "spm.gguf"))


@pytest.fixture(scope="module")
def spm_ref(spm_files):
    return transformers.AutoTokenizer.from_pretrained(spm_files, gguf_file="spm.gguf")


# Texts where transformers' Metaspace("first") and SentencePiece agree: no leading space, no added token inside.
SPM_TEXTS = ["hello world", "Hello World", "the quick brown fox jumps over the lazy dog", "testing tokenmill!",
             "new\nline", "tab\there", "emoji 😀 and 中文 and 日本", "trailing   ", "héllo wörld", "x  y   z",
             "dogs,cats", ""]


def spm_fuzz_texts(n=300, seed=0):
    rng = random.Random(seed)
    parts = list("abcdefghijklmnopqrstuvwxyz  \n") + ["hello", "world", "the", " quick", "brown", "er", "ing",
                                                      "😀", "中", "é"]
    texts = ("".join(rng.choice(parts) for _ in range(rng.randint(1, 12))) for _ in range(n))
    return [t for t in texts if not t[0].isspace()]


@pytest.mark.parametrize("special", [True, False])
def test_spm_encode_matches_transformers(spm, spm_ref, special):
    as_text = [] if special else ["[UNUSED] <s> <|im_start|> as text"]
    for text in SPM_TEXTS + as_text + spm_fuzz_texts():
        expected = spm_ref.encode(text, add_special_tokens=False, split_special_tokens=not special)
        assert spm.encode(text, special=special, add_bos=False) == expected, text
        assert spm.encode(text, special=special) == [1] + expected  # GGUF add_bos_token


def test_spm_decode_matches_transformers(spm, spm_ref):
    for text in SPM_TEXTS + ["<s>hello</s> world", "<|im_start|>user\nhi<|im_end|>"]:
        ids = spm.encode(text)
        assert spm.decode(ids) == spm_ref.decode(ids)
        assert spm.decode(ids, skip_special=True) == spm_ref.decode(ids, skip_special_tokens=True)
    for text in SPM_TEXTS:
        assert spm.decode(spm.encode(text, special=False, add_bos=False)) == text


def test_spm_dummy_prefix_like_sentencepiece_and_llama_cpp(spm):
    # A ▁ is prepended to every stretch of text, also one starting with a space or following an added token
    # (llama.cpp's tokenize: "prefix with space if previous is special"; sentencepiece's add_dummy_prefix).
    # transformers gives ['▁hello'], ['▁', '▁t', ...] and ['<s>', 'h', 'ello', '</s>'] here.
    def pieces(text):
        return [spm.id_to_token(i) for i in spm.encode(text, add_bos=False)]

    assert pieces(" hello") == ["▁", "▁hello"]
    assert pieces("  two") == ["▁▁", "▁t", "w", "o"]
    assert pieces("<s>hello</s>") == ["<s>", "▁hello", "</s>"]
    assert pieces("<think>the") == ["<think>", "▁the"]
    assert spm.decode(spm.encode(" hello", add_bos=False)) == " hello"


def test_spm_add_space_prefix_false(spm, spm_files):
    # Without the flag no ▁ is added, so encoding " " + x must give what the prefixing tokenizer gives for x.
    plain = Tokenizer.from_gguf(read_meta(spm_files / "spm_noprefix.gguf"))
    for text in filter(None, SPM_TEXTS + spm_fuzz_texts(100, seed=1)):
        assert plain.encode(" " + text, special=False) == spm.encode(text, special=False), text
        assert plain.decode(plain.encode(" " + text, add_bos=False)) == " " + text
    assert plain.id_to_token(plain.encode("hello", add_bos=False)[0]) != "▁hello"


def test_spm_special_ids(spm, spm_ref):
    assert spm.bos_id == spm_ref.bos_token_id == 1
    assert spm.eos_ids == {spm_ref.eos_token_id, 260} == {2, 260}  # + <|im_end|>, as llama.cpp's end-of-generation set
    assert spm.add_bos is True
    assert spm.vocab_size == len(spm_ref)
    assert spm.special_tokens == {"<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"}
    assert spm.chat_template == "{{ messages }}"
    assert spm.encode("<think>", special=False, add_bos=False) == [spm.token_to_id("<think>")]  # user-defined


def test_spm_matches_sentencepiece_itself():
    """A real SentencePiece BPE model (trained here) as a GGUF-style vocabulary: same ids as sentencepiece."""
    spm_lib = pytest.importorskip("sentencepiece")
    import io

    lines = [t for t in TEXTS if t] * 5 + [" ".join(SPM_WORDS)] * 20 + [open(__file__, encoding="utf-8").read()]
    model = io.BytesIO()
    spm_lib.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=600, byte_fallback=True,
        character_coverage=0.99, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, minloglevel=2)
    sp = spm_lib.SentencePieceProcessor(model_proto=model.getvalue())
    kinds = [(sp.is_unknown, 2), (sp.is_control, 3), (sp.is_unused, 5), (sp.is_byte, 6)]
    n = sp.get_piece_size()
    tok = Tokenizer.from_gguf({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [next((t for f, t in kinds if f(i)), 1) for i in range(n)]})
    for text in TEXTS + SPM_TEXTS + [" leading", "  two"]:
        assert tok.encode(text, special=False, add_bos=False) == sp.encode(text), text


# ---------------------------------------------------------------- Hugging Face folder

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, hf_tokenizer):
    folder = tmp_path_factory.mktemp("hf")
    hf_tokenizer.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0, 3]}))
    return folder


@pytest.mark.parametrize("special", [True, False])
def test_hf_folder_matches_gguf_and_transformers(hf_folder, smol, hf_tokenizer, special):
    tok = Tokenizer.from_hf_folder(hf_folder)
    for text in TEXTS:
        ids = tok.encode(text, special=special)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=not special), text
        assert ids == smol.encode(text, special=special)
        assert tok.decode(ids) == text


def test_hf_folder_metadata(hf_folder, hf_tokenizer):
    tok = Tokenizer.from_hf_folder(hf_folder)
    assert tok.eos_ids == {2, 0, 3}  # tokenizer_config eos + every id of generation_config's list
    assert tok.bos_id == 1 and tok.pad_id == hf_tokenizer.pad_token_id and tok.add_bos is False
    assert tok.chat_template == hf_tokenizer.chat_template
    assert tok.vocab_size == len(hf_tokenizer)
    assert {"<|im_start|>", "<|im_end|>"} <= tok.special_tokens


def test_hf_folder_add_bos_from_post_processor(hf_folder, tmp_path):
    # A post-processor that prepends BOS, and no add_bos_token in tokenizer_config.json.
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / name).write_bytes((hf_folder / name).read_bytes())
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.add_bos is True
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
    assert tok.eos_ids == {2}


# ---------------------------------------------------------------- streaming

STREAM_TEXTS = ["emoji 😀👍🏽 family 👨‍👩‍👧 done", "中文测试，日本語のテキスト", " hello world 日本",
                "<|im_start|>user\nhi 😀<|im_end|>", "<s>héllo</s> wörld 中文", "😀😀😀"]


@pytest.mark.parametrize("which", ["smol", "spm"])
def test_stream_decoder_on_real_text(which, smol, spm):
    tok = {"smol": smol, "spm": spm}[which]
    byte_pieces = 0
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        byte_pieces += sum(tok.id_to_token(i).startswith("<0x") for i in ids)
        for skip in (False, True):
            pieces = stream(tok, ids, skip)
            assert "".join(pieces) == tok.decode(ids, skip_special=skip), text
            assert not any("\ufffd" in p for p in pieces), pieces
    assert which == "smol" or byte_pieces > 10  # the SentencePiece texts do go through byte fallback


@pytest.mark.parametrize("which", ["smol", "spm"])
def test_stream_decoder_on_random_ids(which, smol, spm):
    # Random ids include broken UTF-8 (byte-level pieces, invalid <0xNN> runs): the stream must still add up.
    tok = {"smol": smol, "spm": spm}[which]
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 16))]
        for skip in (False, True):
            assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special=skip), ids


def test_stream_decoder_waits_for_complete_characters(smol, spm):
    for tok in (smol, spm):
        ids = tok.encode("😀", add_bos=False)
        assert len(ids) > 1  # several byte pieces
        decoder = StreamDecoder(tok)
        assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
        assert decoder.push(ids[-1]) + decoder.flush() == "😀"
