"""One callable per framework and mode: `runner` (generate with the KV cache: JAX jit and
scan_layers, torch eager, compile and cudagraphs, HF generate), `recompute_runner` (the no-cache
baseline), their memory meters, and the JAX ahead-of-time compile cell."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from gptmod.bench import recompute
from gptmod.bench.measure import Peak, cuda_peak, jax_device_peak, rss_peak
from gptmod.bench.models import Models
from gptmod.config import ModelConfig

# --frameworks name -> (framework, mode) as written in rows
FRAMEWORKS = {
    "jax": ("jax", "jit"),
    "jax-scan": ("jax", "jit-scan"),
    "torch-eager": ("torch", "eager"),
    "torch-compile": ("torch", "compile"),
    "torch-cudagraphs": ("torch", "cudagraphs"),
    "hf": ("hf", "generate"),
    "llama-cpp": ("llama.cpp", "generate"),
}
# Asked for by name only: llama.cpp (the `llama_cpp` package, llama-cpp-python, which compiles
# llama.cpp on install) runs the same weights exported as GGUF, F32 for fp32 and Q8_0 for int8, at
# batch 1 (its Python API decodes one sequence).
OPTIONAL = ("llama-cpp",)
# torch --frameworks name -> generate's `compile`
TORCH_COMPILE = {
    "torch-eager": False,
    "torch-compile": "default",
    "torch-cudagraphs": "reduce-overhead",
}
GPU_ONLY = ("torch-cudagraphs",)  # CUDA graphs: never on the CPU
COMPILED = ("jit", "jit-scan", "compile", "cudagraphs")
# the frameworks `recompute_runner` has a no-cache loop for (HF has no such path of ours)
SCALING = ("jax", "torch-eager", "torch-compile")
COMPILE_PROMPT = 32  # the compile cell's prompt length


def _hf_generate(model: Any, ids: Any, n: int) -> Any:
    import torch

    with torch.no_grad():
        # No eos: every run generates exactly n tokens, as ours do.
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )


def runner(models: Models, name: str, prompts_BP: np.ndarray) -> Callable[[int], object]:
    """generate(prompts, n) of one framework/mode as a function of n;
    returns only when the tokens exist."""
    ids = prompts_BP.tolist()
    if name in ("jax", "jax-scan"):
        import jax

        from gptmod_jax.generate import generate as jax_generate

        kw = {"scan_layers": True} if name == "jax-scan" else {}

        def run_jax(n: int) -> object:
            with jax.default_device(models.jax_device):
                # host lists: already synchronised
                return jax_generate(models.jax_model, ids, n, **kw)

        return run_jax
    if name == "llama-cpp":
        return _llama_cpp_runner(models.llama_cpp, prompts_BP)
    import torch

    if name in TORCH_COMPILE:
        from gptmod_torch.generate import generate as torch_generate

        compile = TORCH_COMPILE[name]
        return lambda n: torch_generate(models.torch_model, ids, n, compile=compile)
    ids_BP = torch.from_numpy(prompts_BP).to(next(models.hf.parameters()).device)

    def run_hf(n: int) -> object:
        out = _hf_generate(models.hf, ids_BP, n)
        if models.device == "gpu":
            torch.cuda.synchronize()
        return out

    return run_hf


def _llama_cpp_runner(llm: Any, prompts_BP: np.ndarray) -> Callable[[int], object]:
    """Greedy decoding of one prompt in llama.cpp: the prompt evaluated from an empty cache, then
    n tokens sampled, each evaluated in turn but the last (generate's n tokens take n - 1 steps)."""
    if prompts_BP.shape[0] != 1:
        raise ValueError(f"llama-cpp: batch {prompts_BP.shape[0]}: its Python API decodes one row")
    ids = prompts_BP[0].tolist()

    def run_llama(n: int) -> object:
        llm.reset()
        llm.eval(ids)
        out = []
        for i in range(n):
            out.append(llm.sample(temp=0.0))  # temperature 0: llama.cpp's greedy sampler
            if i < n - 1:
                llm.eval(out[-1:])
        return out

    return run_llama


def recompute_runner(models: Models, name: str, prompts_BP: np.ndarray) -> Callable[[int], object]:
    """The same greedy tokens as `runner` without a KV cache (`recompute`), as a function of n;
    `name` one of SCALING."""
    if name not in SCALING:
        raise ValueError(f"{name}: no recompute baseline (choose one of {', '.join(SCALING)})")
    if name == "jax":
        import jax

        def run_jax(n: int) -> object:
            with jax.default_device(models.jax_device):
                return recompute.jax_recompute(models.jax_model, prompts_BP, n)

        return run_jax
    compile = name == "torch-compile"
    return lambda n: recompute.torch_recompute(models.torch_model, prompts_BP, n, compile)


def memory_meter(models: Models, name: str) -> Callable[[], AbstractContextManager[Peak]]:
    if models.device == "cpu":
        return rss_peak
    return (lambda: jax_device_peak(models.jax_device)) if name.startswith("jax") else cuda_peak


def compile_cell(
    cfg: ModelConfig, scan_layers: bool, new_tokens: int, dtype: str = "float32", device: Any = None
) -> tuple[float, float]:
    """Seconds to trace and lower JAX generate (batch 1, greedy, a COMPILE_PROMPT prompt) to
    StableHLO, and for XLA to compile it, ahead of time on abstract weights (no memory needed)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import gptmod_jax
    from gptmod.sampling import plan

    with jax.default_device(device) if device is not None else nullcontext():
        graphdef, params = nnx.split(
            nnx.eval_shape(
                lambda: gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0), dtype=getattr(jnp, dtype))
            ),
            nnx.Param,
        )
        p = plan([[0] * min(COMPILE_PROMPT, cfg.max_seq_len - new_tokens)], new_tokens, cfg)
        t0 = time.perf_counter()
        lowered = _lower_generate(graphdef, params, p, new_tokens, scan_layers)
        t1 = time.perf_counter()
        lowered.compile()
        return t1 - t0, time.perf_counter() - t1


def _lower_generate(graphdef: Any, params: Any, p: Any, new_tokens: int, scan_layers: bool) -> Any:
    """gptmod_jax's jitted `_generate`, lowered on abstract inputs of plan `p`.

    The one place the bench reaches into the twin's private API: the public `generate` takes
    concrete prompts and runs what it compiles, while the compile table needs the program traced
    and compiled without running it, which only the jitted function's `.lower` offers. Its
    arguments follow `gptmod_jax.generate.generate`'s call of it; a change there shows here as a
    TypeError in the compile cell (tests/test_bench.py runs it)."""
    import importlib

    import jax
    import jax.numpy as jnp

    from gptmod.sampling import SamplingParams

    # the package exports the function under that name
    gen = importlib.import_module("gptmod_jax.generate")
    knobs, flags = gen._split_params(SamplingParams())
    return gen._generate.lower(
        graphdef,
        params,
        jax.ShapeDtypeStruct((p.rows, p.prompt_len), jnp.int32),  # prompts
        jax.ShapeDtypeStruct((p.rows,), jnp.int32),  # their lengths
        jax.ShapeDtypeStruct((p.rows,), jnp.bool_),  # live (not padding) rows
        jnp.int32(new_tokens),
        knobs,
        jax.random.key(0),
        plan=p,
        flags=flags,
        scan_layers=scan_layers,
    )
