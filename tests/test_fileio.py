"""gptmod.fileio: a write replaces its target whole, or leaves it and no temporary behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gptmod import fileio

from conftest import refuse_folder_rename


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("existing", [True, False])
def test_a_failed_file_write_leaves_the_old_file_and_no_temp_file(tmp_path, existing):
    path = tmp_path / "f.json"
    if existing:
        path.write_text("old")

    def half_write(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt("power cut")

    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write(path, half_write)
    if existing:
        assert path.read_text() == "old"
    assert _names(tmp_path) == (["f.json"] if existing else [])


def test_a_failed_rename_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def refuse(a, b):
        raise OSError("rename refused")

    monkeypatch.setattr(fileio.os, "replace", refuse)
    with pytest.raises(OSError, match="rename refused"):
        fileio.atomic_write_text(path, "new")
    assert path.read_text() == "old" and _names(tmp_path) == ["f.txt"]


def test_a_write_replaces_the_file(tmp_path):
    path = tmp_path / "f.bin"
    fileio.atomic_write_bytes(path, b"one")
    fileio.atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    fileio.atomic_write_text(path, "é\n")
    assert path.read_bytes() == "é\n".encode()  # UTF-8, newline untranslated
    assert _names(tmp_path) == ["f.bin"]


def test_a_writer_may_replace_the_temp_file_itself(tmp_path):
    """As safetensors' save_file does: it writes its own temp file and renames it onto ours."""

    def own_temp(tmp: Path) -> None:
        mine = tmp.with_name("mine")
        mine.write_bytes(b"data")
        os.chmod(mine, 0o600)
        os.replace(mine, tmp)

    fileio.atomic_write(tmp_path / "w", own_temp)
    assert (tmp_path / "w").read_bytes() == b"data" and _names(tmp_path) == ["w"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_file_modes(tmp_path):
    """A new file gets the umask's mode (not a writer's 0o600 temp file's); a replaced one keeps
    its mode, a read-only one included."""

    def private(tmp: Path) -> None:
        tmp.write_bytes(b"x")
        os.chmod(tmp, 0o600)

    umask = os.umask(0o022)
    try:
        fileio.atomic_write(tmp_path / "new", private)
        assert (tmp_path / "new").stat().st_mode & 0o777 == 0o644
        os.chmod(tmp_path / "new", 0o444)
        fileio.atomic_write(tmp_path / "new", private)
    finally:
        os.umask(umask)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o444


def _fill(folder: Path, text: str) -> None:
    (folder / "a.txt").write_text(text)
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text(text)


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("existing", [True, False])
def test_a_failed_folder_write_leaves_the_old_folder_and_no_temp_folder(tmp_path, existing):
    dest = tmp_path / "out"
    if existing:
        dest.mkdir()
        _fill(dest, "old")
    with pytest.raises(OSError, match="disk full"), fileio.atomic_folder(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.")
        (tmp / "a.txt").write_text("half")
        raise OSError("disk full")
    if existing:
        assert _tree(dest) == {"a.txt": "old", "sub/b.txt": "old"}
    assert _names(tmp_path) == (["out"] if existing else [])


def test_a_failed_folder_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    dest.mkdir()
    _fill(dest, "old")
    refuse_folder_rename(monkeypatch)
    with pytest.raises(OSError, match="rename refused"), fileio.atomic_folder(dest) as tmp:
        _fill(tmp, "new")
    assert _tree(dest) == {"a.txt": "old", "sub/b.txt": "old"}
    assert _names(tmp_path) == ["out"]


@pytest.mark.parametrize("existing", ["", "empty", "full"])
def test_a_folder_write_replaces_the_folder(tmp_path, existing):
    dest = tmp_path / "out"
    if existing:
        dest.mkdir()
    if existing == "full":
        _fill(dest, "old")
        (dest / "gone.txt").write_text("old")
    with fileio.atomic_folder(dest) as tmp:
        _fill(tmp, "new")
    assert _tree(dest) == {"a.txt": "new", "sub/b.txt": "new"}
    assert _names(tmp_path) == ["out"]  # the old folder deleted, nothing left beside it


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_a_folder_gets_the_umask_mode_not_mkdtemps(tmp_path):
    """data.prepare and hf.write_folder rely on it: their folder is the temporary folder, renamed,
    so a 0o700 temporary (tempfile.mkdtemp) would become the result's mode."""
    umask = os.umask(0o022)
    try:
        with fileio.atomic_folder(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_move_aside_takes_the_name_away_in_one_rename(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    old = fileio.move_aside(tmp_path / "d")
    assert not (tmp_path / "d").exists() and old.parent == tmp_path
    assert old.name.startswith(".d.") and old.name.endswith(".old")
    assert (old / "f").read_text() == "x"


def test_fsync_dir_is_a_no_op_where_a_folder_cannot_be_opened(tmp_path):
    fileio.fsync_dir(tmp_path)
    fileio.fsync_dir(tmp_path / "missing")  # no error
