"""mlx_bonsai: Bonsai Image 4B (1-bit and ternary FLUX.2 [klein] 4B) on stock MLX."""

from .errors import BonsaiError, ConfigError, PromptError, WeightsError

__version__ = "0.1.0"

__all__ = [
    "BonsaiError",
    "BonsaiPipeline",
    "ConfigError",
    "GenerationResult",
    "PromptError",
    "WeightsError",
    "__version__",
]


def __getattr__(name: str):
    # The pipeline pulls in the text encoder (and with it transformers); load it on first use so
    # that `import mlx_bonsai` and the converter stay light.
    if name in ("BonsaiPipeline", "GenerationResult"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'mlx_bonsai' has no attribute {name!r}")
