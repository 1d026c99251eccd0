"""The per-op trace as a self-contained HTML page (inline CSS, a table
heatmap, a sortable table) and a PNG heatmap.

`write_html(traces, path)`: one section per trace: its title (weights, config, dtype, versions), a
banner naming the first op out of budget, a heatmap of blocks (rows) x ops (columns) coloured by
ratio (error as a share of the op's budget, log scale; over budget in red, the first bad op
outlined), and every entry in a table that sorts by any column. `write_png(trace, path)`: the same
heatmap drawn with matplotlib (Agg). Both files are written atomically (a temporary file beside the
target, fsynced, then renamed over it).
"""

from __future__ import annotations

import html
import io
import itertools
import math
import os
from pathlib import Path

from gptmod.fileio import atomic_write_bytes, atomic_write_text
from gptmod.parity.trace import Entry, Trace, forward_ops

CACHED = "attention (cached)"
MODEL_OPS = ("embedding", "norm", "logits")
# Colour stops on log10(ratio): within budget a light-to-deep blue, over budget orange to dark red.
LOW, HIGH = -3.0, 3.0  # ratio 1e-3 and below: the lightest; 1e3 and above: the darkest red
# Within budget stays light (correct twins sit near 0.5: the page must not
# be dark where all is well); anything over budget is a saturated red from
# the first step, so a fault is seen at a glance.
BLUES = ((0.969, 0.984, 1.0), (0.871, 0.922, 0.969), (0.776, 0.859, 0.937), (0.420, 0.682, 0.839))
REDS = ((0.957, 0.427, 0.263), (0.843, 0.188, 0.153), (0.647, 0.0, 0.149), (0.404, 0.0, 0.122))
LEGEND = (0.001, 0.01, 0.1, 0.5, 1.0, 2.0, 10.0, 100.0, 1000.0)


def _ramp(stops, t: float) -> tuple[float, float, float]:
    t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    f = t - i
    return tuple(a + (b - a) * f for a, b in zip(stops[i], stops[i + 1], strict=True))


def ratio_rgb(ratio: float) -> tuple[float, float, float]:
    """The cell colour of a ratio: blues up to 1 (log scale from 1e-3), reds above (up to 1e3)."""
    if not math.isfinite(ratio):
        return REDS[-1]
    lg = math.log10(ratio) if ratio > 0 else LOW
    if ratio <= 1.0:
        return _ramp(BLUES, (lg - LOW) / -LOW)
    return _ramp(REDS, lg / HIGH)


def _hex(rgb) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb)


def _ink(rgb) -> str:
    """Black or white text, whichever reads on the background."""
    r, g, b = rgb
    return "#111" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "#fff"


def _num(v: float) -> str:
    if not math.isfinite(v):
        return "inf"
    if v == 0:
        return "0"
    return f"{v:.2f}" if 0.01 <= abs(v) < 100 else f"{v:.1e}"


def _cell(e: Entry | None, first: Entry | None, label: bool = False) -> str:
    if e is None:
        return '<td class="na"></td>'
    rgb = ratio_rgb(e.ratio)
    cls = ["cell"] + (["over"] if not e.passed else []) + (["first"] if e is first else [])
    tip = (
        f"{e.mode} {e.label}: ratio {_num(e.ratio)}; e_torch {_num(e.e_torch)}, e_jax "
        f"{_num(e.e_jax)}, |Δ| {_num(e.diff)} (units of the op's worst-case bound; "
        f"budget {_num(e.budget)}); max|ref| {e.scale:.3g}; max abs error torch "
        f"{e.err_torch:.2e}, jax {e.err_jax:.2e}"
    )
    text = _num(e.ratio) + (f"<small>{html.escape(e.op)}</small>" if label else "")
    return (
        f'<td class="{" ".join(cls)}" style="background:{_hex(rgb)};color:{_ink(rgb)}" '
        f'title="{html.escape(tip)}">{text}</td>'
    )


def _legend() -> str:
    cells = "".join(
        '<span class="sw" '
        f'style="background:{_hex(ratio_rgb(r))};color:{_ink(ratio_rgb(r))}">{_num(r)}</span>'
        for r in LEGEND
    )
    return (
        f'<div class="legend"><b>ratio</b> (error / budget, log scale): {cells} '
        '<span class="note">&le; 1 within budget (blue); &gt; 1 over (red); a correct '
        "twin stays near or below "
        f'0.5; <span class="firstmark">outlined</span>: the first op out of budget</span></div>'
    )


def _heatmap(trace: Trace) -> str:
    entries = {(e.mode, e.layer, e.op): e for e in trace.entries}
    layers = sorted({e.layer for e in trace.entries if e.layer is not None})
    first = trace.first_bad()
    ops = [o for o in forward_ops(_cfg_like(trace)) if any(k[2] == o for k in entries)]
    has_cached = any(k[0] == "decode" for k in entries)
    head = "".join(f"<th>{html.escape(o)}</th>" for o in ops)
    if has_cached:
        head += '<th class="sep">attention<br>(cached)</th>'
    rows = []
    for layer in layers:
        cells = "".join(_cell(entries.get(("forward", layer, o)), first) for o in ops)
        if has_cached:
            cells += _cell(entries.get(("decode", layer, CACHED)), first).replace(
                "<td ", '<td data-sep="1" ', 1
            )
        rows.append(f'<tr><th class="row">block {layer}</th>{cells}</tr>')
    model = "".join(
        f"<th>{o}</th>{_cell(entries[('forward', None, o)], first)}"
        for o in MODEL_OPS
        if ("forward", None, o) in entries
    )
    # A tall grid (a real model's 30 blocks) repeats the op names below it:
    # they have scrolled away by then.
    foot = f"<tfoot><tr><th></th>{head}</tr></tfoot>" if len(layers) > 12 else ""
    grid = (
        f'<table class="heat"><thead><tr><th></th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody>{foot}</table>"
        if layers
        else ""
    )
    return f'<table class="heat model"><tr>{model}</tr></table>{grid}' if model else grid


def _cfg_like(trace: Trace):
    """forward_ops needs only cfg.mlp: read it back from the entries."""

    class _C:
        mlp = "swiglu" if any(e.op == "gate" for e in trace.entries) else "gelu"

    return _C


def _table(trace: Trace, tid: str) -> str:
    head = [
        "mode",
        "layer",
        "op",
        "e_torch",
        "e_jax",
        "|Δ|",
        "budget",
        "ratio",
        "max|ref|",
        "abs err torch",
        "abs err jax",
        "out of budget",
    ]
    ths = "".join(
        f"<th onclick=\"sortTable('{tid}',{i})\">{html.escape(h)}</th>" for i, h in enumerate(head)
    )
    body = []
    for e in trace.entries:
        vals = [
            e.mode,
            "" if e.layer is None else str(e.layer),
            e.op,
            _num(e.e_torch),
            _num(e.e_jax),
            _num(e.diff),
            _num(e.budget),
            _num(e.ratio),
            f"{e.scale:.3g}",
            f"{e.err_torch:.2e}",
            f"{e.err_jax:.2e}",
            e.culprit,
        ]
        keys = [
            None,
            -1 if e.layer is None else e.layer,
            None,
            e.e_torch,
            e.e_jax,
            e.diff,
            e.budget,
            e.ratio,
            e.scale,
            e.err_torch,
            e.err_jax,
            None,
        ]
        rgb = ratio_rgb(e.ratio)
        ratio_style = f' style="background:{_hex(rgb)};color:{_ink(rgb)}"'
        tds = "".join(
            f'<td data-k="{k if math.isfinite(k) else 1e308}"'
            f"{ratio_style if c == 7 else ''}>{html.escape(v)}</td>"
            if k is not None
            else f"<td>{html.escape(v)}</td>"
            for c, (v, k) in enumerate(zip(vals, keys, strict=True))
        )
        body.append(f'<tr class="{"bad" if not e.passed else ""}">{tds}</tr>')
    return (
        '<table class="entries" '
        f'id="{tid}"><thead><tr>{ths}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )


def _banner(trace: Trace) -> str:
    bad, worst = trace.first_bad(), trace.worst()
    if bad is not None:
        n = sum(not e.passed for e in trace.entries)
        return (
            '<div class="banner fail">FAIL: first op out of budget: '
            f"<b>{html.escape(bad.label)}</b> "
            f"({html.escape(bad.mode)}, {html.escape(bad.culprit)}) at "
            f"<b>{_num(bad.ratio)}&times;</b> its budget (e_torch {_num(bad.e_torch)}, e_jax "
            f"{_num(bad.e_jax)}); {n} of {len(trace.entries)} ops over budget. The fault is at "
            "the first one: every op is fed the float64 reference's own input, so errors do not "
            "carry over from op to op.</div>"
        )
    w = (
        ""
        if worst is None
        else f"; worst: {html.escape(worst.label)} ({worst.mode}) at {_num(worst.ratio)}"
    )
    return f'<div class="banner pass">PASS: all {len(trace.entries)} ops within budget{w}</div>'


def _section(trace: Trace, k: int) -> str:
    vers = ", ".join(f"{html.escape(a)} {html.escape(b)}" for a, b in trace.versions.items())
    weights = f"<b>weights</b> {html.escape(trace.weights)}<br>" if trace.weights else ""
    return f"""<section id="t{k}">
<h2>{html.escape(trace.case)} &middot; {html.escape(trace.dtype)}</h2>
<p class="meta">{weights}<b>config</b> {html.escape(trace.config)}<br><b>input</b> \
{html.escape(trace.tokens)}<br>
<b>attention backends</b> torch {html.escape(trace.backends[0])}, jax \
{html.escape(trace.backends[1])}
&middot; <b>versions</b> {vers} &middot; traced in {trace.seconds:.1f} s</p>
{_banner(trace)}
<h3>Ratio per op</h3>
{_legend()}
<div class="scroll">{_heatmap(trace)}</div>
<details open><summary>Every entry ({len(trace.entries)}; click a column to sort)</summary>
<div class="scroll">{_table(trace, f"tab{k}")}</div></details>
</section>"""


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1a1a1a;\
max-width:1600px}
h1{font-size:22px;margin:0 0 6px} \
h2{font-size:19px;margin:28px 0 4px;border-top:1px solid #ddd;padding-top:16px}
h3{font-size:15px;margin:14px 0 6px} .meta{color:#444;margin:4px 0 10px} \
.intro{color:#333;max-width:1100px}
.banner{padding:10px 14px;border-radius:6px;margin:10px 0;font-size:15px}
.banner.fail{background:#fde8e6;border:2px solid #c62828;color:#7f0000}
.banner.pass{background:#e8f3ea;border:1px solid #4f8f5b;color:#1d4d27}
.scroll{overflow-x:auto}
table.heat{border-collapse:separate;border-spacing:2px;font-variant-numeric:tabular-nums;\
margin-bottom:8px}
table.heat th{font-weight:600;font-size:12px;padding:2px 6px;white-space:nowrap;text-align:center;\
color:#333}
table.heat th.row{text-align:right} table.heat th.sep,td[data-sep]{border-left:3px solid #888}
table.heat td.cell{min-width:52px;height:20px;text-align:center;font-size:12px;border-radius:3px;\
padding:1px 4px}
table.heat td.na{background:#f2f2f2}
table.heat td.over{font-weight:700;box-shadow:inset 0 0 0 2px #5a0000}
table.heat td.first{outline:3px solid #000;outline-offset:1px}
table.heat.model th{padding-left:14px}
.legend{margin:6px 0 8px;font-size:12px}
.legend .sw{display:inline-block;padding:2px 7px;margin:0 1px;border-radius:3px}
.legend .note{color:#555;margin-left:8px} .firstmark{outline:2px solid #000;padding:0 3px}
table.entries{border-collapse:collapse;font-size:12.5px;font-variant-numeric:tabular-nums}
table.entries th{position:sticky;top:0;background:#f4f4f4;cursor:pointer;padding:4px 8px;\
border-bottom:2px solid #bbb;
  white-space:nowrap;text-align:right}
table.entries td{padding:2px 8px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
table.entries td:nth-child(3),table.entries th:nth-child(3),table.entries \
td:first-child{text-align:left}
table.entries tr.bad td{background:#fde8e6;color:#7f0000;font-weight:600}
details summary{cursor:pointer;font-weight:600;margin:10px 0 6px}
table.summary{border-collapse:collapse;margin:8px 0} table.summary td,table.summary th{padding:3px \
10px;
  border-bottom:1px solid #e4e4e4;text-align:left} .fail-t{color:#b71c1c;font-weight:700} \
.pass-t{color:#2e7d32}
"""

JS = """
function sortTable(id,col){const t=document.getElementById(id),b=t.tBodies[0],rows=[...b.rows];
const dir=t.dataset.col==col&&t.dataset.dir=="1"?-1:1;t.dataset.col=col;t.dataset.dir=dir;
rows.sort((x,y)=>{const a=x.cells[col],c=y.cells[col];const ka=a.dataset.k,kc=c.dataset.k;
if(ka!==undefined&&kc!==undefined)return dir*(parseFloat(ka)-parseFloat(kc));
return dir*a.textContent.localeCompare(c.textContent);});rows.forEach(r=>b.appendChild(r));}
"""


def render_html(traces: list[Trace], title: str = "gptmod per-op parity trace") -> str:
    summary = "".join(
        f'<tr><td><a href="#t{k}">{html.escape(t.case)}</a></td><td>{html.escape(t.dtype)}</td>'
        + (
            f'<td class="fail-t">FAIL</td><td>{html.escape(b.label)} ({html.escape(b.mode)}, '
            f"{html.escape(b.culprit)})"
            f" at {_num(b.ratio)}</td>"
            if (b := t.first_bad())
            else f'<td class="pass-t">pass</td><td>worst {html.escape(t.worst().label)} at '
            f"{_num(t.max_ratio())}</td>"
        )
        + "</tr>"
        for k, t in enumerate(traces)
    )
    sections = "\n".join(_section(t, k) for k, t in enumerate(traces))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta \
charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head>
<body><h1>{html.escape(title)}</h1>
<p class="intro">Each op of the torch and JAX twins is fed the float64 reference's own input, \
rounded to the dtype
(teacher forcing), so every error below is that op's own. <b>e</b> is the op's largest elementwise \
error in units of
its worst-case bound for a correct implementation in the dtype (half an ulp of the result plus \
each rounding and
fp32 sum inside the op; see gptmod/parity/trace.py); the <b>budget</b> is twice that, and \
<b>ratio</b> = \
max(e_torch, e_jax,
|&Delta;|/2) / budget.</p>
<table class="summary"><tr><th>case</th><th>dtype</th><th>result</th><th></th></tr>{summary}</table>
{sections}
<script>{JS}</script></body></html>
"""


def write_html(
    traces: list[Trace], path: str | os.PathLike, title: str = "gptmod per-op parity trace"
) -> Path:
    """Write the traces as one self-contained HTML page, atomically."""
    if not traces:
        raise ValueError(
            "write_html: traces is empty; trace at least one case (gptmod.parity.trace.run_trace)"
        )
    path = Path(path)
    atomic_write_text(path, render_html(traces, title))
    return path


def write_png(trace: Trace, path: str | os.PathLike) -> Path:
    """The heatmap of one trace (blocks x ops, ratio on a log scale) as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap

    entries = {(e.mode, e.layer, e.op): e for e in trace.entries}
    layers = sorted({e.layer for e in trace.entries if e.layer is not None})
    ops = [o for o in forward_ops(_cfg_like(trace)) if any(k[2] == o for k in entries)]
    cols = [("forward", o) for o in ops] + (
        [("decode", CACHED)] if any(k[0] == "decode" for k in entries) else []
    )
    grid = np.full((max(len(layers), 1), len(cols)), np.nan)
    for r, layer in enumerate(layers):
        for c, (mode, op) in enumerate(cols):
            e = entries.get((mode, layer, op))
            if e is not None:
                grid[r, c] = math.log10(max(e.ratio, 10**LOW)) if math.isfinite(e.ratio) else HIGH
    # The same colours as the page: a stepped map on log10(ratio), blue to 1 and red above.
    levels = np.linspace(LOW, HIGH, 61)
    colors = [_hex(ratio_rgb(10 ** ((a + b) / 2))) for a, b in itertools.pairwise(levels)]
    cmap = ListedColormap(colors).with_extremes(bad="#eeeeee")
    fig, ax = plt.subplots(
        figsize=(2.0 + 0.72 * len(cols), max(3.6, 2.4 + 0.27 * len(layers))), dpi=110
    )
    try:
        im = ax.imshow(
            np.clip(grid, LOW, HIGH), cmap=cmap, norm=BoundaryNorm(levels, cmap.N), aspect="auto"
        )
        # the ratio in every cell: the colour alone is hard to read back
        for r, layer in enumerate(layers):
            for c, (mode, op) in enumerate(cols):
                e = entries.get((mode, layer, op))
                if e is not None:
                    rgb = ratio_rgb(e.ratio)
                    ax.text(
                        c,
                        r,
                        _num(e.ratio),
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color=_ink(rgb),
                        fontweight="bold" if not e.passed else "normal",
                    )
        ax.set_xticks(
            range(len(cols)),
            [op if mode == "forward" else "attn (cached)" for mode, op in cols],
            rotation=40,
            ha="right",
            fontsize=8,
        )
        ax.set_yticks(
            range(len(layers)),
            [f"block {i}" for i in layers],
            fontsize=7 if len(layers) > 16 else 8,
        )
        first = trace.first_bad()
        if first is not None and first.layer is not None:
            c = next(c for c, (m, o) in enumerate(cols) if (m, o) == (first.mode, first.op))
            ax.add_patch(
                plt.Rectangle((c - 0.5, first.layer - 0.5), 1, 1, fill=False, lw=2.5, ec="black")
            )
        worst = trace.worst()
        bad = (
            f"\nFAIL: first over budget: {first.label} ({first.mode}, "
            f"{first.culprit}) at {_num(first.ratio)}"
            if first is not None
            else f"\nPASS: worst {worst.label} ({worst.mode}) at {_num(worst.ratio)}"
        )
        model = ", ".join(
            f"{o} {_num(entries[('forward', None, o)].ratio)}"
            for o in MODEL_OPS
            if ("forward", None, o) in entries
        )
        ax.set_title(
            f"{trace.case} {trace.dtype}: ratio = error / budget (log){bad}\n{model}", fontsize=9
        )
        bar = fig.colorbar(
            im,
            ax=ax,
            ticks=[math.log10(r) for r in LEGEND],
            orientation="horizontal",
            fraction=0.05,
            pad=0.18 if len(layers) < 8 else 0.08,
            aspect=50,
        )
        bar.ax.set_xticklabels([_num(r) for r in LEGEND], fontsize=7)
        bar.set_label("ratio (log scale; > 1 is over budget)", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
