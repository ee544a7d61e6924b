"""Hyperparameter campaigns: Ray Tune trials proposed by Optuna, scored by few-label Dice.

A *campaign* is a YAML file (see ``ray_jobs/configs/tune/<method>.yaml``)::

    name: ideal-acdc               # study name; also the campaign directory name
    method: ideal                  # key of localcl.methods.METHODS (= pretrain.method.name)
    base_config: ideal             # optional; a `localcl run` config (file or shipped name)
    base: {...}                    # optional; deep-merged over base_config
    space:                         # dotted paths into the run config
      pretrain.method.tau: {type: categorical, choices: [0.05, 0.1, 0.2, 0.5]}
      finetune.optim.lr:   {type: log_float, low: 1.0e-4, high: 3.0e-3}
    trials: 40
    seed: 0

Each trial applies its parameters to the base run config and runs the objective: a short
pretraining followed by a fixed-budget fine-tune on a fixed label budget, reporting validation
Dice after every fine-tune epoch (multi-fidelity: Tune's ``training_iteration`` == fine-tune
epoch). Ray Tune's ASHA scheduler stops poor trials early; Optuna's seeded TPE proposes
configurations through Ray's ``OptunaSearch``. Multi-objective campaigns (Dice up, HD95 down)
use NSGA-II and no early stopping (ASHA needs one scalar to rank rungs).

On a finite space (every parameter categorical, int, or float with a step) TPE and random
search never run a configuration twice (:mod:`ray_jobs.campaign.no_repeat`; trials are deterministic,
so a repeat would only cost a trial). Once every configuration has been tried, each one ASHA
stopped early gets one more run (ASHA's late promotion, by re-running), then the campaign
ends, possibly before ``trials``. ``repeat_configs: true`` turns this off.

Persistence has ONE source of truth: the Optuna study in RDB storage (SQLite file in the
campaign directory by default, a PostgreSQL URL on clusters). Tune's own experiment state is
*not* restored (``Tuner.restore`` and a persistent Optuna storage conflict:
``UpdateFinishedTrialError``). ``--resume`` instead:

1. marks trials left ``RUNNING`` by a killed driver as ``FAIL`` with user attribute
   ``localcl_stale=True`` and re-enqueues their parameters (``study.enqueue_trial``), so each
   unfinished trial is re-run exactly once and its stale record is never counted;
2. counts finished trials ``n_done`` (COMPLETE, PRUNED and genuinely failed trials; not stale
   ones) and runs only ``trials - n_done`` new Tune trials;
3. starts the sampler with seed ``seed + 1000 * run_index``: a fixed seed on a new Tuner would
   replay the same random start-up configurations.

Resource plan: a trial is a Tune *function* trainable that builds and fits a Ray Train
``TorchTrainer`` (the Ray 2.60 "Train inside Tune" pattern; ``Tuner(TorchTrainer)`` is broken
under Train V2). The trainable itself only waits on the Train controller, so it reserves
``{"CPU": 0, "memory": 64 MiB}`` (Ray refuses an all-zero request; the memory entry makes it
non-empty without taking a CPU). The trial's ``workers_per_trial`` Train workers reserve the
real CPUs/GPUs. ``max_concurrent_trials`` is then ``min(user cap, floor(cluster CPUs /
(workers * cpus_per_worker)), floor(cluster GPUs / (workers * gpus_per_worker)))``; a trial
that cannot fit on the cluster at all is an error before any trial starts.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from localcl.methods import FINETUNE, METHODS
from ray_jobs import config as run_config
from ray_jobs.config import deep_merge, get_path, set_path
from ray_jobs.errors import UserError
from ray_jobs.train.worker import VAL_METRICS

#: Memory reserved by the (CPU-free) trial driver: enough to make the resource request
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


class ParamSpec(BaseModel):
    """One search-space entry.

    - ``float``: uniform on ``[low, high]`` (``step`` optional: grid ``low + k*step``);
    - ``log_float``: log-uniform on ``[low, high]``, ``0 < low``;
    - ``int``: integers ``low, low+step, ..., high`` (``step`` default 1, ``log`` optional);
    - ``categorical``: one of ``choices`` (non-empty, distinct; str/int/float/bool/None).
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal["float", "log_float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> "ParamSpec":
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
        import optuna.distributions as od

        if self.type == "categorical":
            return od.CategoricalDistribution(tuple(self.choices or []))
        if self.type == "int":
            return od.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))  # type: ignore[arg-type]
        if self.type == "log_float":
            return od.FloatDistribution(float(self.low), float(self.high), log=True)  # type: ignore[arg-type]
        return od.FloatDistribution(float(self.low), float(self.high), step=self.step)  # type: ignore[arg-type]


class Objective(BaseModel):
    """What a trial is scored on. One metric: TPE + ASHA. Two or more: NSGA-II, no pruning."""

    model_config = ConfigDict(extra="forbid")

    metrics: list[str] = Field(default_factory=lambda: ["val_dice"], min_length=1)
    modes: list[Literal["max", "min"]] = Field(default_factory=lambda: ["max"], min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "Objective":
        if len(self.metrics) != len(self.modes):
            raise ValueError(f"objective.metrics ({len(self.metrics)}) and objective.modes ({len(self.modes)}) differ in length")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"objective.metrics has duplicates: {self.metrics}")
        return self

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1


class Scheduler(BaseModel):
    """Early stopping. ``asha`` ranks trials at rungs ``grace_period * reduction_factor**k``
    fine-tune epochs (``max_t`` = the fine-tune epoch budget of the base config unless given)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["auto", "asha", "none"] = "auto"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1.0)
    max_t: int | None = Field(None, ge=1)


class Resources(BaseModel):
    """Per-trial Ray Train workers; how many trials run at once follows from the cluster."""

    model_config = ConfigDict(extra="forbid")

    workers_per_trial: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_concurrent_trials: int | None = Field(None, ge=1)


class Campaign(BaseModel):
    """A validated campaign (see the module docstring for the YAML layout)."""

    model_config = ConfigDict(extra="forbid")

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
    def _check(self) -> "Campaign":
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
        scaling.update(num_workers=r.workers_per_trial, use_gpu=r.gpus_per_worker > 0,
                       resources_per_worker=per_worker)
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

    if campaign.method not in METHODS:
        raise CampaignError(f"method: unknown method {campaign.method!r}; choose one of {sorted(METHODS)}")
    base = campaign.with_scaling(campaign.resolved_base())
    try:
        _validate_run_config(base)
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
                _validate_run_config(cfg)
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


def _validate_run_config(cfg: dict[str, Any]) -> Any:
    """``ray_jobs.config.validate`` (pydantic + method Configs); raises ``ConfigError``."""

    return run_config.validate(cfg)


def _resolve_base(campaign: "Campaign") -> dict[str, Any]:

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
                registry = METHODS if stage == "pretrain" else FINETUNE
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
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


# ----------------------------------------------------------------------------- study storage


def open_storage(url: str) -> Any:
    """An ``optuna.storages.RDBStorage`` for ``url`` after checking it is reachable.

    SQLite: the parent directory must exist and be writable. Other URLs (PostgreSQL, MySQL):
    a connection is opened with a 10 s timeout. Any failure -> :class:`UserError`, before any
    trial starts.
    """
    import optuna
    import sqlalchemy

    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///"))
        if not db.parent.is_dir():
            raise UserError(f"study storage {url!r}: directory {db.parent} does not exist")
        if not os.access(db.parent, os.W_OK):
            raise UserError(f"study storage {url!r}: directory {db.parent} is not writable")
        engine_kwargs: dict[str, Any] = {}
    else:
        engine_kwargs = {"connect_args": {"connect_timeout": 10}} if url.startswith(("postgres", "mysql")) else {}
    try:
        engine = sqlalchemy.create_engine(url, **engine_kwargs)
        with engine.connect():
            pass
        engine.dispose()
    except ModuleNotFoundError as exc:
        raise UserError(f"study storage {_redact(url)!r}: database driver missing ({exc.name}); install it (e.g. psycopg2-binary for PostgreSQL)") from None
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"study storage {_redact(url)!r} is unreachable: {first}") from None
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs or None)
    except Exception as exc:  # noqa: BLE001 - surface any storage set-up failure as one line
        raise UserError(f"study storage {_redact(url)!r}: {type(exc).__name__}: {exc}") from None


def _redact(url: str) -> str:
    """Hide a password in ``scheme://user:password@host/db``."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        if ":" in cred:
            cred = cred.split(":", 1)[0] + ":***"
        return f"{scheme}://{cred}@{host}"
    return url


def study_exists(storage: Any, name: str) -> bool:
    import optuna

    return any(s.study_name == name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))


@dataclass
class ResumePlan:
    """Bookkeeping of one driver start.

    ``done``: finished trials kept (COMPLETE + PRUNED + non-stale FAIL); ``stale``: trial
    numbers found RUNNING (driver killed) and marked FAIL now; ``requeued``: parameter sets
    enqueued again (one per stale trial); ``waiting``: enqueued trials not yet started;
    ``remaining``: new Tune trials to launch (``trials - done``); ``run_index`` and ``seed``
    of this driver run.
    """

    done: int
    stale: list[int]
    requeued: list[dict[str, Any]]
    waiting: int
    remaining: int
    run_index: int
    seed: int
    existing: bool = False
    notes: list[str] = field(default_factory=list)


def check_study(campaign: Campaign, storage: Any, resume: bool) -> bool:
    """Raise :class:`UserError` when the study exists with a different space/objective/base,
    or exists and ``resume`` is false, or is missing and ``resume`` is true; return whether it
    exists. Creates nothing."""
    import optuna

    exists = study_exists(storage, campaign.name)
    if exists:
        study = optuna.load_study(study_name=campaign.name, storage=storage)
        old = study.user_attrs.get(SIGNATURE_ATTR)
        sig = campaign.signature()
        if old != sig:
            raise UserError(
                f"campaign {campaign.name!r} already exists in {_redact(campaign.storage_url)} with a different "
                f"search space/objective/base config (signature {old} != {sig}); choose a new name"
            )
        if not resume:
            raise UserError(
                f"campaign {campaign.name!r} already exists in {_redact(campaign.storage_url)}; "
                "pass --resume to continue it"
            )
    elif resume:
        raise UserError(f"campaign {campaign.name!r} not found in {_redact(campaign.storage_url)}; nothing to resume")
    return exists


def prepare_study(campaign: Campaign, storage: Any, resume: bool) -> ResumePlan:
    """Create or reopen the campaign's study and plan this driver run (see module docstring).

    Raises :class:`UserError` when the study exists with a different space/objective, or
    exists and ``resume`` is false, or does not exist and ``resume`` is true.
    """
    import optuna
    from optuna.trial import TrialState

    exists = check_study(campaign, storage, resume)
    sig = campaign.signature()
    if exists:
        study = optuna.load_study(study_name=campaign.name, storage=storage)
    else:
        directions = ["maximize" if m == "max" else "minimize" for m in campaign.objective.modes]
        study = optuna.create_study(study_name=campaign.name, storage=storage, directions=directions)
        study.set_user_attr(SIGNATURE_ATTR, sig)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(campaign.objective.metrics))

    stale: list[int] = []
    requeued: list[dict[str, Any]] = []
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == TrialState.RUNNING:
            storage.set_trial_user_attr(t._trial_id, STALE_ATTR, True)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            stale.append(t.number)
            if t.params:
                study.enqueue_trial(dict(t.params), user_attrs={"localcl_requeued_from": t.number}, skip_if_exists=False)
                requeued.append(dict(t.params))
    trials = study.get_trials(deepcopy=False)
    done = sum(
        1
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and not t.user_attrs.get(STALE_ATTR))
    )
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    run_index = int(study.user_attrs.get(RUNS_ATTR, 0))
    study.set_user_attr(RUNS_ATTR, run_index + 1)
    remaining = max(0, campaign.trials - done)
    return ResumePlan(
        done=done,
        stale=stale,
        requeued=requeued,
        waiting=waiting,
        remaining=remaining,
        run_index=run_index,
        seed=campaign.seed + SEED_STRIDE * run_index,
        existing=exists,
    )


# ----------------------------------------------------------------------------- resources


@dataclass
class ResourcePlan:
    """``trial_resources``: what the Tune trainable (the Train driver) reserves;
    ``worker_resources``: per Train worker; ``max_concurrent``: trials at once."""

    trial_resources: dict[str, float]
    worker_resources: dict[str, float]
    num_workers: int
    use_gpu: bool
    max_concurrent: int

    def describe(self) -> str:
        per_trial = {k: v * self.num_workers for k, v in self.worker_resources.items()}
        return (
            f"{self.max_concurrent} trial(s) at once x {self.num_workers} worker(s) "
            f"({per_trial} per trial; trial driver {self.trial_resources})"
        )


def plan_resources(res: Resources, cluster: dict[str, float]) -> ResourcePlan:
    """Fit trials x workers into ``cluster`` (``ray.cluster_resources()``).

    ``max_concurrent = min(cap, floor(CPU / (n*c)), floor(GPU / (n*g)) if g > 0)`` with ``n``
    workers per trial, ``c`` CPUs and ``g`` GPUs per worker. Raises :class:`UserError` if
    one trial needs more than the cluster has.
    """
    n, c, g = res.workers_per_trial, res.cpus_per_worker, res.gpus_per_worker
    cpus = float(cluster.get("CPU", 0.0))
    gpus = float(cluster.get("GPU", 0.0))
    need_cpu, need_gpu = n * c, n * g
    if need_cpu > cpus + 1e-9:
        raise UserError(
            f"resources: one trial needs {need_cpu:g} CPUs ({n} workers x {c:g}) but the cluster has {cpus:g}; "
            "lower resources.workers_per_trial or resources.cpus_per_worker"
        )
    if need_gpu > gpus + 1e-9:
        raise UserError(f"resources: one trial needs {need_gpu:g} GPUs ({n} workers x {g:g}) but the cluster has {gpus:g}")
    limit = int(math.floor(cpus / need_cpu + 1e-9))
    if need_gpu > 0:
        limit = min(limit, int(math.floor(gpus / need_gpu + 1e-9)))
    if res.max_concurrent_trials is not None:
        limit = min(limit, res.max_concurrent_trials)
    worker = {"CPU": c}
    if g > 0:
        worker["GPU"] = g
    return ResourcePlan(
        trial_resources={"CPU": 0.0, "memory": float(TRIAL_DRIVER_MEMORY)},
        worker_resources=worker,
        num_workers=n,
        use_gpu=g > 0,
        max_concurrent=max(1, limit),
    )


# ----------------------------------------------------------------------------- driver


def make_sampler(campaign: Campaign, seed: int) -> Any:
    """The Optuna sampler for ``campaign`` seeded with ``seed`` (TPE, NSGA-II, random, grid).

    TPE and random on a finite space are wrapped in :class:`ray_jobs.campaign.no_repeat.NoRepeatSampler`
    (no configuration twice) unless ``repeat_configs`` is set."""
    import optuna

    name = campaign.sampler_name
    grid = {k: p.grid() for k, p in campaign.space.items()}
    if name == "grid":
        return optuna.samplers.GridSampler(grid, seed=seed)  # type: ignore[arg-type]
    if name == "nsga2":
        kw = {} if campaign.population_size is None else {"population_size": campaign.population_size}
        return optuna.samplers.NSGAIISampler(seed=seed, **kw)
    if name == "tpe":
        kw = {} if campaign.startup_trials is None else {"n_startup_trials": campaign.startup_trials}
        base: Any = optuna.samplers.TPESampler(seed=seed, **kw)
    else:
        base = optuna.samplers.RandomSampler(seed=seed)
    if campaign.repeat_configs or grid_size(campaign) is None:
        return base
    from ray_jobs.campaign.no_repeat import NoRepeatSampler

    full = (campaign.scheduler.max_t or finetune_epochs(campaign)) if campaign.scheduler_name == "asha" else None
    return NoRepeatSampler(base, campaign.distributions(), grid, seed=seed, full_epochs=full)  # type: ignore[arg-type]


def grid_size(campaign: Campaign) -> int | None:
    """Number of points of the full grid, or ``None`` when a parameter is continuous."""
    n = 1
    for p in campaign.space.values():
        g = p.grid()
        if g is None:
            return None
        n *= len(g)
    return n


@dataclass
class CampaignResult:
    campaign_dir: Path
    plan: ResumePlan
    resources: ResourcePlan
    n_complete: int
    report_dir: Path | None


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


def run_campaign(
    campaign: Campaign,
    resume: bool = False,
    address: str | None = None,
    log: Any = print,
) -> CampaignResult:
    """Run (or resume) ``campaign`` to ``campaign.trials`` finished trials, then write the report.

    Everything that can fail on user input (space, storage URL, existing study, resources) is
    checked before the first trial starts.
    """
    campaign.campaign_dir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(campaign.storage_url)
    check_study(campaign, storage, resume)
    import ray

    from ray_jobs.train.trainer import init_ray

    init_ray(address)
    rplan = plan_resources(campaign.resources, ray.cluster_resources())
    base = prepare_data(campaign, log)
    plan = prepare_study(campaign, storage, resume)
    save_campaign(campaign, base)
    log(
        f"campaign {campaign.name}: {plan.done}/{campaign.trials} trials finished"
        + (f", {len(plan.stale)} unfinished re-queued" if plan.stale else "")
        + f"; up to {plan.remaining} more (run {plan.run_index}, seed {plan.seed})"
    )
    from ray_jobs.campaign.no_repeat import NoRepeatSampler

    remaining = plan.remaining
    sampler = make_sampler(campaign, plan.seed)
    if isinstance(sampler, NoRepeatSampler):
        log(f"space: {grid_size(campaign)} configurations, none run twice (an ASHA-stopped one gets one more "
            f"run); the campaign ends when all are used")
        import optuna

        if remaining > 0 and sampler.exhausted(optuna.load_study(study_name=campaign.name, storage=storage)):
            log("space: every configuration has been used; nothing to launch (repeat_configs: true allows repeats)")
            remaining = 0
    if remaining > 0:
        log(f"resources: {rplan.describe()}")
        _fit(campaign, storage, plan, rplan)
    report_dir = write_report(campaign.campaign_dir)
    n_complete = _count_complete(campaign, storage)
    log(f"campaign {campaign.name}: {n_complete} complete trials; report in {report_dir}")
    return CampaignResult(campaign.campaign_dir, plan, rplan, n_complete, report_dir)


def _count_complete(campaign: Campaign, storage: Any) -> int:
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=campaign.name, storage=storage)
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def build_search(campaign: Campaign, storage: Any, seed: int) -> tuple[Any, Any]:
    """The Tune search algorithm and scheduler of ``campaign``: ``OptunaSearch`` over the
    campaign's distributions with :func:`make_sampler` (seeded ``seed``) writing to the study
    ``campaign.name`` in ``storage``, and ``ASHAScheduler`` on ``training_iteration`` (= fine-tune
    epoch; rungs at ``grace_period * reduction_factor**k`` up to ``max_t``) or ``None``."""
    from ray.tune.schedulers import ASHAScheduler

    obj = campaign.objective
    metric: str | list[str] = obj.metrics if obj.multi else obj.metrics[0]
    mode: str | list[str] = list(obj.modes) if obj.multi else obj.modes[0]
    searcher = _tracked_search_cls()(
        space=campaign.distributions(),
        metric=metric,
        mode=mode,  # type: ignore[arg-type]
        sampler=make_sampler(campaign, seed),
        study_name=campaign.name,
        storage=storage,
    )
    scheduler = None
    if campaign.scheduler_name == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            metric=obj.metrics[0],
            mode=obj.modes[0],
            max_t=campaign.scheduler.max_t or finetune_epochs(campaign),
            grace_period=campaign.scheduler.grace_period,
            reduction_factor=campaign.scheduler.reduction_factor,
        )
    return searcher, scheduler


def _fit(campaign: Campaign, storage: Any, plan: ResumePlan, rplan: ResourcePlan) -> None:
    from ray import tune

    searcher, scheduler = build_search(campaign, storage, plan.seed)
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_fn,
            campaign_yaml=str(campaign.campaign_dir / "campaign.yaml"),
        ),
        rplan.trial_resources,
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=plan.remaining,
            max_concurrent_trials=rplan.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=f"run{plan.run_index}",
            storage_path=str(campaign.campaign_dir / "tune"),
            verbose=0,
        ),
    )
    tuner.fit()


def _absolute(cfg: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Local relative paths of the run config made absolute against ``base_dir`` (the
    driver's working directory): Tune runs each trial in its own working directory."""
    out = copy.deepcopy(cfg)
    for path in ("data.store", "data.source", "finetune.init", "run_dir"):
        v = get_path(out, path)
        if isinstance(v, str) and v and "://" not in v and not os.path.isabs(v):
            set_path(out, path, str((base_dir / v).resolve()))
    return out


def trial_config(campaign: Campaign, params: dict[str, Any], trial_id: str) -> dict[str, Any]:
    """The run config of one trial: base + ``params`` + the trial's scaling, run name
    ``<campaign>-<trial_id>``, no baseline, no live progress/TensorBoard, paths absolute."""
    cfg = campaign.trial_config(params)
    cfg["name"] = f"{campaign.name}-{trial_id}"
    cfg["run_dir"] = str(campaign.campaign_dir / "trials" / trial_id)
    cfg["baseline"] = None
    cfg["logging"] = {**(cfg.get("logging") or {}), "progress": False, "tensorboard": False}
    if "val_hd95" in campaign.objective.metrics:
        cfg["evaluate"] = {**(cfg.get("evaluate") or {}), "val_hd95": True}
    return cfg


def trial_fn(params: dict[str, Any], campaign_yaml: str) -> None:
    """The Tune function trainable of one trial (runs in a Ray actor with 0 CPU).

    Short pretraining, then the fixed-budget fine-tune on the base config's label budget, both
    through :func:`ray_jobs.train.pipeline.run_stages` (each a ``TorchTrainer`` of
    ``workers_per_trial`` workers). ``TuneReportCallback`` on the fine-tune stage forwards every
    epoch's ``ray.train.report`` (``val_dice`` ...) to Tune, so ASHA can stop the trial between
    epochs; the callback also forwards the checkpoint.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_jobs.train import pipeline

    campaign = load_campaign_dir(Path(campaign_yaml).parent)
    trial_id = tune.get_context().get_trial_id()
    cfg = _validate_run_config(trial_config(campaign, params, trial_id))
    stages = [s for s in ("pretrain", "finetune") if getattr(cfg, s) is not None]
    pipeline.run_stages(
        cfg,
        str(cfg.run_dir),
        stages=stages,
        finetune_callbacks=[TuneReportCallback()],
        progress=False,
        log=lambda msg: None,
    )


def prepare_data(campaign: Campaign, log: Any = print) -> dict[str, Any]:
    """Validate the base config and make sure its store exists (ingested once here, in the
    driver, so concurrent trials never race to ingest). Returns the base config with
    absolute paths and ``data.store`` set (default ``<campaign_dir>/store.zarr``)."""
    from ray_jobs.train import pipeline

    base = _absolute(campaign.resolved_base(), Path.cwd())
    if not get_path(base, "data.store"):
        set_path(base, "data.store", str(campaign.campaign_dir / "store.zarr"))
    cfg = _validate_run_config(campaign.with_scaling(base))
    plan = pipeline.prepare_data(cfg, str(campaign.campaign_dir), log)
    log(
        f"data: {plan.store}: {len(plan.labelled)} labelled, {len(plan.unlabelled)} unlabelled, "
        f"{len(plan.val)} validation case(s)"
    )
    if not plan.val:
        raise CampaignError("the campaign objective needs validation cases: data.splits.val is empty or null")
    return base


def _tracked_search_cls() -> type:
    """``OptunaSearch`` that also records, on each Optuna trial while it runs, the Tune trial
    id and the fine-tune epochs reached (user attributes ``tune_trial_id``, ``epochs``): Optuna's
    intermediate values miss the last result of an ASHA-stopped trial, and multi-objective
    trials get none, so trial-epochs are counted from ``epochs``. With a
    :class:`~ray_jobs.campaign.no_repeat.NoRepeatSampler` it tells Tune the search is finished once every
    configuration has been tried."""
    from ray.tune.search.optuna import OptunaSearch

    class TrackedOptunaSearch(OptunaSearch):  # type: ignore[misc]
        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            from ray_jobs.campaign.no_repeat import NoRepeatSampler

            sampler = self._ot_study.sampler
            if trial_id not in self._ot_trials and isinstance(sampler, NoRepeatSampler) and sampler.exhausted(self._ot_study):
                return self.FINISHED  # every configuration of the finite space has been tried
            return super().suggest(trial_id)

        def _mark(self, trial_id: str, result: dict[str, Any] | None) -> None:
            ot = self._ot_trials.get(trial_id)
            if ot is None or not result:
                return
            ot.set_user_attr("tune_trial_id", trial_id)
            if "training_iteration" in result:
                ot.set_user_attr("epochs", int(result["training_iteration"]))

        def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
            self._mark(trial_id, result)
            super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
            if trial_id not in self._completed_trials:
                self._mark(trial_id, result)
            super().on_trial_complete(trial_id, result=result, error=error)

    return TrackedOptunaSearch


# ----------------------------------------------------------------------------- report

#: Plots written by ``localcl tune report`` (single-objective; multi adds ``pareto_front``).
PLOTS = ("optimization_history", "parallel_coordinate", "param_importances")


def trials_table(campaign: Campaign, study: Any) -> "Any":
    """A pandas DataFrame, one row per Optuna trial: number, state, objective value(s),
    fine-tune epochs reached (``epochs``; < budget when ASHA stopped it), duration, params,
    and ``stale`` (orphaned by a killed driver and re-run)."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        vals = t.values or [None] * len(campaign.objective.metrics)
        for m, v in zip(campaign.objective.metrics, vals):
            row[m] = v
        row["epochs"] = int(t.user_attrs.get("epochs", len(t.intermediate_values)))
        row["tune_trial_id"] = t.user_attrs.get("tune_trial_id")
        row["duration_s"] = round(t.duration.total_seconds(), 1) if t.duration else None
        row["stale"] = bool(t.user_attrs.get(STALE_ATTR, False))
        for k in campaign.space:
            row[k] = t.params.get(k)
        rows.append(row)
    return pd.DataFrame(rows)


def best_trials(campaign: Campaign, study: Any) -> list[Any]:
    """Single objective: ``[study.best_trial]``. Multi: the Pareto front sorted by the first
    metric in its preferred direction (so ``[0]`` is the best-Dice Pareto trial)."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    if not campaign.objective.multi:
        return [study.best_trial]
    sign = -1.0 if campaign.objective.modes[0] == "max" else 1.0
    return sorted(study.best_trials, key=lambda t: sign * t.values[0])


def write_report(campaign_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the campaign report into ``out_dir`` (default ``<campaign_dir>/report``):

    - ``best_config.yaml``: the full validated run config of the best trial, ready for
      ``localcl run --config``;
    - ``trials.csv`` / ``trials.md``: :func:`trials_table`;
    - ``summary.json``: counts per state, best trial(s), total fine-tune trial-epochs;
    - ``plots/<name>.png`` (matplotlib) and ``plots/<name>.html`` (plotly) for
      optimisation history, parallel coordinates and parameter importances (multi-objective:
      Pareto front and one history per metric). A plot that cannot be drawn yet (e.g.
      importances with fewer than 2 complete trials) is listed under ``skipped_plots``.
    """
    import optuna

    campaign = load_campaign_dir(campaign_dir)
    out = Path(out_dir) if out_dir else campaign.campaign_dir / "report"
    (out / "plots").mkdir(parents=True, exist_ok=True)
    storage = open_storage(campaign.storage_url)
    if not study_exists(storage, campaign.name):
        raise CampaignError(f"{campaign_dir}: study {campaign.name!r} not found in {_redact(campaign.storage_url)}")
    study = optuna.load_study(study_name=campaign.name, storage=storage)
    table = trials_table(campaign, study)
    table.to_csv(out / "trials.csv", index=False)
    (out / "trials.md").write_text(_markdown_table(table))
    best = best_trials(campaign, study)
    summary: dict[str, Any] = {
        "campaign": campaign.name,
        "method": campaign.method,
        "metrics": campaign.objective.metrics,
        "modes": campaign.objective.modes,
        "sampler": campaign.sampler_name,
        "scheduler": campaign.scheduler_name,
        "trials_target": campaign.trials,
        "states": table["state"].value_counts().to_dict() if len(table) else {},
        "stale_rerun": int(table["stale"].sum()) if len(table) else 0,
        "trial_epochs": int(table.loc[~table["stale"], "epochs"].sum()) if len(table) else 0,
        "best": [{"number": t.number, "values": t.values, "params": t.params} for t in best],
    }
    if best:
        cfg = campaign.trial_config(best[0].params)
        cfg["name"] = f"{campaign.name}-best"
        cfg.pop("run_dir", None)
        validated = _validate_run_config(cfg)
        header = (
            f"# Best configuration of campaign {campaign.name!r} (trial {best[0].number}, "
            + ", ".join(f"{m}={v:.4f}" for m, v in zip(campaign.objective.metrics, best[0].values))
            + ")\n# Run it: localcl run --config best_config.yaml\n"
        )
        (out / "best_config.yaml").write_text(header + validated.to_yaml())
        summary["best_config"] = str(out / "best_config.yaml")
    summary["plots"], summary["skipped_plots"] = _plots(campaign, study, out / "plots")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return out


def _markdown_table(df: Any) -> str:
    if not len(df):
        return "(no trials)\n"
    cols = list(df.columns)

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _plots(campaign: Campaign, study: Any, out: Path) -> tuple[list[str], dict[str, str]]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization as ov
    import optuna.visualization.matplotlib as ovm
    from optuna.importance import PedAnovaImportanceEvaluator

    written: list[str] = []
    skipped: dict[str, str] = {}
    metrics = campaign.objective.metrics
    jobs: list[tuple[str, Any, Any, dict[str, Any]]] = []
    if campaign.objective.multi:
        for i, m in enumerate(metrics):
            kw = {"target": (lambda t, i=i: t.values[i]), "target_name": m}
            jobs.append((f"optimization_history_{m}", ov.plot_optimization_history, ovm.plot_optimization_history, kw))
            jobs.append((f"parallel_coordinate_{m}", ov.plot_parallel_coordinate, ovm.plot_parallel_coordinate, kw))
        jobs.append(("pareto_front", ov.plot_pareto_front, ovm.plot_pareto_front, {"target_names": metrics}))
        kw = {"target": (lambda t: t.values[0]), "target_name": metrics[0]}
    else:
        kw = {"target_name": metrics[0]}
        jobs.append(("optimization_history", ov.plot_optimization_history, ovm.plot_optimization_history, kw))
        jobs.append(("parallel_coordinate", ov.plot_parallel_coordinate, ovm.plot_parallel_coordinate, kw))
    # fANOVA needs scikit-learn; PED-ANOVA is self-contained.
    imp_kw = {**kw, "evaluator": PedAnovaImportanceEvaluator()}
    jobs.append(("param_importances", ov.plot_param_importances, ovm.plot_param_importances, imp_kw))
    n_complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    for name, plotly_fn, mpl_fn, kwargs in jobs:
        if name == "param_importances" and n_complete < 2:
            skipped[name] = f"needs >= 2 complete trials (have {n_complete})"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig = plotly_fn(study, **kwargs)
                fig.write_html(str(out / f"{name}.html"), include_plotlyjs="cdn")
                written.append(f"{name}.html")
                ax = mpl_fn(study, **kwargs)
                f = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                f.set_size_inches(max(f.get_size_inches()[0], 8), max(f.get_size_inches()[1], 5))
                f.tight_layout()
                f.savefig(out / f"{name}.png", dpi=100)
                plt.close(f)
                written.append(f"{name}.png")
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"
    return written, skipped
