"""4-bit repacking (exact vs gguf-py's dequantizer), the int4 CPU linear (vs the plain PyTorch reference), the Q8_0
block linear (vs gguf-py's dequantized weight) and our AVX-512 block kernels (vs gguf-py's dequantized weight)."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from tests.test_quants import random_bytes
from tokenmill.errors import UnsupportedError
from tokenmill.kernels.cpu.linear import BlockLinear, Int4Linear, Q8Linear, block_kernels, has_int4_cpu_kernel, reference
from tokenmill.formats.quants import QuantizedTensor, int4_groups

N, K = 48, 512


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K])
def test_int4_groups_repack_exactly(qtype):
    raw = random_bytes(qtype, N, K, seed=5)
    q, scale, mins = int4_groups(QuantizedTensor(qtype, (N, K), torch.from_numpy(raw)))
    assert q.shape == (N, K) and int(q.max()) <= 15 and scale.shape == mins.shape == (N, K // 32)
    w = q.float() * scale.repeat_interleave(32, 1) + mins.repeat_interleave(32, 1)
    expected = torch.from_numpy(gq.dequantize(raw, qtype).reshape(N, K))
    # Q4_K's reference computes (d*sc)*q - (dmin*m) in one expression: equal up to fp32 rounding of the order
    assert torch.allclose(w, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_int4_groups_rejects_other_types():
    with pytest.raises(UnsupportedError, match="Q8_0"):
        int4_groups(QuantizedTensor(T.Q8_0, (N, K), torch.from_numpy(random_bytes(T.Q8_0, N, K))))


@pytest.mark.skipif(not has_int4_cpu_kernel(), reason="torch has no int4 CPU kernel")
@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K])
def test_int4_linear_matches_reference(qtype, rows):
    raw = random_bytes(qtype, N, K, seed=6)
    qt = QuantizedTensor(qtype, (N, K), torch.from_numpy(raw))
    groups = int4_groups(qt)
    # realistic magnitudes: the random blocks carry scales over six decades, far beyond a trained weight
    scale = torch.full_like(groups[1], 0.02)
    mins = -8 * scale + 0.001 * torch.randn_like(scale)
    layer = Int4Linear(groups[0], scale, mins)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(0))
    ref = reference(x, groups[0], scale, mins)
    got = layer(x)
    # bf16 activations and scales: ~3 significant digits per product, errors averaging over K
    assert (got - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


def test_many_rows_take_the_dense_weight_when_kept():
    raw = random_bytes(T.Q4_1, N, K, seed=7)
    q, scale, mins = int4_groups(QuantizedTensor(T.Q4_1, (N, K), torch.from_numpy(raw)))
    scale, mins = torch.full_like(scale, 0.02), torch.full_like(mins, -0.16)
    w = q.float() * 0.02 - 0.16
    layer = Int4Linear(q, scale, mins, dense=w)
    x = torch.randn(64, K)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w))  # prefill: exact fp32 GEMM
    one = layer(x[:1])  # decode: the int4 kernel, within bf16 tolerance
    assert not torch.equal(one, torch.nn.functional.linear(x[:1], w))
    assert torch.allclose(one, torch.nn.functional.linear(x[:1], w), rtol=0, atol=2e-2 * w.abs().max().item() * 8)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_q8_linear_equals_the_dequantized_product(rows):
    raw = random_bytes(T.Q8_0, N, K, seed=8)
    w = torch.from_numpy(gq.dequantize(raw, T.Q8_0).reshape(N, K).astype("float32"))  # gguf-py's reference
    layer = Q8Linear(QuantizedTensor(T.Q8_0, (N, K), torch.from_numpy(raw)), dense=w)
    x = torch.randn(2, rows, K, generator=torch.Generator().manual_seed(1))
    got, ref = layer(x), torch.nn.functional.linear(x, w)
    assert got.shape == (2, rows, N)
    # the same products in fp32, summed per block of 32 then across blocks: only the summation order differs
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# -- our AVX-512 block kernels (kernels/cpu/csrc/quant_matmul.cpp) --
needs_kernels = pytest.mark.skipif(block_kernels() is None, reason="tokenmill C++ CPU kernels not built here")
SHAPES = [(48, 512), (37, 96), (3, 64)]  # N not a multiple of the 16-row strip; K from 2 to 16 blocks


def gguf_weight(qtype, n, k, seed):
    """Random blocks with trained-weight magnitudes (scales ~0.02; the random ones span six decades) and gguf-py's
    dequantized fp64 weight, the independent reference."""
    raw = random_bytes(qtype, n, k, seed=seed)
    blocks = raw.reshape(-1, raw.shape[1] * 32 // k)  # a view: one block per row
    rng = np.random.default_rng(seed)
    for off in (0, 2) if qtype == T.Q4_1 else (0,):
        v = rng.normal(0.02, 0.005, len(blocks)) * (1 if off == 0 else -8)
        blocks[:, off:off + 2] = v.astype(np.float16).view(np.uint8).reshape(-1, 2)
    w = torch.from_numpy(gq.dequantize(raw, qtype).reshape(n, k)).double()
    return QuantizedTensor(qtype, (n, k), torch.from_numpy(raw)), w


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 16, 64, 300])
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_block_linear_equals_the_dequantized_product(qtype, rows):
    for n, k in SHAPES:
        qt, w = gguf_weight(qtype, n, k, seed=rows + n)
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        got = BlockLinear(qt)(x)  # no dense weight: the kernel at every row count
        ref = x.double() @ w.T
        # fp32 products summed in another order (and w = fma(q, d, m), one rounding): a few ulps of sum |x| |w|
        bound = 1e-6 * (x.double().abs() @ w.abs().T) + 1e-30
        assert got.dtype == torch.float32 and got.shape == (rows, n)
        assert ((got.double() - ref).abs() <= bound).all(), f"{qtype.name} {n}x{k}"


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 16, 64, 300])
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_block_linear_int8_equals_its_reference(qtype, rows):
    """The int8 kernel is exact given its rounded activations (integer dot products, one fp32 scale per block), so it
    equals `reference()` up to fp32 summation order; the rounding itself is the path's documented error."""
    for n, k in SHAPES:
        qt, w = gguf_weight(qtype, n, k, seed=rows + n)
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        x[0, :32] = 0  # an all-zero block: scale 0
        layer = BlockLinear(qt, int8=True)
        got, ref = layer(x), layer.reference(x)
        bound = 1e-6 * (x.double().abs() @ w.abs().T) + 1e-30
        assert ((got.double() - ref.double()).abs() <= bound).all(), f"{qtype.name} {n}x{k}"
        exact = x.double() @ w.T  # and int8 rounding stays near the exact product: ~1/254 of a block's max
        assert (got.double() - exact).abs().max() <= 0.02 * (x.double().abs() @ w.abs().T).max()


@needs_kernels
def test_block_linear_takes_any_leading_shape_bias_and_dense_rows():
    qt, w = gguf_weight(T.Q4_1, 48, 512, seed=3)
    bias = torch.randn(48)
    layer = BlockLinear(qt, bias=bias, dense=w.float())
    x = torch.randn(2, 5, 512)
    ref = (x.double() @ w.T + bias.double()).float()
    assert layer(x).shape == (2, 5, 48) and torch.allclose(layer(x), ref, rtol=1e-5, atol=1e-5)
    many = torch.randn(BlockLinear.dense_rows, 512)
    assert torch.equal(layer(many), torch.nn.functional.linear(many, w.float(), bias))  # MKL's GEMM from dense_rows up


@needs_kernels
def test_block_linear_rejects_other_types():
    with pytest.raises(ValueError, match="Q4_K"):
        BlockLinear(QuantizedTensor(T.Q4_K, (16, 256), torch.from_numpy(random_bytes(T.Q4_K, 16, 256))))


@needs_kernels
def test_block_linear_compiles():
    qt, w = gguf_weight(T.Q4_0, 48, 512, seed=4)
    layer = BlockLinear(qt)
    fn = torch.compile(lambda x: torch.relu(layer(x)) * 2, dynamic=True, fullgraph=True)
    for rows in (1, 3):
        x = torch.randn(rows, 512)
        assert torch.allclose(fn(x), torch.relu(layer(x)) * 2)
