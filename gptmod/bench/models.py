"""The models a bench run times: the torch twin (seeded, or on given weights), the JAX twin on the
same state, and the Hugging Face model with the same weights."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gptmod.config import ModelConfig


def hf_model(cfg: ModelConfig, state: dict[str, np.ndarray] | None = None):
    """The transformers model with the same shapes (Llama for the modern column, GPT2 for classic),
    on `state` mapped to its layout when given (else its own seeded init). The soft-cap, which
    neither has, is left out: it costs one elementwise op on the logits."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if cfg.is_classic:
        hf_cfg = GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_seq_len,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            layer_norm_epsilon=cfg.norm_eps,
        )
        model = GPT2LMHeadModel(hf_cfg).eval()
        if state is not None:
            from gptmod.hf_gpt2 import to_hf_gpt2

            _load_hf_state(model, to_hf_gpt2(state, cfg))
        return model
    if state is not None:
        from gptmod.hf_llama import config_to_hf, to_hf_llama

        # the soft-cap only: everything else is Llama's
        llama = dataclasses.replace(cfg, logit_softcap=None)
        model = LlamaForCausalLM(LlamaConfig(**config_to_hf(llama))).eval()
        _load_hf_state(model, to_hf_llama(state, llama))
        return model
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
    )
    return LlamaForCausalLM(hf_cfg).eval()


def _load_hf_state(model: Any, tensors: dict[str, np.ndarray]) -> None:
    """Every tensor of `tensors` into `model`; tied heads are the one key allowed to be missing."""
    import torch

    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in tensors.items()}, strict=False
    )
    missing = [k for k in missing if k != "lm_head.weight" or not model.config.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(f"HF model: missing {missing}, unexpected {unexpected}")


@dataclass
class Models:
    cfg: ModelConfig
    device: str  # "cpu" or "gpu"
    torch_model: Any
    jax_model: Any = None
    jax_device: Any = None
    hf: Any = None


def build_models(
    cfg: ModelConfig,
    frameworks: Sequence[str],
    device: str = "cpu",
    dtype: str = "float32",
    state: dict[str, np.ndarray] | None = None,
) -> Models:
    """The torch model always, on `state` (None: a seeded random init); the JAX twin on the same
    state and the HF model with the same weights only when asked for."""
    import torch

    import gptmod_torch

    tdev, tdtype = ("cuda" if device == "gpu" else "cpu"), getattr(torch, dtype)
    torch.manual_seed(0)
    tm = gptmod_torch.GPT(cfg).eval()
    if state is None:
        state = gptmod_torch.export_state(tm)
    else:
        gptmod_torch.load_state(tm, state)
    models = Models(cfg, device, tm.to(device=tdev, dtype=tdtype))
    if "torch-compile" in frameworks or "torch-cudagraphs" in frameworks:
        # Each batch, cache length and step function is its own static-shape graph; dynamo's default
        # limit of 8 would quietly send the later cells back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if any(n.startswith("jax") for n in frameworks):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        import gptmod_jax

        models.jax_device = jax.devices("gpu" if device == "gpu" else "cpu")[0]
        with jax.default_device(models.jax_device):
            jm = gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0), dtype=getattr(jnp, dtype))
            models.jax_model = gptmod_jax.load_state(jm, state)
    if "hf" in frameworks:
        models.hf = hf_model(cfg, state).to(device=tdev, dtype=tdtype)
    return models
