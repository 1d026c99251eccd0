"""Run the parity ladder over a grid of presets, dtypes and backends, and render the report."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptmod.config import ModelConfig
from parity import suite, training
from parity.suite import Case, Row

CHECKS = ("modules", "logits", "cached", "greedy", "roundtrip", "hf", "train")


@dataclass
class Options:
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    device: str = "cpu"  # "cpu" | "cuda"
    weights: str = "random"  # "random" | "random-outliers"; real weights arrive as states in run_suite's runs
    seq_len: int = 128
    batch: int = 1
    seed: int = 0
    decode_steps: int = 16
    greedy_steps: int = 32
    train_steps: int = 200
    checks: tuple[str, ...] = CHECKS
    fault: tuple[str, float] | None = None  # (canonical name, relative perturbation) in the JAX twin only
    backends_torch: tuple[str, ...] = field(default_factory=tuple)
    backends_jax: tuple[str, ...] = field(default_factory=tuple)
    text_ids: tuple[int, ...] = ()  # real text (a real model's tokenizer on a bundled play) instead of random ids


def default_backends(device: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Every backend worth a row on the device; ones that can't run there become skipped rows."""
    if device == "cuda":
        return ("sdpa", "flash", "cudnn", "efficient", "math", "reference"), ("xla", "cudnn", "reference")
    return ("sdpa", "math", "flash", "reference", "efficient", "cudnn"), ("xla", "reference", "cudnn")


def make_case(name: str, cfg: ModelConfig, dtype: str, opts: Options, state: dict | None) -> Case:
    if state is None:
        state = suite.random_state(cfg, opts.seed)
        if opts.weights == "random-outliers":
            state = suite.inject_outliers(state, cfg, opts.seed)
    seq_len = min(opts.seq_len, cfg.max_seq_len)
    if opts.text_ids:  # consecutive windows of the text, one per row
        if len(opts.text_ids) < opts.batch * seq_len:
            raise ValueError(f"parity: the text has {len(opts.text_ids)} tokens, fewer than batch x seq_len")
        idx = np.asarray(opts.text_ids[: opts.batch * seq_len], dtype=np.int64).reshape(opts.batch, seq_len)
    else:
        idx = np.random.default_rng(opts.seed).integers(0, cfg.vocab_size, size=(opts.batch, seq_len))
    return Case(name, cfg, dtype, suite.cast_state(state, dtype), idx, opts.device)


def run_suite(runs: Iterable[tuple[str, ModelConfig, dict | None]], opts: Options, progress: bool = True) -> list[Row]:
    """All checks for every (preset, dtype). `runs` holds (name, config, state or None for random)."""
    runs = list(runs)
    bt, bj = default_backends(opts.device)
    bt, bj = opts.backends_torch or bt, opts.backends_jax or bj
    plan = []
    for name, cfg, state in runs:
        for dtype in opts.dtypes:
            # bf16/fp16 matmuls are ~20x slower than fp32 on XLA's CPU backend: fewer greedy steps there.
            n = opts.greedy_steps if dtype == "float32" or opts.device == "cuda" else max(4, opts.greedy_steps // 4)
            checks: list[tuple[str, Callable[[Case], Iterable[Row]]]] = [
                ("modules", lambda c: suite.check_modules(c, opts.fault)),
                ("logits", lambda c: suite.check_logits_and_hidden(c, bt, bj, opts.fault)),
                ("cached", lambda c: suite.check_cached_decode(c, opts.decode_steps, opts.fault)),
                ("greedy", lambda c, n=n: suite.check_greedy(c, n, opts.fault)),
                ("roundtrip", suite.check_round_trips),
                ("hf", lambda c, n=n: suite.check_hf(c, opts.seed, n)),
                ("train", lambda c: training.check_training(c, opts.train_steps, opts.seed)),
            ]
            plan.append((name, cfg, state, dtype, [(k, f) for k, f in checks if k in opts.checks]))
    rows: list[Row] = []
    bar = tqdm(total=sum(len(p[-1]) for p in plan), desc="parity", unit="check", disable=not progress, leave=False)
    for name, cfg, state, dtype, checks in plan:
        case = make_case(name, cfg, dtype, opts, state)  # its models are built once, freed after its checks
        for key, check in checks:
            bar.set_postfix_str(f"{name} {dtype} {key}")
            rows.extend(check(case))
            bar.update()
    bar.close()
    return rows


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


HEADERS = ["check", "preset", "dtype", "torch", "jax", "e_torch", "e_jax", "|Δ|", "budget", "result", "note"]


def _cells(r: Row) -> list[str]:
    return [r.check, r.preset, r.dtype, r.backend_torch, r.backend_jax, _fmt(r.e_torch), _fmt(r.e_jax),
            _fmt(r.diff), _fmt(r.budget), r.status, r.note]  # fmt: skip


def format_table(rows: list[Row]) -> str:
    table = [_cells(r) for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(HEADERS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip() for t in table]
    return "\n".join(lines)


def format_markdown(rows: list[Row], header: dict) -> str:
    lines = [f"# gptmod parity report\n\ndevice: {header['device']}; " + ", ".join(f"{k} {v}" for k, v in
             header["versions"].items()) + f"; passed: {header['passed']}\n"]  # fmt: skip
    lines.append("| " + " | ".join(HEADERS) + " |")
    lines.append("|" + "---|" * len(HEADERS))
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def summary(rows: list[Row]) -> tuple[bool, str]:
    n_pass = sum(r.passed is True for r in rows)
    n_fail = sum(r.passed is False for r in rows)
    n_skip = sum(r.passed is None for r in rows)
    return n_fail == 0, f"{n_pass} passed, {n_fail} failed, {n_skip} skipped"


def write_json(path: Path, rows: list[Row], header: dict) -> None:
    data = {**header, "rows": [{**dataclasses.asdict(r), "status": r.status} for r in rows]}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
