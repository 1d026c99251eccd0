"""gptmod in PyTorch: the twin of gptmod_jax."""

from gptmod_torch.model import GPT, export_state, load_state

__all__ = ["GPT", "export_state", "load_state"]
