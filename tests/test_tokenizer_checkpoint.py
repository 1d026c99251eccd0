"""The Tokenizer interface against transformers on real checkpoints, over all eight bundled plays.

SmolLM2: ours from the GGUF metadata vs transformers' AutoTokenizer(gguf_file=...).
GPT-2: ours (tiktoken ranks) vs transformers' GPT2TokenizerFast from a
vocab.json/merges.txt that transformers' own TikTokenConverter derives from the
bundled ranks. Then save_hf / from_hf_folder / gguf_fields round trips.
"""

from __future__ import annotations

import copy
import json
import re
import time
from importlib import resources

import gguf
import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer, GPT2TokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from gptmod import corpus
from gptmod import tokenizer as tk

from conftest import smollm2_gguf_path

# A whitespace run ending in a digit: the only place where llama.cpp's
# "smollm" pre-tokenizer (digits split off first) and transformers' GGUF
# converter (plain GPT-2 regex, it has no entry for "smollm") disagree.
SPACES_THEN_DIGIT = re.compile(r"\s\s\d")


@pytest.fixture(scope="session")
def plays() -> dict[str, str]:
    return {name: f.read_text(encoding="utf-8") for name, f in corpus.bundled_files().items()}


@pytest.fixture(scope="session")  # not module: a worker leaves and re-enters modules (test_gguf.py)
def smollm2(smollm2_hf_tokenizer):
    path = smollm2_gguf_path()
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    return fields, tk.from_gguf_fields(fields), smollm2_hf_tokenizer


@pytest.fixture(scope="module")
def gpt2_hf(tmp_path_factory):
    """GPT-2 in transformers, from files transformers derives from the
    bundled ranks (not from our code)."""
    folder = tmp_path_factory.mktemp("gpt2_vocab")
    with resources.as_file(resources.files("gptmod") / "assets" / "gpt2.tiktoken") as ranks:
        vocab, merges = TikTokenConverter(vocab_file=str(ranks)).extract_vocab_merges_from_model(
            str(ranks)
        )
    vocab[tk.EOT] = tk.EOT_ID
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2", *(" ".join(m) for m in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return GPT2TokenizerFast.from_pretrained(folder)


@pytest.mark.slow
def test_smollm2_ids_equal_transformers_on_all_plays(smollm2, plays, capsys):
    _, ours, hf = smollm2
    # The oracle keeps transformers' vocabulary, merges and added tokens; only its pre-tokenizer is
    # set to what llama.cpp runs for tokenizer.ggml.pre "smollm" (llama-vocab.cpp: split "\p{N}",
    # then GPT-2's regex).
    oracle = copy.deepcopy(hf.backend_tokenizer)
    oracle.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    start, total, plain = time.perf_counter(), 0, []
    for name, text in plays.items():
        ids = ours.encode(text)
        assert ids == oracle.encode(text, add_special_tokens=False).ids, name
        if not SPACES_THEN_DIGIT.search(text):
            # unmodified transformers, BOS handling included
            assert ids == hf(text)["input_ids"], name
            plain.append(name)
        total += len(ids)
    assert len(plain) == 6 and total > 300_000  # six plays compared with transformers as it stands
    with capsys.disabled():
        print(
            f"\nSmolLM2: {total} tokens over {len(plays)} plays equal, "
            f"{time.perf_counter() - start:.1f} s"
        )


def test_smollm2_digits_are_split_as_llama_cpp_does(smollm2):
    fields, ours, _ = smollm2
    tokens = fields["tokenizer.ggml.tokens"]
    # "\n\n" | "1" | " Clown": the newline run stays one piece ("ĊĊ"), as in llama.cpp and SmolLM2's
    # tokenizer.json (transformers' GGUF converter gives Ċ, Ċ, 1 here).
    assert ours.encode("\n\n1 Clown")[:2] == [tokens.index("ĊĊ"), tokens.index("1")]
    assert ours.encode(" 2024") == [tokens.index(t) for t in ("Ġ", "2", "0", "2", "4")]


def test_smollm2_special_tokens(smollm2):
    fields, ours, hf = smollm2
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert ours.special_tokens == {
        t: i for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k == 3
    }
    assert len(ours.special_tokens) == 17 and ours.vocab_size == 49152 == len(tokens)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id, ours.add_bos) == (1, 2, 2, 0, False)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        ours.bos_id,
        ours.eos_id,
        ours.pad_id,
    )
    chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    ids = ours.encode(chat, allow_special=True)
    assert ids == hf(chat)["input_ids"]
    assert ids[0] == tokens.index("<|im_start|>") == ours.token_id("<|im_start|>") == 1
    assert ids.count(ours.token_id("<|im_end|>")) == 1
    with pytest.raises(
        ValueError, match=r"disallowed special token '<\|im_start\|>' at character 0"
    ):
        ours.encode(chat)
    assert ours.decode(ids) == chat
    assert ours.decode(ids, skip_special=True) == "user\nWhat is 2+2?\nassistant\n"
    assert (
        ours.chat_template == fields["tokenizer.chat_template"]
        and "<|im_start|>" in ours.chat_template
    )


def test_smollm2_stream_decoder_matches_decode_on_a_play(smollm2, plays):
    _, ours, _ = smollm2
    text = plays["hamlet"]
    ids = ours.encode(text)
    stream = ours.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text == ours.decode(ids)


def test_smollm2_save_hf_round_trip(smollm2, plays, tmp_path):
    fields, ours, _ = smollm2
    written = ours.save_hf(tmp_path)
    names = [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ]
    assert sorted(p.name for p in written) == sorted(names)
    # has the digit-after-newlines cases, so the saved pre-tokenizer is checked too
    text = plays["hamlet"]
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ours.encode(text)
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id) == (1, 2, 2)
    back = tk.from_hf_folder(tmp_path)
    assert back.kind == "hf" and back.encode(text) == ours.encode(text)
    assert (back.bos_id, back.eos_id, back.pad_id, back.unk_id, back.add_bos) == (1, 2, 2, 0, False)
    assert back.special_tokens == ours.special_tokens
    assert back.chat_template == tk.hf_chat_template(tmp_path) == fields["tokenizer.chat_template"]
    # And back to GGUF metadata: the same fields the file has.
    again = back.gguf_fields()
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id"):
        assert again[f"tokenizer.ggml.{key}"] == fields[f"tokenizer.ggml.{key}"], key
    assert again["tokenizer.ggml.add_bos_token"] is False


def test_gpt2_ids_equal_transformers_on_all_plays(gpt2_hf, plays, capsys):
    ours = tk.gpt2()
    start, total = time.perf_counter(), 0
    for name, text in plays.items():
        ids = ours.encode(text)
        assert ids == gpt2_hf(text)["input_ids"] == tk.encode(text), name
        total += len(ids)
    assert total > 300_000
    with capsys.disabled():
        print(
            f"\nGPT-2: {total} tokens over {len(plays)} plays equal, "
            f"{time.perf_counter() - start:.1f} s"
        )


def test_gpt2_save_hf_and_gguf_round_trip(plays, tmp_path):
    ours = tk.gpt2()
    ours.save_hf(tmp_path)
    text = plays["tempest"]
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ours.encode(text)
    assert reloaded.bos_token_id == reloaded.eos_token_id == tk.EOT_ID
    back = tk.from_hf_folder(tmp_path)
    assert back.encode(text) == ours.encode(text) and (back.bos_id, back.eos_id, back.add_bos) == (
        50256,
        50256,
        False,
    )
    fields = ours.gguf_fields()
    # GPT-2's merges.txt begins "Ġ t", "Ġ a", "h e", "i n", "r e", "o n" and has 50000 lines.
    assert fields["tokenizer.ggml.merges"][:6] == ["Ġ t", "Ġ a", "h e", "i n", "r e", "o n"]
    assert len(fields["tokenizer.ggml.merges"]) == 50000 and fields["tokenizer.ggml.pre"] == "gpt2"
    assert (
        fields["tokenizer.ggml.token_type"][tk.EOT_ID] == 3
        and fields["tokenizer.ggml.tokens"][198] == "Ċ"
    )
    from_gguf = tk.from_gguf_fields(fields)
    assert from_gguf.encode(text) == ours.encode(text)
    assert from_gguf.encode("a <|endoftext|>", allow_special=True) == [64, 220, tk.EOT_ID]
