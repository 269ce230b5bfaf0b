"""Google's storage-testbench for tests: the fake GCS API the client libraries test against.

Unlike fake-gcs-server (tests/gcs_server.py) it enforces preconditions on uploads of any size
and on deletes, and its Retry Test API injects faults into chosen operations::

    def test_x(gcs_testbench):
        test_id = gcs_testbench.retry_test({"storage.objects.insert": ["return-503"]})
        store = gcs_testbench.store("ckpt", retry_test=test_id)   # every request carries the id
        ...
        gcs_testbench.assert_faults_injected(test_id)

One testbench process serves the whole test session: ``../shared/tools/gcs-testbench PORT``
starts it (the first time on a machine it installs the testbench into
``$TMPDIR/gcs-testbench-venv``, 15-30 s) and it is stopped at exit. The ``gcs_testbench``
fixture sets ``STORAGE_EMULATOR_HOST`` and ``GOOGLE_CLOUD_PROJECT`` for the test and gives it
an empty bucket ``test-bucket``; re-export it from conftest.py. If the tool is missing or
fails, the tests using it fail with its output: CI must run them, never skip them.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gcs_server import PROJECT, TEST_BUCKET, free_port, reset_bucket
from trainer.checkpoints.storage import GcsStore

TOOL = Path(__file__).resolve().parents[2] / "shared" / "tools" / "gcs-testbench"
INSTALL_TIMEOUT = 300  # seconds for the tool: the first start pip-installs the testbench


class TestbenchError(RuntimeError):
    """The testbench did not start; the message holds the tool's output."""


def _tmpdir() -> Path:
    return Path(os.environ.get("TMPDIR") or "/tmp")  # as the tool's ${TMPDIR:-/tmp}


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    """Serialize tool runs of concurrent test sessions: two first installs into one venv break it."""
    import fcntl

    with open(_tmpdir() / "gcs-testbench-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs. It is not our child (the tool started it): a zombie waiting for
    init to reap it counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Testbench:
    """One storage-testbench process (a gunicorn process group) on 127.0.0.1."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, tool: Path = TOOL):
        self.tool = tool
        self.port = 0
        self.pid: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the testbench on a free port. Raises TestbenchError with the tool's output."""
        if not self.tool.is_file():
            raise TestbenchError(f"no {self.tool}: the GCS testbench tests need ../shared/tools beside the checkout")
        output = ""
        for _ in range(3):
            self.port = free_port()
            with _install_lock():
                result = subprocess.run(
                    [str(self.tool), str(self.port)],
                    stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                )  # fmt: skip
            if result.returncode == 0:
                self.pid = int(result.stdout.split()[-1])
                return
            output = f"{result.stdout}{result.stderr}{self._log_tail()}"
            if "the server exited" not in result.stderr:  # not a port taken meanwhile: no retry helps
                break
        raise TestbenchError(
            f"{self.tool} {self.port} failed:\n{output}\n(if a first install was interrupted, "
            f"delete {_tmpdir() / 'gcs-testbench-venv'} and run the tests again)"
        )

    def _log_tail(self, size: int = 4000) -> str:
        log = _tmpdir() / f"gcs-testbench-{self.port}.log"
        return f"--- {log}:\n{log.read_text(errors='replace')[-size:]}" if log.exists() else ""

    def is_running(self) -> bool:
        return self.pid is not None and _alive(self.pid)

    def stop(self) -> None:
        """``kill -- -PID``: SIGTERM to the process group, SIGKILL after 5 s."""
        pid, self.pid = self.pid, None
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
        (_tmpdir() / f"gcs-testbench-{self.port}.log").unlink(missing_ok=True)

    def client(self) -> Any:
        """A fresh ``google.cloud.storage.Client`` talking to the testbench."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project=PROJECT, credentials=AnonymousCredentials(), client_options={"api_endpoint": self.url})

    def reset_bucket(self, name: str = TEST_BUCKET) -> None:
        """Make ``name`` exist and be empty."""
        reset_bucket(self.client(), name)

    def store(self, prefix: str = "prefix", *, retry_test: str | None = None, **kwargs: Any) -> GcsStore:
        """A GcsStore on ``gs://test-bucket/PREFIX``; with ``retry_test`` (an id from
        `retry_test`) every request it sends carries the header ``x-retry-test-id``.
        The environment must point at the testbench (the ``gcs_testbench`` fixture does)."""
        kwargs = {"retry_deadline": 20, "timeout": 10, **kwargs}
        if retry_test is None:
            return GcsStore(TEST_BUCKET, prefix, **kwargs)
        return _RetryTestStore(TEST_BUCKET, prefix, retry_test_id=retry_test, **kwargs)

    # -- Retry Test API (storage-testbench/README.md) ------------------------------------

    def retry_test(self, instructions: dict[str, list[str]]) -> str:
        """Create a Retry Test: for each operation (e.g. ``storage.objects.insert``,
        ``storage.objects.get``) the faults its next requests get, in order. Returns its id."""
        body = json.dumps({"instructions": instructions, "transport": "HTTP"}).encode()
        request = urllib.request.Request(
            f"{self.url}/retry_test", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)["id"]

    def retry_test_status(self, test_id: str) -> dict[str, Any]:
        """The Retry Test resource: ``instructions`` still pending, ``completed``."""
        with urllib.request.urlopen(f"{self.url}/retry_test/{test_id}", timeout=10) as response:
            return json.load(response)

    def assert_faults_injected(self, test_id: str) -> None:
        """Fail unless every fault of the Retry Test was injected (none silently missed)."""
        status = self.retry_test_status(test_id)
        pending = {op: faults for op, faults in status["instructions"].items() if faults}
        assert status["completed"] and not pending, f"faults never injected: {pending}"


class _RetryTestStore(GcsStore):
    """A GcsStore whose client sends ``x-retry-test-id`` with every request (JSON API,
    uploads and downloads alike: google-cloud-storage adds a client's extra headers to all).

    Its retries back off from 50 ms instead of the library's 1 s: the same retry decisions
    (what is retried, the deadline), less waiting per injected fault.
    """

    def __init__(self, *args: Any, retry_test_id: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.retry_test_id = retry_test_id

    def _make_retries(self) -> tuple[Any, Any]:
        retry, conditional = super()._make_retries()
        conditional.retry_policy = conditional.retry_policy.with_delay(initial=0.05, maximum=1.0)
        return retry.with_delay(initial=0.05, maximum=1.0), conditional

    def _make_client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project=PROJECT, credentials=AnonymousCredentials(), extra_headers={"x-retry-test-id": self.retry_test_id}
        )


_shared: Testbench | None = None
_failure: str | None = None


def shared_testbench() -> Testbench:
    """The session-wide testbench, started on first use, stopped at exit. A failed start
    fails the test (once tried, every later test fails at once with the same output)."""
    global _shared, _failure
    if _failure is not None:
        pytest.fail(_failure, pytrace=False)
    if _shared is None:
        _shared = Testbench()
        atexit.register(_shared.stop)
    if not _shared.is_running():
        try:
            _shared.start()
        except (TestbenchError, OSError, subprocess.SubprocessError) as e:
            _failure = f"storage-testbench: {e}"
        if _failure is not None:
            pytest.fail(_failure, pytrace=False)
    return _shared


@pytest.fixture
def gcs_testbench(monkeypatch: pytest.MonkeyPatch) -> Testbench:
    """A running storage-testbench with an empty ``test-bucket``; the environment points
    google-cloud-storage at it for the duration of the test."""
    testbench = shared_testbench()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", testbench.url)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
    testbench.reset_bucket(TEST_BUCKET)
    return testbench
