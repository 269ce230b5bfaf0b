"""A local stand-in for the Vertex AI custom-jobs REST API (stdlib only).

It serves the two calls `trainer.cloud.vertex` makes, as the real
`google-cloud-aiplatform` REST transport sends them:

- ``POST /v1/projects/P/locations/R/customJobs`` answers the body plus
  ``name``, ``state`` and ``createTime``;
- ``GET /v1/projects/P/locations/R/customJobs/ID`` answers the stored job
  with its state moved one step along a script (QUEUED, RUNNING, SUCCEEDED by
  default), so that waiting for a job can be tested.

Every request is recorded. ``fail_next`` makes the next request answer with a
Google API error body, to test how client errors are reported.

Use the ``vertex_server`` fixture, or ``VertexServer`` as a context manager.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import urlsplit

import pytest

SUCCESS_SCRIPT = ("JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED")
CREATE_TIME = "2025-01-01T00:00:00Z"

_COLLECTION = re.compile(r"^/v1/projects/([^/]+)/locations/([^/]+)/customJobs$")
_JOB = re.compile(r"^/v1/projects/([^/]+)/locations/([^/]+)/customJobs/([^/]+)$")


@dataclass
class Recorded:
    """One request as the server received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Job:
    resource: dict[str, Any]
    script: tuple[str, ...]
    error: dict[str, Any] | None
    step: int = 0

    def advance(self) -> dict[str, Any]:
        self.step = min(self.step + 1, len(self.script) - 1)
        self.resource["state"] = self.script[self.step]
        if self.step == len(self.script) - 1 and self.error is not None:
            self.resource["error"] = self.error
        return self.resource


@dataclass
class VertexServer:
    """A threaded HTTP server on 127.0.0.1 with a free port.

    ``script`` is the sequence of states a job created from now on goes
    through: the first is returned by the create call, each later GET moves one
    step and the last repeats. ``error`` (``{"code": int, "message": str}``) is
    attached to the job once it reaches the last state.
    """

    script: tuple[str, ...] = SUCCESS_SCRIPT
    error: dict[str, Any] | None = None
    requests: list[Recorded] = field(default_factory=list)
    jobs: dict[str, _Job] = field(default_factory=dict)
    _failures: list[tuple[str, int, str, str]] = field(default_factory=list)
    _ids: Any = field(default_factory=lambda: itertools.count(1001))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """The value for ``vertex_api_endpoint``: ``http://127.0.0.1:PORT``."""
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def fail_next(
        self, code: int, status: str, message: str, *, method: str = ""
    ) -> None:
        """Answer the next request (of ``method``, if given) with HTTP ``code``.

        The body is a Google API error (``{"error": {code, message, status}}``).
        """
        with self._lock:
            self._failures.append((method, code, status, message))

    def start(self) -> Self:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                server._handle(self, "POST")

            def do_GET(self) -> None:
                server._handle(self, "GET")

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        # A short poll interval makes shutdown() (and so each test) fast.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.01},
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling -------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length).decode() if length else ""
        url = urlsplit(handler.path)
        with self._lock:
            self.requests.append(
                Recorded(
                    method, url.path, url.query, dict(handler.headers.items()), body
                )
            )
            failure = next((f for f in self._failures if f[0] in ("", method)), None)
            if failure is not None:
                self._failures.remove(failure)
                _, code, status, message = failure
                status_code, payload = code, _error_body(code, status, message)
            else:
                status_code, payload = self._route(method, url.path, body)
        self._send(handler, status_code, payload)

    def _route(self, method: str, path: str, body: str) -> tuple[int, dict[str, Any]]:
        collection = _COLLECTION.match(path)
        if method == "POST" and collection:
            project, region = collection.groups()
            job_id = str(next(self._ids))
            resource = json.loads(body or "{}")
            resource.update(
                name=f"projects/{project}/locations/{region}/customJobs/{job_id}",
                state=self.script[0],
                createTime=CREATE_TIME,
            )
            self.jobs[resource["name"]] = _Job(resource, tuple(self.script), self.error)
            return 200, resource
        job = _JOB.match(path)
        if method == "GET" and job:
            name = path.removeprefix("/v1/")
            if name not in self.jobs:
                return 404, _error_body(
                    404, "NOT_FOUND", f"CustomJob {name} not found."
                )
            return 200, self.jobs[name].advance()
        return 404, _error_body(404, "NOT_FOUND", f"no route for {method} {path}")

    @staticmethod
    def _send(
        handler: BaseHTTPRequestHandler, code: int, payload: dict[str, Any]
    ) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json; charset=UTF-8")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


def _error_body(code: int, status: str, message: str) -> dict[str, Any]:
    # The shape Google APIs use, which google.api_core maps to exception classes.
    return {"error": {"code": code, "message": message, "status": status}}


@pytest.fixture
def vertex_server():
    """A running `VertexServer`; point ``vertex_api_endpoint`` at ``.endpoint``."""
    with VertexServer() as server:
        yield server
