"""One model builder for every caller (the CLI, the bench, parity, transfer-report, the tests).

`build("torch" | "jax" | "hf", cfg, state)` gives a model on `state` (canonical weights) or, with
`state=None`, on a seeded random init: torch draws from `torch.manual_seed(seed)`, JAX from
`nnx.Rngs(seed)`, HF from its own init under `torch.manual_seed(seed)`. Framework-free until called:
each framework is imported only when its model is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from gptmod import quant as gquant
from gptmod.config import ModelConfig

FRAMEWORKS = ("torch", "jax", "hf")
DTYPES = ("float32", "bfloat16", "float16", "float64")


def build(
    framework: str,
    cfg: ModelConfig,
    state: Mapping[str, np.ndarray] | None = None,
    *,
    dtype: str = "float32",
    backend: str | None = None,
    seed: int = 0,
    device: str | None = None,
    kernels: bool = True,
    quant: str | None = None,
) -> Any:
    """The `framework` model of `cfg` on `state`, its parameters in `dtype`, in eval mode.

    `quant="int8"` builds the twin on int8 weights (gptmod/quant.py): a float `state` (or the seeded
    init) is quantized first, and a quantized state is used as it is, which a quantized `state`
    also implies on its own. The int8 twins compute in float32 (float64 for a reference); HF has no
    int8 path here.

    `backend` is the attention backend (None: the twin's default, "sdpa" / "auto"). `device` is
    "cpu" or "gpu" (None: the framework's default: torch's CPU, JAX's own placement). `kernels`
    swaps in the twins' CPU decode fast paths (their kernels.py). "hf" is transformers'
    LlamaForCausalLM (GPT2LMHeadModel for a classic config) with the same weights and without the
    soft-cap, which neither has."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework={framework!r}: choose one of {', '.join(FRAMEWORKS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    if device not in (None, "cpu", "gpu"):
        raise ValueError(f"device={device!r}: choose 'cpu' or 'gpu' (or None: the default)")
    quant = _quant(framework, cfg, state, dtype, quant)
    if quant is not None and (state is None or not gquant.is_quantized(state)):
        # one quantizer on one float state: both twins get the identical int8 weights
        float_state = state if state is not None else _seeded_state(cfg, seed)
        state = gquant.quantize(float_state, cfg)
    if framework == "torch":
        return _torch(cfg, state, dtype, backend, seed, device, kernels, quant)
    if framework == "jax":
        return _jax(cfg, state, dtype, backend, seed, device, kernels, quant)
    return _hf(cfg, state, dtype, seed, device)


def _quant(
    framework: str, cfg: ModelConfig, state: Mapping | None, dtype: str, quant: str | None
) -> str | None:
    """The quantization the build asks for (`quant`, or "int8" for a quantized state), checked."""
    gquant.check_quant(quant)
    if state is not None and gquant.is_quantized(state):
        gquant.check(state, cfg, what="state to build on")
        quant = quant or "int8"
    if quant is None:
        return None
    if framework == "hf":
        raise ValueError(
            f"quant={quant!r}: the hf model has no int8 path here; build it on the float weights"
        )
    if dtype not in ("float32", "float64"):
        raise ValueError(
            f"quant={quant!r} with dtype={dtype!r}: the int8 twins compute in float32 (or float64, "
            "the reference); choose one of those"
        )
    return quant


def _seeded_state(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """The float state of the seeded torch init (what `build("torch", cfg, seed=seed)` draws)."""
    import gptmod_torch

    return gptmod_torch.export_state(_torch(cfg, None, "float32", None, seed, None, False, None))


def _torch(cfg, state, dtype, backend, seed, device, kernels, quant):
    import torch

    import gptmod_torch

    torch.manual_seed(seed)
    model = gptmod_torch.GPT(cfg, attn_backend=backend or "sdpa", kernels=kernels, quant=quant)
    model = model.to(device="cuda" if device == "gpu" else "cpu", dtype=getattr(torch, dtype))
    if state is not None:
        gptmod_torch.load_state(model, state)
    return model.eval()


def _jax(cfg, state, dtype, backend, seed, device, kernels, quant):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import gptmod_jax
    from gptmod_jax import sharding

    # None: JAX's own placement (its default device, or the shards of an active mesh)
    where = (
        contextlib.nullcontext() if device is None else jax.default_device(jax.devices(device)[0])
    )

    def make() -> gptmod_jax.GPT:
        return gptmod_jax.GPT(
            cfg,
            rngs=nnx.Rngs(seed),
            attn_backend=backend or "auto",
            dtype=getattr(jnp, dtype),
            kernels=kernels,
            quant=quant,
        )

    with where:
        if state is None:
            return make()
        # The state replaces every parameter: build their shapes only, not a random init that
        # would be thrown away (each initializer compiles for each new shape, about a second a
        # model on a CPU). Under a mesh the parameters are built for real, as their shardings are
        # set when they are made.
        model = make() if sharding.mesh_active() else nnx.eval_shape(make)
        return gptmod_jax.load_state(model, state)


def _hf(cfg, state, dtype, seed, device):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if cfg.is_classic:
        hf_cfg = GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_seq_len,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            layer_norm_epsilon=cfg.norm_eps,
        )
        model = GPT2LMHeadModel(hf_cfg)
        if state is not None:
            from gptmod.hf_gpt2 import to_hf_gpt2

            _load_hf_state(model, to_hf_gpt2(state, cfg))
    else:
        from gptmod.hf_llama import config_to_hf, to_hf_llama

        # the soft-cap only: everything else is Llama's
        llama = dataclasses.replace(cfg, logit_softcap=None)
        model = LlamaForCausalLM(LlamaConfig(**config_to_hf(llama)))
        if state is not None:
            _load_hf_state(model, to_hf_llama(state, llama))
    tdev = "cuda" if device == "gpu" else "cpu"
    return model.to(device=tdev, dtype=getattr(torch, dtype)).eval()


def _load_hf_state(model: Any, tensors: dict[str, np.ndarray]) -> None:
    """Every tensor of `tensors` into `model`; tied heads are the one key allowed to be missing."""
    import torch

    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in tensors.items()}, strict=False
    )
    missing = [k for k in missing if k != "lm_head.weight" or not model.config.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(f"HF model: missing {missing}, unexpected {unexpected}")
