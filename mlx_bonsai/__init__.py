"""mlx_bonsai: Bonsai Image 4B (1-bit and ternary FLUX.2 [klein] 4B) on stock MLX."""

from .errors import BonsaiError, ConfigError, PromptError, WeightsError

__version__ = "0.1.0"

__all__ = ["BonsaiError", "ConfigError", "PromptError", "WeightsError", "__version__"]
