"""Loss curves from training logs (`gptmod plot`), drawn with matplotlib's file-only Agg backend."""

from __future__ import annotations

from pathlib import Path

from gptmod import fileio
from gptmod.training import RunLog


def read_log(path: Path) -> list[dict]:
    """A run folder or its log.jsonl -> the rows; errors name the file."""
    path = Path(path)
    log = path / "log.jsonl" if path.is_dir() else path
    if not log.is_file():
        raise FileNotFoundError(f"no training log at {log}")
    rows = RunLog.read(log)
    if not rows:
        raise ValueError(f"{log}: the log is empty")
    return rows


def train_loss_gap(a: list[dict], b: list[dict]) -> float | None:
    """Largest |train loss difference| over the steps both logs have (None if they share none)."""
    la, lb = {r["step"]: r["loss"] for r in a}, {r["step"]: r["loss"] for r in b}
    common = la.keys() & lb.keys()
    return max(abs(la[s] - lb[s]) for s in common) if common else None


def plot_logs(paths: list[Path], out: Path, *, title: str = "training loss") -> float | None:
    """Draw every log on one figure (train solid, val dashed with markers)
    and write `out` atomically.
    Returns the train-loss gap between the first two logs, when there are two or more."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    logs = [(Path(p), read_log(p)) for p in paths]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for i, (path, rows) in enumerate(logs):
        name = path.name if path.is_dir() else path.parent.name
        label = f"{rows[0].get('framework', '?')}: {name}"
        color = f"C{i}"
        ax.plot(
            [r["step"] for r in rows],
            [r["loss"] for r in rows],
            color=color,
            lw=1.2,
            label=f"{label} train",
        )
        val = [r for r in rows if "val_loss" in r]
        if val:
            ax.plot(
                [r["step"] for r in val],
                [r["val_loss"] for r in val],
                color=color,
                ls="--",
                marker="o",
                ms=3,
                label=f"{label} val",
            )
    gap = train_loss_gap(logs[0][1], logs[1][1]) if len(logs) > 1 else None
    ax.set(
        xlabel="step",
        ylabel="loss (nats/token)",
        title=title if gap is None else f"{title} (max train gap {gap:.3g})",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:  # always a PNG, whatever `out`'s suffix
        fileio.atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return gap
