"""A Hugging Face model folder: config.json, safetensors weights (single or sharded), tokenizer files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch

from tokenmill.model.config import ModelConfig
from tokenmill.errors import ModelLoadError


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


class HFFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{self.path} has no config.json; expected a Hugging Face model folder or a .gguf file")
        self.raw_config = read_json(cfg_path)
        self.config = ModelConfig.from_hf(self.raw_config)
        self.shards = self._shards()

    def _shards(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            names = sorted(set(read_json(index).get("weight_map", {}).values()))
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise ModelLoadError(f"{self.path}: shards listed in {index.name} are missing: {', '.join(missing)}")
            return [self.path / n for n in names]
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        found = sorted(self.path.glob("*.safetensors"))
        if found:
            return found
        raise ModelLoadError(
            f"{self.path} has no weights: expected model.safetensors or model.safetensors.index.json with shards"
        )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> shape of every stored weight, from the shard headers alone (no data is read)."""
        return dict(self._read(lambda f, name: tuple(f.get_slice(name).get_shape())))

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) for every stored weight, memory-mapped."""
        return self._read(lambda f, name: f.get_tensor(name))

    def _read(self, get) -> Iterator[tuple[str, Any]]:
        from safetensors import safe_open

        for shard in self.shards:
            try:
                with safe_open(shard, framework="pt") as f:
                    for name in f.keys():
                        if not name.endswith("rotary_emb.inv_freq"):
                            yield name, get(f, name)
            except Exception as e:  # safetensors raises its own SafetensorError on damaged files
                raise ModelLoadError(f"cannot read weights from {shard}: {e}") from None
