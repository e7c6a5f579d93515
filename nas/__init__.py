"""resformer-nas: neural architecture search over value-residual patterns in transformers."""

from .config import ConfigError, RunConfig, load_config

__all__ = ["ConfigError", "RunConfig", "build_model", "load_config"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # torch loads only when a model is asked for, so `nas --help` and config checks stay fast.
    if name == "build_model":
        from .model import build_model

        return build_model
    raise AttributeError(f"module 'nas' has no attribute {name!r}")
