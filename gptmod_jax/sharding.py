"""Past one device, the JAX way: logical axis names on every parameter and on the KV cache, a rules
table from those names to the axes of a device mesh, and `jax.jit` (GSPMD) for everything else.

    mesh = make_mesh("data=2,model=4")  # 8 devices; Auto axes, so shardings propagate
    with use_mesh(mesh, "fsdp"):  # jax.set_mesh + the rules table
        # each parameter is created sharded (Flax >= 0.12)
        model = gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0))
        gptmod_jax.load_state(model, state)  # canonical weights keep each parameter's sharding
        tokens = gptmod_jax.generate(model, prompts, 64)  # or Trainer(model, tc).step(...)

Logical axes (what each array dimension means):
    batch     rows of a batch: tokens, activations, the KV cache
    embed     d_model
    heads     the query heads' n_head * head_dim features (wq's rows, wo's columns)
    kv_heads  the key/value heads' n_kv_head * head_dim features, and the KV cache's head axis
    mlp       d_ff
    vocab     the vocabulary rows of the embedding and of an untied lm_head

Mesh axes: `data` and `model`. A rules table maps every logical axis to a mesh axis or to None
(replicated). The presets:
    dp    data parallel: parameters replicated, batch over `data`; XLA all-reduces the gradients.
    tp    tensor parallel (Megatron): heads, kv_heads and mlp over `model`, so attention and the MLP
          run column- then row-parallel with one all-reduce each; batch over `data`.
    fsdp  fully sharded: additionally every parameter's embed axis over `data`, so each device holds
          1/(data*model) of the weights; XLA all-gathers them for use and reduce-scatters gradients.
The vocabulary stays replicated in every preset: GPT-2's 50257 rows divide by no mesh size, and JAX
refuses uneven shards. With a padded vocabulary, map it yourself (`rules(..., vocab="model")`).

More devices on `model` than KV heads (tiny: 2 KV heads on model=4): `use_mesh(mesh, rules,
cfg=cfg)` replicates each KV head over model/n_kv_head devices, as vLLM (`num_kv_head_replicas`) and
MaxText (heads over ("tensor", "autoregressive"), kv_heads over "tensor" only) do; see
`replicate_kv_heads`.

A model built with no mesh active is placed as usual on one device (its variables carry the names
but are not sharded), so nothing changes for single-device use.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gptmod.config import ModelConfig

MESH_AXES = ("data", "model")
LOGICAL_AXES = ("batch", "embed", "heads", "kv_heads", "mlp", "vocab")
Target = str | tuple[str, ...] | None  # a mesh axis, several (major to minor), or None: replicated
Rules = tuple[tuple[str, Target], ...]
# `replicate_kv_heads` factors a mesh axis A into these two (A's devices, major to minor).
KV_SUFFIX, REPLICA_SUFFIX = "_kv", "_rep"

_PRESETS: dict[str, dict[str, str | None]] = {
    "dp": {
        "batch": "data",
        "embed": None,
        "heads": None,
        "kv_heads": None,
        "mlp": None,
        "vocab": None,
    },
    "tp": {
        "batch": "data",
        "embed": None,
        "heads": "model",
        "kv_heads": "model",
        "mlp": "model",
        "vocab": None,
    },
    "fsdp": {
        "batch": "data",
        "embed": "data",
        "heads": "model",
        "kv_heads": "model",
        "mlp": "model",
        "vocab": None,
    },
}
PRESETS = tuple(_PRESETS)


def rules(preset: str | Mapping[str, Target] = "dp", **overrides: Target) -> Rules:
    """A complete rules table: a preset's (or a mapping's) entries, then
    `overrides` (axis=mesh axis or None).

    Every logical axis must be mapped (to a mesh axis, a tuple of them major to minor, or None),
    every name must be known."""
    if isinstance(preset, str):
        if preset not in _PRESETS:
            raise ValueError(
                f"rules: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}"
            )
        table = dict(_PRESETS[preset])
    else:
        table = dict(preset)
    table.update(overrides)
    unknown = sorted(set(table) - set(LOGICAL_AXES))
    if unknown:
        raise ValueError(
            f"rules: unknown logical axis {unknown[0]!r}; the axes are {', '.join(LOGICAL_AXES)}"
        )
    missing = [a for a in LOGICAL_AXES if a not in table]
    if missing:
        raise ValueError(
            f"rules: logical axis {missing[0]!r} is not mapped (give a mesh axis or None)"
        )
    for axis, target in table.items():
        if not all(_known_axis(name) for name in _names(target)):
            raise ValueError(
                f"rules: {axis}={target!r}: the mesh axes are {', '.join(MESH_AXES)} (or None)"
            )
    return tuple((a, table[a]) for a in LOGICAL_AXES)


def _names(target: Target) -> tuple[str, ...]:
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def _known_axis(name: object) -> bool:
    """A mesh axis, or one of the two that `replicate_kv_heads` factors a mesh axis into."""
    return name in MESH_AXES or any(
        name == a + s for a in MESH_AXES for s in (KV_SUFFIX, REPLICA_SUFFIX)
    )


def _axis_size(mesh: Mesh, target: Target) -> int:
    return math.prod(mesh.shape[name] for name in _names(target))


def _axis_label(mesh: Mesh, target: Target) -> str:
    """How an error names a target: `model=4`, or `model_kv*model_rep=2*2` for a factored one."""
    names = _names(target)
    return f"{'*'.join(names)}={'*'.join(str(mesh.shape[n]) for n in names)}"


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=2,model=4"` -> {"data": 2, "model": 4}; an axis left out has size 1."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ValueError(
                f"mesh {text!r}: {part!r} is not AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)}"
            )
        if name in seen:
            raise ValueError(f"mesh {text!r}: axis {name!r} is given twice")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise ValueError(f"mesh {text!r}: {name}={value.strip()!r} must be a positive integer")
        sizes[name] = size
        seen.add(name)
    if not seen:
        raise ValueError(f"mesh {text!r}: give at least one of data=N, model=N")
    return sizes


def make_mesh(shape: str | Mapping[str, int], devices: list | None = None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all of them) with Auto axis types.

    Auto, explicitly: since JAX 0.9 `jax.make_mesh` defaults to Explicit axes, under which shardings
    no longer propagate through unannotated code (every op would need its output sharding)."""
    sizes = (
        parse_mesh(shape) if isinstance(shape, str) else {**dict.fromkeys(MESH_AXES, 1), **shape}
    )
    devices = jax.devices() if devices is None else devices
    n = math.prod(sizes[a] for a in MESH_AXES)
    if n != len(devices):
        raise ValueError(
            f"mesh data={sizes['data']},model={sizes['model']}: {n} devices, but {len(devices)} "
            f"are available ({devices[0].platform}); the sizes must multiply to the device count"
        )
    return jax.make_mesh(
        tuple(sizes[a] for a in MESH_AXES),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * 2,
        devices=devices,
    )


def check_divisible(cfg: ModelConfig, mesh: Mesh, table: Rules, batch: int | None = None) -> None:
    """Every sharded dimension must split evenly (JAX refuses uneven
    shards): raise naming the field.

    The KV heads may instead be fewer than the devices of their axis if they divide it:
    `use_mesh(..., cfg=cfg)` then replicates each over the surplus (`replicate_kv_heads`)."""
    dims = {
        "embed": ("d_model", cfg.d_model),
        "heads": ("n_head", cfg.n_head),
        "kv_heads": ("n_kv_head", cfg.n_kv_head),
        "mlp": ("d_ff", cfg.d_ff),
        "vocab": ("vocab_size", cfg.vocab_size),
    }
    if batch is not None:
        dims["batch"] = ("batch", batch)
    for axis, target in table:
        if target is None or axis not in dims:
            continue
        field, size = dims[axis]
        parts = _axis_size(mesh, target)
        if size % parts == 0 or (axis == "kv_heads" and parts % size == 0):
            continue
        where = f"mesh axis {_axis_label(mesh, target)} (the rules shard {axis!r} over {target!r})"
        if axis == "kv_heads":  # neither split evenly nor replicated evenly
            raise ValueError(
                f"{field}={size} neither divides nor is divisible by {where}: each device "
                "needs whole KV heads, and the same number of copies of each; change the "
                f"mesh or map {axis!r} to None"
            )
        raise ValueError(
            f"{field}={size} is not divisible by {where}; change the mesh or map {axis!r} to None"
        )


def replicate_kv_heads(cfg: ModelConfig, mesh: Mesh, table: Rules) -> tuple[Mesh, Rules]:
    """The mesh and rules that serve more devices on the KV heads' axis than there are KV heads.

    Say `kv_heads` maps to `model`, of size M = K * R with K = n_kv_head. `model` is factored into
    two axes over the same devices, `model_kv` (size K, major) and `model_rep` (R, minor): device m
    of `model` is (m // R, m % R). Every entry that named `model` names both, major to minor, so
    each query-head and MLP shard stays on the device it had; `kv_heads` names `model_kv` alone, so
    KV head k (its wk/wv rows and its slice of the KV cache) sits on devices k*R .. k*R + R-1,
    replicated over `model_rep`. Those hold exactly its query heads: with n_head = N divisible by M,
    device m holds query heads m*N/M .. (m+1)*N/M - 1, which all read KV head h // (N/K) = m // R
    (the GQA map of `reference_attention`). So attention stays on the device, and each device keeps
    one KV head's weights and cache, as each rank does in vLLM (`num_kv_head_replicas` = R) and as
    MaxText's rules say (heads over ("tensor", "autoregressive"), kv_heads over "tensor" only).

    Not chosen: `kv_heads` to None is as correct but keeps all K heads' wk/wv and cache on every
    device (K times the cache); `kv_heads` left on `model` cuts each head's rows into R pieces and
    attention then has to gather them (`check_heads` refuses it). In training, each copy of wk/wv
    gets the gradient of its own query heads only, so XLA sums them over `model_rep` (an all-reduce
    the backward needs).

    The user's mesh stays `data=N,model=M`: only the Mesh set inside `use_mesh` is factored. `mesh`
    and `table` come back unchanged when the KV heads split evenly or are not sharded; cases neither
    splitting nor replication serves raise (`check_divisible`)."""
    check_divisible(cfg, mesh, table)
    target = dict(table)["kv_heads"]
    if not isinstance(target, str) or mesh.shape[target] <= cfg.n_kv_head:
        return mesh, table
    kv, rep = target + KV_SUFFIX, target + REPLICA_SUFFIX
    at = mesh.axis_names.index(target)
    names = (*mesh.axis_names[:at], kv, rep, *mesh.axis_names[at + 1 :])
    shape = (
        *mesh.devices.shape[:at],
        cfg.n_kv_head,
        mesh.shape[target] // cfg.n_kv_head,
        *mesh.devices.shape[at + 1 :],
    )
    types = (
        *mesh.axis_types[:at],
        mesh.axis_types[at],
        mesh.axis_types[at],
        *mesh.axis_types[at + 1 :],
    )
    factored = Mesh(mesh.devices.reshape(shape), names, axis_types=types)
    table = tuple((a, kv if a == "kv_heads" else (kv, rep) if t == target else t) for a, t in table)
    return factored, table


def write_rows(
    k_BKHS: jax.Array, v_BKSH: jax.Array, pos_BT: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """KVCache.update's scatter under a mesh, one row at a time (vmap): the batch is
    then a batching axis of the scatter and GSPMD writes each row on the devices that
    hold it, where a scatter indexed by row numbers gathers every row's update onto
    every device (8 all-gathers per decode step on tiny; tests/sharded_worker.py
    counts them). The same values as the indexed write, bit for bit."""

    def write_row(k_KHS, v_KSH, pos_T, k_TKH, v_TKH):
        return k_KHS.at[:, :, pos_T].set(k_TKH.transpose(1, 2, 0)), v_KSH.at[:, pos_T].set(
            v_TKH.transpose(1, 0, 2)
        )

    return jax.vmap(write_row)(k_BKHS, v_BKSH, pos_BT, k_BTKH, v_BTKH)


def mesh_active() -> bool:
    """Whether a mesh is set (`jax.set_mesh` / `use_mesh`): variables are then created sharded."""
    return not jax.sharding.get_abstract_mesh().empty


def param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """An nnx.Param with logical axis names. Flax shards a variable when it is created if its
    metadata asks for it (eager sharding, the default since 0.12), which needs a mesh; so it asks
    only when a mesh is active, and a model built without one stays on its device."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=mesh_active())


def cache(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Cache:
    """The same for a KV cache array, sharded only when created inside a jitted function (generation
    builds its cache there), where the names become a sharding constraint that XLA may relax for a
    batch the mesh does not divide. Created eagerly (`setup_cache` at top level) it stays an
    ordinary uncommitted array, which jit moves wherever the computation needs it."""
    return nnx.Cache(
        value,
        out_sharding=axes,
        eager_sharding=mesh_active() and isinstance(value, jax.core.Tracer),
    )


def initializer(init: nnx.Initializer, axes: tuple[str | None, ...]) -> nnx.Initializer:
    """`nnx.with_partitioning` on the same terms, for the initialisers of
    Flax's own layers (nnx.Embed)."""
    return nnx.with_partitioning(init, axes, eager_sharding=mesh_active())


def current() -> tuple[Mesh, Rules] | None:
    """The active mesh and rules table (what `use_mesh` set), or None when no mesh is active."""
    if not mesh_active():
        return None
    from flax.core import spmd

    return jax.sharding.get_mesh(), tuple(spmd.get_logical_axis_rules())


@contextmanager
def use_mesh(
    mesh: Mesh, table: str | Rules = "dp", cfg: ModelConfig | None = None
) -> Iterator[Mesh]:
    """Set `mesh` and a rules table (a preset name or `rules(...)`) for building, loading,
    generating and training inside the block; yields the mesh set.

    With `cfg`, the dimensions are checked (`check_divisible`) and a KV-head axis larger than
    n_kv_head is served by `replicate_kv_heads` (the mesh yielded is then its factored one). Without
    it a model whose KV heads the mesh would split refuses to build (see `check_heads`)."""
    table = rules(table) if isinstance(table, str) else rules(dict(table))
    if cfg is not None:
        mesh, table = replicate_kv_heads(cfg, mesh, table)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(table):
        yield mesh


def parse_rules(items: list[str]) -> dict[str, Target]:
    """Rule overrides written AXIS=MESH_AXIS (or AXIS=none, replicated), e.g. ["vocab=model"],
    as `rules`' keyword overrides."""
    overrides: dict[str, Target] = {}
    for item in items:
        axis, sep, target = item.partition("=")
        if not sep:
            raise ValueError(
                f"--rule {item!r}: expected AXIS=MESH_AXIS or AXIS=none, e.g. vocab=model"
            )
        overrides[axis.strip()] = None if target.strip().lower() == "none" else target.strip()
    return overrides


def mesh_context(
    shape: str, preset: str, overrides: list[str], *, cfg: ModelConfig, batch: int | None
) -> contextlib.AbstractContextManager[Mesh]:
    """`use_mesh` from the command line's words: a mesh shape ("data=2,model=4"), a rules preset
    and AXIS=MESH_AXIS overrides, checked against `cfg` and `batch` before anything is built (KV
    heads fewer than `model` are replicated over it)."""
    mesh = make_mesh(shape)
    table = rules(preset, **parse_rules(overrides))
    check_divisible(cfg, mesh, table, batch=batch)
    return use_mesh(mesh, table, cfg=cfg)


def check_heads(cfg: ModelConfig) -> None:
    """Under an active mesh, refuse KV heads that the rules would cut into
    pieces: Flax would shard wk/wv's rows (n_kv_head * head_dim) regardless,
    part of a head per device, and attention would gather them."""
    placement = current()
    if placement is None:
        return
    mesh, table = placement
    target = dict(table).get("kv_heads")
    parts = _axis_size(mesh, target)
    if target is not None and cfg.n_kv_head % parts:
        hint = (
            "use_mesh(mesh, rules, cfg=cfg) to replicate them"
            if parts % cfg.n_kv_head == 0
            else "change the mesh or map 'kv_heads' to None"
        )
        raise ValueError(
            f"n_kv_head={cfg.n_kv_head} KV heads cannot be split over mesh axis "
            f"{_axis_label(mesh, target)}; {hint}"
        )


def spec(axes: tuple[str | None, ...]) -> PartitionSpec:
    """The PartitionSpec of logical `axes` under the active rules table."""
    from flax.core import spmd

    table = dict(spmd.get_logical_axis_rules())
    return PartitionSpec(*(table.get(a) if a is not None else None for a in axes))


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's sharding by logical `axes` (None: replicated)
    when a mesh is active; else x.

    The residual stream is pinned to (batch, -, -): left to itself, GSPMD meets FSDP's embed-sharded
    weights by sharding the activations' d_model instead of the batch, and all-reduces activations
    (even the logits) where FSDP all-gathers weights."""
    return jax.lax.with_sharding_constraint(x, spec(axes)) if mesh_active() else x


def gather(x: jax.Array) -> jax.Array:
    """`x` whole on this host: as it is when this process holds every shard
    (one host, any mesh), else all-gathered across the processes of a
    multi-host run (a collective: every process must call it)."""
    if getattr(x, "is_fully_addressable", True):
        return x
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)


def shard_batch(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Place a host batch on the active mesh by its logical `axes`
    (unchanged when no mesh is active)."""
    if not mesh_active():
        return x
    return jax.device_put(x, NamedSharding(jax.sharding.get_mesh(), spec(axes)))
