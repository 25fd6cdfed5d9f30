"""GGUF tensor types: packed blocks as stored in the file, and vectorised torch dequantization.

Each decoder maps uint8 blocks (n, bytes_per_block) to float32 (n, elems_per_block). The math is float32 with
the same rounding order as the GGML reference, so results are bit-identical to it.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
from gguf import GGMLQuantizationType as T

from tokenmill.errors import ModelLoadError, UnsupportedError

_QK_K = 256  # elements per K-quant super-block

# (elements per block, bytes per block)
_BLOCKS: dict[T, tuple[int, int]] = {
    T.F32: (1, 4),
    T.F16: (1, 2),
    T.BF16: (1, 2),
    T.Q8_0: (32, 2 + 32),
    T.Q4_0: (32, 2 + 16),
    T.Q4_1: (32, 2 + 2 + 16),
    T.Q5_0: (32, 2 + 4 + 16),
    T.Q5_1: (32, 2 + 2 + 4 + 16),
    T.Q4_K: (_QK_K, 2 + 2 + 12 + 128),
    T.Q5_K: (_QK_K, 2 + 2 + 12 + 32 + 128),
    T.Q6_K: (_QK_K, 128 + 64 + 16 + 2),
}
SUPPORTED_TYPES: frozenset[T] = frozenset(_BLOCKS)

_CHUNK_ELEMS = 1 << 20  # decode this many elements at a time: bounds temporaries to a few MiB


def _check_type(qtype) -> T:
    try:
        qtype = T(qtype)
    except ValueError:
        pass
    if qtype not in SUPPORTED_TYPES:
        name = getattr(qtype, "name", repr(qtype))
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise UnsupportedError(f"GGUF tensor type {name} is not supported; supported types: {supported}")
    return qtype


def block_size(qtype) -> tuple[int, int]:
    """(elements per block, bytes per block) of a supported GGML type."""
    return _BLOCKS[_check_type(qtype)]


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 little-endian half -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, dim: int) -> torch.Tensor:
    """Split bytes into (low, high) 4-bit values stacked at `dim`."""
    return torch.stack([qs & 0x0F, qs >> 4], dim=dim)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, k, 8) bits, least significant first."""
    return (b.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=b.device)) & 1


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes -> eight 6-bit scales and eight 6-bit mins, each (n, 8).

    Bytes 0-3 hold scales 0-3 (low 6 bits) and bits 4-5 of scales 4-7 (top 2 bits); bytes 4-7 likewise for mins;
    bytes 8-11 hold the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble).
    """
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([a & 63, (c & 0x0F) | ((a >> 6) << 4)], dim=1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


def _f32(b):
    return b.contiguous().view(torch.float32)


def _bf16(b):
    return b.contiguous().view(torch.bfloat16).float()


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, 0:2])


def _q4_0(b):
    q = _nibbles(b[:, 2:], dim=1).flatten(1)  # (n, 32): low nibbles are elements 0-15, high 16-31
    return (q.float() - 8) * _f16(b[:, 0:2])


def _q4_1(b):
    q = _nibbles(b[:, 4:], dim=1).flatten(1)
    return q.float() * _f16(b[:, 0:2]) + _f16(b[:, 2:4])


def _q5_0(b):
    q = _nibbles(b[:, 6:], dim=1).flatten(1) | (_bits(b[:, 2:6]).flatten(1) << 4)  # qh is a little-endian u32
    return (q.float() - 16) * _f16(b[:, 0:2])


def _q5_1(b):
    q = _nibbles(b[:, 8:], dim=1).flatten(1) | (_bits(b[:, 4:8]).flatten(1) << 4)
    return q.float() * _f16(b[:, 0:2]) + _f16(b[:, 2:4])


def _q4_k(b):
    # 8 sub-blocks of 32; qs chunk i (32 bytes) holds sub-block 2i in low nibbles, 2i+1 in high.
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    q = _nibbles(b[:, 16:].reshape(n, 4, 32), dim=2).reshape(n, 8, 32)
    y = (_f16(b[:, 0:2]) * sc).unsqueeze(-1) * q.float() - (_f16(b[:, 2:4]) * mn).unsqueeze(-1)
    return y.reshape(n, _QK_K)


def _q5_k(b):
    # As Q4_K, plus a 5th bit for sub-block j in bit j of qh[l].
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    lo = _nibbles(b[:, 48:].reshape(n, 4, 32), dim=2).reshape(n, 8, 32)
    hi = _bits(b[:, 16:48]).transpose(1, 2)  # (n, 8, 32)
    q = lo | (hi << 4)
    y = (_f16(b[:, 0:2]) * sc).unsqueeze(-1) * q.float() - (_f16(b[:, 2:4]) * mn).unsqueeze(-1)
    return y.reshape(n, _QK_K)


def _q6_k(b):
    # Two halves of 128 = 4 groups of 32. Group g = 2*nibble + row: low bits from ql[row*32 + l] (that nibble),
    # high 2 bits from qh[l] >> 2g. One int8 scale per 16 elements.
    n = b.shape[0]
    lo = _nibbles(b[:, :128].reshape(n, 2, 2, 32), dim=2).reshape(n, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    hi = (b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3
    q = (lo | (hi << 4)).reshape(n, 16, 16).float() - 32
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    return ((_f16(b[:, 208:210]) * sc).unsqueeze(-1) * q).reshape(n, _QK_K)


INT4_GROUP_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q4_K})


def int4_groups(qt: "QuantizedTensor") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Repack a Q4_0 / Q4_1 / Q4_K weight (N, K) as 4-bit groups of 32 without re-quantizing:
    q (N, K) uint8 in [0, 15], scale and min (N, K / 32) float32, with w = q * scale + min exactly."""
    if qt.qtype not in INT4_GROUP_TYPES:
        raise UnsupportedError(f"{qt.qtype.name} does not map to 4-bit groups; supported: Q4_0, Q4_1, Q4_K")
    n_out = qt.shape[0]
    b = qt.data.reshape(-1, _BLOCKS[qt.qtype][1])
    if qt.qtype == T.Q4_K:
        n = b.shape[0]
        sc, mn = _k_scales(b[:, 4:16])
        q = _nibbles(b[:, 16:].reshape(n, 4, 32), dim=2).reshape(n, 8, 32)
        scale, mins = _f16(b[:, 0:2]) * sc, -(_f16(b[:, 2:4]) * mn)  # (n, 8)
    else:
        off = 2 if qt.qtype == T.Q4_0 else 4
        q = _nibbles(b[:, off:], dim=1).flatten(1)  # (n, 32)
        scale = _f16(b[:, 0:2])
        mins = -8 * scale if qt.qtype == T.Q4_0 else _f16(b[:, 2:4])
    return q.reshape(n_out, -1), scale.reshape(n_out, -1), mins.reshape(n_out, -1)


_DECODERS: dict[T, Callable[[torch.Tensor], torch.Tensor]] = {
    T.F32: _f32, T.F16: _f16, T.BF16: _bf16, T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1,
    T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}


def dequantize(data: torch.Tensor, qtype, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode GGUF tensor bytes into a dense tensor.

    Args:
        data: the tensor's bytes, uint8 (rows, bytes_per_row) as GGUFReader gives them (any dtype is
            reinterpreted as its bytes, so typed F32/F16 arrays work too). Any device; the result is on it.
        qtype: a GGMLQuantizationType (or its int value) from SUPPORTED_TYPES.
        shape: logical shape in torch order, e.g. (out_features, in_features).
        dtype: result dtype; decoding is float32, then cast.

    Returns:
        A new tensor of `shape` and `dtype`.
    """
    qtype = _check_type(qtype)
    shape = tuple(int(s) for s in shape)
    elems, nbytes = _BLOCKS[qtype]
    numel = math.prod(shape)
    if shape and shape[-1] % elems:
        raise ModelLoadError(f"{qtype.name} tensor of shape {shape}: last dim must be a multiple of {elems}")
    if data.dtype != torch.uint8:
        data = data.contiguous().view(torch.uint8)
    n_blocks = numel // elems
    if data.numel() != n_blocks * nbytes:
        raise ModelLoadError(
            f"{qtype.name} tensor of shape {shape} needs {n_blocks * nbytes} bytes, got {data.numel()}")
    blocks = data.reshape(n_blocks, nbytes)
    out = torch.empty(n_blocks, elems, dtype=dtype, device=data.device)
    step = max(1, _CHUNK_ELEMS // elems)
    decode = _DECODERS[qtype]
    for i in range(0, n_blocks, step):
        out[i:i + step] = decode(blocks[i:i + step]).reshape(-1, elems)
    return out.reshape(shape)


@dataclass(frozen=True)
class QuantizedTensor:
    """Packed GGUF blocks kept as they are in the file, so GPU/CPU kernels can use them without dequantizing."""

    qtype: T
    shape: tuple[int, ...]  # logical shape in torch order, e.g. (out_features, in_features)
    data: torch.Tensor  # uint8 (rows, bytes_per_row), rows = prod(shape[:-1]); may be a zero-copy view of an mmap

    def __post_init__(self):
        qtype = _check_type(self.qtype)
        object.__setattr__(self, "qtype", qtype)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        elems, nbytes = _BLOCKS[qtype]
        rows, cols = math.prod(self.shape[:-1]), self.shape[-1] if self.shape else 1
        want = (rows, cols // elems * nbytes)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != want or cols % elems:
            raise ModelLoadError(f"{qtype.name} tensor of shape {self.shape} needs uint8 data of shape {want}, "
                                 f"got {self.data.dtype} {tuple(self.data.shape)}")

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense tensor of `shape` and `dtype`, on the device of `data`."""
        return dequantize(self.data, self.qtype, self.shape, dtype)
