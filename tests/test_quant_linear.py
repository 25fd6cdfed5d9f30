"""4-bit repacking (exact vs gguf-py's dequantizer), the int4 CPU linear (vs the plain PyTorch reference) and the Q8_0
block linear (vs gguf-py's dequantized weight)."""
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from tests.test_quants import random_bytes
from tokenmill.errors import UnsupportedError
from tokenmill.quant_linear import Int4Linear, Q8Linear, has_int4_cpu_kernel, reference
from tokenmill.quants import QuantizedTensor, int4_groups

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
