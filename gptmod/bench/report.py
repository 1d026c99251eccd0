"""What a run reports: its rows, the key figures (the ratios docs/bench.md sets targets for,
measured here, judged there), the printed tables and the JSON file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

RATIO_PROMPT = 32  # the key figures are read off the rows of this prompt length


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
    weights: str = "fp32"  # "fp32" or "int8" (gptmod/quant.py); older JSON files have fp32 only
    load_before: float | None = None  # the 1-minute load average as the cell started
    load_after: float | None = None  # ... and as it ended


@dataclass
class ScalingRow:
    framework: str
    mode: str
    context: int
    cache: bool
    per_token_s: float | None


@dataclass
class CompileRow:
    n_layer: int
    scan_layers: bool
    trace_s: float  # tracing and lowering to StableHLO
    compile_s: float  # XLA's compilation of the lowered program


@dataclass
class KeyFigure:
    name: str
    value: float
    unit: str = field(default="x", repr=False)  # for printing only: "x", "%" or "s"

    def to_json(self) -> dict:
        return {"name": self.name, "value": self.value}


def key_figures(rows: Sequence[Row]) -> list[KeyFigure]:
    """The figures docs/bench.md's targets are about, from the prompt-RATIO_PROMPT rows; a figure
    whose rows were not measured is left out."""

    def find(framework: str, mode: str, batch: int, weights: str = "fp32") -> Row | None:
        return next(
            (
                r
                for r in rows
                if (r.framework, r.mode, r.batch, r.prompt_len, r.weights)
                == (framework, mode, batch, RATIO_PROMPT, weights)
                and r.decode_tok_s is not None
            ),
            None,
        )

    out = []
    jax1, hf1 = find("jax", "jit", 1), find("hf", "generate", 1)
    if jax1 and hf1:
        out.append(KeyFigure("jax decode / hf (batch 1)", jax1.decode_tok_s / hf1.decode_tok_s))
    if jax1 and jax1.roofline_fraction is not None:
        out.append(KeyFigure("jax decode / roofline (batch 1)", jax1.roofline_fraction, "%"))
    torch1 = [r for r in (find("torch", "eager", 1), find("torch", "compile", 1)) if r]
    if torch1 and hf1:
        best = max(torch1, key=lambda r: r.decode_tok_s)
        out.append(
            KeyFigure(
                f"torch decode / hf (batch 1, torch {best.mode})",
                best.decode_tok_s / hf1.decode_tok_s,
            )
        )
    # int8 weights against the same twin and mode on fp32, and against int8's own roofline
    for framework, mode in (("jax", "jit"), ("torch", "eager"), ("torch", "compile")):
        fp32, q8 = find(framework, mode, 1), find(framework, mode, 1, "int8")
        if fp32 and q8:
            out.append(
                KeyFigure(
                    f"{framework} {mode} int8 decode / fp32 (batch 1)",
                    q8.decode_tok_s / fp32.decode_tok_s,
                )
            )
        if q8 and q8.roofline_fraction is not None:
            out.append(
                KeyFigure(
                    f"{framework} {mode} int8 decode / int8 roofline (batch 1)",
                    q8.roofline_fraction,
                    "%",
                )
            )
    for framework, mode, weights in dict.fromkeys((r.framework, r.mode, r.weights) for r in rows):
        one, eight = find(framework, mode, 1, weights), find(framework, mode, 8, weights)
        if one and eight:
            tag = "" if weights == "fp32" else f" {weights}"
            out.append(
                KeyFigure(
                    f"{framework} {mode}{tag}: batch 8 decode / batch 1",
                    eight.decode_tok_s / one.decode_tok_s,
                )
            )
    if jax1 and jax1.compile_s is not None:
        out.append(KeyFigure("jax generate compile (batch 1)", jax1.compile_s, "s"))
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


def format_report(result: dict, figures: Sequence[KeyFigure] = ()) -> str:
    """The header, the grid table, the key figures (`figures`), the scaling table
    and the compile table."""
    r = result
    samples = "/".join(f"{b:.1f}" for b in r.get("bandwidth_samples_gb_s", [r["bandwidth_gb_s"]]))
    kind = "HBM copy bandwidth" if r.get("bandwidth_method") == "copy" else "bandwidth"
    by_weights = r.get("roofline_tok_s_by_weights", {"fp32": r["roofline_tok_s"]})
    wbytes = r.get("weight_bytes_by_weights", {"fp32": r["weight_bytes"]})
    ceilings = ", ".join(
        f"{w} {wbytes[w] / 1e6:.1f} MB -> {t:.1f} tok/s" for w, t in by_weights.items()
    )
    threads = f" | {r['threads']} threads of {r['cpus']} CPUs" if "threads" in r else ""
    out = [
        f"device {r['device']} | {r['preset']} | {r['dtype']} | {kind} {samples} GB/s "
        f"(start/end){threads} | batch-1 roofline: {ceilings}",
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
        loads = (x.get("load_before"), x.get("load_after"))
        load = "-" if None in loads else f"{loads[0]:.1f}>{loads[1]:.1f}"
        body.append(
            [
                x["framework"],
                x["mode"],
                x.get("weights", "fp32"),
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
                load,
            ]
        )
    out.append(
        _table(
            [
                "framework",
                "mode",
                "weights",
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
                "load",
            ],
            body,
            left=3,
        )
    )
    if figures:
        shown = {
            "x": lambda v: f"{v:.2f}x",
            "%": lambda v: f"{100 * v:.1f}%",
            "s": lambda v: f"{v:.1f} s",
        }
        body = [[f.name, shown[f.unit](f.value)] for f in figures]
        out += ["", _table(["key figure (targets: docs/bench.md)", "measured"], body, left=1)]
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
    from gptmod.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=2, allow_nan=False) + "\n")
