"""The commands that need an optional extra of resformer-nas (pyproject.toml) check for its
packages before importing the modules that use them, so that a missing one is one line naming
the extra to install (exit 2), not a traceback. The core install (`pip install resformer-nas`)
runs `nas train` and `nas search`; `nas report` needs `[report]`, `nas dashboard`
`[dashboard]`, `nas report --image` `[image]`. (`nas prepare`, `nas export --hf` and
`train.logger` check their own packages where they import them.)"""

from __future__ import annotations

import importlib.util

from nas.errors import ConfigError

# extra -> the modules it installs that nas imports, as pyproject.toml's extras say
MODULES: dict[str, tuple[str, ...]] = {
    "report": ("plotly", "scipy"),
    "dashboard": ("optuna_dashboard", "plotly", "scipy"),
    "image": ("kaleido",),
}


def require(extra: str, what: str) -> None:
    """Refuse `what` (a command, a flag) in one line where a module of `extra` is missing."""
    missing = [name for name in MODULES[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"{what} needs {' and '.join(missing)}: pip install "
                          f"'resformer-nas[{extra}]'")
