"""The bundled GPT-2 tokenizer: offline, hash-checked, exact ids, whole characters when streaming."""

from __future__ import annotations

import pytest

from gptmod import tokenizer


def test_known_ids():
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.gpt2_encoding().n_vocab == 50257
    assert tokenizer.encode("<|endoftext|>", allow_eot=True) == [50256]
    with pytest.raises(ValueError, match="disallowed special token"):
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
