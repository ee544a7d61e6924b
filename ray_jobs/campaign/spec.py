"""The campaign file: schema (:class:`Campaign`, :class:`ParamSpec`, objective, scheduler,
resources), loading with ``--set`` overrides, and validation of the search space against the
run config and the method's ``Config`` (before any trial starts).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ray_jobs import config as run_config
from ray_jobs.config import Strict, deep_merge, get_path, method_registry, set_path
from ray_jobs.errors import UserError
from ray_jobs.train.names import VAL_METRICS

#: non-empty, small enough never to be the constraint.
TRIAL_DRIVER_MEMORY = 64 * 2**20
#: Seed offset between successive driver runs of one campaign (``--resume``).
SEED_STRIDE = 1000
#: Optuna user attribute marking a trial orphaned by a killed driver.
STALE_ATTR = "localcl_stale"
#: Optuna study user attribute holding the space signature.
SIGNATURE_ATTR = "localcl_space_signature"
#: Optuna study user attribute counting driver runs.
RUNS_ATTR = "localcl_runs"


def reported_metrics() -> frozenset[str]:
    """Validation metrics the training loop reports after every fine-tune epoch."""
    return frozenset(VAL_METRICS)


class CampaignError(UserError, ValueError):
    """A campaign file or search space is invalid (raised before any trial starts)."""


# ----------------------------------------------------------------------------- schema


class ParamSpec(Strict):
    """One search-space entry.

    - ``float``: uniform on ``[low, high]`` (``step`` optional: grid ``low + k*step``);
    - ``log_float``: log-uniform on ``[low, high]``, ``0 < low``;
    - ``int``: integers ``low, low+step, ..., high`` (``step`` default 1, ``log`` optional);
    - ``categorical``: one of ``choices`` (non-empty, distinct; str/int/float/bool/None).
    """

    type: Literal["float", "log_float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.type == "categorical":
            if self.low is not None or self.high is not None or self.step is not None:
                raise ValueError("categorical takes 'choices', not low/high/step")
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
            for c in self.choices:
                if c is not None and not isinstance(c, (str, int, float, bool)):
                    raise ValueError(f"choice {c!r} is not a str/int/float/bool/null")
            keys = [json.dumps(c) for c in self.choices]
            if len(set(keys)) != len(keys):
                raise ValueError(f"choices contain duplicates: {self.choices}")
            return self
        if self.choices is not None:
            raise ValueError(f"{self.type} takes low/high, not 'choices'")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs both 'low' and 'high'")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) > high ({self.high})")
        if self.type == "log_float" and self.low <= 0:
            raise ValueError(f"log_float needs low > 0, got {self.low}")
        if self.type == "log_float" and self.step is not None:
            raise ValueError("log_float cannot take a step")
        if self.type == "int":
            if self.low != int(self.low) or self.high != int(self.high):
                raise ValueError("int bounds must be integers")
            if self.log and self.low < 1:
                raise ValueError("int with log=true needs low >= 1")
            step = 1 if self.step is None else self.step
            if step != int(step) or step < 1:
                raise ValueError(f"int step must be a positive integer, got {self.step}")
            if self.log and step != 1:
                raise ValueError("int with log=true cannot take a step")
        if self.type == "float" and self.log:
            raise ValueError("use type: log_float for a log-scale float")
        if self.step is not None:
            if self.step <= 0:
                raise ValueError(f"step must be > 0, got {self.step}")
            k = (self.high - self.low) / self.step
            if abs(k - round(k)) > 1e-9 * max(1.0, abs(k)):
                raise ValueError(f"(high - low) = {self.high - self.low} is not a multiple of step {self.step}")
        return self

    def endpoints(self) -> list[Any]:
        """Values that must all be valid for the target config: bounds or every choice."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]  # type: ignore[arg-type]
        return [float(self.low), float(self.high)]  # type: ignore[arg-type]

    def grid(self) -> list[Any] | None:
        """All values of a finite space (categorical, int, float with step); else ``None``."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "int":
            step = int(self.step or 1)
            return list(range(int(self.low), int(self.high) + 1, step))  # type: ignore[arg-type]
        if self.type == "float" and self.step is not None:
            n = int(round((self.high - self.low) / self.step))  # type: ignore[operator]
            return [float(self.low + i * self.step) for i in range(n + 1)]  # type: ignore[operator]
        return None

    def distribution(self) -> Any:
        """The equivalent ``optuna.distributions`` object."""
        # deferred: optuna is slow to import; loading and checking a campaign file does not need it
        import optuna.distributions as od

        if self.type == "categorical":
            return od.CategoricalDistribution(tuple(self.choices or []))
        if self.type == "int":
            return od.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))  # type: ignore[arg-type]
        if self.type == "log_float":
            return od.FloatDistribution(float(self.low), float(self.high), log=True)  # type: ignore[arg-type]
        return od.FloatDistribution(float(self.low), float(self.high), step=self.step)  # type: ignore[arg-type]


Mode = Literal["max", "min"]


def _default_modes() -> list[Mode]:
    return ["max"]


class Objective(Strict):
    """What a trial is scored on. One metric: TPE + ASHA. Two or more: NSGA-II, no pruning."""

    metrics: list[str] = Field(default_factory=lambda: ["val_dice"], min_length=1)
    modes: list[Mode] = Field(default_factory=_default_modes, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Objective:
        if len(self.metrics) != len(self.modes):
            raise ValueError(
                f"objective.metrics ({len(self.metrics)}) and objective.modes ({len(self.modes)}) differ in length"
            )
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"objective.metrics has duplicates: {self.metrics}")
        return self

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1


class Scheduler(Strict):
    """Early stopping. ``asha`` ranks trials at rungs ``grace_period * reduction_factor**k``
    fine-tune epochs (``max_t`` = the fine-tune epoch budget of the base config unless given)."""

    type: Literal["auto", "asha", "none"] = "auto"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1.0)
    max_t: int | None = Field(None, ge=1)


class Resources(Strict):
    """Per-trial Ray Train workers; how many trials run at once follows from the cluster."""

    workers_per_trial: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_concurrent_trials: int | None = Field(None, ge=1)
    # times Tune re-runs a trial whose driver died (its node lost, preempted, OOM); the re-run
    # resumes from the trial's run directory (finished stages skipped, Train checkpoints)
    trial_retries: int = Field(2, ge=0)


class Campaign(Strict):
    """A validated campaign (see the module docstring for the YAML layout)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    method: str
    base_config: str | None = None
    base: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, ParamSpec]
    trials: int = Field(ge=1)
    seed: int = 0
    startup_trials: int | None = Field(None, ge=0)  # TPE random start-up trials (optuna default 10)
    population_size: int | None = Field(None, ge=2)  # NSGA-II population (optuna default 50)
    sampler: Literal["auto", "tpe", "nsga2", "random", "grid"] = "auto"
    # finite spaces, tpe/random: never run a configuration twice while an untried one is left
    # (trials are deterministic, a repeat teaches nothing); the campaign ends when all are tried
    repeat_configs: bool = False
    objective: Objective = Field(default_factory=Objective)
    scheduler: Scheduler = Field(default_factory=Scheduler)
    resources: Resources = Field(default_factory=Resources)
    root: str = "runs/campaigns"
    storage: str | None = None

    # filled by load_campaign (not part of the YAML)
    source: str | None = Field(None, exclude=True)

    @field_validator("space")
    @classmethod
    def _non_empty(cls, v: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        if not v:
            raise ValueError("the search space is empty: give at least one parameter")
        for k in v:
            if not k or any(not p.isidentifier() for p in k.split(".")):
                raise ValueError(f"space key {k!r} is not a dotted config path (e.g. pretrain.method.tau)")
        return v

    @model_validator(mode="after")
    def _check(self) -> Campaign:
        if self.objective.multi and self.scheduler.type == "asha":
            raise ValueError("scheduler.type=asha cannot rank a multi-objective campaign; use 'none' (or 'auto')")
        if self.sampler == "grid":
            bad = [k for k, p in self.space.items() if p.grid() is None]
            if bad:
                raise ValueError(f"sampler=grid needs finite parameters (categorical, int, float with step): {bad}")
        return self

    # --- derived ---------------------------------------------------------------------
    @property
    def campaign_dir(self) -> Path:
        return Path(self.root).expanduser().resolve() / self.name

    @property
    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{self.campaign_dir / 'study.db'}"

    @property
    def sampler_name(self) -> str:
        if self.sampler != "auto":
            return self.sampler
        return "nsga2" if self.objective.multi else "tpe"

    @property
    def scheduler_name(self) -> str:
        if self.scheduler.type != "auto":
            return self.scheduler.type
        return "none" if self.objective.multi else "asha"

    def distributions(self) -> dict[str, Any]:
        return {k: p.distribution() for k, p in self.space.items()}

    def signature(self) -> str:
        """Hash of what makes two campaigns' trials comparable: method, space, objective, base."""
        payload = {
            "method": self.method,
            "space": {k: p.model_dump() for k, p in sorted(self.space.items())},
            "objective": self.objective.model_dump(),
            "base": _comparable(self.resolved_base()),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def resolved_base(self) -> dict[str, Any]:
        """The base run config: ``base_config`` (a file, or a shipped ``run`` config name;
        ``extends`` honoured) deep-merged with ``base``; ``pretrain.method.name`` = ``method``."""
        return _resolve_base(self)

    def trial_config(self, params: dict[str, Any]) -> dict[str, Any]:
        """Base run config with ``params`` (dotted path -> value) applied."""
        cfg = copy.deepcopy(self.resolved_base())
        for path, value in params.items():
            set_path(cfg, path, value)
        return self.with_scaling(cfg)

    def with_scaling(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """``cfg`` with ``scaling`` set from ``resources`` (one trial = one Train run)."""
        r = self.resources
        per_worker: dict[str, float] = {"CPU": r.cpus_per_worker}
        if r.gpus_per_worker > 0:
            per_worker["GPU"] = r.gpus_per_worker
        scaling = dict(cfg.get("scaling") or {})
        scaling.update(num_workers=r.workers_per_trial, use_gpu=r.gpus_per_worker > 0, resources_per_worker=per_worker)
        return {**cfg, "scaling": scaling}


# ----------------------------------------------------------------------------- helpers


def _comparable(base: dict[str, Any]) -> dict[str, Any]:
    """The base config without paths and bookkeeping (name, run_dir, data.store/source,
    storage options, scaling, checkpoint, logging): what trials' scores depend on."""
    out = copy.deepcopy(base)
    for k in ("name", "run_dir", "scaling", "checkpoint", "logging"):
        out.pop(k, None)
    data = out.get("data")
    if isinstance(data, dict):
        for k in ("store", "source", "storage_options", "loader_workers"):
            data.pop(k, None)
    return out


# ----------------------------------------------------------------------------- loading


def load_campaign(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Campaign:
    """Read, validate and check a campaign YAML; every error names the file and the entry.

    Checks, all before any trial: schema (types, ``low <= high``, non-empty categorical,
    log bounds > 0), every dotted path exists for the run config / method config
    (validated by building the run config with each bound / choice), and the objective
    metric is one the training loop reports.
    """
    p = Path(path)
    if not p.is_file():
        raise CampaignError(f"campaign file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise CampaignError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise CampaignError(f"{p}: expected a YAML mapping at top level")
    raw = deep_merge(raw, overrides or {})
    try:
        campaign = Campaign(**raw, source=str(p.resolve()))
    except ValidationError as exc:
        raise CampaignError(f"{p}: " + _format_validation(exc)) from None
    validate_space(campaign)
    return campaign


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def validate_space(campaign: Campaign) -> None:
    """Every parameter must be a known field of the run config / method config, and every
    bound or choice must validate there. Raises :class:`CampaignError` naming the entry."""

    methods = method_registry("pretrain")
    if campaign.method not in methods:
        raise CampaignError(f"method: unknown method {campaign.method!r}; choose one of {sorted(methods)}")
    base = campaign.with_scaling(campaign.resolved_base())
    try:
        validate_run_config(base)
    except UserError as exc:
        raise CampaignError(f"base config of campaign {campaign.name!r} is invalid: {exc}") from None
    known = known_paths(base)
    for key, spec in campaign.space.items():
        if key not in known:
            section = key.rsplit(".", 1)[0]
            near = sorted(k for k in known if k.startswith(section + "."))
            hint = f"; {section} has: {', '.join(k.rsplit('.', 1)[1] for k in near)}" if near else ""
            raise CampaignError(f"space[{key!r}]: unknown parameter for method {campaign.method!r}{hint}")
        for value in spec.endpoints():
            cfg = copy.deepcopy(base)
            set_path(cfg, key, value)
            try:
                validate_run_config(cfg)
            except UserError as exc:
                raise CampaignError(
                    f"space[{key!r}]: value {value!r} is invalid for method {campaign.method!r}: {exc}"
                ) from None
    for metric in campaign.objective.metrics:
        if metric not in reported_metrics():
            raise CampaignError(
                f"objective.metrics: {metric!r} is not reported per fine-tune epoch; "
                f"choose from {sorted(reported_metrics())}"
            )


def validate_run_config(cfg: dict[str, Any]) -> Any:
    """``ray_jobs.config.validate`` (pydantic + method Configs); raises ``ConfigError``."""

    return run_config.validate(cfg)


def _resolve_base(campaign: Campaign) -> dict[str, Any]:

    cfg: dict[str, Any] = {}
    if campaign.base_config:
        p = Path(campaign.base_config)
        if not p.is_absolute() and campaign.source and (Path(campaign.source).parent / p).is_file():
            p = Path(campaign.source).parent / p
        try:
            cfg = run_config.load_yaml(run_config.resolve_config_path(str(p), "run"))
        except UserError as exc:
            raise CampaignError(f"base_config: {exc}") from None
    cfg = deep_merge(cfg, campaign.base)
    pre = cfg.get("pretrain")
    if isinstance(pre, dict):
        m = pre.setdefault("method", {})
        if isinstance(m, dict):
            name = m.setdefault("name", campaign.method)
            if name != campaign.method:
                raise CampaignError(
                    f"method: campaign method {campaign.method!r} differs from the base config's "
                    f"pretrain.method.name {name!r}"
                )
    return cfg


def known_paths(base: dict[str, Any]) -> set[str]:
    """Dotted paths of every leaf parameter of the run config, with ``<stage>.method.*``
    expanded to the fields of that stage's method ``Config`` (``METHODS`` for pretraining,
    ``FINETUNE`` for fine-tuning and the baseline)."""

    out: set[str] = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        for fname, finfo in model.model_fields.items():
            path = f"{prefix}{fname}"
            sub = _model_of(finfo.annotation)
            if sub is run_config.MethodConfig:
                stage = prefix.split(".")[0]
                registry = method_registry(stage)
                name = get_path(base, f"{path}.name")
                if name in registry:
                    for mf in registry[name].Config.model_fields:
                        out.add(f"{path}.{mf}")
            elif sub is not None:
                walk(sub, path + ".")
            else:
                out.add(path)

    walk(run_config.Config, "")
    return out


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``Model`` / ``Optional[Model]``, else ``None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def save_campaign(campaign: Campaign, base: dict[str, Any] | None = None) -> Path:
    """Write ``<campaign_dir>/campaign.yaml``: the campaign with its base config resolved
    (``base``, default :meth:`Campaign.resolved_base`); self-contained, so trials, ``report``
    and ``dashboard`` need nothing else."""
    d = campaign.model_dump(mode="json", exclude={"source"})
    d["base"] = campaign.resolved_base() if base is None else base
    d["base_config"] = None
    d["root"] = str(campaign.campaign_dir.parent)
    d["storage"] = campaign.storage_url
    path = campaign.campaign_dir / "campaign.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def load_campaign_dir(campaign_dir: str | os.PathLike[str]) -> Campaign:
    """The campaign saved in ``campaign_dir`` by :func:`run_campaign`."""
    p = Path(campaign_dir) / "campaign.yaml"
    if not p.is_file():
        raise CampaignError(f"{campaign_dir}: not a campaign directory (no campaign.yaml)")
    raw = yaml.safe_load(p.read_text())
    try:
        return Campaign(**raw, source=str(p.resolve()))
    except ValidationError as exc:
        raise CampaignError(f"{p}: " + _format_validation(exc)) from None


def finetune_epochs(campaign: Campaign) -> int:
    """Fine-tune epoch budget of a trial (ASHA's ``max_t``)."""
    ep = get_path(campaign.resolved_base(), "finetune.schedule.epochs")
    if ep is None:
        from ray_jobs.config import ScheduleConfig

        ep = ScheduleConfig().epochs
    return int(ep)
