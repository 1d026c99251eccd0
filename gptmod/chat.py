"""`gptmod chat`: multi-turn chat with a checkpoint's own chat template and
a KV cache kept across turns.

`render` renders a chat template (a Jinja2 string, as stored in tokenizer_config.json or a GGUF's
tokenizer.chat_template) the way transformers' `apply_chat_template` does: a sandboxed environment
with trim_blocks, lstrip_blocks and loop controls, `tojson`, `raise_exception` and `strftime_now`.
`Chat` keeps the conversation: every turn renders the whole of it, and the Session
(gptmod_torch/gptmod_jax generate.py) reuses the prefix its cache already holds, so only the new
part is prefilled. Framework-free when loaded.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Protocol, TextIO

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from gptmod import options
from gptmod.options import CLIError

# End-of-turn tokens of the common chat formats: ChatML (<|im_end|>), Llama 3 (<|eot_id|>,
# <|eom_id|>), Gemma (<end_of_turn>), Phi-3 (<|end|>). One counts as a stop id when the template
# writes it and the vocabulary has it.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")


class ChatTemplateError(ValueError):
    """A chat template that cannot be compiled or rendered, or one that raised (raise_exception)."""


# ----------------------------------------------------------------------------- rendering


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' marker of
    assistant text) renders its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` for templates, without the attributes a template could climb out through."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed names (a way into Python internals)."""

    def __init__(
        *args: Any, **kwargs: Any
    ) -> None:  # Jinja's own signature trick: `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"namespace attribute {name!r}: names starting with _ are refused"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, '), which chat
    # templates must keep as they are.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    # Templates come with downloaded checkpoints: untrusted code, hence the immutable sandbox.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_TemplateDict(),
        namespace=_TemplateNamespace,
    )
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"chat template: syntax error on line {e.lineno}: {e.message}"
        ) from e


def render(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """The conversation `messages` (dicts with "role" and "content") as the template
    renders it, ending with the assistant's header when `add_generation_prompt`.
    `extra` reaches the template as further variables (tools, documents, a date,
    ...), as apply_chat_template's keyword arguments do."""
    if not isinstance(template, str) or not template.strip():
        raise ChatTemplateError(
            f"chat template: expected a non-empty Jinja string, got {template!r:.60}"
        )
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(
            "messages: expected a list of dicts with 'role' and 'content', got "
            f"{type(messages).__name__}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ValueError(
                f"messages[{i}]: expected a dict with a str 'role' (and 'content'), got {m!r:.80}"
            )
    try:
        return _compile(template).render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **extra,
        )
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from e


# ----------------------------------------------------------------------------- the conversation


class Tokenizer(Protocol):
    """What chat needs of a checkpoint's tokenizer (gptmod.pretrained)."""

    bos_id: int | None
    eos_id: int | None
    special_tokens: Any

    def encode(
        self, text: str, add_bos: bool | None = None, allow_special: bool = False
    ) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def stream_decoder(self) -> Any: ...
    def token_id(self, text: str) -> int | None: ...


def _token_id(tokenizer: Tokenizer, text: str) -> int | None:
    """The id of the single token `text`, or None where the vocabulary has no such token."""
    try:
        tid = tokenizer.token_id(text)
    except (KeyError, ValueError):
        return None
    return None if tid is None else int(tid)


def _token_text(tokenizer: Tokenizer, tid: int | None) -> str:
    """A special token's text (for the template's bos_token/eos_token), "" for None."""
    if tid is None:
        return ""
    special = getattr(tokenizer, "special_tokens", None)
    if isinstance(special, Mapping):
        for text, i in special.items():
            if isinstance(text, str) and i == tid:
                return text
    return tokenizer.decode([tid])


def chat_stop_ids(template: str, tokenizer: Tokenizer, eos_ids: Sequence[int]) -> list[int]:
    """Where a reply ends: the checkpoint's eos ids, plus each known
    end-of-turn token the template writes."""
    stops = [int(i) for i in eos_ids]
    for text in END_OF_TURN:
        tid = _token_id(tokenizer, text) if text in template else None
        if tid is not None and tid not in stops:
            stops.append(tid)
    return stops


@dataclass(frozen=True)
class TurnStats:
    """How one reply went: what the Session prefilled and found cached, and how fast it answered."""

    prefilled: int  # context tokens run through prefill this turn
    reused: int  # context tokens found in the KV cache
    generated: int  # tokens sampled, the stop token included
    ttft_s: (
        float  # from the user's message to the first reply token (rendering, tokenizing, prefill)
    )
    decode_tok_s: float  # tokens per second after the first (nan with fewer than two)

    def line(self) -> str:
        rate = "-" if self.generated < 2 else f"{self.decode_tok_s:.1f} tok/s"
        return (
            f"[{self.generated} tokens, first after {self.ttft_s:.2f} s, then {rate}; "
            f"prefilled {self.prefilled}, reused {self.reused} from the cache]"
        )


class Chat:
    """A conversation with a model through its chat template. Each `reply` renders the whole
    conversation with the new user message, hands its ids to the Session (which prefills only what
    its cache lacks) and streams the reply as text; the stop token is not part of it. The reply is
    kept in the conversation even when the stream is cut short (Ctrl-C, or the caller stops
    iterating): the user saw it, so the model does too."""

    def __init__(
        self,
        session: Any,
        tokenizer: Tokenizer,
        template: str,
        stop_ids: Sequence[int],
        *,
        system: str | None = None,
        max_new_tokens: int = 256,
        **sampling: Any,
    ):
        self.session, self.tokenizer, self.template = session, tokenizer, template
        self.stop_ids = list(stop_ids)
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.messages: list[dict[str, str]] = (
            [] if system is None else [{"role": "system", "content": system}]
        )
        self.specials = {
            "bos_token": _token_text(tokenizer, tokenizer.bos_id),
            "eos_token": _token_text(tokenizer, tokenizer.eos_id),
        }
        self.last: TurnStats | None = None

    def context(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The token ids of `messages` rendered with the assistant's header:
        special tokens in the rendering are parsed as such, and no BOS is added
        (a template that wants one writes it, as with apply_chat_template). A
        user who types a special token's text therefore gets that token."""
        text = render(self.template, messages, add_generation_prompt=True, **self.specials)
        return self.tokenizer.encode(text, add_bos=False, allow_special=True)

    def reply(self, text: str) -> Iterator[str]:
        """Stream the reply to the user message `text`, piece by piece; `last` holds its TurnStats
        after (None until the reply has run). The conversation grows only once the request is
        accepted (a full context raises before), and then by both messages at once, the reply filled
        in as it streams: roles keep alternating whatever interrupts it."""
        start, self.last = time.perf_counter(), None
        messages = [*self.messages, {"role": "user", "content": text}]
        tokens = self.session.stream(
            self.context(messages), self.max_new_tokens, stop_ids=self.stop_ids, **self.sampling
        )
        answer = {"role": "assistant", "content": ""}
        self.messages = [*messages, answer]
        return self._reply(tokens, answer, start)

    def _reply(self, tokens: Iterator[int], answer: dict[str, str], start: float) -> Iterator[str]:
        decoder, pieces, n, first = self.tokenizer.stream_decoder(), [], 0, None
        stops = set(self.stop_ids)
        try:
            for tok in tokens:
                n += 1
                first = time.perf_counter() if first is None else first
                if tok in stops:
                    break
                pieces.append(decoder.push(tok))
                yield pieces[-1]
            pieces.append(decoder.flush())
            yield pieces[-1]
        finally:  # also on Ctrl-C or an abandoned stream: keep what was shown
            tokens.close()
            answer["content"] = "".join(pieces)
            end = time.perf_counter()
            first = end if first is None else first
            self.last = TurnStats(
                self.session.last_prefill,
                self.session.last_reused,
                n,
                first - start,
                (n - 1) / (end - first) if n > 1 and end > first else float("nan"),
            )


# ----------------------------------------------------------------------------- the command


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `gptmod chat` on the `gptmod` command's subparsers."""
    c = subparsers.add_parser(
        "chat",
        help="chat with a checkpoint through its chat template (multi-turn, streamed)",
        description="Multi-turn chat with a pretrained checkpoint, rendered with its own chat "
        "template. Replies stream as they are generated and end at the template's "
        "end-of-turn token. The KV cache is kept across turns, so each turn prefills only "
        "what is new; after each reply stderr shows the time to the first token, tokens/s "
        "and the tokens prefilled and reused (the decode step is compiled before the first "
        "turn; a context length of a new size still compiles its prefill once). "
        "Interactive on a terminal; with stdin piped, one user message per line and one "
        "reply per message. Ctrl-C stops the current reply (the partial reply stays in the "
        "conversation); Ctrl-D or end of input ends the chat.",
    )
    c.add_argument(
        "--weights",
        required=True,
        help="the checkpoint (as gptmod.pretrained.load takes it: a GGUF "
        "file, a Hugging Face folder, ...); it must carry a chat template",
    )
    options.add_framework_option(c, "jax")
    c.add_argument(
        "--system", help="a system prompt as the first message (default: none; the template's own)"
    )
    c.add_argument(
        "--max-new-tokens", type=int, default=256, help="most tokens per reply (default 256)"
    )
    c.add_argument(
        "--max-context",
        type=int,
        help="KV cache bound in tokens (default: the model's max_seq_len; "
        "allocated as the conversation grows). A longer conversation is an error, never truncated",
    )
    options.add_sampling_options(c, "seed of sampling (each reply starts from it)")
    options.add_generation_options(c)
    c.set_defaults(func=cmd_chat)
    return c


def cmd_chat(args: argparse.Namespace) -> int:
    """`gptmod chat`: load, build the twin, then talk over stdin/stdout (statistics on stderr)."""
    backend = options.generation_backend(args)
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    sampling = {f: getattr(args, f) for f in options.SAMPLING_FIELDS}
    # bad values are refused before the (slow) load
    with options.sampling_params("gptmod chat", sampling):
        return _load_and_converse(args, backend, sampling)


def _load_and_converse(args: argparse.Namespace, backend: str, sampling: dict[str, Any]) -> int:
    try:
        from gptmod.pretrained import load

        p = load(args.weights)
        if not p.chat_template:
            raise CLIError(
                f"--weights {args.weights}: the checkpoint has no chat template "
                "(tokenizer.chat_template), so there is no way to format a conversation for it"
            )
        if p.tokenizer is None:
            raise CLIError(f"--weights {args.weights}: the checkpoint has no tokenizer")
        if args.max_context is not None and not 1 <= args.max_context <= p.cfg.max_seq_len:
            raise CLIError(
                f"--max-context {args.max_context}: must be in [1, max_seq_len={p.cfg.max_seq_len}]"
            )
        model = options.generation_model(args, p, backend)
        gen = importlib.import_module(f"gptmod_{args.framework}.generate")
        kw = {"compile": args.compile} if args.framework == "torch" else {}
        session = gen.Session(model, args.max_context, **kw)
        chat = Chat(
            session,
            p.tokenizer,
            p.chat_template,
            chat_stop_ids(p.chat_template, p.tokenizer, p.eos_ids),
            system=args.system,
            max_new_tokens=args.max_new_tokens,
            **sampling,
        )
        # compile the decode step now: the first reply's tok/s is real
        if args.framework == "jax" or args.compile:
            print("compiling the decode step...", file=sys.stderr, flush=True)
            # the very program turns run
            list(session.stream([0], 2, stop_ids=chat.stop_ids, **chat.sampling))
            session.reset()
        return converse(chat, sys.stdin, sys.stdout, sys.stderr)
    # while loading or compiling: leave quietly, as a shell expects of Ctrl-C
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _read(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
    """The next user message, or None at end of input. Empty lines are skipped."""
    while True:
        if interactive:
            try:
                line = (
                    input(">>> ")
                    if stdin is sys.stdin and stdout is sys.stdout
                    else _prompt(stdin, stdout)
                )
            except EOFError:
                return None
        else:
            line = stdin.readline()
            if not line:
                return None
        if line.strip():
            return line.rstrip("\r\n")


def _prompt(stdin: TextIO, stdout: TextIO) -> str:
    stdout.write(">>> ")
    stdout.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return line


def converse(chat: Chat, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """The chat loop: a message in, a streamed reply out, statistics on
    stderr, until end of input (0)."""
    interactive = stdin.isatty()
    if interactive:
        print("[Ctrl-C stops a reply, Ctrl-D ends the chat]", file=stderr)
    while True:
        try:
            text = _read(stdin, stdout, interactive)
        except KeyboardInterrupt:  # at the prompt: drop the line, ask again
            stdout.write("\n")
            continue
        if text is None:
            if interactive:
                stdout.write("\n")
            return 0
        pieces = None
        try:
            pieces = chat.reply(text)
            for piece in pieces:
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            if pieces is not None:
                pieces.close()
            stdout.write("\n")
            print("[reply interrupted; the part shown stays in the conversation]", file=stderr)
        else:
            stdout.write("\n")
        stdout.flush()
        if chat.last is not None:
            print(chat.last.line(), file=stderr, flush=True)
