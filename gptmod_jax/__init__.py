"""gptmod in JAX/Flax NNX: the twin of gptmod_torch."""

from gptmod_jax.model import GPT, export_state, load_state

__all__ = ["GPT", "export_state", "load_state"]
