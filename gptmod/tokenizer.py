"""Tokenizers, offline: GPT-2's bundled ranks, Hugging Face `tokenizer.json`
folders and GGUF metadata.

Module level (unchanged, many callers): `encode`, `decode`, `StreamDecoder`, `EOT`, `EOT_ID`,
`gpt2_encoding()` -- GPT-2's byte-level BPE through tiktoken. `tiktoken.get_encoding("gpt2")`
downloads its files on first use; here the ranks ship with the package (gptmod/assets/gpt2.tiktoken,
byte-identical to tiktoken's r50k_base) and their sha256 is checked on load, so a damaged or
substituted file is refused instead of tokenising wrongly.

`Tokenizer` is the one interface over three kinds, built by `gpt2()`, `from_hf_folder(folder)` and
`from_gguf_fields(fields)`:

- "gpt2": the bundled ranks through tiktoken (a `tokenizers` twin is built
  only to save it as HF or GGUF).
- "hf": a `tokenizer.json` through the `tokenizers` library, with
  BOS/EOS/add_bos from the folder's configs.
- "gguf": a `tokenizers` BPE rebuilt from GGUF metadata (`tokenizer.ggml.*`), as transformers' GGUF
  converter and llama.cpp read it.

Rules shared by every kind:

- `encode(text)` refuses text that contains a special or added token's text (e.g. "<|im_end|>"),
  naming it, unless `allow_special=True` -- then each such text becomes its single id. So user text
  cannot smuggle control tokens into a prompt, and chat templates (which write them on purpose) pass
  `allow_special=True`.
- BOS is prepended by `encode` itself when the checkpoint says so (`add_bos`), never by a
  `tokenizer.json` post-processor, so `add_bos=False` always means exactly the text's tokens.
- `decode` and the stream decoder refuse ids outside `[0, vocab_size)`; the stream decoder emits
  whole characters only, holding back a character split across tokens until its last byte arrives.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import tiktoken
import tokenizers
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from gptmod import textio
from gptmod.fileio import atomic_write_text

RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT = "<|endoftext|>"
EOT_ID = 50256

KINDS = ("gpt2", "hf", "gguf")

# ------------------------------------------------------------------ GPT-2, module level (unchanged)


@lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding (50257 tokens, <|endoftext|> = 50256), built from the bundled ranks."""
    ranks_file = resources.files("gptmod") / "assets" / "gpt2.tiktoken"
    data = ranks_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise RuntimeError(
            f"{ranks_file}: sha256 {digest} does not match the GPT-2 ranks ({RANKS_SHA256})"
        )
    with resources.as_file(ranks_file) as path:
        ranks = load_tiktoken_bpe(str(path), expected_hash=RANKS_SHA256)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT: EOT_ID},
        explicit_n_vocab=50257,
    )


def encode(text: str, *, allow_eot: bool = False) -> list[int]:
    """Token ids of `text`. "<|endoftext|>" in the text is an error unless
    `allow_eot` (then it is 50256)."""
    return gpt2_encoding().encode(text, allowed_special={EOT} if allow_eot else set())


def _unknown_id(token_id: int, vocab_size: int) -> str:
    """The error for an id the tokenizer lacks: a model whose vocabulary is padded (e.g. 50304 for
    GPT-2's 50257 tokens, for faster matmuls) can generate ids that no token has, and they are never
    decoded to a guess."""
    if token_id < 0:
        return (
            f"token id {token_id} is outside the vocabulary [0, "
            f"{vocab_size}): ids are never negative"
        )
    return (
        f"token id {token_id} is outside the vocabulary [0, {vocab_size}) of the tokenizer "
        f"({vocab_size} tokens): the model's vocabulary is padded beyond the tokenizer's, "
        "and it produced a padding id"
    )


def decode(ids: Iterable[int]) -> str:
    """Text of token ids; invalid UTF-8 (a split multi-byte character) becomes U+FFFD. An id GPT-2
    lacks is a ValueError naming it."""
    ids = [int(i) for i in ids]
    enc = gpt2_encoding()
    if (bad := next((i for i in ids if not 0 <= i < enc.n_vocab), None)) is not None:
        raise ValueError(_unknown_id(bad, enc.n_vocab))
    return enc.decode(ids)


class StreamDecoder:
    """Incremental decoding for streaming: a character split across tokens comes out whole, once
    its last byte has arrived."""

    def __init__(self) -> None:
        self._enc = gpt2_encoding()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if not 0 <= token_id < self._enc.n_vocab:
            raise ValueError(_unknown_id(token_id, self._enc.n_vocab))
        return self._utf8.decode(self._enc.decode_single_token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


# ----------------------------------------------------------- byte-level spelling and pre-tokenizers


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, in which byte-level BPE
    vocabularies spell their tokens: printable Latin-1 bytes stand for
    themselves, the other 68 are moved to U+0100 onwards."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def _spell(token: bytes) -> str:
    alphabet = byte_alphabet()
    return "".join(alphabet[b] for b in token)


_GPT2_STYLE = ("gpt2", "mpt", "olmo", "jais")
# llama.cpp splits every digit off first for these, then applies GPT-2's regex (llama-vocab.cpp),
# which is what their own tokenizer.json says: Sequence[Digits(individual_digits),
# ByteLevel(use_regex)].
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| "
    r"?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp also turns on ignore_merges and BOS by default for these (see from_gguf_fields).
_LLAMA3_STYLE = ("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral")
_QWEN2_STYLE = ("qwen2", "deepseek-r1-qwen")
BYTE_LEVEL_PRE_TOKENIZERS = (*_GPT2_STYLE, *_DIGITS_THEN_GPT2, *_LLAMA3_STYLE, *_QWEN2_STYLE)


def byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The `tokenizers` pre-tokenizer for a GGUF `tokenizer.ggml.pre` name
    (byte-level BPE vocabularies)."""
    if pre in _GPT2_STYLE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
    split = _LLAMA3_SPLIT if pre in _LLAMA3_STYLE else _QWEN2_SPLIT if pre in _QWEN2_STYLE else None
    if split is None:
        raise ValueError(
            f"tokenizer.ggml.pre={pre!r} is not a known byte-level pre-tokenizer; known: "
            f"{', '.join(BYTE_LEVEL_PRE_TOKENIZERS)}"
        )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _json_of(component: Any) -> Any:
    """A `tokenizers` component as its JSON value, without offset-only
    settings (they never change ids)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "trim_offsets"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads(component.__getstate__()) if component is not None else None)


def _pre_name(backend: tokenizers.Tokenizer) -> str:
    """The GGUF `tokenizer.ggml.pre` name whose pre-tokenizer equals
    `backend`'s (first known name wins)."""
    have = _json_of(backend.pre_tokenizer)
    for name in (_GPT2_STYLE[0], _DIGITS_THEN_GPT2[0], _LLAMA3_STYLE[0], _QWEN2_STYLE[0]):
        if _json_of(byte_level_pre_tokenizer(name)) == have:
            return name
    raise ValueError(
        f"no GGUF tokenizer.ggml.pre name matches the pre-tokenizer {json.dumps(have)}"
    )


# ----------------------------------------------------------------------------- the interface


class Tokenizer:
    """One tokenizer interface over three kinds ("gpt2", "hf", "gguf");
    build with `gpt2()`, `from_hf_folder` or `from_gguf_fields`. See the
    module docstring for the rules every kind follows."""

    kind: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    special_tokens: dict[str, int]
    # every end-of-sequence id: eos_id first, then generation_config.json's others
    eos_ids: tuple[int, ...]
    # the checkpoint's chat template (HF folder or tokenizer.chat_template), if any
    chat_template: str | None

    def __init__(
        self,
        kind: str,
        *,
        backend: tokenizers.Tokenizer | None = None,
        tiktoken_encoding: tiktoken.Encoding | None = None,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None,
        unk_id: int | None,
        add_bos: bool,
        eos_ids: Sequence[int] = (),
        chat_template: str | None = None,
        gguf_source: Mapping[str, Any] | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: must be one of {', '.join(KINDS)}")
        if (backend is None) == (tiktoken_encoding is None):
            raise ValueError(
                "a Tokenizer needs exactly one of backend (tokenizers) or tiktoken_encoding"
            )
        self.kind = kind
        self._backend_given = backend
        self._tiktoken = tiktoken_encoding
        if tiktoken_encoding is not None:
            self.vocab_size = tiktoken_encoding.n_vocab
            texts = sorted(tiktoken_encoding.special_tokens_set)
            self.special_tokens = {t: tiktoken_encoding.encode_single_token(t) for t in texts}
            self._control_ids = frozenset(self.special_tokens.values())
        else:
            # The id space, not the entry count: a vocabulary may skip ids
            # (then decode refuses those).
            self.vocab_size = (
                max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
            )
            added = sorted(backend.get_added_tokens_decoder().items())
            self.special_tokens = {t.content: i for i, t in added}
            # what skip_special leaves out
            self._control_ids = frozenset(i for i, t in added if t.special)
            # Added tokens must sit inside the id space, or the model's
            # embedding would be indexed past its end.
            if self.special_tokens and max(self.special_tokens.values()) >= self.vocab_size:
                raise ValueError(
                    f"added token ids reach {max(self.special_tokens.values())} "
                    f">= {self.vocab_size}"
                )
        for name, value in (
            ("bos_id", bos_id),
            ("eos_id", eos_id),
            ("pad_id", pad_id),
            ("unk_id", unk_id),
        ):
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")
        if add_bos and bos_id is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token")
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos = bool(add_bos)
        self.eos_ids = tuple(dict.fromkeys([*([eos_id] if eos_id is not None else []), *eos_ids]))
        self.chat_template = chat_template
        self._gguf_source = dict(gguf_source) if gguf_source is not None else None
        # Longest first, so "<|im_start|>" is reported rather than a shorter token inside it.
        texts = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, texts))) if texts else None

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, add_bos={self.add_bos}, "
            f"special_tokens={len(self.special_tokens)})"
        )

    # -- encoding and decoding

    def encode(
        self, text: str, *, add_bos: bool | None = None, allow_special: bool = False
    ) -> list[int]:
        """Token ids of `text`, with BOS first when `add_bos` (None: as the checkpoint says).

        allow_special=False: text containing a special/added token's text is a ValueError naming it.
        allow_special=True: each such text becomes its single id (what chat templates need)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        if (
            not allow_special
            and self._special_re is not None
            and (m := self._special_re.search(text))
        ):
            raise ValueError(
                f"text contains disallowed special token {m.group()!r} at character {m.start()}; "
                "pass allow_special=True to encode special tokens as their ids"
            )
        if self._tiktoken is not None:
            ids = self._tiktoken.encode(text, allowed_special="all", disallowed_special=())
        else:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        use_bos = self.add_bos if add_bos is None else add_bos
        if use_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but the tokenizer has no BOS token")
            return [self.bos_id, *ids]
        return ids

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise ValueError(
                _unknown_id(next(i for i in ids if not 0 <= i < self.vocab_size), self.vocab_size)
            )
        if self._holes and not self._holes.isdisjoint(ids):
            raise ValueError(
                f"token id {next(i for i in ids if i in self._holes)} has no text in the vocabulary"
            )
        return ids

    @cached_property
    def _holes(self) -> frozenset[int]:
        """Ids inside [0, vocab_size) that no token has (`tokenizers` would
        drop them from a decode silently)."""
        if self._tiktoken is not None:
            return frozenset()
        return frozenset(i for i in range(self.vocab_size) if self._backend.id_to_token(i) is None)

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of token ids; invalid UTF-8 becomes U+FFFD. `skip_special` leaves out special
        (control) tokens, not user-defined added ones."""
        ids = self._check_ids(ids)
        if self._tiktoken is not None:
            if skip_special:
                ids = [i for i in ids if i not in self._control_ids]
            return self._tiktoken.decode(ids)
        return self._backend.decode(ids, skip_special_tokens=skip_special)

    def stream_decoder(self, *, skip_special: bool = False) -> TokenStream:
        """A decoder fed one id at a time (`push(id) -> str`, `flush() ->
        str`) that emits whole characters only."""
        return TokenStream(self, skip_special=skip_special)

    def token_id(self, token: str) -> int:
        """The id of a special/added token by its text; ValueError naming it
        if the tokenizer has none."""
        if token not in self.special_tokens:
            known = list(self.special_tokens)
            shown = ", ".join(map(repr, known[:12])) + (
                f", ... ({len(known)} in all)" if len(known) > 12 else ""
            )
            raise ValueError(
                f"no special token {token!r} in this {self.kind} "
                f"tokenizer; it has {shown or 'none'}"
            )
        return self.special_tokens[token]

    @cached_property
    def _token_bytes(self) -> tuple[list[bytes], bool]:
        """Per id, the bytes it decodes to, and whether the first token of a
        text drops one leading space (sentencepiece's prefix space). Built
        from the decoder, so streaming matches `decode`."""
        if self._tiktoken is not None:
            enc = self._tiktoken
            return [enc.decode_single_token_bytes(i) for i in range(self.vocab_size)], False
        backend = self._backend
        added = backend.get_added_tokens_decoder()
        pieces = [backend.id_to_token(i) for i in range(self.vocab_size)]
        dec = _json_of(backend.decoder)

        def spelled(spell: Callable[[int, str], bytes]) -> list[bytes]:
            # a hole decodes to nothing (push refuses it before looking here); added tokens are
            # their own text; the rest is spelled in the decoder's alphabet
            return [
                b"" if piece is None else piece.encode("utf-8") if i in added else spell(i, piece)
                for i, piece in enumerate(pieces)
            ]

        if dec is not None and dec.get("type") == "ByteLevel":
            inverse = {c: b for b, c in byte_alphabet().items()}

            def byte_level(i: int, piece: str) -> bytes:
                if not all(c in inverse for c in piece):
                    raise ValueError(
                        f"token {i} {piece!r} is not spelled in the byte-level alphabet"
                    )
                return bytes(inverse[c] for c in piece)

            return spelled(byte_level), False
        steps = (
            [d.get("type") for d in dec.get("decoders", [])]
            if dec is not None and "decoders" in dec
            else None
        )
        if steps in (
            ["Replace", "ByteFallback", "Fuse"],
            ["Replace", "ByteFallback", "Fuse", "Strip"],
        ):
            byte_re = re.compile(r"<0x([0-9A-Fa-f]{2})>")

            def sentencepiece(i: int, piece: str) -> bytes:
                if m := byte_re.fullmatch(piece):  # <0xAB>: one raw byte
                    return bytes([int(m.group(1), 16)])
                return piece.replace("\u2581", " ").encode("utf-8")

            return spelled(sentencepiece), steps[-1] == "Strip"
        raise ValueError(f"stream decoding is not supported for the decoder {json.dumps(dec)}")

    # -- the `tokenizers` form (hf and gguf kinds have it; gpt2 builds it from the ranks on demand)

    @cached_property
    def _backend(self) -> tokenizers.Tokenizer:
        if self._backend_given is not None:
            return self._backend_given
        vocab, merges = _gpt2_vocab_merges()
        backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False))
        backend.pre_tokenizer = byte_level_pre_tokenizer("gpt2")
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
        return backend

    def backend(self) -> tokenizers.Tokenizer:
        """The `tokenizers.Tokenizer` behind this tokenizer (for gpt2, an
        equivalent built from the ranks)."""
        return self._backend

    def save_hf(self, folder: str | Path) -> list[Path]:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json
        (and chat_template.jinja when there is a template) into `folder`, which
        `transformers.AutoTokenizer.from_pretrained` loads with equal ids.
        Returns the paths written."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
        if self.add_bos:
            # Our encode adds BOS itself; the saved file carries it in its
            # post-processor for other readers.
            bos = self._piece(self.bos_id)
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)]
            )
        names = {
            "bos_token": self.bos_id,
            "eos_token": self.eos_id,
            "unk_token": self.unk_id,
            "pad_token": self.pad_id,
        }
        special_map = {k: self._piece(v) for k, v in names.items() if v is not None}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **{k: special_map.get(k) for k in names},
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        written = [
            folder / "tokenizer.json",
            folder / "tokenizer_config.json",
            folder / "special_tokens_map.json",
        ]
        atomic_write_text(written[0], backend.to_str(pretty=True))
        atomic_write_text(written[1], json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(written[2], json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
        if self.chat_template is not None:
            written.append(folder / "chat_template.jinja")
            atomic_write_text(written[-1], self.chat_template)
        return written

    def _piece(self, token_id: int) -> str:
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} has no text in the vocabulary")
        return piece

    def gguf_fields(self) -> dict[str, Any]:
        """The `tokenizer.ggml.*` metadata a GGUF writer needs (plus
        tokenizer.chat_template when known).

        A gguf-kind tokenizer returns the fields it was built from; gpt2 and
        hf kinds must be byte-level BPE (tokenizer.ggml.model "gpt2") with a
        pre-tokenizer llama.cpp knows by name."""
        if self._gguf_source is not None:
            return dict(self._gguf_source)
        backend = self._backend
        model = json.loads(backend.to_str())["model"]
        if model.get("type") != "BPE" or _json_of(backend.decoder) != _json_of(
            decoders.ByteLevel()
        ):
            raise ValueError(
                f"gguf_fields supports byte-level BPE tokenizers only; this {self.kind} tokenizer "
                f"has model {model.get('type')!r} and decoder "
                f"{json.dumps(_json_of(backend.decoder))}"
            )
        added = backend.get_added_tokens_decoder()
        tokens, token_type = [], []
        for i in range(self.vocab_size):
            piece = backend.id_to_token(i)
            if piece is None:
                raise ValueError(
                    f"token id {i} has no text: GGUF needs a dense "
                    f"vocabulary 0..{self.vocab_size - 1}"
                )
            tokens.append(piece)
            # normal, control, user
            token_type.append(1 if i not in added else 3 if added[i].special else 4)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        fields: dict[str, Any] = {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": _pre_name(backend),
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": token_type,
            "tokenizer.ggml.merges": merges,
        }
        ids = {"bos_token_id": self.bos_id, "eos_token_id": self.eos_id}
        ids |= {"unknown_token_id": self.unk_id, "padding_token_id": self.pad_id}
        fields |= {f"tokenizer.ggml.{k}": v for k, v in ids.items() if v is not None}
        fields["tokenizer.ggml.add_bos_token"] = self.add_bos
        if self.chat_template is not None:
            fields["tokenizer.chat_template"] = self.chat_template
        return fields


class TokenStream:
    """Streaming decode for any `Tokenizer`: bytes of each token go through an incremental UTF-8
    decoder, so a character split across tokens comes out whole once its last byte has arrived."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._table, self._strip_first = tokenizer._token_bytes
        self._skip = tokenizer._control_ids if skip_special else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True

    def push(self, token_id: int) -> str:
        """Text completed by this token ("" while a character is still partial)."""
        (token_id,) = self._tok._check_ids([token_id])
        if token_id in self._skip:
            return ""
        data = self._table[token_id]
        if self._first:
            self._first = False
            if self._strip_first and data.startswith(b" "):
                data = data[1:]
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


# ----------------------------------------------------------------------------- GPT-2


@lru_cache(maxsize=1)
def gpt2() -> Tokenizer:
    """GPT-2's tokenizer from the bundled, sha256-checked tiktoken ranks."""
    return Tokenizer(
        "gpt2",
        tiktoken_encoding=gpt2_encoding(),
        bos_id=EOT_ID,
        eos_id=EOT_ID,
        pad_id=None,
        unk_id=EOT_ID,
        add_bos=False,
    )


@lru_cache(maxsize=1)
def _gpt2_vocab_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's vocab and merges (HF form) recovered from the tiktoken ranks: token r >= 256 is the
    merge that byte-pair encoding its own bytes with ranks < r ends on -- exactly one pair per
    token, in rank order."""
    enc = gpt2_encoding()
    ranks = {enc.decode_single_token_bytes(i): i for i in range(EOT_ID)}
    vocab = {_spell(token): rank for token, rank in ranks.items()}
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = min(
                (r, i)
                for i in range(len(parts) - 1)
                if (r := ranks.get(parts[i] + parts[i + 1])) is not None and r < rank
            )
            parts[best[1] : best[1] + 2] = [parts[best[1]] + parts[best[1] + 1]]
        merges.append((_spell(parts[0]), _spell(parts[1])))
    return vocab, merges


# ----------------------------------------------------------------------------- Hugging Face folders


def _read_json(path: Path) -> dict[str, Any]:
    """A folder's optional JSON object: {} when the file is absent."""
    return textio.read_json_object(path) or {}


def _token_text(value: Any, where: str) -> str | None:
    """A special token as written in tokenizer_config.json / special_tokens_map.json: a string or an
    AddedToken dict with "content"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: expected a token string or {{'content': ...}}, got {value!r}")


def hf_chat_template(folder: str | Path) -> str | None:
    """The chat template of an HF folder: chat_template.jinja, else
    tokenizer_config.json's "chat_template" (a string, or a list of named
    templates: the one named "default"); None if there is none."""
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return textio.read_text(jinja)
    value = _read_json(folder / "tokenizer_config.json").get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(
            f"{folder / 'tokenizer_config.json'}: chat_template is a list without a 'default' "
            f"entry (names: {', '.join(map(str, named))})"
        )
    raise ValueError(
        f"{folder / 'tokenizer_config.json'}: chat_template must be a "
        f"string or a list, got {value!r}"
    )


def from_hf_folder(folder: str | Path) -> Tokenizer:
    """An HF tokenizer folder: tokenizer.json through `tokenizers`; BOS/EOS/UNK/PAD and add_bos from
    tokenizer_config.json, then special_tokens_map.json, then generation_config.json (ids); add_bos,
    when no config states it, from whether the tokenizer.json post-processor puts BOS first."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder}: no tokenizer.json; an HF tokenizer folder needs the fast-tokenizer file "
            "(slow-only files such as tokenizer.model or vocab.json + merges.txt are not read)"
        )
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare Exception for a malformed file
        raise ValueError(
            f"{path}: not a tokenizer.json the tokenizers library reads "
            f"({' '.join(str(e).split())})"
        ) from None
    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    generation = _read_json(folder / "generation_config.json")

    def special(name: str, id_key: str | None) -> int | None:
        for file, source in (
            ("tokenizer_config.json", config),
            ("special_tokens_map.json", special_map),
        ):
            text = _token_text(source.get(name), f"{folder / file}: {name}")
            if text is not None:
                token_id = backend.token_to_id(text)
                if token_id is None:
                    raise ValueError(
                        f"{folder / file}: {name}={text!r} is not in the vocabulary of {path}"
                    )
                return token_id
        value = generation.get(id_key) if id_key else None
        if isinstance(value, list):
            value = value[0] if value else None  # the first is the main one; eos_ids keeps them all
        if value is not None and not isinstance(value, int):
            raise ValueError(
                f"{folder / 'generation_config.json'}: {id_key} must be an "
                f"int or list, got {value!r}"
            )
        return value

    bos_id, eos_id = special("bos_token", "bos_token_id"), special("eos_token", "eos_token_id")
    pad_id, unk_id = special("pad_token", "pad_token_id"), special("unk_token", None)
    extra_eos = generation.get("eos_token_id")
    extra_eos = extra_eos if isinstance(extra_eos, list) else []

    if config.get("add_eos_token"):
        raise ValueError(f"{folder / 'tokenizer_config.json'}: add_eos_token=True is not supported")
    add_bos = config.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise ValueError(
            f"{folder / 'tokenizer_config.json'}: add_bos_token must be true "
            f"or false, got {add_bos!r}"
        )
    if add_bos is None:
        plain = backend.encode("a", add_special_tokens=False).ids
        processed = backend.encode("a", add_special_tokens=True).ids
        if processed == plain:
            add_bos = False
        elif bos_id is not None and processed == [bos_id, *plain]:
            add_bos = True
        else:
            raise ValueError(
                f"{path}: the post-processor turns {plain} into {processed}; only prepending "
                f"BOS ({bos_id}) is supported"
            )
    return Tokenizer(
        "hf",
        backend=backend,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        unk_id=unk_id,
        add_bos=add_bos,
        eos_ids=[int(i) for i in extra_eos],
        chat_template=hf_chat_template(folder),
    )


# ----------------------------------------------------------------------------- GGUF metadata

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (1 normal, 2 unknown, 5 unused, 6 byte)
GGUF_TOKENIZER_MODELS = ("gpt2", "llama")


def from_gguf_fields(fields: Mapping[str, Any]) -> Tokenizer:
    """A tokenizer from GGUF metadata already decoded to Python values (`tokenizer.ggml.*` keys).

    tokenizer.ggml.model "gpt2": byte-level BPE from tokens + merges, pre-tokenized as llama.cpp
    does for tokenizer.ggml.pre. "llama": sentencepiece-style BPE (byte fallback, "▁" for spaces)
    from tokens + merges. Control tokens (type 3) become special added tokens and user-defined ones
    (type 4) plain added tokens, so both are matched whole in text, as transformers' GGUF converter
    and llama.cpp do."""
    model = fields.get("tokenizer.ggml.model")
    if model not in GGUF_TOKENIZER_MODELS:
        raise ValueError(
            f"tokenizer.ggml.model={model!r} is not supported; supported: "
            f"{', '.join(GGUF_TOKENIZER_MODELS)}"
        )
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens) == 0 or not all(isinstance(t, str) for t in tokens):
        raise ValueError("tokenizer.ggml.tokens is missing or not a list of strings")
    tokens = list(tokens)
    if len(set(tokens)) != len(tokens):
        seen: set[str] = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise ValueError(f"tokenizer.ggml.tokens lists {dup!r} twice")
    token_type = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(token_type) != len(tokens):
        raise ValueError(
            f"tokenizer.ggml.token_type has {len(token_type)} entries for {len(tokens)} tokens"
        )
    merges = fields.get("tokenizer.ggml.merges")
    if not merges:
        raise ValueError(
            f"tokenizer.ggml.merges is missing or empty (needed for tokenizer.ggml.model={model!r})"
        )
    pairs = []
    for m in merges:
        pair = tuple(m.split(" ")) if isinstance(m, str) else ()
        if len(pair) != 2:
            raise ValueError(
                f"tokenizer.ggml.merges entry {m!r} is not two tokens separated by one space"
            )
        pairs.append(pair)

    if model == "gpt2":
        pre = fields.get("tokenizer.ggml.pre")
        if pre is None:
            raise ValueError(
                "tokenizer.ggml.pre is missing: the pre-tokenizer of a "
                "byte-level vocabulary is unknown"
            )
        alphabet = set(byte_alphabet().values())
        # As transformers does: a token outside the byte alphabet is stored as raw text; respell it,
        # and do not add such a token as special (llama.cpp mislabels them control), so ids stay
        # where the model has them.
        vocab = {
            t if set(t) <= alphabet else _spell(t.encode("utf-8")): i for i, t in enumerate(tokens)
        }
        # llama.cpp takes a pre-token found whole in the vocabulary without
        # merging for the Llama-3 family (as their tokenizer.json's
        # "ignore_merges": true says); transformers' GGUF converter does not.
        ignore_merges = pre in _LLAMA3_STYLE
        backend = tokenizers.Tokenizer(
            BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=ignore_merges)
        )
        backend.pre_tokenizer = byte_level_pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        control_ok = [set(t) <= alphabet for t in tokens]
    else:
        prefix = fields.get("tokenizer.ggml.add_space_prefix", True)
        vocab = {t: i for i, t in enumerate(tokens)}
        unk = fields.get("tokenizer.ggml.unknown_token_id")
        backend = tokenizers.Tokenizer(
            BPE(
                vocab=vocab,
                merges=pairs,
                fuse_unk=True,
                byte_fallback=True,
                unk_token=tokens[unk] if unk is not None else None,
            )
        )
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
        )
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence(
            steps + ([decoders.Strip(content=" ", left=1)] if prefix else [])
        )
        control_ok = [True] * len(tokens)
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, kind, ok in zip(tokens, token_type, control_ok, strict=True)
        if kind == _CONTROL and ok
    ]
    backend.add_special_tokens(control)
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, token_type, strict=True)
            if kind == _USER_DEFINED
        ]
    )
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(
            f"the tokenizer has {backend.get_vocab_size(with_added_tokens=True)} ids for "
            f"{len(tokens)} GGUF tokens"
        )

    def token_id(key: str) -> int | None:
        value = fields.get(f"tokenizer.ggml.{key}")
        if value is None:
            return None
        # numpy integers (another GGUF reader) are fine; bools and floats are not ids
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Integral)
            or not 0 <= value < len(tokens)
        ):
            raise ValueError(
                f"tokenizer.ggml.{key}={value!r} is not a token id in [0, {len(tokens)})"
            )
        return int(value)

    # llama.cpp adds BOS to a sentencepiece vocabulary that does not say
    # otherwise; byte-level ones it does not. Absent flag: llama.cpp's
    # defaults -- BOS for sentencepiece vocabularies and the Llama-3 family.
    add_bos = fields.get(
        "tokenizer.ggml.add_bos_token",
        model == "llama" or fields.get("tokenizer.ggml.pre") in _LLAMA3_STYLE,
    )
    # a numpy bool from another GGUF reader
    if getattr(getattr(add_bos, "dtype", None), "kind", None) == "b":
        add_bos = bool(add_bos)
    if not isinstance(add_bos, bool):
        raise ValueError(f"tokenizer.ggml.add_bos_token must be a bool, got {add_bos!r}")
    if fields.get("tokenizer.ggml.add_eos_token"):
        raise ValueError("tokenizer.ggml.add_eos_token=True is not supported")
    template = fields.get("tokenizer.chat_template")
    source = {k: v for k, v in fields.items() if k.startswith("tokenizer.")}
    return Tokenizer(
        "gguf",
        backend=backend,
        bos_id=token_id("bos_token_id"),
        eos_id=token_id("eos_token_id"),
        pad_id=token_id("padding_token_id"),
        unk_id=token_id("unknown_token_id"),
        add_bos=add_bos,
        chat_template=template if isinstance(template, str) else None,
        gguf_source=source,
    )
