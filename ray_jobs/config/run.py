"""Validated run configuration: YAML files + ``--set key=value`` overrides -> pydantic models.

A run config has these top-level sections (all optional except where a verb needs them)::

    name: ideal-acdc           # run name; Ray Train run names are "<name>-<stage>"
    run_dir: runs/ideal-acdc   # local path or fsspec URI (RUN_DIR in docs/interfaces.md)
    data:       store, source, label_budget, seed, size, spacing_mm, splits, ...
    model:      in_channels, num_classes (null: from the store's label names)
    pretrain:   {method: {name, ...Config fields}, optim, schedule, stage_schedule} (or null)
    finetune:   {method: {name, ...Config fields}, optim, schedule, self_training}  (or null)
    baseline:   true -> also fine-tune FINETUNE["supervised"] from scratch on the same budget
    evaluate:   split, ...
    scaling:    num_workers (int or elastic [min, max]), resize_interval_s, use_gpu, ...
    checkpoint: num_to_keep, max_failures, every_steps, on_preemption
    logging:    tensorboard, mlflow_uri, progress

``method`` blocks are validated by the method's own pydantic ``Config``
(``localcl.methods.METHODS[name].Config`` for pretraining, ``FINETUNE[name].Config`` for
fine-tuning), so a typo in a method parameter is rejected with the same message as a typo
anywhere else. Every error is a :class:`ray_jobs.errors.ConfigError` naming the offending key
(dotted path) and is raised while loading, i.e. before Ray starts.

Files may inherit: ``extends: <file or name>`` (resolved relative to the file, then as a shipped
config name) is loaded first and the file's keys are deep-merged over it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ray_jobs.config.execution import CheckpointSection, LoggingSection, RuntimeSection, ScalingSection
from ray_jobs.config.overrides import apply_overrides, deep_merge
from ray_jobs.config.strict import Strict, format_validation_error
from ray_jobs.errors import ConfigError

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
STAGE_DIRS = ("pretrain", "finetune", "run")


# --------------------------------------------------------------------------- sections
def method_registry(section: str) -> Mapping[str, Any]:
    """``localcl.methods.METHODS`` for the pretrain section, ``FINETUNE`` for the others."""
    # deferred: localcl.methods imports torch (seconds); loading a config for ``localcl --help``,
    # ``localcl submit`` and campaign files does not need it until a method is validated
    from localcl.methods import FINETUNE, METHODS

    return METHODS if section == "pretrain" else FINETUNE


class SplitsConfig(Strict):
    """Names of catalog splits (``store.catalog.splits``) used by the pipeline."""

    pool: str = "train"  # label budget and unlabelled pool are drawn from this split
    val: str | None = "val"  # validation Dice during fine-tuning (null: no validation)
    test: str = "val"  # evaluated after fine-tuning


class DataConfig(Strict):
    store: str | None = None  # Zarr store path/URI; null: RUN_DIR/store.zarr (ingested)
    source: str | None = None  # MSD folder to ingest when the store does not exist yet
    storage_options: dict[str, Any] = Field(default_factory=dict)
    label_budget: int = Field(2, ge=1)  # labelled patients for fine-tuning
    label_cases: list[str] | None = None  # exactly these labelled volumes (overrides label_budget)
    seed: int = Field(0, ge=0)
    size: tuple[int, int] = (192, 192)  # (H, W) crop/pad of each slice
    spacing_mm: tuple[float, float] | None = None  # in-plane resampling; null: native
    splits: SplitsConfig = Field(default_factory=SplitsConfig)
    max_unlabelled: int | None = Field(None, ge=1)  # cap the unlabelled pool (demo/tests)
    max_val_cases: int | None = Field(None, ge=1)
    max_test_cases: int | None = Field(None, ge=1)
    fg_oversample: float = Field(0.0, ge=0.0, le=1.0)
    loader_workers: int = Field(0, ge=0)  # torch DataLoader workers per Ray worker

    @field_validator("size")
    @classmethod
    def _size_ok(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 16:
            raise ValueError("each side must be >= 16 pixels")
        return v

    @field_validator("label_cases")
    @classmethod
    def _label_cases_ok(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("label_cases must list at least one case, each once")
        return v

    @field_validator("spacing_mm")
    @classmethod
    def _spacing_ok(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and min(v) <= 0:
            raise ValueError("spacing must be > 0 mm")
        return v


class ModelConfig(Strict):
    in_channels: int = Field(1, ge=1)
    num_classes: int | None = Field(None, ge=2)  # null: len(store label_names)


class OptimConfig(Strict):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float | None = Field(None, gt=0)  # null: the method Config's ``lr``
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    betas: tuple[float, float] = (0.9, 0.999)  # adam/adamw
    grad_clip: float | None = Field(None, gt=0)


class ScheduleConfig(Strict):
    """Length and shape of one training stage.

    One epoch = ``steps_per_epoch`` optimiser steps on a global batch of ``batch_size`` slices
    (each of the ``W`` workers draws ``batch_size / W``). A checkpoint is written and metrics
    are reported at the end of each epoch, and every ``checkpoint.every_steps`` steps inside it
    (:mod:`ray_jobs.train.loop_state`), so a resume redoes at most that many steps.
    """

    epochs: int = Field(10, ge=1)
    steps_per_epoch: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)  # global, split over workers
    unlabelled_batch_size: int | None = Field(None, ge=1)  # fine-tuning; null: batch_size
    scheduler: Literal["constant", "cosine", "poly"] = "constant"
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    amp: Literal["auto", "off", "bf16", "fp16"] = (
        "auto"  # auto: bf16 on CUDA if supported, fp32 on CPU; bf16 on CPU too
    )


class MethodConfig(BaseModel):
    """``{name: <registry key>, <Config fields>...}``; validated by the method's own Config."""

    model_config = ConfigDict(extra="allow")
    name: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SelfTrainingConfig(Strict):
    """PLCL self-training: pseudo-label the unlabelled pool, train, restore the best, repeat."""

    rounds: int = Field(3, ge=1)
    crf: bool = True  # dense-CRF refinement of the pseudo-labels (needs the 'crf' extra)


class StageConfig(Strict):
    method: MethodConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    # per method stage (METHODS[name].stages, e.g. GLCL "global"/"local") schedule overrides
    stage_schedule: dict[str, dict[str, Any]] = Field(default_factory=dict)
    self_training: SelfTrainingConfig | None = None
    init: str | None = None  # exported model dir to initialise from (finetune); null: pretrain


class EvaluateConfig(Strict):
    split: str | None = None  # null: data.splits.test
    plots: bool = True
    overlay_cases: int = Field(3, ge=0)
    val_hd95: bool = False  # also report mean foreground HD95 (mm) each fine-tune epoch


class Config(Strict):
    """A whole run (every stage); each CLI verb uses the sections it needs."""

    name: str = "run"
    run_dir: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: StageConfig | None = None
    finetune: StageConfig | None = None
    baseline: StageConfig | None = None  # supervised from scratch, same budget (YAML: true)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ :"):
            raise ValueError("must be non-empty without '/', '\\\\', ':' or spaces")
        return v

    def check(self) -> Config:
        """Cross-section checks and method validation (raises :class:`ConfigError`)."""
        for section in ("pretrain", "finetune", "baseline"):
            registry = method_registry(section)
            stage = getattr(self, section)
            if stage is None:
                continue
            validate_method(registry, stage.method.name, stage.method.params(), f"{section}.method", section)
            stages = tuple(getattr(registry[stage.method.name], "stages", ()) or ())
            for sname, over in stage.stage_schedule.items():
                if section != "pretrain" or sname not in stages:
                    raise ConfigError(
                        f"{section}.stage_schedule.{sname}: not a stage of method "
                        f"{stage.method.name!r} (stages: {list(stages)})"
                    )
                try:
                    ScheduleConfig(**{**stage.schedule.model_dump(), **over})
                except ValidationError as exc:
                    raise ConfigError(format_validation_error(exc, f"{section}.stage_schedule.{sname}")) from None
            if stage.self_training is not None and section != "finetune":
                raise ConfigError(f"{section}.self_training: only valid in the finetune stage")
            if stage.self_training is not None and stage.method.name != "plcl":
                raise ConfigError(
                    f"{section}.self_training: only the 'plcl' strategy trains on "
                    f"pseudo-labels (finetune.method.name is "
                    f"{stage.method.name!r})"
                )
            if section == "pretrain" and not tuple(getattr(registry[stage.method.name], "stages", ()) or ()):
                raise ConfigError(
                    f"pretrain.method.name: {stage.method.name!r} has no "
                    f"pretraining stage; remove the pretrain section and fine-tune "
                    f"directly"
                )
            bs = stage.schedule.batch_size
            sc = self.scaling
            lpb = int(getattr(self.method_config(section), "labelled_per_batch", 0) or 0)
            if lpb and lpb >= bs:
                raise ConfigError(
                    f"{section}.method.labelled_per_batch: {lpb} must be below "
                    f"{section}.schedule.batch_size ({bs}): the rest of the batch comes from the pool"
                )
            for workers in range(max(sc.min_workers, 1), max(sc.max_workers, 1) + 1):
                if lpb % workers:
                    raise ConfigError(
                        f"{section}.method.labelled_per_batch: {lpb} is not divisible by {workers} "
                        "worker(s) (every worker draws the same share of labelled slices)"
                    )
                if bs % workers:
                    raise ConfigError(
                        f"{section}.schedule.batch_size: {bs} is not divisible by "
                        + (
                            f"scaling.num_workers={workers}"
                            if not sc.elastic
                            else f"{workers} workers (scaling.num_workers=[{sc.min_workers}, {sc.max_workers}]: the global "
                            "batch is split over every world size of the elastic range)"
                        )
                    )
        if self.baseline is not None and self.baseline.method.name != "supervised":
            raise ConfigError("baseline.method.name: the baseline must be 'supervised'")
        if self.scaling.use_gpu and "GPU" in self.scaling.resources_per_worker:
            if self.scaling.resources_per_worker["GPU"] <= 0:
                raise ConfigError("scaling.resources_per_worker.GPU: must be > 0 with use_gpu")
        return self

    # ---------------------------------------------------------------- helpers
    def method_config(self, section: str) -> Any:
        """The method's validated pydantic Config object for ``section``."""
        stage: StageConfig = getattr(self, section)
        registry = method_registry(section)
        return registry[stage.method.name].Config(**stage.method.params())

    def schedule_for(self, section: str, method_stage: str | None = None) -> ScheduleConfig:
        """The schedule of ``section``, with ``stage_schedule[method_stage]`` merged in."""
        stage: StageConfig = getattr(self, section)
        over = stage.stage_schedule.get(method_stage or "", {})
        return ScheduleConfig(**{**stage.schedule.model_dump(), **over}) if over else stage.schedule

    def lr(self, section: str) -> float:
        """``<section>.optim.lr``, or the method Config's ``lr`` when that is null."""
        stage: StageConfig = getattr(self, section)
        if stage.optim.lr is not None:
            return stage.optim.lr
        return float(getattr(self.method_config(section), "lr", 1e-3))

    def to_dict(self) -> dict[str, Any]:
        tree: dict[str, Any] = self.model_dump(mode="json")
        return tree

    def to_yaml(self) -> str:
        text: str = yaml.safe_dump(self.to_dict(), sort_keys=False)  # no stream: returns the text
        return text

    def hash(self) -> str:
        """:func:`config_hash` of this config."""
        return config_hash(self.to_dict())


# run bookkeeping and execution switches: they do not change what is trained
HASH_EXCLUDED = ("run_dir", "logging", "runtime")
# fault-tolerance and execution knobs, for the same reason (and so that hashes of older runs stay valid)
HASH_EXCLUDED_KEYS = (
    ("checkpoint", "every_steps"),
    ("checkpoint", "on_preemption"),
    ("scaling", "resize_interval_s"),
    ("scaling", "one_worker_group"),
)


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 (first 16 hex) of the canonical JSON (sorted keys) of a resolved config dict
    (``Config.to_dict()``) minus :data:`HASH_EXCLUDED` sections and :data:`HASH_EXCLUDED_KEYS`.
    The one definition of a run's identity: run directories, model cards and study cells use it."""
    d = {k: v for k, v in config.items() if k not in HASH_EXCLUDED}
    for section, key in HASH_EXCLUDED_KEYS:
        if isinstance(d.get(section), Mapping):
            d[section] = {k: v for k, v in d[section].items() if k != key}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def validate_method(registry: Mapping[str, Any], name: str, params: dict[str, Any], where: str, section: str) -> Any:
    if name not in registry:
        raise ConfigError(f"{where}.name: unknown {section} method {name!r}; choose one of {sorted(registry)}")
    try:
        return registry[name].Config(**params)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------- loading
def resolve_config_path(ref: str | os.PathLike[str], stage: str | None = None) -> Path:
    """A config reference -> file: an existing path, or a shipped name such as ``ideal_cpu``
    (looked up in ``configs/<stage>/`` first, then the other stage folders)."""
    p = Path(ref)
    if p.is_file():
        return p
    name = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    dirs = [stage] if stage else []
    dirs += [d for d in STAGE_DIRS if d not in dirs]
    if len(p.parts) > 1 and p.parts[0] in STAGE_DIRS:
        cand = CONFIG_ROOT / p.parent / name
        if cand.is_file():
            return cand
    for d in dirs:
        cand = CONFIG_ROOT / d / name
        if cand.is_file():
            return cand
    shipped = sorted(f"{q.parent.name}/{q.stem}" for q in CONFIG_ROOT.glob("*/*.yaml"))
    raise ConfigError(f"--config: no file or shipped config named {str(ref)!r}; shipped: {', '.join(shipped)}")


def load_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    rel = path.parent / str(parent)
    base_path = rel if rel.is_file() else resolve_config_path(str(parent), path.parent.name)
    return deep_merge(load_yaml(base_path, _seen + (path,)), data)


def load_config(
    ref: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    stage: str | None = None,
    base: Mapping[str, Any] | None = None,
) -> Config:
    """Load, merge and validate a config. Raises :class:`ConfigError` naming the bad key."""
    data: dict[str, Any] = dict(base or {})
    if ref is not None:
        data = deep_merge(data, load_yaml(resolve_config_path(ref, stage)))
    data = apply_overrides(data, overrides)
    return validate(data)


BASE_METHOD_KEYS = ("seed", "widths", "decoder_widths", "norm", "lr")


def _expand_baseline(data: Mapping[str, Any]) -> dict[str, Any]:
    """``baseline: true`` -> the supervised strategy with the fine-tune stage's backbone keys
    (seed, widths, norm, lr), optimiser and schedule; ``false`` -> no baseline."""
    out = dict(data)
    b = out.get("baseline")
    if b is False:
        out["baseline"] = None
    elif b is True:
        ft = out.get("finetune")
        if not isinstance(ft, Mapping):
            raise ConfigError("baseline: 'true' needs a finetune section to copy from")
        m = ft.get("method") or {}
        out["baseline"] = {
            "method": {"name": "supervised", **{k: m[k] for k in BASE_METHOD_KEYS if k in m}},
            **{k: copy.deepcopy(ft[k]) for k in ("optim", "schedule") if k in ft},
        }
    return out


def _fill_method_geometry(data: Mapping[str, Any]) -> dict[str, Any]:
    """Derive method keys that only restate the data/backbone geometry, when not given:

    - ``decoder_widths`` from ``widths``: ``reversed(widths[:-1])`` (the spec's U-Net,
      widths (16, 32, 64, 128, 128, 128) -> decoder (128, 128, 64, 32, 16));
    - ``input_size`` (methods whose Config has it, e.g. GLCL's flattening global head) from a
      square ``data.size``.
    """
    out = copy.deepcopy(dict(data))
    size = (out.get("data") or {}).get("size") if isinstance(out.get("data"), Mapping) else None
    for section in ("pretrain", "finetune", "baseline"):
        st = out.get(section)
        if not isinstance(st, dict) or not isinstance(st.get("method"), dict):
            continue
        m = st["method"]
        stt = st.get("self_training")
        if section == "finetune" and isinstance(stt, dict) and m.get("name") == "plcl":
            # one source of truth: the method's rounds/crf follow self_training
            for key, default in (("rounds", 3), ("crf", True)):
                want = stt.get(key, default)
                if key in m and m[key] != want:
                    raise ConfigError(
                        f"finetune.method.{key}: {m[key]!r} contradicts "
                        f"finetune.self_training.{key}={want!r}; set it once"
                    )
                m[key] = want
        w = m.get("widths")
        if isinstance(w, (list, tuple)) and len(w) >= 2 and "decoder_widths" not in m:
            m["decoder_widths"] = list(reversed(list(w)[:-1]))
        if "input_size" not in m and isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
            reg = method_registry(section)
            cls = reg.get(str(m.get("name")))
            if cls is not None and "input_size" in cls.Config.model_fields:
                m["input_size"] = int(size[0])
    return out


def validate(data: Mapping[str, Any]) -> Config:
    data = _fill_method_geometry(_expand_baseline(data))
    try:
        cfg = Config(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    return cfg.check()
