"""Run the parity ladder over a grid of presets, dtypes and backends, and render the report."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptmod import quant
from gptmod.bench.measure import release_memory
from gptmod.config import ModelConfig
from gptmod.fileio import atomic_write_text
from gptmod.parity import generation, quant_agreement, suite, text, trace, training
from gptmod.parity.suite import Case, Row

CHECKS = (
    "modules",
    "trace",
    "logits",
    "text",
    "cached",
    "ragged",
    "greedy",
    "generate",
    "sampling",
    "divergence",
    "roundtrip",
    "hf",
    "train",
    "quant",
)
# The checks an int8 case (`Options.quant`) skips, and why: the per-module and per-op ladders
# rebuild float layers from canonical weights, HF has no int8 path here, and int8 does not train.
# The others judge the twins on the same int8 weights against the float64 model of those weights.
NOT_FOR_INT8 = {
    "modules": "rebuilds float layers from canonical weights",
    "trace": "replays float ops on canonical weights",
    "hf": "HF has no int8 path here",
    "train": "int8 weights do not train",
}


@dataclass
class Options:
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    device: str = "cpu"  # "cpu" | "cuda"
    weights: str = (
        "random"  # "random" | "random-outliers"; real weights arrive as states in run_suite's runs
    )
    seq_len: int = 128
    batch: int = 1
    seed: int = 0
    decode_steps: int = 16
    greedy_steps: int = 32
    divergence_steps: int = (
        256  # greedy steps of bf16/fp16 against float64 (the `divergence` check)
    )
    sampling_steps: int = (
        8  # decode steps whose sampling distributions the `sampling` check compares
    )
    # the knob settings it compares
    sampling_settings: tuple[dict[str, float], ...] = generation.SETTINGS
    # the generate paths the `generate` check runs
    generate_paths: tuple[str, ...] = generation.PATHS
    train_steps: int = 200
    checks: tuple[str, ...] = CHECKS
    fault: tuple[str, float] | None = (
        None  # (canonical name, relative perturbation) in the JAX twin only
    )
    backends_torch: tuple[str, ...] = field(default_factory=tuple)
    backends_jax: tuple[str, ...] = field(default_factory=tuple)
    text_ids: tuple[
        int, ...
    ] = ()  # real text (a real model's tokenizer on a bundled play) instead of random ids
    text_name: str | None = None  # which play text_ids hold, for the report (None: random ids)
    quant: str | None = None  # "int8": the twins run on the int8 weights of each preset's state


def default_backends(device: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Every backend worth a row on the device; ones that can't run there become skipped rows."""
    if device == "cuda":
        return ("sdpa", "flash", "cudnn", "efficient", "math", "reference"), (
            "xla",
            "cudnn",
            "reference",
        )
    return ("sdpa", "math", "flash", "reference", "efficient", "cudnn"), (
        "xla",
        "reference",
        "cudnn",
    )


def make_case(name: str, cfg: ModelConfig, dtype: str, opts: Options, state: dict | None) -> Case:
    if state is None:
        state = suite.random_state(cfg, opts.seed)
        if opts.weights == "random-outliers":
            state = suite.inject_outliers(state, cfg, opts.seed)
    seq_len = min(opts.seq_len, cfg.max_seq_len)
    if opts.text_ids:  # consecutive windows of the text, one per row
        if len(opts.text_ids) < opts.batch * seq_len:
            raise ValueError(
                f"parity: the text has {len(opts.text_ids)} tokens, fewer than batch x seq_len"
            )
        idx = np.asarray(opts.text_ids[: opts.batch * seq_len], dtype=np.int64).reshape(
            opts.batch, seq_len
        )
    else:
        idx = np.random.default_rng(opts.seed).integers(
            0, cfg.vocab_size, size=(opts.batch, seq_len)
        )
    if opts.quant is None:
        return Case(name, cfg, dtype, suite.cast_state(state, dtype), idx, opts.device)
    if dtype != "float32":
        raise ValueError(f"parity: int8 weights compute in float32, not {dtype}")
    float_state = suite.cast_state(state, "float32")
    qstate = quant.quantize(float_state, cfg)
    return Case(f"{name} int8", cfg, dtype, qstate, idx, opts.device, float_state=float_state)


def run_suite(
    runs: Iterable[tuple[str, ModelConfig, dict | None]], opts: Options, progress: bool = True
) -> list[Row]:
    """All checks for every (preset, dtype). `runs` holds (name, config,
    state or None for random)."""
    runs = list(runs)
    bt, bj = default_backends(opts.device)
    bt, bj = opts.backends_torch or bt, opts.backends_jax or bj
    plan = []
    for name, cfg, state in runs:
        for dtype in opts.dtypes:
            # bf16/fp16 matmuls are ~20x slower than fp32 on XLA's CPU
            # backend: fewer greedy steps there.
            n = (
                opts.greedy_steps
                if dtype == "float32" or opts.device == "cuda"
                else max(4, opts.greedy_steps // 4)
            )
            checks: list[tuple[str, Callable[[Case], Iterable[Row]]]] = [
                ("modules", lambda c: suite.check_modules(c, opts.fault)),
                ("trace", lambda c: trace.check_trace(c, opts.fault)),
                ("logits", lambda c: suite.check_logits_and_hidden(c, bt, bj, opts.fault)),
                (
                    "text",
                    lambda c: text.check_text(
                        c, opts.fault, opts.text_name if opts.text_ids else None
                    ),
                ),
                ("cached", lambda c: suite.check_cached_decode(c, opts.decode_steps, opts.fault)),
                ("ragged", lambda c: generation.check_ragged(c)),
                ("greedy", lambda c, n=n: suite.check_greedy(c, n, opts.fault)),
                (
                    "generate",
                    lambda c, n=n: generation.check_generate_paths(c, n, opts.generate_paths),
                ),
                (
                    "sampling",
                    lambda c: generation.check_sampling(
                        c, opts.sampling_settings, opts.sampling_steps
                    ),
                ),
                (
                    "divergence",
                    lambda c: text.check_divergence(c, opts.divergence_steps, opts.fault),
                ),
                ("roundtrip", suite.check_round_trips),
                ("hf", lambda c, n=n: suite.check_hf(c, opts.seed, n)),
                (
                    "train",
                    lambda c, own=state is not None: training.check_training(
                        c, opts.train_steps, opts.seed, own_weights=own, progress=progress
                    ),
                ),
                (
                    "quant",
                    lambda c: quant_agreement.check_quant(c, opts.divergence_steps, opts.text_ids),
                ),
            ]
            if opts.quant is None:  # int8 against float32 needs an int8 case
                checks = [(k, f) for k, f in checks if k != "quant"]
            else:
                checks = [(k, _not_for_int8(k) if k in NOT_FOR_INT8 else f) for k, f in checks]
            plan.append((name, cfg, state, dtype, [(k, f) for k, f in checks if k in opts.checks]))
    rows: list[Row] = []
    # No ETA: checks differ in cost by 100x (the training curve's own bar shows its steps).
    bar = tqdm(
        total=sum(len(p[-1]) for p in plan),
        desc="parity",
        unit="check",
        disable=not progress,
        leave=False,
        bar_format="{desc}: {n}/{total} checks [{elapsed}] {postfix}",
    )
    for name, cfg, state, dtype, checks in plan:
        # its models are built once, freed after its checks
        case = make_case(name, cfg, dtype, opts, state)
        for key, check in checks:
            bar.set_postfix_str(f"{name} {dtype} {key}")
            rows.extend(check(case))
            bar.update()
            release_memory()
        del case  # before the next case's models are built
        release_memory()
    bar.close()
    return rows


def _not_for_int8(check: str) -> Callable[[Case], Iterable[Row]]:
    """A check that an int8 case skips, as one row that says why (NOT_FOR_INT8)."""
    note = f"not run on int8 weights: {NOT_FOR_INT8[check]}"
    return lambda c: [suite.case_row(check, c, note=note)]


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def _note(r: Row) -> str:
    return f"{r.note} [at {r.where}]" if r.where and r.where not in r.note else r.note


# Every column of a report, in order, and its cell. The Markdown report leaves out "share"; the
# terminal table, one block per (preset, dtype), leaves out those two and notes where a row failed.
COLUMNS: dict[str, Callable[[Row], str]] = {
    "check": lambda r: r.check,
    "preset": lambda r: r.preset,
    "dtype": lambda r: r.dtype,
    "torch": lambda r: r.backend_torch,
    "jax": lambda r: r.backend_jax,
    "e_torch": lambda r: _fmt(r.e_torch),
    "e_jax": lambda r: _fmt(r.e_jax),
    "|Δ|": lambda r: _fmt(r.diff),
    "budget": lambda r: _fmt(r.budget),
    "share": lambda r: "-" if r.ratio is None else f"{r.ratio:.2f}",
    "result": lambda r: r.status,
    "note": lambda r: r.note,
}
HEADERS = [h for h in COLUMNS if h != "share"]
GROUP_HEADERS = [h for h in COLUMNS if h not in ("preset", "dtype")]


def _cells(r: Row) -> list[str]:
    return [COLUMNS[h](r) for h in HEADERS]


def _group_cells(r: Row) -> list[str]:
    return [_note(r) if h == "note" else COLUMNS[h](r) for h in GROUP_HEADERS]


def format_table(rows: list[Row], width: int | None = None) -> str:
    """One block per (preset, dtype); the note column wraps so that lines fit `width` (default: the
    terminal's). `share` is the row's worst share of its budget (Row.ratio): above 1 fails."""
    import shutil
    import textwrap

    width = width or shutil.get_terminal_size((150, 40)).columns
    table = [_group_cells(r) for r in rows]
    widths = [
        max(len(h), *(len(t[i]) for t in table)) if table else len(h)
        for i, h in enumerate(GROUP_HEADERS)
    ]
    fixed = sum(widths[:-1]) + 2 * (len(widths) - 1)
    note_w = max(30, width - fixed - 2)
    widths[-1] = min(widths[-1], note_w)

    def line(cells: list[str]) -> str:
        return "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out: list[str] = []
    groups: dict[tuple[str, str], list[list[str]]] = {}
    for r, cells in zip(rows, table, strict=True):
        groups.setdefault((r.preset, r.dtype), []).append(cells)
    for (preset, dtype), group in groups.items():
        out += [
            "" if out else None,
            f"{preset} · {dtype}",
            line(GROUP_HEADERS),
            line(["-" * w for w in widths]),
        ]
        for cells in group:
            wrapped = textwrap.wrap(cells[-1], note_w) or [""]
            out.append(line([*cells[:-1], wrapped[0]]))
            out += [line([""] * (len(cells) - 1) + [more]) for more in wrapped[1:]]
    return "\n".join(x for x in out if x is not None)


def format_markdown(rows: list[Row], header: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in header["versions"].items())
    weights = header.get("judged", header.get("weights"))
    lines = [
        f"# gptmod parity report\n\nweights: {weights}\n\ndevice: {header['device']}; {versions}; "
        f"passed: {header['passed']}\n"
    ]
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
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
