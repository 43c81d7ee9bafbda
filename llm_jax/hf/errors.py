"""The one error of Hugging Face conversion."""

from llm_jax.config import ConfigError


class HFConversionError(ConfigError):
    """A Hugging Face config, weight file or tokenizer that has no faithful llm_jax equivalent (or the
    reverse). One line naming the field, e.g. "config.json: rope_scaling={'type': 'yarn', ...}: RoPE
    scaling is not implemented"; the CLI turns it into exit 2, as any ConfigError."""
