"""gptmod in PyTorch: the twin of gptmod_jax."""

from gptmod_torch.generate import generate, generate_stream
from gptmod_torch.model import GPT, export_state, load_state

# `gptmod_torch.generate` is the function (the public API); the module is
# gptmod_torch.generate in sys.modules.
__all__ = ["GPT", "export_state", "generate", "generate_stream", "load_state"]
