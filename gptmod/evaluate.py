"""Next-token loss and perplexity of a model on text or token shards (`gptmod eval`), in
non-overlapping windows, with either twin's own `loss_fn`.

Each window holds block + 1 tokens and scores `block` next-token predictions; consecutive windows
share one token, so every token past the first is predicted once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptmod.pretrained import Pretrained

# Text whose ids tell GPT-2's tokenizer from another one (a `gptmod prepare` folder is GPT-2 ids).
_PROBE = "Hello, world! It's 1604."


@dataclass
class Score:
    """Mean loss over `tokens` scored predictions, of `all_tokens` in whole windows."""

    loss: float
    tokens: int
    all_tokens: int
    block: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def text_stream(p: Pretrained, path: Path) -> np.ndarray:
    """A UTF-8 text file as token ids of the model's own tokenizer."""
    from gptmod import textio

    if p.tokenizer is None:
        raise ValueError(
            f"{p.name} has no tokenizer ({p.report.tokenizer}), so it cannot read --text"
        )
    text = textio.read_text(path, what="--text")
    try:
        return np.asarray(p.tokenizer.encode(text), np.int64)
    except ValueError as e:
        raise ValueError(f"--text {path}: {e}") from None


def shard_streams(p: Pretrained, folder: Path) -> tuple[list[np.ndarray], str]:
    """The val split of a `gptmod prepare` folder (train when it has none), memory-mapped, and its
    name in words. Its ids are GPT-2's, so a model with another tokenizer is refused."""
    from gptmod import data, tokenizer

    tok = p.tokenizer
    if tok is not None and tok.encode(_PROBE, add_bos=False) != tokenizer.encode(_PROBE):
        raise ValueError(
            f"--data {folder}: its shards are GPT-2 token ids, but {p.name} has "
            f"another tokenizer ({p.report.tokenizer}); use --text with the raw text instead"
        )
    manifest = data.read_manifest(folder)
    split = "val" if manifest["splits"].get("val", {}).get("tokens") else "train"
    entries = manifest["splits"][split]["shards"]
    streams = [np.load(folder / e["file"], mmap_mode="r", allow_pickle=False) for e in entries]
    return streams, f"{folder} ({split} split)"


def windows(
    streams: list[np.ndarray], block: int, vocab_size: int, source: str
) -> list[np.ndarray]:
    """Every whole window of block + 1 tokens, stepping by `block`; ids checked against the
    vocabulary, and at least one window."""
    if max(int(t.max(initial=0)) for t in streams) >= vocab_size:
        raise ValueError(f"{source}: token ids reach past the model's vocab_size={vocab_size}")
    out = [t[i : i + block + 1] for t in streams for i in range(0, len(t) - block, block)]
    if not out:
        longest = max(len(t) for t in streams)
        raise ValueError(
            f"{source}: {longest} tokens; a window of --block-size {block} needs {block + 1} "
            "(give a smaller --block-size)"
        )
    return out


def score(
    model: Any,
    framework: str,
    wins: list[np.ndarray],
    *,
    batch_size: int,
    max_batches: int | None = None,
) -> Score:
    """Mean next-token loss of `model` (a twin of `framework`) over `wins`, `batch_size` windows a
    batch, at most `max_batches` batches."""
    block = len(wins[0]) - 1
    batches = [
        np.stack(wins[i : i + batch_size]).astype(np.int32) for i in range(0, len(wins), batch_size)
    ][:max_batches]
    batch_loss = _torch_loss(model) if framework == "torch" else _jax_loss(model)
    total, n = 0.0, 0
    for b in batches:
        total += batch_loss(b) * b.shape[0] * block
        n += b.shape[0] * block
    return Score(total / n, n, len(wins) * block, block)


def _torch_loss(model: Any) -> Callable[[np.ndarray], float]:
    import torch

    from gptmod_torch.train import loss_fn

    def batch_loss(b: np.ndarray) -> float:
        x, y = torch.from_numpy(b[:, :-1]).long(), torch.from_numpy(b[:, 1:]).long()
        with torch.no_grad():
            return float(loss_fn(model, x, y))

    return batch_loss


def _jax_loss(model: Any) -> Callable[[np.ndarray], float]:
    import jax.numpy as jnp

    from gptmod_jax.train import loss_fn

    def batch_loss(b: np.ndarray) -> float:
        return float(loss_fn(model, jnp.asarray(b[:, :-1]), jnp.asarray(b[:, 1:])))

    return batch_loss
