"""The models a bench run times: the torch twin (seeded, or on given weights), the JAX twin on the
same state, and the Hugging Face model with the same weights."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptmod.config import ModelConfig
from gptmod.models import build


@dataclass
class Models:
    cfg: ModelConfig
    device: str  # "cpu" or "gpu"
    torch_model: Any
    jax_model: Any = None
    jax_device: Any = None
    hf: Any = None
    llama_cpp: Any = None  # a llama_cpp.Llama on the same weights as GGUF (frameworks llama-cpp)


def build_models(
    cfg: ModelConfig,
    frameworks: Sequence[str],
    device: str = "cpu",
    dtype: str = "float32",
    state: dict[str, np.ndarray] | None = None,
    quant: str | None = None,
    gguf: Path | None = None,
) -> Models:
    """The torch model always, on `state` (None: a seeded random init); the JAX twin on the same
    state and the HF model with the same weights only when asked for (gptmod.models.build).
    `quant="int8"`: both twins on the int8 weights of that state; HF, which has no int8 path, is
    then not built (it runs on the float weights). `gguf`: the file llama.cpp loads for frameworks
    "llama-cpp" (the same weights, F32 or Q8_0), on as many threads as torch has."""
    import torch

    import gptmod_torch

    tm = build("torch", cfg, state, dtype=dtype, device=device, quant=quant)
    if state is None:  # the seeded init the others then share (quantized the same way in each)
        state = gptmod_torch.export_state(
            tm if quant is None else build("torch", cfg, dtype=dtype, device=device)
        )
    models = Models(cfg, device, tm)
    if "torch-compile" in frameworks or "torch-cudagraphs" in frameworks:
        # Each batch, cache length and step function is its own static-shape graph; dynamo's default
        # limit of 8 would quietly send the later cells back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if any(n.startswith("jax") for n in frameworks):
        import jax

        models.jax_device = jax.devices("gpu" if device == "gpu" else "cpu")[0]
        models.jax_model = build("jax", cfg, state, dtype=dtype, device=device, quant=quant)
    if "hf" in frameworks and quant is None:
        models.hf = build("hf", cfg, state, dtype=dtype, device=device)
    if "llama-cpp" in frameworks:
        import llama_cpp

        threads = torch.get_num_threads()
        models.llama_cpp = llama_cpp.Llama(
            str(gguf),
            n_ctx=cfg.max_seq_len,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
    return models
