"""Logits parity with HF transformers (fp32) on tiny random llama / mistral / qwen2 checkpoints written by the test."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tokenmill  # noqa: E402
from tokenmill.engine.scratch import ScratchCache  # noqa: E402

PROMPT, DECODE = 64, 32

ARCHS = {
    # Llama-3.1 rope scaling, untied head, grouped-query attention, sharded safetensors
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # sliding window (16) smaller than the 64-token prompt
    "mistral": lambda: transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=256, sliding_window=16, tie_word_embeddings=False),
    # q/k/v bias, tied embeddings
    "qwen2": lambda: transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory, hf_tokenizer):
    """{arch: (folder, HF reference model)}; each folder is a complete HF model folder with tokenizer files."""
    out = {}
    for arch, make_config in ARCHS.items():
        cfg = make_config()
        cfg.vocab_size = len(hf_tokenizer)
        cfg.attn_implementation = "eager"
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():  # random biases, so a bias that is dropped shows
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
        folder = tmp_path_factory.mktemp(arch)
        model.save_pretrained(folder, max_shard_size="1MB" if arch == "llama" else "5GB")
        hf_tokenizer.save_pretrained(folder)
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
        out[arch] = folder, model
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers_prompt_and_cached_decode(tiny_checkpoints, arch):
    folder, ref = tiny_checkpoints[arch]
    llm = tokenmill.load(str(folder))
    assert llm.config.architecture == arch
    ids = torch.randint(3, ref.config.vocab_size, (PROMPT + DECODE,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    cache = ScratchCache(llm.runner, 1, PROMPT + DECODE)
    got = [cache.score(0, ids[:PROMPT].tolist())]
    got += [cache.decode([0], [t]) for t in ids[PROMPT:].tolist()]
    got = torch.cat(got)
    scale = (expected.max() - expected.min()).item()
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-3 * scale, f"{arch}: max |dlogit| {diff:.2e} vs range {scale:.2f}"
    # and the same through the plain scoring path
    assert (llm.logits(ids.tolist()) - expected).abs().max().item() <= 1e-3 * scale


def test_sharded_checkpoint_and_eos_list(tiny_checkpoints):
    folder, _ = tiny_checkpoints["llama"]
    assert (folder / "model.safetensors.index.json").is_file()
    llm = tokenmill.load(str(folder))
    assert {0, 2} <= set(llm.tokenizer.eos_ids)  # every id of generation_config's eos list stops generation


def test_kv_cache_reset_truncate_and_rows_of_other_lengths(tiny_checkpoints):
    folder, ref = tiny_checkpoints["mistral"]  # sliding window: truncation must also keep the window right
    runner = tokenmill.load(str(folder)).runner
    ids = torch.randint(3, ref.config.vocab_size, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    other = torch.randint(3, ref.config.vocab_size, (10,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    cache = ScratchCache(runner, 2, 64)
    cache.score(0, ids[:30] + other)  # cache a wrong continuation...
    cache.truncate(0, 30)  # ...cut it off, and continue with the right tokens
    got = cache.score(0, ids[30:])
    assert torch.allclose(got, expected[30:], atol=1e-4)
    cache.reset()
    assert cache.length(0) == 0
    assert torch.allclose(cache.score(0, ids), expected, atol=1e-4)
    # a second row with a different length decodes alongside without disturbing the first
    cache.score(1, other)
    both = cache.decode([0, 1], [ids[0], other[0]])
    with torch.no_grad():
        ref_both = [ref(torch.tensor([ids + ids[:1]])).logits[0, -1], ref(torch.tensor([other + other[:1]])).logits[0, -1]]
    assert torch.allclose(both, torch.stack(ref_both), atol=1e-4)
