"""Optional modules that register themselves on import (modality embeddings and heads, mixture
sources)."""

from __future__ import annotations

import importlib


def import_optional(modules: tuple[str, ...]) -> None:
    """Import each module that exists in this build; an import error inside one still propagates."""
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
