"""Text <-> token ids for GGUF files and Hugging Face folders, on top of the `tokenizers` library.

A GGUF carries no tokenizer.json, only llama.cpp's `tokenizer.ggml.*` metadata, so the tokenizer is rebuilt from it:
- model "gpt2": byte-level BPE from tokens + merges, text split first by the regexes llama.cpp pairs with
  `tokenizer.ggml.pre`;
- model "llama": SentencePiece BPE. Merges are recovered from the scores (the higher-scoring piece merges first, as
  SentencePiece and llama.cpp do), with `<0xNN>` byte fallback and the `▁` space marker.
Control and unknown tokens become special added tokens and user-defined ones plain added tokens, so text like
`<|im_start|>` encodes to one id.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from tokenmill.errors import ModelLoadError, UnsupportedError

# GGUF tokenizer.ggml.token_type values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")

SUPPORTED_GGUF_MODELS = ("gpt2", "llama")

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _char_class(ranges: str) -> str:
    """'41-5A B5' -> '[A-Zµ]': code points in hex, so no editor or NFC pass can alter the characters."""
    def chars(item):
        return "-".join(chr(int(h, 16)) for h in item.split("-"))
    return "[" + "".join(chars(item) for item in ranges.split()) + "]"


_CJK = _char_class("4E00-9FA5 0800-4E00 AC00-D7FF") + "+"
_DEEPSEEK_LLM = [  # cased letters, ASCII/fullwidth punctuation, CJK, digits: deepseek-llm's tokenizer.json splits
    r"[\r\n]",
    r"\s?" + _char_class(
        "41-5A 61-7A B5 C0-D6 D8-F6 F8-1BA 1BC-1BF 1C4-293 295-2AF 370-373 376 377 37B-37D 37F 386 388-38A 38C 38E-3A1 "
        "3A3-3F5 3F7-481 48A-52F 531-556 10A0-10C5 13A0-13F5 13F8-13FD 1C90-1CBA 1CBD-1CBF 1D00-1D2B 1D6B-1D77 "
        "1D79-1D9A 1E00-1F15 1F18-1F1D 1F20-1F45 1F48-1F4D 1F50-1F57 1F59 1F5B 1F5D 1F5F-1F7D 1F80-1FB4 1FB6-1FBC "
        "1FBE 1FC2-1FC4 1FC6-1FCC 1FD0-1FD3 1FD6-1FDB 1FE0-1FEC 1FF2-1FF4 1FF6-1FFC 2102 2107 210A-2113 2115 "
        "2119-211D 2124 2126 2128 212A-212D 212F-2134 2139 213C-213F 2145-2149 214E 2183 2184 2C00-2C7B 2C7E-2CE4 "
        "2CEB-2CEE 2CF2 2CF3 A640-A66D A680-A69B A722-A76F A771-A787 A78B-A78E AB70-ABBF FB00-FB06 FB13-FB17 "
        "FF21-FF3A FF41-FF5A 10400-1044F 104B0-104D3 104D8-104FB 10C80-10CB2 10CC0-10CF2 118A0-118DF 1E900-1E943") + "+",
    r"\s?" + _char_class("21-2F 3A-7E FF01-FF0F FF1A-FF5E 2018-201F 3000-3002") + "+",
    r"\s+$",
    _CJK,
    r"\p{N}+",
]
_DEEPSEEK_CODER = [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"]

# tokenizer.ggml.pre -> (regexes applied one after another, ignore_merges), after llama.cpp's llama-vocab.cpp
_PRE_SPLITS: dict[str, tuple[list[str], bool]] = {name: split for names, split in [
    ("default gpt-2 gpt2 phi-2 mpt olmo jais trillion granite-docling exaone4 mellum a.x-4.0 gigachat", ([_GPT2], False)),
    ("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2", ([_LLAMA3], True)),
    ("dbrx smaug-bpe chatglm-bpe glm4", ([_LLAMA3], False)),
    ("qwen2 deepseek-r1-qwen megrez stablelm2 hunyuan kormo", ([_QWEN2], False)),
    ("starcoder refact command-r smollm codeshell exaone minerva-7b", ([r"\p{N}", _GPT2], False)),
    ("falcon", ([r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"], False)),
    ("deepseek-llm", (_DEEPSEEK_LLM, False)),
    ("deepseek-coder", (_DEEPSEEK_CODER, False)),
    ("tekken", ([_TEKKEN], True)),
    ("gpt-4o llama4 minimax-m2", ([_GPT4O], False)),
] for name in names.split()}
_ADDS_BOS_BY_DEFAULT = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                        "tekken", "chameleon"}

# Control tokens that end a turn although the GGUF may not name them as eos/eot/eom (llama.cpp's EOG list)
_END_OF_GENERATION = frozenset({"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>", "<|end_of_text|>",
                                "<end_of_turn>", "<|end|>", "<|return|>", "<|call|>", "<｜end▁of▁sentence｜>",
                                "<end_of_utterance>", "<EOT>"})


class Tokenizer:
    """Encodes text to ids and decodes ids to text; knows the model's special ids and chat template.

    Build with `from_gguf(metadata)` or `from_hf_folder(path)`.
    """

    def __init__(self, backend: Backend, *, bos_id: int | None, eos_ids: Iterable[int], pad_id: int | None,
                 add_bos: bool, chat_template: str | None, vocab_size: int | None = None):
        self._backend = backend
        self._plain: Backend | None = None  # copy that reads special-token text as plain text; built on first use
        self.vocab_size = vocab_size if vocab_size is not None else backend.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id
        self.eos_ids = frozenset(i for i in eos_ids if i is not None)
        self.pad_id = pad_id
        self.add_bos = bool(add_bos and bos_id is not None)
        self.chat_template = chat_template
        self.special_tokens = frozenset(t.content for t in backend.get_added_tokens_decoder().values() if t.special)

    def encode(self, text: str, *, special: bool = True, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`.

        Args:
            special: read special-token text such as `<|im_start|>` as that token; False encodes it as plain text
                (user-defined tokens stay whole either way, as in llama.cpp and HF).
            add_bos: prepend BOS; None follows the model (`self.add_bos`).
        """
        backend = self._backend if special else self._plain_backend()
        ids = backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._backend.id_to_token(i)

    def _plain_backend(self) -> Backend:
        if self._plain is None:
            plain = Backend.from_str(self._backend.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> "Tokenizer":
        """Build from GGUF metadata (key -> value as gguf's `ReaderField.contents()` returns it).

        eos_ids holds the eos/eot/eom ids and, as in llama.cpp, control tokens that end a turn (`<|im_end|>`,
        `<|endoftext|>`, `<|eot_id|>`, ...) even when the file does not name them.
        """
        kind = meta.get("tokenizer.ggml.model")
        if kind not in SUPPORTED_GGUF_MODELS:
            raise UnsupportedError(f"GGUF tokenizer model {kind!r} is not supported; "
                                   f"supported: {', '.join(SUPPORTED_GGUF_MODELS)}")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError("GGUF metadata has no tokenizer.ggml.tokens")
        types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise ModelLoadError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
        pre = meta.get("tokenizer.ggml.pre")
        vocab = {}
        for i, token in enumerate(tokens):
            vocab.setdefault(token, i)
        if len(vocab) < len(tokens):
            warnings.warn(f"GGUF vocabulary repeats {len(tokens) - len(vocab)} token texts; "
                          "the later copies cannot be produced by encode and decode to nothing", stacklevel=2)

        merges = meta.get("tokenizer.ggml.merges") or []
        if kind == "gpt2" and not merges and any(len(t) > 1 for t, ty in zip(tokens, types) if ty == NORMAL):
            raise ModelLoadError("GGUF tokenizer is byte-level BPE (tokenizer.ggml.model 'gpt2') but has no "
                                 "tokenizer.ggml.merges, so every character would be its own token; the file is damaged "
                                 "or was converted without merges: convert it again")
        try:
            if kind == "gpt2":
                backend = _byte_level_bpe(vocab, merges, pre)
            else:
                add_space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
                scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
                unk_id = meta.get("tokenizer.ggml.unknown_token_id")
                if unk_id is None:
                    unk_id = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
                backend = _sentencepiece_bpe(vocab, tokens, scores, types, add_space_prefix,
                                             tokens[unk_id] if unk_id is not None else None)
        except Exception as e:  # tokenizers raises bare Exception on a merge naming a missing token
            raise ModelLoadError(f"cannot build the {kind!r} tokenizer from GGUF metadata: {e}") from e

        # Added tokens must keep their GGUF ids: only the first copy of a text is in the model vocab.
        specials = [t for i, (t, ty) in enumerate(zip(tokens, types))
                    if ty in (CONTROL, UNKNOWN) and t and vocab[t] == i]
        user = [t for i, (t, ty) in enumerate(zip(tokens, types)) if ty == USER_DEFINED and t and vocab[t] == i]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
        assert backend.get_vocab_size(with_added_tokens=True) == len(vocab)

        def token_id(key: str) -> int | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return i if isinstance(i, int) and 0 <= i < len(tokens) else None

        bos_id = token_id("bos_token_id")
        eos_ids = {token_id("eos_token_id"), token_id("eot_token_id"), token_id("eom_token_id")}
        eos_ids |= {i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL and t in _END_OF_GENERATION}
        if "<|return|>" in vocab:  # gpt-oss: <|end|> closes a message, not the answer
            eos_ids.discard(vocab.get("<|end|>"))
        eos_ids.discard(bos_id)
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:
            add_bos = kind == "llama" or pre in _ADDS_BOS_BY_DEFAULT
        return cls(backend, bos_id=bos_id, eos_ids=eos_ids, pad_id=token_id("padding_token_id"), add_bos=add_bos,
                   chat_template=meta.get("tokenizer.chat_template"), vocab_size=len(tokens))

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> "Tokenizer":
        """Build from a Hugging Face folder: tokenizer.json, tokenizer_config.json, and if present
        generation_config.json (eos ids) and chat_template.jinja."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelLoadError(f"{path} has no tokenizer.json (only fast-tokenizer folders are supported)")
        backend = Backend.from_file(str(path / "tokenizer.json"))
        config = {**_read_json(path / "special_tokens_map.json"), **_read_json(path / "tokenizer_config.json")}
        generation = _read_json(path / "generation_config.json")

        def token_id(value: Any) -> int | None:
            text = value.get("content") if isinstance(value, dict) else value
            return backend.token_to_id(text) if isinstance(text, str) else None

        bos_id = token_id(config.get("bos_token"))
        if bos_id is None and isinstance(generation.get("bos_token_id"), int):
            bos_id = generation["bos_token_id"]
        listed = generation.get("eos_token_id")
        eos_ids = {token_id(config.get("eos_token")), *(listed if isinstance(listed, list) else [listed])}
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):  # otherwise the post-processor decides, as it does in transformers
            with_specials = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and with_specials[:1] == [bos_id]

        template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        pad_id = token_id(config.get("pad_token"))
        if pad_id is None and isinstance(generation.get("pad_token_id"), int):
            pad_id = generation["pad_token_id"]
        return cls(backend, bos_id=bos_id, eos_ids={i for i in eos_ids if isinstance(i, int)}, pad_id=pad_id,
                   add_bos=add_bos, chat_template=template)


class StreamDecoder:
    """Incremental detokenizer: push token ids one at a time, get back only text that is final.

    It decodes a short window: the tokens already emitted since the last boundary (context for decoders that treat the
    first token specially, like SentencePiece's leading-space strip) plus the pending ones, and emits the new suffix
    once it does not end in an incomplete UTF-8 character or inside a run of byte-fallback pieces. Pushes + flush
    concatenate to `decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._window: list[int] = []  # [emitted context | pending]; starts on a character boundary
        self._read = 0  # window[:read] is already emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly '')."""
        self._window.append(token_id)
        piece = self._tokenizer.id_to_token(token_id) or ""
        if _BYTE_PIECE.fullmatch(piece) or (self._skip_special and piece in self._tokenizer.special_tokens):
            return ""  # a run of <0xNN> pieces decodes as a whole (all U+FFFD if invalid): wait for its end
        done, text = self._decode(self._window[:self._read]), self._decode(self._window)
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._window = self._window[self._read:]
            self._read = len(self._window)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """Return whatever is still pending (an incomplete character decodes to U+FFFD here) and reset."""
        done, text = self._decode(self._window[:self._read]), self._decode(self._window)
        self._window, self._read = [], 0
        return text[len(done):]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special=self._skip_special) if ids else ""


def _byte_level_bpe(vocab: dict[str, int], merges: list[str], pre: str) -> Backend:
    if pre not in _PRE_SPLITS:
        warnings.warn(f"missing or unknown tokenizer.ggml.pre {pre!r}: splitting text with the GPT-2 regex, "
                      "which may tokenize differently from the model's own tokenizer", stacklevel=3)
    regexes, ignore_merges = _PRE_SPLITS.get(pre, _PRE_SPLITS["gpt2"])
    pairs = [tuple(m.split(" ", 1)) for m in merges]  # byte-level tokens never hold a real space
    backend = Backend(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(vocab: dict[str, int], tokens: list[str], scores: list[float], types: list[int],
                       add_space_prefix: bool, unk_token: str | None) -> Backend:
    # Every split of a normal piece into two vocab pieces is a merge, ranked by the piece's score (best first).
    # Control, unused and byte pieces are never built from text, as in SentencePiece.
    ranked = []
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        if kind != NORMAL or vocab[piece] != i:
            continue
        for cut in range(1, len(piece)):
            if piece[:cut] in vocab and piece[cut:] in vocab:
                ranked.append((-score, i, cut))
    ranked.sort()
    merges = [(tokens[i][:cut], tokens[i][cut:]) for _, i, cut in ranked]
    backend = Backend(models.BPE(vocab, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    # Spaces become ▁ and each stretch of text between added tokens gets a leading ▁, even one that starts with a
    # space: SentencePiece's dummy prefix as llama.cpp applies it (transformers' Metaspace "first" differs, see tests).
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
