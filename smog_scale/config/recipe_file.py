"""Reading recipe files: the YAML, its ``base:`` recipe and the command line's dotted overrides.

YAML with the float forms people type, one-line syntax errors, ``base:`` recipes and ``dotted.key=value``
overrides. :mod:`smog_scale.config.validation` turns what this reads into the validated schema."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

RECIPES = Path(__file__).resolve().parents[2] / "recipes"  # the shipped recipes (a source checkout)


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message names the key."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads an exponent without a dot (``5e-4``, ``3E-4``) as a string; this loader reads it as
    a float, as YAML 1.2 does, everywhere (typed fields, crop records, ``backbone_kwargs``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str, where: str) -> Any:
    """``text`` as YAML; a syntax error is one line naming ``where``, the line and the column."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML{at}: {problem}") from err


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), parse_yaml(raw, f"override {text!r}") if raw.strip() else ""


def shipped_recipes() -> str:
    """The recipes that come with the code, for error messages."""
    names = sorted(str(p.relative_to(RECIPES.parent)) for p in RECIPES.glob("*.yaml"))
    return ", ".join(names) if names else f"none found in {RECIPES}"


def read_recipe(path: Path, including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's sections. A top-level ``base: other.yaml`` (a path relative to the recipe) is read first and
    the recipe laid over it: mappings merged key by key, any other value replaced (a list of crops whole)."""
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist; recipes: {shipped_recipes()}")
    values = parse_yaml(path.read_text(), f"recipe {str(path)!r}") or {}
    if not isinstance(values, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of sections")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str) or path.resolve() in including:
        raise ConfigError(f"recipe {str(path)!r}: base must name another recipe (not itself), got {base!r}")
    return _laid_over(read_recipe(path.parent / base, (*including, path.resolve())), values)


def _laid_over(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in values.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _laid_over(merged[key], value) if both else value
    return merged
