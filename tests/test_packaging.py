"""pyproject.toml's packaging: the dependency ranges admit what GPU machines
already have, and what is installed here; the package list ships every package
under the project's own top-level names (no bare `parity`)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# Versions a user's machine may bring that `pip install -e .` must keep, not replace: the GPU
# image's (Python 3.12, torch 2.11 CUDA, jax 0.11.2 with its CUDA plugin, flax 0.12.x, transformers
# 5.17), CI's two stacks (torch 2.13 and jax 0.10.2 on the pinned one; the newest jax, flax, torch
# and transformers on the other) and the newest releases.
MUST_ADMIT = {
    "torch": ["2.11.0", "2.13.0", "2.15.0"],
    "jax": ["0.10.2", "0.11.2", "0.12.0.1"],
    "jaxlib": ["0.10.2", "0.11.2", "0.12.0.1"],
    "flax": ["0.12.8", "0.12.12"],
    "transformers": ["5.17.0", "5.24.0"],
}


def _requirements() -> dict[str, Requirement]:
    """The project's runtime dependencies and its test extra, by canonical name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [
        Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]
    ]
    return {canonicalize_name(r.name): r for r in reqs}


@pytest.mark.parametrize(("name", "version"), [(n, v) for n, vs in MUST_ADMIT.items() for v in vs])
def test_declared_range_admits(name: str, version: str) -> None:
    req = _requirements()[name]
    assert req.specifier.contains(version, prereleases=True), (
        f"pyproject.toml: {req} refuses {name} {version}, which a GPU machine or a CI stack has; "
        "`pip install -e .` there would replace it"
    )


@pytest.mark.parametrize(
    ("name", "newer"),
    [("torch", "2.99.0"), ("jax", "0.99.0"), ("jaxlib", "0.99.0"), ("flax", "0.99.0")],
)
def test_a_newer_release_is_never_downgraded(name: str, newer: str) -> None:
    """No cap below the next major release: pip would replace a user's newer
    torch or JAX with an older one."""
    req = _requirements()[name]
    assert req.specifier.contains(newer), (
        f"pyproject.toml: {req} caps {name} below {newer}; pip would downgrade it"
    )


def test_installed_versions_satisfy_the_declared_ranges() -> None:
    """Every declared dependency is installed in a version its range admits:
    the ranges describe a real stack."""
    wrong = []
    for name, req in _requirements().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{req}: not installed")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            wrong.append(f"{req}: installed {installed}")
    assert not wrong, "installed versions outside pyproject.toml's ranges: " + "; ".join(wrong)


def test_readme_torch_pin_is_admitted() -> None:
    """The README's first install step (`pip install torch==X`, the CPU
    wheel) must satisfy the torch range."""
    pins = re.findall(r"pip install torch==([0-9][0-9.]*[0-9])", (ROOT / "README.md").read_text())
    assert pins and pins[0] == "2.13.0", (
        f"README's first torch pin is {pins[:1]}; expected 2.13.0 (CI's CPU wheel)"
    )
    torch_range = _requirements()["torch"].specifier
    refused = [v for v in pins if not torch_range.contains(v)]
    assert not refused, (
        f"README pins torch {refused}, which pyproject.toml's torch{torch_range} refuses"
    )


def test_newest_stack_subset_names_existing_test_files() -> None:
    """The second CI stack's named subset (.ci/newest-stack-tests.txt) must
    not name a file or test that is gone (pytest would error on it, but only
    in CI's second stack, after the whole first one)."""
    lines = (ROOT / ".ci" / "newest-stack-tests.txt").read_text().splitlines()
    names = [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]
    assert len(names) >= 5, (
        f"the newest-stack subset names {len(names)} entries; expected at least 5"
    )
    missing = []
    for name in names:
        path, _, test = name.partition("::")
        file = ROOT / path
        if not file.is_file() or (
            test and not re.search(rf"^def {re.escape(test)}\(", file.read_text(), re.M)
        ):
            missing.append(name)
    assert not missing, f".ci/newest-stack-tests.txt names missing files or tests: {missing}"


TOP_LEVEL = {"gptmod", "gptmod_torch", "gptmod_jax"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_packages_live_under_the_project_names() -> None:
    """The parity suite ships as gptmod.parity: a top-level `parity` would collide with any other
    package of that name in the user's environment."""
    tool = _pyproject()["tool"]
    packages = tool["setuptools"]["packages"]
    assert "gptmod.parity" in packages
    assert {p.split(".")[0] for p in packages} == TOP_LEVEL, packages
    assert set(tool["ruff"]["lint"]["isort"]["known-first-party"]) == TOP_LEVEL
    assert not (ROOT / "parity").exists(), "a top-level parity/ is back; it lives in gptmod/parity/"


def test_every_package_directory_is_listed() -> None:
    """setuptools' explicit `packages` list does not pick up subpackages: one left out would be
    missing from the wheel while editable installs still find it."""
    packages = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in TOP_LEVEL
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found - packages == set(), f"pyproject.toml does not list {sorted(found - packages)}"


def test_import_gptmod_loads_neither_framework_nor_the_parity_suite() -> None:
    """DESIGN.md's rule: the core imports neither torch nor jax when loaded, so gptmod/__init__.py
    must not pull in gptmod.parity (which imports both twins)."""
    mods = ("torch", "jax", "gptmod.parity", "gptmod_torch", "gptmod_jax")
    code = f"import sys, gptmod; print([m for m in {mods!r} if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
