"""Run by tests/test_distributed.py in a subprocess with 8 simulated CPU devices (the device count
is fixed when JAX starts, so it cannot be changed inside the pytest process). For each rules preset
it builds the model sharded on a 2x4 mesh from the same canonical weights as an unsharded model and
prints, as one JSON object, how far the sharded forward, generation and training are from the
unsharded ones, the shardings the parameters got, and the collectives in one compiled train step."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import sys

import jax
import numpy as np
from flax import nnx

import gptmod_jax
from gptmod.config import load_preset
from gptmod.training import TrainConfig
from gptmod_jax import sharding
from gptmod_jax.train import Trainer

jg = importlib.import_module("gptmod_jax.generate")

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [120, 8], [33, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9], [7, 7, 7]]


def collectives(hlo: str) -> dict[str, int]:
    return {c: len(re.findall(rf" {c}(?:-start)?\(", hlo)) for c in COLLECTIVES}


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    # n_kv_head 4 so that tensor parallelism over model=4 splits whole kv heads; an untied head with biases
    # puts every kind of parameter (lm_head, bias vectors) under the rules.
    cfg = dataclasses.replace(load_preset("tiny"), n_kv_head=4, tie_embeddings=False, bias=True)
    ref = gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0))
    state = {k: v * 4 if v.ndim == 2 else v for k, v in gptmod_jax.export_state(ref).items()}  # varied tokens
    gptmod_jax.load_state(ref, state)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg.vocab_size, (8, 24))
    want_logits = np.asarray(ref(idx), np.float64)
    want_tokens = jg.generate(ref, PROMPTS, 10)
    kw = dict(temperature=0.8, top_k=40, seed=3)
    want_sampled = jg.generate(ref, PROMPTS, 8, **kw)
    tc = TrainConfig(steps=10, batch_size=8, block_size=24, warmup_steps=1, lr=1e-3, weight_decay=0.1)
    batches = [(rng.integers(0, cfg.vocab_size, (2, 8, 24)), rng.integers(0, cfg.vocab_size, (2, 8, 24)))
               for _ in range(3)]  # fmt: skip
    base = Trainer(gptmod_jax.load_state(gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0)), state), tc)
    want_loss, want_grads = base.grads(*batches[0])
    want_steps = [float(base.step(*b)["loss"]) for b in batches]
    want_state = base.export_state()

    out: dict = {"cfg": cfg.to_dict(), "want_tokens": want_tokens, "presets": {}}
    mesh = sharding.make_mesh("data=2,model=4")
    for preset in sharding.PRESETS:
        r: dict = {}
        with sharding.use_mesh(mesh, preset):
            model = gptmod_jax.load_state(gptmod_jax.GPT(cfg, rngs=nnx.Rngs(1)), state)
            r["specs"] = {name: [list(p) if isinstance(p, tuple) else p for p in v.sharding.spec]
                          for name, v in ((n, p[...]) for n, p in gptmod_jax.model._canonical_params(model).items())}
            r["shard_shapes"] = {name: list(p[...].addressable_shards[0].data.shape)
                                 for name, p in gptmod_jax.model._canonical_params(model).items()}  # fmt: skip
            got = np.asarray(model(sharding.shard_batch(idx, ("batch", None))), np.float64)
            r["logits_max_abs_diff"] = float(np.abs(got - want_logits).max())
            r["logits_max_abs"] = float(np.abs(want_logits).max())
            r["tokens_equal"] = jg.generate(model, PROMPTS, 10) == want_tokens
            r["sampled_equal"] = jg.generate(model, PROMPTS, 8, **kw) == want_sampled
            steps = list(jg.generate_stream(model, PROMPTS, 10))
            r["stream_equal"] = [[s[b] for s in steps] for b in range(len(PROMPTS))] == want_tokens
            trainer = Trainer(model, tc)
            loss, grads = trainer.grads(*batches[0])
            r["grad_loss_diff"] = abs(loss - want_loss)
            r["grad_max_rel_diff"] = max(float(np.abs(grads[n] - want_grads[n]).max() / np.abs(want_grads[n]).max())
                                         for n in grads if np.abs(want_grads[n]).max() > 0)  # fmt: skip
            x = trainer._batch(batches[0][0], (None, "batch", None))
            hlo = Trainer._step.lower(trainer, trainer.params, trainer.opt_state, x, x).compile().as_text()
            r["collectives"] = collectives(hlo)
            r["hlo_param_shapes"] = sorted(set(re.findall(r"= (f32\[[0-9,]*\])[^ ]* parameter\(", hlo)))
            r["step_losses"] = [float(trainer.step(*b)["loss"]) for b in batches]
            r["opt_spec_w_up"] = str(optax_moment(trainer, "blocks.0.mlp.w_up.weight").sharding.spec)
        got_state = trainer.export_state()
        r["step_loss_max_diff"] = float(np.abs(np.array(r["step_losses"]) - np.array(want_steps)).max())
        r["param_abs_diff"] = {n: float(np.abs(got_state[n] - want_state[n]).max()) for n in got_state}
        out["presets"][preset] = r
    out["adam_travel"] = tc.lr * len(batches)  # the most any parameter can move in these steps
    json.dump(out, sys.stdout)


def optax_moment(trainer: Trainer, name: str) -> jax.Array:
    from gptmod_jax.train import _adam_state

    return _adam_state(trainer.opt_state).mu[name]


if __name__ == "__main__":
    main()
