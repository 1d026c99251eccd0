"""Training, the framework-free half: the train config, the learning-rate schedule, the weight-decay
rule, checkpoints (canonical model and optimizer state, written atomically), the run log, and the
loop that both twins' `Trainer`s run. The twins (gptmod_torch/train.py, gptmod_jax/train.py) own
only what differs: how a step computes gradients and applies AdamW.

Checkpoints are framework-free: the optimizer's moments are stored under canonical names in the
canonical (out, in) layout, so a run started in torch can resume in JAX and the other way round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors.numpy import save_file

from gptmod import fileio, weights
from gptmod.config import ModelConfig

CKPT_FORMAT = "gptmod-train-v1"
DTYPES = ("float32", "bfloat16")
MAX_SEED = 2**63 - 1  # JAX's PRNG key takes a signed 64-bit seed
_STEP_DIR = re.compile(r"step_(\d{7,})")
# What makes a folder "hold a run": --no-resume over it needs overwrite (see `train`).
_RUN_FILES = ("latest", "log.jsonl", "model.safetensors", "best")
_META_KEYS = ("format", "step", "count", "framework", "train_config", "model_config")


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinity; nothing non-finite is ever saved."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a run computes (the data comes from `data_dir`)."""

    # The defaults are a recipe for the bundled plays on the default preset (README, "Training"):
    # 350 steps of 4,096 tokens are about 5 epochs of their 280,195 train tokens, and validation
    # loss still falls at the end (measured: 4.45 at step 350). The earlier 2000 steps were 29
    # epochs, hours on a 2-core CPU.
    steps: int = 350
    batch_size: int = 16  # windows per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    block_size: int = 256
    lr: float = 2e-3  # peak learning rate
    min_lr: float = 2e-4  # end of the cosine
    warmup_steps: int = 30
    weight_decay: float = 0.1  # decoupled (AdamW), on 2-D linear weights only: see `decays`
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    dtype: str = "float32"  # "bfloat16": bf16 compute, fp32 master weights and optimizer state
    seed: int = 0  # data order (and the init, when the model is not loaded from a checkpoint)
    log_every: int = 10
    eval_every: int = 50  # validation loss every N steps and at the end; 0 = only at the end
    eval_batches: int = 8  # 8 x 4,096 tokens: the bundled val split's 31,136 tokens about once
    ckpt_every: int = (
        100  # 0 = only at the end; each is about 12 bytes a parameter (weights and moments)
    )

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "block_size",
            "log_every",
            "eval_batches",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TrainConfig.{name}={v!r}: must be an int >= 1")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"TrainConfig.{name}={v!r}: must be an int >= 0")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "eps"):
            v = getattr(self, name)
            if (
                not isinstance(v, (int, float))
                or isinstance(v, bool)
                or not math.isfinite(v)
                or v < 0
            ):
                raise ValueError(f"TrainConfig.{name}={v!r}: must be a finite number >= 0")
        # eps 0: a parameter whose gradient is always 0 (pos_emb rows past block_size) gets 0/0
        if self.eps <= 0:
            raise ValueError(
                f"TrainConfig.eps={self.eps!r}: must be > 0 (Adam divides by sqrt(v) + eps)"
            )
        if self.seed > MAX_SEED:
            raise ValueError(
                f"TrainConfig.seed={self.seed}: must be < 2**63 (JAX takes a signed 64-bit seed)"
            )
        if self.lr <= 0 or self.min_lr > self.lr:
            raise ValueError(
                f"TrainConfig.lr={self.lr}, min_lr={self.min_lr}: need 0 < "
                "min_lr <= lr (or min_lr 0)"
            )
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: must be in [0, 1)")
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"TrainConfig.warmup_steps={self.warmup_steps}: must be < steps={self.steps}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(
                f"TrainConfig.dtype={self.dtype!r}: must be one of {', '.join(DTYPES)}"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.block_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def diff(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """{field: (self's value, other's value)} for every field that differs."""
        return {
            k: (v, getattr(other, k)) for k, v in self.to_dict().items() if getattr(other, k) != v
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}")
        return cls(**data)


def lr_at(tc: TrainConfig, step: int) -> float:
    """Learning rate of update `step` (0-based): linear warmup to lr, then
    cosine to min_lr at the last step.

    It is optax.warmup_cosine_decay_schedule(0, lr, warmup_steps, steps, min_lr) evaluated at step +
    1, so the first update is not wasted at lr 0. The JAX twin calls optax's function; tests check
    this formula against it.
    """
    t = step + 1
    if t < tc.warmup_steps:
        return tc.lr * t / tc.warmup_steps
    decay = tc.steps - tc.warmup_steps
    frac = min(t - tc.warmup_steps, decay) / decay
    return tc.min_lr + (tc.lr - tc.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))


def decays(name: str) -> bool:
    """Weight decay applies to the 2-D weights of linear layers; not to
    norms, biases or embeddings (with tied embeddings the unembedding is the
    embedding, and decaying it shrinks rare tokens' vectors)."""
    return name.endswith(".weight") and (
        ".attn.w" in name or ".mlp.w" in name or name == "lm_head.weight"
    )


# ----------------------------------------------------------------------------- init


def init_state(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """The canonical fp32 state of a fresh model, from `seed` alone (numpy,
    framework-free), so both twins start from the same weights for the same seed.
    The distribution is the twins' own init (each layer's constructor):
    N(0, init_std) for 2-D weights, N(0, init_std / sqrt(2 n_layer))
    for the residual projections (attn.wo, mlp.w_down), norm weights 1, biases 0."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed!r}: must be an int in [0, 2**63)")
    std, resid_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layer)
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in weights.canonical_shapes(
        cfg
    ).items():  # model order: the draws never depend on a dict
        if name.endswith(("attn.wo.weight", "mlp.w_down.weight")):
            state[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(resid_std)
        elif len(shape) == 2:
            state[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        elif name.endswith("norm.weight"):
            state[name] = np.ones(shape, np.float32)
        else:
            state[name] = np.zeros(shape, np.float32)
    return state


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    step: int
    state: dict[str, np.ndarray]  # canonical model state
    # {"count": int, "m": {name: array}, "v": {name: array}}, canonical layout
    optimizer: dict[str, Any]
    cfg: ModelConfig
    tc: TrainConfig
    path: Path
    val_loss: float | None = None  # recorded for RUN/best


_DIVERGED = (
    "Lower --lr, raise --warmup-steps or set --grad-clip, and rerun from the last "
    "good checkpoint (or afresh)"
)


def check_finite(
    tensors: Mapping[str, Any], *, step: int, what: str, then: str = "refusing to save it"
) -> None:
    """Raise NonFiniteError naming the step and the first tensor holding a NaN or infinity."""
    for name, v in tensors.items():
        a = np.asarray(v)
        if not np.isfinite(a).all():
            bad = int(np.size(a) - np.isfinite(a).sum())
            raise NonFiniteError(
                f"step {step}: {what} {name!r} holds {bad} non-finite value(s) (NaN or inf); {then}"
            )


def save_checkpoint(
    run_dir: Path,
    step: int,
    state: Mapping[str, np.ndarray],
    optimizer: Mapping[str, Any],
    cfg: ModelConfig,
    tc: TrainConfig,
    *,
    framework: str,
    name: str | None = None,
    val_loss: float | None = None,
) -> Path:
    """Write run_dir/step_NNNNNNN/ (model.safetensors, optimizer.safetensors,
    trainer.json) and point run_dir/latest at it. The folder is written under
    a temporary name and renamed, and `latest` is replaced atomically, so a
    crash at any moment leaves the previous checkpoint intact and current.
    `name` (e.g. "best") writes run_dir/NAME/ the same way and leaves `latest` alone. A state or
    moment that is not finite is refused (NonFiniteError) before anything is written."""
    then = f"refusing to save it. {_DIVERGED}"
    check_finite(state, step=step, what="parameter", then=then)
    check_finite(optimizer["m"], step=step, what="optimizer first moment of", then=then)
    check_finite(optimizer["v"], step=step, what="optimizer second moment of", then=then)
    final = run_dir / (name or f"step_{step:07d}")
    run_dir.mkdir(parents=True, exist_ok=True)
    # What a killed earlier write of this folder left behind; the run's lock makes this safe.
    for stale in run_dir.glob(f".{final.name}.*tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    # a re-run over the same step (or a new best) replaces the folder
    with fileio.atomic_folder(final) as tmp:
        weights.save(tmp / "model.safetensors", state, cfg, metadata={"step": str(step)})
        moments = {f"m.{k}": np.ascontiguousarray(v) for k, v in optimizer["m"].items()}
        moments |= {f"v.{k}": np.ascontiguousarray(v) for k, v in optimizer["v"].items()}
        save_file(moments, str(tmp / "optimizer.safetensors"), metadata={"format": CKPT_FORMAT})
        meta = {
            "format": CKPT_FORMAT,
            "step": step,
            "count": int(optimizer["count"]),
            "framework": framework,
            "train_config": tc.to_dict(),
            "model_config": cfg.to_dict(),
        }
        if val_loss is not None:
            meta["val_loss"] = val_loss
        fileio.atomic_write_text(tmp / "trainer.json", json.dumps(meta, indent=2) + "\n")
    if name is None:
        fileio.atomic_write_text(run_dir / "latest", final.name + "\n")
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `run_dir/latest` names, or None for a new run. `latest` must hold a bare
    step_N folder name: a path (absolute, with a separator or ..) is refused, so a run never reads
    outside its folder."""
    pointer = run_dir / "latest"
    if not pointer.is_file():
        return None
    target = pointer.read_text().strip()
    if not _STEP_DIR.fullmatch(target):
        raise ValueError(
            f"{pointer}: names {target!r}; it must name a step_NNNNNNN folder "
            f"inside {run_dir} (no path)"
        )
    path = run_dir / target
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(
            f"{pointer} names {path.name}, which is not a complete checkpoint folder"
        )
    return path


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint folder's trainer.json, checked: its format, every key,
    and a step_N folder's N."""
    meta_file = path / "trainer.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: no trainer.json, so not a gptmod training checkpoint")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_file}: invalid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file}: must hold a JSON object, not {type(meta).__name__}")
    if meta.get("format") != CKPT_FORMAT:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {CKPT_FORMAT!r}")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{meta_file}: missing key(s) {', '.join(missing)}")
    for key in ("step", "count"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < 0:
            raise ValueError(f"{meta_file}: {key}={meta[key]!r}: must be an int >= 0")
    folder = _STEP_DIR.fullmatch(path.name)
    if folder and int(folder[1]) != meta["step"]:
        raise ValueError(f"{meta_file}: step={meta['step']} disagrees with its folder {path.name}")
    return meta


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder written by `save_checkpoint`; errors name the file. A non-finite
    tensor is refused (NonFiniteError), so a run never resumes from NaN."""
    meta = read_meta(path)
    state, cfg = weights.load(path / "model.safetensors")
    moments, _ = weights._read_safetensors(path / "optimizer.safetensors")
    m = {k[2:]: v for k, v in moments.items() if k.startswith("m.")}
    v = {k[2:]: v for k, v in moments.items() if k.startswith("v.")}
    shapes = weights.canonical_shapes(cfg)
    weights.check_state(shapes, m, what=f"{path / 'optimizer.safetensors'} (first moments)")
    weights.check_state(shapes, v, what=f"{path / 'optimizer.safetensors'} (second moments)")
    then = f"{path} is refused: a run never resumes from NaN"
    check_finite(state, step=meta["step"], what="parameter", then=then)
    check_finite(m, step=meta["step"], what="optimizer first moment of", then=then)
    check_finite(v, step=meta["step"], what="optimizer second moment of", then=then)
    tc = TrainConfig.from_dict(meta["train_config"])
    val = meta.get("val_loss")
    return Checkpoint(
        meta["step"], state, {"count": meta["count"], "m": m, "v": v}, cfg, tc, path, val
    )


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step_N folders, never the one `latest` names; returns
    those deleted. RUN/best is its own folder, not a step folder, so it is never touched."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last={keep_last!r}: must be an int >= 1")
    pointer = run_dir / "latest"
    current = pointer.read_text().strip() if pointer.is_file() else None
    steps = sorted(
        (p for p in run_dir.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)),
        key=lambda p: int(p.name[5:]),
    )
    doomed = [p for p in steps[: max(0, len(steps) - keep_last)] if p.name != current]
    # moved aside first: a crash mid-delete never leaves a half step folder under its name
    for p in doomed:
        shutil.rmtree(fileio.move_aside(p))
    return doomed


def holds_run(run_dir: Path) -> bool:
    """Whether run_dir holds a previous run's files (a log, a checkpoint, a final model)."""
    if not run_dir.is_dir():
        return False
    return any((run_dir / f).exists() for f in _RUN_FILES) or any(
        _STEP_DIR.fullmatch(p.name) for p in run_dir.iterdir()
    )


def clear_run(run_dir: Path) -> None:
    """Remove a previous run's files from run_dir (for overwrite). `latest`
    goes first, so a crash midway leaves at worst a folder with no checkpoint
    named, which starts afresh; each item is moved into a hidden trash folder
    (atomic renames) and the trash deleted last. Other files are left alone."""
    trash = run_dir / f".overwritten.{secrets.token_hex(4)}"
    trash.mkdir()
    names = [*_RUN_FILES, *sorted(p.name for p in run_dir.iterdir() if _STEP_DIR.fullmatch(p.name))]
    for name in names:
        if (run_dir / name).exists():
            os.replace(run_dir / name, trash / name)
    shutil.rmtree(trash)


@contextlib.contextmanager
def lock_run(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on run_dir/.lock (fcntl.flock; released when the file
    closes, also when the process dies), so two runs never write one folder. Where flock is missing
    (Windows): no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"{run_dir}: another training run holds this run folder (its .lock); wait for it "
                "to finish, or give another --out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def paused(bar: Any, clock: Callable[[], float] = time.time) -> Iterator[None]:
    """Leave the time spent inside out of a tqdm bar's rate and ETA (evaluations, checkpoints): the
    bar's start and last-print times move forward by it. `clock` must be the bar's own (tqdm's
    default is time.time)."""
    t = clock()
    try:
        yield
    finally:
        if not getattr(bar, "disable", True):
            dt = clock() - t
            bar.start_t += dt
            bar.last_print_t += dt


# ----------------------------------------------------------------------------- the loop


class Trainer(Protocol):
    """What each twin's Trainer offers the loop (gptmod_torch.train.Trainer,
    gptmod_jax.train.Trainer)."""

    def step(
        self, x_ABT: np.ndarray, y_ABT: np.ndarray
    ) -> dict[str, Any]: ...  # loss, grad_norm, lr
    def eval_loss(self, x_BT: np.ndarray, y_BT: np.ndarray) -> float: ...
    def export_state(self) -> dict[str, np.ndarray]: ...
    def load_state(self, state: Mapping[str, np.ndarray]) -> None: ...
    def export_optimizer(self) -> dict[str, Any]: ...
    def load_optimizer(self, optimizer: Mapping[str, Any]) -> None: ...
    def all_reduce_mean(self, value: float) -> float: ...


def build_trainer(
    framework: str,
    cfg: ModelConfig,
    state: Mapping[str, np.ndarray] | None,
    tc: TrainConfig,
    *,
    device: str = "cpu",
    compile: bool = True,
    parallel: str | None = None,
) -> Trainer:
    """A twin of `framework` on `state` (None: a seeded init from tc.seed) and its Trainer. torch
    takes `device`, `compile` and `parallel` (ddp or fsdp, under torch.distributed); JAX builds
    inside whatever mesh is active (`gptmod_jax.sharding.use_mesh`)."""
    import importlib

    from gptmod import models

    model = models.build(framework, cfg, state, seed=tc.seed)
    train_mod = importlib.import_module(f"gptmod_{framework}.train")
    if framework != "torch":
        return train_mod.Trainer(model, tc)
    return train_mod.Trainer(model.to(device), tc, compile=compile, parallel=parallel)


class RunLog:
    """One JSON object per line in run_dir/log.jsonl. On resume, rows past the resumed step are
    dropped first, so the file always reads as one run."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        rows = self.read(path) if path.is_file() else []
        kept = [r for r in rows if r["step"] <= resume_step]
        fileio.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

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


def train(
    trainer: Trainer,
    cfg: ModelConfig,
    tc: TrainConfig,
    data_dir: Path,
    run_dir: Path,
    *,
    framework: str,
    resume: bool = True,
    overwrite: bool = False,
    keep_last: int | None = None,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    writer: bool | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) training to tc.steps; returns the log rows. `rank` of
    `world_size` processes reads its slice of each global batch; the `writer`
    (default: rank 0) alone logs and checkpoints. A multi-host JAX run reads
    whole batches on every host (rank 0 of 1) and names host 0 the writer.

    The writer holds run_dir/.lock throughout (`lock_run`). `resume=False` over a folder that holds
    a run is refused unless `overwrite`, which first removes the old run's files (`clear_run`). A
    checkpoint whose train config differs only in `steps` (more than its own step) is extended: the
    optimizer state is kept and the learning-rate schedule is the new total's (`lr_at` of the new
    config). `keep_last` N keeps the newest N step folders (None: all). With a val split, the best
    validation loss so far is kept as run_dir/best/."""
    main = rank == 0 if writer is None else writer
    progress = progress and main
    with lock_run(run_dir) if main else contextlib.nullcontext():
        from tqdm import tqdm

        from gptmod.data import TokenLoader

        if tc.block_size > cfg.max_seq_len:
            raise ValueError(
                f"TrainConfig.block_size={tc.block_size} exceeds the model's "
                f"max_seq_len={cfg.max_seq_len}"
            )
        if keep_last is not None and (
            isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
        ):
            raise ValueError(
                f"keep_last={keep_last!r}: must be an int >= 1 (or None: keep every checkpoint)"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        micro = tc.batch_size
        train_data = TokenLoader(
            data_dir,
            "train",
            block_size=tc.block_size,
            batch_size=micro * tc.grad_accum,
            seed=tc.seed,
            rank=rank,
            world_size=world_size,
        )
        if train_data.manifest["vocab_size"] > cfg.vocab_size:
            raise ValueError(
                f"the model's vocab_size={cfg.vocab_size} is smaller than the data's vocabulary "
                f"({train_data.manifest['vocab_size']}, {data_dir})"
            )
        val_data = None  # the manifest the train loader checked says whether there is a val split
        if train_data.manifest["splits"].get("val", {}).get("tokens"):
            val_data = TokenLoader(
                data_dir,
                "val",
                block_size=tc.block_size,
                batch_size=micro,
                seed=tc.seed,
                rank=rank,
                world_size=world_size,
            )
        if not resume and main and holds_run(run_dir):
            if not overwrite:
                raise ValueError(
                    f"{run_dir}: holds a previous run (log, checkpoints or model); --no-resume "
                    "would mix the two: pass --overwrite too to delete it, or give another --out"
                )
            clear_run(run_dir)  # before anything of the new run is written
        start = 0
        ckpt = latest_checkpoint(run_dir) if resume else None
        if ckpt is not None:
            start = _resume(trainer, cfg, tc, ckpt, main)
        best_val = math.inf
        if val_data is not None and resume and (run_dir / "best" / "trainer.json").is_file():
            best_val = read_meta(run_dir / "best").get("val_loss", math.inf)
        log = RunLog(run_dir / "log.jsonl", start) if main else None
        rows: list[dict[str, Any]] = []
        # the last checkpoint on disk, for an interrupt's message
        saved = ckpt.name if ckpt is not None else None
        # A manual bar updated as each step finishes (its loss read back), with
        # eval and checkpoint time left out.
        bar = tqdm(initial=start, total=tc.steps, disable=not progress, unit="step")
        t0, tokens = time.perf_counter(), 0
        state = None  # the last step's export, which model.safetensors reuses
        done = start
        try:
            for step in range(start, tc.steps):
                x, y = train_data.batch(step)
                shape = (tc.grad_accum, micro, tc.block_size)
                metrics = trainer.step(x.reshape(shape), y.reshape(shape))
                # Waits for the step (JAX dispatches asynchronously), so the bar counts finished
                # steps. Its cost, the lost overlap of the next batch's loading with this step,
                # measured -0.6% (noise): train_sync_cost.py.
                loss = float(metrics["loss"])
                tokens += tc.tokens_per_step * world_size
                done = step + 1
                bar.update(1)
                if not math.isfinite(loss):
                    raise NonFiniteError(f"step {done}: the training loss is {loss}. {_DIVERGED}")
                last = done == tc.steps
                evaluate = val_data is not None and (
                    last or (tc.eval_every and done % tc.eval_every == 0)
                )
                if (
                    done % tc.log_every == 0
                    or last
                    or (tc.eval_every and done % tc.eval_every == 0)
                ):
                    elapsed = time.perf_counter() - t0
                    row = {
                        "step": done,
                        "loss": loss,
                        "lr": float(metrics["lr"]),
                        "grad_norm": float(metrics["grad_norm"]),
                        "tokens_per_s": tokens / elapsed,
                        "framework": framework,
                    }
                    with paused(bar):
                        if evaluate:
                            row["val_loss"] = _eval(trainer, val_data, tc.eval_batches, world_size)
                        # every process exports (FSDP: a collective)
                        if evaluate and row["val_loss"] < best_val:
                            best_val = row["val_loss"]
                            best_state, best_opt = (
                                trainer.export_state(),
                                trainer.export_optimizer(),
                            )
                            if main:
                                save_checkpoint(
                                    run_dir,
                                    done,
                                    best_state,
                                    best_opt,
                                    cfg,
                                    tc,
                                    framework=framework,
                                    name="best",
                                    val_loss=best_val,
                                )
                            del best_state, best_opt
                    rows.append(row)
                    if log is not None:
                        log.write(row)
                    bar.set_postfix(
                        loss=f"{row['loss']:.3f}",
                        lr=f"{row['lr']:.2e}",
                        gnorm=f"{row['grad_norm']:.2f}",
                        tok_s=f"{row['tokens_per_s']:.0f}",
                    )
                    t0, tokens = time.perf_counter(), 0
                if last or (tc.ckpt_every and done % tc.ckpt_every == 0):
                    with paused(bar):
                        # Every process exports (under FSDP that gathers the
                        # shards, a collective); rank 0 writes.
                        state, optimizer = trainer.export_state(), trainer.export_optimizer()
                        if main:
                            saved = save_checkpoint(
                                run_dir, done, state, optimizer, cfg, tc, framework=framework
                            ).name
                            if keep_last is not None:
                                prune_checkpoints(run_dir, keep_last)
                    # tokens/s counts training time only, not checkpoints
                    t0, tokens = (time.perf_counter(), 0)
        except KeyboardInterrupt:
            bar.close()
            if main:
                where = (
                    f"the last checkpoint is {run_dir / saved}"
                    if saved
                    else "no checkpoint was saved yet"
                )
                print(f"interrupted after {done} of {tc.steps} steps: {where}", file=sys.stderr)
            raise
        bar.close()
        if state is None:  # nothing left to train (resumed at tc.steps): the state as loaded
            state = trainer.export_state()
            check_finite(
                state, step=tc.steps, what="parameter", then=f"refusing to save it. {_DIVERGED}"
            )
        if main:
            weights.save(
                run_dir / "model.safetensors", state, cfg, metadata={"step": str(tc.steps)}
            )
        return rows


def _resume(trainer: Trainer, cfg: ModelConfig, tc: TrainConfig, ckpt: Path, main: bool) -> int:
    """Load a checkpoint into the trainer after checking it may continue
    under `tc`; returns its step."""
    c = load_checkpoint(ckpt)
    if c.cfg != cfg:
        diff = ", ".join(
            f"{k}: {v!r} -> {getattr(cfg, k)!r}"
            for k, v in c.cfg.to_dict().items()
            if getattr(cfg, k) != v
        )
        raise ValueError(
            f"{ckpt}: its model config differs from this run's ({diff}); resume with the same "
            "model, or pass a new run folder (or --no-resume --overwrite)"
        )
    diff = c.tc.diff(tc)
    steps = diff.pop("steps", None)
    if diff:
        named = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())
        raise ValueError(
            f"{ckpt}: its train config differs from this run's ({named}); resume "
            "with the same settings (only --steps may grow), or pass a new run "
            "folder (or --no-resume --overwrite)"
        )
    if c.step > tc.steps:
        raise ValueError(
            f"{ckpt}: the run is at step {c.step}, past steps={tc.steps}; give --steps >= {c.step}"
        )
    if steps is not None and main:
        print(
            f"extending the run from steps={steps[0]} to {steps[1]}: optimizer state kept; the "
            f"learning-rate schedule is recomputed for {steps[1]} steps (from step {c.step}: "
            f"lr {lr_at(tc, c.step):.3g})",
            file=sys.stderr,
        )
    trainer.load_state(c.state)
    trainer.load_optimizer(c.optimizer)
    return c.step


def _eval(trainer: Trainer, val_data: Any, n: int, world_size: int) -> float:
    losses = [trainer.eval_loss(x, y) for x, y in val_data.eval_batches(n)]
    loss = float(np.mean(losses))
    return trainer.all_reduce_mean(loss) if world_size > 1 else loss
