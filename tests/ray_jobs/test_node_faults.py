"""Whole-node faults on a real multi-node Ray cluster: a SIGKILLed worker node that is then
replaced (the run grows back), a SIGTERM preemption (drain, then SIGTERM, as Kubernetes deletes
a spot pod with a preStop hook), a campaign (``localcl tune --address``) that loses a node
and, with ``--runslow``, a bare SIGTERM (no drain), the undisturbed reference run,
``localcl demo --address`` with and without a lost node and ``localcl study --address`` that
loses a node during a cell.

ONE driver, ``node_faults_driver.py``, runs every scenario of ``SCENARIOS`` one after another
in a fresh network namespace with only loopback (``unshare -n``): a moto S3 server (store, run
directories and checkpoints all on S3, nothing on node-local disk; a campaign's directory is
a local path, which every node of this one-machine cluster sees, as a shared volume), a 3-node
``ray_jobs.cluster.loopback.LoopbackCluster`` (head with no CPUs, worker nodes ``a`` and ``b``
with 1 CPU each; a lost ``b`` is replaced before the next scenario) and the real CLI,
``localcl run --address`` with ``scaling.num_workers: [1, 2]`` and a step checkpoint every
``EVERY`` steps. The driver reports per run the worker-group attempts the workers logged
(``LOCALCL_EVENTS_DIR``; one sub-directory per trial in a campaign): world size, resume point
and the global steps each attempt trained; "work redone" is the number of steps trained twice.

The job is tiny (phantom store of 8 cases at 48x48x4, 48x48 slices, widths 8-16-16;
pretraining 3 x 8 steps of IDEAL, supervised fine-tuning 6 x 8 steps, no evaluation stage: the
Dice compared is the final validation Dice of fine-tuning); each run still pays Ray Train's
start-up per stage. Measured on 2 cores (2026-12-07): the cluster starts in 17-22 s, the
undisturbed run takes 50 s, the SIGKILL + rejoin run 75 s, the drain + SIGTERM run 49 s, the
campaign 80 s (the default suite 241 s; 277 s before localcl's 10 s elastic start timeout, with
the 30 s this suite set, when the two fault runs took 96 and 69 s); ``--runslow`` only: the undisturbed run (45 s), the bare SIGTERM (41 s),
the two demos (37 and 65 s), the study (85 s) and the cluster self-test (20 s); the whole file
with ``--runslow`` 522 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from ray_jobs.cluster.local_head import stop_process_tree
from ray_jobs.cluster.loopback import loopback_namespace_argv, loopback_namespace_available

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("node_faults_driver.py")
STEPS, EPOCHS, EVERY = 8, 3, 2
PRETRAIN_STEPS = STEPS * EPOCHS
FT_EPOCHS = 6
DRAIN_S = 6  # the drain deadline (the preStop hook's sleep)
# Final fine-tuning val Dice of this tiny run, undisturbed, data.seed 0/1/2 (measured on the
# 3-node cluster, 2026-12-06, with 2 x 6 pretraining steps and this fine-tuning schedule):
# 0.381, 0.569, 0.644, sd 0.135. A disturbed run must land within about 2 sd of the
# undisturbed seed-0 run. Measured with this config: undisturbed 0.621, SIGKILL 0.605 (earlier
# variant: SIGKILL 0.497, drain + SIGTERM 0.531-0.601); on one shared cluster (2026-12-07):
# undisturbed 0.599, SIGKILL + rejoin 0.436, drain + SIGTERM 0.595. The undisturbed run (the
# ``calm`` scenario) runs only with --runslow; without it the SIGKILL run is compared with
# CALM_DICE, the mean of its two measurements (re-measure it when CONFIG changes).
CALM_DICE = 0.61
DICE_TOLERANCE = 0.25

CONFIG: dict[str, Any] = {
    "name": "faults",
    "data": {
        "label_budget": 1,
        "seed": 0,
        "size": [48, 48],
        "spacing_mm": None,
        "splits": {"pool": "train", "val": "val", "test": "val"},
        "max_val_cases": 2,
        "max_test_cases": 2,
    },
    "pretrain": {
        "method": {"name": "ideal", "widths": [8, 16, 16], "queue_size": 64, "proj_dim": 8},
        "schedule": {"epochs": EPOCHS, "steps_per_epoch": STEPS, "batch_size": 8},
    },
    "finetune": {
        "method": {"name": "supervised", "widths": [8, 16, 16]},
        "optim": {"name": "adam", "lr": 3.0e-3},
        "schedule": {"epochs": FT_EPOCHS, "steps_per_epoch": 8, "batch_size": 8, "scheduler": "cosine"},
    },
    "baseline": None,
    # resize_interval_s: grow back at the next stage, not mid-stage (a grow is a restart too)
    "scaling": {"num_workers": [1, 2], "resources_per_worker": {"CPU": 1}, "resize_interval_s": 600},
    "checkpoint": {"num_to_keep": 2, "max_failures": 2, "every_steps": EVERY, "on_preemption": True},
    "logging": {"tensorboard": False, "progress": False},
}
# the GCS declares a silent node dead after ~3 s instead of ~30 s
NODE_ENV = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
# Ray Train (propagated from the driver to its controller): poll the workers every 0.25 s
# (localcl's default is 0.5 s; it registers reported checkpoints when it polls) and the drain
# state every 1 s. The placement-group wait of a restart is localcl's elastic default, 10 s
# (ray_jobs.train.trainer.elastic_start_timeout; this suite used 30 s before it existed).
DRIVER_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
}


def run_driver(tmp_path: Path, runs: list[dict[str, Any]], timeout: float) -> dict[str, Any]:
    """Run the driver in a loopback-only namespace and return its report; every process it
    started is gone afterwards, whatever happened. Each test checks its own run's exit code
    (:func:`completed`)."""
    reason = loopback_namespace_available()
    if reason:
        pytest.skip(f"no loopback-only network namespace: {reason}")
    temp_dir = tempfile.mkdtemp(prefix="lcmn", dir="/tmp")  # the cluster's marker for clean-up
    spec = {
        "work": str(tmp_path / "work"),
        "out": str(tmp_path / "report.json"),
        "temp_dir": temp_dir,
        "timeout_s": timeout - 60,
        "config": CONFIG,
        "node_env": NODE_ENV,
        "driver_env": DRIVER_ENV,
        "cli_args": ["--no-eval"],
        "runs": runs,
        "keep_ray_logs": bool(os.environ.get("LOCALCL_KEEP_RAY_LOGS")),
    }
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(REPO)
    log = tmp_path / "driver.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            loopback_namespace_argv([sys.executable, str(DRIVER), str(spec_path)]),
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO),
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the driver and the CLI it started
            except ProcessLookupError:
                pass
            proc.wait()
            stop_process_tree(proc.pid, temp_dir, grace=2.0)  # nodes and workers left behind
            shutil.rmtree(temp_dir, ignore_errors=True)
    out = tmp_path / "report.json"
    assert out.is_file(), f"the driver wrote no report:\n{log.read_text()[-5000:]}"
    report: dict[str, Any] = json.loads(out.read_text())
    assert report["error"] is None, report["error"] + "\n" + json.dumps(report.get("node_logs"), indent=1)[-3000:]
    return report


def completed(runs: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """The run ``name`` of the shared fault session; it must have run and exited 0."""
    assert name in runs, f"run {name!r} did not start (the session ran {sorted(runs)})"
    run = runs[name]
    assert run["returncode"] == 0, f"{name}:\n{run['log_tail']}"
    return run


# The shipped demo config at the fault runs' size: 12 phantom volumes at 48x48, pretraining
# EPOCHS x STEPS steps, fine-tuning (method and baseline) 4 x 8 steps, elastic [1, 2] workers,
# a step checkpoint every EVERY steps
DEMO_ARGS = [
    "--cases", "12", "--set", "data.size=[48, 48]", "--set", "data.max_unlabelled=8",
    "--set", f"pretrain.schedule={{epochs: {EPOCHS}, steps_per_epoch: {STEPS}, batch_size: 8}}",
    "--set", "finetune.schedule={epochs: 4, steps_per_epoch: 8, batch_size: 8}",
    "--set", "scaling.num_workers=[1, 2]", "--set", "scaling.resize_interval_s=600",
    "--set", f"checkpoint={{num_to_keep: 2, max_failures: 2, every_steps: {EVERY}}}",
    "--set", "logging={tensorboard: false, progress: false}",
]  # fmt: skip


# Every fault scenario, run one after another by ONE driver on ONE cluster (the store, the moto
# server and the cluster are set up once; before each run the driver replaces a lost node ``b``
# and makes Ray Train see it, ``node_faults_driver.refresh_node_view``). The tests below each
# read their own run. A scenario marked ``slow`` runs only with ``--runslow``.
SCENARIOS: list[dict[str, Any]] = [
    {"name": "calm", "slow": True},  # the undisturbed reference (CALM_DICE without --runslow)
    # killed, then replaced: resize checks every 2 s, so the run can grow back inside a stage
    {
        "name": "sigkill",
        "fault": {"kind": "sigkill", "node": "b", "rejoin": True},
        "set": ["scaling.resize_interval_s=2"],
    },
    # no failure budget: the restart must be a preemption (max_preemption_failures); the
    # SIGTERM runs stop after pretraining (their tests read only its attempts)
    {
        "name": "sigterm",
        "fault": {"kind": "sigterm", "node": "b", "drain_s": DRAIN_S},
        "set": ["checkpoint.max_failures=0", "finetune=null"],
    },
    # a campaign (2 trials at once, 1 worker each: one trains on each node) loses node b while
    # a trial trains there; a replacement b joins once the old one is declared dead
    {
        "name": "tune",
        "verb": "tune",
        "campaign": {
            "method": "ideal",
            "base": {
                "pretrain": {"schedule": {"epochs": 2, "steps_per_epoch": STEPS, "batch_size": 8}},
                "finetune": {"schedule": {"epochs": 2, "steps_per_epoch": 8, "batch_size": 8, "scheduler": "cosine"}},
            },
            "space": {"finetune.optim.lr": {"type": "log_float", "low": 1.0e-3, "high": 1.0e-2}},
            "trials": 2,
            "scheduler": {"type": "none"},
            "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2},
        },
        "fault": {
            "kind": "sigkill",
            "node": "b",
            "after_step": EVERY + 1,
            "totals": {"pretrain": 2 * STEPS, "finetune": 2 * 8},
            "rejoin": True,
        },
    },
    {
        "name": "bare-sigterm",
        "fault": {"kind": "sigterm", "node": "b", "drain": False},
        "set": ["finetune=null"],
        "slow": True,
    },
    # `localcl study --address`: two baseline cells (seeds 0 and 1) one after another; node b is
    # SIGKILLed after the first cell's first fine-tuning step checkpoint and not replaced, so
    # the rest of that cell, the second cell and both evaluations run on node a alone
    {
        "name": "study",
        "verb": "study",
        "study": {
            "seeds": [0, 1],
            "budgets": [{"name": "b1", "patients": 1}],
            "methods": {"supervised": {"finetune": {"method": {"name": "supervised"}}}},
            "require_all_methods": False,
            "diagnostics": False,
        },
        "fault_cell": "supervised/b1-s0",
        "fault": {"kind": "sigkill", "node": "b"},
        "slow": True,
    },
    # `localcl demo --address` (phantom generated into a local run directory every node sees),
    # undisturbed and with node b SIGKILLed after the first pretraining step checkpoint
    {"name": "demo-calm", "verb": "demo", "args": DEMO_ARGS, "slow": True},
    {"name": "demo", "verb": "demo", "args": DEMO_ARGS, "fault": {"kind": "sigkill", "node": "b"}, "slow": True},
]


@pytest.fixture(scope="module")
def fault_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Run the scenarios of ``SCENARIOS`` on one loopback cluster; ``{name: run report}``."""
    slow = request.config.getoption("--runslow")
    scenarios = [{k: v for k, v in s.items() if k != "slow"} for s in SCENARIOS if slow or not s.get("slow")]
    report = run_driver(tmp_path_factory.mktemp("node-faults"), scenarios, timeout=900)
    assert report["left_after_close"] == [], report["cluster_events"]  # close() ends every process
    return {r["name"]: r for r in report["runs"]}


def test_loopback_namespace__has_only_lo_and_the_cluster_refuses_anything_else(tmp_path: Path) -> None:
    """The namespace the fault tests run in has no interface but ``lo``; a LoopbackCluster
    refuses to start where another interface exists (Ray would use the host's address)."""
    from ray_jobs.cluster.loopback import LoopbackCluster, only_loopback

    reason = loopback_namespace_available()
    if reason:
        pytest.skip(reason)
    code = "from ray_jobs.cluster.loopback import only_loopback; print(only_loopback())"
    proc = subprocess.run(
        loopback_namespace_argv([sys.executable, "-c", code]),
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=60,
    )
    assert proc.stdout.strip() == "True", proc.stderr
    if not only_loopback():
        cluster = LoopbackCluster(temp_dir=str(tmp_path / "ray"))
        with pytest.raises(RuntimeError, match="only loopback"):
            cluster.start()
        assert cluster.nodes == {}


@pytest.mark.slow
def test_loopback_cluster__sigkill_ends_the_whole_node_and_close_leaves_nothing(tmp_path: Path) -> None:
    """The fixture the fault tests rely on, on a head + one worker node (about 20 s; slow: the
    fault runs below exercise the same kill and close on the 3-node cluster): the
    driver attaches to the head, Ray puts an actor's process in a process group of its own,
    ``kill_node`` (SIGKILL) still ends it with its node, the GCS declares the node dead within
    seconds, and ``close`` leaves no process of the cluster behind."""
    reason = loopback_namespace_available()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "selftest.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        loopback_namespace_argv([sys.executable, str(DRIVER), "--cluster-selftest", str(out)]),
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=300,
    )
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report.get("error") is None, report["error"]
    assert report["driver_on_head"] and report["actor_on_a"]
    assert report["actor_own_group"]  # why a node is killed through its process tree
    assert report["actor_died_with_node"]
    assert report["dead_after_s"] < 15
    assert report["left_after_close"] == []


def test_loopback_cluster_node_states__a_reused_name_means_the_node_started_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a node is replaced, the GCS lists every node that ever had the name; the state of
    ``b`` is the replacement's (once its id is known), alive or dead, never an earlier one's, so
    ``wait_dead("b")`` waits for the replacement and its death reason is its own."""
    import types

    import ray.util.state

    from ray_jobs.cluster.loopback import NODE_LABEL, LoopbackCluster

    def node(node_id: str, state: str, message: str | None = None) -> dict[str, Any]:
        return {"node_id": node_id, "state": state, "labels": {NODE_LABEL: "b"}, "state_message": message}

    listed: list[dict[str, Any]] = []
    monkeypatch.setattr(ray.util.state, "list_nodes", lambda **kw: list(listed))
    cluster = LoopbackCluster(temp_dir=str(tmp_path / "ray"))
    cluster.nodes["b"] = types.SimpleNamespace(node_id="")  # type: ignore[assignment]
    listed[:] = [node("old", "DEAD", "killed"), node("new", "ALIVE")]
    assert cluster.node_states()["b"]["node_id"] == "new"  # id not yet known: the live one
    cluster.nodes["b"].node_id = "new"
    for order in (["old", "new"], ["new", "old"]):
        states = {"old": node("old", "DEAD", "killed"), "new": node("new", "DEAD", "preempted")}
        listed[:] = [states[i] for i in order]
        b = cluster.node_states()["b"]
        assert (b["node_id"], b["alive"], b["death"]) == ("new", False, "preempted")


def test_loopback_cluster_add_node__a_start_that_times_out_is_killed_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ray start`` exits with "timed out during startup" when its raylet takes more than Ray's
    hard-coded 30 s to register (a loaded machine): ``add_node`` kills what that start left and
    starts the node again; any other failure, or the last attempt's, is raised."""
    import types

    from ray_jobs.cluster import loopback
    from ray_jobs.cluster.loopback import LoopbackCluster

    monkeypatch.setattr(loopback.time, "sleep", lambda s: None)
    cluster = LoopbackCluster(temp_dir=str(tmp_path / "ray"))
    outcomes: list[str] = []
    killed: list[str] = []

    def spawn(self: LoopbackCluster, name: str, args: list[str]) -> Any:
        node = types.SimpleNamespace(name=name, node_id="", proc=types.SimpleNamespace(poll=lambda: 1))
        self.nodes[name] = node
        return node

    def wait_alive(self: LoopbackCluster, names: set[str], timeout: float | None = None) -> None:
        what = outcomes.pop(0)
        if what != "ok":
            raise RuntimeError(f"ray start (b) exited with 1:\nException: The current node {what}")

    monkeypatch.setattr(LoopbackCluster, "_spawn", spawn)
    monkeypatch.setattr(LoopbackCluster, "wait_alive", wait_alive)
    monkeypatch.setattr(LoopbackCluster, "kill_node", lambda self, name, sig=9: killed.append(name))

    outcomes[:] = ["timed out during startup", "ok"]
    assert cluster.add_node("b").name == "b"
    assert killed == ["b"] and [e["what"] for e in cluster.events] == ["add", "start timed out", "add"]
    outcomes[:] = ["timed out during startup"] * 3
    with pytest.raises(RuntimeError, match="timed out during startup"):
        cluster.add_node("b")
    outcomes[:] = ["failed for another reason", "ok"]
    with pytest.raises(RuntimeError, match="another reason"):
        cluster.add_node("b")


def test_parse_events__attempts_world_resume_and_steps(tmp_path: Path) -> None:
    from node_faults_driver import parse_events

    path = tmp_path / "pretrain.events"
    lines = ["1 start 1", "0 start 1", "0 world 2", "1 world 2", "0 pid 101", "1 pid 102"]
    lines += [f"{r} step {s}" for s in (1, 2, 3) for r in (0, 1)]
    lines += ["0 start 1", "0 world 1", "0 pid 103", "0 resume_step 2", "0 step 3", "0 preempted 3", "0 step 4"]
    path.write_text("\n".join(lines) + "\n")
    first, second = parse_events(path)
    assert (first["world"], first["resume_step"], first["steps"]) == (2, None, [1, 2, 3])
    assert (second["world"], second["resume_step"], second["steps"], second["preempted"]) == (1, 2, [3, 4], [3])
    assert (first["pid"], second["pid"]) == (101, 103)  # rank 0's process
    assert steps_redone([first, second], 4) == 1
    assert parse_events(tmp_path / "missing.events") == []


def steps_redone(attempts: list[dict[str, Any]], total: int) -> int:
    """Optimiser steps trained more than once over a stage's attempts; checks that together
    they trained every step 1..total."""
    trained = [s for a in attempts for s in a["steps"]]
    assert sorted(set(trained)) == list(range(1, total + 1)), attempts
    return len(trained) - total


def resumed_at(attempt: dict[str, Any]) -> int:
    """The global step an attempt started from (a step checkpoint, or an epoch start)."""
    return attempt["resume_step"] if attempt["resume_step"] is not None else (attempt["start_epoch"] - 1) * STEPS


def final_dice(run: dict[str, Any]) -> float:
    rows = run["history"]["finetune"]
    assert [int(r["epoch"]) for r in rows] == list(range(1, FT_EPOCHS + 1)), rows
    return float(rows[-1]["val_dice"])


def test_node_sigkill__run_continues_on_the_survivor_and_grows_back(fault_runs: dict[str, dict[str, Any]]) -> None:
    """SIGKILL worker node ``b`` (its whole process tree) right after the first pretraining
    step checkpoint is registered: pretraining continues on node ``a`` alone (elastic [1, 2])
    from the latest registered checkpoint with at most one checkpoint interval redone. A
    replacement node ``b`` then joins (an autoscaler bringing a spot node back) and, with
    ``scaling.resize_interval_s: 2``, the run grows back to 2 workers: inside pretraining when
    the node arrives in time, else at the fine-tuning stage's start. The run ends with a Dice
    within seed noise of an undisturbed run (``CALM_DICE``; with --runslow, the ``calm`` run on
    the same cluster)."""
    hit = completed(fault_runs, "sigkill")
    reference = CALM_DICE
    if "calm" in fault_runs:  # --runslow: the undisturbed run on the same cluster
        calm = completed(fault_runs, "calm")
        assert [a["world"] for a in calm["attempts"]["pretrain"]] == [2]
        assert steps_redone(calm["attempts"]["pretrain"], PRETRAIN_STEPS) == 0
        reference = final_dice(calm)

    fault = hit["fault"]
    pre = hit["attempts"]["pretrain"]
    worlds = [a["world"] for a in pre] + [a["world"] for a in hit["attempts"]["finetune"]]
    assert worlds[:2] == [2, 1], (worlds, fault)  # the kill, then the survivor alone
    # resumed at the latest registered step checkpoint (never at the stage start)
    assert resumed_at(pre[1]) >= fault["first_checkpoint"]["global_step"] > 0
    assert resumed_at(pre[1]) == max(fault["registered_at_kill"]), fault
    assert fault["rejoined_after_kill_s"] > 0 and fault["node_view_refreshed"], fault
    assert 2 in worlds[2:], (worlds, fault)  # grown back once the new node joined
    # the kill: at most one checkpoint interval redone; a grow inside pretraining is a restart
    # too: at most one interval plus the step the workers may finish before they are stopped
    redone = steps_redone(pre, PRETRAIN_STEPS)
    assert 0 <= redone <= EVERY + (EVERY + 1) * (len(pre) - 2), (redone, pre)

    # Dice within seed noise: same data order and LR schedule; BN batch statistics (one
    # worker between the kill and the grow) and augmentation draws differ
    assert abs(final_dice(hit) - reference) <= DICE_TOLERANCE, (final_dice(hit), reference)


TUNE_STEPS = {"pretrain": 2 * STEPS, "finetune": 2 * 8}  # global steps of a trial's stages


def test_node_sigkill_during_campaign__every_trial_completes(fault_runs: dict[str, dict[str, Any]]) -> None:
    """``localcl tune --address`` with 2 trials at once (1 worker each, so one trains on each
    worker node) loses node ``b`` (SIGKILL) while a trial trains there, past a step checkpoint
    (rank 0's pid is in the node's process tree): that trial restarts the stage (Ray Train's
    restart inside the trial, or Tune's re-run of the trial when its actor died with the node)
    from its last registered checkpoint, and the campaign completes every trial, none counted
    twice."""
    run = completed(fault_runs, "tune")
    fault = run["fault"]
    assert "error" not in fault and fault["node_view_refreshed"], fault
    trials = [t for t in run["trials"] if not t["attrs"].get("localcl_stale")]
    assert len(trials) == 2 and all(t["state"] == "COMPLETE" for t in trials), run["trials"]
    assert len({t["attrs"]["tune_trial_id"] for t in trials}) == 2
    assert set(run["attempts"]) == {t["attrs"]["tune_trial_id"] for t in trials}
    restarted = []
    for trial, stages in run["attempts"].items():
        for stage, total in TUNE_STEPS.items():
            attempts = stages[stage]
            redone = steps_redone(attempts, total)  # every step trained, in every trial
            if len(attempts) > 1:  # the stage the kill hit
                restarted.append([trial, stage])
                assert resumed_at(attempts[1]) >= EVERY, (trial, stage, attempts, fault)  # not the start
                assert redone <= 2 * EVERY, (trial, stage, attempts, fault)
    # the trial that trained on b (and the other one too if its actor was on b)
    assert fault["hit"] in restarted, (restarted, fault)


def test_node_sigterm__checkpoint_at_the_next_step(fault_runs: dict[str, dict[str, Any]]) -> None:
    """Drain worker node ``b`` for preemption with a ``DRAIN_S`` deadline and SIGTERM its
    process group at the deadline (30 s grace), as Kubernetes does with the gpu-spot overlay's
    preStop hook: the workers write a checkpoint at the next step boundary and train no
    further, Ray Train restarts from it on node ``a`` alone, and the node's death is recorded
    as a preemption. No step is trained twice."""
    hit = completed(fault_runs, "sigterm")  # runs with checkpoint.max_failures=0
    fault = hit["fault"]
    assert "preemption_checkpoint" in fault, fault  # written before the SIGTERM
    first, second = hit["attempts"]["pretrain"]
    assert first["world"] == 2 and second["world"] == 1
    pre = fault["preemption_checkpoint"]["global_step"]
    assert first["preempted"] == [pre]
    assert first["steps"][-1] == pre  # nothing trained after the preemption checkpoint
    assert resumed_at(second) == pre  # resumed exactly there
    assert steps_redone([first, second], PRETRAIN_STEPS) <= 1
    assert not fault.get("needed_sigkill"), fault  # the node stopped within the grace period
    assert (fault["death"] or "").startswith("Terminated due to preemption"), fault


@pytest.mark.slow
def test_node_bare_sigterm__run_continues_like_a_killed_node(fault_runs: dict[str, dict[str, Any]]) -> None:
    """SIGTERM worker node ``b``'s process group without a drain, right after the first
    pretraining step checkpoint is registered (a node shut down outside Kubernetes' preStop
    path): Ray sees no preemption, so nothing is checkpointed on the way out; the raylet ends
    its workers and pretraining restarts on node ``a`` alone from the latest registered
    checkpoint, as after a SIGKILL, with at most one checkpoint interval plus one step redone
    (the failure counts against ``checkpoint.max_failures``)."""
    hit = completed(fault_runs, "bare-sigterm")
    fault = hit["fault"]
    assert not fault.get("needed_sigkill"), fault  # SIGTERM alone ended the node
    first, second = hit["attempts"]["pretrain"]
    assert (first["world"], second["world"]) == (2, 1)
    assert first["preempted"] == []  # no drain: no preemption checkpoint
    assert resumed_at(second) == max(fault["registered_at_sigterm"]) > 0
    assert 0 <= steps_redone([first, second], PRETRAIN_STEPS) <= EVERY + 1
    assert not (fault["death"] or "").startswith("Terminated due to preemption"), fault


@pytest.mark.slow
def test_demo_address__node_sigkill_after_the_first_checkpoint_ends_within_noise(
    fault_runs: dict[str, dict[str, Any]],
) -> None:
    """``localcl demo --address`` on the 3-node cluster with ``scaling.num_workers=[1, 2]``:
    SIGKILL node ``b`` right after the first pretraining step checkpoint is registered. The
    demo (its three training stages in one worker group, ``scaling.one_worker_group``)
    completes: the restarted group pretrains on the survivor from that checkpoint, then
    fine-tunes and trains the baseline there, and evaluation runs with what is left; at most
    one checkpoint interval (plus the step in flight) is redone, and both models' test Dice is
    within seed noise of the undisturbed demo."""
    calm, hit = completed(fault_runs, "demo-calm"), completed(fault_runs, "demo")
    for run in (calm, hit):
        assert run["demo_table"] and "| method |" in run["demo_table"] and "| baseline |" in run["demo_table"]
    assert [a["world"] for a in calm["attempts"]["pretrain"]] == [2]
    fault = hit["fault"]
    pre = hit["attempts"]["pretrain"]
    assert [a["world"] for a in pre] == [2, 1], (pre, fault)
    assert resumed_at(pre[1]) == max(fault["registered_at_kill"]) > 0, fault
    assert 0 <= steps_redone(pre, PRETRAIN_STEPS) <= EVERY + 1, pre
    for stage in ("finetune", "baseline"):  # trained once each, by the restarted group
        assert [a["world"] for a in hit["attempts"][stage]] == [1], hit["attempts"][stage]
    for model in ("method", "baseline"):
        got, want = hit["eval"][model]["mean"]["dice"], calm["eval"][model]["mean"]["dice"]
        assert abs(got - want) <= DICE_TOLERANCE, (model, got, want)


FT_STEPS = FT_EPOCHS * 8  # global fine-tuning steps of a run (and of a study cell)


@pytest.mark.slow
def test_study_address__node_sigkill_during_a_cell_loses_no_cell(fault_runs: dict[str, dict[str, Any]]) -> None:
    """``localcl study --address`` with ``scaling.num_workers: [1, 2]``: SIGKILL node ``b``
    right after the first cell's first fine-tuning step checkpoint is registered, with no
    replacement. That cell's fine-tuning continues on node ``a`` alone from the latest
    registered checkpoint (at most one checkpoint interval plus the step in flight redone),
    the next cell trains and both are evaluated with the one node left, and the study
    completes with every cell, each with the same fine-tuning steps and its Dice in its
    report."""
    run = completed(fault_runs, "study")
    fault = run["fault"]
    assert "error" not in fault, fault
    attempts = run["attempts"]["finetune"]  # the two cells' fits, one after another
    assert [a["world"] for a in attempts] == [2, 1, 1], (attempts, fault)
    first, second = attempts[:2], attempts[2:]
    assert resumed_at(first[1]) == max(fault["registered_at_kill"]) > 0, fault
    assert 0 <= steps_redone(first, FT_STEPS) <= EVERY + 1, first
    assert steps_redone(second, FT_STEPS) == 0
    cells = run["cells"]
    assert sorted(cells) == ["supervised/b1-s0", "supervised/b1-s1"], sorted(cells)
    for key, cell in cells.items():
        assert cell["finetune_steps"] == FT_STEPS and 0.0 < cell["dice"] <= 1.0, (key, cell)
    results = run["results"]
    assert (results["done"], results["total"], results["partial"]) == (2, 2, False), results
