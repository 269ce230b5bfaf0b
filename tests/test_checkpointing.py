"""Committed checkpoints end to end, with the real CLI and a real GCS API server (fake-gcs-server):
crash (kill -9) at five points and resume to identical weights; SIGTERM; an outage of the server
mid-training; corruption found at resume and at pull; pulling; a bad bucket stopping the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, run_cli, write_tasks_file
from tests.gcs_server import fake_gcs_server
from trainer import checkpoint_store as cs
from trainer.checkpointing import BackgroundCommitter, _Job, background_upload_workers
from trainer.storage import open_store

RUN = "ckpt"
TASKS = "demo_similarity,demo_entailment,demo_choice,demo_tags"


@pytest.fixture(scope="module")
def small_tasks(tmp_path_factory) -> Path:
    # 16 examples per task, batch 8: 8 steps per epoch, so 12 steps cross an epoch boundary.
    return write_tasks_file(tmp_path_factory.mktemp("small-tasks"), n_train=16, n_eval=8)


def flags(model: Path, tasks: Path, out: Path, uri: str, **extra) -> list[str]:
    values = {
        "model_name": model, "model_init": "scratch", "tasks_file": tasks, "tasks": TASKS, "output_dir": out,
        "run_name": RUN, "checkpoint_uri": uri, "max_steps": 12, "train_batch_size": 8, "eval_batch_size": 8,
        "learning_rate": 1e-3, "eval_strategy": "no", "load_best_model_at_end": False, "save_strategy": "steps",
        "save_steps": 3, "save_total_limit": 10, "logging_steps": 3, "seed": 11, "storage_retry_deadline": 30,
        **extra,
    }
    return [f"--{k}={v}" for k, v in values.items()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def baseline(tiny_model, small_tasks, tmp_path_factory):
    """An uninterrupted run to a local store: the weights every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("baseline")
    result = run_cli("train", *flags(tiny_model, small_tasks, out, str(out)))
    assert result.returncode == 0, result.stderr[-3000:]
    return weights(out / RUN)


def committed_steps(uri: str) -> list[int]:
    return [m.step for m in cs.list_checkpoints(open_store(uri), RUN)]


CRASHES = [
    # (failpoint, step, committed when it dies, the step the restart resumes from)
    ("mid_step", 5, [3], 3),
    ("before_upload", 6, [3], 3),
    ("mid_upload", 6, [3], 3),
    ("before_manifest", 9, [3, 6], 6),
    ("after_manifest", 9, [3, 6, 9], 9),  # step 9 is in the second epoch
]


@pytest.mark.parametrize(("point", "step", "committed", "resumes_from"), CRASHES, ids=[c[0] for c in CRASHES])
def test_kill_9_then_resume_gives_identical_weights(point, step, committed, resumes_from, gcs_server, tiny_model,
                                                    small_tasks, baseline, tmp_path):
    uri = f"gs://test-bucket/{point}"
    crashed = run_cli("train", *flags(tiny_model, small_tasks, tmp_path / "vm1", uri),
                      env={"TRAINER_CRASH_AT": f"{point}:{step}"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert committed_steps(uri) == committed
    if point in ("mid_upload", "before_manifest"):
        assert step in cs.list_incomplete(open_store(uri), RUN)  # objects without a manifest: never resumed

    # A restarted worker has a new disk: only the bucket survives.
    resumed = run_cli("train", *flags(tiny_model, small_tasks, tmp_path / "vm2", uri))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {resumes_from})" in resumed.stdout + resumed.stderr
    assert_same_weights(weights(tmp_path / "vm2" / RUN), baseline)
    assert committed_steps(uri)[-1] == 12
    assert cs.read_final(open_store(uri), RUN) is not None


def test_restart_on_the_same_disk_ignores_a_local_uncommitted_checkpoint(gcs_server, tiny_model, small_tasks, baseline, tmp_path):
    uri = "gs://test-bucket/same-disk"
    out = tmp_path / "vm"
    crashed = run_cli("train", *flags(tiny_model, small_tasks, out, uri), env={"TRAINER_CRASH_AT": "before_upload:6"})
    assert crashed.returncode == -signal.SIGKILL
    assert (out / RUN / "checkpoint-6" / "model.safetensors").is_file()  # saved locally, never committed
    resumed = run_cli("train", *flags(tiny_model, small_tasks, out, uri))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 3)" in resumed.stdout + resumed.stderr
    assert_same_weights(weights(out / RUN), baseline)


def test_local_store_resumes_in_place(tiny_model, small_tasks, baseline, tmp_path):
    out = tmp_path / "local"
    crashed = run_cli("train", *flags(tiny_model, small_tasks, out, str(out)), env={"TRAINER_CRASH_AT": "mid_step:8"})
    assert crashed.returncode == -signal.SIGKILL
    resumed = run_cli("train", *flags(tiny_model, small_tasks, out, str(out)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 6)" in resumed.stdout + resumed.stderr
    assert_same_weights(weights(out / RUN), baseline)


def test_corrupted_object_is_skipped_at_resume_and_refused_at_pull(gcs_server, tiny_model, small_tasks, tmp_path):
    uri = "gs://test-bucket/corrupt"
    first = run_cli("train", *flags(tiny_model, small_tasks, tmp_path / "a", uri, max_steps=6))
    assert first.returncode == 0, first.stderr[-3000:]
    # Change the bytes of checkpoint-6's weights in the bucket (same name, different content).
    client = gcs_server.client()
    blob = client.bucket("test-bucket").blob(f"corrupt/{RUN}/checkpoint-6/model.safetensors")
    data = bytearray(blob.download_as_bytes())
    data[-1] ^= 0xFF
    blob.upload_from_string(bytes(data))

    pulled = run_cli("pull", "--which=6", f"--dest={tmp_path / 'pulled'}", *flags(tiny_model, small_tasks, tmp_path / "p", uri))
    assert pulled.returncode == 2
    assert "model.safetensors" in pulled.stderr and "crc32c" in pulled.stderr
    assert not (tmp_path / "pulled").exists()

    again = run_cli("train", *flags(tiny_model, small_tasks, tmp_path / "b", uri, max_steps=9))
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "skipping checkpoint" in log and "checkpoint-6" in log
    assert "(step 3)" in log


def test_sigterm_commits_a_checkpoint_and_exits_0(gcs_server, tiny_model, small_tasks, tmp_path):
    uri = "gs://test-bucket/sigterm"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ENV_FILE": ""}
    cmd = [sys.executable, "-m", "trainer", "train",
           *flags(tiny_model, small_tasks, tmp_path / "vm", uri, max_steps=100000, save_steps=100000)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        lines = []
        for line in proc.stdout:  # wait until training steps are running
            lines.append(line)
            if "'loss'" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    log = "".join(lines) + out
    assert proc.returncode == 0, log[-3000:]
    assert "Preempted at step" in log and "checkpoint committed" in log
    steps = committed_steps(uri)
    assert len(steps) == 1 and steps[0] >= 3
    assert cs.read_final(open_store(uri), RUN) is None  # stopped early: no final model claimed


def test_outage_mid_training_loses_no_checkpoint(tiny_model, small_tasks, tmp_path, monkeypatch):
    with fake_gcs_server(backend="filesystem", root=tmp_path / "gcs") as server:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
        server.client().create_bucket("outage")
        uri = "gs://outage/run"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ENV_FILE": "", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "trainer", "train", *flags(tiny_model, small_tasks, tmp_path / "vm", uri,
                                                                  max_steps=24, save_steps=2)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "committed" in line:  # the first checkpoint is in: take the server away mid-training
                break
        server.restart(downtime=4)
        out, _ = proc.communicate(timeout=300)
        log = "".join(lines) + out
        assert proc.returncode == 0, log[-3000:]
        store = open_store(uri)
        steps = committed_steps(uri)
        assert steps and steps[-1] == 24, (steps, log[-2000:])
        for manifest in cs.list_checkpoints(store, RUN):
            cs.verify_checkpoint(store, manifest)  # nothing half-written counts as committed
        assert cs.read_final(store, RUN) is not None


def test_pull_lists_and_downloads_a_task_model_ready_for_from_pretrained(gcs_server, tiny_model, small_tasks, tmp_path):
    from transformers import AutoModelForSequenceClassification

    uri = "gs://test-bucket/pull"
    args = flags(tiny_model, small_tasks, tmp_path / "vm", uri, max_steps=6)
    assert run_cli("train", *args).returncode == 0
    listed = run_cli("pull", "--list", *args)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "checkpoint-3" in listed.stdout and "checkpoint-6" in listed.stdout and "final" in listed.stdout

    dest = tmp_path / "model"
    pulled = run_cli("pull", "--task=demo_entailment", f"--dest={dest}", *args)
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    model = AutoModelForSequenceClassification.from_pretrained(dest)
    assert model.config.id2label == {0: "entailment", 1: "not_entailment"}

    latest = run_cli("pull", f"--dest={tmp_path / 'latest'}", *args)
    assert latest.returncode == 0
    assert json.loads((tmp_path / "latest" / "trainer_state.json").read_text())["global_step"] == 6


def test_pull_refuses_object_names_outside_the_destination(gcs_server, tmp_path):
    uri = "gs://test-bucket/evil"
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "ok.txt").write_text("fine")
    store = open_store(uri)
    manifest = cs.commit_checkpoint(store, source, RUN, 1, metadata={})
    # A hostile manifest listing ../../x, with that object present in the bucket.
    evil = cs.Manifest(RUN, 2, (*manifest.files, cs.FileEntry("../../x", 4, manifest.files[0].crc32c)), {})
    bucket = gcs_server.client().bucket("test-bucket")
    bucket.blob(f"evil/{RUN}/checkpoint-2/../../x").upload_from_string(b"evil")
    bucket.blob(f"evil/{RUN}/checkpoint-2/ok.txt").upload_from_string(b"fine")
    bucket.blob(f"evil/{RUN}/checkpoint-2/MANIFEST.json").upload_from_string(evil.to_json())
    dest = tmp_path / "a" / "b" / "dest"
    result = run_cli("pull", "--which=2", f"--dest={dest}", f"--checkpoint_uri={uri}", f"--run_name={RUN}")
    assert result.returncode == 2
    assert "../../x" in result.stderr
    assert not dest.exists() and not (tmp_path / "a" / "x").exists() and not (tmp_path / "x").exists()


def test_unreachable_or_missing_bucket_stops_before_training(gcs_server, tiny_model, small_tasks, tmp_path):
    missing = run_cli("train", *flags(tiny_model, small_tasks, tmp_path / "o", "gs://no-such-bucket/x"))
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: bucket gs://no-such-bucket does not exist: create it with `make create-bucket`")
    assert "Tokenizing" not in missing.stdout and not (tmp_path / "o").exists()

    closed = run_cli("train", *flags(tiny_model, small_tasks, tmp_path / "o2", "gs://test-bucket/x", storage_retry_deadline=2),
                     env={"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"})
    assert closed.returncode == 2
    assert closed.stderr.startswith("error: ") and closed.stderr.strip().count("\n") == 0
    assert not (tmp_path / "o2").exists()


def test_create_bucket(gcs_server):
    first = run_cli("create-bucket", "--checkpoint_uri=gs://fresh-bucket/runs", "--region=europe-west4")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "created gs://fresh-bucket" in first.stdout
    assert gcs_server.client().bucket("fresh-bucket").exists()
    again = run_cli("create-bucket", "--checkpoint_uri=gs://fresh-bucket/runs")
    assert again.returncode == 0 and "already exists" in again.stdout
    local = run_cli("create-bucket", "--checkpoint_uri=/tmp/x")
    assert local.returncode == 2 and "CHECKPOINT_URI" in local.stderr


# ------------------------------------------------------------------------------ the background committer
class _GatedStore:
    """A real LocalStore whose uploads wait for `gate` and count how many run at once."""

    def __init__(self, store, gate: threading.Event):
        self._store, self.gate = store, gate
        self.running = self.most = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._store, name)

    def upload_file(self, *args, **kwargs):
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            assert self.gate.wait(30)
            time.sleep(0.01)  # long enough for other workers, if any, to start theirs
            return self._store.upload_file(*args, **kwargs)
        finally:
            with self._lock:
                self.running -= 1


def _folder(root: Path, step: int, files: int = 4) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for i in range(files):
        (folder / f"part{i}.bin").write_bytes(os.urandom(1000))
    return folder


def test_committer_coalesces_saves_made_while_one_is_in_flight(tmp_path):
    gate = threading.Event()
    store = _GatedStore(open_store(str(tmp_path / "bucket")), gate)
    committer = BackgroundCommitter(store, RUN, keep=None, workers=2)
    committer.submit(_Job(1, _folder(tmp_path / "s", 1), {}))
    deadline = time.monotonic() + 10
    while store.running == 0 and time.monotonic() < deadline:  # step 1 is in flight
        time.sleep(0.01)
    waiting = _folder(tmp_path / "s", 2)
    committer.submit(_Job(2, waiting, {}))
    committer.submit(_Job(3, _folder(tmp_path / "s", 3), {}))  # replaces 2, which never uploads
    assert not waiting.exists()
    assert not committer.wait(timeout=0)
    gate.set()
    assert committer.wait(timeout=30)
    committer.close()
    assert committer.committed == [1, 3] and not committer.failed
    assert [m.step for m in cs.list_checkpoints(store, RUN)] == [1, 3]
    assert store.most <= 2
    assert not list((tmp_path / "s").iterdir())  # every snapshot removed once handled


@pytest.mark.parametrize(("cpus", "workers"), [(1, 1), (2, 1), (4, 2), (16, cs.DEFAULT_WORKERS)])
def test_background_commits_leave_training_half_the_cpus(cpus, workers, monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert background_upload_workers() == workers

    gate = threading.Event()
    gate.set()
    store = _GatedStore(open_store(str(tmp_path / "bucket")), gate)
    committer = BackgroundCommitter(store, RUN, keep=None)
    committer.submit(_Job(1, _folder(tmp_path / "s", 1, files=6), {}))
    assert committer.wait(timeout=30)
    committer.close()
    assert committer.committed == [1] and store.most <= workers
