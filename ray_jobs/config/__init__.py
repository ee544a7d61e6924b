"""Validated configuration: the run-config model, override parsing and merging, the strict base.

- :mod:`ray_jobs.config.run`: the run config (:class:`Config`), YAML loading with ``extends``
  and shipped short names (``--config acdc_cpu``; files in ``ray_jobs/configs/<stage>/``);
- :mod:`ray_jobs.config.overrides`: ``--set KEY=VALUE`` parsing and deep merging, used by run
  configs, campaigns, studies and job submission;
- :mod:`ray_jobs.config.strict`: :class:`Strict`, the base of every config model, and the one
  error formatter.

The run config's names are re-exported here (``from ray_jobs.config import Config``).
"""

from __future__ import annotations

from ray_jobs.config.execution import CheckpointSection, LoggingSection, RuntimeSection, ScalingSection
from ray_jobs.config.overrides import apply_overrides, deep_merge, get_path, overrides_to_tree, set_path
from ray_jobs.config.run import (
    CONFIG_ROOT,
    STAGE_DIRS,
    Config,
    DataConfig,
    EvaluateConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    SelfTrainingConfig,
    SplitsConfig,
    StageConfig,
    load_config,
    load_yaml,
    method_registry,
    resolve_config_path,
    validate,
    validate_method,
)
from ray_jobs.config.strict import Strict, format_validation_error

__all__ = [
    "CONFIG_ROOT",
    "STAGE_DIRS",
    "CheckpointSection",
    "Config",
    "DataConfig",
    "EvaluateConfig",
    "LoggingSection",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "RuntimeSection",
    "ScalingSection",
    "ScheduleConfig",
    "SelfTrainingConfig",
    "SplitsConfig",
    "StageConfig",
    "Strict",
    "apply_overrides",
    "deep_merge",
    "format_validation_error",
    "get_path",
    "load_config",
    "load_yaml",
    "method_registry",
    "overrides_to_tree",
    "resolve_config_path",
    "set_path",
    "validate",
    "validate_method",
]
