"""Ray wiring: connect to / start Ray, build and fit one ``TorchTrainer`` per training stage
(or one for all of a run's stages).

- :func:`init_ray`: ``--address`` or ``RAY_ADDRESS`` -> ``ray.init(address)`` with no resource
  arguments (they are refused when connecting); otherwise a local instance on 127.0.0.1 sized
  to the job (``num_workers`` CPUs at least; :func:`start_local_ray`, whose workers know
  their cluster's address). Already-initialised Ray (tests) is reused.
- :func:`fit_stage`: ``TorchTrainer(train_func, ScalingConfig(...), TorchConfig(backend=
  "nccl" on GPU else "gloo"), RunConfig(storage_path=RUN_DIR/<stage>, name=<run>-<stage>,
  FailureConfig(max_failures), CheckpointConfig(num_to_keep)))``. No ``trainer_resources``
  (Train V2's controller uses 0 CPU). A second fit with the same name and storage path resumes
  from the last checkpoint (driver-level resume). Live progress is rendered on the driver from a
  ``ray.util.queue.Queue`` that rank 0 feeds; per-epoch metrics go to TensorBoard
  (``RUN_DIR/<stage>/tensorboard``) and ``history.csv``.
- :func:`fit_chain` (``scaling.one_worker_group``): the stages of a run in ONE such fit, in
  ``RUN_DIR/stages`` as ``<run>-stages``; the workers train them in order and export each
  (:func:`ray_jobs.train.worker.run_chain`), so Ray Train's start-up is paid once per run.
- A failed fit raises :class:`UserError` naming the root cause (lowest failing rank) and
  writes every worker's traceback to ``RUN_DIR/<stage>/failure.log``.
- ``scaling.num_workers = 0`` is Ray Train local mode (the loop runs in the driver); its
  checkpoints are kept under ``RUN_DIR/<stage>/<run>/local_checkpoints`` since local mode does
  not copy them to storage.
- Ray Train's controller polls its workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (Ray's
  default 2 s); it notices a started or finished worker group, and registers a reported
  checkpoint, only when it polls. :func:`fit_stage` sets it to :data:`POLL_INTERVAL_S` unless
  the environment already does (the driver's value is propagated to the controller).
- An elastic fit waits at most ``ELASTIC_START_TIMEOUT_S`` for a worker group that cannot be
  placed (after a lost node) before deciding its size again (:func:`elastic_start_timeout`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.fs
import ray
import ray.train
import torch
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.queue import Queue
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ray_jobs.cluster.local_head import free_port
from ray_jobs.config import Config
from ray_jobs.errors import UserError
from ray_jobs.train.stage import STATE_FILE, ChainStep, LoopSpec
from ray_jobs.train.stop import StageStopped, new_stop_request, stop_on_sigterm
from ray_jobs.train.worker import train_func
from storage.remote import env_storage_options, forwarded_env

POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_INTERVAL_S = 0.5  # Ray Train's controller poll if the environment does not set it (Ray: 2 s)
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
ELASTIC_START_TIMEOUT_S = 10.0  # an elastic fit's placement-group wait, unless set (Ray: 60 s)


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(log_to_driver=False, configure_logging=False)
    if address or os.environ.get("RAY_ADDRESS"):
        try:
            ray.init(address=address or None, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(
                f"--address {address or os.environ.get('RAY_ADDRESS')}: "
                f"cannot connect to Ray ({str(exc).splitlines()[0]})"
            ) from None
        return
    start_local_ray(num_cpus=num_cpus, **kwargs)


def start_local_ray(**init_kwargs: Any) -> str:
    """Start a new local Ray instance on 127.0.0.1 (512 MiB object store, dashboard on
    loopback) and return its GCS address ``127.0.0.1:PORT``.

    The GCS port is chosen up front (``RAY_GCS_SERVER_PORT``) and ``RAY_ADDRESS`` names it in
    the environment the raylet and therefore every worker inherit. Without that, Ray code in a
    worker that looks the cluster up by itself (Ray Train V2's ``PlacementGroupCleaner`` calls
    the State API with no address) fails with "Found multiple active Ray instances" whenever
    another Ray instance runs on the host, and the placement groups of a Train run whose
    controller died (a trial stopped by ASHA, a killed driver) are never released: later
    trials then wait for CPUs that are reserved by no one. ``address="local"`` makes
    ``ray.init`` itself ignore ``RAY_ADDRESS``; the driver's own environment is restored after.
    """
    address = f"127.0.0.1:{free_port()}"
    kwargs: dict[str, Any] = dict(object_store_memory=512 * 2**20, include_dashboard=True, dashboard_host="127.0.0.1")
    kwargs.update(init_kwargs)
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    os.environ.update(RAY_ADDRESS=address, RAY_GCS_SERVER_PORT=address.rsplit(":", 1)[1])
    try:
        ctx = ray.init(address="local", **kwargs)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    # ray.init is typed to return BaseContext; a local (non-client) init returns a RayContext
    got = ctx.address_info.get("gcs_address", address)  # type: ignore[attr-defined]
    if got != address:  # the port was taken between choosing and binding
        raise RuntimeError(f"local Ray started on {got}, not on the chosen {address}")
    return address


def worker_runtime_env() -> dict[str, Any]:
    """Runtime env of Train workers: the driver's object-storage variables (credentials,
    endpoint; :data:`storage.remote.FORWARDED_ENV`), so an ``s3://`` store or run directory
    works in workers of a Ray instance started before they were set. Empty when none is set."""
    env = forwarded_env()
    return {"env_vars": env} if env else {}


@dataclass
class StageResult:
    name: str
    storage: str
    history: list[dict[str, Any]]
    checkpoint_dir: str  # final checkpoint on this machine (state.pt, best.pt); read only


def _storage(run_dir: str, stage: str) -> tuple[str, Any]:
    """Ray storage_path + pyarrow filesystem for RUN_DIR/<stage> (local dirs made absolute).

    For ``s3://`` the file system carries the driver's ``AWS_*`` settings explicitly: it is
    pickled to Ray Train's controller actor, whose environment has only Ray's variables."""
    fs, path = fsspec.core.url_to_fs(run_dir, **env_storage_options(run_dir))
    if fs.protocol in ("file", ("file", "local")) or "file" in (fs.protocol or ()):
        full = os.path.abspath(os.path.join(path, stage))
        os.makedirs(full, exist_ok=True)
        return full, None
    pafs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    return f"{path.rstrip('/')}/{stage}", pafs


def scaling_config(cfg: Config) -> ray.train.ScalingConfig:
    """Ray Train's ``ScalingConfig`` of ``cfg.scaling``: an elastic ``[min, max]`` becomes
    ``num_workers=(min, max)`` with ``elastic_resize_monitor_interval_s=resize_interval_s``
    (Train V2: the worker group starts with what fits, at least ``min``, restarts with the
    survivors after a node loss and grows back towards ``max``)."""
    sc = cfg.scaling
    resources = dict(sc.resources_per_worker)
    if sc.use_gpu:
        resources.setdefault("GPU", 1)
    kwargs: dict[str, Any] = {}
    if sc.elastic:  # Train V2 only (ray.train.ScalingConfig is typed as V1's)
        kwargs["elastic_resize_monitor_interval_s"] = sc.resize_interval_s
    return ray.train.ScalingConfig(
        num_workers=sc.num_workers,  # type: ignore[arg-type]
        use_gpu=sc.use_gpu,
        resources_per_worker=resources if sc.num_workers else None,
        placement_strategy=sc.placement,
        **kwargs,
    )


def default_poll_interval(environ: MutableMapping[str, str]) -> str:
    """Set Ray Train's controller poll interval (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``) to
    :data:`POLL_INTERVAL_S` unless ``environ`` sets it; returns the value in force. Ray Train
    propagates the driver's value to its controller, which notices a started or finished worker
    group, and registers a reported checkpoint, only when it polls: 0.5 s instead of Ray's 2 s
    saves about 1 s per ``fit()`` (docs/benchmarks.md) and shortens the work a lost node takes
    with it (docs/failure-semantics.md)."""
    return environ.setdefault(POLL_ENV, str(POLL_INTERVAL_S))


@contextlib.contextmanager
def elastic_start_timeout(environ: MutableMapping[str, str], elastic: bool) -> Iterator[str | None]:
    """Within the block, an elastic fit (``scaling.num_workers: [min, max]``) waits at most
    :data:`ELASTIC_START_TIMEOUT_S` for its workers' placement group unless ``environ`` sets
    ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``; yields the value in force (None: Ray's 60 s).

    After a lost node, Ray Train restarts with the worker count that its (stale) view of the
    cluster still allows, and that placement group cannot be placed; the wait ends only at this
    timeout, after which the elastic policy decides again, with the survivors. The timeout
    covers only the placement group (not the workers' start-up), and a timeout is a controller
    failure that Ray Train retries without limit and does not charge to ``max_failures``, so a
    short one costs at most a retry. Ray Train propagates the driver's value to its controller
    when ``fit()`` starts; the previous value is restored after the block."""
    if not elastic or START_TIMEOUT_ENV in environ:
        yield environ.get(START_TIMEOUT_ENV)
        return
    environ[START_TIMEOUT_ENV] = str(ELASTIC_START_TIMEOUT_S)
    try:
        yield environ[START_TIMEOUT_ENV]
    finally:
        environ.pop(START_TIMEOUT_ENV, None)


def fit_stage(
    cfg: Config,
    spec: LoopSpec,
    run_dir: str,
    stage: str,
    run_name: str | None = None,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
) -> StageResult:
    """Fit one stage (``spec``, built by :func:`ray_jobs.train.stage.loop_spec`) into
    ``RUN_DIR/<stage>`` as Ray run ``run_name`` (default ``<cfg.name>-<stage>``) and return its
    history (one row per epoch) and final checkpoint. ``callbacks`` are extra Ray Train
    callbacks (e.g. Tune's ``TuneReportCallback``)."""
    name = run_name or f"{cfg.name}-{stage}"
    storage_path, storage_fs = _storage(run_dir, stage)
    local_root = None
    if cfg.scaling.num_workers == 0:  # local mode: checkpoints stay where the loop writes them
        if storage_fs is not None:
            raise UserError("scaling.num_workers=0 (local mode) needs a local run directory")
        local_root = os.path.join(storage_path, name, "local_checkpoints")
    with _fit(cfg, stage, storage_path, storage_fs, name, progress, callbacks) as run:
        spec = spec.model_copy(update={**run.update, "stage_name": stage, "local_ckpt_root": local_root})
        state, local = run.fit({"spec": spec})
    return StageResult(stage, storage_path, list(state["history"]), local)


def fit_chain(
    cfg: Config,
    steps: Sequence[ChainStep],
    run_dir: str,
    run_name: str | None = None,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
    then: tuple[Callable[[Any], None], Any] | None = None,
) -> dict[str, StageResult]:
    """Fit every stage of ``steps`` in ONE worker group (``scaling.one_worker_group``): one
    Ray Train run ``run_name`` (default ``<cfg.name>-stages``) in ``RUN_DIR/stages`` whose
    workers train the stages in order and export each to its ``model_dir``
    (:func:`ray_jobs.train.worker.run_chain`), so the run pays Ray Train's start-up once.
    Returns ``{section: StageResult}`` (every section's history; the checkpoint is the run's
    last). ``callbacks``: extra Ray Train callbacks, as in :func:`fit_stage`. ``then = (fn,
    arg)``: every worker calls ``fn(arg)`` after the last stage, in the same group (the run's
    evaluation, :func:`ray_jobs.evaluation.job.evaluate_in_worker`); ``fn`` must be a
    module-level function (it travels by reference). Not for local mode (``num_workers: 0``),
    which has no start-up to save."""
    if cfg.scaling.num_workers == 0:
        raise UserError("scaling.one_worker_group needs Ray Train workers (scaling.num_workers >= 1)")
    storage_path, storage_fs = _storage(run_dir, CHAIN_DIR)
    name = run_name or f"{cfg.name}-{CHAIN_DIR}"
    label = "+".join(s.spec.section for s in steps)
    with _fit(cfg, label, storage_path, storage_fs, name, progress, callbacks) as run:
        chain = [
            s.model_copy(update={"spec": s.spec.model_copy(update={**run.update, "stage_name": s.spec.section})})
            for s in steps
        ]
        state, local = run.fit({"chain": chain, "then": then})
    histories = {**dict(state.get("chain", {}).get("histories") or {}), steps[-1].spec.section: state["history"]}
    return {
        s.spec.section: StageResult(s.spec.section, storage_path, list(histories[s.spec.section]), local) for s in steps
    }


CHAIN_DIR = "stages"  # RUN_DIR/stages: the checkpoints of a one-worker-group run


class _Fit:
    """One ``TorchTrainer.fit()`` with its progress queue, stop request and error handling
    (:func:`_fit`); ``update`` holds the fields every :class:`LoopSpec` of the fit gets."""

    def __init__(self, cfg: Config, label: str, storage: str, fs: Any, name: str, progress: bool, callbacks: Any):
        self.cfg, self.label, self.storage, self.fs, self.name = cfg, label, storage, fs, name
        self.callbacks = list(callbacks)
        self.queue = Queue(maxsize=1000, actor_options={"num_cpus": 0}) if progress and cfg.logging.progress else None
        self.stop = new_stop_request()
        self.update: dict[str, Any] = {"progress_queue": self.queue, "stop_request": self.stop}
        self.renderer = _Progress(self.queue, label) if self.queue is not None else None

    def fit(self, loop_config: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Fit and return the final checkpoint's ``state.pt`` and its local directory."""
        cfg, sc = self.cfg, self.cfg.scaling
        default_poll_interval(os.environ)
        trainer = TorchTrainer(
            train_func,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
            scaling_config=scaling_config(cfg),
            # the ignore: mypy resolves ray.train.RunConfig to ray.air's; at run time (Train V2)
            # it is ray.train.v2's, which takes worker_runtime_env
            run_config=ray.train.RunConfig(  # type: ignore[call-arg]
                name=self.name,
                storage_path=self.storage,
                storage_filesystem=self.fs,
                callbacks=self.callbacks or None,
                worker_runtime_env=worker_runtime_env(),
                failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            ),
        )
        stage, storage_path = self.label, self.storage
        if self.renderer:
            self.renderer.start()
        try:
            log = lambda m: print(f"localcl: {m}", file=sys.stderr, flush=True)  # noqa: E731
            with stop_on_sigterm(self.stop, stage, log=log) as term, elastic_start_timeout(os.environ, sc.elastic):
                result = trainer.fit()
        except Exception as exc:  # WorkerGroupError / TrainingFailedError / ControllerError
            log_path = _write_failure(storage_path, self.fs, exc)
            raise UserError(
                f"{stage}: training failed ({_failure_summary(exc)}); full traceback in "
                f"{log_path}; re-run the same command to resume from the last "
                f"checkpoint in {storage_path}"
            ) from exc
        if term:  # the workers stopped at a step boundary after writing a checkpoint ...
            where = dict(result.metrics or {})
            if not where.get("stopped"):  # ... or finished the stage before they saw the request
                raise StageStopped(
                    f"{stage}: SIGTERM arrived as the stage finished: every step was trained and the "
                    f"last checkpoint is in {storage_path}; re-run the same command to resume from it"
                )
            raise StageStopped(
                f"{stage}: stopped on SIGTERM at epoch {where.get('epoch_in_progress', '?')} step "
                f"{where.get('step', '?')} (global step {where.get('global_step', '?')}) with a checkpoint in "
                f"{storage_path}; re-run the same command to resume there"
            )
        if result.checkpoint is None:
            raise UserError(f"{stage}: finished without a checkpoint in {storage_path}")
        if self.fs is None and os.path.isdir(result.checkpoint.path):
            local = result.checkpoint.path  # already on this machine: no copy
        else:  # object storage: download once, deleted when the driver exits
            local = result.checkpoint.to_directory()
            atexit.register(shutil.rmtree, local, True)
        state = torch.load(os.path.join(local, STATE_FILE), map_location="cpu", weights_only=True)
        return state, local

    def close(self) -> None:
        if self.stop is not None:
            ray.kill(self.stop)
        if self.renderer:
            self.renderer.stop()
        if self.queue is not None:
            try:
                self.queue.shutdown()
            except Exception:
                pass


@contextlib.contextmanager
def _fit(
    cfg: Config, label: str, storage: str, fs: Any, name: str, progress: bool, callbacks: Sequence[Any]
) -> Iterator[_Fit]:
    """A :class:`_Fit` whose actors (stop request, progress queue) end with the block."""
    run = _Fit(cfg, label, storage, fs, name, progress, callbacks)
    try:
        yield run
    finally:
        run.close()


def _failure_summary(exc: BaseException) -> str:
    """``Type: first line`` of the root cause: the lowest-rank worker's exception for a
    ``WorkerGroupError``, the controller's for a ``ControllerError``, else ``exc`` itself."""
    cause: BaseException = exc
    failures = getattr(exc, "worker_failures", None)
    if failures:
        cause = failures[min(failures)]
    elif getattr(exc, "controller_failure", None) is not None:
        cause = exc.controller_failure  # type: ignore[attr-defined]
    return f"{type(cause).__name__}: {_first_line(cause)}"


def _write_failure(storage_path: str, storage_fs: Any, exc: BaseException) -> str:
    """Write the full failure text (every worker's traceback) to ``<stage>/failure.log``."""
    parts = ["".join(traceback.format_exception(exc))]
    for rank, err in sorted((getattr(exc, "worker_failures", None) or {}).items()):
        parts.append(f"--- rank {rank} ---\n" + "".join(traceback.format_exception(err)))
    text = "\n".join(parts)
    path = f"{storage_path.rstrip('/')}/failure.log"
    try:
        if storage_fs is None:
            with open(path, "w") as f:
                f.write(text)
        else:
            with storage_fs.open_output_stream(path) as f:
                f.write(text.encode())
    except Exception:  # reporting must not mask the training failure
        return "(could not write failure.log)"
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def write_tensorboard(run_dir: str, stage: str, history: list[dict[str, Any]]) -> None:
    """Per-epoch scalars to RUN_DIR/<stage>/tensorboard (local run dirs only)."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return
    try:
        # deferred: TensorBoard is heavy to import and only used with logging.tensorboard
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: skip silently (documented)
        return
    w = SummaryWriter(os.path.join(root, stage, "tensorboard"))
    for row in history:
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)):
                w.add_scalar(f"{stage}/{k}", v, int(row["epoch"]))
    w.close()


class _Progress:
    """Driver-side live progress (rich) fed by rank 0 through a Ray queue."""

    def __init__(self, queue: Any, stage: str) -> None:
        self.queue, self.stage = queue, stage
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        cols = (
            TextColumn("[bold]{task.fields[stage]}"),
            BarColumn(),
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[rate]:.1f} samples/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        with Progress(*cols, transient=False) as bar:
            task = bar.add_task("train", total=None, stage=self.stage, epoch=0, epochs="?", loss=float("nan"), rate=0.0)
            while not self._stop.is_set():
                try:
                    items = self.queue.get_nowait_batch(self.queue.qsize())
                except Exception:
                    items = []
                for it in items:
                    total = it["epochs"] * it["steps"]
                    done = (it["epoch"] - 1) * it["steps"] + it["step"]
                    bar.update(
                        task,
                        total=total,
                        completed=done,
                        epoch=it["epoch"],
                        epochs=it["epochs"],
                        loss=it["loss"],
                        rate=it["samples_per_s"],
                    )
                self._stop.wait(0.5)
