"""Chat templates: turn a conversation into the exact prompt text a chat model was trained on.

A model's own template is Jinja shipped with it (GGUF `tokenizer.chat_template`, HF `chat_template`) and is rendered the
way Hugging Face transformers renders it, so tokenmill's prompts match the reference byte for byte: a sandboxed Jinja
environment (templates are untrusted input), `trim_blocks`/`lstrip_blocks`, the `loopcontrols` extension, and the
globals and filters templates rely on (`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text).
Built-in formats cover models that ship no template or a wrong one (`--template chatml`, ...).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenmill.errors import InvalidRequestError


class ChatTemplateError(InvalidRequestError):
    """The chat template rejected the conversation (its own `raise_exception`) or failed while rendering it."""


class _Raised(Exception):
    """What the template's `raise_exception(...)` raises, before render() names the template."""


class _GenerationTag(jinja2.ext.Extension):
    # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; at inference the body renders.
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Namespace(jinja2.utils.Namespace):
    # Underscore attributes are the way into CPython internals, so templates may not store them on a namespace.
    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for key in attrs:
            _Namespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set {name!r} on a namespace")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <>&' for HTML and sorts keys; chat templates expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _plain(value: Any, where: str) -> Any:
    """A copy of `value` made only of JSON-like Python types: the template sees no object with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, where) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v, where) for v in value)
    for base in (bool, str, int, float):  # enum members and numpy scalars -> their base type
        if isinstance(value, base):
            return base(value)
    raise InvalidRequestError(
        f"{where} holds a {type(value).__name__}; chat messages, tools and documents may only hold "
        "str, int, float, bool, None, lists and dicts"
    )


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError(f"messages must be a non-empty list of {{'role': ..., 'content': ...}}, got {messages}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"messages[{i}] must be a dict with a string 'role', got {message!r}")
        # Like transformers: a key set to None counts as absent (APIs send content=None next to tool_calls).
        message = _plain({k: v for k, v in message.items() if v is not None}, f"messages[{i}]")
        reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
        if reasoning is not None:  # templates read it as `reasoning_content` (most) or `thinking` (gpt-oss)
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _list_of_dicts(value: Any) -> bool:
    return value is None or (isinstance(value, (list, tuple)) and all(isinstance(v, Mapping) for v in value))


def _text_content(message: dict) -> dict:
    # Built-in formats are text-only: content given as parts [{"type": "text", "text": ...}] is joined.
    content = message.get("content")
    if isinstance(content, list):
        text = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        return {**message, "content": text}
    return message if "content" in message else {**message, "content": ""}


# Markers that end a turn in common formats: a model template that writes one gets it as a stop string.
_TURN_ENDS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|END_OF_TURN_TOKEN|>", "<|end_of_text|>",
    "<|end_of_turn|>", "<|EOT|>", "<step>", "<｜end▁of▁sentence｜>", "<|endoftext|>", "<|return|>", "<|eot|>",
)
_PROBE = "tokenmill-probe"


class ChatTemplate:
    """A Jinja chat template plus what generation needs to know about its format.

    Attributes:
        name: built-in name, the .jinja file's stem, "model" for the model's own template, or "custom".
        source: the Jinja text.
        stop_strings: text that ends the model's turn (besides the EOS token).
        encode_special: whether the rendered prompt must be tokenized with special-token parsing on.
        system_role: whether a system message reaches the model (False: the template rejects or drops it).
        requires_alternation: whether the template demands user/assistant turns alternating.
    """

    def __init__(
        self,
        source: str,
        *,
        name: str = "custom",
        bos_token: str | None = None,
        eos_token: str | None = None,
        stop_strings: list[str] | None = None,
        encode_special: bool = True,
        system_role: bool | None = None,
        requires_alternation: bool | None = None,
        text_only: bool = False,
        clock: Callable[[], datetime] = datetime.now,
    ):
        self.name, self.source = name, source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.encode_special = encode_special
        self._text_only, self._clock = text_only, clock

        def raise_exception(message):
            raise _Raised(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals.update(
            raise_exception=raise_exception,
            strftime_now=lambda fmt: self._clock().strftime(fmt),
            dict=lambda *args, **kwargs: dict(*args, **kwargs),
            namespace=_Namespace,
        )
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template {name!r} is not valid Jinja: {e.message} (line {e.lineno})") from e

        if stop_strings is None:
            stop_strings = [s for s in _TURN_ENDS if s in source]
            if eos_token and "eos_token" in source and eos_token not in stop_strings:
                stop_strings.append(eos_token)
        self.stop_strings = list(stop_strings)
        if system_role is None:
            out = self._try([{"role": "system", "content": _PROBE}, {"role": "user", "content": "Hi"}])
            system_role = out is not None and _PROBE in out
        if requires_alternation is None:
            two_users = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi again"}]
            one_user = [{"role": "user", "content": "Hi"}]
            requires_alternation = self._try(two_users) is None and self._try(one_user) is not None
        self.system_role, self.requires_alternation = system_role, requires_alternation

    def _try(self, messages: list[dict]) -> str | None:
        try:
            return self.render(messages)
        except Exception:  # probing: any failure means "this template can't take that conversation"
            return None

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to prompt text, as transformers' `apply_chat_template(..., tokenize=False)` does.

        Args:
            messages: [{"role": "system"|"user"|"assistant"|"tool", "content": ..., ...}, ...]
            add_generation_prompt: end with the header that opens the assistant's turn.
            tools: JSON schemas of callable tools, for templates that support them.
            documents: [{"title": ..., "text": ...}, ...] for retrieval-augmented templates.
            **kwargs: more template variables (e.g. `date_string`, `enable_thinking`); they override bos/eos_token.
        Raises:
            ChatTemplateError: the template rejected the conversation or failed to render.
            InvalidRequestError: malformed messages, tools or documents.
        """
        messages = _messages(messages)
        if self._text_only:
            messages = [_text_content(m) for m in messages]
        if not _list_of_dicts(tools):
            raise InvalidRequestError(f"tools must be a list of JSON-schema dicts, got {tools!r}")
        if not _list_of_dicts(documents):
            raise InvalidRequestError(f"documents must be a list of dicts with 'title' and 'text', got {documents!r}")
        variables = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v is not None}
        variables.update(_plain(kwargs, "template variables"))
        try:
            return self._template.render(
                messages=messages,
                tools=_plain(tools, "tools"),
                documents=_plain(documents, "documents"),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except _Raised as e:
            raise ChatTemplateError(f"chat template {self.name!r} rejected the conversation: {e}") from None
        except Exception as e:  # a template bug, or input it can't handle: UndefinedError, TypeError, SecurityError...
            raise ChatTemplateError(f"chat template {self.name!r} failed to render: {type(e).__name__}: {e}") from e

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, stop_strings={self.stop_strings!r})"


# ---- built-in formats --------------------------------------------------------------------------------------------
# Each follows the family's published format (its HF chat_template where it has one); tests compare them with the
# real templates. `bos`/`eos` are used when the model's tokenizer does not say.

_SPLIT_SYSTEM = r"""
{%- if messages[0]['role'] == 'system' %}
{%- set system = messages[0]['content'] %}
{%- set turns = messages[1:] %}
{%- else %}
{%- set system = none %}
{%- set turns = messages %}
{%- endif %}"""

_ALTERNATE = r"""
{%- for message in turns %}
{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] %}
{{- raise_exception('this format needs user and assistant turns alternating, starting with user, after one '
    ~ 'optional system message; turn ' ~ loop.index ~ ' is ' ~ message['role']) }}
{%- endif %}
{%- endfor %}"""


def _only_roles(*roles: str) -> str:
    return (
        "\n{%- for message in messages %}{%- if message['role'] not in " + repr(roles) + " %}"
        "{{- raise_exception('this format has no ' ~ message['role'] ~ ' role; use one of " + ", ".join(roles) + "') }}"
        "{%- endif %}{%- endfor %}"
    )


_RAW = r"""
{%- for message in messages %}
{{- message['content'] }}
{%- if not loop.last %}{{- '\n' }}{%- endif %}
{%- endfor %}"""

_CHATML = r"""
{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""

_LLAMA2 = _SPLIT_SYSTEM + _ALTERNATE + r"""
{%- for message in turns %}
{%- if message['role'] == 'user' %}
{%- set content = message['content'] %}
{%- if loop.first and system is not none %}
{%- set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + content %}
{%- endif %}
{{- bos_token + '[INST] ' + content | trim + ' [/INST]' }}
{%- else %}
{{- ' ' + message['content'] | trim + ' ' + eos_token }}
{%- endif %}
{%- endfor %}"""

_LLAMA3 = r"""
{{- bos_token }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"""

_MISTRAL = r"""
{{- bos_token }}""" + _SPLIT_SYSTEM + _ALTERNATE + r"""
{%- for message in turns %}
{%- if message['role'] == 'user' %}
{%- set content = message['content'] %}
{%- if loop.first and system is not none %}{%- set content = system + '\n\n' + content %}{%- endif %}
{{- '[INST] ' + content + ' [/INST]' }}
{%- else %}
{{- message['content'] + eos_token }}
{%- endif %}
{%- endfor %}"""

_CODELLAMA = _SPLIT_SYSTEM + _ALTERNATE + r"""
{{- bos_token }}
{%- for message in messages %}
{{- 'Source: ' + message['role'] + '\n\n ' + message['content'] | trim + ' <step> ' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- 'Source: assistant\nDestination: user\n\n ' }}{%- endif %}"""

_GEMMA = r"""
{{- bos_token }}""" + _SPLIT_SYSTEM + _ALTERNATE + r"""
{%- for message in turns %}
{%- set content = message['content'] | trim %}
{%- if loop.first and system is not none %}{%- set content = system | trim + '\n\n' + content %}{%- endif %}
{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' + content + '<end_of_turn>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"""

_PHI3 = _only_roles("system", "user", "assistant") + r"""
{%- for message in messages %}
{%- if message['role'] != 'system' or message['content'] %}
{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"""

_ZEPHYR = _only_roles("system", "user", "assistant") + r"""
{%- for message in messages %}
{{- '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"""

_DEEPSEEK_SYSTEM = (
    "You are an AI programming assistant, utilizing the Deepseek Coder model, developed by Deepseek Company, and you "
    "only answer questions related to computer science. For politically sensitive questions, security and privacy "
    "issues, and other non-computer science questions, you will refuse to answer."
)
_DEEPSEEK = _only_roles("system", "user", "assistant") + r"""
{{- bos_token }}
{%- if messages[0]['role'] != 'system' %}{{- '""" + _DEEPSEEK_SYSTEM + r"""\n' }}{%- endif %}
{%- for message in messages %}
{%- if message['role'] == 'system' %}
{{- message['content'] + '\n' }}
{%- elif message['role'] == 'user' %}
{{- '### Instruction:\n' + message['content'] + '\n' }}
{%- else %}
{{- '### Response:\n' + message['content'] + '\n<|EOT|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '### Response:\n' }}{%- endif %}"""

_OPENCHAT = _only_roles("system", "user", "assistant") + r"""
{{- bos_token }}
{%- for message in messages %}
{{- 'GPT4 Correct ' + message['role'] | title + ': ' + message['content'] + '<|end_of_turn|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- 'GPT4 Correct Assistant:' }}{%- endif %}"""

_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_VICUNA = _only_roles("system", "user", "assistant") + r"""
{{- bos_token }}""" + _SPLIT_SYSTEM + r"""
{%- if system is none %}{%- set system = '""" + _VICUNA_SYSTEM.replace("'", "\\'") + r"""' %}{%- endif %}
{%- if system %}{{- system + ' ' }}{%- endif %}
{%- for message in turns %}
{%- if message['role'] == 'user' %}{{- 'USER: ' + message['content'] + ' ' }}
{%- else %}{{- 'ASSISTANT: ' + message['content'] + eos_token }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}"""

_ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
_ALPACA = _only_roles("system", "user", "assistant") + r"""
{{- bos_token }}""" + _SPLIT_SYSTEM + r"""
{%- if system is none %}{%- set system = '""" + _ALPACA_SYSTEM + r"""' %}{%- endif %}
{%- if system %}{{- system + '\n\n' }}{%- endif %}
{%- for message in turns %}
{%- if message['role'] == 'user' %}{{- '### Instruction:\n' + message['content'] + '\n\n' }}
{%- else %}{{- '### Response:\n' + message['content'] + eos_token + '\n\n' }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '### Response:\n' }}{%- endif %}"""

_COHERE = _only_roles("system", "user", "assistant") + r"""
{{- bos_token }}
{%- for message in messages %}
{%- set tag = 'SYSTEM' if message['role'] == 'system' else ('USER' if message['role'] == 'user' else 'CHATBOT') %}
{{- '<|START_OF_TURN_TOKEN|><|' + tag + '_TOKEN|>' + message['content'] | trim + '<|END_OF_TURN_TOKEN|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{%- endif %}"""

_GRANITE = r"""
{%- for message in messages %}
{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"""


@dataclass(frozen=True)
class _Builtin:
    source: str
    stop: tuple[str, ...] = ()
    stop_on_eos: bool = False  # the format ends the model's turn with the EOS token's text
    bos: str | None = None
    eos: str | None = None
    system_role: bool = True
    requires_alternation: bool = False
    encode_special: bool = True


_BUILTINS: dict[str, _Builtin] = {
    "raw": _Builtin(_RAW, encode_special=False),
    "chatml": _Builtin(_CHATML, ("<|im_end|>",)),
    "llama2": _Builtin(_LLAMA2, stop_on_eos=True, bos="<s>", eos="</s>", requires_alternation=True),
    "llama3": _Builtin(_LLAMA3, ("<|eot_id|>", "<|eom_id|>"), bos="<|begin_of_text|>"),
    "mistral": _Builtin(_MISTRAL, stop_on_eos=True, bos="<s>", eos="</s>", requires_alternation=True),
    "codellama": _Builtin(_CODELLAMA, ("<step>",), bos="<s>", requires_alternation=True),
    "gemma": _Builtin(_GEMMA, ("<end_of_turn>",), bos="<bos>", requires_alternation=True),
    "phi3": _Builtin(_PHI3, ("<|end|>", "<|endoftext|>")),
    "zephyr": _Builtin(_ZEPHYR, stop_on_eos=True, eos="</s>"),
    "tinyllama": _Builtin(_ZEPHYR, stop_on_eos=True, eos="</s>"),  # TinyLlama-1.1B-Chat was tuned on Zephyr's format
    "deepseek": _Builtin(_DEEPSEEK, ("<|EOT|>",), bos="<｜begin▁of▁sentence｜>"),  # DeepSeek-Coder instruct
    "openchat": _Builtin(_OPENCHAT, ("<|end_of_turn|>",), bos="<s>"),
    "vicuna": _Builtin(_VICUNA, ("USER:",), stop_on_eos=True, bos="<s>", eos="</s>"),
    "alpaca": _Builtin(_ALPACA, ("### Instruction:",), stop_on_eos=True, bos="<s>", eos="</s>"),
    "cohere": _Builtin(_COHERE, ("<|END_OF_TURN_TOKEN|>",), bos="<BOS_TOKEN>"),
    "granite": _Builtin(_GRANITE, ("<|end_of_text|>",)),
}


def list_templates() -> list[str]:
    """Names of the built-in formats, for `--template NAME`."""
    return sorted(_BUILTINS)


def builtin_template(
    name: str, bos: str | None = None, eos: str | None = None, *, clock: Callable[[], datetime] = datetime.now
) -> ChatTemplate:
    """The built-in format `name`, using the model's BOS/EOS text where given and the family's usual ones otherwise."""
    spec = _BUILTINS.get(name)
    if spec is None:
        raise InvalidRequestError(f"unknown built-in template {name!r}; expected one of {', '.join(list_templates())}")
    bos = spec.bos if bos is None and spec.bos is not None else bos
    eos = spec.eos if eos is None and spec.eos is not None else eos
    stop = list(spec.stop) + ([eos] if spec.stop_on_eos and eos and eos not in spec.stop else [])
    return ChatTemplate(
        spec.source, name=name, bos_token=bos, eos_token=eos, stop_strings=stop, encode_special=spec.encode_special,
        system_role=spec.system_role, requires_alternation=spec.requires_alternation, text_only=True, clock=clock,
    )


def get_template(
    name_or_path_or_jinja_string: str | os.PathLike | None,
    model_template: str | None = None,
    bos: str | None = None,
    eos: str | None = None,
    *,
    clock: Callable[[], datetime] = datetime.now,
) -> ChatTemplate:
    """Resolve `--template`: a built-in name, a path to a .jinja file, a Jinja string, or None for the model's own.

    Args:
        name_or_path_or_jinja_string: what the user asked for; None means "the model's template".
        model_template: the Jinja template the model ships (GGUF `tokenizer.chat_template`), or None.
        bos, eos: the model's BOS/EOS token text, passed to the template as `bos_token`/`eos_token`.
    Raises:
        InvalidRequestError: unknown name, unreadable file, or no template at all.
    """
    spec = name_or_path_or_jinja_string
    if spec is None:
        if not model_template:
            raise InvalidRequestError(
                "this model ships no chat template; choose a format with --template NAME (e.g. --template chatml; "
                f"built-ins: {', '.join(list_templates())}) or --template FILE.jinja"
            )
        return ChatTemplate(model_template, name="model", bos_token=bos, eos_token=eos, clock=clock)
    spec = os.fspath(spec)
    if spec in _BUILTINS:
        return builtin_template(spec, bos, eos, clock=clock)
    if "{{" in spec or "{%" in spec:
        return ChatTemplate(spec, name="custom", bos_token=bos, eos_token=eos, clock=clock)
    path = Path(spec)
    if path.suffix == ".jinja" or path.is_file():
        try:
            source = path.read_text(encoding="utf-8")
        except OSError as e:
            raise InvalidRequestError(f"--template {spec!r}: cannot read the file ({e.strerror})") from None
        return ChatTemplate(source, name=path.stem, bos_token=bos, eos_token=eos, clock=clock)
    raise InvalidRequestError(
        f"unknown template {spec!r}; expected a built-in ({', '.join(list_templates())}), a path to a .jinja file, "
        "or a Jinja template string"
    )
