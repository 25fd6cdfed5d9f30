"""GPU numerics (run on purpose: `pytest -m gpu`): the model on CUDA against the CPU fp32 reference, random weights."""
import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.kv_cache import KVCache
from tokenmill.model import Transformer

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
    cache = KVCache(model.config, 1, len(ids), dtype, device)
    outs = []
    with torch.inference_mode():
        view = cache.begin([0], [ids[:n_prompt]])
        outs.append(model(torch.tensor([ids[:n_prompt]], device=device), view.positions, view)[0])
        for t in ids[n_prompt:]:
            view = cache.begin([0], [[t]])
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
