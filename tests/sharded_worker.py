"""Run by tests/test_distributed.py in a subprocess with 8 simulated CPU devices (the device count
is fixed when JAX starts, so it cannot be changed inside the pytest process). For each rules preset
it builds the model sharded on a 2x4 mesh from the same canonical weights as an unsharded model and
prints, as one JSON object, how far the sharded forward, generation and training are from the
unsharded ones, the shardings the parameters got, and the collectives in one compiled train step.

With the argument `kv` it checks KV-head replication instead (`kv_replication`): tiny, 2 KV heads,
on data=2,model=4, where each KV head is replicated over two devices. With `cli DATA OUT` it runs
the `gptmod` command in this one process (`cli_runs`): generate and train without a mesh and on
meshes of the 8 devices, training on the shards in DATA into runs under OUT."""

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
PROMPTS = [
    [5, 17, 99, 3, 250, 41, 7],
    [120, 8],
    [33, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9],
    [7, 7, 7],
]


def collectives(hlo: str) -> dict[str, int]:
    return {c: len(re.findall(rf" {c}(?:-start)?\(", hlo)) for c in COLLECTIVES}


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    if sys.argv[1:] == ["kv"]:
        json.dump(kv_replication(), sys.stdout)
        return
    if sys.argv[1:2] == ["cli"]:
        json.dump(cli_runs(*sys.argv[2:]), sys.stdout)
        return
    # n_kv_head 4 so that tensor parallelism over model=4 splits whole kv heads; an untied head with
    # biases puts every kind of parameter (lm_head, bias vectors) under the rules.
    cfg = dataclasses.replace(
        load_preset("tiny"), vocab_size=257, n_kv_head=4, tie_embeddings=False, bias=True
    )
    ref = gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0))
    # varied tokens
    state = {k: v * 4 if v.ndim == 2 else v for k, v in gptmod_jax.export_state(ref).items()}
    gptmod_jax.load_state(ref, state)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg.vocab_size, (8, 24))
    want_logits = np.asarray(ref(idx), np.float64)
    want_tokens = jg.generate(ref, PROMPTS, 10)
    kw = dict(temperature=0.8, top_k=40, seed=3)
    want_sampled = jg.generate(ref, PROMPTS, 8, **kw)
    tc = TrainConfig(
        steps=10, batch_size=8, block_size=24, warmup_steps=1, lr=1e-3, weight_decay=0.1
    )
    batches = [
        (rng.integers(0, cfg.vocab_size, (2, 8, 24)), rng.integers(0, cfg.vocab_size, (2, 8, 24)))
        for _ in range(3)
    ]
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
            r["specs"] = {
                name: [list(p) if isinstance(p, tuple) else p for p in v.sharding.spec]
                for name, v in (
                    (n, p[...]) for n, p in gptmod_jax.model._canonical_params(model).items()
                )
            }
            r["shard_shapes"] = {
                name: list(p[...].addressable_shards[0].data.shape)
                for name, p in gptmod_jax.model._canonical_params(model).items()
            }
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
            r["grad_max_rel_diff"] = max(
                float(np.abs(grads[n] - want_grads[n]).max() / np.abs(want_grads[n]).max())
                for n in grads
                if np.abs(want_grads[n]).max() > 0
            )
            x = trainer._batch(batches[0][0], (None, "batch", None))
            hlo = trainer._step.lower(trainer.params, trainer.opt_state, x, x).compile().as_text()
            r["collectives"] = collectives(hlo)
            r["hlo_param_shapes"] = sorted(
                set(re.findall(r"= (f32\[[0-9,]*\])[^ ]* parameter\(", hlo))
            )
            r["step_losses"] = [float(trainer.step(*b)["loss"]) for b in batches]
            r["opt_spec_w_up"] = str(
                optax_moment(trainer, "blocks.0.mlp.w_up.weight").sharding.spec
            )
        got_state = trainer.export_state()
        r["step_loss_max_diff"] = float(
            np.abs(np.array(r["step_losses"]) - np.array(want_steps)).max()
        )
        r["param_abs_diff"] = {
            n: float(np.abs(got_state[n] - want_state[n]).max()) for n in got_state
        }
        out["presets"][preset] = r
    out["adam_travel"] = tc.lr * len(batches)  # the most any parameter can move in these steps
    json.dump(out, sys.stdout)


def kv_replication() -> dict:
    """tiny (4 query, 2 KV heads) on data=2,model=4 under tp and fsdp, built
    with `use_mesh(..., cfg=cfg)`:
    how far logits, greedy tokens and a train step are from one device; where wk and the cache sit;
    and the collectives of a compiled forward and decode step beside a 4-KV-head twin of tiny, whose
    KV heads split evenly over model=4 (one per device, no replication)."""
    cfg = dataclasses.replace(load_preset("tiny"), vocab_size=257)
    ref = gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0))
    # Larger weights (the tied embedding aside) for varied greedy tokens.
    state = {
        k: v * 8 if v.ndim == 2 and "emb" not in k else v
        for k, v in gptmod_jax.export_state(ref).items()
    }
    gptmod_jax.load_state(ref, state)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, cfg.vocab_size, (8, 24))
    want_logits = np.asarray(ref(idx), np.float64)
    want_tokens = jg.generate(ref, PROMPTS, 10)
    tc = TrainConfig(
        steps=10, batch_size=8, block_size=24, warmup_steps=1, lr=1e-3, weight_decay=0.1
    )
    batch = (
        rng.integers(0, cfg.vocab_size, (1, 8, 24)),
        rng.integers(0, cfg.vocab_size, (1, 8, 24)),
    )
    base = Trainer(gptmod_jax.load_state(gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0)), state), tc)
    # the second loss follows an update
    want_losses = [float(base.step(*batch)["loss"]) for _ in range(2)]
    mesh = sharding.make_mesh("data=2,model=4")
    out: dict = {"cfg": cfg.to_dict(), "want_tokens": want_tokens, "presets": {}}
    for preset in ("tp", "fsdp"):
        r: dict = {}
        with sharding.use_mesh(mesh, preset, cfg=cfg) as factored:
            model = gptmod_jax.load_state(gptmod_jax.GPT(cfg, rngs=nnx.Rngs(1)), state)
            attn = model.blocks[0].attn
            r["mesh"] = {name: int(size) for name, size in factored.shape.items()}
            r["wq_spec"], r["wk_spec"] = (
                str(attn.wq.weight[...].sharding.spec),
                str(attn.wk.weight[...].sharding.spec),
            )
            r["wk_shard_rows"] = int(attn.wk.weight[...].addressable_shards[0].data.shape[0])
            x = sharding.shard_batch(idx, ("batch", None))
            got = np.asarray(model(x), np.float64)
            r["logits_max_abs_diff"] = float(np.abs(got - want_logits).max())
            r["logits_max_abs"] = float(np.abs(want_logits).max())
            r["tokens_equal"] = jg.generate(model, PROMPTS, 10) == want_tokens
            # the collectives of a forward and of a decode step; where the cache's keys sit
            if preset == "tp":
                decode = decode_step(model)
                cache_k = decode.output_shardings[1]["blocks"][0]["attn"]["kv_cache"]["k"]
                r["cache_spec"], r["cache_shard_heads"] = (
                    str(cache_k.spec),
                    cache_k.shard_shape((8, 2, 16, 32))[1],
                )
                r["collectives"] = {
                    "forward": collectives(forward_hlo(model, x)),
                    "decode": collectives(decode.as_text()),
                }
            trainer = Trainer(model, tc)
            r["step_losses"] = [float(trainer.step(*batch)["loss"]) for _ in range(2)]
        r["step_loss_max_diff"] = float(np.abs(np.subtract(r["step_losses"], want_losses)).max())
        out["presets"][preset] = r
    # The same mesh and rules, KV heads that split evenly (one per device): what attention costs
    # without replication.
    even = dataclasses.replace(cfg, n_kv_head=4)
    with sharding.use_mesh(mesh, "tp", cfg=even):
        model = gptmod_jax.GPT(even, rngs=nnx.Rngs(0))
        x = sharding.shard_batch(idx, ("batch", None))
        out["even_collectives"] = {
            "forward": collectives(forward_hlo(model, x)),
            "decode": collectives(decode_step(model).as_text()),
        }
    # Without cfg, use_mesh cannot factor the mesh: building tiny there
    # refuses rather than cut KV heads in pieces.
    with sharding.use_mesh(mesh, "tp"):
        try:
            gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0))
            out["refusal"] = None
        except ValueError as e:
            out["refusal"] = str(e)
    return out


GENERATE = ["generate", "--preset", "tiny", "--prompt", "To be, or not to be", "--max-new-tokens"]
TRAIN = ["train", "--framework", "jax", "--preset", "tiny", "--steps", "3", "--batch-size", "8"]
TRAIN_MORE = ["--block-size", "32", "--log-every", "1", "--eval-every", "0", "--eval-batches", "1"]


def cli_runs(data: str, out: str) -> dict:
    """`gptmod generate` without a mesh, on data=4,model=2 (tiny's 4 query and 2 KV heads split
    evenly) and on data=2,model=4 (each KV head replicated twice), and on model=8, which nothing
    can serve (a one-line error); `gptmod train` without a mesh and on data=4,model=2 under fsdp.
    Each command's exit code, stdout and stderr, in this process: what the command prints is what
    main() prints (tests/test_cli.py runs it as a process), and the 8 devices are fixed at start."""
    import contextlib
    import io

    from gptmod.cli import main

    def run(*argv: str) -> dict:
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(list(argv))
        return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}

    gen = [*GENERATE, "12"]
    train = [*TRAIN, *TRAIN_MORE, "--warmup-steps", "1", "--ckpt-every", "0", "--data", data]
    return {
        "generate": run(*gen),
        "generate data=4,model=2": run(*gen, "--mesh", "data=4,model=2"),
        "generate data=2,model=4": run(*gen, "--mesh", "data=2,model=4"),
        "generate model=8": run(*gen, "--mesh", "model=8"),
        "train": run(*train, "--out", f"{out}/one"),
        "train data=4,model=2": run(
            *train, "--out", f"{out}/mesh", "--mesh", "data=4,model=2", "--rules", "fsdp"
        ),
    }


def forward_hlo(model: gptmod_jax.GPT, x: jax.Array) -> str:
    graphdef, state = nnx.split(model)
    return (
        jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(state, x).compile().as_text()
    )


def decode_step(model: gptmod_jax.GPT, batch: int = 8, max_len: int = 32) -> jax.stages.Compiled:
    """One cached decode step, compiled (the cache built inside the jit, as
    `generate` builds it)."""
    graphdef, params = nnx.split(model, nnx.Param)

    def step(params, tok_B, pos_B):
        m = nnx.merge(graphdef, params)
        m.setup_cache(batch, max_len)
        return jg.decode_one_token(m, tok_B, pos_B), nnx.state(m, nnx.Cache)

    tok, pos = (sharding.shard_batch(np.full((batch,), v, np.int32), ("batch",)) for v in (3, 5))
    return jax.jit(step).lower(params, tok, pos).compile()


def optax_moment(trainer: Trainer, name: str) -> jax.Array:
    from gptmod_jax.train import _adam_state

    return _adam_state(trainer.opt_state).mu[name]


if __name__ == "__main__":
    main()
