"""A GGUF model file: metadata, config and tensors under HF names, read memory-mapped through gguf's GGUFReader.

Tensors come out as `QuantizedTensor` (packed blocks, zero-copy where possible) so the loader can dequantize them or a
kernel can take them as they are. Llama-arch GGUF stores attn_q/attn_k rows permuted for interleaved RoPE; the rows are
put back in HF (rotate-half) order here, which moves whole quantized rows and never touches a block.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from tokenmill.model.config import ModelConfig
from tokenmill.errors import ModelLoadError, UnsupportedError
from tokenmill.formats.quants import QuantizedTensor

GGUF_MAGIC = b"GGUF"

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",  # per-frequency divisors (Llama-3.1 rope scaling)
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def unpermute_rows(n_heads: int, n_rows: int) -> torch.Tensor:
    """Row order that turns GGUF's interleaved-RoPE q/k rows (head, D/2, 2) back into HF's (head, 2, D/2)."""
    return torch.arange(n_rows).view(n_heads, n_rows // n_heads // 2, 2).transpose(1, 2).reshape(-1)


class GGUFFile:
    def __init__(self, path: str | Path):
        from gguf import GGUFReader  # imported here: the package is slow to import and only GGUF needs it

        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise ModelLoadError(f"cannot read model file {self.path}: {e.strerror}") from None
        if magic != GGUF_MAGIC:
            raise ModelLoadError(f"{self.path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
        try:
            self.reader = GGUFReader(self.path, "r")
            self.metadata: dict[str, Any] = {k: f.contents() for k, f in self.reader.fields.items()}
        except Exception as e:  # gguf raises ValueError/IndexError/struct errors on damaged files
            raise ModelLoadError(f"{self.path} is not a valid GGUF file (truncated or damaged: {e})") from None
        self.raw_names = {t.name for t in self.reader.tensors}
        self.config = ModelConfig.from_gguf(self.metadata, self.raw_names)
        self._check_sizes()

    def _check_sizes(self):
        # GGUFReader maps tensors lazily; a truncated file shows up as a tensor ending past the end of the file
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ModelLoadError(
                    f"{self.path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes:,}, "
                    f"the file has {size:,}"
                )

    def tensors(self) -> Iterator[tuple[str, QuantizedTensor]]:
        """(HF name, packed tensor) for every tensor the model uses, q/k rows in HF order."""
        cfg = self.config
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is None:
                raise UnsupportedError(f"{self.path}: unexpected tensor {t.name!r} for architecture {cfg.architecture}")
            shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGML order is reversed torch order
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the memmap is read-only; we never write through it
                data = torch.from_numpy(np.asarray(t.data).view(np.uint8).reshape(max(1, int(np.prod(shape[:-1]))), -1))
            if cfg.architecture == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
                heads = cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads
                if len(shape) == 1:  # a bias: one row of n values -> permute elements
                    data = data.view(-1, data.shape[1] // shape[0])[unpermute_rows(heads, shape[0])].reshape(1, -1)
                else:
                    data = data[unpermute_rows(heads, shape[0])]
            yield name, QuantizedTensor(t.tensor_type, shape, data)
