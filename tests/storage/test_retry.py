"""Object storage away for a while: reads retry connection errors with backoff for up to
``LOCALCL_STORAGE_RETRY_S`` seconds (storage/retry.py), then raise StorageUnavailableError
naming the URL; corrupt data is never retried.

The outage is a loopback TCP relay in front of the session's moto server that stops listening
and cuts every open connection, then listens again on the same port. (Stopping moto's threaded
server itself would not do: its ``stop()`` leaves the listening socket open and keeps serving
keep-alive connections already accepted, so reads in flight would not notice.) botocore's own
retries are set to one attempt, so the time spent is the retry loop's alone.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import storage
from storage.errors import CorruptDataError, StorageUnavailableError
from storage.retry import RETRY_ENV, is_transient, retry_budget_s, with_retry


class Relay:
    """A TCP relay ``127.0.0.1:port -> target`` that can go down (refuse connections, drop open
    ones) and come back up on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        assert self.listener is not None
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close() alone does not)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            server = socket.create_connection(self.target)
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture()
def relay(moto_endpoint: str) -> Iterator[Relay]:
    host, port = moto_endpoint.removeprefix("http://").split(":")
    r = Relay((host, int(port)))
    yield r
    r.down()


def store_via(relay: Relay, bucket: str, name: str) -> tuple[str, dict]:
    """A one-case store on S3 written through the relay; ``(uri, storage_options)``."""
    uri = f"s3://{bucket}/{name}.zarr"
    opts = {
        "endpoint_url": f"http://127.0.0.1:{relay.port}",
        "config_kwargs": {"retries": {"max_attempts": 1}},  # no botocore retries: time the loop
        "skip_instance_cache": True,
    }
    data = np.arange(8 * 6 * 4, dtype=np.float32).reshape(8, 6, 4)
    st = storage.open_store(uri, mode="a", storage_options=opts)
    st.write_case("c0", data, None, {"shape": [8, 6, 4], "labelled": False})
    return uri, opts


def test_with_retry__retries_transient_errors_only() -> None:
    calls: list[int] = []
    slept: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionRefusedError("refused")
        return "ok"

    assert with_retry(flaky, "s3://b/x", budget_s=60, sleep=slept.append) == "ok"
    assert len(calls) == 4 and slept == [0.2, 0.4, 0.8]  # exponential backoff

    def corrupt() -> None:
        calls.append(1)
        raise CorruptDataError("s3://b/x: case 'c', array 'image', slice z=1: checksum mismatch")

    calls.clear()
    with pytest.raises(CorruptDataError):
        with_retry(corrupt, "s3://b/x", budget_s=60, sleep=slept.append)
    assert len(calls) == 1  # never retried
    with pytest.raises(FileNotFoundError):
        with_retry(lambda: (_ for _ in ()).throw(FileNotFoundError("gone")), "s3://b/x", budget_s=60)
    assert not is_transient(ValueError("no")) and is_transient(OSError("wrapped")) is False
    wrapped = OSError("I/O error")
    wrapped.__cause__ = TimeoutError()
    assert is_transient(wrapped)


def test_retry_budget__from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(RETRY_ENV, raising=False)
    assert retry_budget_s() == 120
    monkeypatch.setenv(RETRY_ENV, "7.5")
    assert retry_budget_s() == 7.5
    monkeypatch.setenv(RETRY_ENV, "soon")
    with pytest.raises(storage.StorageError, match=RETRY_ENV):
        retry_budget_s()


def test_s3_outage__read_waits_for_storage_to_return(relay: Relay, s3_env: str, monkeypatch, tmp_path: Path) -> None:
    uri, opts = store_via(relay, s3_env, "a")
    monkeypatch.setenv(RETRY_ENV, "30")
    st = storage.open_store(uri, storage_options=opts)
    np.testing.assert_array_equal(st.read_slice("c0", 0)[0, :2], [0, 4])  # index read, connection pooled
    relay.down()
    threading.Timer(2.0, relay.up).start()
    t0 = time.monotonic()
    np.testing.assert_array_equal(st.read_slice("c0", 3)[1, :2], [27, 31])  # mid-read: storage gone for 2 s
    slice_s = time.monotonic() - t0
    relay.down()  # a store opened while storage is away (listing, zarr.json, shard index)
    threading.Timer(2.0, relay.up).start()
    t0 = time.monotonic()
    again = storage.open_store(uri, storage_options=opts)
    assert again.cases == ["c0"] and again.read_slice("c0", 1)[0, 0] == 1
    open_s = time.monotonic() - t0
    print(f"\noutage 2 s: slice read took {slice_s:.1f} s, store open + read {open_s:.1f} s")
    # lower bound: the reads did wait for the outage; the upper bound is loose (a loaded machine
    # makes a plain store open take seconds by itself)
    assert 1.8 < slice_s < 30 and 1.8 < open_s < 30


def test_s3_outage__longer_than_the_budget_raises_storage_unavailable(relay: Relay, s3_env: str, monkeypatch) -> None:
    uri, opts = store_via(relay, s3_env, "b")
    st = storage.open_store(uri, storage_options=opts)
    st.read_slice("c0", 0)
    monkeypatch.setenv(RETRY_ENV, "1.5")
    relay.down()
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=rf"s3://{s3_env}/b.zarr/cases/c0/image.*unavailable") as err:
        st.read_slice("c0", 2)
    took = time.monotonic() - t0
    print(f"\nstorage down, {RETRY_ENV}=1.5: StorageUnavailableError after {took:.1f} s: {err.value}")
    assert 1.0 < took < 6
    relay.up()
    st.read_slice("c0", 2)  # back: the same store reads again
