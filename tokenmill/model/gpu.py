"""The GPU form of the model, a transform applied from outside it: `prepare_gpu_model` turns a loaded Transformer into
its GPU form in place: bf16 (or fp32) on the device, fused q/k/v and gate/up, GGUF 4/8-bit weights kept quantized for
the Triton products (kernels/gpu/quant_linear.py), and layers built on the fused kernels (kernels/gpu/fused.py). Module
names stay, so `Transformer.forward` runs unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from tokenmill.formats.quants import INT4_GROUP_TYPES, QuantizedTensor
from tokenmill.kernels.gpu import matvec_table
from tokenmill.kernels.gpu.fused import add_norm, rmsnorm, rope_qkv, silu_mul
from tokenmill.kernels.gpu.quant_linear import QuantLinear
from tokenmill.model.transformer import MLP, Attention, DecoderLayer, RMSNorm, Transformer

QUANTS = {"bf16": None, "q4g128": (4, 128), "q4g32": (4, 32), "q8": (8, 32)}  # --quant names -> (bits, group)


class GPURMSNorm(nn.Module):
    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight, self.eps, self.pdl = norm.weight, norm.eps, False

    def forward(self, x):
        return rmsnorm(x, self.weight, self.eps, self.pdl)

    def add(self, x: torch.Tensor, p: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h = x + p, RMSNorm(h)) in one launch; p a product or a split-K accumulator."""
        return add_norm(x, p, self.weight, self.eps, self.pdl)


def product(mod: nn.Module, x: torch.Tensor, glu: bool = False, split: bool = True, pdl: bool = False) -> torch.Tensor:
    """x (M, K) -> mod(x) (M, N), or a split-K accumulator that its reader zeroes (QuantLinear.partials);
    glu: x is gate | up (M, 2K) and the input is silu(gate) * up."""
    if isinstance(mod, QuantLinear):
        return mod.product(x, glu, split=split)
    return mod(silu_mul(x, pdl=pdl) if glu else x)


class GPUAttention(nn.Module):
    """Attention: the fused qkv product's partial sums -> one RoPE launch (which also stores k/v into a paged pool
    when the KV view offers it) -> the view's attend -> o_proj's partial sums (added by the next norm)."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = attn.layer, attn.n_heads, attn.n_kv, attn.head_dim
        self.window, self.qkv_proj, self.o_proj = attn.window, attn.qkv_proj, attn.o_proj
        self.pdl = False

    def forward(self, x, cos, sin, kv):
        B, T, C = x.shape
        p = product(self.qkv_proj, x.reshape(B * T, C))
        pool = kv.store_targets(self.layer) if hasattr(kv, "store_targets") else None
        q, k, v = rope_qkv(p.view(B, T, -1), cos, sin, self.n_heads, self.n_kv, self.head_dim, pool, self.pdl)
        t = lambda a: a.transpose(1, 2) if a is not None else None
        out = kv.attend(self.layer, t(q), t(k), t(v), self.window)  # (B, H, T, D)
        return product(self.o_proj, out.transpose(1, 2).reshape(B * T, self.n_heads * self.head_dim))


class GPUMLP(nn.Module):
    def __init__(self, mlp: MLP):
        super().__init__()
        self.gate_up_proj, self.down_proj = mlp.gate_up_proj, mlp.down_proj
        self.pdl = False

    def forward(self, x):
        # x (B, T, C) -> down_proj's output (M, C); up to GLU_ROWS rows silu(gate) * up is computed as down_proj
        # loads gate | up (which is then unsplit), else by silu_mul, which also reads and zeroes a split-K accumulator
        x = x.reshape(-1, x.shape[-1])
        glu = x.shape[0] <= matvec_table.GLU_ROWS
        gu = product(self.gate_up_proj, x, split=not glu)
        if glu:
            return product(self.down_proj, gu, glu=True, pdl=self.pdl)
        return product(self.down_proj, silu_mul(gu, x.dtype, self.pdl))


class GPUDecoderLayer(nn.Module):
    """DecoderLayer whose skip additions ride in the norms: a layer passes on (hidden, down_proj's output, maybe a
    split-K accumulator) and the next layer's input norm adds them (the last layer adds them itself); o_proj's output
    likewise goes to the second norm."""

    def __init__(self, layer: DecoderLayer, last: bool):
        super().__init__()
        self.input_layernorm = GPURMSNorm(layer.input_layernorm)
        self.self_attn = GPUAttention(layer.self_attn)
        self.post_attention_layernorm = GPURMSNorm(layer.post_attention_layernorm)
        self.mlp = GPUMLP(layer.mlp)
        self.last, self.pdl = last, False

    def forward(self, x, cos, sin, kv):
        # x: hidden (B, T, C), or (hidden, the previous layer's down_proj output)
        h, y = self.input_layernorm.add(*(x if isinstance(x, tuple) else (x, None)))
        h, y = self.post_attention_layernorm.add(h, self.self_attn(y, cos, sin, kv))
        p = self.mlp(y)
        return add_norm(h, p, None, pdl=self.pdl)[0] if self.last else (h, p)


def _swap_linears(model: nn.Module, packed: dict[str, QuantizedTensor], quant: tuple[int, int] | None) -> int:
    """GGUF Q4_0/Q4_1/Q4_K/Q8_0 weights repacked exactly; with `quant`, every other linear rounded to it; else dense."""
    from gguf import GGMLQuantizationType as T

    n = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        qt = packed.get(f"{name}.weight")
        if qt is not None and (qt.qtype in INT4_GROUP_TYPES or qt.qtype == T.Q8_0):
            new = QuantLinear.from_gguf(qt, module.bias, device=module.weight.device)
        elif quant is not None:
            new = QuantLinear.quantize(module.weight.data, *quant, bias=module.bias)
        else:
            continue
        model.set_submodule(name, new)
        del module
        n += 1
    return n


@torch.no_grad()
def prepare_gpu_model(model: Transformer, packed: dict[str, QuantizedTensor] | None = None,
                      quant: str | None = None, device: str | torch.device = "cuda",
                      dtype: torch.dtype = torch.bfloat16, pdl: bool = False) -> int:
    """In place: `dtype` (bf16, or fp32) on the current CUDA device, fused qkv / gate-up, quantized linears (GGUF
    4/8-bit repacked; `quant` one of QUANTS rounds the rest), Triton norms / RoPE / SiLU-mul; `pdl`: the decode
    kernels launch with programmatic dependent launch (kernels/gpu/matvec.pdl_supported). Returns how many linears
    are quantized."""
    assert dtype in (torch.bfloat16, torch.float32), dtype  # the activation types the kernels are written for
    packed = dict(packed or {})
    inv_freq = model.inv_freq.float()
    model.to(device=device, dtype=dtype)
    model.inv_freq = inv_freq.to(device)
    model.fuse_projections(packed)
    n = _swap_linears(model, packed, QUANTS[quant] if quant else None)
    body = model.model
    for i, layer in enumerate(body.layers):
        body.layers[i] = GPUDecoderLayer(layer, last=i == len(body.layers) - 1)
    body.norm = GPURMSNorm(body.norm)
    for m in model.modules():
        if isinstance(m, (QuantLinear, GPURMSNorm, GPUAttention, GPUMLP, GPUDecoderLayer)):
            m.pdl = pdl
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return n
