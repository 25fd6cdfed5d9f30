"""The prompt-format checker: finds the mistakes that make a chat model ramble, ignore its system prompt or never stop.

A prompt is parsed as the turns of a known format (ChatML, Llama-3, [INST], Gemma, Phi-3, Zephyr, ...) and checked
for unbalanced or missing role tags, a role tag without the newline the format needs, a missing assistant header at
the end, turns that do not alternate where the format demands it, a system turn the format lacks, and special tokens
that would not reach the model as single tokens (absent from its vocabulary, or split into plain text because
special-token parsing is off). The format comes from the template's name, else from the markers in the template's
source or in the prompt itself.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from tokenmill.formats.template import ChatTemplate


class Vocab(Protocol):
    def token_to_id(self, text: str) -> int | None: ...
    def encode(self, text: str, special: bool) -> list[int]: ...


@dataclass
class Finding:
    """One problem in a prompt: a stable `code`, what is wrong, where (character offset) and how to fix it."""

    code: str
    message: str
    offset: int
    fix: str

    def __str__(self) -> str:
        return f"{self.code} at offset {self.offset}: {self.message}; fix: {self.fix}"


@dataclass(frozen=True)
class _Mark:
    pattern: str
    action: str  # "open" a turn, "close" it, or "reply": close the user's turn and open the model's ([/INST])
    role: str | None = None  # fixed role, else the pattern's (?P<role>...) group
    sep: str = ""  # what the format requires right after an opening tag


@dataclass(frozen=True)
class _Format:
    name: str
    marks: tuple[_Mark, ...]
    gen: str  # the header that opens the model's turn
    end: str  # what closes a turn
    tokens: tuple[str, ...] = ()  # markers that must be single tokens of the model's vocabulary
    closed: frozenset[str] | None = None  # roles whose turns need an explicit close; None: all of them
    system: bool = True  # the format has a system turn
    alternate: bool = False


def _fmt(name, marks, gen, end, tokens=(), **kw) -> _Format:
    return _Format(name, tuple(_Mark(*m) for m in marks), gen, end, tuple(tokens), **kw)


_ROLE = "(?P<role>[A-Za-z_]*)"
_PHI = r"<\|(?P<role>system|user|assistant)\|>"
_INST = ((r"\[INST\]", "open", "user"), (r"\[/INST\]", "reply"), (r"</s>", "close"))
_INSTRUCTION = ((r"### Instruction:", "open", "user", "\n"), (r"### Response:", "open", "assistant", "\n"))
_FORMATS = {f.name: f for f in (
    _fmt("chatml", ((r"<\|im_start\|>" + _ROLE, "open", None, "\n"), (r"<\|im_end\|>", "close")),
         "<|im_start|>assistant\n", "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    _fmt("llama3", ((r"<\|start_header_id\|>(?P<role>[^<]*?)<\|end_header_id\|>", "open", None, "\n\n"),
                    (r"<\|eot_id\|>|<\|eom_id\|>", "close")),
         "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>",
         ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    _fmt("gemma", ((r"<start_of_turn>" + _ROLE, "open", None, "\n"), (r"<end_of_turn>", "close")),
         "<start_of_turn>model\n", "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>"), system=False, alternate=True),
    _fmt("phi3", ((_PHI, "open", None, "\n"), (r"<\|end\|>", "close")),
         "<|assistant|>\n", "<|end|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    _fmt("zephyr", ((_PHI, "open", None, "\n"), (r"</s>", "close")), "<|assistant|>\n", "</s>", ("</s>",)),
    _fmt("llama2", _INST, "[/INST]", "</s>", ("</s>",), alternate=True),
    _fmt("mistral", _INST, "[/INST]", "</s>", ("</s>",), alternate=True),
    _fmt("cohere", ((r"<\|START_OF_TURN_TOKEN\|><\|(?P<role>SYSTEM|USER|CHATBOT)_TOKEN\|>", "open"),
                    (r"<\|END_OF_TURN_TOKEN\|>", "close")),
         "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
         ("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>",
          "<|CHATBOT_TOKEN|>")),
    _fmt("granite", ((r"<\|start_of_role\|>(?P<role>[^<]*?)<\|end_of_role\|>", "open"),
                     (r"<\|end_of_text\|>", "close")),
         "<|start_of_role|>assistant<|end_of_role|>", "<|end_of_text|>",
         ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>")),
    _fmt("openchat", ((r"GPT4 Correct (?P<role>User|Assistant|System):", "open"),
                      (r"<\|end_of_turn\|>", "close")),
         "GPT4 Correct Assistant:", "<|end_of_turn|>", ("<|end_of_turn|>",)),
    _fmt("codellama", ((r"Source: (?P<role>system|user|assistant)", "open"), (r"<step>", "close")),
         "Source: assistant\nDestination: user\n\n ", "<step>", alternate=True),
    _fmt("deepseek", _INSTRUCTION + ((r"<\|EOT\|>", "close"),), "### Response:\n", "<|EOT|>", ("<|EOT|>",),
         closed=frozenset({"assistant"})),
    _fmt("alpaca", _INSTRUCTION, "### Response:\n", "### Instruction:", closed=frozenset()),
    _fmt("vicuna", ((r"USER:", "open", "user"), (r"ASSISTANT:", "open", "assistant"), (r"</s>", "close")),
         "ASSISTANT:", "</s>", closed=frozenset({"assistant"})),
)}
_FORMATS["tinyllama"] = _FORMATS["zephyr"]

# (format, markers any of which identifies it), most specific first.
_SIGNS = (
    ("chatml", ("<|im_start|>",)), ("llama3", ("<|start_header_id|>",)), ("gemma", ("<start_of_turn>",)),
    ("cohere", ("<|START_OF_TURN_TOKEN|>",)), ("granite", ("<|start_of_role|>",)), ("openchat", ("GPT4 Correct ",)),
    ("phi3", ("<|end|>",)), ("zephyr", ("<|user|>", "<|assistant|>", "<|system|>")), ("llama2", ("<<SYS>>",)),
    ("mistral", ("[INST]", "[/INST]")), ("codellama", ("<step>", "Source: assistant")), ("deepseek", ("<|EOT|>",)),
    ("alpaca", ("### Instruction:", "### Response:")), ("vicuna", ("ASSISTANT:",)),
)
_CANONICAL = {"model": "assistant", "chatbot": "assistant"}
_KNOWN_ROLES = ("system", "user", "assistant", "tool", "ipython", "function", "developer", "model")
# Text shaped like a control token; checked only where the vocabulary has it as a single token.
_TOKEN_LIKE = re.compile(r"<\|[^<>|\s]{1,48}\|>|<｜[^<>｜]{1,48}｜>|</?s>|<[a-z_]{3,32}>|\[/?[A-Z_]{3,24}\]")


def detect_format(text: str) -> str | None:
    """The chat format whose markers appear in `text` (a prompt or a template's source), or None."""
    return next((name for name, signs in _SIGNS if any(s in text for s in signs)), None)


@lru_cache
def _regex(fmt: _Format) -> tuple[re.Pattern, dict[int, tuple[_Mark, str]]]:
    """One alternation over all marks (mark i is group m<i>, its role group role<i>), and group number -> (mark, name
    of its role group): the outer group closes last, so a match's lastindex is its mark's group."""
    parts = (f"(?P<m{i}>{m.pattern.replace('?P<role>', f'?P<role{i}>')})" for i, m in enumerate(fmt.marks))
    pattern = re.compile("|".join(parts))
    return pattern, {pattern.groupindex[f"m{i}"]: (m, f"role{i}") for i, m in enumerate(fmt.marks)}


@dataclass(slots=True)
class _Turn:
    role: str
    start: int
    body: int  # where the content starts
    implicit: bool = False  # opened by [/INST], not by a tag of its own


def _parse(prompt: str, fmt: _Format, found: list[Finding]) -> tuple[list[_Turn], _Turn | None]:
    """The prompt's turns and the one left open at the end (None if the last turn was closed)."""
    turns: list[_Turn] = []
    current: _Turn | None = None
    pattern, marks = _regex(fmt)
    for m in pattern.finditer(prompt):
        (mark, role_group), pos = marks[m.lastindex], m.start()
        if mark.action in ("close", "reply"):
            if current is None or (mark.action == "reply" and current.role != "user"):
                found.append(Finding("unbalanced_tag", f"{m.group()!r} closes a turn that was never opened", pos,
                                     f"remove it, or open the turn before it ({fmt.name} format)"))
            current = None
            if mark.action == "reply":
                current = _Turn("assistant", pos, m.end(), implicit=True)
                turns.append(current)
            continue
        if current is not None:  # a turn opens while another is still open
            if current.implicit and not prompt[current.body:pos].strip():
                turns.pop()  # "[/INST][INST]": no reply at all, i.e. two user turns in a row (current is the last)
            elif fmt.closed is None or current.role in fmt.closed:
                found.append(Finding("unbalanced_tag", f"the {current.role} turn opened here is never closed with "
                                     f"{fmt.end!r}", current.start, f"end it with {fmt.end!r} before the next turn"))
        raw, body = mark.role or m.group(role_group), m.end()
        if mark.role is None and raw.lower() not in _KNOWN_ROLES:  # "<|im_start|>userHello": no separator at all
            known = next((r for r in _KNOWN_ROLES if raw.lower().startswith(r)), None)
            if known:
                raw, body = raw[: len(known)], m.start(role_group) + len(known)
        if mark.sep and not prompt.startswith(mark.sep, body):
            found.append(Finding("missing_newline", f"the {fmt.name} tag for {raw!r} must be followed by {mark.sep!r}",
                                 body, f"insert {mark.sep!r} right after the role tag"))
        current = _Turn(_CANONICAL.get(raw.strip().lower(), raw.strip().lower()), pos, body + len(mark.sep))
        turns.append(current)
    return turns, current


def check_prompt(
    prompt: str,
    *,
    vocab: Vocab,
    template: ChatTemplate | None = None,
    messages: list[dict] | None = None,
    encode_special: bool = True,
) -> list[Finding]:
    """Check a chat prompt for format mistakes before it is sent to the model.

    Args:
        prompt: the text that will be tokenized.
        vocab: the model's tokenizer (`token_to_id(text)`, `encode(text, special)`).
        template: the chat template the prompt should follow, if known.
        messages: the conversation the prompt was rendered from, if known.
        encode_special: whether the prompt will be tokenized with special-token parsing on.
    Returns:
        Findings ordered by offset; empty for a well-formed prompt.
    """
    found: list[Finding] = []
    fmt = _format_for(prompt, template)
    if fmt is not None:
        turns, last = _parse(prompt, fmt, found)
        if not turns:
            found.append(Finding("missing_role_tags", f"the prompt has none of the {fmt.name} format's role tags", 0,
                                 f"render the conversation through the {fmt.name} template, not as plain text"))
        elif last is None or last.role != "assistant":
            what = ("after a closed turn, so the model would open a turn of its own choosing" if last is None else
                    f"inside an open {last.role} turn, so the model would continue that text")
            found.append(Finding("no_generation_prompt", f"the prompt ends without the assistant header, {what}",
                                 len(prompt), f"end the prompt with {fmt.gen!r} (add_generation_prompt=True)"))
        system = next((t for t in turns if t.role == "system"), None)
        if system is not None and not fmt.system:
            found.append(_no_system(system.start, fmt.name))
        if template.requires_alternation if template is not None else fmt.alternate:
            bad = _not_alternating([t.role for t in turns])
            if bad is not None:
                found.append(_alternation(turns[bad].start, turns[bad].role))

    if template is not None and messages:  # what the conversation asks of a template that cannot give it
        roles = [m.get("role") for m in messages]
        codes = {f.code for f in found}
        if not template.system_role and "system" in roles and "system_not_supported" not in codes:
            found.append(_no_system(_find(prompt, messages[roles.index("system")]), template.name))
        bad = _not_alternating(roles) if template.requires_alternation else None
        if bad is not None and "roles_not_alternating" not in codes:
            found.append(_alternation(_find(prompt, messages[bad]), roles[bad]))

    found += _token_findings(prompt, vocab, fmt, encode_special)
    return sorted(found, key=lambda f: f.offset)


def _format_for(prompt: str, template: ChatTemplate | None) -> _Format | None:
    if template is None:
        name = detect_format(prompt)
    elif template.name == "raw":
        name = None
    elif template.name in _FORMATS:
        name = template.name
    else:
        name = detect_format(template.source) or detect_format(prompt)
    return _FORMATS.get(name) if name else None


def _find(prompt: str, message: dict) -> int:
    """Where a message's content appears in the prompt (0 if it does not)."""
    content = message.get("content")
    return max(prompt.find(content), 0) if isinstance(content, str) and content else 0


def _not_alternating(roles: list[str]) -> int | None:
    """Index of the first turn breaking user/assistant alternation, or None. One leading system turn and tool turns
    are allowed; a later system turn breaks it."""
    expect = "user"
    for i, role in enumerate(roles):
        if role == "system" and i > 0:
            return i
        if role in ("user", "assistant"):
            if role != expect:
                return i
            expect = "assistant" if role == "user" else "user"
    return None


def _alternation(offset: int, role: str) -> Finding:
    return Finding("roles_not_alternating", f"this format needs user and assistant turns to alternate, but a {role} "
                   "turn comes here", offset, "merge consecutive messages of one role, or add the missing turn between")


def _no_system(offset: int, fmt: str) -> Finding:
    return Finding("system_not_supported", f"the {fmt} format has no system role; the model never saw a system turn",
                   offset, "fold the system text into the first user message, or use a template with a system role")


def _token_findings(prompt: str, vocab: Vocab, fmt: _Format | None, encode_special: bool) -> list[Finding]:
    found = []
    # first offset of each token-like text, found in one pass (a find per distinct token would be quadratic)
    first = {t: at for t in (fmt.tokens if fmt else ()) if (at := prompt.find(t)) >= 0}
    for tok, at in first.items():
        if vocab.token_to_id(tok) is None:
            found.append(Finding(
                "token_not_in_vocab", f"{tok!r} of the {fmt.name} format is not a token of this model; it would reach "
                "the model as plain text it was never trained on", at,
                f"use the model's own template, or a format whose tokens the model has (not {fmt.name})"))
    for m in _TOKEN_LIKE.finditer(prompt):
        first.setdefault(m.group(), m.start())
    added = None  # ids the tokenizer adds to any text (a BOS), not counted as pieces of the token
    for tok, at in first.items():
        tid = vocab.token_to_id(tok)
        if tid is None:
            continue
        ids = vocab.encode(tok, special=encode_special)
        if tid in ids:
            continue
        added = len(vocab.encode("", special=encode_special)) if added is None else added
        if encode_special:
            why, fix = "the tokenizer does not parse it as a special token", "mark it special in the tokenizer"
        else:
            why, fix = "special-token parsing is off", "tokenize with special tokens parsed (encode_special=True)"
        found.append(Finding("special_token_split", f"{tok!r} would be encoded as {len(ids) - added} plain tokens, not as "
                             f"token {tid}, because {why}", at, fix))
    return found
