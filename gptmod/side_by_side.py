"""The twin files as one teaching page: PyTorch left, JAX right, definition by definition.

`model.py`, `generate.py` and `train.py` of gptmod_torch/ and gptmod_jax/ are read from the
installed sources at call time (`gptmod side-by-side --out FILE.html`), so the page cannot drift
from the code. Top-level definitions pair by name, and inside a class both twins have, methods pair
by name too (NNX's `__call__` is torch's `forward`). Within each pair a line diff (difflib) marks
the lines and tokens that differ. Long lines are wrapped at WRAP columns, each continuation marked.
Only the notes (gptmod/twin_notes.py) are written by hand; each names the code it relies on, and
tests check that code is in the row.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import html
import importlib.metadata
import importlib.util
import itertools
import os
import re
from pathlib import Path
from typing import Any

from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer
from pygments.token import STANDARD_TYPES

from gptmod import fileio
from gptmod.twin_notes import HEADER, NO_NOTE, NOTES, Note

__all__ = ["FILES", "HEADER", "NOTES", "NO_NOTE", "Note", "render", "render_html"]

FILES = ("model.py", "generate.py", "train.py")
PACKAGES = {"torch": "gptmod_torch", "jax": "gptmod_jax"}
TITLES = {"torch": "PyTorch", "jax": "JAX / Flax NNX"}
# A method pairs with its twin of the same name; NNX calls a module through `__call__`, torch
# through `forward`.
METHOD_ALIASES = {"__call__": "forward"}
WRAP = 84  # columns of a code line; two columns of 84 fit side by side from 1280 px at 11 px
_DIVIDER = re.compile(r"^# -{5,}\s*(\S.*)$")  # "# ------- norms" starts a group
Token = tuple[Any, str]  # a pygments token type and its text


@dataclasses.dataclass(frozen=True)
class Section:
    """One definition (a top-level class or function, or one method of a class) with the lines
    above it that belong to no other definition; lines are 1-based and inclusive."""

    name: str  # "GPT", "GPT.forward", or HEADER
    kind: str  # "class", "def", "method" or "" (the module header)
    first: int
    start: int  # line of the definition itself (first decorator), after the leading gap
    last: int
    text: str
    parts: tuple[Section, ...] = ()  # a class: its header (up to `__init__`) and each method

    @property
    def key(self) -> str:
        """What the twin's section must be called to share a row."""
        owner, _, method = self.name.rpartition(".")
        return f"{owner}.{METHOD_ALIASES.get(method, method)}" if owner else self.name


@dataclasses.dataclass(frozen=True)
class Pair:
    name: str  # the torch name if there is one: the key of NOTES (with the file)
    torch: Section | None
    jax: Section | None
    group: str  # the divider comment ("norms", "rope", ...) the pair sits under
    file: str = "model.py"

    @property
    def note_key(self) -> str:
        return f"{self.file}:{self.name}"

    @property
    def one_sided(self) -> bool:
        return self.torch is None or self.jax is None


def _lines(source: str) -> list[str]:
    """Lines as ast counts them: str.splitlines would also split at form
    feeds and other separators."""
    return re.findall(r"[^\n]*\n|[^\n]+\Z", source)


def module_path(module: str) -> Path:
    """Where a `package.module` source file is, installed or not. The
    package's spec is searched rather than find_spec(module), which would
    import the package and with it torch or jax (seconds)."""
    package, _, name = module.rpartition(".")
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (path := Path(folder) / f"{name}.py").is_file():
            return path
    raise FileNotFoundError(f"cannot locate the source of {module}")


def source_path(side: str, file: str) -> Path:
    return module_path(f"{PACKAGES[side]}.{file.removesuffix('.py')}")


def _start(node: ast.stmt) -> int:
    return min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])


_DEFS = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _class_parts(node: ast.ClassDef, sec: Section, lines: list[str]) -> tuple[Section, ...]:
    """The class header (docstring, attributes, `__init__`) and one part per other method; the
    statements after a method go with it."""
    body = node.body
    methods = [
        i
        for i, n in enumerate(body)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name != "__init__"
    ]
    if not methods:
        return ()
    ends = [body[i - 1].end_lineno if i > 0 else node.lineno for i in methods]
    parts = [Section(node.name, "class", sec.first, sec.start, ends[0], "")]
    for j, i in enumerate(methods):
        last = ends[j + 1] if j + 1 < len(methods) else sec.last
        name = f"{node.name}.{body[i].name}"
        parts.append(Section(name, "method", parts[-1].last + 1, _start(body[i]), last, ""))
    return tuple(dataclasses.replace(p, text="".join(lines[p.first - 1 : p.last])) for p in parts)


def split_sections(source: str) -> list[Section]:
    """Cut a module into the header (everything before the first definition) and one section per
    top-level class or function; the lines between two definitions go with the one below. Every line
    lands in exactly one section; a class also holds its parts (header and methods)."""
    lines = _lines(source)
    defs = [n for n in ast.parse(source).body if isinstance(n, _DEFS)]
    starts = [_start(n) for n in defs]
    sections = [Section(HEADER, "", 1, 1, starts[0] - 1 if defs else len(lines), "")]
    for i, (node, start) in enumerate(zip(defs, starts, strict=True)):
        # trailing statements go with the last one
        last = len(lines) if i == len(defs) - 1 else node.end_lineno
        kind = "class" if isinstance(node, ast.ClassDef) else "def"
        sections.append(Section(node.name, kind, sections[-1].last + 1, start, last, ""))
    sections = [dataclasses.replace(s, text="".join(lines[s.first - 1 : s.last])) for s in sections]
    for i, node in enumerate(defs, start=1):
        if isinstance(node, ast.ClassDef):
            sections[i] = dataclasses.replace(
                sections[i], parts=_class_parts(node, sections[i], lines)
            )
    names = [s.name for s in sections]
    if len(set(names)) != len(names):
        raise ValueError(
            f"a top-level name is defined twice: {sorted(n for n in names if names.count(n) > 1)}"
        )
    return sections


def _pair_by_key(
    torch_secs: list[Section], jax_secs: list[Section]
) -> list[tuple[Section | None, Section | None]]:
    """Pair by key in torch order; a JAX-only section goes just before the next one both have."""
    jax_by_key = {s.key: s for s in jax_secs}
    torch_keys = {s.key for s in torch_secs}
    before: dict[str, list[Section]] = {}
    pending: list[Section] = []
    for s in jax_secs:
        if s.key in torch_keys:
            before[s.key], pending = pending, []
        else:
            pending.append(s)
    rows: list[tuple[Section | None, Section | None]] = []
    for s in torch_secs:
        rows += [(None, j) for j in before.get(s.key, [])]
        rows.append((s, jax_by_key.get(s.key)))
    return rows + [(None, j) for j in pending]


def _group_of(sec: Section | None) -> str | None:
    if sec is None:
        return None
    found = [m.group(1) for line in _lines(sec.text) if (m := _DIVIDER.match(line))]
    return found[-1].strip() if found else None


def pair_sections(
    torch_secs: list[Section], jax_secs: list[Section], file: str = "model.py"
) -> list[Pair]:
    """Rows of one file: definitions paired by name, and within a class both twins have, its
    header and methods paired by name; a one-sided class stays one row."""
    pairs, group = [], "module"
    for t, j in _pair_by_key(torch_secs, jax_secs):
        group = _group_of(t) or _group_of(j) or group
        if t is not None and j is not None and t.parts and j.parts:
            for pt, pj in _pair_by_key(list(t.parts), list(j.parts)):
                pairs.append(Pair((pt or pj).name, pt, pj, group, file))
        elif t is not None and j is not None and (t.parts or j.parts):
            # one twin's class has methods, the other's none: header against the whole class
            whole = [dataclasses.replace(s, parts=()) for s in (t, j)]
            pairs.append(Pair(t.name, whole[0], whole[1], group, file))
        else:
            pairs.append(Pair((t or j).name, t, j, group, file))
    return pairs


def build_file(file: str) -> tuple[list[Pair], dict[str, str]]:
    """The pairs of one twin file, and each side's source, with the line coverage checked."""
    sources = {side: source_path(side, file).read_text(encoding="utf-8") for side in PACKAGES}
    pairs = pair_sections(split_sections(sources["torch"]), split_sections(sources["jax"]), file)
    for side, source in sources.items():
        # in file order: pairing follows torch's order, which the JAX file need not share
        secs = sorted(
            (s for p in pairs if (s := getattr(p, side)) is not None), key=lambda s: s.first
        )
        covered = [n for s in secs for n in range(s.first, s.last + 1)]
        # Raised, not `assert`ed, so that python -O cannot turn the check off.
        if (
            covered != list(range(1, len(_lines(source)) + 1))
            or "".join(s.text for s in secs) != source
        ):
            raise AssertionError(
                f"{side} {file}: the rendered sections do not show each source line exactly once"
            )
    return pairs, sources


def build_pairs() -> dict[str, list[Pair]]:
    """The pairs of every twin file, in FILES order."""
    return {file: build_file(file)[0] for file in FILES}


def note_problems(pairs: dict[str, list[Pair]] | None = None) -> list[str]:
    """Each note's fragments that its row's code on that side does not contain, notes for rows
    that do not exist, and fragments for a side the row does not have."""
    pairs = build_pairs() if pairs is None else pairs
    rows = {p.note_key: p for ps in pairs.values() for p in ps}
    problems = [f"{key}: no such row" for key in NOTES if key not in rows]
    for key, note in NOTES.items():
        if (p := rows.get(key)) is None:
            continue
        for side, fragments in (("torch", note.torch), ("jax", note.jax)):
            sec = getattr(p, side)
            if sec is None and fragments:
                problems.append(f"{key}: fragments for {side}, which has no code in this row")
            problems += [
                f"{key}: {side} code lacks {fragment!r}"
                for fragment in fragments
                if sec is not None and fragment not in sec.text
            ]
    return problems


# ----------------------------------------------------------------------------- rendering


@dataclasses.dataclass(frozen=True)
class Line:
    """One source line as shown: its number, its text, and how it compares with the twin."""

    number: int
    text: str
    tokens: list[Token]
    status: str = ""  # "" (the twin has it too), "chg" (differs) or "only" (no counterpart)
    changed: tuple[tuple[int, int], ...] = ()  # character spans that differ from the twin's line


def _lexed_lines(source: str) -> list[list[Token]]:
    """The file's tokens line by line (lexed whole, so a docstring's lines stay strings)."""
    out: list[list[Token]] = [[]]
    for ttype, value in PythonLexer(stripnl=False, ensurenl=True).get_tokens(source):
        for i, piece in enumerate(value.split("\n")):
            if i:
                out.append([])
            if piece:
                out[-1].append((ttype, piece))
    return out


def shown_lines(sec: Section, lexed: list[list[Token]]) -> list[Line]:
    """The lines of a section that its cell shows: the blank lines and group dividers of the leading
    gap are left out (a divider is the group heading instead)."""
    out = []
    for offset, raw in enumerate(_lines(sec.text)):
        number, text = sec.first + offset, raw.rstrip("\n")
        if number < sec.start and (not text.strip() or _DIVIDER.match(text)):
            continue
        out.append(Line(number, text, lexed[number - 1]))
    return out


_WORD = re.compile(r"\w+|\s+|[^\w\s]")


def _token_spans(a: str, b: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The character spans of `a` and of `b` whose tokens differ (words, spaces, punctuation)."""
    ta, tb = _WORD.findall(a), _WORD.findall(b)
    pa = [0, *itertools.accumulate(len(t) for t in ta)]
    pb = [0, *itertools.accumulate(len(t) for t in tb)]

    def span(text: str, lo: int, hi: int) -> list[tuple[int, int]]:
        # the spaces at either end are not marked: they would underline blank indentation
        piece = text[lo:hi]
        if not piece.strip():
            return []
        start = lo + len(piece) - len(piece.lstrip())
        return [(start, start + len(piece.strip()))]

    sa, sb = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ta, tb, autojunk=False).get_opcodes():
        if op != "equal":
            sa += span(a, pa[i1], pa[i2])
            sb += span(b, pb[j1], pb[j2])
    return sa, sb


def _similar_pairs(a: list[str], b: list[str]) -> list[tuple[int, int]]:
    """Lines of two unequal blocks that are versions of each other, in order: each line of `a`
    takes the most similar later line of `b` if they are at least half alike."""
    pairs, j0 = [], 0
    for i, x in enumerate(a):
        scores = [
            (difflib.SequenceMatcher(None, x, y).ratio(), j) for j, y in enumerate(b) if j >= j0
        ]
        best = max(scores, default=(0.0, -1))
        if best[0] >= 0.5:
            pairs.append((i, best[1]))
            j0 = best[1] + 1
    return pairs


def diff_lines(left: list[Line], right: list[Line]) -> tuple[list[Line], list[Line]]:
    """Mark the lines of two twins' sections against each other: in a block that differs, a line
    with a similar line opposite becomes "chg", with its differing tokens, and the others "only".
    Blank lines are never marked."""
    a, b = [x.text.strip() for x in left], [x.text.strip() for x in right]
    left, right = list(left), list(right)
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        for i in range(i1, i2):
            left[i] = dataclasses.replace(left[i], status="only")
        for j in range(j1, j2):
            right[j] = dataclasses.replace(right[j], status="only")
        for i, j in _similar_pairs(a[i1:i2], b[j1:j2]):
            sa, sb = _token_spans(left[i1 + i].text, right[j1 + j].text)
            left[i1 + i] = dataclasses.replace(left[i1 + i], status="chg", changed=tuple(sa))
            right[j1 + j] = dataclasses.replace(right[j1 + j], status="chg", changed=tuple(sb))
    blank = {"status": "", "changed": ()}
    return (
        [dataclasses.replace(x, **blank) if not x.text.strip() else x for x in left],
        [dataclasses.replace(x, **blank) if not x.text.strip() else x for x in right],
    )


def _css_class(ttype: Any) -> str:
    while ttype not in STANDARD_TYPES:
        ttype = ttype.parent
    return STANDARD_TYPES[ttype]


def _pieces(line: Line) -> list[tuple[str, str, bool]]:
    """(css class, text, differs) runs of a line, cut where a changed span starts or ends."""
    cuts = sorted({0, len(line.text), *(c for span in line.changed for c in span)})
    out, pos = [], 0
    for ttype, value in line.tokens:
        end = pos + len(value)
        bounds = [pos, *(c for c in cuts if pos < c < end), end]
        for lo, hi in itertools.pairwise(bounds):
            differs = any(s <= lo and hi <= e for s, e in line.changed)
            out.append((_css_class(ttype), line.text[lo:hi], differs))
        pos = end
    return out


def wrap(line: Line, width: int = WRAP) -> list[list[tuple[str, str, bool]]]:
    """The line as visual rows of at most `width` characters, broken after a space where one is
    near the end; each continuation starts with the line's indentation plus four spaces."""
    pieces = _pieces(line)
    text = line.text
    if len(text) <= width:
        return [pieces]
    indent = min(len(text) - len(text.lstrip(" ")) + 4, width // 2)
    breaks, pos, room = [], 0, width
    while len(text) - pos > room:
        cut = text.rfind(" ", pos + room // 2, pos + room)
        cut = pos + room if cut < 0 else cut + 1
        breaks.append(cut)
        pos, room = cut, width - indent
    bounds = [0, *breaks, len(text)]
    rows, offset, i = [], 0, 0
    for lo, hi in itertools.pairwise(bounds):
        row = [("", " " * indent, False)] if lo else []
        while offset < hi:
            cls, value, differs = pieces[i]
            take = value[max(lo, offset) - offset : hi - offset]
            row.append((cls, take, differs))
            if offset + len(value) <= hi:
                offset, i = offset + len(value), i + 1
            else:
                pieces[i] = (cls, value[hi - offset :], differs)
                offset = hi
        rows.append(row)
    return rows


_MARKS = {"": "", "chg": "~", "only": "+"}
_MARK_TITLES = {"chg": "differs from the twin's line", "only": "no counterpart in the twin"}


def _run_html(cls: str, text: str, differs: bool) -> str:
    inner = f"<mark>{html.escape(text)}</mark>" if differs else html.escape(text)
    return f'<span class="{cls}">{inner}</span>' if cls else inner


def _line_html(line: Line, side: str, stem: str) -> str:
    """A source line as one row per wrapped piece: number (or the continuation arrow), the
    diff mark, the code."""
    status = f" {line.status}" if line.status else ""
    title = f' title="{_MARK_TITLES[line.status]}"' if line.status else ""
    out = []
    for n, row in enumerate(wrap(line)):
        code = "".join(_run_html(*run) for run in row)
        if n == 0:
            out.append(
                f'<div class="cl{status}" id="{side}-{stem}-{line.number}"{title}>'
                f'<span class="lno">{line.number}</span>'
                f'<span class="lmk">{_MARKS[line.status]}</span>'
                f'<span class="lsrc">{code}</span></div>'
            )
        else:
            out.append(
                f'<div class="cl cont{status}"><span class="lno" title="continued">&#8618;</span>'
                f'<span class="lmk"></span><span class="lsrc">{code}</span></div>'
            )
    return "".join(out)


def _cell(side: str, file: str, sec: Section | None, lines: list[Line], pair: Pair) -> str:
    path = f"{PACKAGES[side]}/{file}"
    if sec is None:
        only = "JAX" if side == "torch" else "PyTorch"
        text = f"{only} only: <code>{html.escape(pair.name)}</code> has no counterpart in {path}."
        return (
            f'<div class="col empty"><div class="colhead">{TITLES[side]}</div><p>{text}</p></div>'
        )
    stem = file.removesuffix(".py")
    first = lines[0].number if lines else sec.start
    head = f"{TITLES[side]} · {path} · lines {first}–{sec.last}"
    code = "".join(_line_html(x, side, stem) for x in lines)
    return (
        f'<div class="col {side}"><div class="colhead">{head}</div>'
        f'<div class="code">{code}</div></div>'
    )


def _note_html(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def _anchor(file: str, name: str) -> str:
    return f"{file.removesuffix('.py')}-" + re.sub(r"[^\w-]", "-", name)


def _label(p: Pair) -> str:
    if p.name == HEADER:
        return HEADER
    t, j = p.torch, p.jax
    if t and j and t.name != j.name:
        return f"{(t.kind if t.kind != 'method' else 'def')} {t.name} / {j.name.rpartition('.')[2]}"
    sec = t or j
    return f"{'def' if sec.kind == 'method' else sec.kind} {sec.name}"


_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 0 16px 48px; color: #1d1d1f; \
background: #fff; }
header { max-width: 1100px; } h1 { margin: 24px 0 8px; }
code { font-size: 0.92em; background: #f0f0f3; padding: 0 3px; }
nav .toc { display: grid; grid-template-columns: repeat(3, minmax(0, 1fr)); gap: 4px 24px; \
font-size: 14px; }
nav .toc .file > b { font: 600 15px ui-monospace, monospace; }
nav .toc i { display: block; font-style: normal; text-transform: uppercase; font-size: 12px; \
color: #555; margin-top: 6px; }
nav ul { margin: 2px 0; padding-left: 18px; columns: 2; } nav li { break-inside: avoid; }
nav a.meth { font: 11px ui-monospace, monospace; margin-left: 2px; }
h2.file { font: 700 22px ui-monospace, monospace; margin: 56px 0 4px; padding: 6px 10px; \
background: #1d1d1f; color: #fff; border-radius: 4px; }
h3.group { border-bottom: 2px solid #bbb; margin: 32px 0 8px; font-size: 17px; \
text-transform: uppercase; }
h3.group .lines { font: 400 12px system-ui, sans-serif; color: #666; text-transform: none; \
margin-left: 10px; }
section.pair { margin: 18px 0 26px; }
section.pair h4 { margin: 0 0 6px; font: 700 16px ui-monospace, monospace; }
section.pair.method { margin-left: 28px; } section.pair.method h4 { font-size: 14px; }
.tag { font: 600 12px system-ui, sans-serif; padding: 2px 8px; border-radius: 10px; \
margin-left: 8px; border: 1px solid #999; }
.tag.only { background: #dbe8ff; } .tag.same { background: #eee; }
.note { background: #f3f6fb; border-left: 4px solid #4a6fa5; padding: 6px 14px; \
margin-bottom: 8px; }
.note p { margin: 0; max-width: 1250px; } nav .only { color: #35568c; font-size: 12px; }
.cols { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 10px; \
align-items: start; }
.col { border: 1px solid #ccc; border-radius: 4px; min-width: 0; }
.colhead { font-size: 12px; padding: 3px 8px; background: #f4f4f6; border-bottom: 1px solid #ccc; \
color: #444; }
.col.empty { background: repeating-linear-gradient(45deg, #fafafa, #fafafa 8px, #f0f0f0 8px, \
#f0f0f0 16px); }
.col.empty p { margin: 12px; color: #555; }
.code { padding: 4px 0; font: 11px/1.45 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, \
monospace; }
.cl { display: grid; grid-template-columns: 4.5ch 1.5ch minmax(0, 1fr); }
.cl .lno { color: #888; text-align: right; padding-right: 4px; user-select: none; }
.cl .lmk { font-weight: 700; color: #7a4b00; user-select: none; text-align: center; }
.cl .lsrc { white-space: pre-wrap; overflow-wrap: anywhere; }
.cl.cont .lno { color: #b06a00; }
.cl.cont .lsrc { box-shadow: inset 2px 0 0 #d9a441; }
.cl.chg { background: #fff3d6; }
.cl.only { background: #e4eeff; } .cl.only .lmk { color: #24508f; }
.cl mark { background: #ffd27a; color: inherit; text-decoration: underline 1px; \
text-underline-offset: 2px; }
.legend .key { padding: 1px 6px; font: 12px ui-monospace, monospace; }
.legend .key.chg { background: #fff3d6; } .legend .key.only { background: #e4eeff; }
.legend mark { background: #ffd27a; text-decoration: underline 1px; text-underline-offset: 2px; }
@media (min-width: 1400px) { .code { font-size: 12px; } }
@media (max-width: 1240px) { .code { font-size: 10px; } }
@media print { * { -webkit-print-color-adjust: exact; print-color-adjust: exact; } \
section.pair { break-inside: avoid-page; } }
"""


def _file_html(file: str) -> tuple[str, str]:
    """One file's section of the page and its table-of-contents entry."""
    pairs, sources = build_file(file)
    lexed = {side: _lexed_lines(src) for side, src in sources.items()}
    stem = file.removesuffix(".py")
    body: list[str | int] = [f'<h2 class="file" id="file-{stem}">{file}</h2>']
    toc: list[tuple[str, list[str]]] = []
    grouped = len({p.group for p in pairs}) > 1  # a file without dividers gets no group headings
    headings: list[list[str]] = []  # per group: its name, then the anchors of its dividers
    for p in pairs:
        if not toc or toc[-1][0] != p.group:
            toc.append((p.group, []))
            headings.append([p.group])
            body.append(len(headings) - 1)  # a placeholder: the heading gathers its dividers
        # a divider may sit above a later row of its group (a one-sided one, say)
        headings[-1] += [
            f'<span id="{side}-{stem}-{n}">{TITLES[side]} line {n}</span>'
            for side in PACKAGES
            if (sec := getattr(p, side)) is not None
            for n in range(sec.first, sec.start)
            if _DIVIDER.match(_lines(sec.text)[n - sec.first])
        ]
        shown = {s: shown_lines(sec, lexed[s]) if (sec := getattr(p, s)) else [] for s in PACKAGES}
        shown["torch"], shown["jax"] = diff_lines(shown["torch"], shown["jax"])
        tag = ""
        if p.one_sided:
            tag = f'<span class="tag only">{"JAX" if p.torch is None else "PyTorch"} only</span>'
        elif not any(x.status for s in PACKAGES for x in shown[s]):
            tag = '<span class="tag same">identical in both files</span>'
        note = NOTES.get(p.note_key)
        note_html = f'<div class="note"><p>{_note_html(note.text)}</p></div>' if note else ""
        cells = "".join(_cell(s, file, getattr(p, s), shown[s], p) for s in PACKAGES)
        kind = " method" if (p.torch or p.jax).kind == "method" else ""
        anchor = _anchor(file, p.name)
        body.append(
            f'<section class="pair{kind}" id="{anchor}"><h4>{html.escape(_label(p))}{tag}</h4>'
            f'{note_html}<div class="cols">{cells}</div></section>'
        )
        only = ""
        if p.one_sided:
            only = f' <span class="only">{"JAX" if p.torch is None else "PyTorch"} only</span>'
        if not kind:
            toc[-1][1].append(f'<li><a href="#{anchor}">{html.escape(p.name)}</a>{only}')
        else:  # a method: a small link under its class
            method = html.escape(p.name.rpartition(".")[2])
            side = "" if not p.one_sided else " (JAX)" if p.torch is None else " (torch)"
            toc[-1][1][-1] += f' <a class="meth" href="#{anchor}">.{method}{side}</a>'
    parts = []
    for item in body:
        if isinstance(item, str):
            parts.append(item)
            continue
        group, *lines = headings[item]
        where = f'<span class="lines">{", ".join(lines)}</span>' if lines else ""
        # without dividers the file has one group and no heading; its line anchors stay
        parts.append(f'<h3 class="group">{html.escape(group)}{where}</h3>' if grouped else where)
    groups = "".join(
        (f"<i>{html.escape(g)}</i>" if grouped else "")
        + f"<ul>{''.join(link + '</li>' for link in links)}</ul>"
        for g, links in toc
    )
    entry = (
        f'<div class="file"><b><a href="#file-{file.removesuffix(".py")}">{file}</a></b>'
        f"{groups}</div>"
    )
    return "".join(parts), entry


def render_html() -> str:
    """The whole page as one self-contained HTML string (inline CSS, no
    scripts or external resources)."""
    try:
        version = importlib.metadata.version("gptmod")
    except importlib.metadata.PackageNotFoundError:
        version = "dev"
    style = HtmlFormatter(style="default").get_style_defs(".code")
    files = [_file_html(file) for file in FILES]
    names = ", ".join(f"<code>{f}</code>" for f in FILES)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gptmod: the PyTorch and JAX twins side by \
side</title>
<style>{_CSS}{style}</style></head><body>
<header><h1>gptmod: the PyTorch and JAX twins side by side</h1>
<p>The model, its generation and its training are written twice, as twins with the same names \
and order:
{names} of <code>gptmod_torch/</code> (left) and <code>gptmod_jax/</code> (right). Each row \
pairs one top-level function, or one part of a class (its header with <code>__init__</code>, \
then each method: torch's <code>forward</code> is NNX's <code>__call__</code>), with its twin; \
a note above a row explains the framework difference in it, and a row with one side empty says \
why that twin needs no such code.</p>
<p class="legend">Line numbers are those of the real files. Within a pair, \
<span class="key chg">~ a shaded line</span> differs from the twin's, with the differing tokens \
<span class="key chg"><mark>marked</mark></span>; \
<span class="key only">+ a blue line</span> has no counterpart; unmarked lines are the same \
in both. A line longer than {WRAP} columns is wrapped, its continuation numbered &#8618;.</p>
<p>Generated from the code by <code>gptmod side-by-side --out FILE.html</code> (gptmod \
{html.escape(version)});
only the notes are written by hand.</p></header>
<nav><h2>Contents</h2><div class="toc">{"".join(e for _, e in files)}</div></nav>
<main>{"".join(b for b, _ in files)}</main></body></html>
"""


def render(out: str | os.PathLike[str]) -> None:
    """Write the page to `out` atomically (gptmod.fileio)."""
    page = render_html()
    fileio.atomic_write_text(out, page)
