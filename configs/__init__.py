"""Model presets as JSON, installed as the data package gptmod.configs (see
gptmod.config.load_preset)."""
