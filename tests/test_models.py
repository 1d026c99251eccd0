"""gptmod.models.build: one builder for all callers. The three frameworks on the same state compute
the same logits; a seed gives the same random weights again; bad arguments are named errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gptmod_jax
import gptmod_torch
from gptmod import models
from gptmod.config import load_preset

from conftest import reduced, torch_pair_state


@pytest.mark.parametrize("preset", ["gpt2", "modern-gpt2"])
def test_the_three_frameworks_on_one_state_give_the_same_logits(preset):
    cfg = reduced(preset)
    state = torch_pair_state(cfg)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10))
    tm, jm, hf = (models.build(f, cfg, state) for f in ("torch", "jax", "hf"))
    assert isinstance(tm, gptmod_torch.GPT) and isinstance(jm, gptmod_jax.GPT) and not tm.training
    with torch.no_grad():
        lt = tm(torch.from_numpy(idx)).numpy()
        lh = hf(torch.from_numpy(idx)).logits.numpy()
    lj = np.asarray(jm(jnp.asarray(idx)))
    if cfg.logit_softcap is not None:  # HF has no soft-cap: compare before it
        lh = cfg.logit_softcap * np.tanh(lh / cfg.logit_softcap)
    scale = np.abs(lt).max()
    assert np.abs(lt - lj).max() <= 2e-5 * scale and np.abs(lt - lh).max() <= 2e-5 * scale


def test_a_seed_gives_the_same_random_weights_and_dtype_backend_apply():
    cfg = reduced("modern-gpt2")
    a = gptmod_torch.export_state(models.build("torch", cfg, seed=3))
    b = gptmod_torch.export_state(models.build("torch", cfg, seed=3))
    c = gptmod_torch.export_state(models.build("torch", cfg, seed=4))
    assert all(np.array_equal(a[k], b[k]) for k in a) and not np.array_equal(
        a["tok_emb.weight"], c["tok_emb.weight"]
    )
    ja = gptmod_jax.export_state(models.build("jax", cfg, seed=3))
    jb = gptmod_jax.export_state(models.build("jax", cfg, seed=3))
    assert all(np.array_equal(ja[k], jb[k]) for k in ja)
    tm = models.build("torch", cfg, a, dtype="bfloat16", backend="math", kernels=False)
    assert tm.tok_emb.weight.dtype == torch.bfloat16 and tm.attn_backend == "math"
    jm = models.build("jax", cfg, a, dtype="bfloat16", backend="xla")
    assert jm.tok_emb.weight.dtype == jnp.bfloat16 and jm.attn_backend == "xla"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"framework": "mlx"}, "framework='mlx': choose one of torch, jax, hf"),
        ({"dtype": "int8"}, "dtype='int8': choose one of float32, bfloat16, float16, float64"),
        ({"device": "tpu"}, r"device='tpu': choose 'cpu' or 'gpu' \(or None: the default\)"),
    ],
)
def test_bad_arguments_are_named(kw, message):
    args = {"framework": "torch", "cfg": load_preset("tiny"), **kw}
    with pytest.raises(ValueError, match=message):
        models.build(args.pop("framework"), args.pop("cfg"), **args)
