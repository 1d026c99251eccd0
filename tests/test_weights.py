"""Canonical weights: shapes, state checks, atomic safetensors I/O, and the exact GPT-2 import from
every source layout (model, state dicts, folders), checked value by value against HF's tensors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gptmod import weights
from gptmod.config import list_presets, load_preset
from gptmod.weights import HubUnavailableError, StateError, canonical_shapes, check_state, from_hf_gpt2

D = 64


def _cfg(**kw):
    base = dict(n_layer=2, d_model=D, n_head=4, n_kv_head=4, d_ff=4 * D, vocab_size=100, max_seq_len=32)
    return dataclasses.replace(load_preset("gpt2"), **{**base, **kw})


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=D, n_head=4, vocab_size=100, n_positions=32)).eval()


def _state(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in canonical_shapes(cfg).items()}


@pytest.mark.parametrize("name", list_presets())
def test_canonical_shapes_count_every_parameter(name):
    cfg = load_preset(name)
    assert sum(int(np.prod(s)) for s in canonical_shapes(cfg).values()) == cfg.num_params()
    for variant in (dict(tie_embeddings=not cfg.tie_embeddings), dict(bias=not cfg.bias)):
        c = dataclasses.replace(cfg, **variant)
        assert sum(int(np.prod(s)) for s in canonical_shapes(c).values()) == c.num_params()


def test_check_state_lists_every_problem_at_once():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    with pytest.raises(StateError) as info:
        check_state(expected, {"a": np.zeros((3, 2)), "c": "oops", "z": np.zeros(1), "y": np.zeros(1)})
    msg = str(info.value)
    assert "1 missing: b" in msg and "2 unexpected: z, y" in msg
    assert "a: shape (3, 2), expected (2, 3)" in msg and "c: not an array (str)" in msg
    check_state(expected, {"a": np.zeros((2, 3)), "b": np.zeros(4), "c": np.zeros(1)})  # a good state passes


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_save_load_roundtrip_bit_exact(tmp_path, dtype):
    cfg = dataclasses.replace(load_preset("tiny"), vocab_size=300)
    state = {k: v.astype(dtype) for k, v in _state(cfg).items()}
    weights.save(tmp_path / "m.safetensors", state, cfg)
    loaded, cfg2 = weights.load(tmp_path / "m.safetensors")
    assert cfg2 == cfg and list(loaded) == list(state)
    for k in state:
        assert loaded[k].dtype == state[k].dtype and np.array_equal(loaded[k].view(np.uint8), state[k].view(np.uint8))


def test_save_refuses_a_state_that_does_not_fit(tmp_path):
    cfg = _cfg()
    state = _state(cfg)
    del state["norm.bias"]
    with pytest.raises(StateError, match=r"1 missing: norm\.bias"):
        weights.save(tmp_path / "m.safetensors", state, cfg)
    assert not list(tmp_path.iterdir())


def test_save_is_atomic(tmp_path, monkeypatch):
    cfg = _cfg()
    path = tmp_path / "m.safetensors"
    weights.save(path, _state(cfg, 0), cfg)
    before = path.read_bytes()

    def crash(arrays, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(weights, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        weights.save(path, _state(cfg, 1), cfg)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        weights.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        weights.load(junk)
    cfg = _cfg()
    good = tmp_path / "good.safetensors"
    weights.save(good, _state(cfg), cfg)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        weights.load(truncated)
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match=r"not a gptmod checkpoint.*from_hf_gpt2"):
        weights.load(tmp_path / "plain.safetensors")


def test_weights_module_imports_no_framework():
    code = "import sys, gptmod.weights, gptmod.config; print('torch' in sys.modules, 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ----------------------------------------------------------------------------- GPT-2 import


def _check_exact(state, hf):
    sd = {k.removeprefix("transformer."): v.numpy() for k, v in hf.state_dict().items()}
    assert np.array_equal(state["tok_emb.weight"], sd["wte.weight"])
    assert np.array_equal(state["pos_emb.weight"], sd["wpe.weight"])
    for i in range(2):
        c_attn, b_attn = sd[f"h.{i}.attn.c_attn.weight"], sd[f"h.{i}.attn.c_attn.bias"]
        assert np.array_equal(state[f"blocks.{i}.attn.wq.weight"], c_attn[:, :D].T)
        assert np.array_equal(state[f"blocks.{i}.attn.wk.weight"], c_attn[:, D : 2 * D].T)
        assert np.array_equal(state[f"blocks.{i}.attn.wv.weight"], c_attn[:, 2 * D :].T)
        assert np.array_equal(state[f"blocks.{i}.attn.wk.bias"], b_attn[D : 2 * D])
        assert np.array_equal(state[f"blocks.{i}.attn.wo.weight"], sd[f"h.{i}.attn.c_proj.weight"].T)
        assert np.array_equal(state[f"blocks.{i}.mlp.w_up.weight"], sd[f"h.{i}.mlp.c_fc.weight"].T)
        assert np.array_equal(state[f"blocks.{i}.mlp.w_down.weight"], sd[f"h.{i}.mlp.c_proj.weight"].T)
        assert np.array_equal(state[f"blocks.{i}.mlp_norm.bias"], sd[f"h.{i}.ln_2.bias"])
    assert np.array_equal(state["norm.weight"], sd["ln_f.weight"])
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in state.values())


def test_import_from_every_layout(tmp_path, hf):
    cfg = _cfg()
    from_model, report = from_hf_gpt2(hf, cfg)
    _check_exact(from_model, hf)
    assert report.fraction_copied() == 1.0 and report.counts() == {"copied": len(canonical_shapes(cfg))}
    assert ("lm_head.weight", "tied to wte.weight (tok_emb.weight)") in report.dropped
    # The hub checkpoint layout: no prefix, no lm_head, and the old mask buffers.
    hub = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        hub[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        hub[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    from_hub, hub_report = from_hf_gpt2(hub, cfg)
    assert {name for name, _ in hub_report.dropped} == {"h.0.attn.bias", "h.0.attn.masked_bias", "h.1.attn.bias",
                                                         "h.1.attn.masked_bias"}  # fmt: skip
    hf.save_pretrained(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    torch.save(hub, tmp_path / "bin" / "pytorch_model.bin")
    sources = [hf.state_dict(), from_hub, tmp_path / "st", str(tmp_path / "bin"), tmp_path / "st" / "model.safetensors"]
    for src in sources[1:]:
        state = from_hub if src is from_hub else from_hf_gpt2(src, cfg)[0]
        assert list(state) == list(from_model)
        assert all(np.array_equal(state[k], from_model[k]) for k in state), src
    assert "copied" in str(report) and "dropped lm_head.weight" in report.to_text()
    report.save(tmp_path / "report.json")
    assert '"copied": ' in (tmp_path / "report.json").read_text()


def test_import_shape_mismatch_names_the_key(hf):
    with pytest.raises(StateError, match=r"pos_emb.weight: shape \(32, 64\), expected \(64, 64\)") as info:
        from_hf_gpt2(hf, _cfg(max_seq_len=64))
    assert "gpt2-medium" in str(info.value)  # the hint lists the matching presets
    with pytest.raises(ValueError, match=r"unexpected source tensor 'h\.1\.ln_1\.weight'"):
        from_hf_gpt2(hf, _cfg(n_layer=1))


def test_import_refuses_an_untied_head(hf):
    sd = dict(hf.state_dict())
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from wte\.weight"):
        from_hf_gpt2(sd, _cfg())


def test_import_into_a_modern_config_is_not_exact(hf):
    with pytest.raises(NotImplementedError, match=r"pos='rope'.*n_kv_head=2"):
        from_hf_gpt2(hf, _cfg(pos="rope", n_kv_head=2))


def test_hub_name_offline_fails_clearly():
    code = "import gptmod.weights as w, gptmod.config as c; w.from_hf_gpt2('gpt2', c.load_preset('gpt2'))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0
    assert "HubUnavailableError: could not download 'gpt2'" in r.stderr and "offline" in r.stderr
    assert "hf download gpt2" in r.stderr


def test_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        from_hf_gpt2(str(tmp_path / "nope" / "gpt2"), _cfg())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        from_hf_gpt2(tmp_path / "empty", _cfg())
    assert HubUnavailableError.__mro__[1] is RuntimeError
