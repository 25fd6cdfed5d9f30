"""Flags shared by the commands: the model and its load options, every sampler field, one-line argparse errors."""
from __future__ import annotations

import argparse
import dataclasses
import resource

# Sampler fields exposed as flags: field -> (flag, help). Flags for the remaining fields are derived from their names.
SAMPLER_FLAGS = {
    "max_new_tokens": ("--max-tokens", "tokens to generate at most (default 256)"),
    "temperature": ("--temperature", "0 = greedy; default 1.0"),
    "stop": ("--stop", "stop string (repeatable)"),
    "banned_strings": ("--ban-string", "string that must never appear; generation rewinds and resamples (repeatable)"),
    "disallowed_tokens": ("--disallow-token", "token id never to generate (repeatable)"),
    "allowed_tokens": ("--allow-token", "only these token ids may be generated (repeatable)"),
    "stop_token_ids": ("--stop-token-id", "token id that ends generation (repeatable)"),
    "logit_bias": ("--logit-bias", "ID=BIAS added to a token's logit (repeatable)"),
}
HIDDEN_FIELDS = {"logprobs", "top_logprobs", "dry_sequence_breakers"}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage of a command with every sampler flag is long)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _bias(s: str) -> tuple[int, float]:
    try:
        tok, val = s.split("=", 1)
        return int(tok), float(val)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS such as 42=-5.0, got {s!r}") from None


def add_sampler_flags(p: argparse.ArgumentParser):
    from tokenmill.sampling.params import PRESETS, SamplingParams

    g = p.add_argument_group("sampling")
    g.add_argument("--preset", choices=sorted(PRESETS), help="start from a named sampler preset")
    for f in dataclasses.fields(SamplingParams):
        if f.name in HIDDEN_FIELDS:
            continue
        flag, help_ = SAMPLER_FLAGS.get(f.name, ("--" + f.name.replace("_", "-"), None))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(dest=f"sp_{f.name}", default=None, help=help_ or f"default {default}")
        if f.name == "logit_bias":
            g.add_argument(flag, type=_bias, action="append", **kw)
        elif f.name == "max_new_tokens":
            g.add_argument(flag, type=positive_int, **kw)
        elif isinstance(default, bool):
            g.add_argument(flag, action="store_const", const=True, **kw)
        elif isinstance(default, list) or default is None and f.name != "seed":
            g.add_argument(flag, action="append", type=int if "token" in f.name else str, **kw)
        else:
            g.add_argument(flag, type=float if isinstance(default, float) else int, **kw)


def sampling_from_args(args, **defaults):
    from tokenmill.sampling.params import SamplingParams

    given = {k[3:]: v for k, v in vars(args).items() if k.startswith("sp_") and v is not None}
    if "logit_bias" in given:
        given["logit_bias"] = dict(given["logit_bias"])
    base = SamplingParams.preset(args.preset).to_dict() if args.preset else {}
    return SamplingParams.from_dict({**defaults, **base, **given})


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def stats_line(c) -> str:
    return (
        f"prompt: {c.prompt_tokens} tok ({c.cached_tokens} cached), {c.prompt_tps:.1f} tok/s | "
        f"generated: {c.generated_tokens} tok, {c.generation_tps:.1f} tok/s | "
        f"finish: {c.finish_reason} | peak memory: {peak_memory_mb():.0f} MiB"
    )


def load_llm(args):
    from tokenmill.llm import load

    return load(args.model, device=args.device or "cpu", threads=args.threads,
                template=getattr(args, "template", None), int4=args.int4, compile=getattr(args, "compile", False),
                kv_dtype=getattr(args, "kv_dtype", None), dtype=getattr(args, "dtype", None),
                kernels=getattr(args, "kernels", None), pdl=False if getattr(args, "no_pdl", False) else None)


def add_load_flags(sp):
    """-m/--model and the options of tokenmill.load (threads, device, dtype, int4, compile, kv-dtype)."""
    sp.add_argument("-m", "--model", help="a .gguf file, a Hugging Face model folder, or an alias (default: smollm2)")
    sp.add_argument("--threads", type=positive_int, help="CPU threads (default: all cores)")
    sp.add_argument("--device", choices=("cpu", "cuda"), help="where the model runs (default: cpu); cuda: bf16 "
                    "(or --dtype float32) with GGUF 4/8-bit weights kept quantized, Triton kernels and CUDA-graph "
                    "decode")
    sp.add_argument("--dtype", choices=("float32", "bfloat16"), help="activations and dense weights (default: "
                    "float32 on the CPU, bfloat16 on cuda; float32 on cuda gives the CPU's greedy tokens)")
    sp.add_argument("--int4", action="store_true", help="the fast CPU path: int8-rounded activations x 4-bit "
                    "weights (VNNI) and a float16 KV cache (faster, not bit-exact; default: exact)")
    sp.add_argument("--compile", action="store_true", help="torch.compile the CPU layer code around attention "
                    "(exact; the first run compiles, cached on disk afterwards)")
    sp.add_argument("--kv-dtype", choices=("float32", "float16", "bfloat16"), help="KV cache storage on the CPU "
                    "(default: float32, exact; float16 with --int4)")
    sp.add_argument("--kernels", choices=("auto", "torch"), help="auto: our C++ CPU kernels where this machine builds "
                    "them (default); torch: PyTorch everywhere (the reference paths)")
    sp.add_argument("--no-pdl", action="store_true", help="cuda: launch decode kernels without programmatic dependent "
                    "launch")
