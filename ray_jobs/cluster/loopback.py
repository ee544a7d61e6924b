"""A multi-node Ray cluster on one machine, loopback only, for fault tests.

``LoopbackCluster`` runs a head and named worker nodes, each ``ray start --block`` in its own
session (its own process group; Ray gives each worker process a group of its own, so a node
is killed whole through its process tree: :meth:`LoopbackCluster.kill_node`), all on 127.0.0.1 with one shared ``--temp-dir``. Each worker node gets
``--num-cpus``, a custom resource ``node_<name>: 1`` and the label ``localcl-node=<name>``.

It must run inside a network namespace that has nothing but loopback
(:func:`loopback_namespace_argv` wraps a command in ``unshare -n``). There
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` must be unset (it refuses extra nodes) and Ray, having no
other interface, keeps every connection on 127.0.0.1. Outside such a namespace the same
cluster would talk over the host's external address (Ray issue #59110), so
:meth:`LoopbackCluster.start` refuses to run where a non-loopback interface is up.

Fault injection: :meth:`~LoopbackCluster.kill_node` (SIGKILL: a node that vanishes; SIGTERM: what
Kubernetes sends a pod), :meth:`~LoopbackCluster.drain_node` (``ray drain-node`` with a deadline,
what a KubeRay preStop hook or the autoscaler does before a spot node goes) and
:meth:`~LoopbackCluster.add_node` (a node that joins, e.g. a replacement). :meth:`close` ends
exactly the processes of this cluster (process groups, then any process whose command line
names the cluster's private temp dir); never ``ray stop``, which ends every Ray process on the
machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from ray_jobs.cluster.local_head import stop_process_tree

__all__ = ["LoopbackCluster", "Node", "loopback_namespace_argv", "loopback_namespace_available", "only_loopback"]

HEAD_PORT = 6379  # the namespace is private: fixed ports cannot collide with another session
DASHBOARD_PORT = 8265
NODE_LABEL = "localcl-node"


def loopback_namespace_argv(argv: list[str]) -> list[str]:
    """``argv`` wrapped to run in a fresh network namespace with only ``lo`` up (needs root or
    user namespaces). Processes it starts inherit the namespace."""
    return ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]


def loopback_namespace_available() -> str | None:
    """None when :func:`loopback_namespace_argv` works here, else why not."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare/ip not installed"
    try:
        proc = subprocess.run(loopback_namespace_argv(["true"]), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -n failed: {exc}"
    if proc.returncode != 0:
        return f"unshare -n failed: {proc.stderr.strip()[:200]}"
    return None


def only_loopback() -> bool:
    """Whether this process's network namespace has no interface but ``lo``."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


@dataclass
class Node:
    """One ``ray start --block`` process group: ``pgid`` (= the ``ray start`` pid), its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log: IO[str]
    node_id: str = ""
    signals: list[str] = field(default_factory=list)

    @property
    def pgid(self) -> int:
        return self.proc.pid


class LoopbackCluster:
    """Head + worker nodes on 127.0.0.1 (see the module docstring).

    ``env`` is added to every node's environment (Ray system settings such as
    ``RAY_health_check_period_ms``, so a killed node is declared dead quickly). The head runs
    no work (``--num-cpus 0``) unless ``head_cpus`` says otherwise: drivers, Train controllers
    and the dashboard live there, as on a Kubernetes head pod. ``address`` is the GCS address
    (``127.0.0.1:6379``) for ``ray.init``/``--address``; ``dashboard`` its HTTP URL.
    """

    def __init__(
        self,
        worker_cpus: int = 1,
        head_cpus: int = 0,
        object_store_mb: int = 128,
        env: dict[str, str] | None = None,
        temp_dir: str | None = None,
        start_timeout: float = 120.0,
    ) -> None:
        self.worker_cpus = worker_cpus
        self.head_cpus = head_cpus
        self.object_store_mb = object_store_mb
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        # short: Ray's unix socket paths live under it (108-byte limit)
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="lcmn", dir="/tmp")
        self.address = f"127.0.0.1:{HEAD_PORT}"
        self.dashboard = f"http://127.0.0.1:{DASHBOARD_PORT}"
        self.nodes: dict[str, Node] = {}  # the latest node of each name
        self.started: list[Node] = []  # every node ever started (replacements included)
        self.events: list[dict[str, Any]] = []  # what was done to which node, when (time.time())

    # ------------------------------------------------------------------ lifecycle
    def start(self, workers: tuple[str, ...] = ("a", "b")) -> LoopbackCluster:
        """Start the head and ``workers``; return once all of them are registered alive."""
        if not only_loopback():
            raise RuntimeError(
                "LoopbackCluster needs a network namespace with only loopback (run it under "
                "ray_jobs.cluster.loopback.loopback_namespace_argv): here Ray would use the host's address"
            )
        os.makedirs(self.temp_dir, exist_ok=True)
        self._spawn(
            "head",
            [
                "--head",
                "--port",
                str(HEAD_PORT),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(DASHBOARD_PORT),
                "--num-cpus",
                str(self.head_cpus),
            ],
        )
        self.wait_alive({"head"})
        for name in workers:  # one at a time: raylets registering together can time out on 2 cores
            self.add_node(name)
        return self

    def add_node(self, name: str, wait: bool = True, attempts: int = 3) -> Node:
        """Start worker node ``name`` (``--num-cpus worker_cpus``, resource ``node_<name>``,
        label ``localcl-node=<name>``) and, with ``wait``, return once it is registered alive.
        A name may be reused after :meth:`kill_node` (a replacement node).

        ``ray start`` gives a raylet 30 s to register with the GCS (hard-coded in Ray) and exits
        with "timed out during startup" on a loaded machine; with ``wait`` such a start is
        killed and retried, up to ``attempts`` starts in all."""
        old = self.nodes.get(name)
        if old is not None and old.proc.poll() is None:
            raise ValueError(f"node {name} is running")
        args = ["--address", self.address, "--num-cpus", str(self.worker_cpus)]
        args += ["--resources", json.dumps({f"node_{name}": 1})]
        for attempt in range(1, attempts + 1):
            node = self._spawn(name, args)
            self._event("add", name)
            if not wait:
                return node
            try:
                self.wait_alive({name})
                return node
            except RuntimeError as exc:
                if attempt == attempts or "timed out during startup" not in str(exc):
                    raise
                self._event("start timed out", name, attempt=attempt)
                self.kill_node(name)  # whatever the failed start left running
                time.sleep(5.0)  # a raylet that registered late is declared dead meanwhile (tests: 3 s)
        raise AssertionError("unreachable")  # pragma: no cover

    def kill_node(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal node ``name``. SIGKILL: the node vanishes: its process group (the ``ray
        start`` process, raylet, agents) and every descendant (Ray puts each worker process in a
        process group of its own, so the group alone would leave them running). Any other
        signal, e.g. SIGTERM, the start of a Kubernetes pod deletion: the process group only,
        so the raylet's own handler decides what happens to its workers."""
        import psutil

        node = self.nodes[name]
        self._event(signal.Signals(sig).name, name)
        node.signals.append(signal.Signals(sig).name)
        victims: list[psutil.Process] = []
        if sig == signal.SIGKILL:
            try:
                victims = psutil.Process(node.pgid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(node.pgid, sig)
        except ProcessLookupError:
            pass
        for p in victims:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def drain_node(self, name: str, deadline_s: int | None, reason: str = "preemption", message: str = "test") -> None:
        """``ray drain-node`` node ``name`` (``reason`` ``preemption`` or ``idle``) with a
        deadline ``deadline_s`` seconds from now: Ray Train's preemption watcher then reports
        it through ``ray.train.get_preemption_info()``. Raises ``RuntimeError`` when the GCS
        refuses the drain."""
        node = self.nodes[name]
        kind = {"preemption": "DRAIN_NODE_REASON_PREEMPTION", "idle": "DRAIN_NODE_REASON_IDLE_TERMINATION"}[reason]
        cmd = [self._ray(), "drain-node", "--address", self.address, "--node-id", node.node_id]
        cmd += ["--reason", kind, "--reason-message", message]
        if deadline_s is not None:
            cmd += ["--deadline-remaining-seconds", str(int(deadline_s))]
        self._event("drain", name, deadline_s=deadline_s)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self._env(), timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"ray drain-node {name}: {proc.stdout[-500:]}{proc.stderr[-1500:]}")

    def wait_gone(self, name: str, timeout: float = 60.0) -> bool:
        """Wait for node ``name``'s ``ray start`` process to exit; whether it did."""
        try:
            self.nodes[name].proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        self._event("exited", name, returncode=self.nodes[name].proc.returncode)
        return True

    def close(self, keep_logs: bool = False) -> None:
        """SIGKILL every node's process group, then every process left whose command line names
        this cluster's temp dir (workers that changed process group), and remove the temp dir
        (unless ``keep_logs``: Ray's session logs are under it)."""
        for node in self.started:
            try:
                os.killpg(node.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            node.log.close()
        for node in self.started:
            stop_process_tree(node.pgid, self.temp_dir, grace=2.0)
        if not keep_logs:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ state
    def node_states(self) -> dict[str, dict[str, Any]]:
        """``{name: {"node_id", "alive", "resources", "death"}}`` of every node the GCS knows by label
        (the State API; a dead node stays listed, ``alive`` False). Where a name was reused (a
        replacement node), the entry is the node this cluster last started under that name once
        its id is known, else the live one."""
        from ray.util.state import list_nodes

        try:
            listed = list_nodes(
                address=self.address, detail=True, limit=1000, timeout=20, raise_on_missing_output=False
            )
        except Exception as exc:  # the dashboard is not up yet, or a request timed out
            raise RuntimeError(f"list_nodes: {exc}") from exc
        out: dict[str, dict[str, Any]] = {}
        for state in listed:
            n = state if isinstance(state, dict) else vars(state)
            name = (n.get("labels") or {}).get(NODE_LABEL)
            if not name:
                continue
            alive = n.get("state") == "ALIVE"
            ours = self.nodes.get(name)
            if name in out and ours is not None and ours.node_id:
                if n["node_id"] != ours.node_id:
                    continue  # an earlier node of the same name
            elif name in out and out[name]["alive"] and not alive:
                continue  # a replacement node of the same name is alive
            out[name] = {
                "node_id": n["node_id"],
                "alive": alive,
                "resources": n.get("resources_total") or {},
                "death": n.get("state_message"),  # e.g. "Terminated due to preemption: ..."
            }
        return out

    def wait_alive(self, names: set[str], timeout: float | None = None) -> None:
        """Wait until every node in ``names`` is registered alive (and record its node id)."""
        deadline = time.monotonic() + (timeout or self.start_timeout)
        last = ""
        while time.monotonic() < deadline:
            for name in names:
                proc = self.nodes[name].proc
                if proc.poll() is not None:
                    raise RuntimeError(f"ray start ({name}) exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                states = self.node_states()
            except RuntimeError as exc:
                last = str(exc)
                states = {}
            started = {n: self.nodes[n].proc.pid for n in names}
            ok = [n for n in names if states.get(n, {}).get("alive")]
            if len(ok) == len(names):
                for n in names:
                    self.nodes[n].node_id = states[n]["node_id"]
                return
            time.sleep(1.0)
        raise RuntimeError(f"nodes {sorted(names)} not alive within the timeout ({started}): {last[-500:]}")

    def wait_dead(self, name: str, timeout: float = 120.0) -> float:
        """Wait until the GCS reports node ``name`` dead; the seconds it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            state = self.node_states().get(name)
            if state is not None and not state["alive"]:
                self._event("dead", name)
                return time.monotonic() - t0
            time.sleep(0.5)
        raise RuntimeError(f"node {name} still alive after {timeout:.0f} s")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = Path(self.temp_dir) / f"ray_start_{name}.log"
        return path.read_text()[-chars:] if path.exists() else ""

    def env(self) -> dict[str, str]:
        """The environment a driver inside the namespace should use for this cluster."""
        return self._env()

    # ------------------------------------------------------------------ internals
    def _ray(self) -> str:
        exe = Path(sys.executable).parent / "ray"
        return str(exe) if exe.exists() else "ray"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # it refuses worker nodes joining a head; the namespace keeps traffic on loopback instead
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_ADDRESS=self.address)
        env.update(self.extra_env)
        return env

    def _spawn(self, name: str, args: list[str]) -> Node:
        log = open(Path(self.temp_dir) / f"ray_start_{name}.log", "a")
        cmd = [self._ray(), "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", self.temp_dir]
        cmd += ["--object-store-memory", str(self.object_store_mb * 2**20), "--disable-usage-stats"]
        cmd += ["--labels", f"{NODE_LABEL}={name}", *args]
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True, cwd=self.temp_dir
        )
        node = Node(name, proc, log)
        self.nodes[name] = node
        self.started.append(node)
        self._event("start", name, pgid=proc.pid)
        return node

    def _event(self, what: str, name: str, **extra: Any) -> None:
        self.events.append({"t": time.time(), "what": what, "node": name, **extra})
