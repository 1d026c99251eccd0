"""Token shards for training both twins: `prepare` turns text into uint16 .npy shards plus a
manifest.json, and `TokenLoader` serves memory-mapped (x, y) batches as int32 numpy arrays.

A batch is a set of random windows drawn from a generator seeded by (seed, step), so any step can be
recomputed: a run resumes exactly at any step, and `world_size` ranks together see exactly the
single-process global batch (rank r takes rows [r*batch_size, (r+1)*batch_size) of it).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptmod import corpus, fileio, tokenizer

FORMAT = "gptmod-shards-v1"
VOCAB_SIZE = 50257  # GPT-2's, <|endoftext|> included; every id fits in uint16
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per shard
_SHARD_NAME = re.compile(r"(train|val)_\d{3,}\.npy")
# GPT-2's pre-tokenizer never joins text across a newline with non-space on both sides, so cutting
# there and encoding the pieces gives the ids of the whole text, with bounded memory and progress.
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")
_CHUNK_CHARS = 1 << 20

PathLike = str | os.PathLike[str]
Inputs = PathLike | Traversable | Sequence[PathLike | Traversable]
Batch = tuple[np.ndarray, np.ndarray]


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name}={value!r}: must be an int >= {low}")


# ----------------------------------------------------------------------------- prepare


def _documents(inputs: Inputs) -> list[tuple[str, Any]]:
    """(source name for the manifest, readable file) per document, in order."""
    single = isinstance(inputs, str | os.PathLike) or not isinstance(inputs, Sequence)
    items = [inputs] if single else list(inputs)
    if not items:
        raise ValueError("inputs=[]: give a text file, a folder of .txt files or 'bundled'")
    docs: list[tuple[str, Any]] = []
    for item in items:
        if isinstance(item, str) and item == "bundled":  # a folder named "bundled" is "./bundled"
            docs += [(f"bundled:{name}", f) for name, f in corpus.bundled_files().items()]
        elif isinstance(item, str | os.PathLike):
            p = Path(item)
            # sorted, not recursive: the order (and so the shards) never depends on the OS
            if p.is_dir():
                files = sorted(f for f in p.iterdir() if f.suffix == ".txt" and f.is_file())
                if not files:
                    raise ValueError(f"{p}: folder has no .txt files (subfolders are not searched)")
                docs += [(str(f.resolve()), f) for f in files]
            elif p.is_file():
                docs.append((str(p.resolve()), p))
            else:
                raise FileNotFoundError(f"input not found: {p}")
        else:  # a Traversable, e.g. a value of corpus.bundled_files()
            docs.append((str(item), item))
    return docs


def _encode(name: str, file: Any, bar: tqdm) -> np.ndarray:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not UTF-8 text ({e})") from None
    pieces, start = [], 0
    while start < len(text):
        cut = (
            _SAFE_CUT.search(text, start + _CHUNK_CHARS)
            if len(text) - start > _CHUNK_CHARS
            else None
        )
        end = cut.end() if cut else len(text)
        try:
            pieces.append(np.asarray(tokenizer.encode(text[start:end]), dtype=np.uint16))
        except ValueError as e:  # a literal <|endoftext|> would silently join two documents
            raise ValueError(f"{name}: {e}") from None
        bar.update(len(text[start:end].encode("utf-8")))
        start = end
    return np.concatenate(pieces) if pieces else np.zeros(0, np.uint16)


def _write_npy(path: Path, ids: np.ndarray) -> None:
    with open(path, "xb") as f:
        np.save(f, ids, allow_pickle=False)  # made durable with the folder (fileio.atomic_folder)


class _ShardWriter:
    """Cuts one split's token stream into files of at most `shard_tokens` tokens."""

    def __init__(self, folder: Path, split: str, shard_tokens: int) -> None:
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.buf: list[np.ndarray] = []
        self.n = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, ids: np.ndarray) -> None:
        while len(ids):
            take = min(len(ids), self.shard_tokens - self.n)
            self.buf.append(ids[:take])
            self.n, ids = self.n + take, ids[take:]
            if self.n == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.n:
            name = f"{self.split}_{len(self.shards):03d}.npy"
            _write_npy(self.folder / name, np.concatenate(self.buf))
            self.shards.append({"file": name, "tokens": self.n})
            self.buf, self.n = [], 0


class ShardsExistError(FileExistsError):
    """The output folder holds a previous prepare's shards and overwrite was not given."""

    def __init__(self, folder: Path) -> None:
        super().__init__(
            f"{folder}: holds token shards already; pass overwrite=True "
            "(--overwrite) to replace them"
        )
        self.folder = folder


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Only an empty folder or one holding nothing but a previous prepare's
    output may be replaced."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        is_ours = (
            json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("format") == FORMAT
        )
    except (OSError, ValueError, AttributeError):
        is_ours = False
    foreign = sorted(
        p.name
        for p in out.iterdir()
        if p.name != "manifest.json" and not _SHARD_NAME.fullmatch(p.name)
    )
    if not is_ours or foreign:
        why = f"it holds {foreign[0]!r}" if is_ours else f"it has no {FORMAT} manifest.json"
        raise FileExistsError(
            f"{out}: folder is not empty and is not a gptmod shard folder "
            f"({why}); refusing to write"
        )
    if not overwrite:
        raise ShardsExistError(out)


def prepare(
    inputs: Inputs,
    out_dir: PathLike,
    *,
    val_fraction: float = 0.1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize documents into `out_dir`/{train,val}_NNN.npy (uint16) and
    manifest.json; return the manifest.

    `inputs`: a text file, a folder (its *.txt files, sorted, not recursive),
    "bundled" (the eight bundled plays), a Traversable, or a list of these. Each
    document is one file. The last `val_fraction` of each document's tokens goes
    to val and the rest to train; each part ends with <|endoftext|>.
    The folder is built beside `out_dir` and renamed into place, so
    `out_dir` is never half written. An existing `out_dir` must be empty, or
    hold only a previous prepare's output and `overwrite` be True.
    """
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, int | float)
        or not 0 <= val_fraction < 1
    ):
        raise ValueError(f"val_fraction={val_fraction!r}: must be a number in [0, 1)")
    _check_int("shard_tokens", shard_tokens, 1)
    out = Path(out_dir).resolve()  # the real folder, also for "." or a symlink
    _check_out_dir(out, overwrite)
    docs = _documents(inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a plain new folder, so out_dir gets the umask's mode (tempfile.mkdtemp's 0o700 would stick)
    with fileio.atomic_folder(out) as tmp:
        manifest = _write_shards(tmp, docs, val_fraction, shard_tokens, progress)
    return manifest


def _write_shards(
    folder: Path,
    docs: list[tuple[str, Any]],
    val_fraction: float,
    shard_tokens: int,
    progress: bool,
) -> dict[str, Any]:
    writers = {s: _ShardWriter(folder, s, shard_tokens) for s in SPLITS}
    records, eot = [], np.array([tokenizer.EOT_ID], np.uint16)
    sizes = [f.stat().st_size if isinstance(f, Path) else len(f.read_bytes()) for _, f in docs]
    with tqdm(
        total=sum(sizes),
        unit="B",
        unit_scale=True,
        desc="tokenize",
        file=sys.stderr,
        disable=not progress,
    ) as bar:
        for (name, file), done in zip(docs, itertools.accumulate(sizes), strict=True):
            ids = _encode(name, file, bar)
            # newline translation makes the text shorter than the file
            bar.update(max(0, done - bar.n))
            cut = len(ids) - int(len(ids) * val_fraction)
            record = {"source": name, "tokens": len(ids)}
            for split, part in zip(SPLITS, (ids[:cut], ids[cut:]), strict=True):
                record[f"{split}_tokens"] = len(part) + 1 if len(part) else 0
                if len(part):
                    writers[split].add(np.concatenate([part, eot]))
            records.append(record)
    for w in writers.values():
        w.flush()
    if not writers[
        "train"
    ].shards:  # checked before the folder is renamed into place: nothing is written
        what = (
            f"{len(docs)} document(s), 0 tokens"
            if not sum(r["tokens"] for r in records)
            else "no train tokens"
        )
        raise ValueError(
            f"the corpus is empty ({what}: {', '.join(n for n, _ in docs[:3])}"
            f"{', ...' if len(docs) > 3 else ''}); give text to tokenize"
        )
    manifest = {
        "format": FORMAT,
        "tokenizer": "gpt2",
        "tokenizer_sha256": tokenizer.RANKS_SHA256,
        "vocab_size": VOCAB_SIZE,
        "eot_id": tokenizer.EOT_ID,
        "dtype": "uint16",
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "splits": {
            s: {"tokens": sum(e["tokens"] for e in w.shards), "shards": w.shards}
            for s, w in writers.items()
        },
        "documents": records,
    }
    with open(
        folder / "manifest.json", "x", encoding="utf-8"
    ) as f:  # last, so it only ever lists whole shards
        json.dump(manifest, f, indent=1)
    return manifest


# ----------------------------------------------------------------------------- loading


def read_manifest(data_dir: PathLike) -> dict[str, Any]:
    """The manifest of a shard folder, checked against this format and the bundled tokenizer."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no manifest.json; create the shards with `gptmod prepare`"
        )
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict):
        raise ValueError(f"{path}: must hold a JSON object, not {type(m).__name__}")
    missing = [
        k for k in ("format", "dtype", "vocab_size", "tokenizer_sha256", "splits") if k not in m
    ]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")
    sha = tokenizer.RANKS_SHA256
    for key, want in (
        ("format", FORMAT),
        ("dtype", "uint16"),
        ("vocab_size", VOCAB_SIZE),
        ("tokenizer_sha256", sha),
    ):
        got = m.get(key) if isinstance(m, dict) else None
        if got != want:
            why = (
                " (the bundled GPT-2 tokenizer's; re-run prepare)"
                if key == "tokenizer_sha256"
                else ""
            )
            raise ValueError(f"{path}: {key}={got!r}: must be {want!r}{why}")
    if not isinstance(m["splits"], dict):
        raise ValueError(f"{path}: splits must be an object of split name -> {{tokens, shards}}")
    for split, entry in m["splits"].items():
        lacks = [k for k in ("tokens", "shards") if not isinstance(entry, dict) or k not in entry]
        if lacks:
            raise ValueError(f"{path}: split {split!r} is missing key(s) {', '.join(lacks)}")
        for i, shard in enumerate(entry["shards"]):
            lacks = [k for k in ("file", "tokens") if not isinstance(shard, dict) or k not in shard]
            if lacks:
                raise ValueError(
                    f"{path}: split {split!r} shard {i} is missing key(s) {', '.join(lacks)}"
                )
            # A bare name as prepare writes it: a path (absolute, a
            # separator, ..) would read outside the folder.
            if not isinstance(shard["file"], str) or not _SHARD_NAME.fullmatch(shard["file"]):
                raise ValueError(
                    f"{path}: split {split!r} shard {i} file={shard['file']!r}: must be a shard "
                    "name inside the folder such as train_000.npy (no path)"
                )
    return m


def _open_shard(path: Path, expected: int, manifest: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard listed in {manifest} is missing")
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable .npy shard ({e})") from None
    if ids.dtype != np.uint16 or ids.ndim != 1:
        raise ValueError(
            f"{path}: dtype {ids.dtype}, shape {ids.shape}: a shard must be 1-D uint16"
        )
    if len(ids) != expected:
        raise ValueError(f"{path}: has {len(ids)} tokens but {manifest} lists {expected}")
    # checked once here: JAX's gather would clamp a bad id silently
    top = int(ids.max()) if len(ids) else 0
    if top >= VOCAB_SIZE:
        raise ValueError(f"{path}: token id {top}: must be < vocab_size {VOCAB_SIZE}")
    return ids


class TokenLoader:
    """(x, y) int32 batches of shape (batch_size, block_size) from one
    split; y is x shifted by one token.

    `batch(step)` is a pure function of (seed, step, rank, world_size); windows never cross a shard
    boundary, and each shard is drawn in proportion to its number of windows (len - block_size).
    """

    def __init__(
        self,
        data_dir: PathLike,
        split: str,
        *,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        for name, value, low in (
            ("block_size", block_size, 1),
            ("batch_size", batch_size, 1),
            ("seed", seed, 0),
        ):
            _check_int(name, value, low)
        _check_int("world_size", world_size, 1)
        _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank={rank}: must be < world_size={world_size}")
        self.data_dir, self.split = Path(data_dir), split
        self.block_size, self.batch_size, self.seed = int(block_size), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.manifest = read_manifest(data_dir)
        mpath = self.data_dir / "manifest.json"
        if split not in self.manifest["splits"]:
            raise ValueError(
                f"split={split!r}: must be one of {', '.join(map(repr, self.manifest['splits']))}"
            )
        entries = self.manifest["splits"][split]["shards"]
        if not entries:
            raise ValueError(
                f"{mpath}: split {split!r} has no tokens (prepared with val_fraction=0?)"
            )
        self.shards = [_open_shard(self.data_dir / e["file"], e["tokens"], mpath) for e in entries]
        self._windows = np.array([max(0, len(s) - self.block_size) for s in self.shards], np.int64)
        if not self._windows.any():
            big = max(range(len(entries)), key=lambda i: len(self.shards[i]))
            raise ValueError(
                f"block_size={block_size}: a window needs block_size+1 tokens, more than any "
                f"{split!r} shard has; the largest, {self.data_dir / entries[big]['file']}, "
                f"has {len(self.shards[big])}"
            )
        self._ends = np.cumsum(self._windows)

    @property
    def n_tokens(self) -> int:
        """Tokens in this split."""
        return sum(len(s) for s in self.shards)

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one global batch (all ranks)."""
        return self.world_size * self.batch_size * self.block_size

    def _gather(self, idx: np.ndarray) -> Batch:
        """Windows by global window index (shards laid end to end, each
        counting len - block_size windows)."""
        shard = np.searchsorted(self._ends, idx, side="right")
        start = idx - (self._ends[shard] - self._windows[shard])
        buf = np.stack(
            [self.shards[s][o : o + self.block_size + 1] for s, o in zip(shard, start, strict=True)]
        )
        # int32 for both frameworks' embedding gathers; uint16 is the storage format
        buf = buf.astype(np.int32)
        return np.ascontiguousarray(buf[:, :-1]), np.ascontiguousarray(buf[:, 1:])

    def _mine(self, rows: np.ndarray) -> np.ndarray:
        return rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def batch(self, step: int) -> Batch:
        """This rank's share of the global batch of `step`; the same for the same (seed, step)."""
        _check_int("step", step, 0)
        rng = np.random.default_rng([self.seed, int(step)])
        return self._gather(
            self._mine(rng.integers(0, self._ends[-1], size=self.world_size * self.batch_size))
        )

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        """batch(start_step), batch(start_step + 1), ... without end: resuming is starting later."""
        _check_int("start_step", start_step, 0)
        return (self.batch(step) for step in itertools.count(int(start_step)))

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(0)

    def eval_batches(self, n_batches: int) -> Iterator[Batch]:
        """`n_batches` fixed batches of windows spread evenly over the split, independent of step
        and seed, so validation losses compare across steps and runs. Batch b takes every
        n_batches-th window, so each batch spans the whole split."""
        _check_int("n_batches", n_batches, 1)
        g = self.world_size * self.batch_size
        grid = (
            np.linspace(0, self._ends[-1] - 1, n_batches * g)
            .round()
            .astype(np.int64)
            .reshape(g, n_batches)
        )
        return (self._gather(self._mine(grid[:, b])) for b in range(n_batches))
