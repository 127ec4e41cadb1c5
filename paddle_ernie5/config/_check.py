"""Helpers shared by every section module: the one error type, the field check and `to_plain`."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import UserError


class ConfigError(UserError, ValueError):
    """A recipe or override is wrong; the message names the key, the value and what is allowed."""


def _check(at: str, key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{at}.{key}={value!r} is invalid: allowed {allowed}")


def to_plain(obj: Any) -> Any:
    """A config (or any part of one) as plain dicts, lists and scalars, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_plain(v) for v in obj]
    return obj
