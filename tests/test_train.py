"""Training twins: the schedule and decay rule, gradient and optimizer-step
parity across frameworks against a float64 reference, accumulation, bf16,
checkpoints (atomic, cross-framework) and exact resume."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import gptmod_jax
import gptmod_torch
from gptmod import training
from gptmod.parity.training import update_errors
from gptmod.training import TrainConfig, decays, lr_at
from gptmod.weights import canonical_shapes
from gptmod_jax.train import Trainer as JaxTrainer
from gptmod_torch.train import Trainer as TorchTrainer

from conftest import interrupt_loader_at, line_shards, reduced

VOCAB = 512
TC = TrainConfig(
    steps=10, warmup_steps=3, batch_size=2, grad_accum=2, block_size=16, lr=3e-3, min_lr=3e-4
)


def _cfg(preset: str = "modern-gpt2", **kw):
    return reduced(preset, vocab_size=VOCAB, max_seq_len=32, **kw)


def _state(cfg, seed=0):
    torch.manual_seed(seed)
    return gptmod_torch.export_state(gptmod_torch.GPT(cfg))


def _trainers(cfg, tc=TC, state=None):
    state = _state(cfg) if state is None else state
    torch_t = TorchTrainer(gptmod_torch.load_state(gptmod_torch.GPT(cfg), state), tc)
    jax_t = JaxTrainer(gptmod_jax.load_state(gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0)), state), tc)
    ref_t = TorchTrainer(gptmod_torch.load_state(gptmod_torch.GPT(cfg).double(), state), tc)
    return torch_t, jax_t, ref_t


def _batch(rng, tc=TC):
    ids = rng.integers(0, VOCAB, (tc.grad_accum, tc.batch_size, tc.block_size + 1))
    return ids[..., :-1], ids[..., 1:]


def _within_budget(
    t: np.ndarray,
    j: np.ndarray,
    ref: np.ndarray,
    rel: float = 2e-5,
    floor: float = 0.0,
    scale: float | None = None,
) -> tuple[bool, str]:
    """The parity rule: each framework within rel * scale of float64, and |t
    - j| <= 2 max(e_t, e_j) (+ floor).

    scale is max|ref|, but at least `floor`: a gradient that is zero in exact arithmetic (the key
    bias: softmax ignores a shift shared by all keys) is judged against the scale of the model's
    gradients, not against 0."""
    scale = max(float(np.abs(ref).max()), floor) if scale is None else scale
    e_t, e_j = float(np.abs(t - ref).max()), float(np.abs(j - ref).max())
    d = float(np.abs(t.astype(np.float64) - j).max())
    ok = (
        e_t <= rel * scale
        and e_j <= rel * scale
        and d <= max(1e-9 * scale + 1e-12, 2 * max(e_t, e_j))
    )
    return ok, f"|t-j| {d:.3g}, e_t {e_t:.3g}, e_j {e_j:.3g}, scale {scale:.3g}"


def test_schedule_is_optax_warmup_cosine_shifted_by_one():
    for tc in (
        TC,
        dataclasses.replace(TC, warmup_steps=0),
        TrainConfig(steps=200, warmup_steps=20),
    ):
        sched = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup_steps, tc.steps, tc.min_lr)
        ours = [lr_at(tc, s) for s in range(tc.steps + 5)]
        np.testing.assert_allclose(
            ours, [float(sched(s + 1)) for s in range(tc.steps + 5)], rtol=1e-6
        )
        assert ours[0] > 0 and ours[tc.steps - 1] == pytest.approx(tc.min_lr)
    assert max(lr_at(TC, s) for s in range(TC.steps)) == pytest.approx(TC.lr)


def test_weight_decay_applies_to_linear_weights_only():
    cfg = _cfg("modern-gpt2", tie_embeddings=False, bias=True)
    names = list(canonical_shapes(cfg))
    decayed = {n for n in names if decays(n)}
    assert decayed == {
        n
        for n in names
        if n.endswith(".weight") and len(canonical_shapes(cfg)[n]) == 2 and n != "tok_emb.weight"
    }
    assert "lm_head.weight" in decayed and "blocks.0.mlp.w_gate.weight" in decayed
    # Both twins build their optimizers from this one rule.
    torch_t, jax_t, _ = _trainers(cfg)
    torch_decay = {
        id(p) for g in torch_t.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]
    }
    assert {n for n, p in torch_t.model.named_parameters() if id(p) in torch_decay} == decayed
    mask = next(
        s
        for s in jax.tree.leaves(
            jax_t.opt_state, is_leaf=lambda s: isinstance(s, optax.MaskedState)
        )
        if isinstance(s, optax.MaskedState)
    )
    assert mask is not None and set(jax_t.names) == set(names)


@pytest.mark.parametrize("preset", ["gpt2", "modern-gpt2"])
def test_loss_and_every_gradient_agree_with_the_float64_reference(preset):
    cfg = _cfg(preset)
    torch_t, jax_t, ref_t = _trainers(cfg)
    x, y = _batch(np.random.default_rng(0))
    (lt, gt), (lj, gj), (lr, gr) = torch_t.grads(x, y), jax_t.grads(x, y), ref_t.grads(x, y)
    assert abs(lt - lr) < 2e-6 * abs(lr) and abs(lj - lr) < 2e-6 * abs(lr)
    assert set(gt) == set(gj) == set(canonical_shapes(cfg))
    floor = 1e-3 * max(float(np.abs(g).max()) for g in gr.values())
    for name in gr:
        ok, why = _within_budget(gt[name], gj[name], gr[name], floor=floor)
        assert ok, f"{name}: {why}"


def test_a_broken_gradient_is_caught():
    """The check above can fail: a JAX gradient off by 1e-4 relative is outside the budget."""
    cfg = _cfg()
    torch_t, jax_t, ref_t = _trainers(cfg)
    x, y = _batch(np.random.default_rng(0))
    (_, gt), (_, gj), (_, gr) = torch_t.grads(x, y), jax_t.grads(x, y), ref_t.grads(x, y)
    name = "blocks.1.mlp.w_down.weight"
    assert not _within_budget(gt[name], gj[name] * (1 + 1e-4), gr[name])[0]


@pytest.mark.slow
def test_ten_adamw_steps_agree_with_the_float64_reference():
    cfg = _cfg()
    torch_t, jax_t, ref_t = _trainers(cfg)
    start = ref_t.export_state()
    rng = np.random.default_rng(1)
    for _ in range(10):
        x, y = _batch(rng)
        mt, mj, mr = torch_t.step(x, y), jax_t.step(x, y), ref_t.step(x, y)
        assert mt["lr"] == mj["lr"] == mr["lr"]
        assert abs(mt["loss"] - float(mj["loss"])) < 1e-5 * mr["loss"]
    st, sj, sr = torch_t.export_state(), jax_t.export_state(), ref_t.export_state()
    # Judged as shares of the float64 update (gptmod.parity.training explains why not elementwise).
    travel = sum(lr_at(TC, s) for s in range(10))
    errors = update_errors(st, sj, sr, start, travel)
    for name, (e_t, e_j, d) in errors.items():
        assert max(e_t, e_j) <= 1e-3 and d <= max(1e-6, 2 * max(e_t, e_j)), (name, e_t, e_j, d)
    # It can fail: decaying the embedding in JAX only (a wrong mask) shifts
    # it by about lr * wd * |w|.
    wrong = dict(sj, **{"tok_emb.weight": sj["tok_emb.weight"] * (1 - TC.weight_decay * travel)})
    e_t, e_j, d = update_errors(st, wrong, sr, start, travel)["tok_emb.weight"]
    assert e_j > 1e-3
    ot, oj, orf = torch_t.export_optimizer(), jax_t.export_optimizer(), ref_t.export_optimizer()
    assert ot["count"] == oj["count"] == orf["count"] == 10
    floor = 1e-3 * max(float(np.abs(m).max()) for m in orf["m"].values())
    for name in sr:  # the first moments are averaged gradients: the gradient budget applies
        ok, why = _within_budget(
            ot["m"][name], oj["m"][name], orf["m"][name], rel=1e-4, floor=floor
        )
        assert ok, f"first moment of {name}: {why}"


def test_a_jax_trainer_is_freed_when_dropped():
    """Nothing outlives a JAX Trainer: its jitted grads, step and eval belong to it. As methods
    jitted with `self` static, JAX's compilation cache held every Trainer ever used, with its
    parameters and optimizer state, until jax.clear_caches()."""
    import gc
    import weakref

    cfg = _cfg()
    trainer = JaxTrainer(
        gptmod_jax.load_state(gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0)), _state(cfg)), TC
    )
    x, y = _batch(np.random.default_rng(0))
    trainer.grads(x, y)
    trainer.step(x, y)
    trainer.eval_loss(x[0], y[0])
    gone = weakref.ref(trainer)
    del trainer
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("trainer", [TorchTrainer, JaxTrainer])
def test_accumulation_equals_one_big_batch(trainer):
    cfg = _cfg()
    state = _state(cfg)
    build = (
        (lambda: gptmod_torch.load_state(gptmod_torch.GPT(cfg), state))
        if trainer is TorchTrainer
        else (lambda: gptmod_jax.load_state(gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0)), state))
    )
    x, y = _batch(np.random.default_rng(2))
    l2, g2 = trainer(build(), TC).grads(x, y)
    big = dataclasses.replace(TC, grad_accum=1, batch_size=4)
    l1, g1 = trainer(build(), big).grads(x.reshape(1, 4, -1), y.reshape(1, 4, -1))
    assert abs(l1 - l2) < 1e-6 * l1
    for name in g1:
        np.testing.assert_allclose(g2[name], g1[name], atol=1e-6 * np.abs(g1[name]).max())


@pytest.mark.parametrize("trainer", [TorchTrainer, JaxTrainer])
def test_bf16_trains(trainer):
    cfg = _cfg()
    tc = dataclasses.replace(TC, dtype="bfloat16", steps=12)
    model = (
        gptmod_torch.GPT(cfg) if trainer is TorchTrainer else gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0))
    )
    t = trainer(model, tc)
    x, y = _batch(np.random.default_rng(3), tc)
    losses = [float(t.step(x, y)["loss"]) for _ in range(12)]
    assert losses[-1] < losses[0] - 0.5  # it learns the repeated batch
    assert all(v.dtype == np.float32 for v in t.export_state().values())  # fp32 master weights


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return line_shards(tmp_path_factory.mktemp("shards"), 400)


def _run(framework, cfg, tc, data, out, **kw):
    if framework == "torch":
        torch.manual_seed(0)
        trainer = TorchTrainer(gptmod_torch.GPT(cfg), tc)
    else:
        trainer = JaxTrainer(gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0)), tc)
    return training.train(trainer, cfg, tc, data, out, framework=framework, progress=False, **kw)


RUN = TrainConfig(
    steps=8,
    warmup_steps=2,
    batch_size=2,
    block_size=16,
    log_every=1,
    eval_every=4,
    eval_batches=2,
    ckpt_every=3,
)


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_resume_gives_the_same_loss_curve(framework, shards, tmp_path, monkeypatch):
    cfg = reduced("modern-gpt2", max_seq_len=32, vocab_size=50257)
    full = _run(framework, cfg, RUN, shards, tmp_path / "full")
    # Interrupt the second run in step 5 (after the checkpoint at 3), then rerun the same command.
    interrupt_loader_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        _run(framework, cfg, RUN, shards, tmp_path / "resumed")
    monkeypatch.undo()
    assert training.latest_checkpoint(tmp_path / "resumed").name == "step_0000003"
    resumed = _run(framework, cfg, RUN, shards, tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(4, 9))
    log = training.RunLog.read(tmp_path / "resumed" / "log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 9))  # one run, no duplicated or missing steps
    for a, b in zip(full, log, strict=True):
        assert (
            a["loss"] == b["loss"]
            and a["grad_norm"] == b["grad_norm"]
            and a.get("val_loss") == b.get("val_loss")
        )
    final = training.load_checkpoint(tmp_path / "resumed" / "step_0000008")
    reference = training.load_checkpoint(tmp_path / "full" / "step_0000008")
    assert all(np.array_equal(final.state[k], reference.state[k]) for k in final.state)


def test_checkpoints_move_between_frameworks(shards, tmp_path):
    """A torch checkpoint resumes in JAX (canonical optimizer state): the
    next losses match torch's own."""
    cfg = reduced("modern-gpt2", max_seq_len=32, vocab_size=50257)
    torch_rows = _run("torch", cfg, RUN, shards, tmp_path / "torch")
    (tmp_path / "mixed").mkdir()
    ckpt = training.load_checkpoint(tmp_path / "torch" / "step_0000006")
    training.save_checkpoint(
        tmp_path / "mixed", 6, ckpt.state, ckpt.optimizer, cfg, RUN, framework="torch"
    )
    jax_rows = _run("jax", cfg, RUN, shards, tmp_path / "mixed")
    assert [r["step"] for r in jax_rows] == [7, 8]
    for j, t in zip(jax_rows, torch_rows[6:], strict=True):
        assert abs(j["loss"] - t["loss"]) < 1e-4 * t["loss"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    cfg = _cfg()
    torch_t, _, _ = _trainers(cfg)
    first = training.save_checkpoint(
        tmp_path, 1, torch_t.export_state(), torch_t.export_optimizer(), cfg, TC, framework="torch"
    )

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(training, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        training.save_checkpoint(
            tmp_path,
            2,
            torch_t.export_state(),
            torch_t.export_optimizer(),
            cfg,
            TC,
            framework="torch",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000001"]
    assert training.latest_checkpoint(tmp_path) == first
    assert training.load_checkpoint(first).step == 1


def test_resume_refuses_a_different_config(shards, tmp_path):
    cfg = reduced("modern-gpt2", max_seq_len=32, vocab_size=50257)
    _run("torch", cfg, dataclasses.replace(RUN, steps=3), shards, tmp_path)
    with pytest.raises(ValueError, match="differs from this run's"):
        _run("torch", cfg, dataclasses.replace(RUN, steps=3, lr=5e-3), shards, tmp_path)


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (dict(steps=0), r"TrainConfig.steps=0: must be an int >= 1"),
        (dict(dtype="float16"), r"TrainConfig.dtype='float16': must be one of float32, bfloat16"),
        (dict(lr=1e-4, min_lr=1e-3), r"need 0 < min_lr <= lr"),
        (dict(warmup_steps=10, steps=10), r"warmup_steps=10: must be < steps=10"),
        (dict(beta2=1.0), r"beta2=1.0: must be in \[0, 1\)"),
        (dict(grad_clip=float("nan")), r"grad_clip=nan: must be a finite number >= 0"),
    ],
)
def test_train_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kw)


def test_train_checks_data_and_model_fit(shards, tmp_path):
    with pytest.raises(
        ValueError, match=r"vocab_size=512 is smaller than the data's vocabulary \(50257, "
    ):
        _run("torch", _cfg(), RUN, shards, tmp_path)
    cfg = reduced("modern-gpt2", max_seq_len=8, vocab_size=50257)
    with pytest.raises(ValueError, match=r"block_size=16 exceeds the model's max_seq_len=8"):
        _run("jax", cfg, RUN, shards, tmp_path)


def test_log_and_checkpoint_files(shards, tmp_path):
    cfg = reduced("modern-gpt2", max_seq_len=32, vocab_size=50257)
    rows = _run("jax", cfg, RUN, shards, tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 9)) and all(
        r["framework"] == "jax" for r in rows
    )
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert rows[0]["lr"] == lr_at(RUN, 0) and rows[-1]["lr"] == pytest.approx(RUN.min_lr)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock",
        "best",
        "latest",
        "log.jsonl",
        "model.safetensors",
        "step_0000003",
        "step_0000006",
        "step_0000008",
    ]
    meta = json.loads((tmp_path / "step_0000006" / "trainer.json").read_text())
    assert meta["step"] == meta["count"] == 6 and meta["framework"] == "jax"
    assert TrainConfig.from_dict(meta["train_config"]) == RUN
