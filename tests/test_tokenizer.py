"""Tokenizers: the bundled GPT-2 one (offline, hash-checked, exact ids, whole characters when
streaming) and the Tokenizer interface over GPT-2, HF folders and GGUF metadata (real checkpoints:
test_tokenizer_checkpoint.py)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

from gptmod import corpus, tokenizer


def test_known_ids():
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.gpt2_encoding().n_vocab == 50257
    assert tokenizer.encode("<|endoftext|>", allow_eot=True) == [50256]
    with pytest.raises(ValueError, match=r"disallowed special token"):
        tokenizer.encode("a <|endoftext|>")


def test_round_trip_and_unicode():
    text = "To be, or not to be: that is the question.\n  Ünïcödé — 日本語 🎭"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_stream_decoder_emits_whole_characters():
    text = "🎭 日本 ok"
    ids = tokenizer.encode(text)
    dec = tokenizer.StreamDecoder()
    pieces = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(ids) > len(text.split())  # the emoji and CJK really were split across tokens
    assert "" in pieces  # some tokens held back a partial character


def test_corrupt_ranks_are_refused(monkeypatch, tmp_path):
    bad = tmp_path / "gptmod" / "assets"
    bad.mkdir(parents=True)
    (bad / "gpt2.tiktoken").write_bytes(b"SGVsbG8= 0\n")
    monkeypatch.setattr(tokenizer.resources, "files", lambda pkg: tmp_path / "gptmod")
    tokenizer.gpt2_encoding.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"sha256 .* does not match the GPT-2 ranks"):
            tokenizer.gpt2_encoding()
    finally:
        tokenizer.gpt2_encoding.cache_clear()


# -------------------------------------------------------------------------- the Tokenizer interface

UNICODE = "To be, or not to be: that is the question.\n  Ünïcödé — 日本語 🎭\n\n1 Clown. <b>ok</b>"


def test_gpt2_interface_matches_module_functions():
    tok = tokenizer.gpt2()
    assert tok is tokenizer.gpt2()  # cached
    assert (tok.kind, tok.vocab_size, tok.add_bos) == ("gpt2", 50257, False)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (50256, 50256, 50256, None)
    assert tok.special_tokens == {"<|endoftext|>": 50256} and tok.token_id("<|endoftext|>") == 50256
    assert tok.encode("Hello world") == [15496, 995] == tokenizer.encode("Hello world")
    assert tok.encode("Hello world", add_bos=True) == [50256, 15496, 995]
    assert tok.encode("a <|endoftext|>", allow_special=True) == [64, 220, 50256]
    with pytest.raises(
        ValueError, match=r"disallowed special token '<\|endoftext\|>' at character 2"
    ):
        tok.encode("a <|endoftext|>")
    assert tok.decode([64, 220, 50256]) == "a <|endoftext|>"
    assert tok.decode([64, 220, 50256], skip_special=True) == "a "
    with pytest.raises(ValueError, match=r"token id 50257 is outside the vocabulary \[0, 50257\)"):
        tok.decode([1, 50257])
    with pytest.raises(ValueError, match=r"no special token '<\|im_end\|>' in this gpt2 tokenizer"):
        tok.token_id("<|im_end|>")


def _stream(tok: tokenizer.Tokenizer, ids: list[int]) -> list[str]:
    dec = tok.stream_decoder()
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_gpt2_interface_round_trip_and_stream():
    tok = tokenizer.gpt2()
    ids = tok.encode(UNICODE)
    assert tok.decode(ids) == UNICODE
    pieces = _stream(tok, ids)
    assert "".join(pieces) == UNICODE and all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some tokens held back a partial character
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        tok.stream_decoder().push(-1)


def test_gpt2_round_trip_through_tokenizers_library():
    tok = tokenizer.gpt2()
    text = corpus.bundled_text("macbeth")[:20000] + UNICODE
    assert tok.backend().encode(text, add_special_tokens=False).ids == tok.encode(text)


def test_vocabulary_with_a_hole():
    alphabet = list(tokenizer.byte_alphabet().values())
    backend = HFTokenizer(
        BPE(vocab={c: i if i < 10 else i + 1 for i, c in enumerate(alphabet)}, merges=[])
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = tokenizer.Tokenizer(
        "hf", backend=backend, bos_id=None, eos_id=None, pad_id=None, unk_id=None, add_bos=False
    )
    assert tok.vocab_size == 257  # the id space (ids 0..256), not the entry count (256)
    # "~" is entry 93, shifted past the hole
    assert tok.encode("~") == [94] and tok.decode([94]) == "~"
    assert tok.decode([256]) == "\ufffd"  # the last id is accepted (byte 0xAD alone is not UTF-8)
    with pytest.raises(ValueError, match="token id 10 has no text in the vocabulary"):
        tok.decode([1, 10])
    with pytest.raises(ValueError, match="token id 10 has no text in the vocabulary"):
        tok.stream_decoder().push(10)


# -- HF folders


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2_hf")
    tokenizer.gpt2().save_hf(folder)
    return folder


def _copy_folder(src, dst, *, config=None, generation=None, post_bos=False):
    dst.mkdir(exist_ok=True)
    backend = HFTokenizer.from_file(str(src / "tokenizer.json"))
    if post_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 50256)]
        )
    (dst / "tokenizer.json").write_text(backend.to_str(), encoding="utf-8")
    if config is not None:
        (dst / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if generation is not None:
        (dst / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
    return dst


def test_hf_folder_bos_eos_from_configs(gpt2_folder, tmp_path):
    bare = tokenizer.from_hf_folder(_copy_folder(gpt2_folder, tmp_path / "bare"))
    assert (bare.bos_id, bare.eos_id, bare.add_bos, bare.chat_template) == (None, None, False, None)
    # add_bos read from the post-processor when no config states it;
    # encode(add_bos=False) really leaves it out.
    post = tokenizer.from_hf_folder(
        _copy_folder(
            gpt2_folder, tmp_path / "post", config={"bos_token": "<|endoftext|>"}, post_bos=True
        )
    )
    assert post.add_bos and post.encode("Hello world") == [50256, 15496, 995]
    assert post.encode("Hello world", add_bos=False) == [15496, 995]
    # an explicit add_bos_token wins over the post-processor, as in transformers
    explicit = tokenizer.from_hf_folder(
        _copy_folder(
            gpt2_folder,
            tmp_path / "explicit",
            config={"bos_token": {"content": "<|endoftext|>"}, "add_bos_token": False},
            generation={"eos_token_id": [50256, 13], "bos_token_id": 50256},
            post_bos=True,
        )
    )
    assert not explicit.add_bos and explicit.encode("Hello world") == [15496, 995]
    # generation_config's list, eos first
    assert explicit.eos_id == 50256 and explicit.eos_ids == (50256, 13)


def test_hf_folder_bad_input(gpt2_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        tokenizer.from_hf_folder(tmp_path)
    with pytest.raises(ValueError, match=r"bos_token='<s>' is not in the vocabulary"):
        tokenizer.from_hf_folder(
            _copy_folder(gpt2_folder, tmp_path / "a", config={"bos_token": "<s>"})
        )
    with pytest.raises(ValueError, match=r"add_bos_token must be true or false, got 'yes'"):
        tokenizer.from_hf_folder(
            _copy_folder(gpt2_folder, tmp_path / "b", config={"add_bos_token": "yes"})
        )
    with pytest.raises(ValueError, match=r"add_eos_token=True is not supported"):
        tokenizer.from_hf_folder(
            _copy_folder(gpt2_folder, tmp_path / "c", config={"add_eos_token": True})
        )


def test_hf_chat_template(tmp_path):
    assert tokenizer.hf_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ x }}"}), encoding="utf-8"
    )
    assert tokenizer.hf_chat_template(tmp_path) == "{{ x }}"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": named}), encoding="utf-8"
    )
    assert tokenizer.hf_chat_template(tmp_path) == "D"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": named[:1]}), encoding="utf-8"
    )
    with pytest.raises(
        ValueError, match=r"chat_template is a list without a 'default' entry \(names: tool_use\)"
    ):
        tokenizer.hf_chat_template(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("J", encoding="utf-8")
    assert tokenizer.hf_chat_template(tmp_path) == "J"  # the .jinja file wins


# -- GGUF metadata


@pytest.fixture(scope="module")
def gpt2_fields() -> dict:
    return tokenizer.gpt2().gguf_fields()


def _from_gguf_fields_with(fields: dict, **changes) -> tokenizer.Tokenizer:
    """GPT-2's GGUF fields with `tokenizer.ggml.<name>` changed (a None value drops the field)."""
    fields = {**fields, **{f"tokenizer.ggml.{k}": v for k, v in changes.items()}}
    return tokenizer.from_gguf_fields({k: v for k, v in fields.items() if v is not None})


# (tokenizer.ggml.<field>, its bad value or None for missing, the error it names)
GGUF_BAD_FIELDS = [
    ("model", "bert", r"tokenizer.ggml.model='bert' is not supported; supported: gpt2, llama"),
    ("model", None, r"tokenizer\.ggml\.model=None is not supported"),
    ("tokens", None, r"tokenizer\.ggml\.tokens is missing"),
    ("merges", None, r"tokenizer.ggml.merges is missing or empty \(needed for .*'gpt2'\)"),
    ("merges", ["abc"], r"tokenizer\.ggml\.merges entry 'abc' is not two tokens"),
    ("pre", "tiny-lm", r"tokenizer.ggml.pre='tiny-lm' is not a known byte-level pre-tokenizer"),
    ("pre", None, r"tokenizer\.ggml\.pre is missing"),
    ("token_type", [1, 1, 1], r"token_type has 3 entries for 50257 tokens"),
    ("bos_token_id", 50257, r"tokenizer.ggml.bos_token_id=50257 is not a token id in \[0, 50257\)"),
]


@pytest.mark.parametrize(
    ("field", "value", "match"), GGUF_BAD_FIELDS, ids=[f"{f}={v}" for f, v, _ in GGUF_BAD_FIELDS]
)
def test_gguf_bad_input(gpt2_fields, field, value, match):
    with pytest.raises(ValueError, match=match):
        _from_gguf_fields_with(gpt2_fields, **{field: value})


def test_gguf_duplicate_token_is_named(gpt2_fields):
    tokens = ["Ċ", *gpt2_fields["tokenizer.ggml.tokens"][1:-1], "Ċ"]
    with pytest.raises(ValueError, match=r"lists 'Ċ' twice"):
        _from_gguf_fields_with(gpt2_fields, tokens=tokens)


def test_gguf_pre_tokenizer_names_match_transformers(gpt2_fields):
    """Our table of tokenizer.ggml.pre regexes against transformers'
    (GPT-2's vocabulary, another split)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    text = corpus.bundled_text("tempest")[:30000] + " 12345 x\r\n\n  é's 3.14 don't " + UNICODE
    for pre in ("llama-bpe", "qwen2"):
        fields = {k: v for k, v in gpt2_fields.items() if k != "tokenizer.ggml.add_bos_token"}
        ours = tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.pre": pre})
        theirs, _ = convert_gguf_tokenizer(
            "gpt2",
            {
                "tokenizer_type": "gpt2",
                "pre_tokenizer_type": pre,
                "tokens": gpt2_fields["tokenizer.ggml.tokens"],
                "token_type": gpt2_fields["tokenizer.ggml.token_type"],
                "merges": gpt2_fields["tokenizer.ggml.merges"],
            },
        )
        if pre == "llama-bpe":
            # llama.cpp (and Llama-3's tokenizer.json) take a pre-token
            # found whole in the vocabulary as is; transformers' GGUF
            # converter leaves that out, so the oracle gets it here.
            theirs.model.ignore_merges = True
            # llama.cpp's defaults for this family
            assert ours.backend().model.ignore_merges and ours.add_bos
        assert (
            ours.encode(text, add_bos=False) == theirs.encode(text, add_special_tokens=False).ids
        ), pre
        # really another split
        assert ours.encode(text, add_bos=False) != tokenizer.gpt2().encode(text), pre
        assert ours.gguf_fields()["tokenizer.ggml.pre"] == pre


@pytest.fixture(scope="module")
def llama_fields() -> dict:
    """A small sentencepiece-style BPE vocabulary (byte fallback, "▁" for spaces) in GGUF form."""
    trained = HFTokenizer(BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trained.train_from_iterator(
        [corpus.bundled_text("tempest")], trainers.BpeTrainer(vocab_size=600)
    )
    model = json.loads(trained.to_str())["model"]
    learned = sorted(model["vocab"], key=model["vocab"].get)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *learned, "<think>"]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [2, 3, 3, *[6] * 256, *[1] * len(learned), 4],
        "tokenizer.ggml.merges": [
            m if isinstance(m, str) else " ".join(m) for m in model["merges"]
        ],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def test_gguf_sentencepiece_matches_transformers(llama_fields):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    ours = tokenizer.from_gguf_fields(llama_fields)
    assert (ours.kind, ours.add_bos, ours.bos_id, ours.eos_id, ours.unk_id) == (
        "gguf",
        True,
        1,
        2,
        0,
    )
    assert ours.special_tokens == {
        "<s>": 1,
        "</s>": 2,
        "<think>": len(llama_fields["tokenizer.ggml.tokens"]) - 1,
    }
    f = llama_fields
    theirs, _ = convert_gguf_tokenizer(
        "llama",
        {
            "tokenizer_type": "llama",
            "tokens": f["tokenizer.ggml.tokens"],
            "token_type": f["tokenizer.ggml.token_type"],
            "merges": f["tokenizer.ggml.merges"],
        },
    )
    for text in (corpus.bundled_text("hamlet")[:40000], UNICODE, "<s>a<think>b</s>"):
        ids = ours.encode(text, allow_special=True, add_bos=False)
        assert ids == theirs.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False)
    ids = ours.encode(UNICODE)
    # BOS by default; unknown characters went to byte tokens, not <unk>
    assert ids[0] == 1 and 0 not in ids
    assert ours.decode(ids, skip_special=True) == UNICODE
    pieces = _stream(ours, ids)
    assert "".join(pieces) == ours.decode(ids) and all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # 日本語 and 🎭 arrived as byte tokens and were held back until whole
    with pytest.raises(ValueError, match=r"disallowed special token '<think>'"):
        ours.encode("a<think>")
    # a gguf tokenizer gives back the fields it was read from
    assert ours.gguf_fields() == llama_fields


def test_gguf_sentencepiece_save_hf_round_trip(llama_fields, tmp_path):
    from transformers import AutoTokenizer

    ours = tokenizer.from_gguf_fields(llama_fields)
    ours.save_hf(tmp_path)
    text = corpus.bundled_text("lear")[:20000] + UNICODE
    # BOS included
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == ours.encode(text)
    back = tokenizer.from_hf_folder(tmp_path)
    assert (
        back.add_bos
        and back.encode(text) == ours.encode(text)
        and back.special_tokens == ours.special_tokens
    )
    with pytest.raises(
        ValueError, match=r"gguf_fields supports byte-level BPE tokenizers only; .* model 'BPE'"
    ):
        back.gguf_fields()
