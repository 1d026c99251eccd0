"""Decode speed of both twins beside Hugging Face `generate`, in one process run.

    python -m gptmod.bench [--preset modern-gpt2] [--batch 1 --batch 8] [--prompt-len 32] [--new-tokens 256]

Random weights. Each figure is the median of `--repeats` timed runs after a warm-up (which also pays
any compilation). Decode tokens/s = batch * (new_tokens - 1) / (t(new_tokens) - t(1)): the
difference of two generate calls removes prefill and the first token from the decode figure, the
same way for every framework. HF runs the equivalent Llama config for modern presets (GPT2 for
classic ones) with its default dynamic cache; it has no logit soft-cap, which costs nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from gptmod.config import ModelConfig, list_presets, load_preset


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: compilation, allocator, caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hf_model(cfg: ModelConfig):
    """The transformers model with the same shapes (Llama for the modern column, GPT2 for classic)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if cfg.is_classic:
        hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                            n_layer=cfg.n_layer, n_head=cfg.n_head, layer_norm_epsilon=cfg.norm_eps)  # fmt: skip
        return GPT2LMHeadModel(hf_cfg).eval()
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=cfg.bias, mlp_bias=cfg.bias,
    )  # fmt: skip
    return LlamaForCausalLM(hf_cfg).eval()


def bench_decode(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict[str, float]:
    import torch
    from flax import nnx

    import gptmod_jax
    import gptmod_torch
    from gptmod_jax.generate import generate as jax_generate
    from gptmod_torch.generate import generate as torch_generate

    torch.manual_seed(0)
    tm = gptmod_torch.GPT(cfg).eval()
    jm = gptmod_jax.load_state(gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0)), gptmod_torch.export_state(tm))
    hf = hf_model(cfg)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len))
    ids = torch.from_numpy(prompts)
    runs: dict[str, Callable[[int], object]] = {
        "jax": lambda n: jax_generate(jm, prompts.tolist(), n),
        "torch": lambda n: torch_generate(tm, prompts.tolist(), n),
        "torch.compile": lambda n: torch_generate(tm, prompts.tolist(), n, compile=True),
        "hf": lambda n: _hf_generate(hf, ids, n),
    }
    out = {}
    for name, run in runs.items():
        t_full = _median_time(lambda run=run: run(new_tokens), repeats)
        t_one = _median_time(lambda run=run: run(1), repeats)
        out[name] = batch * (new_tokens - 1) / (t_full - t_one)
    return out


def _hf_generate(model, ids, n: int):
    import torch

    with torch.no_grad():
        # No eos: every run generates exactly n tokens, as ours do.
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptmod.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="modern-gpt2", choices=list_presets())
    p.add_argument("--batch", type=int, action="append", help="batch size(s); default 1 and 8")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    cfg = load_preset(args.preset)
    if args.new_tokens < 2 or args.prompt_len < 1 or args.prompt_len + args.new_tokens > cfg.max_seq_len:
        p.error(f"need new_tokens >= 2, prompt_len >= 1 and prompt_len + new_tokens <= max_seq_len={cfg.max_seq_len}")
    print(
        f"{args.preset}, fp32, random weights, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"median of {args.repeats}",
        flush=True,
    )
    print(
        f"{'batch':>5}  {'jax tok/s':>10}  {'torch tok/s':>11}  {'compiled':>9}  {'hf tok/s':>9}  {'jax/hf':>7}  "
        f"{'torch/hf':>8}  {'compiled/hf':>11}"
    )
    for batch in args.batch or [1, 8]:
        r = bench_decode(cfg, batch, args.prompt_len, args.new_tokens, args.repeats)
        c, hf = r["torch.compile"], r["hf"]
        print(
            f"{batch:>5}  {r['jax']:>10.1f}  {r['torch']:>11.1f}  {c:>9.1f}  {hf:>9.1f}  {r['jax'] / hf:>6.2f}x  "
            f"{r['torch'] / hf:>7.2f}x  {c / hf:>10.2f}x",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
