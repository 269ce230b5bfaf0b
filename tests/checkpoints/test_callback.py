"""Committed checkpoints end to end, with the real CLI, on the settings users run by default
(EVAL_STRATEGY=SAVE_STRATEGY=epoch, LOAD_BEST_MODEL_AT_END): kill -9 at every named point, each
restart on a new disk reproducing the uninterrupted run's final weights bit for bit, the best
checkpoint surviving pruning; a restart at MAX_STEPS; a server outage; corruption found at resume
and at pull; a non-finite loss, a full disk, a read-only OUTPUT_DIR; pulling into a folder of
one's own; a bad bucket stopping the run; the background committer."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.gcs_server import fake_gcs_server
from tests.runs import CLI_ENV, RUN, STEPS_PER_EPOCH, assert_same_weights, committed_steps, flags, train, weights
from trainer.checkpoints import commits as cs
from trainer.checkpoints.callback import BackgroundCommitter, _Job, background_upload_workers
from trainer.checkpoints.storage import open_store

# ------------------------------------------------------------------------------ kill -9
# On the defaults, with pruning (SAVE_TOTAL_LIMIT=1) and a best checkpoint that is not the last:
# epoch 2 of 4 is the best at this seed and learning rate (checked by the test).
CRASH_SETTINGS = {"num_train_epochs": 4, "learning_rate": 3e-3, "seed": 5, "save_total_limit": 1}
BEST_STEP, LAST_STEP = 2 * STEPS_PER_EPOCH, 4 * STEPS_PER_EPOCH
CRASHES = [
    # (failpoint, step, the step the restart resumes from)
    ("mid_step", 11, 8),
    ("before_upload", 16, 8),
    ("mid_upload", 16, 8),
    ("before_manifest", 24, 16),
    ("after_manifest", 24, 24),
    ("mid_export", LAST_STEP, LAST_STEP),
    ("mid_final_upload", LAST_STEP, LAST_STEP),
    ("before_final_manifest", LAST_STEP, LAST_STEP),
]


@pytest.fixture(scope="module")
def crash_baseline(tiny_model, small_tasks, tmp_path_factory):
    """An uninterrupted run on the defaults: the final (best) weights every restart must reproduce."""
    out = tmp_path_factory.mktemp("crash-baseline")
    done = train(*flags(tiny_model, small_tasks, out, **CRASH_SETTINGS))
    assert done.returncode == 0, done.stderr[-3000:]
    macro = [float(v) for v in re.findall(r"'eval_macro_avg': '([\d.]+)'", done.stdout)][:4]
    assert max(range(4), key=lambda i: macro[i]) == 1, f"epoch 2 must be the best for this test: {macro}"
    assert committed_steps(str(out)) == [BEST_STEP, LAST_STEP]  # the best survived SAVE_TOTAL_LIMIT=1
    return weights(out / RUN)


@pytest.fixture(scope="module")
def crash_runs(tiny_model, small_tasks, tmp_path_factory) -> dict:
    """Each crash point: a run killed there, then its restart on a new disk; two at a time."""
    server = fake_gcs_server()
    gcs = server.__enter__()
    os.environ["STORAGE_EMULATOR_HOST"] = gcs.url  # for this module's store reads
    gcs.client().create_bucket("crashes")

    def one(crash):
        point, step, _ = crash
        base = tmp_path_factory.mktemp(f"crash-{point}")
        uri = f"gs://crashes/{point}"
        env = {"STORAGE_EMULATOR_HOST": gcs.url, "GOOGLE_CLOUD_PROJECT": "test"}
        crashed = train(*flags(tiny_model, small_tasks, base / "vm1", uri, **CRASH_SETTINGS),
                        env={**env, "TRAINER_CRASH_AT": f"{point}:{step}"})
        incomplete = cs.list_incomplete(open_store(uri), RUN)
        restarted = train(*flags(tiny_model, small_tasks, base / "vm2", uri, **CRASH_SETTINGS), env=env)
        return {"crashed": crashed, "restarted": restarted, "base": base, "uri": uri, "incomplete": incomplete}

    try:
        with ThreadPoolExecutor(2) as pool:
            yield dict(zip([c[0] for c in CRASHES], pool.map(one, CRASHES)))
    finally:
        server.__exit__(None, None, None)
        os.environ.pop("STORAGE_EMULATOR_HOST", None)


@pytest.mark.parametrize(("point", "step", "resumes_from"), CRASHES, ids=[c[0] for c in CRASHES])
def test_kill_9_then_restart_on_a_new_disk_gives_the_uninterrupted_final_model(crash_runs, crash_baseline, point, step,
                                                                               resumes_from):
    run = crash_runs[point]
    assert run["crashed"].returncode == -signal.SIGKILL, run["crashed"].stderr[-3000:]
    if point in ("mid_upload", "before_manifest"):
        assert step in run["incomplete"]  # objects without a manifest: never resumed
    assert run["restarted"].returncode == 0, run["restarted"].stderr[-3000:]
    restarted = run["restarted"].stdout + run["restarted"].stderr
    assert f"(step {resumes_from})" in restarted
    assert "taking over run ckpt from pid" in restarted  # the killed job's lease, left behind, is stale
    assert_same_weights(weights(run["base"] / "vm2" / RUN), crash_baseline)
    assert committed_steps(run["uri"]) == [BEST_STEP, LAST_STEP]  # the best survived pruning, also after a resume
    assert cs.verify_local(run["base"] / "vm2" / RUN / "final").step == LAST_STEP


def test_pull_best_returns_the_checkpoint_with_the_best_macro_average(crash_runs, tmp_path):
    run = crash_runs["before_manifest"]  # resumed at step 16, the best, on a new disk
    dest = tmp_path / "best"
    pulled = run_cli("pull", "--which=best", f"--dest={dest}", f"--checkpoint_uri={run['uri']}", f"--run_name={RUN}",
                     env={"STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"]})
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    assert json.loads((dest / "trainer_state.json").read_text())["global_step"] == BEST_STEP
    listed = run_cli("pull", "--list", f"--checkpoint_uri={run['uri']}", f"--run_name={RUN}",
                     env={"STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"]})
    assert re.search(rf"checkpoint-{BEST_STEP}\s.*best", listed.stdout), listed.stdout


def test_a_restart_at_max_steps_in_mid_epoch_trains_no_further(tiny_model, small_tasks, tmp_path):
    # MAX_STEPS=4 ends inside the first epoch (8 steps): the Trainer checks for its last step only
    # after running one, so a resume from checkpoint-4 used to train step 5 too.
    uninterrupted = train(*flags(tiny_model, small_tasks, tmp_path / "a", max_steps=4))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    args = flags(tiny_model, small_tasks, tmp_path / "b", max_steps=4)
    crashed = train(*args, env={"TRAINER_CRASH_AT": "mid_export:4"})
    assert crashed.returncode == -signal.SIGKILL
    restarted = train(*args)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "(step 4)" in restarted.stdout + restarted.stderr
    assert committed_steps(str(tmp_path / "b")) == [4]
    assert cs.verify_local(tmp_path / "b" / RUN / "final").step == 4
    assert_same_weights(weights(tmp_path / "b" / RUN), weights(tmp_path / "a" / RUN))


# ------------------------------------------------------------------------------ the store misbehaving
def test_corrupted_object_is_skipped_at_resume_and_refused_at_pull(gcs_server, tiny_model, small_tasks, tmp_path):
    uri = "gs://test-bucket/corrupt"
    args = dict(eval_strategy="steps", save_strategy="steps", eval_steps=3, save_steps=3, save_total_limit=10)
    first = train(*flags(tiny_model, small_tasks, tmp_path / "a", uri, max_steps=6, **args))
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

    again = train(*flags(tiny_model, small_tasks, tmp_path / "b", uri, max_steps=9, **args))
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "skipping checkpoint" in log and "checkpoint-6" in log
    assert "(step 3)" in log


def test_outage_mid_training_loses_no_checkpoint(tiny_model, small_tasks, tmp_path, monkeypatch):
    with fake_gcs_server(backend="filesystem", root=tmp_path / "gcs") as server:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
        server.client().create_bucket("outage")
        uri = "gs://outage/run"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ENV_FILE": "", **CLI_ENV}
        cmd = [sys.executable, "-m", "trainer", "train",
               *flags(tiny_model, small_tasks, tmp_path / "vm", uri, max_steps=24, eval_strategy="no",
                      load_best_model_at_end=False, save_strategy="steps", save_steps=2, save_total_limit=20)]
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


def test_a_non_finite_loss_stops_the_run_with_one_line_and_keeps_the_last_good_checkpoint(tiny_model, small_tasks, tmp_path):
    args = flags(tiny_model, small_tasks, tmp_path / "out", learning_rate=1e9, warmup_ratio=0, max_grad_norm=0,
                 save_strategy="steps", save_steps=1, eval_strategy="no", load_best_model_at_end=False)
    done = train(*args)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "non-finite training loss (nan) at step 2" in errors[0], done.stderr[-2000:]
    assert "the last committed checkpoint (step 1) is kept" in errors[0]
    assert committed_steps(str(tmp_path / "out")) == [1]
    assert not (tmp_path / "out" / RUN / "final").exists()  # no NaN model committed as the final one


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_a_full_disk_stops_the_run_with_one_line_and_a_restart_elsewhere_resumes(tiny_model, small_tasks, tmp_path):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], check=True)
    store = tmp_path / "store"  # the checkpoint store has room; OUTPUT_DIR's disk holds one checkpoint
    extra = dict(save_strategy="steps", save_steps=2, eval_strategy="no", load_best_model_at_end=False)
    try:
        full = train(*flags(tiny_model, small_tasks, disk / "out", str(store), **extra))
        assert full.returncode == 2, full.stderr[-3000:]
        errors = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "no space left for checkpoint-4" in errors[0] and "OUTPUT_DIR" in errors[0], errors
        assert committed_steps(str(store)) == [2]
        assert not (disk / "out" / RUN / ".trainer" / "checkpoint-4").exists()  # nothing half-written left
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    resumed = train(*flags(tiny_model, small_tasks, tmp_path / "bigger-disk", str(store), **extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 2)" in resumed.stdout + resumed.stderr


def test_a_read_only_output_dir_beside_a_separate_store_stops_before_anything_is_loaded(tiny_model, small_tasks, tmp_path):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: a read-only file system it is
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(readonly)], check=True)
    else:
        readonly.chmod(0o555)
    try:
        done = train(*flags(tiny_model, small_tasks, readonly / "outputs", str(tmp_path / "store")))
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(readonly)], check=True)
        readonly.chmod(0o755)
    assert done.returncode == 2
    line = done.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("error: OUTPUT_DIR=") and "not writable" in line, line
    assert "Tokenizing" not in done.stdout and not (tmp_path / "store").exists()


# ------------------------------------------------------------------------------ pull
def test_pull_lists_and_downloads_into_a_users_folder_without_touching_its_files(gcs_server, tiny_model, small_tasks, tmp_path):
    from transformers import AutoModelForSequenceClassification

    uri = "gs://test-bucket/pull"
    args = flags(tiny_model, small_tasks, tmp_path / "vm", uri, num_train_epochs=1)
    assert train(*args).returncode == 0
    listed = run_cli("pull", "--list", *args)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "checkpoint-8" in listed.stdout and "final" in listed.stdout

    mine = tmp_path / "my-project"
    mine.mkdir()
    (mine / "notes.md").write_text("my notes")
    (mine / "data").mkdir()
    (mine / "data" / "train.csv").write_text("a,b\n")
    pulled = run_cli("pull", "--task=demo_entailment", f"--dest={mine}", *args, cwd=tmp_path)
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    assert (mine / "notes.md").read_text() == "my notes" and (mine / "data" / "train.csv").read_text() == "a,b\n"
    model = AutoModelForSequenceClassification.from_pretrained(mine)
    assert model.config.id2label == {0: "entailment", 1: "not_entailment"}

    here = tmp_path / "cwd"
    here.mkdir()
    (here / "keep.txt").write_text("x")
    # Without RUN_NAME (nor the settings whose default name it would be): the run committed last in the bucket.
    latest = run_cli("pull", "--dest=.", f"--checkpoint_uri={uri}", cwd=here, env=CLI_ENV)
    assert latest.returncode == 0, latest.stderr[-2000:]
    assert f"RUN_NAME is not set and {uri} has no run roberta-base-stsb-rte-commonsense_qa" in latest.stdout
    assert f"using run {RUN}, committed last" in latest.stdout
    assert (here / "keep.txt").read_text() == "x"
    assert json.loads((here / "trainer_state.json").read_text())["global_step"] == 8
    cs.verify_local(here)  # the pulled copy carries its manifest


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


# ------------------------------------------------------------------------------ the bucket
def test_unreachable_or_missing_bucket_stops_before_training(gcs_server, tiny_model, small_tasks, tmp_path):
    missing = train(*flags(tiny_model, small_tasks, tmp_path / "o", "gs://no-such-bucket/x"))
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: bucket gs://no-such-bucket does not exist: create it with `make create-bucket`")
    assert "Tokenizing" not in missing.stdout and not (tmp_path / "o").exists()

    closed = train(*flags(tiny_model, small_tasks, tmp_path / "o2", "gs://test-bucket/x", storage_retry_deadline=2),
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
