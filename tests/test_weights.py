"""Canonical weights: shapes, state checks, atomic safetensors I/O, and the
exact GPT-2 import from every source layout (model, state dicts, folders,
files), checked value by value against HF's tensors."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from gptmod import hf as hf_io
from gptmod import weights
from gptmod.config import list_presets, load_preset
from gptmod.hf import HubUnavailableError
from gptmod.hf_gpt2 import from_hf_gpt2
from gptmod.transfer import TransferReport
from gptmod.weights import StateError, canonical_shapes, check_state

D, N_LAYER, VOCAB, N_POS = 64, 2, 100, 32


def _cfg(**kw):
    base = dict(
        n_layer=N_LAYER,
        d_model=D,
        n_head=4,
        n_kv_head=4,
        d_ff=4 * D,
        vocab_size=VOCAB,
        max_seq_len=N_POS,
    )
    return dataclasses.replace(load_preset("gpt2"), **{**base, **kw})


def _hf_model(seed=0, **kw):
    torch.manual_seed(seed)
    hf_cfg = GPT2Config(
        n_layer=N_LAYER,
        n_embd=D,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=N_POS,
        bos_token_id=0,
        eos_token_id=0,
        **kw,
    )
    model = GPT2LMHeadModel(hf_cfg).eval()
    # HF zero-inits biases and sets LayerNorm to 1/0: randomise all, so every slice differs
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf():
    return _hf_model()


def _hub_layout(model, buffers=True):
    """The layout of the hub's GPT-2 checkpoints: no prefix, no lm_head, and old mask buffers."""
    sd = {
        k.removeprefix("transformer."): v.clone()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }
    if buffers:
        for i in range(N_LAYER):
            sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, N_POS, N_POS, dtype=torch.bool))
            sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


def _state(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in canonical_shapes(cfg).items()}


def _n(shapes):
    return sum(int(np.prod(s)) for s in shapes.values())


# ----------------------------------------------------------------------------- names and checks


@pytest.mark.parametrize("name", list_presets())
def test_canonical_shapes_count_every_parameter(name):
    cfg = load_preset(name)
    assert _n(canonical_shapes(cfg)) == cfg.num_params()
    variants = [
        dict(tie_embeddings=not cfg.tie_embeddings),
        dict(bias=not cfg.bias),
        dict(norm="rmsnorm" if cfg.norm == "layernorm" else "layernorm"),
        dict(pos="rope" if cfg.pos == "learned" else "learned"),
        dict(mlp="swiglu" if cfg.mlp == "gelu" else "gelu"),
        dict(n_kv_head=1),
    ]
    for variant in variants:
        c = dataclasses.replace(cfg, **variant)
        assert _n(canonical_shapes(c)) == c.num_params(), variant


def test_canonical_shapes_names_and_order():
    classic = canonical_shapes(_cfg(n_layer=1))
    assert list(classic) == [
        "tok_emb.weight",
        "pos_emb.weight",
        "blocks.0.attn_norm.weight",
        "blocks.0.attn_norm.bias",
        "blocks.0.attn.wq.weight",
        "blocks.0.attn.wq.bias",
        "blocks.0.attn.wk.weight",
        "blocks.0.attn.wk.bias",
        "blocks.0.attn.wv.weight",
        "blocks.0.attn.wv.bias",
        "blocks.0.attn.wo.weight",
        "blocks.0.attn.wo.bias",
        "blocks.0.mlp_norm.weight",
        "blocks.0.mlp_norm.bias",
        "blocks.0.mlp.w_up.weight",
        "blocks.0.mlp.w_up.bias",
        "blocks.0.mlp.w_down.weight",
        "blocks.0.mlp.w_down.bias",
        "norm.weight",
        "norm.bias",
    ]
    assert classic["blocks.0.mlp.w_up.weight"] == (4 * D, D) and classic[
        "blocks.0.mlp.w_down.weight"
    ] == (D, 4 * D)
    modern = canonical_shapes(load_preset("modern-gpt2"))
    assert "pos_emb.weight" not in modern and "lm_head.weight" not in modern
    assert not [k for k in modern if k.endswith(".bias")]
    assert modern["blocks.11.attn.wk.weight"] == (4 * 64, 768) and modern[
        "blocks.11.attn.wq.weight"
    ] == (768, 768)
    assert list(modern)[-4:-1] == [
        "blocks.11.mlp.w_gate.weight",
        "blocks.11.mlp.w_up.weight",
        "blocks.11.mlp.w_down.weight",
    ]
    assert list(canonical_shapes(_cfg(tie_embeddings=False)))[-1] == "lm_head.weight"


def test_check_state_lists_every_problem_at_once():
    expected = {"a": (2, 3), "b": (4,), "c": (1,), "d": (5,)}
    state = {
        "a": np.zeros((3, 2)),
        "c": "oops",
        "z": np.zeros(1),
        "y": np.zeros(1),
        "d": torch.zeros(5),
    }
    with pytest.raises(StateError) as info:
        check_state(expected, state, what="my state")
    msg = str(info.value)
    assert msg.startswith("my state does not match the model:")
    assert "1 missing: b" in msg and "2 unexpected: z, y" in msg
    assert "a: shape (3, 2), expected (2, 3)" in msg and "c: not an array (str)" in msg
    # a torch tensor of the right shape is fine: the check is framework-generic
    assert " d:" not in msg
    assert isinstance(info.value, ValueError)
    check_state(
        expected, {"a": np.zeros((2, 3)), "b": np.zeros(4), "c": np.zeros(1), "d": np.zeros(5)}
    )


# ----------------------------------------------------------------------------- safetensors I/O


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_save_load_roundtrip_bit_exact(tmp_path, dtype):
    cfg = dataclasses.replace(load_preset("tiny"), vocab_size=300)
    state = {k: v.astype(dtype) for k, v in _state(cfg).items()}
    weights.save(tmp_path / "m.safetensors", state, cfg, metadata={"note": "hello"})
    loaded, cfg2 = weights.load(tmp_path / "m.safetensors")
    # model order, not safetensors' sorted order
    assert cfg2 == cfg and list(loaded) == list(canonical_shapes(cfg))
    for k in state:
        assert loaded[k].dtype == state[k].dtype and np.array_equal(
            loaded[k].view(np.uint8), state[k].view(np.uint8)
        )
    with safe_open(str(tmp_path / "m.safetensors"), framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "gptmod-canonical-v1" and meta["note"] == "hello"
    assert json.loads(meta["gptmod_config"]) == cfg.to_dict()


def test_save_makes_arrays_contiguous_and_checks_metadata(tmp_path):
    cfg = _cfg()
    state = _state(cfg)
    w = state["blocks.0.attn.wo.weight"]
    state["blocks.0.attn.wo.weight"] = np.asfortranarray(w)  # same values, column-major
    state["tok_emb.weight"] = np.ascontiguousarray(state["tok_emb.weight"].T).T  # a transposed view
    weights.save(tmp_path / "m.safetensors", state, cfg)
    loaded, _ = weights.load(tmp_path / "m.safetensors")
    assert all(np.array_equal(loaded[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="'format' is reserved"):
        weights.save(tmp_path / "x.safetensors", state, cfg, metadata={"format": "mine"})
    with pytest.raises(TypeError, match="str to str"):
        weights.save(tmp_path / "x.safetensors", state, cfg, metadata={"step": 3})
    assert not (tmp_path / "x.safetensors").exists()


def test_save_refuses_a_state_that_does_not_fit(tmp_path):
    cfg = _cfg()
    state = _state(cfg)
    del state["norm.bias"]
    state["extra"] = np.zeros(1, np.float32)
    with pytest.raises(StateError, match=r"(?s)1 missing: norm\.bias.*1 unexpected: extra"):
        weights.save(tmp_path / "m.safetensors", state, cfg)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("crash_in", ["save_file", "fsync"])
@pytest.mark.parametrize("existing", [True, False])
def test_save_is_atomic(tmp_path, monkeypatch, crash_in, existing):
    cfg = _cfg()
    path = tmp_path / "m.safetensors"
    if existing:
        weights.save(path, _state(cfg, 0), cfg)
    before = path.read_bytes() if existing else None

    def half_write(arrays, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("power cut")

    def failing_fsync(fd):
        raise OSError("disk full")

    if crash_in == "save_file":
        monkeypatch.setattr(weights, "save_file", half_write)
    else:
        monkeypatch.setattr(weights.os, "fsync", failing_fsync)
    with pytest.raises((KeyboardInterrupt, OSError)):
        weights.save(path, _state(cfg, 1), cfg)
    assert (path.read_bytes() if existing else None) == before
    # no temp file left
    assert sorted(p.name for p in tmp_path.iterdir()) == (["m.safetensors"] if existing else [])


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_save_respects_the_umask(tmp_path):
    cfg = _cfg()
    umask = os.umask(0o022)
    try:
        weights.save(tmp_path / "m.safetensors", _state(cfg), cfg)
    finally:
        os.umask(umask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644  # not a temp file's 0o600
    os.chmod(tmp_path / "m.safetensors", 0o640)
    weights.save(tmp_path / "m.safetensors", _state(cfg), cfg)  # overwriting keeps the file's mode
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o640


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*missing\.safetensors"):
        weights.load(tmp_path / "missing.safetensors")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        weights.load(tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(ValueError, match=r"junk\.safetensors: not a valid safetensors file"):
        weights.load(junk)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.safetensors: not a valid safetensors file"):
        weights.load(tmp_path / "empty.safetensors")
    cfg = _cfg()
    good = tmp_path / "good.safetensors"
    weights.save(good, _state(cfg), cfg)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated\.safetensors: not a valid safetensors file"):
        weights.load(truncated)


def test_load_metadata_errors(tmp_path):
    cfg = _cfg()
    state = _state(cfg)

    def write(name, meta, tensors=state):
        save_file(tensors, str(tmp_path / name), metadata=meta)
        return tmp_path / name

    hf_like = write("hf.safetensors", {"format": "pt"})  # what transformers' save_pretrained writes
    with pytest.raises(
        ValueError,
        match=r"hf\.safetensors: no 'gptmod_config'.*not a gptmod checkpoint.*from_hf_gpt2",
    ):
        weights.load(hf_like)
    with pytest.raises(ValueError, match=r"bad\.safetensors: invalid config in metadata: not JSON"):
        weights.load(write("bad.safetensors", {"gptmod_config": "n_layer=2"}))
    typo = json.dumps({**cfg.to_dict(), "n_layers": 2})
    with pytest.raises(
        ValueError,
        match=r"typo\.safetensors: invalid config in metadata: .*unknown field.*n_layers",
    ):
        weights.load(write("typo.safetensors", {"gptmod_config": typo}))
    with pytest.raises(ValueError, match=r"format 'gptmod-canonical-v9' is not supported"):
        weights.load(
            write(
                "v9.safetensors", {"gptmod_config": cfg.to_json(), "format": "gptmod-canonical-v9"}
            )
        )
    partial = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    with pytest.raises(
        StateError, match=r"(?s)partial\.safetensors.*16 missing: blocks\.1\.attn_norm\.weight"
    ):
        weights.load(write("partial.safetensors", {"gptmod_config": cfg.to_json()}, partial))


def test_weights_module_imports_no_framework():
    mods = ("torch", "jax", "transformers", "huggingface_hub")
    code = (
        "import sys, gptmod.weights, gptmod.config; print([m for m in "
        f"{mods!r} if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- GPT-2 import


def _check_exact(state, model):
    """Every canonical tensor against HF's own tensors, written out independently of the mapper."""
    sd = {
        k.removeprefix("transformer."): v.detach().float().numpy()
        for k, v in model.state_dict().items()
    }
    assert list(state) == list(canonical_shapes(_cfg()))
    assert np.array_equal(state["tok_emb.weight"], sd["wte.weight"])
    assert np.array_equal(state["pos_emb.weight"], sd["wpe.weight"])
    for i in range(N_LAYER):
        b, h = f"blocks.{i}", f"h.{i}"
        c_attn, b_attn = sd[f"{h}.attn.c_attn.weight"], sd[f"{h}.attn.c_attn.bias"]
        assert c_attn.shape == (D, 3 * D)  # Conv1D: (in, out)
        for j, name in enumerate(("wq", "wk", "wv")):
            assert np.array_equal(
                state[f"{b}.attn.{name}.weight"], c_attn[:, j * D : (j + 1) * D].T
            )
            assert np.array_equal(state[f"{b}.attn.{name}.bias"], b_attn[j * D : (j + 1) * D])
        assert np.array_equal(state[f"{b}.attn.wo.weight"], sd[f"{h}.attn.c_proj.weight"].T)
        assert np.array_equal(state[f"{b}.attn.wo.bias"], sd[f"{h}.attn.c_proj.bias"])
        assert np.array_equal(state[f"{b}.mlp.w_up.weight"], sd[f"{h}.mlp.c_fc.weight"].T)
        assert np.array_equal(state[f"{b}.mlp.w_up.bias"], sd[f"{h}.mlp.c_fc.bias"])
        assert np.array_equal(state[f"{b}.mlp.w_down.weight"], sd[f"{h}.mlp.c_proj.weight"].T)
        assert np.array_equal(state[f"{b}.mlp.w_down.bias"], sd[f"{h}.mlp.c_proj.bias"])
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            for p in ("weight", "bias"):
                assert np.array_equal(state[f"{b}.{ours}.{p}"], sd[f"{h}.{theirs}.{p}"])
    assert np.array_equal(state["norm.weight"], sd["ln_f.weight"])
    assert np.array_equal(state["norm.bias"], sd["ln_f.bias"])
    assert all(
        v.dtype == np.float32 and v.flags.c_contiguous and v.flags.owndata for v in state.values()
    )
    # The q/k/v slices really differ, so a swapped split could not pass.
    assert not np.array_equal(state["blocks.0.attn.wq.bias"], state["blocks.0.attn.wk.bias"])


def test_import_from_a_model_is_exact(hf):
    state, report = from_hf_gpt2(hf, _cfg())
    _check_exact(state, hf)
    assert report.fraction_copied() == 1.0 and report.counts() == {
        "copied": len(canonical_shapes(_cfg()))
    }
    assert report.dropped == [("lm_head.weight", "tied to wte.weight (tok_emb.weight)")]
    rows = {r.target: r for r in report.rows}
    assert rows["blocks.1.attn.wk.weight"].source == "h.1.attn.c_attn.weight"
    assert (
        rows["blocks.1.attn.wk.weight"].how
        == "split from c_attn [64:128], Conv1D (in,out) transposed"
    )
    assert rows["blocks.0.mlp.w_up.weight"].how == "Conv1D (in,out) transposed"


def test_import_from_every_layout_is_identical(tmp_path, hf):
    ref, _ = from_hf_gpt2(hf, _cfg())
    hub = _hub_layout(hf)
    (tmp_path / "bin").mkdir()
    # an old checkpoint: a plain tensor dict
    torch.save(hub, tmp_path / "bin" / "pytorch_model.bin")
    hf.save_pretrained(tmp_path / "st")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sources = {
        "GPT2Model": hf.transformer,
        "prefixed state_dict": hf.state_dict(),
        "hub layout with mask buffers": hub,
        "numpy hub layout": {k: v.numpy() for k, v in _hub_layout(hf, buffers=False).items()},
        "save_pretrained folder": tmp_path / "st",
        "sharded folder": str(tmp_path / "sharded"),
        "pytorch_model.bin folder": str(tmp_path / "bin"),
        "single .safetensors file": tmp_path / "st" / "model.safetensors",
    }
    for what, src in sources.items():
        state, report = from_hf_gpt2(src, _cfg())
        assert list(state) == list(ref), what
        assert all(np.array_equal(state[k], ref[k]) for k in ref), what
        assert report.fraction_copied() == 1.0, what
    _, hub_report = from_hf_gpt2(hub, _cfg())
    assert hub_report.dropped == [
        (f"h.{i}.attn.{b}", "causal-mask buffer of old checkpoints, not a weight")
        for i in range(N_LAYER)
        for b in ("bias", "masked_bias")
    ]


def test_import_owns_its_memory_and_upcasts_half_precision():
    model = _hf_model(seed=1)
    state, _ = from_hf_gpt2(model, _cfg())
    wte = model.transformer.wte.weight
    before = state["tok_emb.weight"].copy()
    with torch.no_grad():
        wte.add_(1.0)  # training the HF model afterwards must not change our state
    assert np.array_equal(state["tok_emb.weight"], before)
    bf16, _ = from_hf_gpt2(model.to(torch.bfloat16), _cfg())
    assert all(v.dtype == np.float32 for v in bf16.values())
    assert np.array_equal(
        bf16["norm.weight"], model.transformer.ln_f.weight.detach().float().numpy()
    )
    c_attn = model.transformer.h[0].attn.c_attn.weight.detach().float().numpy()
    assert np.array_equal(bf16["blocks.0.attn.wv.weight"], c_attn[:, 2 * D :].T)
    numpy_bf16 = {
        k: v.float().numpy().astype(ml_dtypes.bfloat16)
        for k, v in _hub_layout(model, False).items()
    }
    assert all(np.array_equal(from_hf_gpt2(numpy_bf16, _cfg())[0][k], bf16[k]) for k in bf16)


def test_report_text_and_json(tmp_path, hf):
    _, report = from_hf_gpt2(_hub_layout(hf), _cfg())
    text = report.to_text()
    assert str(report) == text
    lines = text.splitlines()
    assert lines[0].split() == ["target", "action", "source", "how"]
    # Aligned: the action column starts at the same offset on every table line.
    col = lines[0].index("action")
    assert all(line[col : col + 6] == "copied" for line in lines[1 : 1 + len(report.rows)])
    assert "dropped h.0.attn.masked_bias" in text
    n_params = _n(canonical_shapes(_cfg()))
    assert (
        lines[-1]
        == f"{len(report.rows)} target tensors, {n_params:,} parameters: {len(report.rows)} copied "
        "(100.0% of parameters); 4 source tensor(s) dropped"
    )
    report.save(tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["counts"] == {"copied": len(report.rows)} and data["fraction_copied"] == 1.0
    assert data["rows"][4] == {
        "target": "blocks.0.attn.wq.weight",
        "action": "copied",
        "source": "h.0.attn.c_attn.weight",
        "how": "split from c_attn [0:64], Conv1D (in,out) transposed",
        "size": D * D,
    }
    assert data["param_counts"] == {"copied": n_params} and data["notes"] == []
    assert ["h.1.attn.bias", "causal-mask buffer of old checkpoints, not a weight"] in data[
        "dropped"
    ]
    mixed = TransferReport(
        rows=[dataclasses.replace(report.rows[0], action="new", source=""), *report.rows[1:4]]
    )
    assert mixed.counts() == {"new": 1, "copied": 3} and mixed.fraction_copied() == 0.75


def test_import_shape_mismatch_names_the_keys(hf):
    with pytest.raises(StateError) as info:
        from_hf_gpt2(hf, _cfg(max_seq_len=64))
    msg = str(info.value)
    assert "max_seq_len: cfg has 64, the source has 32" in msg
    assert "wpe.weight has shape (32, 64), pos_emb.weight expects (64, 64)" in msg
    assert "never truncated" in msg and "max_seq_len=32" in msg  # the recipe for a config that fits
    with pytest.raises(StateError, match=r"n_layer: cfg has 1, the source has 2"):
        from_hf_gpt2(hf, _cfg(n_layer=1))
    # shapes agree; HF's config does not
    with pytest.raises(StateError, match=r"n_head: cfg has 8, the source has 4"):
        from_hf_gpt2(hf, _cfg(n_head=8, n_kv_head=8))


def test_import_suggests_the_matching_preset():
    # Real GPT-2 medium shapes without the memory: zero-stride views carry the shapes only.
    medium = load_preset("gpt2-medium")
    zeros = lambda *shape: np.broadcast_to(np.float32(0), shape)
    d, f = medium.d_model, medium.d_ff
    src = {
        "wte.weight": zeros(medium.vocab_size, d),
        "wpe.weight": zeros(medium.max_seq_len, d),
        "ln_f.weight": zeros(d),
        "ln_f.bias": zeros(d),
    }
    for i in range(medium.n_layer):
        src |= {f"h.{i}.mlp.c_fc.weight": zeros(d, f), f"h.{i}.ln_1.weight": zeros(d)}
    with pytest.raises(StateError) as info:
        from_hf_gpt2(src, load_preset("gpt2"))
    msg = str(info.value)
    assert (
        "d_model: cfg has 768, the source has 1024" in msg
        and "n_layer: cfg has 12, the source has 24" in msg
    )
    assert "hint: the source matches preset 'gpt2-medium'" in msg


def test_import_checks_tensors_one_by_one(hf):
    hub = _hub_layout(hf, buffers=False)
    bad = dict(hub)
    bad["h.1.attn.c_attn.bias"] = torch.zeros(2 * D)
    with pytest.raises(
        StateError,
        match=r"blocks\.1\.attn\.wq\.bias \(from h\.1\.attn\.c_attn\.bias\): source shape "
        r"\(128,\), expected \(192,\)",
    ):
        from_hf_gpt2(bad, _cfg())
    missing = {k: v for k, v in hub.items() if k not in ("h.0.ln_2.bias", "ln_f.weight")}
    with pytest.raises(
        ValueError, match=r"lacks 2 GPT-2 tensor\(s\): h\.0\.ln_2\.bias, ln_f\.weight"
    ):
        from_hf_gpt2(missing, _cfg())
    extra = {**hub, "h.0.attn.q_norm.weight": torch.zeros(D), "score.weight": torch.zeros(2, D)}
    with pytest.raises(
        ValueError,
        match=r"unexpected source tensor\(s\).*h\.0\.attn\.q_norm\.weight, score\.weight",
    ):
        from_hf_gpt2(extra, _cfg())


def test_import_checks_the_hf_config():
    for kw, msg in (
        (dict(activation_function="gelu"), "activation_function='gelu'"),
        (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon=1e-06 but cfg.norm_eps=1e-05"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
    ):
        with pytest.raises(
            ValueError, match=r"computes a different model: " + msg.replace("(", r"\(")
        ):
            from_hf_gpt2(_hf_model(**kw), _cfg())


def test_import_refuses_an_untied_head(hf):
    sd = dict(hf.state_dict())
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from wte\.weight"):
        from_hf_gpt2(sd, _cfg())


def test_import_into_a_modern_config_checks_its_sizes(hf):
    # d_ff and (with RoPE) max_seq_len are free in a partial transfer; the
    # other sizes must still match.
    with pytest.raises(StateError) as info:
        from_hf_gpt2(hf, _cfg(pos="rope", norm="rmsnorm", n_layer=3, d_ff=96, max_seq_len=999))
    msg = str(info.value)
    assert (
        "n_layer: cfg has 3, the source has 2" in msg
        and "d_ff" not in msg
        and "max_seq_len" not in msg
    )
    assert (
        "hint: keep the modern switches and take the source's sizes: "
        "dataclasses.replace(cfg, n_layer=2)" in msg
    )
    # learned positions: exact
    with pytest.raises(StateError, match=r"max_seq_len: cfg has 64, the source has 32"):
        from_hf_gpt2(hf, _cfg(norm="rmsnorm", max_seq_len=64))


def test_hub_id_offline_fails_clearly(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.chdir(tmp_path)  # no local folder named like the repo
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment once, at import: set its
    # constants too, and use an empty cache.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    for repo_id in ("gpt2", "openai-community/gpt2-medium"):
        with pytest.raises(HubUnavailableError) as info:
            from_hf_gpt2(repo_id, load_preset("gpt2"))
        msg = str(info.value)
        assert (
            f"could not download '{repo_id}'" in msg
            and "offline" in msg
            and "HF_HUB_OFFLINE is set" in msg
        )
        assert f"hf download {repo_id}" in msg and "pass its path" in msg
    assert issubclass(HubUnavailableError, RuntimeError)


def test_hub_unreachable_fails_clearly(tmp_path, monkeypatch):
    import httpx2
    import huggingface_hub
    import huggingface_hub.constants as hub_constants

    # Online as far as huggingface_hub knows, whatever the shell's HF_HUB_OFFLINE (read once, at
    # import): the network itself fails here.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)

    def no_network(repo_id, **kw):
        assert (
            "model.safetensors" in kw["allow_patterns"]
            and "pytorch_model.bin" not in kw["allow_patterns"]
        )
        raise httpx2.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(
        HubUnavailableError, match=r"appears to be offline \(the hub could not be reached\)"
    ):
        from_hf_gpt2("gpt2", load_preset("gpt2"))


def test_local_paths_and_repo_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    asked = []

    def fake_download(repo_id):
        asked.append(repo_id)
        raise HubUnavailableError("offline")

    monkeypatch.setattr(hf_io, "download", fake_download)
    for path in ("./gpt2", "/no/such/gpt2", "org/name/extra", "~/gpt2", tmp_path / "gpt2"):
        with pytest.raises(FileNotFoundError, match="no such file or folder"):
            from_hf_gpt2(path, _cfg())
    for repo_id in ("gpt2", "openai-community/gpt2-medium"):
        with pytest.raises(HubUnavailableError):
            from_hf_gpt2(repo_id, _cfg())
    assert asked == ["gpt2", "openai-community/gpt2-medium"]  # only repo ids reach the hub
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: none of model\.safetensors"):
        from_hf_gpt2("empty", _cfg())  # an existing folder wins over a repo id of the same name
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-1.safetensors"}}'
    )
    with pytest.raises(
        FileNotFoundError, match=r"shard\(s\) that are not there: model-1\.safetensors"
    ):
        from_hf_gpt2(tmp_path / "broken", _cfg())


class _Payload:
    """Anything that is not a tensor: weights_only unpickling must refuse to build it."""


def test_pytorch_bin_is_never_unpickled_freely(tmp_path):
    (tmp_path / "evil").mkdir()
    torch.save(
        {"wte.weight": torch.zeros(2), "x": _Payload()}, tmp_path / "evil" / "pytorch_model.bin"
    )
    with pytest.raises(pickle.UnpicklingError):
        from_hf_gpt2(tmp_path / "evil", _cfg())
