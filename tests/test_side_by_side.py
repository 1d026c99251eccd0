"""The side-by-side teaching page: complete, correctly paired (methods too), diffed, wrapped,
self-contained, and its notes rest on code that is really in their rows."""

from __future__ import annotations

import ast
import functools
import html
import importlib
import math
import re
import types
from collections import Counter

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from pygments.token import Text
from torch import nn

from gptmod import side_by_side as sbs

SIDES = ("torch", "jax")
STEMS = [f.removesuffix(".py") for f in sbs.FILES]
# The short names the notes use, as the twin files import them.
ALIASES = {
    "torch": torch,
    "F": F,
    "nn": nn,
    "jax": jax,
    "jnp": jnp,
    "nnx": nnx,
    "np": np,
    "ml_dtypes": ml_dtypes,
    "optax": optax,
    "math": math,
}


@pytest.fixture(scope="module")
def page() -> str:
    return sbs.render_html()


@pytest.fixture(scope="module")
def sources() -> dict[tuple[str, str], str]:
    return {
        (side, file): sbs.source_path(side, file).read_text(encoding="utf-8")
        for side in SIDES
        for file in sbs.FILES
    }


@pytest.fixture(scope="module")
def pairs() -> dict[str, list[sbs.Pair]]:
    return sbs.build_pairs()


def top_level(source: str) -> dict[str, int]:
    """Top-level class and function names -> line of the `class`/`def` keyword."""
    kinds = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
    return {n.name: n.lineno for n in ast.parse(source).body if isinstance(n, kinds)}


def methods(source: str, cls: str) -> dict[str, int]:
    (node,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == cls]
    return {n.name: n.lineno for n in node.body if isinstance(n, ast.FunctionDef)}


def sections_of(page: str) -> dict[str, str]:
    return dict(
        re.findall(
            r'<section class="pair(?: method)?" id="([^"]+)">(.*?)</section>', page, re.DOTALL
        )
    )


def code_lines(row: str, side: str) -> list[str]:
    """The text of each visual row of one side's code cell, tags stripped."""
    m = re.search(
        rf'<div class="col {side}">.*?<div class="code">(.*?)</div></div>', row, re.DOTALL
    )
    if m is None:
        return []
    return [
        html.unescape(re.sub(r"<[^>]+>", "", s))
        for s in re.findall(r'<span class="lsrc">(.*?)</span></div>', m.group(1), re.DOTALL)
    ]


def test_render_writes_the_page_atomically(tmp_path, page):
    out = tmp_path / "sbs.html"
    sbs.render(out)
    assert out.read_text(encoding="utf-8") == page
    assert [p.name for p in tmp_path.iterdir()] == ["sbs.html"]  # no temp file left behind
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "gptmod side-by-side --out FILE.html" in page


def test_all_three_files_are_rendered_with_a_toc(page):
    for stem in STEMS:
        assert f'<h2 class="file" id="file-{stem}">{stem}.py</h2>' in page
        assert f'href="#file-{stem}"' in page
    starts = [page.index(f'id="file-{stem}"') for stem in STEMS]
    assert starts == sorted(starts)


def test_every_definition_has_a_row_and_a_toc_link(page, sources):
    rows = sections_of(page)
    for (side, file), source in sources.items():
        stem = file.removesuffix(".py")
        for name in top_level(source):
            anchor = sbs._anchor(file, name)
            assert anchor in rows, f"{side} {file}: {name} has no row"
            assert f'href="#{anchor}"' in page, f"{side} {file}: {name} is not in the contents"
        assert f"{stem}-module-header" in rows


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("file", sbs.FILES)
def test_every_source_line_is_rendered_exactly_once(page, sources, side, file):
    # Each line anchor carries the real line number; only blank lines of a gap between
    # definitions are left out (a group divider is its heading).
    stem = file.removesuffix(".py")
    counts = Counter(int(n) for n in re.findall(rf'id="{side}-{stem}-(\d+)"', page))
    lines = sources[side, file].splitlines()
    assert set(counts.values()) == {1}
    missing = set(range(1, len(lines) + 1)) - set(counts)
    assert all(not lines[n - 1].strip() for n in missing), sorted(missing)[:5]
    assert max(counts) == len(lines) or not lines[-1].strip()


def test_definitions_of_both_files_share_a_row(page, sources):
    rows = sections_of(page)
    for file in sbs.FILES:
        stem = file.removesuffix(".py")
        torch_defs = top_level(sources["torch", file])
        jax_defs = top_level(sources["jax", file])
        for name in torch_defs.keys() & jax_defs.keys():
            row = rows[sbs._anchor(file, name)]
            t, j = f'id="torch-{stem}-{torch_defs[name]}"', f'id="jax-{stem}-{jax_defs[name]}"'
            assert t in row and j in row, (file, name)
        for name in torch_defs.keys() ^ jax_defs.keys():
            row = rows[sbs._anchor(file, name)]
            only = "PyTorch only" if name in torch_defs else "JAX only"
            assert f"{only}: <code>{name}</code> has no counterpart" in row
            assert (f'id="torch-{stem}-' in row) == (name in torch_defs)
            assert (f'id="jax-{stem}-' in row) == (name in jax_defs)


def test_methods_pair_inside_classes(page, sources):
    rows = sections_of(page)
    for file, cls in (("model.py", "GPT"), ("model.py", "KVCache"), ("generate.py", "Session")):
        stem = file.removesuffix(".py")
        tm, jm = methods(sources["torch", file], cls), methods(sources["jax", file], cls)
        for name in tm.keys() & jm.keys() - {"__init__"}:
            row = rows[sbs._anchor(file, f"{cls}.{name}")]
            assert f'id="torch-{stem}-{tm[name]}"' in row and f'id="jax-{stem}-{jm[name]}"' in row
        # __init__ sits in the class's own row, with the class line
        header = rows[sbs._anchor(file, cls)]
        assert f'id="torch-{stem}-{tm["__init__"]}"' in header
        assert f'id="jax-{stem}-{jm["__init__"]}"' in header
    # torch's forward pairs with NNX's __call__
    row = rows["model-GPT-forward"]
    gpt_t, gpt_j = (
        methods(sources["torch", "model.py"], "GPT"),
        methods(sources["jax", "model.py"], "GPT"),
    )
    assert (
        f'id="torch-model-{gpt_t["forward"]}"' in row
        and f'id="jax-model-{gpt_j["__call__"]}"' in row
    )
    assert "def GPT.forward / __call__" in row
    assert 'href="#model-GPT-forward"' in page  # the contents link each method under its class
    # a method only one twin has gets a row of its own with a note
    assert "PyTorch only" in rows["generate-Session-_installed"]
    assert '<div class="note">' in rows["generate-Session-_installed"]


def test_pairing_order_and_one_sided_rows():
    torch_src = (
        '"""Doc."""\nimport a\n\n\ndef f(): pass\n\n\nclass K:\n    def __init__(self): pass\n\n'
        "    def forward(self): pass\n\n    def t(self): pass\n\n\ndef t_only(): pass\nX = 1\n"
    )
    jax_src = (
        '"""Doc."""\n\n\ndef f(): pass\n\n\ndef j_only(): pass\n\n\n# ----- cache\nclass K:\n'
        "    def __init__(self): pass\n\n    def __call__(self): pass\n"
    )
    torch_secs, jax_secs = sbs.split_sections(torch_src), sbs.split_sections(jax_src)
    # trailing `X = 1` goes with the last definition; a class's parts cover it exactly
    assert "".join(s.text for s in torch_secs) == torch_src
    k = next(s for s in torch_secs if s.name == "K")
    assert "".join(p.text for p in k.parts) == k.text
    pairs = sbs.pair_sections(torch_secs, jax_secs)
    assert [(p.name, p.torch is not None, p.jax is not None) for p in pairs] == [
        (sbs.HEADER, True, True),
        ("f", True, True),
        ("j_only", False, True),  # just before the next definition both files have
        ("K", True, True),
        ("K.forward", True, True),  # forward pairs with __call__
        ("K.t", True, False),
        ("t_only", True, False),
    ]
    assert [p.group for p in pairs][-4:] == ["cache"] * 4


def test_every_row_is_annotated_or_exempt(pairs):
    keys = {p.note_key for ps in pairs.values() for p in ps}
    assert set(sbs.NOTES) <= keys, f"notes for unknown rows: {set(sbs.NOTES) - keys}"
    assert set(sbs.NO_NOTE) <= keys, f"stale NO_NOTE entries: {set(sbs.NO_NOTE) - keys}"
    assert not set(sbs.NOTES) & set(sbs.NO_NOTE)
    # every definition row and every one-sided row (it says why); method rows may have notes
    needed = {
        p.note_key
        for ps in pairs.values()
        for p in ps
        if p.one_sided or (p.torch or p.jax).kind != "method"
    }
    missing = needed - set(sbs.NOTES) - set(sbs.NO_NOTE)
    assert not missing, f"write a note (or add to NO_NOTE) for: {sorted(missing)}"


def test_every_note_fragment_is_in_its_rows_code(pairs):
    assert sbs.note_problems(pairs) == []
    rows = {p.note_key: p for ps in pairs.values() for p in ps}
    for key, note in sbs.NOTES.items():
        p = rows[key]
        for side in SIDES:
            if getattr(p, side) is not None:
                assert getattr(note, side), f"note {key!r} declares no {side} fragment"
    assert sum(len(n.torch) + len(n.jax) for n in sbs.NOTES.values()) > 250


def test_a_false_fragment_is_caught(pairs, monkeypatch):
    note = sbs.Note("Claims a thing.", torch=("no such code here",), jax=("nnx.data(None)",))
    monkeypatch.setitem(sbs.NOTES, "model.py:Attention", note)
    monkeypatch.setitem(sbs.NOTES, "model.py:_to_numpy", sbs.Note("x.", jax=("anything",)))
    problems = sbs.note_problems(pairs)
    assert "model.py:Attention: torch code lacks 'no such code here'" in problems
    assert "model.py:_to_numpy: fragments for jax, which has no code in this row" in problems
    assert not any("nnx.data(None)" in p for p in problems)


def _modules() -> tuple[list[object], bool]:
    """The twin modules that import, and whether any did not."""
    out, failed = [], False
    for package in ("gptmod_torch", "gptmod_jax"):
        for stem in ("model", "generate", "train", "kernels"):
            # a module that does not import: its names are looked up in the source text only
            try:
                out.append(importlib.import_module(f"{package}.{stem}"))
            except ImportError:
                failed = True
    return out, failed


def _resolves(dotted: str, modules: list[object], text: str, fallback: bool) -> bool:
    """Whether `dotted` names an attribute path of an imported module or of a twin file's
    definition, or, for a plain name such as `kv_cache`, whether each part is a word of a twin
    file. `fallback`: some twin module did not import, so its names are looked up as words."""
    root, *rest = dotted.split(".")
    candidates = (
        [ALIASES[root]]
        if root in ALIASES
        else [
            obj
            for m in modules
            # a definition, not a module a twin file happens to import (`model`)
            if not isinstance(obj := getattr(m, root, None), types.ModuleType | type(None))
        ]
    )
    for obj in candidates:
        try:
            functools.reduce(getattr, rest, obj)
            return True
        except AttributeError:
            pass
    if candidates and not fallback:
        return False
    return all(re.search(rf"\b{re.escape(p)}\b", text) for p in dotted.split("."))


def test_identifiers_named_in_notes_exist(sources):
    modules, failed = _modules()
    text = "\n".join(sources.values())
    checked = 0
    for key, note in sbs.NOTES.items():
        for code in re.findall(r"`([^`]+)`", note.text):
            m = re.fullmatch(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(\(.*\))?", code)
            # a name or a call on one; other snippets (`x.chunk(2, dim=-1)` is a call) are prose
            if m:
                checked += 1
                ok = _resolves(m.group(1), modules, text, failed)
                assert ok, f"note {key!r}: `{code}` names nothing"
    assert checked > 150


def test_notes_are_short():
    for key, note in sbs.NOTES.items():
        prose = re.sub(r"`[^`]*`", "code", note.text)
        sentences = len(re.findall(r"[.!?](?:\s|$)", prose))
        assert 1 <= sentences <= 4, f"note {key!r} has {sentences} sentences"


def test_long_lines_wrap_with_marked_continuations(page, sources):
    rows = sections_of(page)
    longest = 0
    for row in rows.values():
        for side in SIDES:
            for text in code_lines(row, side):
                longest = max(longest, len(text))
    assert longest <= sbs.WRAP
    # some real lines are longer than WRAP, so continuations exist, each marked in the gutter
    assert any(len(x) > sbs.WRAP for src in sources.values() for x in src.splitlines())
    conts = re.findall(r'<div class="cl cont[^"]*"><span class="lno"[^>]*>&#8618;</span>', page)
    assert len(conts) > 50
    # and the CSS wraps whatever is still too wide for the window, without a sideways scrollbar
    assert ".cl .lsrc { white-space: pre-wrap; overflow-wrap: anywhere; }" in page
    assert "overflow-x" not in page


def test_wrap_keeps_the_text_and_breaks_after_spaces():
    text = "    x = " + " + ".join(f"term_{i}" for i in range(30))
    line = sbs.Line(7, text, [(Text, text)])
    rows = sbs.wrap(line, width=40)
    pieces = ["".join(t for _, t, _ in row) for row in rows]
    assert all(len(p) <= 40 for p in pieces) and len(pieces) > 3
    assert pieces[0] + "".join(p[8:] for p in pieces[1:]) == text  # continuation indent 4 + 4
    assert all(p.startswith(" " * 8) for p in pieces[1:])


def test_diff_marks_a_differing_line_and_leaves_an_identical_one(page, sources):
    rows = sections_of(page)
    row = rows["model-Block-forward"]
    # `def forward(...)` vs `def __call__(...)`: marked, with the differing tokens
    t_def = methods(sources["torch", "model.py"], "Block")["forward"]
    j_def = methods(sources["jax", "model.py"], "Block")["__call__"]
    assert re.search(rf'<div class="cl chg" id="torch-model-{t_def}"', row)
    assert re.search(rf'<div class="cl chg" id="jax-model-{j_def}"', row)
    t_line = re.search(rf'id="torch-model-{t_def}".*?</div>', row).group(0)
    assert "<mark>forward</mark>" in t_line and "<mark>torch</mark>" in t_line
    # the residual update is the same line in both: plain, no marks
    body = "x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), inputs)"
    for side, first in (("torch", t_def), ("jax", j_def)):
        n = first + 1
        assert sources[side, "model.py"].splitlines()[n - 1].strip() == body
        line = re.search(rf'<div class="cl" id="{side}-model-{n}".*?</div>', row)
        assert line and "<mark>" not in line.group(0)
    # identical sections are tagged, and carry no diff marks
    same = rows["model-resid_init_std"]
    assert "identical in both files" in same and "<mark>" not in same and "cl chg" not in same


def test_diff_lines_pairs_similar_lines_and_marks_the_rest_one_sided():
    def lines(*texts: str) -> list[sbs.Line]:
        return [sbs.Line(i + 1, t, [(Text, t)]) for i, t in enumerate(texts)]

    left, right = sbs.diff_lines(
        lines("a = 1", "y = torch.cat(x, dim=-1)", "only_torch()", ""),
        lines("a = 1", "y = jnp.concatenate(x, axis=-1)", ""),
    )
    assert [x.status for x in left] == ["", "chg", "only", ""]
    assert [x.status for x in right] == ["", "chg", ""]
    marked = {left[1].text[a:b] for a, b in left[1].changed}
    assert marked == {"torch", "cat", "dim"}


def test_colours_are_not_only_red_and_green(page):
    css = page[page.index("<style>") : page.index("</style>")]
    # lines carry a glyph as well as a colour, marked tokens are underlined, and print keeps them
    assert 'class="lmk">~</span>' in page and 'class="lmk">+</span>' in page
    assert "text-decoration: underline" in css and "print-color-adjust: exact" in css


def test_page_is_self_contained(page):
    lowered = page.lower()
    for needle in (
        "<script",
        "<link",
        "<img",
        "<iframe",
        " src=",
        "url(",
        "@import",
        "http://",
        "https://",
    ):
        assert needle not in lowered, needle
    assert "<style>" in page and ".code .k" in page  # the pygments stylesheet is embedded
