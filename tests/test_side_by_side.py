"""The side-by-side teaching page: complete, correctly paired,
self-contained, and its notes name real things."""

from __future__ import annotations

import ast
import functools
import math
import re
from collections import Counter

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

import gptmod_jax.model
import gptmod_torch.model
from gptmod import side_by_side as sbs

SIDES = {"torch": gptmod_torch.model, "jax": gptmod_jax.model}
# The short names the notes use, as the model files import them.
ALIASES = {
    "torch": torch,
    "F": F,
    "nn": nn,
    "jax": jax,
    "jnp": jnp,
    "nnx": nnx,
    "np": np,
    "ml_dtypes": ml_dtypes,
}
ALIASES["math"] = math


@pytest.fixture(scope="module")
def page() -> str:
    return sbs.render_html()


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return {side: sbs.module_path(sbs.MODULES[side]).read_text(encoding="utf-8") for side in SIDES}


def top_level(source: str) -> dict[str, int]:
    """Top-level class and function names -> line of the `class`/`def` keyword."""
    kinds = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
    return {n.name: n.lineno for n in ast.parse(source).body if isinstance(n, kinds)}


def sections_of(page: str) -> dict[str, str]:
    return dict(
        re.findall(r'<section class="pair" id="pair-([^"]+)">(.*?)</section>', page, re.DOTALL)
    )


def test_render_writes_the_page_atomically(tmp_path, page):
    out = tmp_path / "sbs.html"
    sbs.render(out)
    assert out.read_text(encoding="utf-8") == page
    assert [p.name for p in tmp_path.iterdir()] == ["sbs.html"]  # no temp file left behind
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "gptmod side-by-side --out FILE.html" in page


def test_every_definition_has_a_row_and_a_toc_link(page, sources):
    rows = sections_of(page)
    for side, source in sources.items():
        for name in top_level(source):
            assert name in rows, f"{side}: {name} has no row"
            assert f'href="#pair-{name}"' in page, f"{side}: {name} is not in the table of contents"
    assert next(iter(rows)) == "module-header"


@pytest.mark.parametrize("side", SIDES)
def test_every_source_line_is_rendered_exactly_once(page, sources, side):
    # pygments' line anchors carry the real line numbers: each must appear once, and no other.
    counts = Counter(int(n) for n in re.findall(rf'<a id="{side}-(\d+)"', page))
    n_lines = len(sources[side].splitlines())
    assert sorted(counts) == list(range(1, n_lines + 1))
    assert set(counts.values()) == {1}


def test_definitions_of_both_files_share_a_row(page, sources):
    rows = sections_of(page)
    torch_defs, jax_defs = top_level(sources["torch"]), top_level(sources["jax"])
    assert {"KVCache", "GPT", "attention"} <= torch_defs.keys() & jax_defs.keys()
    for name in torch_defs.keys() & jax_defs.keys():
        row = rows[name]
        assert f'id="torch-{torch_defs[name]}"' in row and f'id="jax-{jax_defs[name]}"' in row, name
    for name in torch_defs.keys() ^ jax_defs.keys():
        only = "PyTorch only" if name in torch_defs else "JAX only"
        assert f"{only}: <code>{name}</code> has no counterpart" in rows[name]
        assert ('id="torch-' in rows[name]) == (name in torch_defs) and (
            'id="jax-' in rows[name]
        ) == (name in jax_defs)


def test_pairing_order_and_one_sided_rows():
    torch_src = (
        '"""Doc."""\nimport a\n\n\ndef f(): pass\n\n\nclass K: '
        "pass\n\n\ndef t_only(): pass\nX = 1\n"
    )
    jax_src = (
        '"""Doc."""\n\n\ndef f(): pass\n\n\ndef j_only(): pass\n\n\n# ----- cache\nclass K: pass\n'
    )
    torch_secs, jax_secs = sbs.split_sections(torch_src), sbs.split_sections(jax_src)
    # trailing `X = 1` goes with the last definition
    assert "".join(s.text for s in torch_secs) == torch_src
    pairs = sbs.pair_sections(torch_secs, jax_secs)
    assert [(p.name, p.torch is not None, p.jax is not None) for p in pairs] == [
        (sbs.HEADER, True, True),
        ("f", True, True),
        ("j_only", False, True),  # just before the next definition both files have
        ("K", True, True),
        ("t_only", True, False),
    ]
    assert [p.group for p in pairs][-2:] == ["cache", "cache"]


def test_note_keys_are_definitions_and_every_row_is_annotated_or_exempt(sources):
    names = {sbs.HEADER} | {n for src in sources.values() for n in top_level(src)}
    assert set(sbs.NOTES) <= names, f"notes for unknown definitions: {set(sbs.NOTES) - names}"
    assert set(sbs.NO_NOTE) <= names, f"stale NO_NOTE entries: {set(sbs.NO_NOTE) - names}"
    assert not set(sbs.NOTES) & set(sbs.NO_NOTE)
    missing = names - set(sbs.NOTES) - set(sbs.NO_NOTE)
    assert not missing, f"write a note (or add to NO_NOTE) for: {sorted(missing)}"


def _resolves(dotted: str, sources: dict[str, str]) -> bool:
    root, *rest = dotted.split(".")
    # an imported module such as `jnp`, or a definition of a model file such as
    # `GPT.reset_parameters`
    candidates = (
        [ALIASES[root]]
        if root in ALIASES
        else [getattr(m, root) for m in SIDES.values() if hasattr(m, root)]
    )
    # e.g. `kv_cache`, `model.to(dtype)`: every part must be a word of a model file
    if not candidates:
        return all(
            any(re.search(rf"\b{re.escape(p)}\b", s) for s in sources.values())
            for p in dotted.split(".")
        )
    for obj in candidates:
        try:
            functools.reduce(getattr, rest, obj)
            return True
        except AttributeError:
            pass
    return False


def test_identifiers_named_in_notes_exist(sources):
    checked = 0
    for key, note in sbs.NOTES.items():
        for code in re.findall(r"`([^`]+)`", note):
            m = re.fullmatch(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(\(.*\))?", code)
            # a name or a call on one; other snippets (`x.chunk(2, dim=-1)` is a call) are prose
            if m:
                checked += 1
                assert _resolves(m.group(1), sources), f"note {key!r}: `{code}` names nothing real"
    assert checked > 50


def test_notes_are_short():
    for key, note in sbs.NOTES.items():
        prose = re.sub(r"`[^`]*`", "code", note)
        sentences = len(re.findall(r"[.!?](?:\s|$)", prose))
        assert 1 <= sentences <= 4, f"note {key!r} has {sentences} sentences"


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
