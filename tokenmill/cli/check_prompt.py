"""`tokenmill check-prompt`: a rendered chat prompt, or messages rendered through a template, checked for format
mistakes (formats/prompt_check.py); each finding printed with its offset, line, column and fix."""
from __future__ import annotations

import bisect
import json
import re
import sys
from pathlib import Path

from tokenmill.errors import InvalidRequestError


def add_parser(sub):
    """Register `check-prompt` on the CLI's subparsers."""
    k = sub.add_parser("check-prompt", help="check a chat prompt for format mistakes", description=(
        "Check a rendered chat prompt (PROMPT, --file) or a conversation rendered through a template (--messages) "
        "for format mistakes. Prints each finding with its character offset and fix; exits 0 when clean, "
        "1 when there are findings."))
    src = k.add_mutually_exclusive_group(required=True)
    src.add_argument("prompt", nargs="?", help="the rendered prompt text")
    src.add_argument("--file", help="read the rendered prompt from FILE (- for stdin)")
    src.add_argument("--messages", help="a JSON file with a message list [{role, content}, ...], rendered "
                     "with --template")
    k.add_argument("--template", help="the template the prompt should follow: a built-in name or a .jinja file "
                   "(default: the model's own)")
    k.add_argument("--raw-specials", action="store_true",
                   help="the prompt will be tokenized with special-token parsing off")
    k.add_argument("-m", "--model", help="the model whose vocabulary the prompt is for (default: smollm2)")
    k.set_defaults(func=cmd_check_prompt)


def _tokenizer_and_template(model: str | None, template: str | None):
    # the vocabulary and template only: no weights are read
    from tokenmill.formats.gguf_file import GGUFFile
    from tokenmill.model.loader import resolve_model_path
    from tokenmill.formats.template import get_template
    from tokenmill.formats.tokenizer import Tokenizer

    path = resolve_model_path(model)
    tok = Tokenizer.from_hf_folder(path) if path.is_dir() else Tokenizer.from_gguf(GGUFFile(path).metadata)
    bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None else ""
    eos = tok.id_to_token(min(tok.eos_ids)) if tok.eos_ids else ""
    if template is None and not tok.chat_template:
        return tok, None  # nothing to follow: the format is read from the prompt itself
    return tok, get_template(template, tok.chat_template, bos, eos)


def _read_text(path: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"cannot read {path!r}: {getattr(e, 'strerror', None) or e}") from None


def cmd_check_prompt(args) -> int:
    from tokenmill.formats.prompt_check import check_prompt

    messages = None
    if args.messages:
        try:
            messages = json.loads(_read_text(args.messages))
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"--messages {args.messages!r} is not JSON: {e}") from None
        if isinstance(messages, dict):  # a file saved by `tokenmill chat`'s /save
            system = messages.get("system")
            messages = ([{"role": "system", "content": system}] if system else []) + list(messages.get("messages") or [])
    prompt = _read_text(args.file) if args.file else args.prompt
    tok, template = _tokenizer_and_template(args.model, args.template)
    if messages is not None:
        if template is None:
            raise InvalidRequestError("the model ships no chat template; choose one with --template NAME or FILE")
        prompt = template.render(messages)
    special = not args.raw_specials and (template.encode_special if template else True)
    findings = check_prompt(prompt, vocab=tok, template=template, messages=messages, encode_special=special)
    line_starts = [0] + [m.end() for m in re.finditer("\n", prompt)]  # once: per finding it would be quadratic
    for f in findings:
        line = bisect.bisect_right(line_starts, f.offset)
        col = f.offset - line_starts[line - 1] + 1
        print(f"{f.code} at offset {f.offset} (line {line}, column {col}): {f.message}\n    fix: {f.fix}")
    fmt = template.name if template else "detected from the prompt"
    print(f"{len(findings)} finding{'s' * (len(findings) != 1)} (template: {fmt})", file=sys.stderr)
    return 1 if findings else 0
