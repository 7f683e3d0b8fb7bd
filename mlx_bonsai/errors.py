"""Typed errors. Each message is one line that says what is wrong and what to do."""


class BonsaiError(Exception):
    """Base class of every error mlx_bonsai raises on bad input."""


class ConfigError(BonsaiError):
    """A config file is missing, unreadable, or has missing/inconsistent fields."""


class WeightsError(BonsaiError):
    """A checkpoint file is unreadable, or its tensors do not match the model."""


class PromptError(BonsaiError):
    """A prompt or a token batch cannot be encoded (empty prompt, bad ids or attention mask)."""
