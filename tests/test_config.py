"""ModelConfig: validation names the field and the rule; JSON and presets round-trip."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gptmod.config import ModelConfig, list_presets, load_preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("overrides", "field", "rule"),
    [
        ({"n_head": 12, "n_kv_head": 5}, "n_kv_head=5", "divisible"),
        ({"n_head": 4, "n_kv_head": 8}, "n_kv_head=8", "<= n_head"),
        ({"d_model": 100, "n_head": 12, "n_kv_head": 12}, "d_model=100", "divisible by n_head"),
        (
            {"d_model": 36, "n_head": 12, "n_kv_head": 12, "pos": "rope"},
            "pos='rope'",
            "even head_dim",
        ),
        ({"pos": "alibi"}, "pos='alibi'", "'learned', 'rope'"),
        ({"norm": "batchnorm"}, "norm='batchnorm'", "'layernorm', 'rmsnorm'"),
        ({"mlp": "relu"}, "mlp='relu'", "'gelu', 'swiglu'"),
        ({"n_layer": 0}, "n_layer=0", ">= 1"),
        ({"vocab_size": -3}, "vocab_size=-3", ">= 1"),
        ({"d_ff": 3.5}, "d_ff=3.5", "int"),
        ({"n_head": True}, "n_head=True", "int"),
        ({"logit_softcap": 0.0}, "logit_softcap=0.0", "> 0"),
        ({"logit_softcap": -30.0}, "logit_softcap=-30.0", "> 0"),
        ({"norm_eps": 0}, "norm_eps=0", "> 0"),
        ({"rope_theta": float("inf")}, "rope_theta=inf", "finite"),
        ({"bias": "yes"}, "bias='yes'", "bool"),
    ],
)
def test_invalid_config_names_field_and_rule(overrides, field, rule):
    with pytest.raises(ValueError, match="ModelConfig") as info:
        ModelConfig(**overrides)
    assert field in str(info.value) and rule in str(info.value)


def test_valid_edge_cases():
    assert ModelConfig(n_head=12, n_kv_head=1).n_kv_head == 1  # MQA
    assert ModelConfig(pos="rope", d_model=64, n_head=4, n_kv_head=4).head_dim == 16
    assert ModelConfig(logit_softcap=None).logit_softcap is None


def test_frozen():
    cfg = load_preset("gpt2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layer = 3  # type: ignore[misc]


def test_presets_have_the_documented_shapes():
    assert set(list_presets()) >= {
        "gpt2",
        "gpt2-medium",
        "gpt2-large",
        "gpt2-xl",
        "modern-gpt2",
        "tiny",
    }
    sizes = {
        "gpt2": (12, 12, 768),
        "gpt2-medium": (24, 16, 1024),
        "gpt2-large": (36, 20, 1280),
        "gpt2-xl": (48, 25, 1600),
    }
    for name, (n_layer, n_head, d_model) in sizes.items():
        cfg = load_preset(name)
        assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.d_ff) == (
            n_layer,
            n_head,
            d_model,
            4 * d_model,
        )
        assert (
            cfg.is_classic
            and cfg.norm_eps == 1e-5
            and cfg.vocab_size == 50257
            and cfg.max_seq_len == 1024
        )
    # Hugging Face's published parameter count of GPT-2 small.
    assert load_preset("gpt2").num_params() == 124_439_808
    m = load_preset("modern-gpt2")
    assert (m.n_layer, m.d_model, m.n_head, m.n_kv_head, m.d_ff) == (12, 768, 12, 4, 2048)
    assert (m.pos, m.norm, m.mlp, m.bias, m.logit_softcap, m.tie_embeddings) == (
        "rope",
        "rmsnorm",
        "swiglu",
        False,
        30.0,
        True,
    )
    assert m.rope_theta == 10000.0 and not m.is_classic
    # SwiGLU d_ff 2048 has GELU 3072's MLP parameter count: 3 * 768 * 2048 == 2 * 768 * 3072.
    assert 3 * m.d_model * m.d_ff == 2 * m.d_model * 3072


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'") as info:
        load_preset("gpt5")
    for name in ("gpt2", "modern-gpt2", "tiny"):
        assert name in str(info.value)


def test_json_roundtrip(tmp_path):
    cfg = dataclasses.replace(load_preset("modern-gpt2"), n_kv_head=1, logit_softcap=None)
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert ModelConfig.from_json(path) == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_json_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**load_preset("gpt2").to_dict(), "n_heads": 3}))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['n_heads'\]"):
        ModelConfig.from_json(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        ModelConfig.from_json(bad)
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        ModelConfig.from_json(tmp_path / "nope.json")


def test_presets_found_after_non_editable_install(tmp_path):
    """The wheel carries configs/ as gptmod/configs, and load_preset finds
    it outside the checkout."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("gptmod-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {f"gptmod/configs/{p}.json" for p in list_presets()} <= names
        assert {"gptmod/assets/gpt2.tiktoken", "gptmod/assets/shakespeare/hamlet.txt"} <= names
        zf.extractall(tmp_path / "site")
    code = (
        "import gptmod.config as c, gptmod.tokenizer as t, gptmod.corpus as s; print(c.__file__); "
        "print(c.load_preset('modern-gpt2').n_kv_head); print(t.encode('Hello world') == [15496, "
        "995]); print(len(s.bundled_files()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0].startswith(str(tmp_path / "site")) and out[1:] == ["4", "True", "8"]


def test_rope_scaling_is_validated_and_round_trips():
    from gptmod.config import RopeScaling

    cfg = ModelConfig(pos="rope", rope_scaling=RopeScaling(factor=32.0))
    assert ModelConfig.from_json(cfg.to_json()) == cfg and hash(cfg) == hash(
        ModelConfig.from_json(cfg.to_json())
    )
    for kw, msg in (
        ({"kind": "yarn"}, r"rope_scaling.kind='yarn': must be one of 'llama3'"),
        ({"factor": 0.5}, r"rope_scaling.factor=0.5: must be >= 1"),
        ({"low_freq_factor": 4.0}, r"high_freq_factor=4.0: must be > low_freq_factor=4.0"),
        ({"original_max_seq_len": 0}, r"original_max_seq_len=0: must be an int >= 1"),
    ):
        with pytest.raises(ValueError, match=msg):
            RopeScaling(**kw)
    with pytest.raises(
        ValueError, match="rope_scaling is set but pos='learned': it needs pos='rope'"
    ):
        ModelConfig(rope_scaling=RopeScaling())
    with pytest.raises(ValueError, match=r"rope_scaling: unknown field\(s\) \['type'\]"):
        ModelConfig.from_dict({**cfg.to_dict(), "rope_scaling": {"type": "llama3"}})
    with pytest.raises(
        ValueError, match=re.escape("rope_scaling={'factor': 8.0}: must be a RopeScaling or None")
    ):
        ModelConfig(pos="rope", rope_scaling={"factor": 8.0})
    # Frequencies shorter than original/high are kept, longer than original/low divided by factor.
    inv = np.array([1.0, 1e-5])
    assert np.allclose(RopeScaling(factor=8.0).scale(inv), [1.0, 1e-5 / 8])
