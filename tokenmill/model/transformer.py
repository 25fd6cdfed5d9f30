"""The llama-family transformer (llama, mistral, qwen2) as a pure function of tokens, positions and a KV view.

Module and parameter names equal the HF checkpoint names (`model.layers.0.self_attn.q_proj.weight`), so HF weights load
without a mapping table; the GGUF reader renames its tensors to these names.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.config import ModelConfig
from tokenmill.formats.quants import QuantizedTensor


class KVView(Protocol):
    """What attention needs from a KV cache for one forward (engine/kv_cache.py): store new k/v, attend over the past."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
        """q (B, H, T, D), k/v (B, KV, T, D) for the new tokens -> attention output (B, H, T, D)."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one op instead of six (the per-token host cost on CPU); same formula
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """(D/2,) fp32 inverse frequencies, with llama3/linear scaling or GGUF's per-frequency divisors applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling or {}
    if freq_factors is not None:
        inv = inv / freq_factors.float()
    elif cfg.rope_type == "linear":
        inv = inv / s["factor"]
    elif cfg.rope_type == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv = torch.where(is_mid, mid, scaled)
    return inv


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, T, D); cos/sin (B, 1, T, D); rotate-half convention (HF), halves are (re, im)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = cfg.sliding_window
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.qkv_proj: nn.Module | None = None  # q|k|v rows in one product, once fuse_projections() ran

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, hidden) -> q (B, H, T, D), k/v (B, KV, T, D) with RoPE applied."""
        B, T, _ = x.shape
        H, KV = self.n_heads, self.n_kv
        if self.qkv_proj is not None:  # RoPE on q and k heads together: half the small ops of the decode step
            qkv = self.qkv_proj(x).view(B, T, H + 2 * KV, self.head_dim).transpose(1, 2)
            qk = apply_rope(qkv[:, :H + KV], cos, sin)
            return qk[:, :H], qk[:, H:], qkv[:, H + KV:]
        q = self.q_proj(x).view(B, T, H, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, KV, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, KV, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def output(self, out: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = out.shape  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVView) -> torch.Tensor:
        return self.output(kv.attend(self.layer, *self.project(x, cos, sin), self.window))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up_proj: nn.Module | None = None  # gate|up rows in one product, once fuse_projections() ran

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    # forward in two halves around the KV cache, so model/cpu.py can compile each (one graph for every layer: no
    # per-layer integer inside) and leave the cache's bookkeeping eager
    def pre_attention(self, x, cos, sin):
        return self.self_attn.project(self.input_layernorm(x), cos, sin)

    def post_attention(self, x, attn):
        x = x + self.self_attn.output(attn)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x, cos, sin, kv):
        a = self.self_attn
        return self.post_attention(x, kv.attend(a.layer, *self.pre_attention(x, cos, sin), a.window))


class Body(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # (D/2,) fp32; a buffer so GGUF's rope_freqs can replace it at load time
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def fuse_projections(self, packed: dict[str, QuantizedTensor] | None = None) -> None:
        """Replace q/k/v by one `qkv_proj` and gate/up by one `gate_up_proj` per layer (one product instead of three or
        two: fewer, larger ops). GGUF blocks in `packed` are joined under the fused names when the parts share a type
        (row-wise blocks concatenate exactly), so quantized kernels keep working on fused layers."""
        for i, layer in enumerate(self.model.layers):
            for owner, fused, parts in ((layer.self_attn, "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                                        (layer.mlp, "gate_up_proj", ("gate_proj", "up_proj"))):
                if getattr(owner, fused) is not None:
                    continue
                lins = [getattr(owner, p) for p in parts]
                w = torch.cat([m.weight for m in lins])
                lin = nn.Linear(w.shape[1], w.shape[0], bias=lins[0].bias is not None, device="meta")
                lin.weight = nn.Parameter(w, requires_grad=False)
                if lin.bias is not None:
                    lin.bias = nn.Parameter(torch.cat([m.bias for m in lins]), requires_grad=False)
                setattr(owner, fused, lin)
                for p in parts:
                    delattr(owner, p)
                prefix = f"model.layers.{i}.{'self_attn' if fused == 'qkv_proj' else 'mlp'}"
                qts = [(packed or {}).get(f"{prefix}.{p}.weight") for p in parts]
                if all(qts) and len({qt.qtype for qt in qts}) == 1:
                    packed[f"{prefix}.{fused}.weight"] = QuantizedTensor(
                        qts[0].qtype, (sum(qt.shape[0] for qt in qts), qts[0].shape[1]), torch.cat([qt.data for qt in qts]))

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions (B, T) -> cos/sin (B, 1, T, D), computed in fp32 like the reference
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVView,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions (B, T) -> logits (B, T, V) fp32; or (N, V) at the flattened (B * T) token indices
        `logits_at` (a packed batch samples a few rows only: a prefill chunk needs no per-token logits)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, kv)
        if logits_at is not None:
            x = x.flatten(0, 1)[logits_at]
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head: hidden (..., hidden) -> logits (..., V) fp32."""
        return self.lm_head(self.model.norm(x)).float()
