"""Exported model weights: ``model.pt`` (plain state_dict) + ``model.json`` (how to rebuild it).

An exported model directory (local path or fsspec URI such as ``s3://bucket/run/finetune/model``)
holds two files:

- ``model.pt``: ``torch.save`` of a flat ``{name: Tensor}`` state_dict, all tensors on CPU.
  It is read back with ``torch.load(weights_only=True)``, so loading never unpickles arbitrary
  objects (a tampered file containing code raises instead of executing it).
- ``model.json``: the *spec*, a JSON object that says how to rebuild the ``nn.Module`` the
  weights belong to, plus what inference needs to reproduce the training preprocessing:

  ``format`` (int, this module's :data:`FORMAT_VERSION`), ``stage`` (``"pretrain"`` -> the
  network is ``localcl.methods.METHODS[name]``; ``"finetune"`` -> ``FINETUNE[name]``),
  ``name`` (method or strategy name), ``config`` (the method's pydantic Config as a dict),
  ``in_channels``, ``num_classes``, ``size`` ([H, W] of the training crop), and optionally
  ``spacing_mm`` ([sy, sx] or null), ``normalisation`` (dict), ``label_names`` ({int: str}),
  ``weights_sha256`` (filled in by :func:`export_model`) and any extra JSON-serialisable
  metadata the caller passes.

The network is rebuilt as ``Registry[name](Config(**config), in_channels, num_classes)`` and the
weights are loaded with ``strict=True``; the SHA-256 of ``model.pt`` is checked against the spec.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from typing import Any

import fsspec
import torch
from torch import nn

from localcl.methods import FINETUNE, METHODS
from ray_jobs.errors import UserError
from storage.remote import join_uri

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.pt"
SPEC_FILE = "model.json"
REQUIRED_SPEC_KEYS = ("stage", "name", "config", "in_channels", "num_classes", "size")
STAGES = ("pretrain", "finetune")


def unwrap(module: nn.Module) -> nn.Module:
    """The module without DDP/compile wrappers (``.module`` / ``._orig_mod``)."""
    while True:
        if hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def _validate_spec(spec: Mapping[str, Any], where: str) -> None:
    missing = [k for k in REQUIRED_SPEC_KEYS if k not in spec]
    if missing:
        raise UserError(f"{where}: model spec is missing key(s) {missing}")
    if spec["stage"] not in STAGES:
        raise UserError(f"{where}: spec 'stage' must be one of {STAGES}, got {spec['stage']!r}")
    if not isinstance(spec["config"], dict):
        raise UserError(f"{where}: spec 'config' must be a JSON object")
    for key in ("in_channels", "num_classes"):
        if not isinstance(spec[key], int) or spec[key] < 1:
            raise UserError(f"{where}: spec '{key}' must be a positive int, got {spec[key]!r}")


def export_model(directory: str, module: nn.Module, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``module``'s weights and ``spec`` to ``directory`` (created if needed).

    Args:
        directory: local path or fsspec URI of the model directory.
        module: the network (a DDP wrapper is unwrapped); its ``state_dict()`` is saved on CPU.
        spec: how to rebuild the network, see the module docstring; must be JSON-serialisable.

    Returns:
        The spec as written (with ``format`` and ``weights_sha256`` added).
    """
    where = str(directory)
    _validate_spec(spec, where)
    state = {k: v.detach().to("cpu").clone() for k, v in unwrap(module).state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    out = dict(spec)
    out["format"] = FORMAT_VERSION
    out["weights_sha256"] = hashlib.sha256(data).hexdigest()
    text = json.dumps(out, indent=2, sort_keys=True, default=_json_default)
    fs, root = fsspec.core.url_to_fs(where)
    fs.makedirs(root, exist_ok=True)
    with fs.open(join_uri(root, WEIGHTS_FILE), "wb") as f:
        f.write(data)
    with fs.open(join_uri(root, SPEC_FILE), "w") as f:
        f.write(text)
    written: dict[str, Any] = json.loads(text)
    return written


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable in a model spec: {type(obj).__name__}")


def read_spec(directory: str) -> dict[str, Any]:
    """The validated ``model.json`` of an exported model directory."""
    fs, root = fsspec.core.url_to_fs(str(directory))
    path = join_uri(root, SPEC_FILE)
    if not fs.exists(path):
        raise UserError(f"{directory}: no {SPEC_FILE} (not an exported model directory)")
    with fs.open(path, "r") as f:
        try:
            spec: dict[str, Any] = json.load(f)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: invalid JSON ({exc})") from None
    _validate_spec(spec, path)
    if spec.get("format", FORMAT_VERSION) > FORMAT_VERSION:
        raise UserError(f"{path}: model format {spec['format']} is newer than this localcl (reads <= {FORMAT_VERSION})")
    return spec


def load_state(directory: str, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The state_dict in ``model.pt``, loaded with ``weights_only=True`` (no pickled objects)."""
    fs, root = fsspec.core.url_to_fs(str(directory))
    path = join_uri(root, WEIGHTS_FILE)
    if not fs.exists(path):
        raise UserError(f"{directory}: no {WEIGHTS_FILE}")
    with fs.open(path, "rb") as f:
        data = f.read()
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise UserError(f"{path}: SHA-256 does not match model.json (file changed or truncated)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything that is not plain tensors
        raise UserError(
            f"{path}: not a weights-only state_dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a flat dict of tensors")
    return state


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild the (untrained) network a spec describes, via the localcl registries."""
    registry = METHODS if spec["stage"] == "pretrain" else FINETUNE
    name = spec["name"]
    if name not in registry:
        raise UserError(f"model spec names unknown {spec['stage']} method {name!r}; known: {sorted(registry)}")
    cls = registry[name]
    cfg = cls.Config(**spec["config"])
    return cls(cfg, in_channels=spec["in_channels"], num_classes=spec["num_classes"])


def load_model(directory: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the network of an exported model directory and load its weights.

    Returns:
        ``(module, spec)`` with ``module`` in eval mode on ``device``.
    """
    spec = read_spec(directory)
    state = load_state(directory, spec.get("weights_sha256"))
    module = build_model(spec)
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f"{directory}: weights do not fit the network of model.json "
            f"(missing {list(result.missing_keys)[:5]}, unexpected {list(result.unexpected_keys)[:5]})"
        )
    return module.to(device).eval(), spec
