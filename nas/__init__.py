"""resformer-nas: neural architecture search over value-residual patterns in transformers."""

from nas.errors import ConfigError

__all__ = ["ConfigError", "RunConfig", "build_model", "load_config"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported when asked for: `nas --help` (which imports this package first) then needs no
    # pydantic, and config checks no torch (a model).
    if name in ("RunConfig", "load_config"):
        from nas import config

        return getattr(config, name)
    if name == "build_model":
        from nas.model.decoder import build_model

        return build_model
    raise AttributeError(f"module 'nas' has no attribute {name!r}")
