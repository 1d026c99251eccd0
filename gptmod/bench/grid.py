"""The grid a run measures, cell by cell: one row per (framework, batch, prompt length), the
scaling rows (KV cache against recompute, per context) and the compile rows (per depth), each
figure computed as the package docstring defines it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any

import numpy as np
from tqdm import tqdm

from gptmod.bench.measure import Peak, peak_memory, time_call
from gptmod.bench.models import Models
from gptmod.bench.report import CompileRow, Row, ScalingRow
from gptmod.bench.runners import (
    COMPILED,
    FRAMEWORKS,
    compile_cell,
    memory_meter,
    recompute_runner,
    runner,
)
from gptmod.config import ModelConfig
from gptmod.threads import load_average


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
    weights: str = "fp32",
) -> Row:
    """One grid row from a generate-like `run(n)` (the package docstring defines each figure),
    with the load average before and after it."""
    framework, mode = FRAMEWORKS[name]
    load_before = load_average()
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
        weights,
        load_before,
        load_average(),
    )


def grid_cells(
    models: Models,
    frameworks: Sequence[str],
    int8: Models | None,
    weights: Sequence[str],
    batch: int = 1,
) -> list[tuple[str, str, Models]]:
    """(framework name, weights, models) of every cell at one (batch, prompt length), in the order
    they run: each framework at each of `weights` ("fp32", "int8"), HF at fp32 only (it has no int8
    path), whether or not fp32 is among `weights`; llama.cpp at batch 1 only."""
    out = []
    for name in frameworks:
        if name == "llama-cpp" and batch > 1:
            continue
        for w in ("fp32",) if name == "hf" else weights:
            out.append((name, w, int8 if w == "int8" else models))
    return out


def warn_if_loaded(row: Row, what: str, bar: tqdm) -> None:
    """A warning line when the load average around a cell was above the machine's CPU count."""
    cpus = os.cpu_count() or 1
    loads = [x for x in (row.load_before, row.load_after) if x is not None]
    if loads and max(loads) > cpus:
        bar.write(
            f"gptmod bench: warning: load average {max(loads):.1f} above the {cpus} CPUs "
            f"around {what}: other work shares the cores, so its figures are unreliable",
            file=sys.stderr,
        )


def run_grid(
    models: Models,
    frameworks: Sequence[str],
    batches: Sequence[int],
    prompt_lens: Sequence[int],
    new_tokens: int,
    repeats: int,
    roofline_tok_s: float | None = None,
    bar: tqdm | None = None,
    int8: Models | None = None,
    weights: Sequence[str] = ("fp32",),
) -> list[Row]:
    """One row per (framework, weights, batch, prompt_len); the frameworks and weights take turns
    cell by cell (`grid_cells`), so that drift on a shared machine hits them alike."""
    bar = bar if bar is not None else tqdm(disable=True)  # a bar that shows nothing
    rows = []
    for prompt_len in prompt_lens:
        for batch in batches:
            ids = prompts(models.cfg, batch, prompt_len)
            for name, w, m in grid_cells(models, frameworks, int8, weights, batch):
                what = f"{name} {w} batch {batch} prompt {prompt_len} +{new_tokens}"
                bar.set_postfix_str(what)
                run = runner(m, name, ids)
                row = measure_cell(
                    run,
                    name,
                    batch,
                    prompt_len,
                    new_tokens,
                    repeats,
                    roofline_tok_s,
                    memory_meter(m, name),
                    w,
                )
                rows.append(row)
                warn_if_loaded(row, what, bar)
                bar.update()
    return rows


def run_scaling(
    models: Models,
    frameworks: Sequence[str],
    contexts: Sequence[int],
    new_tokens: int,
    repeats: int,
    bar: tqdm | None = None,
) -> list[ScalingRow]:
    """Per-token decode time at batch 1 for each context, with the KV cache
    and recomputing without it (`recompute_runner`)."""
    bar = bar if bar is not None else tqdm(disable=True)  # a bar that shows nothing
    out = []
    for context in contexts:
        ids = prompts(models.cfg, 1, context - new_tokens)
        for name in frameworks:
            for cache in (True, False):
                bar.set_postfix_str(
                    f"scaling {name} context {context} {'cache' if cache else 'recompute'}"
                )
                run = (runner if cache else recompute_runner)(models, name, ids)
                t_n = time_call(lambda run=run: run(new_tokens), repeats).median_s
                t_1 = time_call(lambda run=run: run(1), repeats).median_s
                per_token = (t_n - t_1) / (new_tokens - 1) if t_n > t_1 else None
                out.append(ScalingRow(*FRAMEWORKS[name], context, cache, per_token))
                bar.update()
    return out


def run_compile(
    cfg: ModelConfig,
    depths: Sequence[int],
    new_tokens: int,
    dtype: str = "float32",
    device: Any = None,
    bar: tqdm | None = None,
) -> list[CompileRow]:
    """JAX generate traced and compiled ahead of time (`compile_cell`) at each depth, layers
    unrolled and scanned. JAX's caches are cleared first, so nothing an earlier cell compiled is
    reused."""
    bar = bar if bar is not None else tqdm(disable=True)  # a bar that shows nothing
    import jax

    jax.clear_caches()
    out = []
    for n_layer in depths:
        for scan in (False, True):
            bar.set_postfix_str(f"compile jax {n_layer} layers {'scanned' if scan else 'unrolled'}")
            c = replace(cfg, n_layer=n_layer)
            trace_s, compile_s = compile_cell(c, scan, new_tokens, dtype, device)
            out.append(CompileRow(n_layer, scan, trace_s, compile_s))
            bar.update()
    return out
