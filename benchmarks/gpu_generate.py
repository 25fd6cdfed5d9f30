"""`tokenmill generate --device cuda` beside `tokenmill bench --shape` on one GPU, in one process: the bench's decode
figure (CUDA-graph replays fed back on the GPU, no host work between steps) and the CLI's (`tokenmill generate`,
LLM.stream on the engine: scheduler, sampler, detokenizer and one CUDA-graph replay a token), for the same random-weight
bf16 model shape, written as a Hugging Face folder (nothing to download).

    PYTHONPATH=. python benchmarks/gpu_generate.py [--shape llama3-8b] [--tokens 256] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from tokenmill.monitoring.gpu_shapes import SHAPES, build_model, decode_tps, random_model

HF_TYPE = {"llama": ("LlamaForCausalLM", "llama"), "mistral": ("MistralForCausalLM", "mistral"),
           "qwen2": ("Qwen2ForCausalLM", "qwen2")}


def write_folder(shape: str, path: Path) -> None:
    """config.json, a byte-level tokenizer padded to the vocabulary with plain added tokens, and the bench's random
    bf16 weights (std 0.02, norms 1) as one safetensors file."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    s = SHAPES[shape]
    arch, model_type = HF_TYPE[s["architecture"]]
    config = {"architectures": [arch], "model_type": model_type, "vocab_size": s["vocab_size"],
              "hidden_size": s["hidden_size"], "intermediate_size": s["intermediate_size"],
              "num_hidden_layers": s["num_layers"], "num_attention_heads": s["num_heads"],
              "num_key_value_heads": s["num_kv_heads"], "rope_theta": s["rope_theta"], "rms_norm_eps": 1e-5,
              "max_position_embeddings": s["max_position_embeddings"],
              "tie_word_embeddings": s.get("tie_word_embeddings", False), "torch_dtype": "bfloat16"}
    if s.get("attention_bias"):
        config["attention_bias"] = True
    (path / "config.json").write_text(json.dumps(config))
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    tok.add_tokens([f"<t{i}>" for i in range(s["vocab_size"] - len(vocab) - 1)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    model, _ = random_model(shape)
    state = {name: t.contiguous().cpu() for name, t in model.state_dict().items()}
    del model
    torch.cuda.empty_cache()
    save_file(state, str(path / "model.safetensors"))


def main(args):
    from tokenmill.cli import main as cli
    import tokenmill.llm

    props = torch.cuda.get_device_properties(0)
    out = {"card": props.name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "shape": args.shape}
    model, cfg = build_model(args.shape, "bf16")
    out["bench decode b1 ctx 128 tok/s"] = decode_tps(model, cfg, 1, 128, args.tokens)
    del model
    torch.cuda.empty_cache()
    print(json.dumps(out), flush=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        write_folder(args.shape, folder)
        out["write folder s"] = time.perf_counter() - t
        t = time.perf_counter()
        llm = tokenmill.llm.load(str(folder), device="cuda")
        out["load s"] = time.perf_counter() - t
        real_load = tokenmill.llm.load
        tokenmill.llm.load = lambda *a, **k: llm  # the CLI below runs on the model loaded once
        log = folder / "metrics.jsonl"
        prompt = "The history of the city begins " * 14  # ~128 tokens of context, as the bench's figure
        argv = ["generate", prompt, "-m", str(folder), "--device", "cuda", "--temperature", "0", "--ignore-eos",
                "--max-tokens", str(args.tokens), "--metrics-log", str(log)]
        for run in range(args.runs + 1):  # the first captures the batch-1 CUDA graph
            assert cli.main(argv) == 0
            line = json.loads(log.read_text().splitlines()[-1])
            out[f"generate run {run} tok/s"] = line["generation_tps"]
            print(f"\ngenerate run {run}: {line['generation_tps']:.1f} tok/s, prompt {line['prompt_tokens']} tok",
                  flush=True)
        tokenmill.llm.load = real_load
        graphs = llm.runner.graphs(llm.engine.cache)
        out["decode graphs captured (batch buckets)"] = sorted(graphs.graphs) if graphs else []
    best = max(out[f"generate run {r} tok/s"] for r in range(1, args.runs + 1))
    out["generate / bench"] = best / out["bench decode b1 ctx 128 tok/s"]
    print(json.dumps(out, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    assert out["decode graphs captured (batch buckets)"], "generate did not replay a CUDA graph"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tmp", default=None, help="where the model folder is written (default: the system's temp dir)")
    p.add_argument("--json")
    main(p.parse_args())
