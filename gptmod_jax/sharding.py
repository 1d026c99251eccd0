"""Past one device, the JAX way: logical axis names on every parameter and on the KV cache, a rules
table from those names to the axes of a device mesh, and `jax.jit` (GSPMD) for everything else.

    mesh = make_mesh("data=2,model=4")             # 8 devices; Auto axes, so shardings propagate
    with use_mesh(mesh, "fsdp"):                    # jax.set_mesh + the rules table
        model = gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0))  # each parameter is created sharded (Flax >= 0.12)
        gptmod_jax.load_state(model, state)         # canonical weights keep each parameter's sharding
        tokens = gptmod_jax.generate(model, prompts, 64)   # or Trainer(model, tc).step(...)

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

A model built with no mesh active is placed as usual on one device (its variables carry the names
but are not sharded), so nothing changes for single-device use.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gptmod.config import ModelConfig

MESH_AXES = ("data", "model")
LOGICAL_AXES = ("batch", "embed", "heads", "kv_heads", "mlp", "vocab")
Rules = tuple[tuple[str, str | None], ...]

_PRESETS: dict[str, dict[str, str | None]] = {
    "dp": {"batch": "data", "embed": None, "heads": None, "kv_heads": None, "mlp": None, "vocab": None},
    "tp": {"batch": "data", "embed": None, "heads": "model", "kv_heads": "model", "mlp": "model", "vocab": None},
    "fsdp": {"batch": "data", "embed": "data", "heads": "model", "kv_heads": "model", "mlp": "model", "vocab": None},
}
PRESETS = tuple(_PRESETS)


def rules(preset: str | Mapping[str, str | None] = "dp", **overrides: str | None) -> Rules:
    """A complete rules table: a preset's (or a mapping's) entries, then `overrides` (axis=mesh axis or None).

    Every logical axis must be mapped (to a mesh axis or None), every name must be known."""
    if isinstance(preset, str):
        if preset not in _PRESETS:
            raise ValueError(f"rules: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        table = dict(_PRESETS[preset])
    else:
        table = dict(preset)
    table.update(overrides)
    unknown = sorted(set(table) - set(LOGICAL_AXES))
    if unknown:
        raise ValueError(f"rules: unknown logical axis {unknown[0]!r}; the axes are {', '.join(LOGICAL_AXES)}")
    missing = [a for a in LOGICAL_AXES if a not in table]
    if missing:
        raise ValueError(f"rules: logical axis {missing[0]!r} is not mapped (give a mesh axis or None)")
    for axis, target in table.items():
        if target is not None and target not in MESH_AXES:
            raise ValueError(f"rules: {axis}={target!r}: the mesh axes are {', '.join(MESH_AXES)} (or None)")
    return tuple((a, table[a]) for a in LOGICAL_AXES)


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=2,model=4"` -> {"data": 2, "model": 4}; an axis left out has size 1."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ValueError(f"mesh {text!r}: {part!r} is not AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)}")
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
    sizes = parse_mesh(shape) if isinstance(shape, str) else {**dict.fromkeys(MESH_AXES, 1), **shape}
    devices = jax.devices() if devices is None else devices
    n = math.prod(sizes[a] for a in MESH_AXES)
    if n != len(devices):
        raise ValueError(f"mesh data={sizes['data']},model={sizes['model']}: {n} devices, but {len(devices)} are "
                         f"available ({devices[0].platform}); the sizes must multiply to the device count")  # fmt: skip
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                         devices=devices)  # fmt: skip


def check_divisible(cfg: ModelConfig, mesh: Mesh, table: Rules, batch: int | None = None) -> None:
    """Every sharded dimension must split evenly (JAX refuses uneven shards): raise naming the field."""
    dims = {"embed": ("d_model", cfg.d_model), "heads": ("n_head", cfg.n_head),
            "kv_heads": ("n_kv_head", cfg.n_kv_head), "mlp": ("d_ff", cfg.d_ff),
            "vocab": ("vocab_size", cfg.vocab_size)}  # fmt: skip
    if batch is not None:
        dims["batch"] = ("batch", batch)
    for axis, target in table:
        if target is None or axis not in dims:
            continue
        field, size = dims[axis]
        parts = mesh.shape[target]
        if size % parts:
            raise ValueError(f"{field}={size} is not divisible by mesh axis {target}={parts} (the rules shard "
                             f"{axis!r} over {target!r}); change the mesh or map {axis!r} to None")  # fmt: skip


def mesh_active() -> bool:
    """Whether a mesh is set (`jax.set_mesh` / `use_mesh`): variables are then created sharded."""
    return not jax.sharding.get_abstract_mesh().empty


def param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """An nnx.Param with logical axis names. Flax shards a variable when it is created if its metadata
    asks for it (eager sharding, the default since 0.12), which needs a mesh; so it asks only when a
    mesh is active, and a model built without one stays on its device."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=mesh_active())


def cache(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Cache:
    """The same for a KV cache array, sharded only when created inside a jitted function (generation
    builds its cache there), where the names become a sharding constraint that XLA may relax for a
    batch the mesh does not divide. Created eagerly (`setup_cache` at top level) it stays an ordinary
    uncommitted array, which jit moves wherever the computation needs it."""
    return nnx.Cache(value, out_sharding=axes, eager_sharding=mesh_active() and isinstance(value, jax.core.Tracer))


def initializer(init: nnx.Initializer, axes: tuple[str | None, ...]) -> nnx.Initializer:
    """`nnx.with_partitioning` on the same terms, for the initialisers of Flax's own layers (nnx.Embed)."""
    return nnx.with_partitioning(init, axes, eager_sharding=mesh_active())


def current() -> tuple[Mesh, Rules] | None:
    """The active mesh and rules table (what `use_mesh` set), or None when no mesh is active."""
    if not mesh_active():
        return None
    from flax.core import spmd

    return jax.sharding.get_mesh(), tuple(spmd.get_logical_axis_rules())


@contextmanager
def use_mesh(mesh: Mesh, table: str | Rules = "dp") -> Iterator[Mesh]:
    """Set `mesh` and a rules table (a preset name or `rules(...)`) for building, loading, generating and
    training inside the block."""
    table = rules(table) if isinstance(table, str) else rules(dict(table))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(table):
        yield mesh


def spec(axes: tuple[str | None, ...]) -> PartitionSpec:
    """The PartitionSpec of logical `axes` under the active rules table."""
    from flax.core import spmd

    table = dict(spmd.get_logical_axis_rules())
    return PartitionSpec(*(table.get(a) if a is not None else None for a in axes))


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's sharding by logical `axes` (None: replicated) when a mesh is active; else x.

    The residual stream is pinned to (batch, -, -): left to itself, GSPMD meets FSDP's embed-sharded
    weights by sharding the activations' d_model instead of the batch, and all-reduces activations
    (even the logits) where FSDP all-gathers weights."""
    return jax.lax.with_sharding_constraint(x, spec(axes)) if mesh_active() else x


def gather(x: jax.Array) -> jax.Array:
    """`x` whole on this host: as it is when this process holds every shard (one host, any mesh), else
    all-gathered across the processes of a multi-host run (a collective: every process must call it)."""
    if getattr(x, "is_fully_addressable", True):
        return x
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)


def shard_batch(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Place a host batch on the active mesh by its logical `axes` (unchanged when no mesh is active)."""
    if not mesh_active():
        return x
    return jax.device_put(x, NamedSharding(jax.sharding.get_mesh(), spec(axes)))
