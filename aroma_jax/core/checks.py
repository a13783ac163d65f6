"""Config value checks, one message shape: ``invalid FIELD=VALUE: accepted WHAT``.

`aroma_jax.core.config` (the AROMA fields) and `aroma_jax.train.run_config` (the run config's
sections, fields named ``section.key``) check their values with these, so a bad value reads the
same wherever it was given. This module imports nothing of the project (core/ stays at the
bottom of the layers).

Example:
    >>> check_int("r", 2, 1)
    >>> check_number("alpha", 0, "a finite number > 0")
    Traceback (most recent call last):
    ...
    aroma_jax.core.checks.ConfigError: invalid alpha=0: accepted a finite number > 0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NoReturn


class ConfigError(ValueError):
    """An invalid config value; the message names the field, the value and what is accepted."""


def fail(field: str, value: Any, accepted: str) -> NoReturn:
    raise ConfigError(f"invalid {field}={value!r}: accepted {accepted}")


def is_int(value: Any) -> bool:
    """An ``int`` proper (YAML's ``true`` is a ``bool``, which Python counts as an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(field: str, value: Any, low: int, none: bool = False, accepted: str = "") -> None:
    """An integer ``>= low`` (or ``None`` where ``none``); ``accepted`` overrides the text."""
    if none and value is None:
        return
    if not is_int(value) or value < low:
        fail(field, value, accepted or f"an integer >= {low}" + (" or null" if none else ""))


# What a number may be, by the words that say it (they are the error message's "accepted").
NUMBER_RANGES: dict[str, Callable[[float], bool]] = {
    "a finite number": math.isfinite,
    "a finite number > 0": lambda v: v > 0 and math.isfinite(v),
    "a finite number >= 0": lambda v: v >= 0 and math.isfinite(v),
    "a number in [0, 1)": lambda v: 0.0 <= v < 1.0,
    "a number in [0, 1]": lambda v: 0.0 <= v <= 1.0,
    "a number in (0, 1)": lambda v: 0.0 < v < 1.0,
}


def check_number(field: str, value: Any, accepted: str) -> None:
    """A number (not a bool) in the range `NUMBER_RANGES` names ``accepted``."""
    if not is_number(value) or not NUMBER_RANGES[accepted](value):
        fail(field, value, accepted)


def check_text(field: str, value: Any, accepted: str, none: bool = False) -> None:
    """A non-empty string (or ``None`` where ``none``)."""
    if none and value is None:
        return
    if not isinstance(value, str) or not value:
        fail(field, value, accepted)


def check_one_of(field: str, value: Any, choices: tuple, accepted: str = "") -> None:
    """``value`` among ``choices``; the message lists them as ``accepted`` (default: ``one of
    (...)``)."""
    if value not in choices:
        fail(field, value, accepted or f"one of {choices}")


def check_known(given: Iterable[str], valid: Iterable[str], message: str) -> None:
    """No key of ``given`` outside ``valid``; else ``message`` with ``{unknown}`` filled in
    (the unknown keys, sorted)."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigError(message.format(unknown=unknown))
