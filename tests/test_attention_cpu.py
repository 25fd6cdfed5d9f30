"""The CPU decode-attention kernel (kernels/cpu/csrc/attention.cpp) against softmax(q k^T / sqrt(D)) v written out here,
on random data laid out as the paged cache lays it out: block pools read through scattered and shared block tables;
then the cache's view with the kernel against its SDPA path."""
import math

import pytest
import torch

from tokenmill.kernels.cpu import attention as cpu_attention
from tokenmill.model.config import ModelConfig
from tokenmill.engine.kv_cache import PagedKVCache

pytestmark = pytest.mark.skipif(not cpu_attention.available(torch.device("cpu"), 64, torch.float32),
                                reason="the C++ attention kernel did not build here")


def softmax_attention(q, keys, values, window):
    """q (H, D), keys/values (n, KV, D) of one sequence -> (H, D), in float64; the query sits at position n - 1."""
    H, D = q.shape
    n, KV = keys.shape[:2]
    lo = max(0, n - window) if window else 0
    kv_of = torch.arange(H) // (H // KV)
    k, v = keys[lo:, kv_of].double(), values[lo:, kv_of].double()  # (S, H, D)
    p = torch.softmax(torch.einsum("hd,shd->hs", q.double(), k) / math.sqrt(D), dim=-1)
    return torch.einsum("hs,shd->hd", p, v)


def paged(seqs_k, seqs_v, bs, share=0, dtype=torch.float32, seed=0):
    """Scatter each sequence's (n, KV, D) keys/values into a shuffled block pool; the first `share` blocks of every
    sequence are sequence 0's (the longest; its keys/values copied over first). -> k, v pools, tables (B, W) int64."""
    g = torch.Generator().manual_seed(seed)
    for s in range(1, len(seqs_k)):
        m = min(share * bs, len(seqs_k[s]), len(seqs_k[0]))
        seqs_k[s][:m], seqs_v[s][:m] = seqs_k[0][:m], seqs_v[0][:m]
    need = [-(-len(x) // bs) for x in seqs_k]
    N = sum(need) + 3
    perm = torch.randperm(N, generator=g).tolist()
    KV, D = seqs_k[0].shape[1:]
    k, v = torch.randn(N, bs, KV, D, generator=g), torch.randn(N, bs, KV, D, generator=g)  # garbage elsewhere
    tables, nxt = [], 0
    for s, n_blocks in enumerate(need):
        own = [tables[0][i] if s and i < share and i < len(tables[0]) else None for i in range(n_blocks)]
        for i in range(n_blocks):
            if own[i] is None:
                own[i], nxt = perm[nxt], nxt + 1
        tables.append(own)
        flat_k, flat_v = seqs_k[s], seqs_v[s]
        for j in range(len(flat_k)):
            k[own[j // bs], j % bs], v[own[j // bs], j % bs] = flat_k[j], flat_v[j]
    W = max(need)
    t = torch.tensor([row + [0] * (W - len(row)) for row in tables], dtype=torch.long)
    return k.to(dtype), v.to(dtype), t


def check(out, q, seqs_k, seqs_v, window, rtol=1e-5):
    for b in range(len(seqs_k)):
        want = softmax_attention(q[b], seqs_k[b], seqs_v[b], window)
        err = (out[b].double() - want).abs().max().item()
        assert err <= rtol * want.abs().max().item() + 1e-6, f"sequence {b}: max error {err}"


@pytest.mark.parametrize("H,KV,D", [(4, 4, 64), (9, 3, 64), (8, 2, 64), (14, 2, 64), (4, 2, 16), (8, 4, 128)])
@pytest.mark.parametrize("window", [None, 5, 100])
def test_paged_blocks_scattered_and_shared(H, KV, D, window):
    torch.manual_seed(0)
    lengths = [2048, 1, 17, 300, 33]  # the others share the first two blocks of the first
    ks = [torch.randn(n, KV, D) for n in lengths]
    vs = [torch.randn(n, KV, D) for n in lengths]
    k, v, tables = paged(ks, vs, bs=16, share=2)
    q = torch.randn(len(lengths), H, D) * 2
    out = cpu_attention.decode_attention(q, k, v, tables, torch.tensor(lengths), window)
    check(out, q, ks, vs, window)
    ref = cpu_attention.reference(q, k, v, tables, torch.tensor(lengths), window)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_pools_are_read_exactly(dtype):
    # the kernel widens to fp32: against the reference on the same 16-bit values, the fp32 tolerance holds
    torch.manual_seed(1)
    lengths, KV, D = [5, 1000], 3, 64
    ks = [torch.randn(n, KV, D).to(dtype).float() for n in lengths]
    vs = [torch.randn(n, KV, D).to(dtype).float() for n in lengths]
    k, v, tables = paged(ks, vs, bs=16, dtype=dtype)
    q = torch.randn(2, 9, D)
    check(cpu_attention.decode_attention(q, k, v, tables, torch.tensor(lengths), None), q, ks, vs, None)


def test_bad_inputs_are_errors():
    q, k = torch.randn(1, 4, 64), torch.randn(4, 16, 2, 64)
    with pytest.raises(RuntimeError, match="keys: needs 1 to 32"):
        cpu_attention.decode_attention(q, k, k, torch.tensor([[0, 1]]), torch.tensor([33]), None)
    with pytest.raises(RuntimeError, match="block id 9 out of range"):
        cpu_attention.decode_attention(q, k, k, torch.tensor([[9]]), torch.tensor([3]), None)


CFG = ModelConfig("llama", vocab_size=100, hidden_size=9 * 64, intermediate_size=64, num_layers=1, num_heads=9,
                  num_kv_heads=3, max_position_embeddings=4096)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [None, 40])
def test_paged_decodes_beside_a_prefill_chunk_equal_sdpa_path(window, dtype):
    # three decodes (lengths 100, 7, 250) and a 5-token chunk after 30 cached tokens in one packed forward
    def run(cpu_kernel):
        cache = PagedKVCache(CFG, 40, 16, dtype, cpu_kernel=cpu_kernel)
        assert cache.cpu_kernel == cpu_kernel
        torch.manual_seed(5)
        cache.k.normal_(), cache.v.normal_()
        tables = [[3, 9, 1, 4, 30, 6, 7], [12], [2, 5, 8, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [3, 9, 24]]
        view = cache.view([99, 6, 249, 30], [1, 1, 1, 5], tables)
        q, k, v = torch.randn(1, 9, 8, 64), torch.randn(1, 3, 8, 64), torch.randn(1, 3, 8, 64)
        return view.attend(0, q, k, v, window)

    assert torch.allclose(run(True), run(False), rtol=1e-5, atol=1e-5)
