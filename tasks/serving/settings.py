"""Settings read from environment variables at start-up. A bad value raises ValueError naming the variable, the
value and the default, so a server or flow stops at once with a message that says how to fix it."""

from __future__ import annotations

import os
from collections.abc import Mapping

TRUE_WORDS, FALSE_WORDS = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def env_bool(name: str, default: bool, environ: Mapping[str, str] = os.environ) -> bool:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() in TRUE_WORDS:
        return True
    if raw.lower() in FALSE_WORDS:
        return False
    raise ValueError(f"{name}={raw!r} is not true or false (unset it to use the default, {str(default).lower()})")


def env_number(
    name: str,
    default,
    kind: type = float,
    minimum: float = 0,
    environ: Mapping[str, str] = os.environ,
    maximum: float | None = None,
):
    """`kind` (int or float) from the variable, finite, at least `minimum` and at most `maximum` (if given);
    `default` when unset or blank (None is a default too: "unset")."""
    raw = environ.get(name, "").strip()
    shown = "unset" if default is None else f"{default:g}"
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{name}={raw!r} is not {what} (unset it to use the default, {shown})") from None
    if not value >= minimum or value != value or value == float("inf") or (maximum is not None and value > maximum):
        bounds = f"at least {minimum:g}" if maximum is None else f"between {minimum:g} and {maximum:g}"
        raise ValueError(f"{name}={raw} must be a finite number, {bounds} (unset it to use the default, {shown})")
    return value
