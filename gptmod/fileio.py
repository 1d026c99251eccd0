"""Atomic writes: a file or a folder reaches its name whole, or not at all.

Each writer builds its target beside it under a hidden, uniquely named temporary name (the same
folder, so the rename is atomic), makes it durable (fsync), renames it into place and fsyncs the
folder. A crash therefore leaves the old content or the new, never half of either; on any error,
KeyboardInterrupt included, the temporary is removed and the target left as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

PathLike = str | os.PathLike[str]


def fsync_dir(path: PathLike) -> None:
    """Persist the renames in folder `path` (POSIX); a no-op where folders cannot be opened or
    fsynced (Windows, some network file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path, kind: str) -> Path:
    """A hidden name beside `path` that no other writer picks: .NAME.<12 hex>.KIND"""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.{kind}")


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> None:
    """Write the file `path` through `write(tmp)`, which fills the temporary file `tmp` (opening it
    for writing, or replacing it as writers that go through their own temp file do).

    The result keeps an existing file's mode; a new file gets 0o666 less the umask, as any new
    file does (not the 0o600 of such writers' own temp files)."""
    path = Path(path)
    tmp = _temp_name(path, "tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
    try:
        mode = stat.S_IMODE((path if path.is_file() else tmp).stat().st_mode)
        write(tmp)
        with open(tmp, "r+b") as f:  # `write` may have closed its own handle: fsync from here
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # after the fsync, so a read-only mode can still be kept
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically (`atomic_write`), newlines untranslated."""
    atomic_write_bytes(path, text.encode("utf-8"))


def move_aside(path: PathLike) -> Path:
    """Rename `path` to a hidden name beside it and return that name: one atomic step that takes a
    file or folder away from its name before it is deleted, so a crash mid-delete never leaves
    half of it under that name."""
    path = Path(path)
    old = _temp_name(path, "old")
    os.replace(path, old)
    return old


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            continue
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(folder)


@contextlib.contextmanager
def atomic_folder(dest: PathLike) -> Iterator[Path]:
    """Yield a new empty folder beside `dest` to fill; when the block ends without error, every file
    in it is made durable and the folder renamed to `dest`.

    An existing `dest` is moved aside first (no platform renames a folder over a non-empty one), put
    back if the rename fails, and deleted after it. On any error the temporary folder is removed and
    `dest` left untouched. The folder is made by a plain mkdir, so `dest` ends with 0o777 less the
    umask, as any new folder (tempfile.mkdtemp's 0o700 would become its mode). `dest`'s parent must
    exist."""
    dest = Path(dest)
    tmp = _temp_name(dest, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if dest.exists():
            old = move_aside(dest)
            try:
                os.replace(tmp, dest)
            except BaseException:
                os.replace(old, dest)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(dest.parent)
