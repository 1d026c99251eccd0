"""The cross-framework parity suite (`python -m gptmod.parity`, `gptmod parity`). It imports
both twins, so `import gptmod` leaves it unloaded and the core stays framework-free."""
