"""gptmod: a modernised GPT-2 written twice, in PyTorch (gptmod_torch) and
JAX/Flax NNX (gptmod_jax).

This core package is framework-free: it imports neither torch nor jax when loaded.
"""

from importlib import metadata

from gptmod import config, weights
from gptmod.config import ModelConfig, load_preset

# the installed distribution's version (pyproject's [project] version), so
# it never drifts from the package
try:
    __version__ = metadata.version("gptmod")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"
__all__ = ["ModelConfig", "config", "load_preset", "weights"]
