"""Token shards: exact round trip, per-document split, atomic writes, and a loader that is
deterministic, resumable, rank-sharded and refuses damaged shards by name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from gptmod import corpus, data, tokenizer
from gptmod.data import TokenLoader, prepare

from conftest import refuse_folder_rename

EOT = tokenizer.EOT_ID
TEXTS = {
    "a.txt": "To be, or not to be, that is the question:\nWhether 'tis "
    "nobler in the mind to suffer\n" * 6,
    "b.txt": "Double, double toil and trouble;\nFire burn and cauldron bubble.\n" * 9,
}


def write_texts(folder: Path, texts: dict[str, str] = TEXTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def split_tokens(out: Path, split: str) -> np.ndarray:
    m = json.loads((out / "manifest.json").read_text())
    shards = [np.load(out / e["file"], allow_pickle=False) for e in m["splits"][split]["shards"]]
    return np.concatenate(shards) if shards else np.zeros(0, np.uint16)


def synthetic(tmp_path: Path, sizes: list[int], name: str = "syn") -> Path:
    """A shard folder whose train shard i holds the consecutive ids 10000*i, 10000*i + 1, ...: a
    window's shard and offset can be read off its first id."""
    out = tmp_path / name
    m = prepare(write_texts(tmp_path / f"{name}_src"), out, val_fraction=0, progress=False)
    for e in m["splits"]["train"]["shards"]:
        (out / e["file"]).unlink()
    shards = []
    for i, n in enumerate(sizes):
        np.save(out / f"train_{i:03d}.npy", np.arange(10000 * i, 10000 * i + n, dtype=np.uint16))
        shards.append({"file": f"train_{i:03d}.npy", "tokens": n})
    m["splits"]["train"] = {"tokens": sum(sizes), "shards": shards}
    (out / "manifest.json").write_text(json.dumps(m))
    return out


# ----------------------------------------------------------------------------- prepare


def test_round_trip_and_split_at_the_right_token(tmp_path):
    m = prepare(
        write_texts(tmp_path / "src"),
        tmp_path / "out",
        val_fraction=0.25,
        shard_tokens=50,
        progress=False,
    )
    ids = {n: tokenizer.encode(t) for n, t in TEXTS.items()}
    cuts = {n: len(v) - int(len(v) * 0.25) for n, v in ids.items()}
    train = [t for n in TEXTS for t in [*ids[n][: cuts[n]], EOT]]
    val = [t for n in TEXTS for t in [*ids[n][cuts[n] :], EOT]]
    assert split_tokens(tmp_path / "out", "train").tolist() == train
    assert split_tokens(tmp_path / "out", "val").tolist() == val
    # each document comes back whole from its train and val parts
    pieces = tokenizer.decode(train + val).split(tokenizer.EOT)
    assert [pieces[0] + pieces[2], pieces[1] + pieces[3]] == list(TEXTS.values())
    for split in ("train", "val"):
        sizes = [e["tokens"] for e in m["splits"][split]["shards"]]
        assert max(sizes) <= 50 and all(s == 50 for s in sizes[:-1]) and len(sizes) > 1
        for e in m["splits"][split]["shards"]:
            shard = np.load(tmp_path / "out" / e["file"], allow_pickle=False)
            assert shard.dtype == np.uint16 and len(shard) == e["tokens"]


def test_manifest_contents(tmp_path):
    src = write_texts(tmp_path / "src")
    m = prepare(src, tmp_path / "out", val_fraction=0.1, progress=False)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m
    assert m["format"] == data.FORMAT and m["dtype"] == "uint16" and m["vocab_size"] == 50257
    assert m["tokenizer_sha256"] == tokenizer.RANKS_SHA256 and m["eot_id"] == EOT
    assert [d["source"] for d in m["documents"]] == [
        str((src / n).resolve()) for n in sorted(TEXTS)
    ]
    for d, text in zip(m["documents"], TEXTS.values(), strict=True):
        n = len(tokenizer.encode(text))
        assert (
            d["tokens"] == n
            and d["val_tokens"] == int(n * 0.1) + 1
            and d["train_tokens"] + d["val_tokens"] == n + 2
        )
    for split in ("train", "val"):
        assert m["splits"][split]["tokens"] == sum(d[f"{split}_tokens"] for d in m["documents"])
        assert m["splits"][split]["tokens"] == len(split_tokens(tmp_path / "out", split))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json",
        "train_000.npy",
        "val_000.npy",
    ]


def test_inputs_folder_list_and_bundled(tmp_path, monkeypatch):
    src = write_texts(tmp_path / "src", {"b.txt": "bee\n", "a.txt": "ay\n", "notes.md": "no\n"})
    write_texts(src / "sub", {"c.txt": "not recursive\n"})
    m = prepare([src, src / "b.txt"], tmp_path / "out", val_fraction=0, progress=False)
    assert [Path(d["source"]).name for d in m["documents"]] == ["a.txt", "b.txt", "b.txt"]
    assert m["splits"]["val"] == {"tokens": 0, "shards": []}
    # "bundled" is the eight plays; cutting the text into chunks at safe newlines changes no id
    monkeypatch.setattr(data, "_CHUNK_CHARS", 3000)
    m = prepare("bundled", tmp_path / "plays", val_fraction=0, progress=False)
    plays = corpus.bundled_files()
    assert [d["source"] for d in m["documents"]] == [f"bundled:{p}" for p in plays]
    whole = [
        t for f in plays.values() for t in [*tokenizer.encode(f.read_text(encoding="utf-8")), EOT]
    ]
    assert split_tokens(tmp_path / "plays", "train").tolist() == whole


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    prepare(write_texts(tmp_path / "src"), tmp_path / "out", progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "tokenize" in err and "100%" in err


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"val_fraction": 1.0}, ValueError, r"val_fraction=1.0: must be a number in \[0, 1\)"),
        ({"val_fraction": -0.1}, ValueError, r"val_fraction=-0.1"),
        ({"shard_tokens": 0}, ValueError, r"shard_tokens=0: must be an int >= 1"),
        ({"inputs": "missing.txt"}, FileNotFoundError, r"input not found: missing.txt"),
        ({"inputs": []}, ValueError, r"inputs=\[\]"),
    ],
)
def test_prepare_rejects_bad_arguments(tmp_path, kwargs, error, match):
    kwargs = {
        "inputs": write_texts(tmp_path / "src"),
        "out_dir": tmp_path / "out",
        "progress": False,
        **kwargs,
    }
    with pytest.raises(error, match=match):
        prepare(**kwargs)
    assert not (tmp_path / "out").exists()


def test_prepare_names_the_bad_input_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty}: folder has no .txt files"):
        prepare(empty, tmp_path / "out", progress=False)
    eot = write_texts(tmp_path / "eot", {"joined.txt": "one<|endoftext|>two"})
    with pytest.raises(ValueError, match=r"joined.txt: .*endoftext"):
        prepare(eot, tmp_path / "out", progress=False)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text"):
        prepare(tmp_path / "latin1.txt", tmp_path / "out", progress=False)
    # no temp folder left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "eot", "latin1.txt"]


def test_overwrite_rules(tmp_path):
    src = write_texts(tmp_path / "src")
    foreign = tmp_path / "foreign"
    write_texts(foreign, {"keep.txt": "mine"})
    for overwrite in (False, True):
        with pytest.raises(
            FileExistsError,
            match=f"{foreign}: folder is not empty and is not a gptmod shard folder",
        ):
            prepare(src, foreign, overwrite=overwrite, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine
    prepare(src, out, val_fraction=0, progress=False)
    with pytest.raises(
        FileExistsError, match=f"{out}: holds token shards already; pass overwrite=True"
    ):
        prepare(src, out, progress=False)
    # a shard folder with a user's file in it is not replaced either
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"it holds 'notes.txt'"):
        prepare(src, out, overwrite=True, progress=False)
    (out / "notes.txt").unlink()
    m = prepare(src, out, val_fraction=0.5, overwrite=True, progress=False)
    assert (
        json.loads((out / "manifest.json").read_text())["val_fraction"] == 0.5 == m["val_fraction"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "out", "src"]


def test_crash_mid_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    src, out = write_texts(tmp_path / "src"), tmp_path / "out"
    real, calls = data._write_npy, []

    def crash_on_third(path, ids):
        calls.append(path.name)
        if len(calls) == 3:
            raise OSError("disk full")
        real(path, ids)

    monkeypatch.setattr(data, "_write_npy", crash_on_third)
    with pytest.raises(OSError, match="disk full"):
        prepare(src, out, shard_tokens=40, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no out_dir, no temp folder
    # over a previous shard folder: the crash leaves the previous one exactly as it was
    monkeypatch.setattr(data, "_write_npy", real)
    before = prepare(src, out, val_fraction=0, progress=False)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(data, "_write_npy", crash_on_third)
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        prepare(src, out, shard_tokens=40, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert TokenLoader(out, "train", block_size=8, batch_size=2, seed=0).manifest == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_failed_final_rename_puts_the_previous_folder_back(tmp_path, monkeypatch):
    src, out = write_texts(tmp_path / "src"), tmp_path / "out"
    prepare(src, out, val_fraction=0, progress=False)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    refuse_folder_rename(monkeypatch)
    with pytest.raises(OSError, match="rename refused"):
        prepare(src, out, val_fraction=0.5, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# ----------------------------------------------------------------------------- loader


def test_batches_are_shifted_windows_within_one_shard(tmp_path):
    out = synthetic(tmp_path, [40, 120, 9, 60])  # shard 2 is shorter than a window
    loader = TokenLoader(out, "train", block_size=8, batch_size=16, seed=3)
    assert loader.n_tokens == 229 and loader.tokens_per_step == 128
    counts = np.zeros(4)
    for x, y in (loader.batch(s) for s in range(200)):
        assert x.shape == y.shape == (16, 8) and x.dtype == y.dtype == np.int32
        assert x.flags.c_contiguous and y.flags.c_contiguous
        # consecutive ids: y is x shifted and no window crosses a shard
        np.testing.assert_array_equal(y, x + 1)
        shard, start = x[:, 0] // 10000, x[:, 0] % 10000
        assert np.all(start + 8 < np.array([40, 120, 9, 60])[shard])
        counts += np.bincount(shard, minlength=4)
    windows = np.array([32, 112, 0, 52])
    np.testing.assert_allclose(counts / counts.sum(), windows / windows.sum(), atol=0.02)


def test_determinism_and_resume(tmp_path):
    out = synthetic(tmp_path, [500, 300])
    a = TokenLoader(out, "train", block_size=16, batch_size=4, seed=7)
    b = TokenLoader(out, "train", block_size=16, batch_size=4, seed=7)
    np.testing.assert_array_equal(a.batch(5)[0], b.batch(5)[0])
    assert not np.array_equal(a.batch(5)[0], a.batch(6)[0])
    assert not np.array_equal(
        a.batch(5)[0], TokenLoader(out, "train", block_size=16, batch_size=4, seed=8).batch(5)[0]
    )
    head = [x for (x, _), _ in zip(a, range(10), strict=False)]
    tail = [x for (x, _), _ in zip(b.batches(6), range(4), strict=False)]
    for x, t in zip(head[6:], tail, strict=True):
        np.testing.assert_array_equal(x, t)


def test_two_ranks_see_exactly_the_global_batch(tmp_path):
    out = synthetic(tmp_path, [500, 300])
    whole = TokenLoader(out, "train", block_size=16, batch_size=6, seed=1)
    ranks = [
        TokenLoader(out, "train", block_size=16, batch_size=3, seed=1, rank=r, world_size=2)
        for r in (0, 1)
    ]
    assert ranks[0].tokens_per_step == whole.tokens_per_step
    for step in (0, 1, 99):
        for i in (0, 1):
            np.testing.assert_array_equal(
                np.concatenate([r.batch(step)[i] for r in ranks]), whole.batch(step)[i]
            )
    for got, want in zip(
        zip(*(r.eval_batches(3) for r in ranks), strict=True), whole.eval_batches(3), strict=True
    ):
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), want[0])


def test_eval_batches_are_fixed_and_span_the_split(tmp_path):
    out = synthetic(tmp_path, [500, 300])
    loader = TokenLoader(out, "train", block_size=16, batch_size=4, seed=1)
    first = [x for x, _ in loader.eval_batches(5)]
    loader.batch(3)
    again = [
        x for x, _ in TokenLoader(out, "train", block_size=16, batch_size=4, seed=2).eval_batches(5)
    ]
    assert len(first) == 5
    for x, y in zip(first, again, strict=True):
        np.testing.assert_array_equal(x, y)
    starts = np.sort(np.concatenate([x[:, 0] for x in first]))
    assert len(set(starts.tolist())) == 20 and starts[0] == 0 and starts[-1] == 10000 + 300 - 17
    # one batch already reaches both shards
    assert {int(s) for s in first[0][:, 0] // 10000} == {0, 1}


def test_prepared_val_split_loads(tmp_path):
    prepare(write_texts(tmp_path / "src"), tmp_path / "out", val_fraction=0.25, progress=False)
    loader = TokenLoader(tmp_path / "out", "val", block_size=8, batch_size=2, seed=0)
    val = split_tokens(tmp_path / "out", "val")
    x, y = loader.batch(0)
    for row_x, row_y in zip(x, y, strict=True):
        start = next(i for i in range(len(val) - 8) if np.array_equal(val[i : i + 8], row_x))
        np.testing.assert_array_equal(val[start + 1 : start + 9], row_y)


# ----------------------------------------------------------------------------- loader errors


def edit_manifest(out: Path, **changes) -> None:
    m = json.loads((out / "manifest.json").read_text())
    m.update(changes)
    (out / "manifest.json").write_text(json.dumps(m))


def test_damaged_folders_are_refused_by_name(tmp_path):
    load = lambda out, **kw: TokenLoader(
        out, kw.pop("split", "train"), block_size=8, batch_size=2, seed=0, **kw
    )
    out = synthetic(tmp_path, [100, 50])
    shard = out / "train_001.npy"
    manifest = out / "manifest.json"
    good = shard.read_bytes()

    np.save(shard, np.arange(50, dtype=np.float32))
    with pytest.raises(
        ValueError, match=f"{shard}: dtype float32, shape \\(50,\\): a shard must be 1-D uint16"
    ):
        load(out)
    bad = np.arange(50, dtype=np.uint16)
    bad[7] = 60000
    np.save(shard, bad)
    with pytest.raises(ValueError, match=f"{shard}: token id 60000: must be < vocab_size 50257"):
        load(out)
    np.save(shard, np.arange(40, dtype=np.uint16))
    with pytest.raises(ValueError, match=f"{shard}: has 40 tokens but {manifest} lists 50"):
        load(out)
    shard.write_bytes(b"not a numpy file")
    with pytest.raises(ValueError, match=f"{shard}: not a readable .npy shard"):
        load(out)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard}: shard listed in {manifest} is missing"):
        load(out)
    shard.write_bytes(good)
    load(out)

    with pytest.raises(
        ValueError, match=f"block_size=100: .* the largest, {out / 'train_000.npy'}, has 100"
    ):
        TokenLoader(out, "train", block_size=100, batch_size=2, seed=0)
    TokenLoader(out, "train", block_size=99, batch_size=2, seed=0)
    with pytest.raises(ValueError, match=r"split='test': must be one of 'train', 'val'"):
        load(out, split="test")
    with pytest.raises(ValueError, match=f"{manifest}: split 'val' has no tokens"):
        load(out, split="val")

    edit_manifest(out, tokenizer_sha256="0" * 64)
    with pytest.raises(
        ValueError, match=f"{manifest}: tokenizer_sha256='0+': must be '{tokenizer.RANKS_SHA256}'"
    ):
        load(out)
    edit_manifest(out, tokenizer_sha256=tokenizer.RANKS_SHA256, dtype="uint32")
    with pytest.raises(ValueError, match=f"{manifest}: dtype='uint32': must be 'uint16'"):
        load(out)
    manifest.write_text("{")
    with pytest.raises(ValueError, match=f"{manifest}: not valid JSON"):
        load(out)
    manifest.unlink()
    with pytest.raises(FileNotFoundError, match=f"{manifest}: no manifest.json"):
        load(out)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_size": 0}, "block_size=0: must be an int >= 1"),
        ({"batch_size": 2.0}, "batch_size=2.0: must be an int >= 1"),
        ({"seed": -1}, "seed=-1: must be an int >= 0"),
        ({"world_size": 0}, "world_size=0: must be an int >= 1"),
        ({"rank": 2, "world_size": 2}, "rank=2: must be < world_size=2"),
        ({"rank": -1}, "rank=-1: must be an int >= 0"),
    ],
)
def test_bad_loader_arguments(tmp_path, kwargs, match):
    out = synthetic(tmp_path, [100])
    with pytest.raises(ValueError, match=re.escape(match)):
        TokenLoader(out, "train", **{"block_size": 8, "batch_size": 2, "seed": 0, **kwargs})
    loader = TokenLoader(out, "train", block_size=8, batch_size=2, seed=0)
    for call, arg in ((loader.batch, -1), (loader.batches, -1), (loader.eval_batches, 0)):
        with pytest.raises(ValueError, match="must be an int"):
            call(arg)
