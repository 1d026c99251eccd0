"""The bundled Shakespeare demo corpus (eight public-domain plays, package data; see its README)."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable


def bundled_files() -> dict[str, Traversable]:
    """Play name -> file, sorted by name."""
    folder = resources.files("gptmod") / "assets" / "shakespeare"
    return {
        p.name[:-4]: p
        for p in sorted(folder.iterdir(), key=lambda p: p.name)
        if p.name.endswith(".txt")
    }


def bundled_text(play: str) -> str:
    """The text of one bundled play, e.g. "hamlet"."""
    files = bundled_files()
    if play not in files:
        raise ValueError(f"no bundled play {play!r}; bundled plays are {', '.join(files)}")
    return files[play].read_text(encoding="utf-8")
