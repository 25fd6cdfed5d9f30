"""A GGUF model file: metadata, config and tensors under HF names, read memory-mapped.

The header (metadata, tensor list) is parsed here with the gguf package's constants; its GGUFReader makes a numpy view
per string, ~6 s for a 49k-token vocabulary. Every tensor is checked to lie inside the file, start on the alignment
(`general.alignment`) and overlap no other, so a damaged file is refused rather than loaded as wrong weights.

Tensors come out as `QuantizedTensor` (packed blocks, zero-copy) so the loader can dequantize them or a kernel can take
them as they are. Llama-arch GGUF stores attn_q/attn_k rows permuted for interleaved RoPE; the rows are put back in HF
(rotate-half) order here, which moves whole quantized rows and never touches a block.
"""
from __future__ import annotations

import mmap
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from tokenmill.model.config import ModelConfig
from tokenmill.errors import ModelLoadError, UnsupportedError
from tokenmill.formats.quants import QuantizedTensor

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
_SCALARS = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
            GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
            GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}

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


@dataclass(frozen=True)
class TensorInfo:
    name: str  # as in the file (blk.0.attn_q.weight)
    qtype: int  # GGMLQuantizationType value
    shape: tuple[int, ...]  # torch order (GGML lists dimensions the other way round)
    offset: int  # from the start of the tensor data section
    n_bytes: int


class _Header:
    """Reads GGUF's little-endian values from the start of a buffer; a read past its end raises ValueError."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ValueError(f"a field at byte {self.pos:,} runs past the end of the file")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def scalar(self, code: str):
        return struct.unpack("<" + code, self.take(struct.calcsize(code)))[0]

    def string(self) -> str:
        return self.take(self.scalar("Q")).decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item, n = self.scalar("I"), self.scalar("Q")
            if item in _SCALARS:
                dtype = np.dtype("<" + _SCALARS[item])
                return np.frombuffer(self.take(n * dtype.itemsize), dtype).tolist()
            return [self.value(item) for _ in range(n)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype} at byte {self.pos:,}")
        return self.scalar(_SCALARS[vtype])

    def tensor_info(self) -> TensorInfo:
        name, n_dims = self.string(), self.scalar("I")
        dims = [self.scalar("Q") for _ in range(n_dims)]
        raw_type, offset = self.scalar("I"), self.scalar("Q")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
        except ValueError:
            raise UnsupportedError(f"tensor {name!r} has GGML type {raw_type}, which this gguf package does not "
                                   "know; update gguf or convert the model again") from None
        n = int(np.prod(dims, dtype=object))
        if n_dims > 4 or n % block:
            raise ValueError(f"tensor {name!r} has shape {dims[::-1]}, not whole blocks of {block} elements")
        return TensorInfo(name, raw_type, tuple(dims[::-1]), offset, n // block * type_size)


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if magic == GGUF_MAGIC else None
        except OSError as e:
            raise ModelLoadError(f"cannot read model file {self.path}: {e.strerror}") from None
        if magic != GGUF_MAGIC:
            raise ModelLoadError(f"{self.path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
        try:
            self.metadata, self.infos, header_end = self._read_header()
        except ValueError as e:  # a short read, bad UTF-8, an unknown value type
            raise ModelLoadError(f"{self.path} is not a valid GGUF file (truncated or damaged: {e})") from None
        self.alignment = self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if type(self.alignment) is not int or self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise ModelLoadError(f"{self.path} is damaged: general.alignment must be a power of two, "
                                 f"got {self.alignment!r}")
        self.data_start = -(-header_end // self.alignment) * self.alignment
        self._check_layout()
        self.raw_names = {t.name for t in self.infos}
        self.config = ModelConfig.from_gguf(self.metadata, self.raw_names)

    def _read_header(self) -> tuple[dict[str, Any], list[TensorInfo], int]:
        h = _Header(self._map)
        h.take(4)
        version = h.scalar("I")
        if version not in SUPPORTED_VERSIONS:
            order = " (a big-endian file)" if version & 0xFFFF == 0 else ""
            raise UnsupportedError(f"{self.path}: GGUF version {version}{order} is not supported; supported: "
                                   f"{', '.join(map(str, SUPPORTED_VERSIONS))} (little-endian)")
        n_tensors, n_keys = h.scalar("Q"), h.scalar("Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_keys):
            key = h.string()
            if key in metadata:
                raise ValueError(f"metadata key {key!r} appears twice")
            metadata[key] = h.value(h.scalar("I"))
        infos = [h.tensor_info() for _ in range(n_tensors)]
        if len({t.name for t in infos}) < len(infos):
            raise ValueError("a tensor name appears twice")
        return metadata, infos, h.pos

    def _check_layout(self):
        # a shifted offset would read plausible but wrong weights
        size, end, last, data_start = len(self._map), 0, None, self.data_start
        for t in sorted(self.infos, key=lambda t: t.offset):
            if t.offset % self.alignment:
                raise ModelLoadError(
                    f"{self.path} is damaged: tensor {t.name} starts at data offset {t.offset:,}, not a multiple of "
                    f"the file's alignment {self.alignment} (general.alignment)")
            if t.offset < end:
                raise ModelLoadError(f"{self.path} is damaged: tensor {t.name} (at data offset {t.offset:,}) overlaps "
                                     f"tensor {last} (which ends at {end:,})")
            end, last = t.offset + t.n_bytes, t.name
            if data_start + end > size:
                raise ModelLoadError(f"{self.path} is truncated: tensor {t.name} ends at byte {data_start + end:,}, "
                                     f"the file has {size:,}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> shape of every tensor, from the header alone (no data is read)."""
        return {self._hf_name(t.name): t.shape for t in self.infos}

    def _hf_name(self, name: str) -> str:
        hf = hf_name(name)
        if hf is None:
            raise UnsupportedError(f"{self.path}: unexpected tensor {name!r} for architecture {self.config.architecture}")
        return hf

    def tensors(self) -> Iterator[tuple[str, QuantizedTensor]]:
        """(HF name, packed tensor) for every tensor the model uses, q/k rows in HF order."""
        cfg = self.config
        for t in self.infos:
            name, shape = self._hf_name(t.name), t.shape
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the map is read-only; we never write through it
                data = np.frombuffer(self._map, np.uint8, t.n_bytes, self.data_start + t.offset)
                data = torch.from_numpy(data.reshape(max(1, int(np.prod(shape[:-1]))), -1))
            if cfg.architecture == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
                heads = cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads
                if len(shape) == 1:  # a bias: one row of n values -> permute elements
                    data = data.view(-1, data.shape[1] // shape[0])[unpermute_rows(heads, shape[0])].reshape(1, -1)
                else:
                    data = data[unpermute_rows(heads, shape[0])]
            yield name, QuantizedTensor(t.qtype, shape, data)
