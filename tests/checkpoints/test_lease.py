"""One writer per run: the lease object in the store (on a local folder and on Google's
storage-testbench, which enforces the preconditions it relies on), the local folder lock, and two
real jobs started on one run: the second exits 2 with one line, the first's checkpoints all verify."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, tiny_flags
from trainer.checkpoints import commits as cs
from trainer.checkpoints.lease import LEASE_NAME, LeaseHeld, LeaseLost, LocalRunLock, Owner, RunLease
from trainer.checkpoints.storage import open_store

RUN = "leased"


@pytest.fixture(params=["local", "testbench"])
def lease_store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return request.getfixturevalue("gcs_testbench").store("leases")


def test_a_lease_is_taken_refreshed_and_released(lease_store):
    lease = RunLease(lease_store, RUN, seconds=4)
    lease.acquire()
    first = lease.generation
    body = json.loads(lease_store.read_bytes(f"{RUN}/{LEASE_NAME}"))
    assert body["owner"]["pid"] == os.getpid() and body["expires_at"] > time.time()
    lease.refresh()
    assert lease.generation != first
    lease.check()  # still ours
    lease.release()
    assert not lease_store.exists(f"{RUN}/{LEASE_NAME}")


def test_a_live_holder_refuses_a_second_writer_naming_it(lease_store):
    holder = RunLease(lease_store, RUN, seconds=4)
    holder.acquire()  # its thread refreshes every second
    try:
        started = time.monotonic()
        with pytest.raises(LeaseHeld, match=rf"run {RUN} .* is being trained by another job \(pid {os.getpid()} on "):
            RunLease(lease_store, RUN, seconds=4).acquire()
        assert time.monotonic() - started < 4  # refused as soon as it saw a refresh, not after the expiry
        holder.check()  # the refused one took nothing
    finally:
        holder.release()


def test_only_one_of_several_starting_writers_gets_the_lease(lease_store):
    leases = [RunLease(lease_store, RUN, seconds=4) for _ in range(4)]

    def take(lease):
        try:
            lease.acquire()
            return True
        except LeaseHeld:
            return False

    with ThreadPoolExecutor(4) as pool:
        won = list(pool.map(take, leases))
    try:
        assert won.count(True) == 1
    finally:
        for lease in leases:
            lease.release()


def _abandoned(store, owner: Owner, *, expires_in: float) -> None:
    body = {"owner": owner.__dict__, "run": RUN, "expires_at": time.time() + expires_in}
    store.write_bytes(f"{RUN}/{LEASE_NAME}", json.dumps(body).encode(), create_only=True)


def _seconds_to_take(store, *, lease_seconds: float) -> float:
    """How long a new writer waits before it holds the run (then it lets go again)."""
    started = time.monotonic()
    lease = RunLease(store, RUN, seconds=lease_seconds)
    lease.acquire()
    taken = time.monotonic() - started
    lease.release()
    return taken


def test_the_lease_of_a_crashed_process_of_this_machine_is_taken_at_once(lease_store):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    crashed = replace(Owner.this_process(), pid=int(dead.stdout), start_ticks="1")
    _abandoned(lease_store, crashed, expires_in=600)  # far from expiring: only the dead pid says it is stale
    assert _seconds_to_take(lease_store, lease_seconds=60) < 5


def test_the_lease_of_a_lost_machine_is_taken_once_it_went_unrefreshed(lease_store):
    elsewhere = replace(Owner.this_process(), host="vm-gone", boot_id="another-boot", pid=1)
    _abandoned(lease_store, elsewhere, expires_in=600)  # its clock may say anything: we watch it ourselves
    assert 4 <= _seconds_to_take(lease_store, lease_seconds=4) < 10
    _abandoned(lease_store, elsewhere, expires_in=-1)  # expired by its own clock: taken at once
    assert _seconds_to_take(lease_store, lease_seconds=60) < 5


def test_a_writer_whose_lease_was_taken_over_stops_and_deletes_nothing(lease_store):
    first = RunLease(lease_store, RUN, seconds=4)
    first.acquire()
    first._stop.set()  # as if its refreshes failed through a long outage
    lease_store.delete(f"{RUN}/{LEASE_NAME}")  # ... and a successor took the run over
    second = RunLease(lease_store, RUN, seconds=4)
    second.acquire()
    with pytest.raises(LeaseLost, match="now held by pid"):
        first.check()
    first.refresh()  # a late refresh must not overwrite the successor's lease
    first.release()
    second.check()
    second.release()


def test_a_commit_checks_the_lease_before_its_manifest(lease_store, tmp_path):
    lease = RunLease(lease_store, RUN, seconds=4)
    lease.acquire()
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"w" * 100)
    cs.commit_checkpoint(lease_store, folder, RUN, 1, metadata={}, before_manifest=lease.check)
    lease_store.delete(f"{RUN}/{LEASE_NAME}")
    RunLease(lease_store, RUN, seconds=4).acquire()  # another job holds it now
    with pytest.raises(LeaseLost):
        cs.commit_checkpoint(lease_store, folder, RUN, 2, metadata={}, before_manifest=lease.check)
    assert [m.step for m in cs.list_checkpoints(lease_store, RUN)] == [1]  # step 2 never looks committed


def test_the_local_folder_lock_admits_one_process(tmp_path):
    lock = LocalRunLock(tmp_path / "run")
    lock.acquire()
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from trainer.checkpoints.lease import LocalRunLock, LeaseHeld\n"
         f"try:\n    LocalRunLock({str(tmp_path / 'run')!r}).acquire()\nexcept LeaseHeld as e:\n    sys.exit(str(e))"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert other.returncode == 1 and f"in use by pid {os.getpid()}" in other.stderr
    lock.release()
    again = LocalRunLock(tmp_path / "run")
    again.acquire()  # the kernel dropped the first lock
    again.release()


# ------------------------------------------------------------------------------ two real jobs
def _start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "ENV_FILE": "", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "trainer", "train", *args], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_a_commit(proc: subprocess.Popen, lines: list[str]) -> None:
    def read():
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 120
    while not any("committed to" in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.1)


@pytest.mark.parametrize("same_output_dir", [True, False], ids=["same-OUTPUT_DIR", "same-CHECKPOINT_URI"])
def test_a_second_job_on_a_run_in_training_exits_2_and_the_first_loses_nothing(gcs_server, tiny_model, tiny_tasks, tmp_path,
                                                                                same_output_dir):
    uri = f"gs://test-bucket/two-jobs-{same_output_dir}"
    extra = dict(run_name=RUN, checkpoint_uri=uri, max_steps=100000, save_steps=3, eval_steps=3, run_lease_seconds=4,
                 save_total_limit=2)
    first = _start(tiny_flags(tiny_model, tiny_tasks, tmp_path / "vm1", **extra))
    lines: list[str] = []
    try:
        _wait_for_a_commit(first, lines)
        second = run_cli("train", *tiny_flags(tiny_model, tiny_tasks, tmp_path / ("vm1" if same_output_dir else "vm2"), **extra),
                         env={"OMP_NUM_THREADS": "1"})
        assert second.returncode == 2, second.stderr[-3000:]
        line = second.stderr.strip()
        assert line.count("\n") == 0 and line.startswith("error: "), line
        assert f"pid {first.pid}" in line and ("RUN_NAME" in line)
        assert "Tokenizing" not in second.stdout  # refused before it loaded anything
        time.sleep(2)  # the first one goes on committing
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0, "".join(lines)[-3000:]
    finally:
        first.kill()
    store = open_store(uri)
    checkpoints = cs.list_checkpoints(store, RUN)
    assert 2 <= len(checkpoints) <= 3  # SAVE_TOTAL_LIMIT=2, and the best
    for manifest in checkpoints:
        cs.verify_checkpoint(store, manifest)  # nothing of the first job's was touched
    writers = {m.metadata["writer"] for m in checkpoints}
    assert len(writers) == 1 and None not in writers  # manifests name their one writer
    assert not store.exists(f"{RUN}/{LEASE_NAME}")  # released when it stopped
    assert Path(tmp_path / "vm1" / RUN / ".trainer.lock").exists()
