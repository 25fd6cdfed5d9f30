"""Sampling parameters for one request: a validated dataclass, named presets and dict conversion."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from tokenmill.errors import InvalidRequestError

_INF = math.inf

# name: (low, high, low_open, high_open) for the numeric fields; bounds checked in __post_init__.
_FLOAT_RANGES = {
    "temperature": (0.0, _INF, False, True),
    "top_p": (0.0, 1.0, True, False),
    "min_p": (0.0, 1.0, False, False),
    "typical_p": (0.0, 1.0, True, False),
    "tfs": (0.0, 1.0, True, False),
    "top_a": (0.0, 1.0, False, False),
    "repetition_penalty": (0.0, _INF, True, True),
    "frequency_penalty": (-2.0, 2.0, False, False),
    "presence_penalty": (-2.0, 2.0, False, False),
    "dry_multiplier": (0.0, _INF, False, True),
    "dry_base": (1.0, _INF, False, True),
    "xtc_probability": (0.0, 1.0, False, False),
    "xtc_threshold": (0.0, 1.0, False, False),
    "mirostat_tau": (0.0, _INF, False, True),
    "mirostat_eta": (0.0, 1.0, True, False),
    "smoothing_factor": (0.0, _INF, False, True),
    "dynatemp_min": (0.0, _INF, False, True),
    "dynatemp_max": (0.0, _INF, False, True),
    "dynatemp_exponent": (0.0, _INF, True, True),
    "skew": (-10.0, 10.0, False, False),
}
_INT_RANGES = {
    "top_k": (0, None),
    "repetition_range": (0, None),
    "repetition_decay": (0, None),
    "dry_allowed_length": (1, None),
    "dry_range": (0, None),
    "min_new_tokens": (0, None),
    "max_new_tokens": (1, None),
    "top_logprobs": (0, 20),
}
ALIASES = {
    "max_tokens": "max_new_tokens",
    "min_tokens": "min_new_tokens",
    "token_repetition_penalty": "repetition_penalty",
    "repeat_penalty": "repetition_penalty",
    "token_repetition_range": "repetition_range",
    "token_repetition_decay": "repetition_decay",
    "token_frequency_penalty": "frequency_penalty",
    "token_presence_penalty": "presence_penalty",
    "typical": "typical_p",
    "mirostat": "mirostat_mode",
}


def _interval(lo, hi, lo_open, hi_open) -> str:
    fmt = lambda v: "inf" if v == _INF else "-inf" if v == -_INF else f"{v:g}"
    return f"{'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}{')' if hi_open else ']'}"


def _token_list(name: str, value) -> list[int]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise InvalidRequestError(f"{name} must be a list of token ids, got {value!r}")
    out = list(value)
    for t in out:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise InvalidRequestError(f"{name} must hold token ids >= 0, got {t!r}")
    return out


def _string_list(name: str, value) -> list[str]:
    if isinstance(value, str):
        value = [value]  # OpenAI accepts a single stop string
    if not hasattr(value, "__iter__"):
        raise InvalidRequestError(f"{name} must be a list of strings, got {value!r}")
    out = list(value)
    for s in out:
        if not isinstance(s, str) or not s:
            raise InvalidRequestError(f"{name} must hold non-empty strings, got {s!r}")
    return out


@dataclass
class SamplingParams:
    """How to pick each next token of one request. Every filter's default leaves it off.

    temperature 0 means greedy. Penalties follow ExLlamaV2 (repetition, with range and decay) and OpenAI
    (frequency/presence, output tokens only); see tokenmill.sampling.sampler for the order the steps run in.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    tfs: float = 1.0
    top_a: float = 0.0
    repetition_penalty: float = 1.0
    repetition_range: int = 0  # 0: whole history, else the last N tokens
    repetition_decay: int = 0  # tokens beyond the range over which the penalty fades out
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_range: int = 0
    dry_sequence_breakers: list[str] = field(default_factory=lambda: ["\n", ":", '"', "*"])
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    smoothing_factor: float = 0.0
    dynatemp_min: float = 1.0
    dynatemp_max: float = 1.0
    dynatemp_exponent: float = 1.0
    temperature_last: bool = False
    skew: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    disallowed_tokens: list[int] = field(default_factory=list)
    allowed_tokens: list[int] | None = None
    min_new_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    banned_strings: list[str] = field(default_factory=list)
    max_new_tokens: int = 256
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        for name, (lo, hi, lo_open, hi_open) in _FLOAT_RANGES.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InvalidRequestError(f"{name} must be a number, got {v!r}")
            v = float(v)
            inside = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
            if not inside or math.isnan(v):
                raise InvalidRequestError(f"{name} must be in {_interval(lo, hi, lo_open, hi_open)}, got {v:g}")
            setattr(self, name, v)
        for name, (lo, hi) in _INT_RANGES.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise InvalidRequestError(f"{name} must be an integer, got {v!r}")
            if v < lo or (hi is not None and v > hi):
                raise InvalidRequestError(f"{name} must be in [{lo}, {'inf)' if hi is None else f'{hi}]'}, got {v}")
        for name in ("temperature_last", "ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if type(self.mirostat_mode) is not int or self.mirostat_mode not in (0, 2):
            raise InvalidRequestError(f"mirostat_mode must be 0 (off) or 2, got {self.mirostat_mode!r}")
        if self.dynatemp_max < self.dynatemp_min:
            raise InvalidRequestError(
                f"dynatemp_max must be >= dynatemp_min ({self.dynatemp_min:g}), got {self.dynatemp_max:g}")
        if self.min_new_tokens > self.max_new_tokens:
            raise InvalidRequestError(
                f"min_new_tokens must be <= max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError(f"top_logprobs needs logprobs=True, got top_logprobs={self.top_logprobs}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise InvalidRequestError(f"seed must be None or an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.logit_bias, dict):
            raise InvalidRequestError(f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}")
        bias = {}
        for k, v in self.logit_bias.items():
            tok = int(k) if isinstance(k, str) and k.isdigit() else k  # JSON object keys arrive as strings
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise InvalidRequestError(f"logit_bias keys must be token ids >= 0, got {k!r}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v == _INF:
                raise InvalidRequestError(f"logit_bias[{tok}] must be a finite number or -inf, got {v!r}")
            bias[tok] = float(v)
        self.logit_bias = bias
        self.disallowed_tokens = _token_list("disallowed_tokens", self.disallowed_tokens)
        self.stop_token_ids = _token_list("stop_token_ids", self.stop_token_ids)
        if self.allowed_tokens is not None:
            self.allowed_tokens = _token_list("allowed_tokens", self.allowed_tokens)
            if not self.allowed_tokens:
                raise InvalidRequestError("allowed_tokens must be None or a non-empty list, got []")
        self.stop = _string_list("stop", self.stop)
        self.banned_strings = _string_list("banned_strings", self.banned_strings)
        self.dry_sequence_breakers = _string_list("dry_sequence_breakers", self.dry_sequence_breakers)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def preset(cls, name: str, **overrides) -> SamplingParams:
        """A named preset (see PRESETS), with any field overridden by keyword."""
        if name not in PRESETS:
            raise InvalidRequestError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        """Build from a request dict. Accepts the aliases in ALIASES; unknown keys raise InvalidRequestError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in ALIASES)
        if unknown:
            raise InvalidRequestError(f"unknown sampling parameter(s): {', '.join(map(str, unknown))}")
        kwargs = {}
        for k, v in d.items():
            name = ALIASES.get(k, k)
            if name in kwargs:
                raise InvalidRequestError(f"{name} given twice (as {name!r} and an alias), got {k!r}")
            kwargs[name] = v
        if isinstance(kwargs.get("mirostat_mode"), bool):  # the "mirostat" alias may be ExLlamaV2's boolean
            kwargs["mirostat_mode"] = 2 if kwargs["mirostat_mode"] else 0
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# exllama-default: ExLlamaV2Sampler.Settings defaults (exllamav2/generator/sampler.py, current upstream):
# temperature 0.8, top_k 50, top_p 0.8, token_repetition_penalty 1.025 (1.05 in early releases), all else off.
PRESETS: dict[str, dict] = {
    "greedy": {"temperature": 0.0},
    "exllama-default": {"temperature": 0.8, "top_k": 50, "top_p": 0.8, "repetition_penalty": 1.025},
    "creative": {"temperature": 1.0, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.05},
    "precise": {"temperature": 0.3, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.05},
}
