"""The figures of a run as PNGs: decode tokens/s and time to first token against batch size, and
per-token decode time against context (KV cache and recompute)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptmod import fileio


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        fileio.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


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
