"""The twin model files as one teaching page: PyTorch left, JAX right, definition by definition.

Generated from the installed sources at call time (`gptmod side-by-side
--out FILE.html`), so the page cannot drift from the code; only the notes
below are written by hand, and tests check their identifiers.
"""

from __future__ import annotations

import ast
import dataclasses
import html
import importlib.metadata
import importlib.util
import os
import re
import tempfile
from pathlib import Path

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

HEADER = "module header"
MODULES = {"torch": "gptmod_torch.model", "jax": "gptmod_jax.model"}
TITLES = {"torch": "PyTorch", "jax": "JAX / Flax NNX"}
_DIVIDER = re.compile(r"^# -{5,}\s*(\S.*)$", re.MULTILINE)  # "# ------- norms" starts a group

# Hand-written notes, keyed by definition name; `code` in backticks becomes <code>.
NOTES: dict[str, str] = {
    HEADER: "torch brings its own module system (`nn`), functional ops (`F`) and the SDPA backend "
    "switch (`sdpa_kernel`, `SDPBackend`; the torch file maps backend names to them in "
    "`_PINNED`). JAX itself has only immutable arrays (`jnp`) and function transformations; "
    "`from flax import nnx` supplies what `torch.nn` does: `nnx.Module`, `nnx.Param`, "
    "`nnx.Rngs`. Only torch imports `ml_dtypes`, because NumPy has no bfloat16 "
    "and torch tensors cannot hand theirs over directly (see `_to_numpy`).",
    "compute_dtype": "The same rule in both: promote the activation dtype to at least fp32 "
    "(`torch.promote_types` vs `jnp.promote_types`). The torch twin also runs as a float64 "
    "reference; JAX creates float64 arrays only with x64 mode enabled, so by default the "
    "JAX twin computes in fp32.",
    "resid_init_std": "Identical: GPT-2 scales the init of the projections that write into the "
    "residual "
    "stream (`wo`, `w_down`) by 1/sqrt(2 n_layer), so the stream's variance does not grow "
    "with depth.",
    "Linear": "Both twins write their own linear layer with torch's names and (out, in) layout, so "
    "canonical state needs no transposes (`nnx.Linear` keeps an (in, out) `kernel`). Each "
    "draws its weight from N(0, std²) as it is built: torch from the global RNG "
    "(`torch.empty(...).normal_`), JAX from the `rngs` it is given (`rngs.params()`), in the "
    "`dtype` it is given. `F.linear(x, w, b)` is `x @ w.T + b` written out in JAX; "
    "`kernels.py` swaps in faster products for CPU decode.",
    "Embedding": "The token table, `weight` (V, D), in both; `nnx.Embed` would call it "
    "`embedding`. "
    "`F.embedding` vs `jnp.take(..., axis=0)`, which gathers NaN for an id past the table "
    "under jit. `attend` is the tied unembedding, x @ table^T.",
    "LayerNorm": "torch registers a parameter by assigning an `nn.Parameter`; NNX wraps the array "
    "in an `nnx.Param` and reads it back with `self.weight[...]`. The JAX twin creates "
    "parameters directly in the model's `dtype` (an `__init__` argument), while torch makes "
    "fp32 parameters and leaves casting to `model.to(dtype)`. torch calls the fused "
    "`F.layer_norm`; JAX writes mean, variance and `jax.lax.rsqrt` out, keeping torch's "
    "`weight`/`bias` names (`nnx.LayerNorm` would call the weight `scale`). Both upcast input "
    "and parameters to `compute_dtype` (fp32 for a bf16 model) and cast only the result back.",
    "RMSNorm": "As in `LayerNorm`: `nn.Parameter` vs `nnx.Param`, parameters made in the model's "
    "dtype in JAX but cast afterwards in torch. torch calls the fused `F.rms_norm`; JAX "
    "spells out x · rsqrt(mean(x²) + eps). Either way the normalisation runs in "
    "`compute_dtype` and only the output is cast back.",
    "make_norm": "The JAX factory takes a `dtype` because Flax parameters are created in their "
    "final dtype; the torch factory needs none, since `model.to(dtype)` casts every "
    "parameter after construction.",
    "rope_cos_sin": "Line for line the same math: `torch.as_tensor` vs `jnp.asarray`, `.to(ct)` "
    "vs `.astype(ct)`, and the tensor methods `.cos()`/`.sin()` vs the functions "
    "`jnp.cos`/`jnp.sin`. torch must be told to put the frequency table on the positions' "
    "device; `jnp.asarray` uses JAX's default device.",
    "apply_rope": "The same half-split rotation; only spellings differ: `x.chunk(2, dim=-1)` vs "
    "`jnp.split(x, 2, axis=-1)`, `torch.cat(..., dim=-1)` vs `jnp.concatenate(..., axis=-1)` "
    "(torch says `dim`, NumPy-style JAX says `axis`). Both rotate in the cos/sin dtype (fp32) "
    "and cast back to the input dtype.",
    "reference_attention": "The same written-out softmax. Grouped-query kv heads are expanded "
    "with `repeat_interleave` in torch and `jnp.repeat` in JAX, both repeating each head "
    "consecutively (unlike `torch.tile`/`jnp.tile`). The mask reads inverted: "
    "`masked_fill(~mask, min)` fills where its condition is True, `jnp.where(mask, scores, "
    "min)` keeps the scores where it is True.",
    "BlockInputs": "The same named tuple: what `GPT.embed` computes once per forward and every "
    "block and "
    "attention layer reads (RoPE tables, positions, the mask over the cache, the backend). "
    "Only the array types in the annotations differ.",
    "resolve_backend": "Both turn the backend name into what runs, once per call. JAX picks the "
    "kernel with the "
    '`implementation` argument of `jax.nn.dot_product_attention` ("xla", "cudnn" or None), '
    'and None never selects cuDNN by itself, so "auto" becomes "cudnn" when '
    "`jax_cudnn_unmet` lists no unmet constraint (sm80+ GPU, fp16/bf16, head_dim), else "
    '"xla". torch\'s "sdpa" lets PyTorch\'s dispatcher choose; a pinned kernel is checked '
    "with `torch_pinned_unmet`. Either way, a named backend that cannot run raises "
    "`BackendUnavailableError` (torch reads the device off the tensor; JAX asks "
    "`jax.devices()`).",
    "attention": "`F.scaled_dot_product_attention` wants (B, N, T, H), so torch transposes q, "
    "k, v in and the output back; `jax.nn.dot_product_attention` takes (B, T, N, H) as is. "
    "A pinned torch backend is the context manager `sdpa_kernel(...)`, and a kernel that "
    "refuses raises a RuntimeError re-raised as `BackendUnavailableError`; JAX passes "
    "`implementation=` from `resolve_backend`. Both use `is_causal` without a mask, else a "
    "boolean mask (True = attend): torch passes it as (B, 1, T, S) for SDPA to broadcast "
    "over heads, JAX broadcasts it to the full (B, N, T, S) that cuDNN requires. "
    "Grouped-query attention is `enable_gqa` in torch and native in JAX (fewer kv heads "
    "are accepted as they are).",
    "KVCache": "torch keeps the cache in buffers registered with `persistent=False`: they move "
    "with the module but stay out of `state_dict()`, hence out of `export_state`. NNX makes "
    "them `nnx.Cache` variables, a Variable type apart from `nnx.Param`, so `nnx.state(model, "
    "nnx.Param)` skips them and `nnx.split(model, nnx.Param, nnx.Cache)` can hand them to a "
    "jitted loop. Values are (B, K, S, H) in both; keys are (B, K, S, H) in torch, SDPA's own "
    "layout, and (B, K, H, S) in JAX, the layout XLA's CPU dot multiplies without a copy "
    "(kernels.py). torch writes in place (`self.k[rows_B1, :, pos_BT] = k_BTKH`, a "
    "`torch.Tensor.index_put_`); JAX arrays are immutable, so `.at[rows_B1, :, :, "
    "pos_BT].set(k_BTKH)` builds a new array that is stored back with `self.k[...] = ...` "
    "(inside a jitted step with the cache donated, XLA turns that into an in-place update).",
    "cached_attention": "The same attention over the cache: each twin hands `attention` the (B, "
    "S, K, H) views "
    "it expects, and a prefill from key 0 (no mask) reads only the first T keys. For torch "
    "the cache's (B, K, S, H) is SDPA's own layout, so the views cost nothing; JAX's keys "
    "are (B, K, H, S), so this readable path transposes them, and `kernels.py` replaces it "
    "on XLA with two einsums over the cache's own layouts.",
    "Attention": "The same projections, built from each twin's `Linear` (`wo` with the residual "
    "std); the "
    "JAX layers also get `dtype` and `rngs`. `kv_cache` starts as `nnx.data(None)` because "
    "NNX treats a None attribute as static and would refuse the `KVCache` that "
    "`setup_cache` assigns later. `attend_cache` is the one method `kernels.py` overrides in "
    "JAX (its CPU path in the cache layouts).",
    "GeluMLP": 'GPT-2\'s tanh-approximated GELU is `approximate="tanh"` in torch, whose default '
    "is the exact erf form, and `approximate=True` in JAX, where it already is the default. "
    "The linear layers follow `Attention` (`w_down` with the residual std).",
    "SwiGLU": "`F.silu` and `jax.nn.silu` are the same function; the linear layers follow "
    "`Attention` (`w_down` with the residual std).",
    "Block": "The same pre-norm residual block. The JAX constructor threads `dtype` and `rngs` "
    "into every child because NNX creates and initialises parameters at construction; torch "
    "modules take neither. NNX calls a module through `__call__`, torch through `forward` "
    "(run by `nn.Module.__call__`, which also runs hooks).",
    "GPT": "Randomness is explicit in JAX: the caller passes `nnx.Rngs` and every layer draws its "
    "init key from it, while torch layers draw from the global RNG (`torch.manual_seed`). "
    "Layers live in `nn.ModuleList` vs `nnx.List` (NNX refuses a plain list of modules), and "
    "the weight dtype is `dtype` at construction in JAX vs `model.to(dtype)` afterwards in "
    "torch; `kernels=True` swaps in each twin's CPU decode fast paths. The tied unembedding "
    "is `tok_emb.attend` in both. `check_input` (shared, gptmod/inputs.py) is skipped under "
    "`torch.compile`; JAX checks shapes while tracing and skips only the value checks on a "
    "`jax.core.Tracer`.",
    "_to_numpy": "A bfloat16 torch tensor has no `.numpy()` (NumPy has no bfloat16), so its bits "
    "are viewed as int16 and reinterpreted as `ml_dtypes.bfloat16`. JAX needs no helper: its "
    "bfloat16 is the `ml_dtypes` dtype, so `np.asarray` converts any JAX array.",
    "_to_torch": "The way back: `torch.from_numpy` shares memory and warns on read-only "
    "arrays (such as NumPy views of JAX arrays), so those are copied first; bfloat16 "
    "goes through an int16 view again.",
    "_canonical_params": "torch gets canonical names for free from `state_dict()`. The JAX twin "
    "flattens `nnx.state(model, nnx.Param)` with `nnx.to_flat_state` and joins each path with "
    "dots: its own `Linear` and `Embedding` already use torch's leaf names.",
    "export_state": "Both return the canonical state: torch's names and (out, in) layout, in the "
    "model's dtype. torch's `state_dict()` is already canonical (the KV cache is not "
    "persistent), so it only converts to NumPy; so is the JAX state, whose `Linear` weights "
    "share torch's layout, so it only copies each array out.",
    "load_state": "torch copies in place with `copy_` under `torch.no_grad`, which also casts to "
    "the parameter's dtype. JAX arrays are immutable, so each `nnx.Param` is given a new "
    "array, `param[...] = jnp.array(...)`, a copy cast to the parameter's dtype.",
}
# identical in both files: nothing to explain
NO_NOTE: frozenset[str] = frozenset({"rope_inv_freq"})


@dataclasses.dataclass(frozen=True)
class Section:
    """One definition with the blank lines and comments above it; lines are
    1-based and inclusive."""

    name: str
    kind: str  # "class", "def" or "" (the module header)
    first: int
    start: int  # line of the definition itself (first decorator), after the leading gap
    last: int
    text: str

    @property
    def gap(self) -> str:
        return "".join(_lines(self.text)[: self.start - self.first])

    @property
    def body(self) -> str:
        return "".join(_lines(self.text)[self.start - self.first :])


@dataclasses.dataclass(frozen=True)
class Pair:
    name: str
    torch: Section | None
    jax: Section | None
    group: str  # the divider comment ("norms", "rope", ...) the pair sits under


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


def split_sections(source: str) -> list[Section]:
    """Cut a module into the header (everything before the first definition) and one section per
    top-level class or function; the lines between two definitions go with the one below. Every line
    lands in exactly one section."""
    lines = _lines(source)
    defs = [
        n
        for n in ast.parse(source).body
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    starts = [min([n.lineno, *(d.lineno for d in n.decorator_list)]) for n in defs]
    sections = [Section(HEADER, "", 1, 1, starts[0] - 1 if defs else len(lines), "")]
    for i, (node, start) in enumerate(zip(defs, starts, strict=True)):
        # trailing statements go with the last one
        last = len(lines) if i == len(defs) - 1 else node.end_lineno
        kind = "class" if isinstance(node, ast.ClassDef) else "def"
        sections.append(Section(node.name, kind, sections[-1].last + 1, start, last, ""))
    sections = [dataclasses.replace(s, text="".join(lines[s.first - 1 : s.last])) for s in sections]
    names = [s.name for s in sections]
    if len(set(names)) != len(names):
        raise ValueError(
            f"a top-level name is defined twice: {sorted(n for n in names if names.count(n) > 1)}"
        )
    return sections


def pair_sections(torch_secs: list[Section], jax_secs: list[Section]) -> list[Pair]:
    """Pair by name in torch order; a JAX-only definition goes just before
    the next one both files have."""
    jax_by_name = {s.name: s for s in jax_secs}
    torch_names = {s.name for s in torch_secs}
    before: dict[str, list[Section]] = {}
    pending: list[Section] = []
    for s in jax_secs:
        if s.name in torch_names:
            before[s.name], pending = pending, []
        else:
            pending.append(s)
    rows = []
    for s in torch_secs:
        rows += [(None, j) for j in before.get(s.name, [])]
        rows.append((s, jax_by_name.get(s.name)))
    rows += [(None, j) for j in pending]
    pairs, group = [], "module"
    for t, j in rows:
        found = _DIVIDER.findall(t.gap if t else "") or _DIVIDER.findall(j.gap if j else "")
        group = found[-1].strip() if found else group
        pairs.append(Pair((t or j).name, t, j, group))
    return pairs


def build_pairs() -> tuple[list[Pair], dict[str, str]]:
    """The pairs of both model files, and each file's source, with the line coverage checked."""
    sources = {side: module_path(mod).read_text(encoding="utf-8") for side, mod in MODULES.items()}
    pairs = pair_sections(split_sections(sources["torch"]), split_sections(sources["jax"]))
    for side, source in sources.items():
        secs = [s for p in pairs if (s := getattr(p, side)) is not None]
        covered = [n for s in secs for n in range(s.first, s.last + 1)]
        n_lines = len(_lines(source))
        # Raised, not `assert`ed, so that python -O cannot turn the check off.
        if covered != list(range(1, n_lines + 1)) or "".join(s.text for s in secs) != source:
            raise AssertionError(
                f"{side}: the rendered sections do not show each source line exactly once"
            )
    return pairs, sources


def _note_html(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def _anchor(name: str) -> str:
    return "pair-" + re.sub(r"[^\w-]", "-", name)


def _cell(side: str, sec: Section | None, name: str) -> str:
    path = MODULES[side].replace(".", "/") + ".py"
    if sec is None:
        only = "JAX" if side == "torch" else "PyTorch"
        text = f"{only} only: <code>{html.escape(name)}</code> has no counterpart in {path}."
        return (
            f'<div class="col empty"><div class="colhead">{TITLES[side]}</div><p>{text}</p></div>'
        )
    fmt = HtmlFormatter(linenos="inline", linenostart=sec.first, lineanchors=side)
    # stripnl=False keeps leading blank lines, so pygments' line numbers
    # stay the file's line numbers.
    code = highlight(sec.text, PythonLexer(stripnl=False, ensurenl=True), fmt)
    head = f"{TITLES[side]} · {path} · lines {sec.first}–{sec.last}"
    return (
        f'<div class="col {side}"><div class="colhead">{head}</div><div '
        f'class="code">{code}</div></div>'
    )


_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 0 16px 48px; color: #1d1d1f; \
background: #fff; }
header { max-width: 1100px; } h1 { margin: 24px 0 8px; }
code { font-size: 0.92em; background: #f0f0f3; padding: 0 3px; }
nav .toc { columns: 5; font-size: 14px; } nav .toc div { break-inside: avoid; margin-bottom: 8px; }
nav .toc b { text-transform: uppercase; font-size: 13px; } nav ul { margin: 2px 0; \
padding-left: 18px; }
h2.group { border-bottom: 2px solid #ccc; margin: 40px 0 8px; font-size: 18px; \
text-transform: uppercase; }
section.pair { margin: 20px 0 32px; } section.pair h3 { margin: 0 0 6px; \
font-family: ui-monospace, monospace; }
.tag { font: 600 12px system-ui, sans-serif; padding: 2px 8px; border-radius: 10px; \
margin-left: 8px; }
.tag.only { background: #ffe3b3; } .tag.same { background: #d6f5d6; }
.note { background: #eef4ff; border-left: 4px solid #4a7bd0; padding: 8px 14px; \
margin-bottom: 8px; }
.note p { margin: 0; max-width: 1250px; } nav .only { color: #a06000; font-size: 12px; }
.cols { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 10px; \
align-items: start; }
.col { border: 1px solid #ddd; border-radius: 4px; min-width: 0; }
.colhead { font-size: 12px; padding: 3px 8px; background: #f4f4f6; border-bottom: 1px solid #ddd; \
color: #555; }
.col.empty { background: repeating-linear-gradient(45deg, #fafafa, #fafafa 8px, #f2f2f2 8px, \
#f2f2f2 16px); }
.col.empty p { margin: 12px; color: #777; }
.code { overflow-x: auto; }
.code pre { margin: 0; padding: 6px 0; font: 11.5px/1.45 ui-monospace, Menlo, Consolas, monospace; }
.code .linenos { color: #999; user-select: none; padding: 0 8px 0 4px; }
"""


def render_html() -> str:
    """The whole page as one self-contained HTML string (inline CSS, no
    scripts or external resources)."""
    pairs, _ = build_pairs()
    try:
        version = importlib.metadata.version("gptmod")
    except importlib.metadata.PackageNotFoundError:
        version = "dev"
    style = HtmlFormatter(style="default").get_style_defs(".code")
    toc: list[tuple[str, list[str]]] = []  # (group, its links) in page order
    body = []
    for p in pairs:
        if not toc or toc[-1][0] != p.group:
            toc.append((p.group, []))
            body.append(f'<h2 class="group">{html.escape(p.group)}</h2>')
        label = p.name if p.name == HEADER else f"{(p.torch or p.jax).kind} {p.name}"
        tag, only = "", ""
        if p.torch is None or p.jax is None:
            only = f"{'JAX' if p.torch is None else 'PyTorch'} only"
            tag = f'<span class="tag only">{only}</span>'
        elif p.torch.body == p.jax.body:
            tag = '<span class="tag same">identical in both files</span>'
        note = (
            f'<div class="note"><p>{_note_html(NOTES[p.name])}</p></div>' if p.name in NOTES else ""
        )
        cells = "".join(_cell(side, getattr(p, side), p.name) for side in MODULES)
        only = f' <span class="only">{only}</span>' if only else ""
        toc[-1][1].append(f'<li><a href="#{_anchor(p.name)}">{html.escape(p.name)}</a>{only}</li>')
        body.append(
            f'<section class="pair" id="{_anchor(p.name)}"><h3>{html.escape(label)}{tag}</h3>{note}'
            f'<div class="cols">{cells}</div></section>'
        )
    toc_html = "".join(
        f"<div><b>{html.escape(g)}</b><ul>{''.join(links)}</ul></div>" for g, links in toc
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gptmod: the PyTorch and JAX twins side by \
side</title>
<style>{_CSS}{style}</style></head><body>
<header><h1>gptmod: the PyTorch and JAX twins side by side</h1>
<p>The model is written twice, as twins with the same classes, names and order:
<code>gptmod_torch/model.py</code> (left) and <code>gptmod_jax/model.py</code> (right).
Each row pairs one top-level class or function of both files; a note above a row explains the \
framework
difference in it. Line numbers are those of the real files, and every line of both files is shown \
once.</p>
<p>Generated from the code by <code>gptmod side-by-side --out FILE.html</code> (gptmod \
{html.escape(version)});
only the notes are written by hand.</p></header>
<nav><h2>Contents</h2><div class="toc">{toc_html}</div></nav>
<main>{"".join(body)}</main></body></html>
"""


def render(out: str | os.PathLike[str]) -> None:
    """Write the page to `out` atomically: a temp file in the same folder, then os.replace."""
    out = Path(out)
    page = render_html()
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the page is for reading
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
