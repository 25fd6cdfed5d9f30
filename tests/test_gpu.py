"""GPU numerics (run on purpose: `pytest -m gpu`): the model on CUDA against the CPU fp32 reference, random weights."""
import copy
from pathlib import Path

import pytest
import torch

from tokenmill.model.config import ModelConfig
from tokenmill.engine.kv_cache import PagedKVCache
from tokenmill.engine.scratch import ScratchCache
from tokenmill.model.transformer import Transformer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SHAPES = {
    "smollm2-135m": dict(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=2, num_heads=9, num_kv_heads=3, rope_theta=100000.0, tie_word_embeddings=True),
    "qwen2-7b-layer": dict(architecture="qwen2", vocab_size=4096, hidden_size=3584, intermediate_size=18944,
                           num_layers=1, num_heads=28, num_kv_heads=4, rope_theta=1e6, attention_bias=True),
    "mistral-window": dict(architecture="mistral", vocab_size=1024, hidden_size=256, intermediate_size=512,
                           num_layers=2, num_heads=8, num_kv_heads=2, sliding_window=24),
}


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.02 if "norm" not in name else 0.1)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def run(model, ids, dtype, device, n_prompt):
    model = model.to(device=device, dtype=dtype)
    model.inv_freq = model.inv_freq.float()
    return cached_logits(model, ids, n_prompt, dtype, device)


def cached_logits(model, ids, n_prompt, dtype, device):
    """(T, V) fp32 on the CPU: ids[:n_prompt] as one prompt, then one cached decode step per remaining id."""
    cache = PagedKVCache(model.config, -(-len(ids) // 16), 16, dtype, device)
    table = list(range(cache.num_blocks))
    outs = []
    with torch.inference_mode():
        view = cache.view([0], [n_prompt], [table])
        outs.append(model(torch.tensor([ids[:n_prompt]], device=device), view.positions, view)[0])
        for p, t in enumerate(ids[n_prompt:], start=n_prompt):
            view = cache.view([p], [1], [table])
            outs.append(model(torch.tensor([[t]], device=device), view.positions, view)[0])
    return torch.cat(outs).float().cpu()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_logits_match_cpu_fp32(shape):
    cfg = ModelConfig(max_position_embeddings=512, **SHAPES[shape])
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = run(model, ids, torch.float32, "cpu", 32)
    scale = (ref.max() - ref.min()).item()
    got32 = run(model, ids, torch.float32, "cuda", 32)
    assert (got32 - ref).abs().max().item() <= 1e-3 * scale  # fp32 on GPU (TF32 off by default for matmul)
    got16 = run(model, ids, torch.bfloat16, "cuda", 32)
    assert (got16 - ref).abs().max().item() <= 5e-2 * scale  # bf16 weights and activations


def gguf_model(cfg: ModelConfig, seed: int = 0) -> tuple[Transformer, dict]:
    """A random model whose linears are GGUF blocks, as a .gguf file loads it: attention Q4_1, gate/up Q4_0, down and
    an untied lm_head Q8_0; the dense weights are the blocks dequantized (fp32), the blocks kept as `packed`."""
    import gguf
    from gguf import GGMLQuantizationType as T

    from tokenmill.formats.quants import QuantizedTensor

    model = random_model(cfg, seed)
    kinds = {"q_proj": T.Q4_1, "k_proj": T.Q4_1, "v_proj": T.Q4_1, "o_proj": T.Q4_1, "gate_proj": T.Q4_0,
             "up_proj": T.Q4_0, "down_proj": T.Q8_0, "lm_head": T.Q8_0}
    packed = {}
    for name, mod in model.named_modules():
        qtype = kinds.get(name.rpartition(".")[2])
        if qtype is None or name == "lm_head" and cfg.tie_word_embeddings:
            continue
        raw = gguf.quants.quantize(mod.weight.detach().numpy(), qtype)
        qt = QuantizedTensor(qtype, tuple(mod.weight.shape), torch.from_numpy(raw))
        mod.weight.data = qt.dequantize()
        packed[f"{name}.weight"] = qt
    return model, packed


@pytest.mark.parametrize("shape", list(SHAPES))
def test_runner_fp32_matches_cpu_fp32(shape):
    """`tokenmill.load(device="cuda", dtype=torch.float32)`'s path on a GGUF-quantized random model: the runner keeps
    the blocks quantized (one-row decode kernels, tensor-core kernels up to 64 rows, dequantize + cuBLAS above) with
    fp32 activations and KV, through the contiguous cache and the paged one (SDPA prefill, a chunk after cached
    tokens, CUDA-graph decode steps). Logits: the CPU fp32 model's (same blocks, dequantized) within 1e-4 of their
    range."""
    pytest.importorskip("triton")
    from tokenmill.model.loader import LoadedModel
    from tokenmill.engine.model_runner import ModelRunner

    cfg = ModelConfig(max_position_embeddings=512, **SHAPES[shape])
    model, packed = gguf_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = cached_logits(model, ids, 80, torch.float32, "cpu")  # (100, V): 80 prefilled, then 20 decode steps
    tol = 1e-4 * (ref.max() - ref.min()).item()
    runner = ModelRunner(LoadedModel(copy.deepcopy(model).to("cuda"), cfg, None, Path(shape), "gguf", packed))
    assert runner.dtype == torch.float32
    assert runner.quantized_layers == 4 * cfg.num_layers + (not cfg.tie_word_embeddings)

    cache = ScratchCache(runner, 2, len(ids))
    got = torch.cat([cache.score(0, ids[:80])] + [cache.decode([0], [t]) for t in ids[80:]]).cpu()
    short = cache.score(1, ids[:20]).cpu()  # 20 rows: the tensor-core kernels
    assert runner.graphs(cache.cache).graphs  # the decode steps replayed a CUDA graph
    errors = [(got - ref).abs().max().item(), (short - ref[:20]).abs().max().item()]

    paged = runner.new_kv_cache(8, 16)
    table = list(range(1, 8))  # 112 slots
    rows = [runner.forward(paged, [ids[:60]], [0], [table], [0]).cpu(),  # nothing cached: SDPA
            runner.forward(paged, [ids[60:80]], [60], [table], [0]).cpu()]  # after 60 cached tokens
    for p, t in enumerate(ids[80:], start=80):
        rows.append(runner.forward(paged, [[t]], [p], [table], [0]).cpu())
    assert runner.graphs(paged).graphs  # the decode steps replayed a CUDA graph
    errors.append((torch.cat(rows) - ref[[59] + list(range(79, 100))]).abs().max().item())
    assert max(errors) <= tol, f"one-pass / 20-row / chunked max errors {errors}, tolerance {tol:.2e}"
