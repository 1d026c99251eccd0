"""gptmod in JAX/Flax NNX: the twin of gptmod_torch."""

from gptmod_jax.generate import generate, generate_stream
from gptmod_jax.model import GPT, export_state, load_state

# `gptmod_jax.generate` is the function (the public API); the module is
# gptmod_jax.generate in sys.modules.
__all__ = ["GPT", "export_state", "generate", "generate_stream", "load_state"]
