"""One writer per run: a lease object in the checkpoint store, and a lock on the local run folder.

Two jobs writing one run corrupt it: the same command started twice, or a retried Vertex job
overlapping its predecessor, each commit and prune the other's checkpoints. So a run has one
writer at a time:

- ``<run>/LEASE.json`` in the store is created create-only by the job that trains the run. It
  names its owner (a random id, host, pid, Vertex job, start time) and an expiry, and a
  background thread rewrites it every quarter of RUN_LEASE_SECONDS with a compare-and-swap on
  the object's generation, so a job that lost it finds out instead of overwriting a successor's.
  Before every manifest write and every prune the writer checks that the lease is still its own
  (`RunLease.check`); manifests record the writer's id.
- A job that finds the lease held looks at its holder: a process of this machine that no longer
  runs (a crash, a kill -9) is taken over at once; a lease that is refreshed while we watch is a
  live job, and this one stops with one line naming it; a lease that stays unrefreshed until it
  expires (a lost VM) is taken over then. At most RUN_LEASE_SECONDS of waiting.
- ``OUTPUT_DIR/<run>/.trainer.lock`` is held with `fcntl.flock` by the process that uses the run's
  local folder, so two processes on one machine never share it; the kernel drops the lock when
  the process dies.

This module talks to `trainer.checkpoints.storage.Store` only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from .commits import CheckpointError, ResumeError
from .storage import NotFound, PreconditionFailed, StorageError, Store

logger = logging.getLogger(__name__)

LEASE_NAME = "LEASE.json"
LOCK_NAME = ".trainer.lock"


class LeaseHeld(ResumeError):
    """Another job is training this run (its lease is live, or it holds the local folder)."""


class LeaseLost(CheckpointError):
    """This job's lease was taken over (it expired while the store was unreachable): stop writing."""


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' if it does not run): tells a
    reused pid from the process that held the lease."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rpartition(")")[2].split()[19] if stat else ""


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


@dataclass(frozen=True)
class Owner:
    """Who holds a lease: enough to tell the user which job it is, and whether it still runs."""

    id: str
    host: str
    pid: int
    started: str
    job: str = ""  # the Vertex AI job (CLOUD_ML_JOB_ID), when there is one
    boot_id: str = ""  # with pid_ns and start_ticks: is it a process of this machine that still runs?
    pid_ns: str = ""
    start_ticks: str = ""

    @classmethod
    def this_process(cls) -> Owner:
        pid = os.getpid()
        return cls(
            id=uuid.uuid4().hex[:16], host=socket.gethostname(), pid=pid,
            started=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            job=os.environ.get("CLOUD_ML_JOB_ID", ""), boot_id=_read("/proc/sys/kernel/random/boot_id"),
            pid_ns=_pid_namespace(), start_ticks=_start_ticks(pid),
        )

    def describe(self) -> str:
        job = f", Vertex AI job {self.job}" if self.job else ""
        return f"pid {self.pid} on {self.host}{job}, started {self.started}"

    def gone(self) -> bool:
        """True only when certain: the holder was a process of this machine (same boot, same pid
        namespace) that no longer runs. A process elsewhere cannot be checked from here."""
        here = self.boot_id and self.boot_id == _read("/proc/sys/kernel/random/boot_id") and self.pid_ns == _pid_namespace()
        return bool(here) and _start_ticks(self.pid) != self.start_ticks


def _parse(data: bytes) -> tuple[Owner | None, float]:
    """The lease's owner and expiry (UTC seconds); (None, 0) for a lease this code cannot read."""
    try:
        body = json.loads(data)
        owner = Owner(**{k: v for k, v in body["owner"].items() if k in Owner.__dataclass_fields__})
        return owner, float(body["expires_at"])
    except (ValueError, KeyError, TypeError):
        return None, 0.0


class RunLease:
    """The writer lease of one run in a store. `acquire`, then `check` before writes, `release` at the end."""

    def __init__(self, store: Store, run: str, *, seconds: float, owner: Owner | None = None):
        self.store, self.run, self.seconds = store, run, float(seconds)
        self.key = f"{run}/{LEASE_NAME}"
        self.owner = owner or Owner.this_process()
        self.generation: str | None = None
        self.lost: str | None = None  # why the lease is no longer ours
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def refresh_every(self) -> float:
        return self.seconds / 4

    def _body(self) -> bytes:
        return json.dumps({"owner": asdict(self.owner), "run": self.run, "expires_at": time.time() + self.seconds,
                           "refreshed": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
                          indent=2).encode()

    # ---------------------------------------------------------------- taking it
    def acquire(self) -> None:
        """Become the run's writer, or raise LeaseHeld naming the job that is.

        Raises:
            LeaseHeld: a live job holds the lease (seen refreshing it).
            StorageError: the store cannot be used.
        """
        watched: tuple[str | None, float] | None = None  # (generation, when we first saw it)
        while True:
            try:
                info = self.store.write_bytes(self.key, self._body(), create_only=True)
                self.generation = info.generation
                break
            except PreconditionFailed:
                pass
            try:
                data, info = self.store.read_with_info(self.key)
            except NotFound:
                continue  # released meanwhile: try again
            holder, expires_at = _parse(data)
            if holder is not None and holder.id == self.owner.id:  # ours: a retried write whose first answer was lost
                self.generation = info.generation
                break
            now = time.monotonic()
            if watched is None or watched[0] != info.generation:
                if watched is not None and holder is not None:
                    raise LeaseHeld(self._held_message(holder))  # refreshed while we watched: it is alive
                watched = (info.generation, now)
            stale = holder is None or holder.gone() or time.time() > expires_at or now - watched[1] > self.seconds
            if stale:
                who = holder.describe() if holder else "an unreadable lease"
                logger.warning("taking over run %s from %s: it no longer runs or stopped refreshing its lease", self.run, who)
                with contextlib.suppress(PreconditionFailed):  # someone else was faster: look again
                    self.store.delete(self.key, if_generation=info.generation)
                continue
            if now == watched[1]:
                logger.warning("run %s is held by %s; watching its lease for up to %.0fs to see whether it is alive",
                               self.run, holder.describe(), self.seconds)
            time.sleep(min(1.0, self.refresh_every / 4))
        logger.info("lease on run %s taken (%s)", self.run, self.store.uri(self.key))
        self._thread = threading.Thread(target=self._refresh_loop, name="run-lease", daemon=True)
        self._thread.start()

    def _held_message(self, holder: Owner) -> str:
        return (f"run {self.run} in {self.store.uri()} is being trained by another job ({holder.describe()}): "
                "wait for it to finish, stop it, or set another RUN_NAME")

    # ---------------------------------------------------------------- keeping it
    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_every):
            self.refresh()

    def refresh(self) -> None:
        """Rewrite the lease with a new expiry, if it is still ours (compare-and-swap)."""
        with self._lock:
            if self.lost or self.generation is None:
                return
            try:
                self.generation = self.store.write_bytes(self.key, self._body(), if_generation=self.generation).generation
            except PreconditionFailed:
                if self._still_ours():  # a retried write whose first answer was lost
                    return
                self.lost = f"the lease {self.store.uri(self.key)} was taken over by another job"
                logger.error("run %s: %s; this job stops writing", self.run, self.lost)
            except StorageError as e:  # the store is unreachable: the lease holds until it expires
                logger.warning("run %s: could not refresh the lease (%s); retrying", self.run, e)

    def _still_ours(self) -> bool:
        """After a refused compare-and-swap: is the stored lease ours all the same? (A retry of a
        request that succeeded, whose answer was lost, is refused by its own precondition.)
        Adopts the stored generation when it is."""
        try:
            data, info = self.store.read_with_info(self.key)
        except (NotFound, StorageError):
            return False
        holder, _ = _parse(data)
        if holder is not None and holder.id == self.owner.id:
            self.generation = info.generation
            return True
        return False

    def check(self) -> None:
        """Raise LeaseLost unless the stored lease is still this job's (call before each write)."""
        if self.lost:
            raise LeaseLost(f"run {self.run}: {self.lost}; stopped writing so as not to overwrite its checkpoints")
        try:
            data, info = self.store.read_with_info(self.key)
        except NotFound:
            data, info = b"", None
        holder, _ = _parse(data) if data else (None, 0.0)
        if info is not None and info.generation != self.generation and holder is not None and holder.id == self.owner.id:
            with self._lock:
                self.generation = info.generation  # our own refresh, whose answer was lost
        elif info is None or info.generation != self.generation:
            with self._lock:
                self.lost = (f"the lease {self.store.uri(self.key)} is now held by "
                             f"{holder.describe() if holder else 'nobody'}")
            raise LeaseLost(f"run {self.run}: {self.lost}; stopped writing so as not to overwrite its checkpoints")

    def release(self) -> None:
        """Stop refreshing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self.generation is None or self.lost:
                return
            try:
                self.store.delete(self.key, if_generation=self.generation)
            except PreconditionFailed:
                pass
            except StorageError as e:
                logger.warning("run %s: could not release the lease (%s); it expires in %.0fs", self.run, e, self.seconds)
            self.generation = None


class LocalRunLock:
    """An exclusive `flock` on ``<run folder>/.trainer.lock``: one process per local run folder."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Raises LeaseHeld when another process of this machine holds the folder."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LeaseHeld(f"{self.path.parent} is in use by {other}: wait for it to finish, stop it, "
                            "or set another RUN_NAME or OUTPUT_DIR") from None
        except OSError as e:  # a file system without locks (some FUSE mounts): the store's lease still fences
            os.close(fd)
            logger.warning("cannot lock %s (%s): relying on the run's lease in the checkpoint store", self.path, e)
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays (removing it would race)
            self._fd = None

