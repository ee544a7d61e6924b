"""Driver of the node-fault tests; runs INSIDE a loopback-only network namespace.

``test_node_faults.py`` starts ``python node_faults_driver.py SPEC.json`` under
``ray_jobs.cluster.loopback.loopback_namespace_argv`` (``unshare -n``). This script then

1. starts a moto S3 server on 127.0.0.1 and ingests a phantom store into ``s3://faults/``;
2. starts a ``LoopbackCluster``: a head (no CPUs) and worker nodes ``a`` and ``b``
   (1 CPU each);
3. for every run of the spec (one after another on the same cluster; a node lost in the
   previous run is replaced first, :func:`refresh_node_view`), starts the real CLI (``python -m ray_jobs.cli <verb> --address
   127.0.0.1:6379 --run-dir s3://faults/<run>``) with ``LOCALCL_EVENTS_DIR`` set, injects the
   run's fault once the first pretraining step checkpoint is registered in Ray Train's
   ``checkpoint_manager_snapshot.json``, and waits for the CLI;
4. writes ``SPEC["out"]`` (JSON): per run the CLI's exit code, wall time and log tail, the
   fault timeline, the per-stage worker-group attempts read from the events files (world size,
   resume point, global steps trained) and the fine-tuning history read back from S3.

Faults (``run["fault"]``): ``{"kind": "sigkill", "node": "b"}``: SIGKILL the node (its
process tree) once the first pretraining step checkpoint is registered; ``{"kind": "sigterm", "node": "b", "drain_s": 20}``: what a
Kubernetes pod deletion with the gpu-spot overlay's preStop hook does: drain the node for
preemption with a ``drain_s`` deadline and sleep until it (recording when the preemption
checkpoint is registered), then SIGTERM the node's process group, and SIGKILL it if it is
still there ``GRACE_S`` = 30 s later; ``{"kind": "sigterm", "node": "b", "drain": false}``: a bare
SIGTERM (no drain: a node shut down outside Kubernetes' preStop path) once the first pretraining
step checkpoint is registered, SIGKILL after ``GRACE_S``. ``"rejoin": true`` on a SIGKILL: a
replacement node of the same name joins once the stage runs on the survivor alone.

Every process it starts is ended on the way out (``LoopbackCluster.close``; the CLI runs in this
process's group, which the test kills on a timeout).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BUCKET = "faults"
GRACE_S = 30.0  # the pod's termination grace period after SIGTERM in these tests


def parse_events(path: Path) -> list[dict[str, Any]]:
    """Worker-group attempts of one stage from its events file, in order: ``world`` (workers),
    ``start_epoch``, ``resume_step`` (global step resumed at, or None), ``steps`` (sorted global
    steps trained), ``preempted`` (global steps of preemption checkpoints), ``pid`` (rank 0's
    process)."""
    attempts: list[dict[str, Any]] = []
    if not path.is_file():
        return attempts
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        rank, what, value = int(parts[0]), parts[1], int(parts[2])
        if what == "start" and rank == 0:
            attempts.append(
                {"start_epoch": value, "world": None, "resume_step": None, "steps": set(), "preempted": [], "pid": None}
            )
            continue
        if not attempts:
            continue
        cur = attempts[-1]
        if what == "world" and rank == 0:
            cur["world"] = value
        elif what == "pid" and rank == 0:
            cur["pid"] = value
        elif what == "resume_step" and rank == 0:
            cur["resume_step"] = value
        elif what == "step":
            cur["steps"].add(value)
        elif what == "preempted" and rank == 0:
            cur["preempted"].append(value)
    for a in attempts:
        a["steps"] = sorted(a["steps"])
    return attempts


class S3:
    """The moto endpoint and an s3fs file system on it."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }
        os.environ.update(self.env)
        import boto3
        import s3fs

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        self.fs = s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing")

    def read_json(self, path: str) -> Any:
        self.fs.invalidate_cache()
        try:
            with self.fs.open(path, "r") as f:
                return json.load(f)
        except (FileNotFoundError, ValueError, OSError):
            return None

    def read_csv(self, path: str) -> list[dict[str, str]]:
        self.fs.invalidate_cache()
        try:
            with self.fs.open(path, "r") as f:
                return list(csv.DictReader(io.StringIO(f.read())))
        except (FileNotFoundError, OSError):
            return []

    def stop(self) -> None:
        self.server.stop()


def poll_until(proc: subprocess.Popen[bytes], probe: Any, every: float = 0.05) -> Any:
    """The first truthy ``probe()`` while ``proc`` (the CLI) runs, or None once it has ended."""
    while proc.poll() is None:
        got = probe()
        if got:
            return got
        time.sleep(every)
    return None


def registered(s3: S3, snapshot: str) -> list[dict[str, Any]]:
    """The metrics of the checkpoints Ray Train has registered (its snapshot on S3, or in a
    local run directory when ``snapshot`` is an absolute path)."""
    snap = (read_json(Path(snapshot)) if os.path.isabs(snapshot) else s3.read_json(snapshot)) or {}
    return [dict(r.get("metrics") or {}) for r in snap.get("checkpoint_results") or []]


def make_store(s3: S3, work: Path, n_cases: int) -> str:
    import storage
    from storage.phantom import make_phantom_dataset

    src = make_phantom_dataset(work / "phantom", n_cases=n_cases, seed=1, shape=(48, 48, 4), spacing=(3.0, 3.0, 8.0))
    uri = f"s3://{BUCKET}/store.zarr"
    rep = storage.ingest(str(src), uri, progress=False)
    assert rep.ok, rep.summary()
    return uri


def sigterm_node(cluster: Any, node: str, s3: S3, snapshot: str) -> dict[str, Any]:
    """SIGTERM ``node``'s process group, SIGKILL it if it is still there ``GRACE_S`` later;
    returns the timeline (checkpoints registered at the signal, time to go, the GCS's death
    record)."""
    out: dict[str, Any] = {"registered_at_sigterm": [m.get("global_step") for m in registered(s3, snapshot)]}
    cluster.kill_node(node, signal.SIGTERM)
    out["sigterm_at"] = time.time()
    if not cluster.wait_gone(node, timeout=GRACE_S):
        cluster.kill_node(node, signal.SIGKILL)
        out["needed_sigkill"] = True
    out["node_gone_after_s"] = round(time.time() - out["sigterm_at"], 1)
    out["ray_start_exit"] = cluster.nodes[node].proc.returncode
    out["dead_after_s"] = round(cluster.wait_dead(node), 1)
    out["death"] = cluster.node_states()[node]["death"]
    return out


def refresh_node_view(cluster: Any) -> bool:
    """Make Ray Train see a node that (re)joined now rather than up to 20 s later.

    Ray Train's elastic scaling asks Ray's ``AutoscalingCoordinator`` (a detached actor, one
    per cluster) how many workers fit; the coordinator re-reads the cluster's nodes only on its
    tick, every 20 s (``TICK_INTERVAL_S``). On a real cluster a replacement node is therefore
    used up to 20 s after it registers; here the driver forces the tick
    (``get_reserved_resources(recompute=True)``) so that each run starts on the full cluster
    and a rejoin is seen at once. False if no coordinator exists yet (nothing to refresh)."""
    import ray

    ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        try:
            coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        except ValueError:
            return False
        ray.get(coordinator.get_reserved_resources.remote("localcl-fault-driver", recompute=True), timeout=60)
        return True
    finally:
        ray.shutdown()


def inject(
    fault: dict[str, Any], cluster: Any, s3: S3, snapshot: str, events: Path, proc: subprocess.Popen[bytes]
) -> dict[str, Any]:
    """Inject ``fault`` into a stage (pretraining; a study's first cell's fine-tuning): a SIGKILL
    once its first step checkpoint is registered (``snapshot``; with ``rejoin``, a replacement
    node of the same name is started once the stage runs on the survivors alone), a drain as
    soon as its worker group has started (``events``, the stage's events file: the drain must
    reach Ray Train while the stage still trains); returns the timeline."""
    out: dict[str, Any] = {"kind": fault["kind"], "node": fault["node"]}
    t0 = time.time()
    if fault["kind"] == "sigterm" and fault.get("drain", True):
        ready = poll_until(proc, lambda: any(a["world"] for a in parse_events(events)))
    else:
        ready = poll_until(proc, lambda: [m for m in registered(s3, snapshot) if "step" in m])
        if ready:
            out["first_checkpoint"] = ready[0]
    if not ready:
        out["error"] = "the CLI ended before the fault could be injected"
        return out
    out["waited_s"] = round(time.time() - t0, 1)
    node = fault["node"]
    if fault["kind"] == "sigkill":
        out["registered_at_kill"] = [m.get("global_step") for m in registered(s3, snapshot)]
        cluster.kill_node(node, signal.SIGKILL)
        out["killed_at"] = time.time()
        out["dead_after_s"] = round(cluster.wait_dead(node), 1)
        if fault.get("rejoin"):  # a replacement node of the same name joins (scale-up) ...
            end = time.time() + 120.0
            while time.time() < end and proc.poll() is None:  # ... once the stage runs shrunk
                if any(a["world"] == 1 for a in parse_events(events)):
                    break
                time.sleep(0.1)
            out["shrunk_after_kill_s"] = round(time.time() - out["killed_at"], 1)
            cluster.add_node(node)
            out["rejoined_after_kill_s"] = round(time.time() - out["killed_at"], 1)
            out["node_view_refreshed"] = refresh_node_view(cluster)
    elif fault["kind"] == "sigterm" and not fault.get("drain", True):  # bare SIGTERM, no drain
        out.update(sigterm_node(cluster, node, s3, snapshot))
    elif fault["kind"] == "sigterm":
        drain_s = int(fault.get("drain_s", GRACE_S))
        cluster.drain_node(node, deadline_s=drain_s, message="pod deletion (preStop)")
        out["drained_at"] = time.time()
        end = time.time() + drain_s + 1.0  # past the deadline the drain CLI computed
        while time.time() < end and proc.poll() is None:
            pre = [m for m in registered(s3, snapshot) if m.get("preempted")]
            if pre:
                out["preemption_checkpoint"] = pre[0]
                out["checkpoint_after_drain_s"] = round(time.time() - out["drained_at"], 1)
                break
            time.sleep(0.2)
        while time.time() < end:  # the preStop hook sleeps until the drain deadline
            time.sleep(0.2)
        out.update(sigterm_node(cluster, node, s3, snapshot))
    else:
        raise ValueError(f"unknown fault {fault['kind']}")
    return out


def read_history(s3: S3, run_dir: str, stage: str) -> list[dict[str, str]]:
    """``RUN_DIR/<stage>/history.csv`` of an ``s3://faults/...`` or a local run directory."""
    if run_dir.startswith("s3://"):
        return s3.read_csv(f"{run_dir[len('s3://') :]}/{stage}/history.csv")
    path = Path(run_dir) / stage / "history.csv"
    return list(csv.DictReader(io.StringIO(path.read_text()))) if path.is_file() else []


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_campaign(run: dict[str, Any], work: Path, rdir: Path) -> str:
    """``rdir/campaign.yaml``: ``run["campaign"]`` (space, trials, resources ...) over the run
    config ``work/config.yaml`` (store on S3), named after the run, its directory (the Optuna
    study, the trials' run directories) under ``rdir/campaigns``, a path every node sees here."""
    import yaml

    campaign = dict(run["campaign"], name=run["name"], base_config=str(work / "config.yaml"))
    campaign["root"] = str(rdir / "campaigns")
    path = rdir / "campaign.yaml"
    path.write_text(yaml.safe_dump(campaign, sort_keys=False))
    return str(path)


def write_study(run: dict[str, Any], work: Path, rdir: Path) -> tuple[str, str]:
    """``rdir/study.yaml``: a study (``localcl study``) of ``run["study"]`` (seeds, budgets,
    methods ...) whose cells share the run config ``work/config.yaml`` (store on S3; its
    ``finetune`` section is every cell's fine-tuning), study directory ``rdir/study`` (a path
    every node sees here). Returns ``(config path, study directory)``."""
    import yaml

    base = yaml.safe_load((work / "config.yaml").read_text())
    stages = {"finetune": base.pop("finetune")}
    for key in ("name", "pretrain", "baseline"):
        base.pop(key, None)
    base["evaluate"] = {"plots": False}
    base["data"]["splits"] = dict(base["data"]["splits"], val=None)  # a study selects no model on val
    study = {"name": run["name"], "study_dir": str(rdir / "study"), "base": base, "stage_defaults": stages}
    study.update(run["study"])
    path = rdir / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return str(path), str(rdir / "study")


def study_cells(study_dir: Path) -> dict[str, Any]:
    """``{"<method>/<budget>-s<seed>": cell.json}`` of every finished cell of a study."""
    return {
        f"{p.parent.parent.name}/{p.parent.name}": read_json(p) for p in sorted(study_dir.glob("cells/*/*/cell.json"))
    }


def training_on(
    cluster: Any, node: str, events: Path, totals: dict[str, int], after_step: int
) -> tuple[str, str] | None:
    """``(trial id, stage)`` of a trial (one events directory each) whose worker group trains
    on ``node`` now, inside a stage of ``totals`` (``{stage: its global steps}``): past
    ``after_step`` (a step checkpoint reported) and not at its last step; rank 0's process
    (the ``pid`` event) is in the node's process tree. None if there is none."""
    import psutil

    try:
        on_node = {p.pid for p in psutil.Process(cluster.nodes[node].pgid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return None
    for d in sorted(events.iterdir()) if events.is_dir() else ():
        for stage, total in totals.items():
            attempts = parse_events(d / f"{stage}.events")
            steps = [s for a in attempts for s in a["steps"]]
            if steps and after_step < max(steps) < total and attempts[-1]["pid"] in on_node:
                return d.name, stage
    return None


def inject_in_campaign(
    fault: dict[str, Any], cluster: Any, events: Path, proc: subprocess.Popen[bytes]
) -> dict[str, Any]:
    """SIGKILL ``fault["node"]`` once a trial trains there, inside a stage of ``fault["totals"]``
    past global step ``fault["after_step"]`` (a step checkpoint reported; :func:`training_on`);
    with ``rejoin``, a replacement node of the same name joins once the GCS has declared the
    node dead (an autoscaler replacing a spot node). Returns the timeline, ``hit``: the trial
    and stage that trained on the node."""
    out: dict[str, Any] = {"kind": fault["kind"], "node": fault["node"]}
    t0 = time.time()
    out["hit"] = poll_until(
        proc, lambda: training_on(cluster, fault["node"], events, fault["totals"], fault["after_step"])
    )
    if not out["hit"]:
        out["error"] = "the campaign ended before the fault could be injected"
        return out
    out["waited_s"] = round(time.time() - t0, 1)
    cluster.kill_node(fault["node"], signal.SIGKILL)
    out["killed_at"] = time.time()
    out["dead_after_s"] = round(cluster.wait_dead(fault["node"]), 1)
    if fault.get("rejoin"):
        cluster.add_node(fault["node"])
        out["rejoined_after_kill_s"] = round(time.time() - out["killed_at"], 1)
        out["node_view_refreshed"] = refresh_node_view(cluster)
    return out


def campaign_trials(db: Path, name: str) -> list[dict[str, Any]]:
    """Every trial of the campaign's Optuna study: number, state, value, params, user attrs."""
    import optuna

    if not db.is_file():
        return []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    return [
        {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params, "attrs": t.user_attrs}
        for t in study.get_trials(deepcopy=False)
    ]


def one_run(run: dict[str, Any], spec: dict[str, Any], cluster: Any, s3: S3, work: Path) -> dict[str, Any]:
    name = run["name"]
    rdir = work / name
    events = rdir / "events"
    events.mkdir(parents=True, exist_ok=True)
    verb = run.get("verb", spec.get("verb", "run"))
    stage_events = events / "pretrain.events"
    if verb == "demo":  # generates its phantom into the run directory: a local one (all nodes see it)
        run_dir = str(rdir / "run")  # the demo trains its stages in one worker group (RUN_DIR/stages)
        snapshot = f"{run_dir}/stages/demo-stages/checkpoint_manager_snapshot.json"
    elif verb == "study":  # the fault hits the first cell's fine-tuning (cell dirs: local, seen by all nodes)
        study_yaml, run_dir = write_study(run, work, rdir)
        first = run["fault_cell"]  # "<method>/<budget>-s<seed>"
        method, cell = first.split("/")
        cell_name = f"{name}-{method}-{cell}"
        snapshot = f"{run_dir}/cells/{first}/finetune/{cell_name}-finetune/checkpoint_manager_snapshot.json"
        stage_events = events / "finetune.events"
    else:
        run_dir, cfg_name = f"s3://{BUCKET}/{name}", spec["config"]["name"]
        snapshot = f"{BUCKET}/{name}/pretrain/{cfg_name}-pretrain/checkpoint_manager_snapshot.json"
    env = cluster.env()
    env.update(s3.env)
    env.update(spec.get("driver_env") or {})
    env.update(LOCALCL_EVENTS_DIR=str(events), PYTHONPATH=str(REPO))
    if verb == "tune":  # a campaign: trials of the run config, 1 worker each, 2 at once
        cmd = [sys.executable, "-m", "ray_jobs.cli", "tune", "--config", write_campaign(run, work, rdir)]
        cmd += ["--address", cluster.address]
    elif verb == "study":
        cmd = [sys.executable, "-m", "ray_jobs.cli", "study", "--config", study_yaml, "--address", cluster.address]
    elif verb == "demo":  # the shipped demo config, with the run's --set overrides
        cmd = [sys.executable, "-m", "ray_jobs.cli", "demo", "--address", cluster.address, "--run-dir", run_dir]
        cmd += ["--no-progress", *run.get("args", [])]
    else:
        cmd = [sys.executable, "-m", "ray_jobs.cli", verb, "--config", str(work / "config.yaml")]
        cmd += ["--address", cluster.address, "--run-dir", run_dir, "--no-progress", *spec.get("cli_args", [])]
    for kv in run.get("set", []):  # per-run overrides, e.g. data.seed=1
        cmd += ["--set", kv]
    log_path = rdir / "cli.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        fault_out: dict[str, Any] | None = None
        try:
            if run.get("fault") and verb == "tune":
                fault_out = inject_in_campaign(run["fault"], cluster, events, proc)
            elif run.get("fault"):
                fault_out = inject(run["fault"], cluster, s3, snapshot, stage_events, proc)
            rc = proc.wait(timeout=max(10.0, spec["deadline"] - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = -9
    out: dict[str, Any] = {
        "name": name,
        "returncode": rc,
        "wall_s": round(time.time() - t0, 1),
        "log_tail": log_path.read_text()[-6000:],
        "fault": fault_out,
        "t0": t0,
    }
    if verb == "tune":  # one events directory per trial
        out["trials"] = campaign_trials(rdir / "campaigns" / name / "study.db", name)
        out["attempts"] = {
            d.name: {p.stem: parse_events(p) for p in sorted(d.glob("*.events"))}
            for d in sorted(events.iterdir())
            if d.is_dir()
        }
        return out
    out["attempts"] = {p.stem: parse_events(p) for p in sorted(events.glob("*.events"))}
    if verb == "study":  # the cells one after another append to the same events files
        out["cells"] = study_cells(Path(run_dir))
        out["results"] = read_json(Path(run_dir) / "results.json")
        return out
    out["history"] = {s: read_history(s3, run_dir, s) for s in ("pretrain", "finetune", "finetune_baseline")}
    if verb == "demo":
        table = Path(run_dir) / "demo_table.md"
        out["demo_table"] = table.read_text() if table.is_file() else None
        out["eval"] = {m: read_json(Path(run_dir) / "eval" / m / "summary.json") for m in ("method", "baseline")}
    return out


def ours(marker: str) -> list[int]:
    """Pids of the processes (other than this one) whose command line names ``marker``."""
    from ray_jobs.cluster.local_head import marked_processes

    return [p.pid for p in marked_processes(marker)]


def cluster_selftest(out: str) -> int:
    """``--cluster-selftest OUT``: head + node ``a``, an actor on ``a``, SIGKILL ``a``; writes
    whether the actor's process died with its node, how long the GCS took to declare the node
    dead, and which of the cluster's processes outlived ``close()``."""
    import psutil
    import ray

    from ray_jobs.cluster.loopback import LoopbackCluster

    report: dict[str, Any] = {}
    cluster = LoopbackCluster(env={"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"})
    try:
        cluster.start(("a",))
        os.environ.update(cluster.env())
        ray.init(address=cluster.address, log_to_driver=False)
        report["driver_on_head"] = ray.get_runtime_context().get_node_id() == cluster.nodes["head"].node_id

        @ray.remote(num_cpus=1, resources={"node_a": 1})
        class Probe:
            def where(self) -> tuple[int, int, str]:
                return os.getpid(), os.getpgid(0), ray.get_runtime_context().get_node_id()

        pid, pgid, node = ray.get(Probe.remote().where.remote(), timeout=60)
        report["actor_on_a"] = node == cluster.nodes["a"].node_id
        report["actor_own_group"] = pgid != cluster.nodes["a"].pgid
        cluster.kill_node("a", signal.SIGKILL)
        time.sleep(1.0)
        report["actor_died_with_node"] = not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        report["dead_after_s"] = cluster.wait_dead("a", timeout=60)
        ray.shutdown()
    except Exception:
        report["error"] = traceback.format_exc()
    finally:
        cluster.close()
        time.sleep(0.5)
        report["left_after_close"] = ours(cluster.temp_dir)
        Path(out).write_text(json.dumps(report, default=str))
    return 0


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    spec["deadline"] = time.time() + float(spec.get("timeout_s", 900))
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"runs": [], "error": None}
    from ray_jobs.cluster.loopback import LoopbackCluster

    s3 = S3()
    cluster = LoopbackCluster(env=dict(spec.get("node_env") or {}, PYTHONPATH=str(REPO)), temp_dir=spec["temp_dir"])
    try:
        t0 = time.time()
        import yaml

        cfg = dict(spec["config"])
        cfg["data"] = dict(cfg["data"], store=make_store(s3, work, int(spec.get("cases", 8))))
        (work / "config.yaml").write_text(yaml.safe_dump(cfg))
        report["store_s"] = round(time.time() - t0, 1)
        t0 = time.time()
        cluster.start(tuple(spec.get("workers", ("a", "b"))))
        report["cluster_start_s"] = round(time.time() - t0, 1)
        for run in spec["runs"]:
            replaced = False
            for name in spec.get("workers", ("a", "b")):  # every run starts on the full cluster
                if cluster.nodes[name].proc.poll() is not None:
                    cluster.add_node(name)
                    replaced = True
            if replaced:
                refresh_node_view(cluster)
            report["runs"].append(one_run(run, spec, cluster, s3, work))
    except Exception:
        report["error"] = traceback.format_exc()
    finally:
        report["cluster_events"] = cluster.events
        report["node_logs"] = {n: cluster.log_tail(n, 1500) for n in cluster.nodes}
        if spec.get("keep_ray_logs"):  # Ray's session logs (controller, workers) for diagnosis
            import shutil

            logs = Path(cluster.temp_dir) / "session_latest" / "logs"
            shutil.copytree(logs, work / "ray_logs", ignore_dangling_symlinks=True, dirs_exist_ok=True)
        cluster.close()
        time.sleep(0.5)
        report["left_after_close"] = ours(cluster.temp_dir)  # every node, worker and agent gone
        s3.stop()
        Path(spec["out"]).write_text(json.dumps(report, indent=1, default=str))
    return 0 if report["error"] is None else 1


if __name__ == "__main__":
    if sys.argv[1] == "--cluster-selftest":
        sys.exit(cluster_selftest(sys.argv[2]))
    sys.exit(main(sys.argv[1]))
