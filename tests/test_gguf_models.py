"""GGUF files the test writes with gguf-py from tiny random HF models (llama with permuted q/k rows, qwen2 with
biases), some tensors quantized: logits must match HF transformers run on the same (dequantized) weights."""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import tokenmill  # noqa: E402
from tokenmill.formats.gguf_file import GGUFFile  # noqa: E402

Q = gguf.GGMLQuantizationType

LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        return f"blk.{i}.{LAYER[rest]}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    # HF (head, 2, D/2) row order -> GGUF's interleaved (head, D/2, 2), as llama.cpp's converter writes llama q/k
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, arch: str, meta: dict):
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_chat_template(meta["tokenizer.chat_template"])
    state = model.state_dict()
    for i, (name, t) in enumerate(state.items()):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            a = permute_for_gguf(a, heads)
        # alternate types so each path is exercised; quantized weights go back into the reference model
        qtype = [Q.Q8_0, Q.F16, Q.Q4_0, Q.F32][i % 4] if a.ndim == 2 else Q.F32
        if qtype in (Q.Q8_0, Q.Q4_0):
            data = gguf.quants.quantize(a, qtype)
            back = gguf.quants.dequantize(data, qtype)
        else:
            data = a.astype(np.float16 if qtype == Q.F16 else np.float32)
            back = data.astype(np.float32)
        w.add_tensor(gguf_name(name), data, raw_dtype=qtype if qtype in (Q.Q8_0, Q.Q4_0) else None)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            back = back.reshape(heads, -1, 2, a.shape[1]).swapaxes(1, 2).reshape(a.shape)  # rows back in HF order
        with torch.no_grad():
            state[name].copy_(torch.from_numpy(np.ascontiguousarray(back.reshape(t.shape))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


MODELS = {
    "llama": lambda v: transformers.LlamaConfig(
        vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False),
    "qwen2": lambda v: transformers.Qwen2Config(
        vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
}


@pytest.mark.parametrize("arch", list(MODELS))
def test_written_gguf_matches_transformers(tmp_path, gguf_path, arch):
    meta = GGUFFile(gguf_path).metadata
    cfg = MODELS[arch](len(meta["tokenizer.ggml.tokens"]))
    cfg.attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.3)
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(path, model, arch, meta)
    llm = tokenmill.load(str(path))
    assert llm.config.architecture == arch and llm.config.attention_bias == (arch == "qwen2")
    ids = torch.randint(3, cfg.vocab_size, (48,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    got = llm.logits(ids.tolist())
    scale = (expected.max() - expected.min()).item()
    assert (got - expected).abs().max().item() <= 1e-3 * scale
