"""Recipes: YAML files merged over their `base:` chain, dotted overrides, typed construction of the
recipe class that the recipe's `component:` names, saving and hashing a resolved config.

A recipe is a YAML mapping whose top-level keys are the fields of its recipe class (recipe.py)
plus an optional `base:` path (relative to the recipe) that it is merged over. A recipe whose
component has another recipe class than its base's (a codec recipe over a pretraining recipe)
inherits only the keys its own class has; the keys it sets itself must all be its class's.
Overrides on the command line are `section.key=value` with the value parsed as YAML, and switch
the component the same way. The old key `task:` still names the component, with a warning.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import sys
import typing
from typing import Any

import yaml

from ._check import ConfigError, _check, to_plain
from .recipe import BACKBONE_COMPONENTS, COMPONENTS, RECIPE_CLASSES, ComponentConfig, Config

__all__ = [
    "config_hash",
    "from_dict",
    "load_config",
    "load_recipe_dict",
    "parse_overrides",
    "replace",
    "save_config",
    "to_plain",
]

DEFAULT_COMPONENT = "pretrain"


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain mappings, with type checking
# ---------------------------------------------------------------------------------------------


def from_dict(cls: type, data: dict, at: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{at or 'recipe'} must be a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{at}.{key}" if at else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {'.'.join(filter(None, [at, close[0]]))}?)" if close else ""
            raise ConfigError(f"unknown key {path!r}{hint}; known keys here: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, path) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{path}={value!r} is invalid: expected a list of {len(args)} values")
        return tuple(_coerce(a, v, path) for a, v in zip(args, value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot in the mantissa) as a string, not a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected a string")
        return value
    raise TypeError(f"unsupported config field type {tp} at {path}")


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------


def _read_yaml(path: str) -> dict:
    if os.path.isdir(path):
        raise ConfigError(
            f"recipe {path!r} is a directory; give a YAML file such as recipes/*.yaml"
        )
    if not os.path.isfile(path):
        raise ConfigError(f"recipe {path!r} does not exist; recipes live in recipes/*.yaml")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(
            f"recipe {path!r} cannot be read ({e.strerror}); check its permissions"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"recipe {path!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}, "
            f"offset {e.start}); save it as UTF-8 (recipes are YAML text)"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path!r} is not valid YAML: {e}".replace("\n", " ")) from None
    if data is None:
        raise ConfigError(
            f"recipe {path!r} is empty (no keys, only blanks or comments); a recipe names at "
            "least its base: or component:, e.g. `base: debug.yaml` (see recipes/*.yaml)"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path!r} must be a YAML mapping of sections")
    return data


# Deprecated recipe keys (kept for one release): old dotted path -> new dotted path.
DEPRECATED_KEYS = {"task": "component", "rl.tasks": "rl.families"}


def _rename_deprecated(data: dict, where: str) -> None:
    """Every deprecated key in `data` (nested by section) takes its new name, in place, with a
    one-line warning; setting both names is an error."""
    for old, new in DEPRECATED_KEYS.items():
        *sections, old_key = old.split(".")
        new_key = new.split(".")[-1]
        node = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old_key not in node:
            continue
        if new_key in node:
            raise ConfigError(
                f"{where} sets both {old!r} and {new!r}; keep only {new!r} "
                f"({old!r} is its deprecated name)"
            )
        print(f"ernie5: recipe key {old!r} is deprecated; use {new!r} ({where})", file=sys.stderr)
        renamed = {(new_key if k == old_key else k): v for k, v in node.items()}
        node.clear()
        node.update(renamed)


def _merge(base: dict, over: dict, cls: type | None = None) -> dict:
    """`over` merged over `base`, section by section. With `cls` (the dataclass the dicts fill), a
    field whose metadata names `reset_by` is dropped from `base` when `over` sets that key but not
    the field: a layer that sets a family's levels without level_weights gets equal shares, not
    weights written for the levels it replaced."""
    hints = typing.get_type_hints(cls) if cls is not None else {}
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            sub = hints.get(key)
            out[key] = _merge(out[key], value, sub if dataclasses.is_dataclass(sub) else None)
        else:
            out[key] = value
    for f in dataclasses.fields(cls) if cls is not None else ():
        if f.metadata.get("reset_by") in over and f.name not in over:
            out.pop(f.name, None)
    return out


def _recipe_class(component: Any) -> type | None:
    return RECIPE_CLASSES.get(component) if isinstance(component, str) else None


def _project(data: dict, cls: type) -> dict:
    """The keys of `data` that dataclass `cls` has, recursively into its sections."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        if key not in names:
            continue
        tp = hints[key]
        out[key] = (
            _project(value, tp)
            if (dataclasses.is_dataclass(tp) and isinstance(value, dict))
            else value
        )
    return out


def _layer(under: dict, over: dict) -> dict:
    """`over` merged over `under`. When `over` switches to a component with another recipe class,
    `under` first keeps only the keys of that class."""
    new = _recipe_class(over.get("component"))
    old = _recipe_class(under.get("component", DEFAULT_COMPONENT))
    if new is not None and old is not None and new is not old:
        under = _project(under, new)
    return _merge(under, over, new or old)


def load_recipe_dict(path: str, _seen: tuple[str, ...] = ()) -> dict:
    """The recipe at `path` merged over its `base:` chain (paths relative to each recipe)."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"recipe {path!r} inherits from itself through base:")
    data = _read_yaml(path)
    _rename_deprecated(data, os.path.relpath(path))
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"base={base!r} in {path!r} must be a path to another recipe")
    parent = load_recipe_dict(os.path.join(os.path.dirname(path), base), _seen + (path,))
    return _layer(parent, data)


def parse_overrides(overrides: list[str]) -> dict:
    """['train.max_steps=50', 'model.moe.top_k=2'] -> nested dict with YAML-parsed values."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is malformed: expected section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return out


def _refuse_backbone_keys(data: Any, mine: type, backbone: type, at: str, component: str) -> None:
    """A key of the backbone recipe (`backbone`) that the component's class (`mine`) lacks is a
    clear error naming it, not just an unknown key."""
    if mine is backbone or not isinstance(data, dict):
        return
    my_hints, bb_hints = typing.get_type_hints(mine), typing.get_type_hints(backbone)
    my_names = [f.name for f in dataclasses.fields(mine)]
    bb_names = {f.name for f in dataclasses.fields(backbone)}
    for key, value in data.items():
        path = f"{at}.{key}" if at else str(key)
        if key not in my_names and key in bb_names:
            raise ConfigError(
                f"{path} is only read by the backbone trainers (component "
                f"{', '.join(BACKBONE_COMPONENTS)}), not by component {component!r}; remove it "
                f"(known keys here: {', '.join(my_names)})"
            )
        if key in my_names and key in bb_names and dataclasses.is_dataclass(my_hints[key]):
            _refuse_backbone_keys(value, my_hints[key], bb_hints[key], path, component)


def load_config(path: str, overrides: list[str] | None = None) -> Config | ComponentConfig:
    """Resolve a recipe plus dotted overrides into a validated, frozen recipe: a `Config` for
    the backbone components, a `ComponentConfig` for the separately trained ones."""
    over = parse_overrides(overrides or [])
    olds = tuple(f"{old}=" for old in DEPRECATED_KEYS)
    _rename_deprecated(
        over, "override " + ", ".join(o for o in overrides or [] if o.startswith(olds))
    )
    data = _layer(load_recipe_dict(path), over)
    data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    component = data.get("component", DEFAULT_COMPONENT)
    cls = _recipe_class(component)
    _check("config", "component", component, cls is not None, f"one of {', '.join(COMPONENTS)}")
    _refuse_backbone_keys(data, cls, Config, "", component)
    return from_dict(cls, data).validate()


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace that re-validates a top-level recipe."""
    new = dataclasses.replace(cfg, **changes)
    return new.validate() if isinstance(new, (Config, ComponentConfig)) else new


def save_config(cfg: Config | ComponentConfig, path: str) -> None:
    """Write the resolved config (YAML) next to a run; `load_config` reads it back unchanged."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)


def config_hash(cfg: Config | ComponentConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
