"""The CPU form of the model, a transform applied from outside it (model/gpu.py is the GPU's): q/k/v and gate/up fused
(exact), GGUF Q4_0 / Q4_1 / Q8_0 weights kept as their blocks for our AVX-512 kernels (exact fp32, or int8
activations with `int4`), torch's int4 CPU kernel for what those don't take (`int4`: Q4_K, or everything where our
kernels did not build), and with `compile` each layer's two halves around attention and the head compiled.

The linears themselves live in kernels/cpu/linear.py, each with its PyTorch reference; this module only decides which
module replaces which.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType
from torch import nn

from tokenmill.errors import UnsupportedError
from tokenmill.formats.quants import INT4_GROUP_TYPES, QuantizedTensor
from tokenmill.kernels.cpu.linear import (BLOCK_TYPES, GROUP, BlockLinear, Int4Linear, Q8Linear, block_kernels,
                                          has_int4_cpu_kernel)
from tokenmill.model.transformer import DecoderLayer, Transformer


@dataclass
class CPUForm:
    """What prepare_cpu_model did: linears on our block kernels, on int4 kernels (either), and whether compiled."""

    block_layers: int = 0
    int4_layers: int = 0
    compiled: bool = False


def prepare_cpu_model(model: Transformer, packed: dict[str, QuantizedTensor], *, int4: bool = False,
                      compile: bool = False, kernels: bool = True) -> CPUForm:
    """In place. kernels=False keeps every product in PyTorch (the reference paths)."""
    model.fuse_projections(packed)
    form = CPUForm()
    if kernels and block_kernels() is not None:
        form.block_layers = use_block_linears(model, packed, int8=int4)
        form.int4_layers = sum(isinstance(m, BlockLinear) and m.int8 and m.qt.qtype in INT4_GROUP_TYPES
                               for m in model.modules())
    if int4 and has_int4_cpu_kernel():  # what the block kernels don't take (Q4_K), or all without them
        form.int4_layers += pack_int4_linears(model, packed)
    if compile:
        compile_layers(model, packed)
        form.compiled = True
    return form


def use_block_linears(model: nn.Module, packed: dict[str, QuantizedTensor], int8: bool = False) -> int:
    """Swap every nn.Linear whose GGUF weight is Q4_0 / Q4_1 / Q8_0 for a BlockLinear (int8 activations when `int8`),
    and a tied lm_head for one over the embedding's blocks. Returns how many were swapped."""
    n = 0
    embed = packed.get("model.embed_tokens.weight")
    for name, module in list(model.named_modules()):
        if isinstance(module, BlockLinear):  # a second runner over the same loaded model
            if module.int8 != int8:
                raise UnsupportedError(f"this loaded model's layers were prepared with int4={module.int8}; load the "
                                       f"model again for int4={int8}")
            n += 1
            continue
        if not isinstance(module, nn.Linear):
            continue
        qt = packed.get(f"{name}.weight")
        if qt is None and name == "lm_head" and embed is not None and (
                module.weight.data_ptr() == model.get_submodule("model.embed_tokens").weight.data_ptr()):
            qt = embed  # tied: the embedding's blocks
        if qt is None or qt.qtype not in BLOCK_TYPES or qt.shape != tuple(module.weight.shape):
            continue
        model.set_submodule(name, BlockLinear(qt, module.bias, module.weight.data, int8=int8))
        n += 1
    return n


def pack_int4_linears(model: nn.Module, packed: dict[str, QuantizedTensor], keep_dense: bool = True) -> int:
    """Swap every nn.Linear whose GGUF weight is 4-bit for an Int4Linear (torch's int4 CPU kernel), keeping the dense
    weight for prefill when `keep_dense`. Returns how many were swapped."""
    n = 0
    for name, module in list(model.named_modules()):
        qt = packed.get(f"{name}.weight")
        if not isinstance(module, nn.Linear) or qt is None or qt.qtype not in INT4_GROUP_TYPES:
            continue
        if module.in_features % GROUP:
            continue
        model.set_submodule(name, Int4Linear.from_quantized(qt, module.bias, module.weight.data if keep_dense else None))
        n += 1
    return n


class CompiledLayer(nn.Module):
    """A DecoderLayer whose two halves around attention run as compiled graphs (one graph for every layer: the layer
    is an argument, not a constant); the KV cache's bookkeeping between them stays eager."""

    def __init__(self, layer: DecoderLayer, pre, post):
        super().__init__()
        self.layer, self.pre, self.post = layer, pre, post

    def forward(self, x, cos, sin, kv):
        a = self.layer.self_attn
        return self.post(self.layer, x, kv.attend(a.layer, *self.pre(self.layer, x, cos, sin), a.window))


def compile_layers(model: Transformer, packed: dict[str, QuantizedTensor]) -> None:
    """torch.compile (inductor, C++) the code around attention and the head: fuses the small elementwise ops (norms,
    RoPE, SiLU * up, residuals) and cuts the per-op host cost that dominates decode of a small model. Compilation
    happens on the first calls, cached on disk by inductor for later processes. A Q8_0 lm_head becomes a Q8Linear
    (int8 blocks, exact up to summation order), which only pays compiled."""
    # (guards on the modules stay: dynamo's cache is per code object, shared by every model in the process, and
    # another model's layers may hold other module types)
    layers = model.model.layers
    if isinstance(layers[0], CompiledLayer):  # a second runner over the same loaded model
        return
    pre = torch.compile(DecoderLayer.pre_attention, dynamic=True)
    post = torch.compile(DecoderLayer.post_attention, dynamic=True)
    for i, layer in enumerate(layers):
        layers[i] = CompiledLayer(layer, pre, post)
    tied = model.config.tie_word_embeddings or "lm_head.weight" not in packed
    qt = packed.get("model.embed_tokens.weight" if tied else "lm_head.weight")
    if (qt is not None and qt.qtype == GGMLQuantizationType.Q8_0 and isinstance(model.lm_head, nn.Linear)
            and model.lm_head.in_features % GROUP == 0):
        model.lm_head = Q8Linear(qt, model.lm_head.weight)
    model.model.norm = torch.compile(model.model.norm, dynamic=True)
    model.lm_head = torch.compile(model.lm_head, dynamic=True)
