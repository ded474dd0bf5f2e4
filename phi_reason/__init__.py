"""phi-reason: JAX-native post-training for Microsoft's Phi-4 reasoning models."""
from .model.config import ConfigError, ModelConfig
from .model.decoder import forward
from .model.params import init_params, param_count

__all__ = ["ConfigError", "ModelConfig", "forward", "init_params", "param_count"]
__version__ = "0.1.0"
