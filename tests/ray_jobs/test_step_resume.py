"""Step checkpoints (``checkpoint.every_steps``): a worker SIGKILLed mid-epoch resumes at the
last step checkpoint, the samplers skip what the epoch already drew, and the run ends with
exactly the weights of an undisturbed run, with one worker group per stage or (slow) one for
the whole run (``scaling.one_worker_group``).

Every fit is a real Ray Train fit with 2 DDP workers on a phantom store (6 cases of 48x48x4):
a tiny IDEAL U-Net pretrained for 2 epochs x 4 steps (the slow test adds a supervised
fine-tuning of the same schedule), with a step checkpoint every 2 steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ray_jobs.config import validate
from ray_jobs.train.checkpoint import read_spec
from ray_jobs.train.loop_state import LoopPosition, resume_position, step_checkpoint_due

from evalpredict_helpers import make_phantom_store

STEPS, EPOCHS, EVERY = 4, 2, 2


def _cfg(store: str) -> Any:
    return validate(
        {
            "name": "steps",
            "data": {"store": store, "label_budget": 1, "seed": 0, "size": [32, 32]},
            "pretrain": {
                "method": {"name": "ideal", "widths": [8, 16, 16], "queue_size": 64, "proj_dim": 8},
                "schedule": {"epochs": EPOCHS, "steps_per_epoch": STEPS, "batch_size": 4, "scheduler": "cosine"},
            },
            "finetune": None,
            "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 1}},
            "checkpoint": {"num_to_keep": 2, "max_failures": 1, "every_steps": EVERY},
            "logging": {"tensorboard": False, "progress": False},
        }
    )


def _final_model(result: Any) -> dict[str, torch.Tensor]:
    st = torch.load(Path(result.checkpoint_dir) / "state.pt", map_location="cpu", weights_only=True)
    assert st["loop"]["epoch"] == EPOCHS + 1 and st["loop"]["step"] == 0
    model: dict[str, torch.Tensor] = st["model"]
    return model


def test_step_checkpoint_schedule__every_n_steps_but_not_the_epoch_end() -> None:
    assert [s for s in range(1, 7) if step_checkpoint_due(2, s, 6)] == [2, 4]
    assert not any(step_checkpoint_due(None, s, 6) for s in range(1, 7))
    # checkpoints written before step checkpoints existed resume at the next epoch
    assert resume_position({"epoch": 3, "global_step": 30}) == LoopPosition(epoch=4, global_step=30)


def test_worker_sigkill_mid_epoch__resumes_at_the_step_checkpoint(ray_cluster, tmp_path: Path) -> None:
    from ray_jobs.train.pipeline import prepare_data
    from ray_jobs.train.stage import loop_spec
    from ray_jobs.train.trainer import fit_stage

    _, store = make_phantom_store(tmp_path / "data")
    cfg = _cfg(store)
    plan = prepare_data(cfg, str(tmp_path / "run"), log=lambda m: None)

    ref = fit_stage(cfg, loop_spec(cfg, plan, "pretrain"), str(tmp_path / "ref"), "pretrain", progress=False)

    # rank 1 dies after the 3rd step of epoch 2 (global step 7), once the step checkpoint of
    # global step 6 (epoch 2, step 2) is registered: one step of work is redone
    events, flag = tmp_path / "events.txt", tmp_path / "killed.flag"
    run_dir = tmp_path / "killed"
    snapshot = run_dir / "pretrain" / "steps-pretrain" / "checkpoint_manager_snapshot.json"
    kill = {"rank": 1, "epoch": 2, "step": 2, "flag": str(flag), "snapshot": str(snapshot), "global_step": 6}
    spec = loop_spec(cfg, plan, "pretrain", hooks={"events": str(events), "kill": kill})
    got = fit_stage(cfg, spec, str(run_dir), "pretrain", progress=False)

    assert flag.exists(), "the kill hook never fired"
    lines = events.read_text().splitlines()
    # the restarted worker group resumed inside epoch 2 at global step 6, not at the epoch start
    assert "0 resume_step 6" in lines and "1 resume_step 6" in lines, lines
    assert [r["epoch"] for r in got.history] == [1, 2]
    assert [r["start_epoch"] for r in got.history] == [1, 2]
    # same data, same RNG streams, same LR schedule: bit-identical weights and epoch metrics
    want, have = _final_model(ref), _final_model(got)
    assert want.keys() == have.keys()
    diff = {k: (want[k].double() - have[k].double()).abs().max().item() for k in want if want[k].numel()}
    assert all(torch.equal(want[k], have[k]) for k in want), {k: d for k, d in diff.items() if d}
    assert [r["loss"] for r in got.history] == pytest.approx([r["loss"] for r in ref.history], abs=0, rel=0)
    assert [r["global_step"] for r in got.history] == [STEPS, 2 * STEPS]


def _chain_cfg(store: str) -> Any:
    """:func:`_cfg` plus a tiny supervised fine-tuning of the same schedule."""
    base = _cfg(store).to_dict()
    base["finetune"] = {
        "method": {"name": "supervised", "widths": [8, 16, 16]},
        "schedule": {"epochs": EPOCHS, "steps_per_epoch": STEPS, "batch_size": 4, "scheduler": "cosine"},
    }
    return validate(base)


@pytest.mark.slow
def test_one_worker_group__same_weights_as_one_group_per_stage_and_each_kill_resumes_exactly(
    ray_cluster, tmp_path: Path
) -> None:
    """(Slow: 5 worker-group starts, about 60 s; the default suite has the one-group-per-stage
    case above and ``test_e2e.py::test_cli__address_driver_killed_then_rerun_resumes``, which
    resumes a one-worker-group run.) Pretraining then fine-tuning, twice, each run with one
    worker SIGKILLed once:

    - run A, one worker group per stage (``fit_stage``): rank 1 dies in pretraining epoch 2 after
      step 7, once the step-6 checkpoint is registered; the restarted group resumes there;
    - run B, both stages in ONE worker group (``scaling.one_worker_group``, ``fit_chain``): rank 1
      dies at the same place of fine-tuning; the restarted group skips the pretraining its
      workers exported (it trains once) and resumes fine-tuning at its step-6 checkpoint.

    Same data, RNG streams and LR schedules: both runs export bit-identical models, so each
    resume is exact against the other run's undisturbed stage, and one worker group gives what
    one group per stage gives."""
    from ray_jobs.train.pipeline import prepare_data
    from ray_jobs.train.stage import ChainStep, export_stage, loop_spec, stage_model_dir
    from ray_jobs.train.trainer import fit_chain, fit_stage

    _, store = make_phantom_store(tmp_path / "data")
    cfg = _chain_cfg(store)
    plan = prepare_data(cfg, str(tmp_path / "run"), log=lambda m: None)
    dirs = {run: str(tmp_path / run) for run in ("a", "b")}
    snapshot = {
        "a": Path(dirs["a"]) / "pretrain" / "steps-pretrain" / "checkpoint_manager_snapshot.json",
        "b": Path(dirs["b"]) / "stages" / "steps-stages" / "checkpoint_manager_snapshot.json",
    }
    events = {(run, s): tmp_path / f"{run}-{s}.events" for run in dirs for s in ("pretrain", "finetune")}

    def hooks(run: str, section: str, kill: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"events": str(events[run, section])}
        if kill:  # rank 1 dies after the 3rd step of epoch 2 (global step 7), once step 6's checkpoint is registered
            flag = str(tmp_path / f"{run}.killed")
            out["kill"] = {
                "rank": 1,
                "epoch": 2,
                "step": 2,
                "flag": flag,
                "snapshot": str(snapshot[run]),
                "global_step": 6,
            }
        return out

    def init(run: str) -> dict[str, Any]:
        return {"kind": "backbone", "dir": stage_model_dir(dirs[run], "pretrain")}

    spec = loop_spec(cfg, plan, "pretrain", hooks=hooks("a", "pretrain", kill=True))
    a_pre = fit_stage(cfg, spec, dirs["a"], "pretrain", progress=False)
    export_stage(cfg, plan, "pretrain", a_pre.checkpoint_dir, stage_model_dir(dirs["a"], "pretrain"))
    spec = loop_spec(cfg, plan, "finetune", init=init("a"), hooks=hooks("a", "finetune", kill=False))
    a_ft = fit_stage(cfg, spec, dirs["a"], "finetune", progress=False)
    export_stage(cfg, plan, "finetune", a_ft.checkpoint_dir, stage_model_dir(dirs["a"], "finetune"))
    steps = [
        ChainStep(
            spec=loop_spec(cfg, plan, "pretrain", hooks=hooks("b", "pretrain", kill=False)),
            run_dir=dirs["b"],
        ),
        ChainStep(
            spec=loop_spec(cfg, plan, "finetune", init=init("b"), hooks=hooks("b", "finetune", kill=True)),
            run_dir=dirs["b"],
        ),
    ]
    b = fit_chain(cfg, steps, dirs["b"], progress=False)

    assert (tmp_path / "a.killed").exists() and (tmp_path / "b.killed").exists(), "a kill hook never fired"
    lines = {key: path.read_text().splitlines() for key, path in events.items()}
    # the restarted worker groups resumed inside epoch 2 at global step 6, not at the epoch start
    for key in (("a", "pretrain"), ("b", "finetune")):
        assert "0 resume_step 6" in lines[key] and "1 resume_step 6" in lines[key], (key, lines[key])
    for key in (("a", "finetune"), ("b", "pretrain")):  # undisturbed: one start, every step once
        assert lines[key].count("0 start 1") == 1 and lines[key].count(f"0 step {EPOCHS * STEPS}") == 1, lines[key]
    histories = {("a", "pretrain"): a_pre.history, ("a", "finetune"): a_ft.history}
    histories.update({("b", s): b[s].history for s in ("pretrain", "finetune")})
    for (run, section), history in histories.items():
        assert [r["epoch"] for r in history] == [1, 2]
        assert [r["global_step"] for r in history] == [STEPS, 2 * STEPS]
        resumed = (run, section) in (("a", "pretrain"), ("b", "finetune"))
        assert [r["start_epoch"] for r in history] == ([1, 2] if resumed else [1, 1]), (run, section)
    for section in ("pretrain", "finetune"):
        assert [r["loss"] for r in histories["a", section]] == [r["loss"] for r in histories["b", section]]
        want = read_spec(stage_model_dir(dirs["a"], section))["weights_sha256"]
        assert read_spec(stage_model_dir(dirs["b"], section))["weights_sha256"] == want, section
    for section in ("pretrain", "finetune"):  # written by the workers as each stage ended
        assert (Path(dirs["b"]) / section / "history.csv").is_file(), section
    want, have = _final_model(a_ft), _final_model(b["finetune"])
    diff = {k: (want[k].double() - have[k].double()).abs().max().item() for k in want if want[k].numel()}
    assert all(torch.equal(want[k], have[k]) for k in want), {k: d for k, d in diff.items() if d}


def test_preemption__outside_a_worker_group_nothing_is_pending() -> None:
    from ray_jobs.train.loop_state import preemption_pending

    assert preemption_pending() is None


def test_wait_for_restart__fails_the_worker_once_past_the_drain_deadline() -> None:
    """After a preemption checkpoint the worker trains no further; if Ray Train has not torn
    the group down by the deadline + margin, the worker fails (Ray Train restarts it from
    that same checkpoint) instead of hanging."""
    import time
    from types import SimpleNamespace

    from ray_jobs.train.loop_state import wait_for_restart

    t0 = time.time()
    info = SimpleNamespace(deadline_ms=int((t0 + 0.3) * 1000), preempted_node_to_ranks={"n": [1]})
    with pytest.raises(RuntimeError, match="not restarted within"):
        wait_for_restart(info, poll_s=0.05, margin_s=0.2)
    assert 0.45 <= time.time() - t0 < 3.0


def test_env_hooks__events_dir_from_the_driver_environment(monkeypatch, tmp_path: Path) -> None:
    from ray_jobs.train.hooks import EVENTS_DIR_ENV, env_hooks

    monkeypatch.delenv(EVENTS_DIR_ENV, raising=False)
    assert env_hooks("pretrain") == {}
    monkeypatch.setenv(EVENTS_DIR_ENV, str(tmp_path))
    assert env_hooks("pretrain") == {"events": str(tmp_path / "pretrain.events")}
    assert env_hooks("pretrain", "global") == {"events": str(tmp_path / "pretrain-global.events")}
    assert env_hooks("finetune", "main") == {"events": str(tmp_path / "finetune.events")}


def test_default_poll_interval__half_a_second_unless_the_environment_sets_it() -> None:
    """Ray Train's controller registers a reported (step) checkpoint only when it polls its
    workers; localcl polls every 0.5 s (Ray's default is 2 s) unless the user set the variable,
    and Ray Train propagates the driver's value to the controller (it is in its list)."""
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    from ray_jobs.train.trainer import POLL_ENV, POLL_INTERVAL_S, default_poll_interval

    assert POLL_ENV in ENV_VARS_TO_PROPAGATE
    env: dict[str, str] = {}
    assert default_poll_interval(env) == str(POLL_INTERVAL_S) == env[POLL_ENV] == "0.5"
    env = {POLL_ENV: "2"}
    assert default_poll_interval(env) == "2" and env == {POLL_ENV: "2"}


def test_elastic_start_timeout__short_for_an_elastic_fit_unless_set_and_restored_after() -> None:
    """An elastic fit waits 10 s (Ray: 60 s) for a placement group that a stale view of the
    cluster asked for; a fixed-size fit and a user's value are left alone; the variable is
    propagated to the controller, and a start-up timeout is a retried controller failure that
    is not charged to max_failures (what makes a short one safe)."""
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2._internal.execution.failure_handling.default import RETRYABLE_CONTROLLER_ERRORS
    from ray.train.v2.api.config import FailureConfig

    from ray_jobs.train.trainer import ELASTIC_START_TIMEOUT_S, START_TIMEOUT_ENV, elastic_start_timeout

    assert START_TIMEOUT_ENV in ENV_VARS_TO_PROPAGATE
    assert WorkerGroupStartupTimeoutError in RETRYABLE_CONTROLLER_ERRORS
    assert FailureConfig().controller_failure_limit == -1  # unlimited
    env: dict[str, str] = {}
    with elastic_start_timeout(env, elastic=True) as v:
        assert v == env[START_TIMEOUT_ENV] == str(ELASTIC_START_TIMEOUT_S) == "10.0"
    assert env == {}
    with elastic_start_timeout(env, elastic=False) as v:
        assert v is None and env == {}
    env = {START_TIMEOUT_ENV: "45"}
    with elastic_start_timeout(env, elastic=True) as v:
        assert v == "45"
    assert env == {START_TIMEOUT_ENV: "45"}
    with pytest.raises(RuntimeError), elastic_start_timeout(env := {}, elastic=True):
        raise RuntimeError("fit failed")
    assert env == {}


@pytest.mark.parametrize(
    "metrics, message",
    [
        ({"stopped": 1, "epoch_in_progress": 2, "step": 1, "global_step": 5}, "stopped on SIGTERM at epoch 2 step 1"),
        ({"epoch": 2, "global_step": 8}, "SIGTERM arrived as the stage finished: every step was trained"),
    ],
    ids=["stopped-at-a-step", "finished-first"],
)
def test_fit_stage__sigterm_names_where_the_stage_ended(
    ray_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metrics: dict[str, Any], message: str
) -> None:
    """A SIGTERM during ``fit()`` ends the stage with ``StageStopped``: at the step the workers
    stopped after (their last report has ``stopped: 1``), or, when they finished every step
    before they saw the request, saying so instead of an unknown epoch and step."""
    import os
    import signal
    import types

    from ray_jobs.train import trainer
    from ray_jobs.train.stop import StageStopped

    class FinishedFit:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def fit(self) -> Any:
            os.kill(os.getpid(), signal.SIGTERM)  # the driver's SIGTERM, handled by fit_stage
            return types.SimpleNamespace(metrics=metrics, checkpoint=None)

    monkeypatch.setattr(trainer, "TorchTrainer", FinishedFit)
    spec = types.SimpleNamespace(model_copy=lambda update: None)
    cfg = _cfg(str(tmp_path / "store.zarr"))
    with pytest.raises(StageStopped, match=message):
        trainer.fit_stage(cfg, spec, str(tmp_path / "run"), "pretrain", progress=False)  # type: ignore[arg-type]
