"""A private, loopback-only Ray head for tests and benchmarks of the Jobs path.

``with LocalHead(num_cpus=2) as head: head.address`` runs ``ray start --head --block`` bound
to 127.0.0.1 with free ports (GCS, dashboard, client server, dashboard agent) and its own
``--temp-dir``, so it never collides with another Ray instance of the same user. Leaving the
block ends exactly the processes it started: the ``ray start`` process, its descendants, and
any orphan whose command line names the private temp dir (never ``ray stop``, which would kill
every Ray process of the user).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def marked_processes(marker: str) -> list[Any]:
    """This user's processes (``psutil.Process``), other than this one, whose command line
    contains ``marker`` (e.g. a Ray temp dir: every process of that Ray instance names it)."""
    import psutil

    me, found = os.getuid(), []
    for p in psutil.process_iter(["pid", "cmdline", "uids"]):
        try:
            uids = p.info["uids"]
            if uids and uids.real == me and marker in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_process_tree(pid: int, marker: str, grace: float = 5.0) -> None:
    """SIGTERM, then after ``grace`` s SIGKILL, process ``pid``, its descendants and every
    process of this user whose command line contains ``marker``."""
    import psutil

    victims: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(pid)
        victims[root.pid] = root
        for child in root.children(recursive=True):
            victims[child.pid] = child
    except psutil.NoSuchProcess:
        pass
    victims.update((p.pid, p) for p in marked_processes(marker))
    victims.pop(os.getpid(), None)
    for p in victims.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(victims.values()), timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


class LocalHead:
    """``ray start --head`` on 127.0.0.1 for the duration of a ``with`` block.

    ``address`` is the dashboard (Jobs API) URL. ``start_timeout`` bounds the wait for the
    dashboard to answer ``/api/version``; a head that exits or does not answer raises
    ``RuntimeError`` with the tail of its log.
    """

    def __init__(self, num_cpus: int = 2, object_store_mb: int = 256, start_timeout: float = 90.0) -> None:
        self.num_cpus = num_cpus
        self.object_store_mb = object_store_mb
        self.start_timeout = start_timeout
        self.temp_dir: str | None = None
        self.address = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[str] | None = None

    def start(self) -> LocalHead:
        # Short path: Ray's unix socket paths live under it (108-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="lclh", dir="/tmp")
        bin_dir = Path(sys.executable).parent
        ray = bin_dir / "ray"
        dash = free_port()
        env = dict(os.environ)
        env.update(
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        )
        gcs = free_port()
        # Workers inherit it: Ray code in a worker that looks the cluster up by itself (the
        # State API of Train's PlacementGroupCleaner) finds this head, not another instance.
        env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
        self._log = open(Path(self.temp_dir) / "ray_start.log", "w")
        cmd = [
            str(ray if ray.exists() else "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--ray-client-server-port",
            str(free_port()),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--num-cpus",
            str(self.num_cpus),
            "--object-store-memory",
            str(self.object_store_mb * 2**20),
            "--temp-dir",
            self.temp_dir,
            "--disable-usage-stats",
        ]
        self._proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.temp_dir
        )
        self.address = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"ray start exited with {self._proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"the Ray dashboard did not answer within {self.start_timeout:.0f} s:\n{tail}")
            time.sleep(0.5)

    def log_tail(self, chars: int = 2000) -> str:
        if self.temp_dir is None:
            return ""
        if self._log is not None:
            self._log.flush()
        path = Path(self.temp_dir) / "ray_start.log"
        return path.read_text()[-chars:] if path.exists() else ""

    def stop(self) -> None:
        if self._proc is not None and self.temp_dir is not None:
            stop_process_tree(self._proc.pid, self.temp_dir)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def __enter__(self) -> LocalHead:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
