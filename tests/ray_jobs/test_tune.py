"""Hyperparameter campaigns (ray_jobs.campaign.run, `localcl tune`).

Fast tests (no Ray): schema and space validation, study storage errors, resume bookkeeping on
a real SQLite Optuna study, resource planning, the report of a study. Ray tests (session
``ray_cluster``): a real 6-trial campaign on ACDC slices, a SIGKILLed driver resumed, and the
best configuration re-run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from ray_jobs.campaign import report as campaign_report
from ray_jobs.campaign import run as campaign_run
from ray_jobs.campaign import search as campaign_search
from ray_jobs.campaign import spec as campaign_spec
from ray_jobs.config import get_path
from ray_jobs.config.run import Config
from ray_jobs.errors import UserError
from ray_jobs.study import spec as study_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ----------------------------------------------------------------------------- helpers


def _campaign(tmp_path: Path, **kw: Any) -> campaign_spec.Campaign:
    """A campaign object built directly (no method validation): for study bookkeeping tests."""
    d: dict[str, Any] = dict(
        name="c1",
        method="ideal",
        space={
            "finetune.optim.lr": {"type": "log_float", "low": 1e-4, "high": 1e-2},
            "pretrain.method.temperature": {"type": "categorical", "choices": [0.05, 0.1, 0.2]},
        },
        trials=5,
        seed=3,
        root=str(tmp_path / "campaigns"),
    )
    d.update(kw)
    c = campaign_spec.Campaign(**d)
    c.campaign_dir.mkdir(parents=True, exist_ok=True)
    return c


def _ask_tell(study: optuna.Study, c: campaign_spec.Campaign, value: float | None) -> optuna.trial.Trial:
    t = study.ask(c.distributions())
    if value is not None:
        study.tell(t, value)
    return t


# ----------------------------------------------------------------------------- ParamSpec


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({"type": "float", "low": 2.0, "high": 1.0}, "low (2.0) > high (1.0)"),
        ({"type": "log_float", "low": 0.0, "high": 1.0}, "log_float needs low > 0"),
        ({"type": "categorical", "choices": []}, "non-empty 'choices'"),
        ({"type": "categorical"}, "non-empty 'choices'"),
        ({"type": "categorical", "choices": [1, 1]}, "duplicates"),
        ({"type": "int", "low": 1, "high": 10, "step": 4}, "not a multiple of step"),
        ({"type": "int", "low": 1.5, "high": 3}, "int bounds must be integers"),
        ({"type": "float", "low": 0.1}, "needs both 'low' and 'high'"),
        ({"type": "float", "low": 0, "high": 1, "choices": [1]}, "not 'choices'"),
        ({"type": "uniform", "low": 0, "high": 1}, "type"),
    ],
)
def test_param_spec__bad_entry_rejected(spec: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=".*") as err:
        campaign_spec.ParamSpec(**spec)
    assert needle in str(err.value)


def test_param_spec__distribution_and_grid_match_bounds() -> None:
    import optuna.distributions as od

    f = campaign_spec.ParamSpec(type="float", low=0.1, high=0.5, step=0.1)
    assert f.grid() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert f.distribution() == od.FloatDistribution(0.1, 0.5, step=0.1)
    lf = campaign_spec.ParamSpec(type="log_float", low=1e-4, high=1e-2)
    assert lf.grid() is None and lf.distribution() == od.FloatDistribution(1e-4, 1e-2, log=True)
    i = campaign_spec.ParamSpec(type="int", low=8, high=32, step=8)
    assert i.grid() == [8, 16, 24, 32] and i.endpoints() == [8, 32]
    assert i.distribution() == od.IntDistribution(8, 32, step=8)
    c = campaign_spec.ParamSpec(type="categorical", choices=["intra", "inter", None])
    assert c.endpoints() == ["intra", "inter", None]
    assert c.distribution() == od.CategoricalDistribution(("intra", "inter", None))


def test_campaign__empty_space_and_bad_key_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="search space is empty"):
        _campaign(tmp_path, space={})
    with pytest.raises(ValueError, match="not a dotted config path"):
        _campaign(tmp_path, space={"finetune..lr": {"type": "float", "low": 0, "high": 1}})


def test_campaign__multi_objective_refuses_asha(tmp_path: Path) -> None:
    obj = {"metrics": ["val_dice", "val_hd95"], "modes": ["max", "min"]}
    with pytest.raises(ValueError, match="cannot rank a multi-objective"):
        _campaign(tmp_path, objective=obj, scheduler={"type": "asha"})
    c = _campaign(tmp_path, objective=obj)
    assert c.sampler_name == "nsga2" and c.scheduler_name == "none"
    assert _campaign(tmp_path).sampler_name == "tpe" and _campaign(tmp_path).scheduler_name == "asha"


def test_campaign__grid_sampler_needs_finite_space(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sampler=grid needs finite parameters"):
        _campaign(tmp_path, sampler="grid")
    c = _campaign(
        tmp_path,
        sampler="grid",
        space={
            "finetune.optim.lr": {"type": "categorical", "choices": [1e-3, 3e-3]},
            "data.label_budget": {"type": "int", "low": 1, "high": 3},
        },
    )
    assert campaign_search.grid_size(c) == 6


# ----------------------------------------------------------------------------- storage


def test_open_storage__missing_directory_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        campaign_search.open_storage(f"sqlite:///{tmp_path}/nope/study.db")


def test_open_storage__unreachable_server_is_user_error() -> None:
    # Port 1 on loopback: connection refused at once (or the driver is missing): one clear line.
    with pytest.raises(UserError, match=r"postgresql://u:\*\*\*@127\.0\.0\.1:1/db") as err:
        campaign_search.open_storage("postgresql://u:secret@127.0.0.1:1/db")
    assert "secret" not in str(err.value)
    assert "unreachable" in str(err.value) or "driver missing" in str(err.value)


# ----------------------------------------------------------------------------- study bookkeeping


def test_prepare_study__new_then_exists_without_resume_rejected(tmp_path: Path) -> None:
    c = _campaign(tmp_path)
    storage = campaign_search.open_storage(c.storage_url)
    plan = campaign_search.prepare_study(c, storage, resume=False)
    assert (plan.done, plan.remaining, plan.run_index, plan.seed, plan.existing) == (0, 5, 0, 3, False)
    with pytest.raises(UserError, match="already exists .* pass --resume"):
        campaign_search.prepare_study(c, storage, resume=False)
    with pytest.raises(UserError, match="not found .* nothing to resume"):
        campaign_search.prepare_study(_campaign(tmp_path, name="other"), storage, resume=True)


def test_prepare_study__different_space_rejected(tmp_path: Path) -> None:
    c = _campaign(tmp_path)
    storage = campaign_search.open_storage(c.storage_url)
    campaign_search.prepare_study(c, storage, resume=False)
    changed = _campaign(tmp_path, space={"finetune.optim.lr": {"type": "log_float", "low": 1e-5, "high": 1e-2}})
    for resume in (False, True):
        with pytest.raises(UserError, match="different\\s+search space"):
            campaign_search.prepare_study(changed, storage, resume=resume)
    # the trial budget is not part of the space: a resumed campaign may be extended
    assert campaign_search.prepare_study(_campaign(tmp_path, trials=9), storage, resume=True).remaining == 9


def test_prepare_study__resume_requeues_each_unfinished_trial_once(tmp_path: Path) -> None:
    c = _campaign(tmp_path)
    storage = campaign_search.open_storage(c.storage_url)
    campaign_search.prepare_study(c, storage, resume=False)
    study = optuna.load_study(study_name=c.name, storage=storage)
    _ask_tell(study, c, 0.5)
    _ask_tell(study, c, 0.6)
    orphan_a = _ask_tell(study, c, None)  # left RUNNING: the driver "died"
    orphan_b = _ask_tell(study, c, None)
    failed = study.ask(c.distributions())
    study.tell(failed, state=TrialState.FAIL)  # a real failure: counts as done, not re-run

    plan = campaign_search.prepare_study(c, storage, resume=True)
    assert plan.stale == [orphan_a.number, orphan_b.number]
    assert plan.requeued == [orphan_a.params, orphan_b.params]
    assert (plan.done, plan.remaining, plan.run_index) == (3, 2, 1)
    assert plan.seed == c.seed + campaign_spec.SEED_STRIDE
    trials = study.get_trials()
    assert [t.state for t in trials[:5]] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] * 3
    assert [t.user_attrs.get(campaign_spec.STALE_ATTR, False) for t in trials[:5]] == [False, False, True, True, False]
    assert [t.state for t in trials[5:]] == [TrialState.WAITING] * 2

    # A second resume before anything ran: nothing new is stale, the queue is not doubled.
    plan2 = campaign_search.prepare_study(c, storage, resume=True)
    assert (plan2.stale, plan2.waiting, plan2.remaining, plan2.run_index) == ([], 2, 2, 2)
    # The next two asks pop exactly the orphans' parameters.
    popped = [study.ask(c.distributions()) for _ in range(2)]
    assert [p.params for p in popped] == [orphan_a.params, orphan_b.params]
    assert [p.user_attrs["localcl_requeued_from"] for p in popped] == [orphan_a.number, orphan_b.number]


# ----------------------------------------------------------------------------- resources


@pytest.mark.parametrize(
    "res, cluster, expect",
    [
        ({"workers_per_trial": 1}, {"CPU": 2.0}, 2),
        ({"workers_per_trial": 2}, {"CPU": 2.0}, 1),
        ({"workers_per_trial": 2, "cpus_per_worker": 2}, {"CPU": 17.0}, 4),
        ({"workers_per_trial": 1, "max_concurrent_trials": 3}, {"CPU": 16.0}, 3),
        ({"workers_per_trial": 2, "gpus_per_worker": 1}, {"CPU": 64.0, "GPU": 8.0}, 4),
        ({"workers_per_trial": 1, "gpus_per_worker": 0.5}, {"CPU": 4.0, "GPU": 1.0}, 2),
    ],
)
def test_plan_resources__trials_times_workers_fit(res: dict[str, Any], cluster: dict[str, float], expect: int) -> None:
    plan = campaign_run.plan_resources(campaign_spec.Resources(**res), cluster)
    assert plan.max_concurrent == expect
    need = {k: v * plan.num_workers * plan.max_concurrent for k, v in plan.worker_resources.items()}
    assert all(need[k] <= cluster.get(k, 0.0) + 1e-9 for k in need)
    # the trial driver takes no CPU, only a token of memory (so the request is not empty)
    assert plan.trial_resources == {"CPU": 0.0, "memory": float(campaign_spec.TRIAL_DRIVER_MEMORY)}


def test_plan_resources__trial_larger_than_cluster_is_user_error() -> None:
    with pytest.raises(UserError, match="needs 4 CPUs .* cluster has 2"):
        campaign_run.plan_resources(campaign_spec.Resources(workers_per_trial=4), {"CPU": 2.0})
    with pytest.raises(UserError, match="needs 1 GPUs"):
        campaign_run.plan_resources(campaign_spec.Resources(gpus_per_worker=1), {"CPU": 8.0})


# ----------------------------------------------------------------------------- campaign files

TUNE_CONFIGS = Path(__file__).resolve().parents[2] / "ray_jobs" / "configs" / "tune"


@pytest.mark.parametrize("path", sorted(TUNE_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_load_campaign__shipped_campaigns_validate(path: Path) -> None:
    c = campaign_spec.load_campaign(path)
    assert c.method in path.stem or path.stem == "tiny_cpu"
    assert c.space and c.trials >= 6
    base = c.resolved_base()
    assert get_path(base, "pretrain.method.name") in (None, c.method)


@pytest.mark.parametrize("name, key", [("ideal_acdc_cpu", "ideal"), ("lrc_acdc_cpu", "lrc")])
def test_load_campaign__cpu_study_campaigns_train_what_the_study_cells_train(name: str, key: str) -> None:
    # a value chosen by these campaigns is shipped in acdc_cpu.yaml, so each trial (its point
    # aside) must pretrain and fine-tune exactly as the study's 3-patient cells of that method
    c = campaign_spec.load_campaign(TUNE_CONFIGS / f"{name}.yaml")
    trial = Config.model_validate(c.trial_config({})).model_dump(mode="json")
    study = study_spec.load_study("acdc_cpu")
    budget = next(b for b in study.budgets if b.name == "3pat")
    cell = study_spec.cell_config(study, key, budget, 0, store="s", init=None).model_dump(mode="json")
    pre = study_spec.pretrain_config(study, key, store="s", budget=None, seed=0).model_dump(mode="json")
    assert trial["pretrain"] == pre["pretrain"]
    assert {**trial["finetune"], "init": None} == cell["finetune"]
    for k in ("label_budget", "seed", "size", "spacing_mm", "max_unlabelled", "splits"):
        want = {**cell["data"]["splits"], "val": "val"} if k == "splits" else cell["data"][k]
        assert trial["data"][k] == want, k


def _write_campaign(tmp_path: Path, **changes: Any) -> Path:
    d = yaml.safe_load((TUNE_CONFIGS / "tiny_cpu.yaml").read_text())
    d["base_config"] = str(TUNE_CONFIGS.parent / "run" / "ideal_cpu.yaml")
    d["root"] = str(tmp_path / "campaigns")
    for k, v in changes.items():
        d[k] = v
    p = tmp_path / "campaign.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


@pytest.mark.parametrize(
    "space, needle",
    [
        (
            {"pretrain.method.temprature": {"type": "float", "low": 0.1, "high": 0.2}},
            "space['pretrain.method.temprature']: unknown parameter for method 'ideal'; pretrain.method has: ",
        ),
        ({"pretrain.method.tau": {"type": "float", "low": 0.5, "high": 0.2}}, "low (0.5) > high (0.2)"),
        ({"pretrain.method.match": {"type": "categorical", "choices": []}}, "non-empty 'choices'"),
        (
            {"pretrain.method.match": {"type": "categorical", "choices": ["argmax", "bogus"]}},
            "space['pretrain.method.match']: value 'bogus' is invalid for method 'ideal'",
        ),
        (
            {"finetune.schedule.epochs": {"type": "int", "low": 0, "high": 3}},
            "space['finetune.schedule.epochs']: value 0 is invalid",
        ),
        (
            {"finetune.optimizer.lr": {"type": "log_float", "low": 1e-4, "high": 1e-2}},
            "space['finetune.optimizer.lr']: unknown parameter",
        ),
        ({}, "search space is empty"),
    ],
)
def test_load_campaign__bad_space_rejected_naming_entry(tmp_path: Path, space: dict[str, Any], needle: str) -> None:
    path = _write_campaign(tmp_path, space=space)
    with pytest.raises(campaign_spec.CampaignError) as err:
        campaign_spec.load_campaign(path)
    assert needle in str(err.value)


def test_load_campaign__other_errors_name_the_field(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"method": "nope"}, "method: unknown method 'nope'"),
        ({"method": "glcl"}, "differs from the base config's pretrain.method.name 'ideal'"),
        ({"objective": {"metrics": ["val_loss"], "modes": ["min"]}}, "objective.metrics: 'val_loss' is not reported"),
        ({"trials": 0}, "trials: Input should be greater than or equal to 1"),
        ({"name": "bad/name"}, "name: String should match pattern"),
        ({"base_config": "no_such_config"}, "base_config:"),
    ]
    for change, needle in cases:
        with pytest.raises(campaign_spec.CampaignError) as err:
            campaign_spec.load_campaign(_write_campaign(tmp_path, **change))
        assert needle in str(err.value), (change, str(err.value))
    with pytest.raises(campaign_spec.CampaignError, match="campaign file not found"):
        campaign_spec.load_campaign(tmp_path / "missing.yaml")


def test_cli_tune__bad_space_is_one_line_error_before_any_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ray_jobs.cli import main

    path = _write_campaign(tmp_path, space={"pretrain.method.tau": {"type": "log_float", "low": 0.0, "high": 0.5}})
    assert main(["tune", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("localcl: error:") and "log_float needs low > 0" in err and "\n" not in err
    assert not (tmp_path / "campaigns").exists()  # nothing created: no study, no trial


def test_cli_tune__unreachable_storage_is_error_before_any_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ray_jobs.cli import main

    path = _write_campaign(tmp_path, storage="postgresql://user:pw@127.0.0.1:1/optuna")
    assert main(["tune", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "study storage 'postgresql://user:***@127.0.0.1:1/optuna'" in err and "pw@" not in err


# ----------------------------------------------------------------------------- report (no Ray)


def _study_with_trials(tmp_path: Path, n: int) -> campaign_spec.Campaign:
    """The tiny campaign's study with ``n`` told trials: value = a smooth function of lr."""
    c = campaign_spec.load_campaign(_write_campaign(tmp_path))
    c.campaign_dir.mkdir(parents=True)
    storage = campaign_search.open_storage(c.storage_url)
    campaign_search.prepare_study(c, storage, resume=False)
    campaign_spec.save_campaign(c)
    study = optuna.load_study(study_name=c.name, storage=storage)
    for i in range(n):
        t = study.ask(c.distributions())
        t.set_user_attr("epochs", 1 + i % 2)
        study.tell(t, 1.0 - abs(math.log10(t.params["finetune.optim.lr"]) + 2.5))
    return c


def test_write_report__best_config_table_and_plots(tmp_path: Path) -> None:
    from ray_jobs.config import load_config

    c = _study_with_trials(tmp_path, 5)
    out = campaign_report.write_report(c.campaign_dir)
    study = optuna.load_study(study_name=c.name, storage=c.storage_url)
    best = study.best_trial
    cfg = load_config(out / "best_config.yaml")  # a valid `localcl run` config
    assert cfg.finetune.optim.lr == pytest.approx(best.params["finetune.optim.lr"])
    assert cfg.pretrain.method.params()["tau"] == best.params["pretrain.method.tau"]
    assert cfg.name == f"{c.name}-best" and cfg.pretrain.method.name == "ideal"
    import pandas as pd

    table = pd.read_csv(out / "trials.csv")
    assert list(table["number"]) == [0, 1, 2, 3, 4] and set(table["state"]) == {"COMPLETE"}
    assert table["val_dice"].max() == pytest.approx(best.value)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"][0]["number"] == best.number and summary["trial_epochs"] == 1 + 2 + 1 + 2 + 1
    for name in campaign_report.PLOTS:
        for ext in ("png", "html"):
            assert (out / "plots" / f"{name}.{ext}").stat().st_size > 1000, (name, ext)
    assert summary["skipped_plots"] == {}


def test_write_report__single_trial_skips_importances_with_reason(tmp_path: Path) -> None:
    c = _study_with_trials(tmp_path, 1)
    summary = json.loads((campaign_report.write_report(c.campaign_dir) / "summary.json").read_text())
    assert "needs >= 2 complete trials" in summary["skipped_plots"]["param_importances"]
    assert "optimization_history.png" in summary["plots"]


def test_cli_tune_dashboard__serves_the_study_on_loopback(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    c = _study_with_trials(tmp_path, 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray_jobs.cli", "tune", "dashboard", str(c.campaign_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        body = None
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    body = json.loads(r.read())
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.5)
        assert body is not None, proc.stdout.read() if proc.poll() is not None else "no answer"
        names = [s["study_name"] for s in body["study_summaries"]]
        assert c.name in names
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------- real campaigns (Ray)
# One campaign of 4 trials (the shipped tiny campaign has 6; fewer keep the suite short), 2 at
# once, 1 Ray Train worker each, on 8 real ACDC volumes at 48x48: its driver is SIGKILLed after >= 2 trials finished while others run, then `--resume` finishes
# it. Drivers run as `localcl` subprocesses (a driver must be killable) with their own Ray
# instance under a private RAY_TMPDIR, so every process they leave behind can be found and ended.

ACDC_CASES = [f"{p}_frame0{f}" for p in ("patient099", "patient038", "patient050", "patient002") for f in (1, 2)]


def _ray_env(tmpdir: str) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.update(
        RAY_TMPDIR=tmpdir,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def _end_leftovers(tmpdir: str) -> None:
    """SIGKILL processes whose command line names ``tmpdir`` (the Ray processes of a driver we
    started and killed), by pid."""
    import os
    import signal

    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if tmpdir in cmd:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture(scope="module")
def killed_and_resumed(acdc_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    import storage

    tmp = tmp_path_factory.mktemp("tune_real")
    store = str(tmp / "acdc.zarr")
    rep = storage.ingest(acdc_dir, store, cases=ACDC_CASES, progress=False, workers=1)
    assert not rep.failed, rep.failed
    d = yaml.safe_load((TUNE_CONFIGS / "tiny_cpu.yaml").read_text())
    d["base_config"] = str(TUNE_CONFIGS.parent / "run" / "ideal_cpu.yaml")
    d["base"]["data"].update(store=store, source=None)
    d["root"] = str(tmp / "campaigns")
    d["trials"] = 4  # 2 finish, 2 are killed running and re-run: every resume path, fewer fits
    # step checkpoints inside the fine-tuning epochs: their reports (no val_dice) must not
    # reach Tune (campaign.run.EpochReportCallback; forwarded, Tune fails every trial)
    d["base"]["checkpoint"]["every_steps"] = 4
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    campaign = campaign_spec.load_campaign(path)
    raytmp = tempfile.mkdtemp(prefix="lcltune", dir="/tmp")
    env = _ray_env(raytmp)
    cmd = [sys.executable, "-m", "ray_jobs.cli", "tune", "--config", str(path)]
    log1 = open(tmp / "driver1.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    states: dict[str, int] = {}
    try:
        deadline = time.time() + 1200
        while time.time() < deadline and proc.poll() is None:
            time.sleep(2)
            if not campaign.campaign_dir.joinpath("study.db").exists():
                continue
            try:
                study = optuna.load_study(study_name=campaign.name, storage=campaign.storage_url)
            except Exception:  # study not created yet
                continue
            states = {s.name: 0 for s in TrialState}
            for t in study.get_trials(deepcopy=False):
                states[t.state.name] += 1
            if states["COMPLETE"] + states["FAIL"] >= 2 and states["RUNNING"] >= 1:
                break
        assert proc.poll() is None, (
            f"driver ended before it could be killed: {(tmp / 'driver1.log').read_text()[-3000:]}"
        )
        assert states.get("RUNNING", 0) >= 1, states
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies mid-campaign
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        _end_leftovers(raytmp)
        log1.close()
    study = optuna.load_study(study_name=campaign.name, storage=campaign.storage_url)
    before = {t.number: (t.state, dict(t.params)) for t in study.get_trials()}
    raytmp2 = tempfile.mkdtemp(prefix="lcltune", dir="/tmp")
    try:
        res = subprocess.run(cmd + ["--resume"], env=_ray_env(raytmp2), capture_output=True, text=True, timeout=1800)
    finally:
        _end_leftovers(raytmp2)
    (tmp / "driver2.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return {"campaign": campaign, "before": before, "resume_out": res.stdout, "tmp": tmp}


@pytest.mark.ray
@pytest.mark.timeout(2400)
def test_campaign__killed_driver_resumes_with_every_trial_once(killed_and_resumed: dict[str, Any]) -> None:
    c: campaign_spec.Campaign = killed_and_resumed["campaign"]
    before: dict[int, tuple[TrialState, dict[str, Any]]] = killed_and_resumed["before"]
    study = optuna.load_study(study_name=c.name, storage=c.storage_url)
    trials = study.get_trials()
    stale_numbers = [n for n, (s, _) in before.items() if s == TrialState.RUNNING]
    assert stale_numbers, "the kill left no running trial to resume"
    # finished before the kill: kept unchanged
    for n, (state, params) in before.items():
        if state in (TrialState.COMPLETE, TrialState.FAIL):
            assert trials[n].state == state and trials[n].params == params
    # each orphan: marked stale and re-run exactly once with the same parameters
    for n in stale_numbers:
        assert trials[n].state == TrialState.FAIL and trials[n].user_attrs[campaign_spec.STALE_ATTR] is True
        reruns = [t for t in trials if t.user_attrs.get("localcl_requeued_from") == n]
        assert len(reruns) == 1 and reruns[0].params == before[n][1]
        assert reruns[0].state in (TrialState.COMPLETE, TrialState.FAIL)
    counted = [t for t in trials if not t.user_attrs.get(campaign_spec.STALE_ATTR)]
    assert len(counted) == c.trials, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in counted)
    assert sum(t.state == TrialState.COMPLETE for t in counted) >= c.trials - 1
    ids = [t.user_attrs["tune_trial_id"] for t in counted if t.state == TrialState.COMPLETE]
    assert len(ids) == len(set(ids))  # no Tune trial recorded twice
    assert study.user_attrs[campaign_spec.RUNS_ATTR] == 2
    assert f"{len(stale_numbers)} unfinished re-queued" in killed_and_resumed["resume_out"]
    for t in counted:
        if t.state == TrialState.COMPLETE:
            assert 1 <= t.user_attrs["epochs"] <= 2 and 0.0 <= t.value <= 1.0
    assert (c.campaign_dir / "tune" / "run0").is_dir() and (c.campaign_dir / "tune" / "run1").is_dir()


@pytest.mark.ray
@pytest.mark.timeout(2400)
def test_campaign__writes_study_and_report(killed_and_resumed: dict[str, Any]) -> None:
    import pandas as pd

    from ray_jobs.config import load_config

    c: campaign_spec.Campaign = killed_and_resumed["campaign"]
    out = c.campaign_dir / "report"
    study = optuna.load_study(study_name=c.name, storage=c.storage_url)
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == len(study.trials)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"][0]["number"] == study.best_trial.number
    cfg = load_config(out / "best_config.yaml")
    assert cfg.finetune.optim.lr == pytest.approx(study.best_trial.params["finetune.optim.lr"])
    for name in campaign_report.PLOTS:
        assert (out / "plots" / f"{name}.png").is_file() and (out / "plots" / f"{name}.html").is_file()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(2400)
def test_best_config__rerun_gives_reported_score(killed_and_resumed: dict[str, Any]) -> None:
    import subprocess
    import sys
    import tempfile

    import pandas as pd

    c: campaign_spec.Campaign = killed_and_resumed["campaign"]
    study = optuna.load_study(study_name=c.name, storage=c.storage_url)
    best = study.best_trial
    run_dir = killed_and_resumed["tmp"] / "rerun"
    raytmp = tempfile.mkdtemp(prefix="lcltune", dir="/tmp")
    try:
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "ray_jobs.cli",
                "run",
                "--config",
                str(c.campaign_dir / "report" / "best_config.yaml"),
                "--run-dir",
                str(run_dir),
                "--no-eval",
                "--no-progress",
            ],
            env=_ray_env(raytmp),
            capture_output=True,
            text=True,
            timeout=1800,
        )
    finally:
        _end_leftovers(raytmp)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    hist = pd.read_csv(run_dir / "finetune" / "history.csv")
    epoch = best.user_attrs["epochs"]
    rerun = float(hist.loc[hist["epoch"] == epoch, "val_dice"].iloc[0])
    # same config and seeds: the same score up to floating-point / scheduling noise
    assert rerun == pytest.approx(best.value, abs=0.02), (rerun, best.value)
    # and the same training trajectory: the trial's per-epoch loss as Tune recorded it
    trial_dir = next(c.campaign_dir.glob(f"tune/run*/*{best.user_attrs['tune_trial_id']}*"))
    reported = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
    for row in reported:
        again = float(hist.loc[hist["epoch"] == row["training_iteration"], "loss"].iloc[0])
        assert again == pytest.approx(row["loss"], rel=1e-3, abs=1e-4), (row["training_iteration"], again, row["loss"])


# ----------------------------------------------------------------------------- search wiring


def test_build_search__tpe_seeded_and_asha_on_finetune_epochs(tmp_path: Path) -> None:
    c = campaign_spec.load_campaign(_write_campaign(tmp_path))
    storage = optuna.storages.InMemoryStorage()
    searcher, scheduler = campaign_search.build_search(c, storage, seed=1007)
    sampler = searcher._sampler
    assert isinstance(sampler, optuna.samplers.TPESampler)
    # seeded: two samplers with the same seed draw the same start-up parameters
    again, _ = campaign_search.build_search(c, optuna.storages.InMemoryStorage(), seed=1007)
    other, _ = campaign_search.build_search(c, optuna.storages.InMemoryStorage(), seed=7)
    draws = [s.suggest(f"t{i}") for s in (searcher, again, other) for i in range(3)]
    assert draws[0:3] == draws[3:6] and draws[0:3] != draws[6:9]
    assert type(scheduler).__name__ == "AsyncHyperBandScheduler"
    assert scheduler._max_t == 2 and scheduler._time_attr == "training_iteration"  # finetune.schedule.epochs
    assert scheduler._metric == "val_dice" and scheduler._mode == "max"


def test_build_search__multi_objective_nsga2_without_pruning(tmp_path: Path) -> None:
    c = campaign_spec.load_campaign(
        _write_campaign(
            tmp_path,
            objective={"metrics": ["val_dice", "val_hd95"], "modes": ["max", "min"]},
            scheduler={"type": "auto"},
        )
    )
    searcher, scheduler = campaign_search.build_search(c, optuna.storages.InMemoryStorage(), seed=0)
    assert isinstance(searcher._sampler, optuna.samplers.NSGAIISampler) and scheduler is None
    assert searcher._ot_study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    cfg = campaign_run.trial_config(c, {"finetune.optim.lr": 1e-3, "pretrain.method.tau": 0.2}, "abc")
    assert cfg["evaluate"]["val_hd95"] is True and cfg["name"] == "tiny-cpu-abc"
    assert cfg["finetune"]["optim"]["lr"] == 1e-3 and cfg["pretrain"]["method"]["tau"] == 0.2
    assert cfg["scaling"]["num_workers"] == 1 and cfg["baseline"] is None


def test_write_report__multi_objective_pareto_and_best_dice(tmp_path: Path) -> None:
    c = campaign_spec.load_campaign(
        _write_campaign(
            tmp_path,
            objective={"metrics": ["val_dice", "val_hd95"], "modes": ["max", "min"]},
            scheduler={"type": "auto"},
        )
    )
    c.campaign_dir.mkdir(parents=True)
    storage = campaign_search.open_storage(c.storage_url)
    campaign_search.prepare_study(c, storage, resume=False)
    campaign_spec.save_campaign(c)
    study = optuna.load_study(study_name=c.name, storage=storage)
    values = [(0.5, 10.0), (0.7, 12.0), (0.6, 20.0), (0.4, 5.0)]  # (0.6, 20) is dominated by (0.7, 12)
    for v in values:
        study.tell(study.ask(c.distributions()), list(v))
    out = campaign_report.write_report(c.campaign_dir)
    summary = json.loads((out / "summary.json").read_text())
    front = [tuple(b["values"]) for b in summary["best"]]
    assert front == [(0.7, 12.0), (0.5, 10.0), (0.4, 5.0)]  # Pareto front, best Dice first
    assert "trial 1" in (out / "best_config.yaml").read_text().splitlines()[0]
    for name in ("pareto_front", "optimization_history_val_dice", "optimization_history_val_hd95", "param_importances"):
        assert (out / "plots" / f"{name}.png").is_file() and (out / "plots" / f"{name}.html").is_file(), name


def test_tune_run_config__retries_trials_whose_driver_dies(tmp_path: Path) -> None:
    c = _campaign(tmp_path)
    rc = campaign_run.tune_run_config(c, 3)
    assert rc.name == "run3" and rc.storage_path == str(c.campaign_dir / "tune")
    assert c.resources.trial_retries == 2 and rc.failure_config.max_failures == 2
    c0 = c.model_copy(update={"resources": c.resources.model_copy(update={"trial_retries": 0})})
    assert campaign_run.tune_run_config(c0, 0).failure_config.max_failures == 0


def _trial_drivers(raytmp: str) -> list[int]:
    """Pids of the Tune trial actors (``ray::ImplicitFunc``) of the Ray instance under ``raytmp``."""
    import os

    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"ray::ImplicitFunc") and f"RAY_TMPDIR={raytmp}".encode() in env.split(b"\0"):
            out.append(int(pid))
    return out


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1800)
def test_campaign__trial_whose_driver_dies_is_retried_from_its_run_dir(acdc_dir: Path, tmp_path: Path) -> None:
    """What a lost node does to a campaign: the actor running a trial's pipeline dies (SIGKILL,
    right after the trial's pretraining was exported). Tune re-runs the trial
    (``resources.trial_retries``) in the same run directory, the pretraining is not redone,
    and the campaign ends with every trial complete."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    import storage

    store = str(tmp_path / "acdc.zarr")
    assert not storage.ingest(acdc_dir, store, cases=ACDC_CASES, progress=False, workers=1).failed
    d = yaml.safe_load((TUNE_CONFIGS / "tiny_cpu.yaml").read_text())
    d["base_config"] = str(TUNE_CONFIGS.parent / "run" / "ideal_cpu.yaml")
    d["base"]["data"].update(store=store, source=None)
    d.update(root=str(tmp_path / "campaigns"), trials=2, scheduler={"type": "none"})
    d["resources"]["max_concurrent_trials"] = 1
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    c = campaign_spec.load_campaign(path)
    raytmp = tempfile.mkdtemp(prefix="lcltune", dir="/tmp")
    log = open(tmp_path / "driver.log", "w")
    cmd = [sys.executable, "-m", "ray_jobs.cli", "tune", "--config", str(path)]
    proc = subprocess.Popen(cmd, env=_ray_env(raytmp), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed: Path | None = None
    try:
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None and killed is None:
            time.sleep(0.5)
            done = sorted(c.campaign_dir.glob("trials/*/pretrain/model/model.json"))
            pids = _trial_drivers(raytmp)
            if done and pids:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed = done[0].parents[2]
        assert killed is not None, (tmp_path / "driver.log").read_text()[-3000:]
        pre_history = (killed / "pretrain" / "history.csv").read_bytes()
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        _end_leftovers(raytmp)
        log.close()
    assert rc == 0, (tmp_path / "driver.log").read_text()[-4000:]
    study = optuna.load_study(study_name=c.name, storage=c.storage_url)
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials), [
        (t.number, t.state.name) for t in trials
    ]
    retried = [t for t in trials if t.user_attrs["tune_trial_id"] == killed.name]
    assert len(retried) == 1 and 0.0 <= retried[0].value <= 1.0
    # the re-run skipped the exported pretraining and fine-tuned to the end
    assert (killed / "pretrain" / "history.csv").read_bytes() == pre_history
    assert (killed / "finetune" / "model" / "model.json").is_file()


def test_trial_env__storage_ray_train_and_events_variables_of_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a trial actor gets of the driver's environment (it runs with its node's): the
    object-storage variables, Ray Train's settings and the events directory; nothing else."""
    from ray_jobs.campaign.run import trial_env

    for k in list(os.environ):
        if k.startswith(("AWS_", "RAY_TRAIN_", "LOCALCL_")):
            monkeypatch.delenv(k)
    assert trial_env() == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    monkeypatch.setenv("LOCALCL_EVENTS_DIR", "/tmp/ev")
    monkeypatch.setenv("HOME_OF_SOMETHING_ELSE", "x")
    assert trial_env() == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
        "LOCALCL_EVENTS_DIR": "/tmp/ev",
    }
