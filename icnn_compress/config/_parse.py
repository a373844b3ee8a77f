"""Recipes to and from dicts and TOML, and ``--set section.key=value`` overrides.

One generic routine (:func:`recipe_from_dict`) walks ``dataclasses.fields`` and the type hints of the
dataclasses in :mod:`icnn_compress.config._schema`, so adding a field there is all it takes to make it
configurable; a key that does not exist is an error, never ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from icnn_compress.errors import RecipeError

from ._schema import Recipe, _interval_holds, _interval_text

__all__ = ["load_recipe", "recipe_from_dict", "recipe_to_dict", "recipe_to_toml"]


_NONE_WORDS = ("none", "null")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _accepts_none(tp: Any) -> bool:
    return _is_union(tp) and type(None) in typing.get_args(tp)


class _Mismatch(Exception):
    """Internal: a value that does not fit a type (turned into a RecipeError with the key)."""


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` (int -> float widening only) or raise _Mismatch."""
    if _is_union(tp):
        for member in typing.get_args(tp):
            try:
                return _coerce(value, member)
            except _Mismatch:
                continue
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise _Mismatch
        return [_coerce(item, item_tp) for item in value]
    if tp is bool:  # bool is an int subclass: check it before int, and accept no 0/1
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"config field type {tp!r} is not supported by the recipe loader")


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def _from_dict(cls: type, data: Any, *, prefix: str, source: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key, type, choice and bound."""
    where = prefix.rstrip(".") or "recipe"
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: '{where}' must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    valid = [f"{prefix}{name}" for name in fields]
    for key in data:
        if key not in fields:
            dotted = f"{prefix}{key}"
            raise RecipeError(
                f"{source}: unknown {'key' if prefix else 'section'} '{dotted}'; "
                f"{_suggest(dotted, valid)}valid {'keys' if prefix else 'sections'}: {', '.join(valid)}"
            )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp, f, dotted = hints[name], fields[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, prefix=f"{dotted}.", source=source)
            continue
        try:
            value = _coerce(value, tp)
        except _Mismatch:
            raise RecipeError(
                f"{source}: '{dotted}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
            ) from None
        choices = f.metadata.get("choices")
        if choices and isinstance(value, str) and value not in choices:
            also = " or a number" if float in typing.get_args(tp) else ""
            raise RecipeError(
                f"{source}: '{dotted}' must be one of {', '.join(map(repr, choices))}{also}, got {value!r}"
            )
        bound = f.metadata.get("min")
        if bound is not None and value is not None and not value >= bound:
            raise RecipeError(f"{source}: '{dotted}' must be >= {bound}, got {value!r}")
        interval = f.metadata.get("interval")
        if interval is not None and isinstance(value, int | float) and not _interval_holds(value, *interval):
            raise RecipeError(f"{source}: '{dotted}' must be in {_interval_text(*interval)}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def recipe_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> Recipe:
    """Return the Recipe that the nested mapping ``{section: {key: value}}`` describes.

    Args:
        d: sections as tables; a missing section or key keeps its default.
        source: named in error messages (the file path, or ``--set`` for overrides).
    """
    recipe = _from_dict(Recipe, d, prefix="", source=source)
    data = recipe.data
    for key in ("mean", "std"):  # images are read as RGB: one value per channel
        if getattr(data, key) is not None and len(getattr(data, key)) != 3:
            raise RecipeError(f"{source}: 'data.{key}' needs 3 values (R, G, B; images are read as RGB), got "
                              f"{getattr(data, key)!r}")
    if data.std is not None and not all(0.0 < v < math.inf for v in data.std):
        raise RecipeError(f"{source}: 'data.std' must be finite and > 0 (it divides every pixel), got {data.std!r}")
    icnn = recipe.icnn
    if icnn.task == "single-category" and not icnn.object:
        raise RecipeError(f"{source}: icnn.task = 'single-category' needs icnn.object, the class that is the "
                          "object (e.g. --set icnn.object=bird)")
    if icnn.task != "single-category" and icnn.object:
        raise RecipeError(f"{source}: icnn.object is set but icnn.task is {icnn.task!r}; "
                          "set icnn.task = 'single-category' or remove icnn.object")
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Return ``recipe`` as nested plain dicts (lists copied), the inverse of :func:`recipe_from_dict`."""
    return dataclasses.asdict(recipe)


# ---------------------------------------------------------------------------------------------------------
# TOML in and out


def _split_override(text: str) -> tuple[list[str], str]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {text!r}: expected section.key=value, e.g. --set train.epochs=3")
    return key.split("."), raw.strip()


def _parse_override_value(raw: str, tp: Any) -> Any:
    """Parse ``raw`` as a TOML value, falling back to the bare string (``--set model.arch=vgg11``)."""
    if raw.lower() in _NONE_WORDS and _accepts_none(tp):
        return None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    # `--set train.device=cuda` parses as a string anyway; this catches e.g. `--set model.arch=1` for a
    # str field, where the user meant the text.
    try:
        _coerce(value, tp)
    except _Mismatch:
        try:
            _coerce(raw, tp)
            return raw
        except _Mismatch:
            pass
    return value


def _apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> None:
    hints = typing.get_type_hints(Recipe)
    for text in overrides:
        path, raw = _split_override(text)
        source = f"--set {text}"
        if len(path) != 2:
            raise RecipeError(f"{source}: expected section.key=value, e.g. --set train.epochs=3")
        section, key = path
        if section not in hints:
            raise RecipeError(
                f"{source}: unknown section '{section}'; {_suggest(section, list(hints))}"
                f"valid sections: {', '.join(hints)}"
            )
        section_cls = hints[section]
        field_hints = typing.get_type_hints(section_cls)
        if key not in field_hints:
            valid = [f"{section}.{name}" for name in field_hints]
            raise RecipeError(
                f"{source}: unknown key '{section}.{key}'; {_suggest(f'{section}.{key}', valid)}"
                f"valid keys: {', '.join(valid)}"
            )
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise RecipeError(f"{source}: '{section}' must be a table in the recipe")
        table[key] = _parse_override_value(raw, field_hints[key])
        # validate right away so the error names the override rather than the file
        _from_dict(section_cls, {key: table[key]}, prefix=f"{section}.", source=source)


def load_recipe(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Recipe:
    """Return the Recipe in TOML file ``path`` (None: the defaults) with ``--set`` overrides applied.

    Args:
        path: a TOML file with sections ``[model] [data] [train] [pretrain] [icnn] [prune]``.
        overrides: ``"section.key=value"`` strings; the value is read as TOML, else as a bare string, and
            ``none``/``null`` clears an optional field (``--set model.weights=none``).
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise RecipeError(f"recipe not found: {path}") from None
        except IsADirectoryError:
            raise RecipeError(f"recipe {path} is a directory; pass a .toml file") from None
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"{path}: not valid TOML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise RecipeError(f"{path}: not valid TOML (not UTF-8 text): {exc}") from exc
    recipe = recipe_from_dict(data, source=source)  # the file's own errors name the file
    if overrides:
        data = recipe_to_dict(recipe)
        _apply_overrides(data, overrides)
        recipe = recipe_from_dict(data, source=f"{source} with --set {' '.join(overrides)}")
    return recipe


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value)  # Python's repr is valid TOML: 0.001, 1e-05, inf, -inf
    if isinstance(value, str):
        # A JSON string is a TOML basic string, once DEL (which TOML wants escaped) is escaped; no
        # ensure_ascii, as TOML has no surrogate-pair escapes.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def recipe_to_toml(recipe: Recipe) -> str:
    """Return ``recipe`` as TOML text that :func:`load_recipe` reads back to an equal Recipe."""
    lines: list[str] = []
    for section in dataclasses.fields(recipe):
        sub = getattr(recipe, section.name)
        if lines:
            lines.append("")
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if value is None:
                # TOML has no null: an unset optional is left out and loads back as its default, which is
                # None for every Optional field (tests/test_config.py checks that invariant).
                lines.append(f"# {f.name} = (unset)")
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
