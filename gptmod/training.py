"""Training, the framework-free half: the train config, the learning-rate schedule, the weight-decay rule,
checkpoints (canonical model and optimizer state, written atomically), the run log, and the loop that both
twins' `Trainer`s run. The twins (gptmod_torch/train.py, gptmod_jax/train.py) own only what differs: how a
step computes gradients and applies AdamW.

Checkpoints are framework-free: the optimizer's moments are stored under canonical names in the canonical
(out, in) layout, so a run started in torch can resume in JAX and the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors.numpy import save_file

from gptmod import weights
from gptmod.config import ModelConfig

CKPT_FORMAT = "gptmod-train-v1"
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a run computes (the data comes from `data_dir`)."""

    steps: int = 2000
    batch_size: int = 16  # windows per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    block_size: int = 256
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # end of the cosine
    warmup_steps: int = 100
    weight_decay: float = 0.1  # decoupled (AdamW), on 2-D linear weights only: see `decays`
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    dtype: str = "float32"  # "bfloat16": bf16 compute, fp32 master weights and optimizer state
    seed: int = 0  # data order (and the init, when the model is not loaded from a checkpoint)
    log_every: int = 10
    eval_every: int = 200  # validation loss every N steps and at the end; 0 = only at the end
    eval_batches: int = 20
    ckpt_every: int = 500  # 0 = only at the end

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "block_size", "log_every", "eval_batches"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TrainConfig.{name}={v!r}: must be an int >= 1")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"TrainConfig.{name}={v!r}: must be an int >= 0")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "eps"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"TrainConfig.{name}={v!r}: must be a finite number >= 0")
        if self.lr <= 0 or self.min_lr > self.lr:
            raise ValueError(f"TrainConfig.lr={self.lr}, min_lr={self.min_lr}: need 0 < min_lr <= lr (or min_lr 0)")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: must be in [0, 1)")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps}: must be < steps={self.steps}")
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype={self.dtype!r}: must be one of {', '.join(DTYPES)}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.block_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}")
        return cls(**data)


def lr_at(tc: TrainConfig, step: int) -> float:
    """Learning rate of update `step` (0-based): linear warmup to lr, then cosine to min_lr at the last step.

    It is optax.warmup_cosine_decay_schedule(0, lr, warmup_steps, steps, min_lr) evaluated at step + 1, so the
    first update is not wasted at lr 0. The JAX twin calls optax's function; tests check this formula against it.
    """
    t = step + 1
    if t < tc.warmup_steps:
        return tc.lr * t / tc.warmup_steps
    decay = tc.steps - tc.warmup_steps
    frac = min(t - tc.warmup_steps, decay) / decay
    return tc.min_lr + (tc.lr - tc.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))


def decays(name: str) -> bool:
    """Weight decay applies to the 2-D weights of linear layers; not to norms, biases or embeddings (with
    tied embeddings the unembedding is the embedding, and decaying it shrinks rare tokens' vectors)."""
    return name.endswith(".weight") and (".attn.w" in name or ".mlp.w" in name or name == "lm_head.weight")


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    step: int
    state: dict[str, np.ndarray]  # canonical model state
    optimizer: dict[str, Any]  # {"count": int, "m": {name: array}, "v": {name: array}}, canonical layout
    cfg: ModelConfig
    tc: TrainConfig
    path: Path


def save_checkpoint(run_dir: Path, step: int, state: Mapping[str, np.ndarray], optimizer: Mapping[str, Any],
                    cfg: ModelConfig, tc: TrainConfig, *, framework: str) -> Path:  # fmt: skip
    """Write run_dir/step_NNNNNNN/ (model.safetensors, optimizer.safetensors, trainer.json) and point
    run_dir/latest at it. The folder is written under a temporary name and renamed, and `latest` is
    replaced atomically, so a crash at any moment leaves the previous checkpoint intact and current."""
    final = run_dir / f"step_{step:07d}"
    tmp = run_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weights.save(tmp / "model.safetensors", state, cfg, metadata={"step": str(step)})
        moments = {f"m.{k}": np.ascontiguousarray(v) for k, v in optimizer["m"].items()}
        moments |= {f"v.{k}": np.ascontiguousarray(v) for k, v in optimizer["v"].items()}
        save_file(moments, str(tmp / "optimizer.safetensors"), metadata={"format": CKPT_FORMAT})
        meta = {"format": CKPT_FORMAT, "step": step, "count": int(optimizer["count"]), "framework": framework,
                "train_config": tc.to_dict(), "model_config": cfg.to_dict()}  # fmt: skip
        weights.atomic_write_text(tmp / "trainer.json", json.dumps(meta, indent=2) + "\n")
        for f in tmp.iterdir():  # weights.save fsyncs its file; the optimizer file needs it too
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a re-run over the same step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weights.atomic_write_text(run_dir / "latest", final.name + "\n")
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `run_dir/latest` names, or None for a new run."""
    pointer = run_dir / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / pointer.read_text().strip()
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete checkpoint folder")
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder written by `save_checkpoint`; errors name the file."""
    meta_file = path / "trainer.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: no trainer.json, so not a gptmod training checkpoint")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_file}: invalid JSON ({e})") from None
    if meta.get("format") != CKPT_FORMAT:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {CKPT_FORMAT!r}")
    state, cfg = weights.load(path / "model.safetensors")
    moments, _ = weights._read_safetensors(path / "optimizer.safetensors")
    m = {k[2:]: v for k, v in moments.items() if k.startswith("m.")}
    v = {k[2:]: v for k, v in moments.items() if k.startswith("v.")}
    shapes = weights.canonical_shapes(cfg)
    weights.check_state(shapes, m, what=f"{path / 'optimizer.safetensors'} (first moments)")
    weights.check_state(shapes, v, what=f"{path / 'optimizer.safetensors'} (second moments)")
    tc = TrainConfig.from_dict(meta["train_config"])
    return Checkpoint(int(meta["step"]), state, {"count": int(meta["count"]), "m": m, "v": v}, cfg, tc, path)


# ----------------------------------------------------------------------------- the loop


class Trainer(Protocol):
    """What each twin's Trainer offers the loop (gptmod_torch.train.Trainer, gptmod_jax.train.Trainer)."""

    def step(self, x_ABT: np.ndarray, y_ABT: np.ndarray) -> dict[str, Any]: ...  # loss, grad_norm, lr
    def eval_loss(self, x_BT: np.ndarray, y_BT: np.ndarray) -> float: ...
    def export_state(self) -> dict[str, np.ndarray]: ...
    def load_state(self, state: Mapping[str, np.ndarray]) -> None: ...
    def export_optimizer(self) -> dict[str, Any]: ...
    def load_optimizer(self, optimizer: Mapping[str, Any]) -> None: ...
    def all_reduce_mean(self, value: float) -> float: ...


class RunLog:
    """One JSON object per line in run_dir/log.jsonl. On resume, rows past the resumed step are dropped
    first, so the file always reads as one run."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        rows = self.read(path) if path.is_file() else []
        kept = [r for r in rows if r["step"] <= resume_step]
        weights.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, row: Mapping[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        rows = []
        for i, line in enumerate(Path(path).read_text().splitlines(), 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON log line ({e})") from None
        return rows


def train(trainer: Trainer, cfg: ModelConfig, tc: TrainConfig, data_dir: Path, run_dir: Path, *,
          framework: str, resume: bool = True, progress: bool = True, rank: int = 0, world_size: int = 1,
          writer: bool | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Run (or resume) training to tc.steps; returns the log rows. `rank` of `world_size` processes
    reads its slice of each global batch; the `writer` (default: rank 0) alone logs and checkpoints. A
    multi-host JAX run reads whole batches on every host (rank 0 of 1) and names host 0 the writer."""
    from tqdm import tqdm

    from gptmod.data import TokenLoader

    if tc.block_size > cfg.max_seq_len:
        raise ValueError(f"TrainConfig.block_size={tc.block_size} exceeds the model's max_seq_len={cfg.max_seq_len}")
    run_dir.mkdir(parents=True, exist_ok=True)
    micro = tc.batch_size
    train_data = TokenLoader(data_dir, "train", block_size=tc.block_size, batch_size=micro * tc.grad_accum,
                             seed=tc.seed, rank=rank, world_size=world_size)  # fmt: skip
    if train_data.manifest["vocab_size"] > cfg.vocab_size:
        raise ValueError(f"the model's vocab_size={cfg.vocab_size} is smaller than the data's vocabulary "
                         f"({train_data.manifest['vocab_size']}, {data_dir})")  # fmt: skip
    val_data = None  # the manifest the train loader checked says whether there is a val split
    if train_data.manifest["splits"].get("val", {}).get("tokens"):
        val_data = TokenLoader(data_dir, "val", block_size=tc.block_size, batch_size=micro, seed=tc.seed,
                               rank=rank, world_size=world_size)  # fmt: skip
    start = 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        c = load_checkpoint(ckpt)
        if c.cfg != cfg or c.tc != tc:
            raise ValueError(f"{ckpt}: its model or train config differs from this run's; resume with the same "
                             "settings, or pass a new run folder (or --no-resume)")  # fmt: skip
        trainer.load_state(c.state)
        trainer.load_optimizer(c.optimizer)
        start = c.step
    main = rank == 0 if writer is None else writer
    log = RunLog(run_dir / "log.jsonl", start) if main else None
    rows: list[dict[str, Any]] = []
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, disable=not (progress and main), unit="step")
    t0, tokens = time.perf_counter(), 0
    state = None  # the last step's export, which model.safetensors reuses
    for step in bar:
        x, y = train_data.batch(step)
        shape = (tc.grad_accum, micro, tc.block_size)
        metrics = trainer.step(x.reshape(shape), y.reshape(shape))
        tokens += tc.tokens_per_step * world_size
        done = step + 1
        last = done == tc.steps
        if done % tc.log_every == 0 or last or (tc.eval_every and done % tc.eval_every == 0):
            loss = float(metrics["loss"])  # waits for the step (JAX dispatches asynchronously)
            elapsed = time.perf_counter() - t0
            row = {"step": done, "loss": loss, "lr": float(metrics["lr"]),
                   "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tokens / elapsed,
                   "framework": framework}  # fmt: skip
            if val_data is not None and (last or (tc.eval_every and done % tc.eval_every == 0)):
                row["val_loss"] = _eval(trainer, val_data, tc.eval_batches, world_size)
            rows.append(row)
            if log is not None:
                log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", gnorm=f"{row['grad_norm']:.2f}",
                            tok_s=f"{row['tokens_per_s']:.0f}")  # fmt: skip
            t0, tokens = time.perf_counter(), 0
        if last or (tc.ckpt_every and done % tc.ckpt_every == 0):
            # Every process exports (under FSDP that gathers the shards, a collective); rank 0 writes.
            state, optimizer = trainer.export_state(), trainer.export_optimizer()
            if main:
                save_checkpoint(run_dir, done, state, optimizer, cfg, tc, framework=framework)
            t0, tokens = time.perf_counter(), 0  # tokens/s counts training time only, not checkpoints
    if state is None:  # nothing left to train (resumed at tc.steps): the state as loaded
        state = trainer.export_state()
    if main:
        weights.save(run_dir / "model.safetensors", state, cfg, metadata={"step": str(tc.steps)})
    return rows


def _eval(trainer: Trainer, val_data: Any, n: int, world_size: int) -> float:
    losses = [trainer.eval_loss(x, y) for x, y in val_data.eval_batches(n)]
    loss = float(np.mean(losses))
    return trainer.all_reduce_mean(loss) if world_size > 1 else loss
