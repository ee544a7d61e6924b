"""Dotted-key overrides and deep merging of config trees: the one implementation.

Run configs (``localcl pretrain|finetune|run --set``), campaigns (``localcl tune --set`` and the
search space's dotted keys), studies and job submission all parse ``KEY=VALUE`` strings and
merge mappings with these functions.

- :func:`parse_override`: ``"a.b.c=value"`` -> ``(["a", "b", "c"], value)``; ``value`` is parsed
  as YAML (``3`` -> int, ``[64, 64]`` -> list, ``null`` -> None, ``abc`` -> str, empty -> ``""``).
- :func:`apply_overrides`: a copy of a tree with the overrides set (sections created as needed);
  :func:`overrides_to_tree` is the same applied to an empty tree.
- :func:`deep_merge`: ``over`` merged into a copy of ``base``; nested mappings merge, everything
  else (including ``null`` over a mapping, which switches a section off) replaces.
- :func:`set_path` / :func:`get_path`: one dotted key in a tree.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from ray_jobs.errors import ConfigError

__all__ = ["apply_overrides", "deep_merge", "get_path", "overrides_to_tree", "parse_override", "set_path"]


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> ``(["a", "b", "c"], value)`` (value parsed as YAML).

    Raises :class:`ConfigError` for a missing ``=``, an empty key part or unparsable YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. pretrain.optim.lr=0.01)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}") from None
    return key.split("."), value


def set_path(tree: dict[str, Any], path: str | list[str], value: Any) -> None:
    """``tree["a"]["b"]["c"] = value`` for ``path="a.b.c"``, creating sections as needed.

    Raises :class:`ConfigError` when a prefix of the path holds a value, not a section."""
    keys = path.split(".") if isinstance(path, str) else list(path)
    node = tree
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(keys)}: {'.'.join(keys[: i + 1])} is a value ({nxt!r}), not a section")
        node = nxt
    node[keys[-1]] = value


def get_path(tree: Mapping[str, Any], path: str, default: Any = None) -> Any:
    """``tree["a"]["b"]["c"]`` for ``path="a.b.c"``, ``default`` when any key is missing."""
    node: Any = tree
    for k in path.split("."):
        if not isinstance(node, Mapping) or k not in node:
            return default
        node = node[k]
    return node


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``data`` with every ``KEY=VALUE`` of ``overrides`` set (in order)."""
    out = copy.deepcopy(dict(data))
    for item in overrides:
        keys, value = parse_override(item)
        try:
            set_path(out, keys, value)
        except ConfigError as exc:
            raise ConfigError(f"--set {exc}") from None
    return out


def overrides_to_tree(overrides: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[2, 3]"]`` -> ``{"a": {"b": 1}, "c": [2, 3]}``."""
    return apply_overrides({}, overrides)


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``; nested mappings merge, everything else replaces.
    A ``null`` over a mapping replaces it (switches a section off)."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
