"""`gptmod export` on the real SmolLM2, checked by an independent reader: transformers loads the HF
folder (and its tokenizer) with our logits. gptmod -> HF -> gptmod and gptmod -> GGUF -> gptmod are
bit-exact, tokenizer included."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

import gptmod_torch
from gptmod import corpus, pretrained
from gptmod.cli import main

REL = 2e-5  # max |Δlogit| / max |logit|: fp32 reordering over 30 layers (measured: about 4e-6)


@pytest.fixture(scope="module")
def text_ids(smollm2):
    return smollm2.tokenizer.encode(corpus.bundled_text("hamlet")[:2000])[:128]


@pytest.fixture(scope="module")
def ours(smollm2, text_ids):
    model = gptmod_torch.load_state(gptmod_torch.GPT(smollm2.cfg).eval(), smollm2.state)
    with torch.no_grad():
        return model(torch.tensor([text_ids])).double().numpy()


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.double().numpy()


@pytest.mark.slow
def test_export_hf_loads_in_transformers_and_round_trips(tmp_path, smollm2, text_ids, ours, capsys):
    out = tmp_path / "hf"
    assert main(["export", "--weights", "smollm2", "--to", "hf", str(out)]) == 0
    assert "wrote" in capsys.readouterr().err
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    theirs = _hf_logits(hf, text_ids)
    assert np.abs(theirs - ours).max() <= REL * np.abs(ours).max()
    tok = AutoTokenizer.from_pretrained(out)
    text = corpus.bundled_text("lear")[:20000]
    assert tok(text, add_special_tokens=True)["input_ids"] == smollm2.tokenizer.encode(text)
    assert tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False
    ) == tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, chat_template=smollm2.chat_template
    )
    back = pretrained.load(out)  # gptmod -> HF -> gptmod
    assert (
        back.cfg == smollm2.cfg
        and back.eos_ids == smollm2.eos_ids
        and back.chat_template == smollm2.chat_template
    )
    assert all(back.state[k].tobytes() == smollm2.state[k].tobytes() for k in smollm2.state)
    shutil.rmtree(out)  # 540 MB: pytest keeps the last runs' tmp folders


@pytest.mark.slow
def test_export_gguf_f16_round_trips_with_its_tokenizer(tmp_path, smollm2):
    # F32, bit-exact, read back by transformers' GGUF loader too: tests/test_gguf.py's
    # test_real_f32_round_trip.
    out = tmp_path / "smollm2-f16.gguf"
    assert (
        main(["export", "--weights", "smollm2", "--to", "gguf", str(out), "--dtype", "float16"])
        == 0
    )
    back = pretrained.load(out)
    assert (
        back.cfg == smollm2.cfg
        and back.chat_template == smollm2.chat_template
        and back.eos_ids == [2]
    )
    # norms stay F32, as llama.cpp writes them
    assert back.report.tensor_types == {"F16": 211, "F32": 61}
    for k, v in smollm2.state.items():  # F16 holds each weight to within half an F16 ulp
        want = v.astype(np.float16).astype(np.float32) if v.ndim == 2 else v
        assert np.array_equal(back.state[k], want), k
    text = corpus.bundled_text("tempest")[:20000]
    assert back.tokenizer.encode(text) == smollm2.tokenizer.encode(text)
    out.unlink()  # 540 MB: pytest keeps the last runs' tmp folders


def test_export_classic_gpt2_is_gpt2(tmp_path):
    torch.manual_seed(0)
    src = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64)).eval()
    src.save_pretrained(tmp_path / "gpt2")
    assert (
        main(
            [
                "export",
                "--weights",
                str(tmp_path / "gpt2"),
                "--to",
                "hf",
                str(tmp_path / "out"),
                "--max-shard-mb",
                "5",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1  # sharded, with its index
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "GPT2LMHeadModel"
    ids = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, src(ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("Hello world")["input_ids"] == [
        15496,
        995,
    ]


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--to", "onnx", "x"], "--to 'onnx': choose one of hf, gguf"),
        (["--to", "gguf", "model.bin"], "the file name must end in .gguf"),
        (
            ["--to", "gguf", "m.gguf", "--dtype", "bfloat16"],
            "dtype 'bfloat16': must be one of float32, float16, q8_0",
        ),
        (
            ["--to", "hf", "out", "--dtype", "q8_0"],
            "dtype 'q8_0': must be one of float32, float16, bfloat16",
        ),
        (["--to", "gguf", "m.gguf", "--max-shard-mb", "5"], "--max-shard-mb is for --to hf"),
        (["--to", "hf", "out", "--max-shard-mb", "0"], "--max-shard-mb 0.0: must be > 0"),
        (["--to", "hf", "no/such/dir/out"], "no/such/dir does not exist"),
    ],
)
def test_export_errors_are_one_line_before_anything_is_read(
    tmp_path, monkeypatch, capsys, args, msg
):
    monkeypatch.chdir(tmp_path)
    # checked before the weights are read
    assert main(["export", "--weights", "no-such-model.gguf", *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_export_to_needs_a_format_and_a_path(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--weights", "smollm2", "--to", "hf"])
    assert e.value.code == 2 and "expected 2 arguments" in capsys.readouterr().err


def test_export_refuses_what_the_target_cannot_express(tmp_path, capsys):
    from gptmod import weights
    from gptmod.config import load_preset

    cfg = load_preset("tiny")
    state = {k: np.zeros(s, np.float32) for k, s in weights.canonical_shapes(cfg).items()}
    weights.save(tmp_path / "t.safetensors", state, cfg)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for args in (
        ["--to", "hf", str(tmp_path / "o")],
        ["--to", "gguf", str(tmp_path / "o.gguf")],
        ["--to", "hf", str(tmp_path / "full")],
    ):
        assert main(["export", "--weights", str(tmp_path / "t.safetensors"), *args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "logit_softcap" in err[0] or "softcap" in err[0]
    assert "softcap" in err[1]
    assert "exists and is not an empty folder" in err[2]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.gguf").exists()
