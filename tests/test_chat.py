"""Chat: template rendering against transformers' apply_chat_template, the
Session's KV cache across turns on the real SmolLM2 in both twins, and
`gptmod chat` in-process (piped stdin, errors, Ctrl-C)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import re
import sys
import types
from collections.abc import Mapping

import numpy as np
import pytest

import gptmod.cli
from gptmod import chat, pretrained
from gptmod.config import load_preset
from gptmod.models import build
from gptmod.options import CLIError
from gptmod.sampling import ContextFullError

from conftest import torch_pair_state

jg = importlib.import_module("gptmod_jax.generate")
tg = importlib.import_module("gptmod_torch.generate")

QUESTION = "What is the capital of France?"


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="session")
def smol(smollm2, smollm2_hf_tokenizer):
    """(SmolLM2 through gptmod.pretrained.load, transformers' tokenizer of
    the same GGUF: the oracle)."""
    return smollm2, smollm2_hf_tokenizer


@pytest.fixture(scope="session")  # not module: a worker leaves and re-enters modules (test_gguf.py)
def smol_models(smol):
    p, _ = smol
    return {fw: build(fw, p.cfg, p.state) for fw in ("torch", "jax")}


CONVERSATIONS = {
    "no system": [
        {"role": "user", "content": "Hi! Who are you?"},
        {"role": "assistant", "content": "I am SmolLM, a small assistant."},
        {"role": "user", "content": "Name three colours & a <tag>."},
    ],
    "system": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Italy?"},
    ],
}


# ----------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_render_gives_the_ids_of_apply_chat_template(smol, name):
    p, hf_tok = smol
    messages = CONVERSATIONS[name]
    for gen_prompt in (True, False):
        text = chat.render(
            p.chat_template,
            messages,
            add_generation_prompt=gen_prompt,
            bos_token=hf_tok.bos_token,
            eos_token=hf_tok.eos_token,
        )
        ours = hf_tok(text, add_special_tokens=False)["input_ids"]
        theirs = hf_tok.apply_chat_template(
            messages, add_generation_prompt=gen_prompt, tokenize=True
        )
        theirs = theirs["input_ids"] if isinstance(theirs, Mapping) else theirs
        assert ours == theirs
    assert text.endswith("<|im_end|>\n") and "<|im_start|>assistant\n" not in text[-25:]
    # The rendering is the same through the Chat helper, with the
    # tokenizer's own special-token texts.
    session = types.SimpleNamespace()
    c = chat.Chat(session, p.tokenizer, p.chat_template, [2])
    assert c.specials == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    assert (
        c.context(messages)
        == hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[
            "input_ids"
        ]
    )


def test_render_environment_matches_transformers():
    msgs = [{"role": "user", "content": "a<b>&'c"}, {"role": "assistant", "content": "x"}]
    # trim_blocks + lstrip_blocks: a block tag's own line leaves nothing behind.
    t = (
        "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    "
        "{% endif %}\n{% endfor %}"
    )
    assert chat.render(t, msgs) == "U:a<b>&'c\n"
    # tojson keeps <, >, & and ' as they are (Jinja's own would escape them), and takes indent.
    assert (
        chat.render("{{ messages[0] | tojson }}", msgs) == '{"role": "user", "content": "a<b>&\'c"}'
    )
    assert chat.render("{{ {'a': 1} | tojson(indent=2) }}", msgs) == '{\n  "a": 1\n}'
    # loop controls, namespace, dict, the generation marker, extra variables, bos/eos tokens.
    t = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 1 %}{% "
        "break %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|{{ "
        "dict(a=1)['a'] }}|{% generation %}G{% endgeneration %}|{{ bos_token }}{{ eos_token "
        "}}|{{ when }}|{{ add_generation_prompt }}"
    )
    assert (
        chat.render(t, msgs, bos_token="<s>", eos_token="</s>", when="today")
        == "1|1|G|<s></s>|today|True"
    )
    assert len(chat.render("{{ strftime_now('%Y-%m-%d') }}", msgs)) == 10
    with pytest.raises(
        chat.ChatTemplateError, match="chat template: Conversation roles must alternate"
    ):
        chat.render("{{ raise_exception('Conversation roles must alternate') }}", msgs)


def test_render_is_sandboxed_and_refuses_bad_input():
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(
        chat.ChatTemplateError,
        match="chat template: access to attribute '__class__' of 'str' object is unsafe",
    ):
        chat.render("{{ ''.__class__.__mro__ }}", msgs)
    with pytest.raises(chat.ChatTemplateError, match="namespace attribute '_x'"):
        chat.render("{% set ns = namespace(_x=1) %}", msgs)
    with pytest.raises(chat.ChatTemplateError, match="chat template: syntax error on line 1"):
        chat.render("{% for m in messages %}", msgs)
    with pytest.raises(chat.ChatTemplateError, match="expected a non-empty Jinja string"):
        chat.render("  ", msgs)
    with pytest.raises(ValueError, match=r"messages\[1\]: expected a dict with a str 'role'"):
        chat.render("{{ messages }}", [{"role": "user"}, {"content": "no role"}])
    with pytest.raises(ValueError, match="messages: expected a list of dicts"):
        chat.render("{{ messages }}", "hello")


class _Vocab:
    def __init__(self, specials):
        self.specials, self.bos_id, self.eos_id, self.special_tokens = (
            specials,
            None,
            None,
            dict(specials),
        )

    def token_id(self, text):
        if text not in self.specials:
            raise KeyError(text)
        return self.specials[text]


def test_stop_ids_are_eos_plus_the_end_of_turn_tokens_the_template_writes(smol):
    p, _ = smol
    # <|im_end|> is SmolLM2's eos
    assert chat.chat_stop_ids(p.chat_template, p.tokenizer, p.eos_ids) == [2]
    llama3 = (
        "{{ '<|start_header_id|>' + m + '<|end_header_id|>' }}{{ '<|eot_id|>' }}{{ '<|eom_id|>' }}"
    )
    vocab = _Vocab({"<|eot_id|>": 128009, "<|eom_id|>": 128008, "<|im_end|>": 7})
    assert chat.chat_stop_ids(llama3, vocab, [128001, 128009]) == [128001, 128009, 128008]
    # not in the vocabulary: not a stop
    assert chat.chat_stop_ids("{{ '<|im_end|>' }}", _Vocab({}), [0]) == [0]


# -------------------------------------------------------------------- the Session on the real model


def _fresh_logits(framework, model, ids):
    s = (tg if framework == "torch" else jg).Session(model)
    return s.feed(ids)


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_real_model_session_reuses_the_cache_across_turns(smol, smol_models, framework):
    _, hf_tok = smol
    model = smol_models[framework]
    gen = tg if framework == "torch" else jg
    session = gen.Session(model)
    assert session.max_len == 8192 and session.capacity == 0  # nothing allocated up front
    turn1 = [{"role": "user", "content": QUESTION}]
    ids1 = hf_tok.apply_chat_template(turn1, add_generation_prompt=True, tokenize=True)["input_ids"]
    reply = list(session.stream(ids1, 6, stop_ids=[2]))
    assert session.capacity == 256 and (session.last_prefill, session.last_reused) == (len(ids1), 0)
    # Turn 2: the whole conversation again; the cache holds all but the reply's last (unfed) token.
    turn2 = [
        *turn1,
        {"role": "assistant", "content": hf_tok.decode(reply)},
        {"role": "user", "content": "And of Italy?"},
    ]
    ids2 = hf_tok.apply_chat_template(turn2, add_generation_prompt=True, tokenize=True)["input_ids"]
    fed = ids1 + reply[:-1]
    reused = next(i for i, (a, b) in enumerate(zip([*fed, -1], ids2, strict=False)) if a != b)
    assert reused >= len(ids1)  # at least the first turn's prompt
    reply2 = list(session.stream(ids2, 5, stop_ids=[2]))
    assert (session.last_reused, session.last_prefill) == (reused, len(ids2) - reused)
    # A fresh session prefills the whole context (the same shapes as turn 1:
    # nothing new to compile).
    assert reply2 == list(gen.Session(model).stream(ids2, 5, stop_ids=[2]))
    # Logits after the reused prefix equal a fresh prefill's within fp32
    # noise (the parity budget: 2e-5 relative).
    ctx = ids2 + reply2[:2]
    got = session.feed(ctx)
    assert session.last_reused == len(ids2) + 1 and session.last_prefill == 1
    fresh = _fresh_logits(framework, model, ctx)
    assert np.abs(got - fresh).max() <= 2e-5 * np.abs(fresh).max()
    assert int(got.argmax()) == int(fresh.argmax())


# ----------------------------------------------------------------------------- `gptmod chat`


def _args(argv):
    parser = argparse.ArgumentParser(prog="gptmod")
    chat.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["chat", *argv])


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_cli_chat_answers_piped_messages_and_reuses_the_cache(smol, framework, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n\nAnd what is it famous for?\n"))
    rc = gptmod.cli.main(
        ["chat", "--weights", "smollm2", "--framework", framework, "--max-new-tokens", "16"]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    replies = out.splitlines()
    assert "Paris" in replies[0] and "<|im_end|>" not in out
    stats = re.findall(
        r"\[(\d+) tokens, first after .* prefilled (\d+), reused (\d+) from the cache\]", err
    )
    assert len(stats) == 2, err  # the empty line is no message
    (n1, pre1, reuse1), (n2, pre2, reuse2) = ([int(x) for x in row] for row in stats)
    assert reuse1 == 0 and pre1 > 20 and 1 <= n1 <= 16 and 1 <= n2 <= 16
    assert reuse2 >= pre1 and pre2 < reuse2  # turn 2 prefills only its new part
    # the measured figures, shown with -s
    print(
        f"\n[{framework}]\n" + "\n".join(line for line in err.splitlines() if "prefilled" in line),
        file=sys.__stderr__,
    )


def test_cli_chat_errors_are_one_line_with_exit_code_2(smol, monkeypatch, capsys):
    p, _ = smol
    rc = gptmod.cli.main(["chat", "--weights", "smollm2", "--temperature", "-1"])
    assert (
        rc == 2
        and "gptmod chat: error: temperature=-1.0: must be a finite number >= 0"
        in capsys.readouterr().err
    )
    rc = gptmod.cli.main(["chat", "--weights", "smollm2", "--framework", "jax", "--compile"])
    assert rc == 2 and "--compile is for --framework torch" in capsys.readouterr().err
    rc = gptmod.cli.main(["chat", "--weights", "no-such.gguf"])
    assert (
        rc == 2
        and "gptmod chat: error: checkpoint not found: no-such.gguf" in capsys.readouterr().err
    )
    # A checkpoint without a chat template.
    no_template = dataclasses.replace(p, chat_template=None)
    monkeypatch.setattr(pretrained, "load", lambda source, **kw: no_template)
    rc = gptmod.cli.main(["chat", "--weights", "x"])
    err = capsys.readouterr().err
    assert (
        rc == 2
        and err.count("\n") == 1
        and "--weights x: the checkpoint has no chat template" in err
    )
    with pytest.raises(CLIError, match="--max-new-tokens 0: must be >= 1"):
        chat.cmd_chat(_args(["--weights", "x", "--max-new-tokens", "0"]))


def test_cli_chat_notes_ignored_filters_once_without_a_raw_warning(smol, monkeypatch, capsys):
    """Greedy with --top-k: one note in the CLI's words, as `generate` gives, and no raw
    IgnoredFiltersWarning from the library on each turn."""
    import warnings

    from gptmod.sampling import IgnoredFiltersWarning

    p, _ = smol
    monkeypatch.setattr(pretrained, "load", lambda source, **kw: p)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nBye\n"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = gptmod.cli.main(
            [
                "chat",
                "--weights",
                "x",
                "--framework",
                "torch",
                "--top-k",
                "5",
                "--max-new-tokens",
                "2",
            ]
        )
    err = capsys.readouterr().err
    assert rc == 0, err
    assert [line for line in err.splitlines() if "ignored" in line] == [
        "gptmod chat: note: --top-k ignored: greedy without --temperature > 0"
    ]
    assert not [w for w in caught if issubclass(w.category, IgnoredFiltersWarning)]


# ----------------------------------------------------------------------------- Chat on a tiny model


class CharTokenizer:
    """A character tokenizer with ChatML's two specials: enough to drive
    Chat without a real vocabulary."""

    def __init__(self):
        self.specials = self.special_tokens = {"<|im_start|>": 1, "<|im_end|>": 2}
        self.bos_id, self.eos_id = None, 2

    def encode(self, text, add_bos=None, allow_special=False):
        assert allow_special and not add_bos
        ids, i = [], 0
        while i < len(text):
            tok = next((s for s in self.specials if text.startswith(s, i)), None)
            ids.append(self.specials[tok] if tok else 3 + ord(text[i]) % 250)
            i += len(tok) if tok else 1
        return ids

    def decode(self, ids):
        inv = {v: k for k, v in self.specials.items()}
        return "".join(inv.get(i, chr(65 + i % 26)) for i in ids)

    def token_id(self, text):
        return self.specials.get(text)

    def stream_decoder(self):
        return types.SimpleNamespace(push=lambda i: self.decode([i]), flush=lambda: "")


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' "
    "}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny():
    cfg = dataclasses.replace(load_preset("tiny"), vocab_size=257, tie_embeddings=False)
    state = {k: v * 8 if v.ndim == 2 else v for k, v in torch_pair_state(cfg, 0).items()}
    return cfg, state


class _InterruptingOut(io.StringIO):
    """stdout that raises KeyboardInterrupt (Ctrl-C) on its `at`-th write of the first reply."""

    def __init__(self, at):
        super().__init__()
        self.at, self.writes = at, 0

    def write(self, s):
        self.writes += 1
        if self.writes == self.at:
            raise KeyboardInterrupt
        return super().write(s)


def test_ctrl_c_stops_the_reply_and_the_conversation_goes_on(tiny):
    cfg, state = tiny
    model = build("torch", cfg, state)
    c = chat.Chat(
        tg.Session(model), CharTokenizer(), CHATML, [2], system="Be brief.", max_new_tokens=12
    )
    stdin, out, err = io.StringIO("first\nsecond\n"), _InterruptingOut(at=4), io.StringIO()
    assert chat.converse(c, stdin, out, err) == 0
    assert "[reply interrupted; the part shown stays in the conversation]" in err.getvalue()
    roles = [m["role"] for m in c.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    # The first reply: three pieces written, the fourth streamed when Ctrl-C
    # came; the conversation keeps those.
    shown = out.getvalue().split("\n")[0]
    assert (
        len(shown) == 3
        and c.messages[2]["content"][:3] == shown
        and len(c.messages[2]["content"]) == 4
    )
    assert len(c.messages[4]["content"]) >= 1
    assert err.getvalue().count("prefilled") == 2
    # The second turn reused the first one from the cache: everything up to the partial reply.
    first_ctx = c.context(c.messages[:2])
    assert c.session.last_reused >= len(first_ctx) and c.last.reused == c.session.last_reused
    # The interrupted session is consistent: its cache gives a fresh prefill's logits.
    ids = c.session.tokens
    fresh = tg.Session(model).feed(ids)
    got = c.session.feed(ids)
    assert np.abs(got - fresh).max() <= 2e-5 * np.abs(fresh).max()


def test_a_reply_never_started_still_keeps_the_roles_alternating(tiny):
    cfg, state = tiny
    c = chat.Chat(
        tg.Session(build("torch", cfg, state)),
        CharTokenizer(),
        CHATML,
        [2],
        max_new_tokens=6,
    )
    c.reply("first").close()  # Ctrl-C right after the request was accepted, before any token
    assert c.messages == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": ""},
    ]
    assert c.last is None
    text = "".join(c.reply("second"))
    assert [m["role"] for m in c.messages] == ["user", "assistant", "user", "assistant"]
    assert c.messages[-1]["content"] == text and c.last.generated >= 1


def test_chat_refuses_a_conversation_past_the_context_and_keeps_it_unchanged(tiny):
    cfg, state = tiny
    model = build("jax", cfg, state)
    c = chat.Chat(jg.Session(model, max_len=48), CharTokenizer(), CHATML, [2], max_new_tokens=8)
    text = "".join(c.reply("hi"))
    assert c.messages[-1] == {"role": "assistant", "content": text}
    assert (
        1 <= c.last.generated <= 8
        and c.last.ttft_s > 0
        and c.last.prefilled == len(c.context(c.messages[:1]))
    )
    before = list(c.messages)
    with pytest.raises(ContextFullError, match=r"exceed the session's capacity max_len=48"):
        c.reply("a much longer message that does not fit")
    assert c.messages == before and c.last is None


def test_turn_stats_line():
    line = chat.TurnStats(
        prefilled=5, reused=40, generated=11, ttft_s=0.25, decode_tok_s=31.04
    ).line()
    assert (
        line
        == "[11 tokens, first after 0.25 s, then 31.0 tok/s; prefilled 5, reused 40 from the cache]"
    )
    assert "then -;" in chat.TurnStats(3, 0, 1, 0.1, float("nan")).line()
