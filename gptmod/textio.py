"""Small input helpers of the command line: text files read with a named
error, and the argparse type of seeds.

Every error names the file (or flag) and says why, so `gptmod.cli.main` can print it as one line.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
from pathlib import Path
from typing import Any

# seeds must fit a signed 64-bit integer (JAX's PRNG keys and numpy's generators take them)
SEED_LIMIT = 2**63


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def check_regular_file(path: str | os.PathLike[str], *, what: str = "") -> Path:
    """`path` as a Path if it is a regular file (symlinks followed); else
    FileNotFoundError ("no such file") or ValueError naming what it is (a
    directory, a FIFO, a device), prefixed by `what` (e.g. "--text")."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{label}: no such file") from None
    except OSError as e:
        raise OSError(f"{label}: cannot read it ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{label}: not a regular file ({_kind(mode)}); give a text file")
    return path


def read_text(path: str | os.PathLike[str], *, what: str = "") -> str:
    """The UTF-8 text of a regular file. Errors name the file (and `what`, e.g. the flag) and the
    reason: no such file; not a regular file (a FIFO, a directory, a device); not UTF-8 at byte
    offset N; unreadable."""
    path = check_regular_file(path, what=what)
    label = f"{what} {path}" if what else str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OSError(f"{label}: cannot read it ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{label}: not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset {e.start} "
            f"({e.reason}); re-encode the file as UTF-8"
        ) from None


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A JSON file that holds one object (a config.json, tokenizer_config.json, ...), None when the
    file is absent. Invalid JSON, or JSON that is not an object, is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def seed_arg(text: str) -> int:
    """argparse type of a --seed: an int in [0, 2**63). argparse adds the flag to the message."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an integer (a seed is an int in [0, 2**63))"
        ) from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(
            f"{value} is outside [0, 2**63): a seed must fit a signed 64-bit integer"
        )
    return value
