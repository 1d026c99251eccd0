"""Training in JAX: the twin of gptmod_torch/train.py.

optax's AdamW (decoupled weight decay on 2-D linear weights only, `training.decays`) on
the warmup-cosine schedule of `training.lr_at`, clipping by global norm, gradient
accumulation as a `lax.scan` over micro-batches inside one jitted step whose parameters
and optimizer state are donated, and bf16 compute from fp32 master weights. The loop, the
checkpoints and the log are shared (gptmod/training.py). A Trainer built inside
`gptmod_jax.sharding.use_mesh` keeps the model's parameter shardings (and so the optimizer
state's), places each batch by its logical `batch` axis and runs every step under that
mesh: data parallel, tensor parallel or FSDP as the rules table says, by GSPMD.

The trainable state is a flat dict keyed by canonical names, in canonical
layout (the JAX twin stores linear weights (out, in), as torch does), so the
optimizer's moments map onto canonical names as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gptmod.training import TrainConfig, decays, lr_at
from gptmod.weights import check_state
from gptmod_jax import sharding
from gptmod_jax.model import GPT


def loss_fn(model: GPT, x_BT: jax.Array, y_BT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of the model's (soft-capped, fp32) logits."""
    logits_BTV = model(x_BT)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, y_BT).mean()


def make_optimizer(tc: TrainConfig, names: list[str]) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with weight decay masked to `decays` names."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup_steps, tc.steps, tc.min_lr)
    adamw = optax.adamw(
        lambda count: schedule(count + 1),
        b1=tc.beta1,
        b2=tc.beta2,
        eps=tc.eps,
        weight_decay=tc.weight_decay,
        mask={n: decays(n) for n in names},
    )
    return (
        optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw) if tc.grad_clip > 0 else adamw
    )


class Trainer:
    """One model, its optimizer and the step count; the methods the shared loop calls."""

    def __init__(self, model: GPT, tc: TrainConfig) -> None:
        self.tc = tc
        self.placement = sharding.current()  # (mesh, rules) when built under a mesh, else None
        if self.placement is not None:
            sharding.check_divisible(model.cfg, *self.placement, batch=tc.batch_size)
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        leaves, self.treedef = jax.tree_util.tree_flatten_with_path(params)
        self.names: list[str] = []
        for path, _ in leaves:  # NNX paths are canonical names already (model.py's own layers)
            self.names.append(
                ".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
            )
        # Copies (with the parameters' shardings): the step donates them,
        # which must not delete the model's arrays.
        self.params = {
            n: jnp.array(v, jnp.float32, copy=True)
            for n, (_, v) in zip(self.names, leaves, strict=True)
        }
        self.tx = make_optimizer(tc, self.names)
        self.opt_state = self.tx.init(self.params)
        self.count = 0  # updates applied so far
        # Jitted per Trainer, as bound methods: with `self` a static argument, JAX's compilation
        # cache would hold every Trainer ever used, its parameters and optimizer state with it, for
        # the rest of the process. These programs go when the Trainer goes.
        self._grads = jax.jit(self._grads)
        self._step = jax.jit(self._step, donate_argnums=(0, 1))
        self._eval = jax.jit(self._eval)

    def _model(self, params: Mapping[str, jax.Array]) -> GPT:
        if self.tc.dtype == "bfloat16":  # bf16 compute; gradients flow back to the fp32 masters
            params = {n: p.astype(jnp.bfloat16) for n, p in params.items()}
        state = jax.tree_util.tree_unflatten(self.treedef, [params[n] for n in self.names])
        return nnx.merge(self.graphdef, state, self.rest)

    def _loss(self, params: Mapping[str, jax.Array], x_BT: jax.Array, y_BT: jax.Array) -> jax.Array:
        return loss_fn(self._model(params), x_BT, y_BT)

    def _grads(
        self, params: dict[str, jax.Array], x_ABT: jax.Array, y_ABT: jax.Array
    ) -> tuple[jax.Array, dict]:
        """Mean loss over the micro-batches and the gradient of that mean,
        one micro-batch at a time."""

        def micro(acc: tuple, xy: tuple) -> tuple[tuple, None]:
            loss, g = jax.value_and_grad(self._loss)(params, *xy)
            return jax.tree.map(jnp.add, acc, (loss, g)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, g), _ = jax.lax.scan(micro, zeros, (x_ABT, y_ABT))
        n = x_ABT.shape[0]
        return loss / n, jax.tree.map(lambda a: a / n, g)

    def _step(self, params: dict, opt_state: Any, x_ABT: jax.Array, y_ABT: jax.Array) -> tuple:
        loss, g = self._grads(params, x_ABT, y_ABT)
        updates, opt_state = self.tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(g)

    def _mesh(self) -> AbstractContextManager:
        return nullcontext() if self.placement is None else sharding.use_mesh(*self.placement)

    def _batch(self, a: np.ndarray, axes: tuple[str | None, ...]) -> jax.Array:
        # rows split over the mesh's batch axis, if any
        return sharding.shard_batch(jnp.asarray(a), axes)

    def grads(self, x_ABT: np.ndarray, y_ABT: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Mean loss and its gradient (not clipped), under canonical names and layout."""
        with self._mesh():
            axes = (None, "batch", None)
            loss, g = self._grads(self.params, self._batch(x_ABT, axes), self._batch(y_ABT, axes))
        return float(loss), self._canonical(g)

    def step(self, x_ABT: np.ndarray, y_ABT: np.ndarray) -> dict[str, Any]:
        """One optimizer update from a (grad_accum, batch, time) batch; loss
        and grad_norm are returned on device, unsynchronised (the shared
        loop reads the loss each step, which waits for the step)."""
        lr = lr_at(self.tc, self.count)
        with self._mesh():
            axes = (None, "batch", None)
            self.params, self.opt_state, loss, grad_norm = self._step(
                self.params, self.opt_state, self._batch(x_ABT, axes), self._batch(y_ABT, axes)
            )
        self.count += 1
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr}

    def _eval(self, params: dict, x_BT: jax.Array, y_BT: jax.Array) -> jax.Array:
        return self._loss(params, x_BT, y_BT)

    def eval_loss(self, x_BT: np.ndarray, y_BT: np.ndarray) -> float:
        with self._mesh():
            axes = ("batch", None)
            return float(self._eval(self.params, self._batch(x_BT, axes), self._batch(y_BT, axes)))

    @property
    def model(self) -> GPT:
        """The trained model (fp32), e.g. for generation."""
        state = jax.tree_util.tree_unflatten(self.treedef, [self.params[n] for n in self.names])
        return nnx.merge(self.graphdef, state, self.rest)

    def _canonical(self, tree: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
        # Copies, never views of buffers the step will donate; gathered to
        # every host first on a multi-host mesh.
        return {n: np.array(sharding.gather(tree[n]), dtype=np.float32) for n in self.names}

    def _from_canonical(self, state: Mapping[str, np.ndarray], what: str) -> dict[str, jax.Array]:
        check_state({n: tuple(self.params[n].shape) for n in self.names}, state, what=what)
        # Copies, placed like the parameters they replace (sharded under a mesh).
        return {
            n: jax.device_put(np.array(state[n], np.float32, copy=True), self.params[n].sharding)
            for n in self.names
        }

    def export_state(self) -> dict[str, np.ndarray]:
        return self._canonical(self.params)

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.params = self._from_canonical(state, "state")

    def export_optimizer(self) -> dict[str, Any]:
        """AdamW's moments under canonical names and layout, and the count."""
        adam = _adam_state(self.opt_state)
        return {"count": self.count, "m": self._canonical(adam.mu), "v": self._canonical(adam.nu)}

    def load_optimizer(self, optimizer: Mapping[str, Any]) -> None:
        count = jnp.asarray(int(optimizer["count"]), jnp.int32)
        mu = self._from_canonical(optimizer["m"], "optimizer first moments")
        nu = self._from_canonical(optimizer["v"], "optimizer second moments")
        # Every count in the chain (Adam's bias correction, the schedule) is
        # the number of updates so far.
        state = optax.tree_utils.tree_set(self.opt_state, mu=mu, nu=nu, count=count)
        # one buffer per leaf: donated
        self.opt_state = jax.tree.map(lambda a: jnp.array(a, copy=True), state)
        self.count = int(optimizer["count"])

    def all_reduce_mean(self, value: float) -> float:
        """Mean of a python float over JAX processes (itself in a single-process run)."""
        if jax.process_count() == 1:
            return value
        from jax.experimental import multihost_utils

        return float(np.mean(multihost_utils.process_allgather(np.float64(value))))


def _adam_state(opt_state: Any) -> optax.ScaleByAdamState:
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    (adam,) = found
    return adam
