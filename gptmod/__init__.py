"""gptmod: a modernised GPT-2 written twice, in PyTorch (gptmod_torch) and JAX/Flax NNX (gptmod_jax).

This core package is framework-free: it imports neither torch nor jax when loaded.
"""

from gptmod import config, weights
from gptmod.config import ModelConfig, load_preset

__version__ = "0.1.0"
__all__ = ["ModelConfig", "config", "load_preset", "weights"]
