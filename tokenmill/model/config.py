"""Model configuration: one dataclass for the llama family (llama, mistral, qwen2), read from HF config.json or GGUF metadata."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenmill.errors import ModelLoadError, UnsupportedError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (qwen2)
    mlp_bias: bool = False
    sliding_window: int | None = None  # mistral: a token attends to at most this many keys (itself included)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.head_dim <= 0:
            self.head_dim = self.hidden_size // self.num_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"model config: {name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"model config: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedError(
                f"unsupported rope scaling {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            self.sliding_window = None

    @property
    def rope_type(self) -> str:
        s = self.rope_scaling or {}
        return s.get("rope_type", s.get("type", "default"))

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        arch = d.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            found = arch or (d.get("architectures") or ["<none>"])[0]
            raise UnsupportedError(
                f"unsupported architecture {found!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            window = d.get("sliding_window")
            if arch == "qwen2" and not d.get("use_sliding_window", False):
                window = None
            return cls(
                architecture=arch,
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_layers=d["num_hidden_layers"],
                num_heads=d["num_attention_heads"],
                num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                head_dim=d.get("head_dim") or 0,
                rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                rope_theta=d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta", 10000.0),
                rope_scaling=_hf_rope_scaling(d),
                max_position_embeddings=d.get("max_position_embeddings", 4096),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=arch == "qwen2" or bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)),
                sliding_window=window if arch != "llama" else None,
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json is missing the field {e.args[0]!r}") from None

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], tensor_names: set[str]) -> "ModelConfig":
        arch = meta.get("general.architecture")
        if arch not in ("llama", "qwen2"):
            raise UnsupportedError(
                f"unsupported GGUF architecture {arch!r}; supported: llama (incl. mistral), qwen2"
            )

        def get(key, default=None, required=True):
            full = f"{arch}.{key}"
            if full in meta:
                return meta[full]
            if required and default is None:
                raise ModelLoadError(f"GGUF metadata is missing {full!r}")
            return default

        n_heads = get("attention.head_count")
        n_kv = get("attention.head_count_kv", n_heads)
        hidden = get("embedding_length")
        vocab = get("vocab_size", 0, required=False) or len(meta.get("tokenizer.ggml.tokens", []))
        head_dim = get("attention.key_length", 0, required=False) or get("rope.dimension_count", 0, required=False)
        scaling = None
        scale_type = get("rope.scaling.type", "", required=False)
        if scale_type == "linear":
            scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
        elif scale_type not in ("", "none"):
            raise UnsupportedError(f"unsupported GGUF rope scaling {scale_type!r}; supported: none, linear")
        return cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_layers=get("block_count"),
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=head_dim or hidden // n_heads,
            rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, required=False),
            rope_theta=get("rope.freq_base", 10000.0, required=False),
            rope_scaling=scaling,
            max_position_embeddings=get("context_length", 4096, required=False),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            sliding_window=get("attention.sliding_window", 0, required=False) or None,
        )


def _hf_rope_scaling(d: dict[str, Any]) -> dict[str, Any] | None:
    # transformers 5 moved rope settings into `rope_parameters`; older configs use `rope_scaling`
    s = d.get("rope_scaling") or d.get("rope_parameters")
    if not s:
        return None
    s = dict(s)
    if s.get("rope_type", s.get("type", "default")) == "default":
        return None
    return s
