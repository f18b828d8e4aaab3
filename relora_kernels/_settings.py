"""The package's switches, in one validated object (docs/DESIGN.md section 3).

    backend        auto | triton | reference   which implementation runs the ops (RELORA_KERNELS_BACKEND)
    engine         auto | triton | cublas      which engine runs the frozen GEMMs (RELORA_KERNELS_ENGINE)
    autotune       bool                        time the fused GEMM's tiles per launch key (RELORA_KERNELS_AUTOTUNE)
    deterministic  bool                        fixed-order reductions instead of atomics (RELORA_KERNELS_DETERMINISTIC)

The environment variables seed the settings once, when the package is imported; an invalid value is a ValueError
naming the variable. After that, `relora_kernels.settings(...)` changes them for a block (or `configure(...)` for
good). The settings are one immutable object replaced as a whole, so a reader on any thread (autograd runs the
backward on its own) sees one consistent set; a change applies to the whole process, since the backward of a
forward run inside the block may run on another thread. The launch plans the kernels cache are keyed by the
settings' generation, the number of the settings' values, so a change reaches the next call, and a block that
changes them and restores them (a benchmark's rounds, an evaluation under other settings) finds its plans again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping

BACKENDS = ("auto", "triton", "reference")
ENGINES = ("auto", "triton", "cublas")

ENVIRONMENT = {
    "backend": "RELORA_KERNELS_BACKEND",
    "engine": "RELORA_KERNELS_ENGINE",
    "autotune": "RELORA_KERNELS_AUTOTUNE",
    "deterministic": "RELORA_KERNELS_DETERMINISTIC",
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Settings:
    backend: str = "auto"
    engine: str = "auto"
    autotune: bool = True
    deterministic: bool = False

    def __post_init__(self):
        for name, choices in (("backend", BACKENDS), ("engine", ENGINES)):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        for name in ("autotune", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")


def _choice(variable: str, text: str, choices: tuple[str, ...]) -> str:
    value = text.strip().lower() or "auto"
    if value not in choices:
        raise ValueError(f"{variable} must be one of {', '.join(choices)}; got {text!r}")
    return value


def _flag(variable: str, text: str, default: bool) -> bool:
    value = text.strip().lower()
    if not value:
        return default
    if value not in _TRUE + _FALSE:
        raise ValueError(f"{variable} must be one of {', '.join(_TRUE + _FALSE)} (or unset); got {text!r}")
    return value in _TRUE


def from_environment(environ: Mapping[str, str] = os.environ) -> Settings:
    """The settings the RELORA_KERNELS_* variables of `environ` give (unset ones keep their defaults)."""
    default = Settings()
    get = {field: environ.get(variable, "") for field, variable in ENVIRONMENT.items()}
    return Settings(
        backend=_choice(ENVIRONMENT["backend"], get["backend"], BACKENDS),
        engine=_choice(ENVIRONMENT["engine"], get["engine"], ENGINES),
        autotune=_flag(ENVIRONMENT["autotune"], get["autotune"], default.autotune),
        deterministic=_flag(ENVIRONMENT["deterministic"], get["deterministic"], default.deterministic),
    )


_lock = threading.Lock()
_current = from_environment()
# The number of each settings value seen (Settings is a frozen dataclass: equal values, one entry), and the number
# of those in force: what launch-plan caches key on (an int compares in one step on the hot path). A value keeps its
# number, so restoring settings restores the plans made under them; there are at most a few dozen values.
_generations: dict[Settings, int] = {_current: 0}
generation = 0


def _set(settings: Settings) -> None:
    global _current, generation
    _current = settings
    generation = _generations.setdefault(settings, len(_generations))


def current() -> Settings:
    """The settings in force (one immutable object: read it once per call)."""
    return _current


def configure(**changes) -> Settings:
    """Change the settings for good (e.g. `configure(engine="cublas")`); returns the previous ones."""
    with _lock:
        previous = _current
        _set(dataclasses.replace(_current, **changes) if changes else _current)
    return previous


def _restore(settings: Settings) -> None:
    with _lock:
        _set(settings)


@contextlib.contextmanager
def settings(**changes) -> Iterator[Settings]:
    """Change the settings within the block, then restore them: `with relora_kernels.settings(engine="cublas",
    deterministic=True): ...`. Unknown names are a TypeError, invalid values a ValueError, before anything
    changes. The change is process-wide (see the module docstring)."""
    unknown = set(changes) - {field.name for field in dataclasses.fields(Settings)}
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(sorted(unknown))}; the settings are "
                        f"{', '.join(field.name for field in dataclasses.fields(Settings))}")
    previous = configure(**changes)
    try:
        yield _current
    finally:
        _restore(previous)
