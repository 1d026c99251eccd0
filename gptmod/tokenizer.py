"""GPT-2's byte-level BPE through tiktoken, fully offline.

`tiktoken.get_encoding("gpt2")` downloads its files on first use; here the ranks ship with the
package (gptmod/assets/gpt2.tiktoken, byte-identical to tiktoken's r50k_base) and their sha256 is
checked on load, so a damaged or substituted file is refused instead of tokenising wrongly.
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT = "<|endoftext|>"
EOT_ID = 50256


@lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding (50257 tokens, <|endoftext|> = 50256), built from the bundled ranks."""
    ranks_file = resources.files("gptmod") / "assets" / "gpt2.tiktoken"
    data = ranks_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise RuntimeError(f"{ranks_file}: sha256 {digest} does not match the GPT-2 ranks ({RANKS_SHA256})")
    with resources.as_file(ranks_file) as path:
        ranks = load_tiktoken_bpe(str(path), expected_hash=RANKS_SHA256)
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: EOT_ID}, explicit_n_vocab=50257
    )


def encode(text: str, *, allow_eot: bool = False) -> list[int]:
    """Token ids of `text`. "<|endoftext|>" in the text is an error unless `allow_eot` (then it is 50256)."""
    return gpt2_encoding().encode(text, allowed_special={EOT} if allow_eot else set())


def decode(ids: Iterable[int]) -> str:
    """Text of token ids; invalid UTF-8 (a split multi-byte character) becomes U+FFFD."""
    return gpt2_encoding().decode(list(ids))


class StreamDecoder:
    """Incremental decoding for streaming: a character split across tokens comes out whole, once
    its last byte has arrived."""

    def __init__(self) -> None:
        self._enc = gpt2_encoding()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._enc.decode_single_token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
