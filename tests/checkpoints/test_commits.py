"""The checkpoint commit protocol, on a local folder and on a real fake-gcs-server; with objects
above 8 MiB (resumable uploads, whose preconditions fake-gcs-server ignores) and injected faults
on Google's storage-testbench."""

from __future__ import annotations

import functools
import json
import logging
import random
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.gcs_server import TEST_BUCKET, fake_gcs_server, gcs_server, store, tamper
from tests.gcs_testbench import gcs_testbench
from trainer.checkpoints.commits import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    NotCommitted,
    checkpoint_prefix,
    commit_checkpoint,
    commit_final,
    download_checkpoint,
    install_local,
    latest_valid_checkpoint,
    list_checkpoints,
    list_incomplete,
    list_runs,
    prune_checkpoints,
    verify_checkpoint,
    verify_local,
)
from trainer.checkpoints.storage import (
    CorruptObjectError,
    PreconditionFailed,
    StorageError,
    UnsafeObjectName,
    bytes_crc32c,
    open_store,
)

__all__ = ["gcs_server", "gcs_testbench", "store"]  # fixtures used by name

FILES = {
    "model.safetensors": b"\x00weights" * 300,
    "config.json": b'{"hidden_size": 64}',
    "optimizer/state.pt": b"\x01optim" * 100,
}
METADATA = {
    "config_hash": "abc123",
    "versions": {"transformers": "5.23.0"},
    "metrics": {"eval_loss": 0.5},
    "is_best": True,
}


def without_manifest(files: dict[str, bytes]) -> dict[str, bytes]:
    """A downloaded checkpoint's files without the MANIFEST.json its local copy carries."""
    return {k: v for k, v in files.items() if k != MANIFEST_NAME}


def make_dir(root: Path, files: dict[str, bytes] = FILES) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def commit(store, tmp_path: Path, step: int, files: dict[str, bytes] = FILES, run: str = "run"):
    local = tmp_path / f"local-{run}-{step}"
    shutil.rmtree(local, ignore_errors=True)
    make_dir(local, files)
    return commit_checkpoint(store, local, run, step, metadata={"step": step})


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


class Recording:
    """Wraps a real Store, records the calls that change objects, and can make
    the n-th call of a method fail (a crash at that point)."""

    def __init__(self, inner, fail: tuple[str, int] | None = None):
        self.inner, self.fail, self.calls = inner, fail, []
        self._lock = threading.Lock()

    def __getattr__(self, name):
        method = getattr(self.inner, name)
        if name not in ("upload_file", "write_bytes", "delete", "delete_prefix"):
            return method

        def call(*args, **kwargs):
            key = args[1] if name == "upload_file" else args[0]
            with self._lock:
                self.calls.append((name, key))
                count = sum(1 for n, _ in self.calls if n == name)
            if self.fail == (name, count):
                raise RuntimeError(f"simulated crash in {name}({key!r})")
            return method(*args, **kwargs)

        return call


# -- manifest ---------------------------------------------------------------------------


def test_manifest_json_round_trip():
    manifest = Manifest("run", 7, (FileEntry("a/b", 3, "AAAAAA=="),), {"x": [1, 2]}, "2025-01-01T00:00:00+00:00")
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert Manifest.from_json(manifest.to_json().encode()).prefix == "run/checkpoint-7"


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        json.dumps({"format_version": 99, "run": "r", "step": 1, "files": []}),
        json.dumps({"format_version": 1, "run": "r", "step": -1, "files": []}),
        json.dumps({"format_version": 1, "run": "r", "step": 1, "files": [{"path": "a"}]}),
    ],
)
def test_manifest_from_json_rejects(text):
    with pytest.raises(ManifestError):
        Manifest.from_json(text)


@pytest.mark.parametrize("run", ["", "a/b", "..", "."])
def test_bad_run_names_are_refused(run):
    with pytest.raises(ValueError):
        checkpoint_prefix(run, 1)


# -- commit, list, verify, download -------------------------------------------------------


def test_commit_round_trip(store, tmp_path):
    local = make_dir(tmp_path / "local")
    manifest = commit_checkpoint(store, local, "run", 100, metadata=METADATA)

    assert (manifest.run, manifest.step, manifest.metadata) == ("run", 100, METADATA)
    assert {f.path: (f.size, f.crc32c) for f in manifest.files} == {
        rel: (len(data), bytes_crc32c(data)) for rel, data in FILES.items()
    }
    stored = Manifest.from_json(store.read_bytes(f"run/checkpoint-100/{MANIFEST_NAME}"))
    assert stored == manifest and stored.format_version == 1 and stored.created
    assert sorted(o.key for o in store.list("run/")) == sorted(
        [f"run/checkpoint-100/{rel}" for rel in FILES] + [f"run/checkpoint-100/{MANIFEST_NAME}"]
    )
    assert list_checkpoints(store, "run") == [manifest]
    assert list_incomplete(store, "run") == []
    verify_checkpoint(store, manifest)

    dest = download_checkpoint(store, manifest, tmp_path / "restore" / "checkpoint-100")
    assert {k: v for k, v in tree(dest).items() if k != MANIFEST_NAME} == FILES
    assert verify_local(dest).files == manifest.files  # the copy carries its manifest: verifiable offline
    assert sorted(p.name for p in dest.parent.iterdir()) == ["checkpoint-100"]


def test_list_runs_puts_the_run_committed_last_first(store, tmp_path):
    commit(store, tmp_path, 1, run="first")
    time.sleep(0.01)  # commit times a clock of coarse resolution still tells apart
    commit_final(store, make_dir(tmp_path / "final"), "second", 5, metadata={})
    for rel, data in FILES.items():  # a run that crashed before its first commit
        store.write_bytes(f"crashed/checkpoint-3/{rel}", data)
    store.write_bytes("notes.txt", b"an object beside the runs is no run")
    assert [(r.name, r.committed is not None) for r in list_runs(store)] == [("second", True), ("first", True), ("crashed", False)]

    time.sleep(0.01)
    commit(store, tmp_path, 2, run="first")
    runs = list_runs(store)
    assert [r.name for r in runs] == ["first", "second", "crashed"]
    assert runs[0].committed == store.info(f"first/checkpoint-2/{MANIFEST_NAME}").updated
    assert list_runs(open_store(str(tmp_path / "nothing-here"))) == []


def test_download_only_a_subset_and_replace_existing(store, tmp_path):
    manifest = commit(store, tmp_path, 1)
    dest = tmp_path / "restore"
    make_dir(dest, {"stale.txt": b"old"})
    download_checkpoint(store, manifest, dest, only="optimizer/")
    assert set(tree(dest)) == {"optimizer/state.pt", MANIFEST_NAME}
    assert tree(dest)["optimizer/state.pt"] == FILES["optimizer/state.pt"]
    with pytest.raises(ValueError, match="matches"):
        download_checkpoint(store, manifest, dest, only="nothing/")


def test_a_commit_without_manifest_is_not_committed(store, tmp_path, caplog):
    committed = commit(store, tmp_path, 1)
    # A crash after the uploads, before the manifest: files but no MANIFEST.json.
    for rel, data in FILES.items():
        store.write_bytes(f"run/checkpoint-2/{rel}", data)

    assert [m.step for m in list_checkpoints(store, "run")] == [1]
    assert list_incomplete(store, "run") == [2]
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoints.commits"):
        assert latest_valid_checkpoint(store, "run") == committed
    assert "checkpoint-2" in caplog.text and "incomplete" in caplog.text


def test_manifest_is_written_last(store, tmp_path):
    recording = Recording(store)
    commit_checkpoint(recording, make_dir(tmp_path / "l"), "run", 3, metadata={})
    writes = [key for name, key in recording.calls if name in ("upload_file", "write_bytes")]
    assert writes[-1] == f"run/checkpoint-3/{MANIFEST_NAME}"
    assert sorted(writes[:-1]) == sorted(f"run/checkpoint-3/{rel}" for rel in FILES)


def test_a_failed_upload_leaves_no_manifest(store, tmp_path):
    crashing = Recording(store, fail=("upload_file", 2))
    with pytest.raises(RuntimeError, match="simulated crash"):
        commit_checkpoint(crashing, make_dir(tmp_path / "l"), "run", 4, metadata={}, max_workers=1)
    assert not store.exists(f"run/checkpoint-4/{MANIFEST_NAME}")
    assert list_checkpoints(store, "run") == []
    assert list_incomplete(store, "run") == [4]


def test_commit_after_a_crash_reuses_replaces_and_removes_leftovers(store, tmp_path):
    store.write_bytes("run/checkpoint-5/config.json", FILES["config.json"])  # complete
    store.write_bytes("run/checkpoint-5/model.safetensors", b"\x00weig")  # half-written
    store.write_bytes("run/checkpoint-5/extra.bin", b"from another attempt")

    recording = Recording(store)
    manifest = commit_checkpoint(recording, make_dir(tmp_path / "l"), "run", 5, metadata={})

    uploaded = {key for name, key in recording.calls if name == "upload_file"}
    assert "run/checkpoint-5/config.json" not in uploaded  # identical: kept
    assert "run/checkpoint-5/model.safetensors" in uploaded
    verify_checkpoint(store, manifest)
    assert sorted(o.key for o in store.list("run/checkpoint-5/")) == sorted(
        [f"run/checkpoint-5/{rel}" for rel in FILES] + [f"run/checkpoint-5/{MANIFEST_NAME}"]
    )


def test_committing_again_is_idempotent_but_never_overwrites_another_checkpoint(store, tmp_path):
    first = commit(store, tmp_path, 6)
    assert commit(store, tmp_path, 6) == first  # e.g. a restart right after the commit
    with pytest.raises(PreconditionFailed, match="already committed with different files"):
        commit(store, tmp_path, 6, files={"model.safetensors": b"another run"})
    assert list_checkpoints(store, "run") == [first]


def test_committing_over_a_broken_checkpoint_replaces_it(store, tmp_path):
    commit(store, tmp_path, 7)
    tamper(store, "run/checkpoint-7/model.safetensors", b"rot")
    replacement = commit(store, tmp_path, 7, files={"model.safetensors": b"retrained"})
    verify_checkpoint(store, replacement)
    assert [f.path for f in list_checkpoints(store, "run")[0].files] == ["model.safetensors"]


def test_create_only_race_after_a_lost_response_is_accepted(store, tmp_path):
    # The same file already uploaded (as when a retried request's first
    # attempt succeeded): the commit accepts it instead of failing.
    local = make_dir(tmp_path / "l")
    store.write_bytes("run/checkpoint-8/config.json", FILES["config.json"])
    manifest = commit_checkpoint(store, local, "run", 8, metadata={})
    verify_checkpoint(store, manifest)


def test_refuses_unusable_folders(store, tmp_path):
    with pytest.raises(FileNotFoundError):
        commit_checkpoint(store, tmp_path / "missing", "run", 1, metadata={})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        commit_checkpoint(store, tmp_path / "empty", "run", 1, metadata={})
    with pytest.raises(ValueError, match="reserved"):
        commit(store, tmp_path, 1, files={MANIFEST_NAME: b"{}"})
    with pytest.raises(TypeError):
        commit_checkpoint(store, make_dir(tmp_path / "l"), "run", 1, metadata={"x": object()})
    assert store.list() == []  # nothing uploaded by any of them


# -- corruption -----------------------------------------------------------------------------


def test_verify_names_the_changed_or_missing_object(store, tmp_path):
    manifest = commit(store, tmp_path, 1)
    tamper(store, "run/checkpoint-1/config.json", b'{"hidden_size": 65}')  # same size
    with pytest.raises(CorruptObjectError, match="checkpoint-1/config.json"):
        verify_checkpoint(store, manifest)
    tamper(store, "run/checkpoint-1/config.json", FILES["config.json"])
    verify_checkpoint(store, manifest)
    store.delete("run/checkpoint-1/optimizer/state.pt")
    with pytest.raises(CorruptObjectError, match="optimizer/state.pt is listed .* but missing"):
        verify_checkpoint(store, manifest)


def test_latest_valid_checkpoint_skips_a_corrupt_newer_one(store, tmp_path, caplog):
    for step in (1, 2, 3):
        commit(store, tmp_path, step)
    tamper(store, "run/checkpoint-3/model.safetensors", b"bit rot")
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoints.commits"):
        chosen = latest_valid_checkpoint(store, "run")
    assert chosen is not None and chosen.step == 2
    assert "skipping checkpoint" in caplog.text and "checkpoint-3" in caplog.text
    assert latest_valid_checkpoint(store, "run", verify=False).step == 3
    assert latest_valid_checkpoint(store, "other-run") is None


def test_an_unparsable_manifest_counts_as_incomplete(store, tmp_path, caplog):
    commit(store, tmp_path, 1)
    store.write_bytes(f"run/checkpoint-2/{MANIFEST_NAME}", b"{truncated")
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoints.commits"):
        assert [m.step for m in list_checkpoints(store, "run")] == [1]
    assert "not JSON" in caplog.text
    assert list_incomplete(store, "run") == [2]


def test_a_failed_download_leaves_the_destination_alone(store, tmp_path):
    manifest = commit(store, tmp_path, 1)
    tamper(store, "run/checkpoint-1/optimizer/state.pt", b"rot")
    dest = make_dir(tmp_path / "restore" / "ckpt", {"previous.txt": b"keep me"})
    with pytest.raises(CorruptObjectError, match="state.pt"):
        download_checkpoint(store, manifest, dest)
    assert tree(dest) == {"previous.txt": b"keep me"}
    assert sorted(p.name for p in dest.parent.iterdir()) == ["ckpt"]  # no partial folder


# -- pruning --------------------------------------------------------------------------------


def test_prune_keeps_the_newest_and_the_protected(store, tmp_path):
    for step in (1, 2, 3, 10, 11):
        commit(store, tmp_path, step)
    recording = Recording(store)

    deleted = prune_checkpoints(recording, "run", keep=2, protect_steps={2})

    assert deleted == [1, 3]
    assert [m.step for m in list_checkpoints(store, "run")] == [2, 10, 11]
    for manifest in list_checkpoints(store, "run"):
        verify_checkpoint(store, manifest)  # "checkpoint-1" did not touch "checkpoint-10"
    assert recording.calls == [
        ("delete", f"run/checkpoint-1/{MANIFEST_NAME}"),
        ("delete_prefix", "run/checkpoint-1/"),
        ("delete", f"run/checkpoint-3/{MANIFEST_NAME}"),
        ("delete_prefix", "run/checkpoint-3/"),
    ]
    assert store.list("run/checkpoint-1/") == [] and store.list("run/checkpoint-3/") == []
    with pytest.raises(ValueError):
        prune_checkpoints(store, "run", keep=0)


def test_an_interrupted_prune_never_leaves_a_committed_checkpoint_with_missing_files(store, tmp_path):
    for step in (1, 2, 3):
        commit(store, tmp_path, step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prune_checkpoints(Recording(store, fail=("delete_prefix", 1)), "run", keep=1)
    assert [m.step for m in list_checkpoints(store, "run")] == [2, 3]
    assert list_incomplete(store, "run") == [1]

    assert prune_checkpoints(store, "run", keep=1) == [2]
    assert [m.step for m in list_checkpoints(store, "run")] == [3]
    assert list_incomplete(store, "run") == []
    assert {o.key.split("/")[1] for o in store.list("run/")} == {"checkpoint-3"}


def test_prune_keeps_an_incomplete_checkpoint_newer_than_the_last_commit(store, tmp_path):
    commit(store, tmp_path, 1)
    commit(store, tmp_path, 2)
    store.write_bytes("run/checkpoint-3/config.json", b"{}")  # a commit in progress
    assert prune_checkpoints(store, "run", keep=5) == []
    assert list_incomplete(store, "run") == [3]


# -- hostile object names (GCS: a local store cannot hold such names) --------------------


def test_object_names_leading_outside_the_destination_are_refused(gcs_server, tmp_path, caplog):
    gcs = open_store(f"gs://{TEST_BUCKET}/ckpt")
    bucket = gcs.client.bucket(TEST_BUCKET)
    evil = b"owned"
    bucket.blob("ckpt/run/checkpoint-1/ok.bin").upload_from_string(b"fine")
    bucket.blob("ckpt/run/checkpoint-1/../../x").upload_from_string(evil)
    manifest = Manifest(
        "run",
        1,
        (
            FileEntry("ok.bin", 4, bytes_crc32c(b"fine")),
            FileEntry("../../x", 5, bytes_crc32c(evil)),
        ),
    )
    bucket.blob(f"ckpt/run/checkpoint-1/{MANIFEST_NAME}").upload_from_string(manifest.to_json())
    assert [m.step for m in list_checkpoints(gcs, "run")] == [1]

    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(UnsafeObjectName, match=r"\.\./\.\./x"):
        download_checkpoint(gcs, manifest, dest)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert not dest.exists()
    with pytest.raises(UnsafeObjectName):
        verify_checkpoint(gcs, manifest)
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoints.commits"):
        assert latest_valid_checkpoint(gcs, "run") is None
    assert "skipping checkpoint gs://test-bucket/ckpt/run/checkpoint-1" in caplog.text

    # A stray hostile object that the manifest does not list is never downloaded,
    # and pruning removes it with the rest.
    safe = commit(gcs, tmp_path, 2)
    bucket.blob("ckpt/run/checkpoint-2/../../y").upload_from_string(evil)
    download_checkpoint(gcs, safe, dest)
    assert {k: v for k, v in tree(dest).items() if k != MANIFEST_NAME} == FILES
    assert prune_checkpoints(gcs, "run", keep=1) == [1]
    assert [o.key for o in gcs.list("run/checkpoint-1/")] == []



# -- large objects, on storage-testbench ------------------------------------------------------
# Real checkpoints hold objects above 8 MiB, which the client uploads resumably: there
# fake-gcs-server ignores create-only (tests/gcs_server.py), so these run on the testbench.

MiB = 1 << 20


@functools.cache
def big_files() -> dict[str, bytes]:
    """Two objects above 8 MiB and a small one sorting after them (uploads go in path order)."""
    rng = random.Random(12)
    return {
        "model.safetensors": rng.randbytes(12 * MiB),
        "optimizer.pt": rng.randbytes(9 * MiB),
        "trainer_state.json": b'{"global_step": 1}',
    }


class PlantsFirst:
    """Wraps a Store: just before the first upload of ``key``, ``data`` lands under that key
    behind the commit's back (an earlier attempt's upload finishing after the listing, or a
    retried request whose first attempt had succeeded)."""

    def __init__(self, inner, key: str, data: bytes):
        self.inner, self.key, self.data, self.planted = inner, key, data, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def upload_file(self, local_path, key, **kwargs):
        if key == self.key and not self.planted:
            self.planted = True
            tamper(self.inner, key, self.data)
        return self.inner.upload_file(local_path, key, **kwargs)


def test_large_checkpoint_round_trip(gcs_testbench, tmp_path):
    gcs = gcs_testbench.store("ckpt")
    manifest = commit_checkpoint(gcs, make_dir(tmp_path / "local", big_files()), "run", 1, metadata=METADATA)
    assert list_checkpoints(gcs, "run") == [manifest] and latest_valid_checkpoint(gcs, "run") == manifest
    verify_checkpoint(gcs, manifest)
    assert without_manifest(tree(download_checkpoint(gcs, manifest, tmp_path / "restore"))) == big_files()


def test_a_commit_resumed_after_a_crash_keeps_identical_large_objects_and_replaces_changed_ones(gcs_testbench, tmp_path):
    gcs = gcs_testbench.store("ckpt")
    local = make_dir(tmp_path / "local", big_files())
    with pytest.raises(RuntimeError, match="simulated crash"):  # every file uploaded, no manifest
        commit_checkpoint(Recording(gcs, fail=("write_bytes", 1)), local, "run", 2, metadata={})
    changed = big_files()["optimizer.pt"][:-1] + b"!"  # as another attempt's version: same size
    tamper(gcs, "run/checkpoint-2/optimizer.pt", changed)

    recording = Recording(gcs)
    manifest = commit_checkpoint(recording, local, "run", 2, metadata={})
    assert [key for name, key in recording.calls if name == "upload_file"] == ["run/checkpoint-2/optimizer.pt"]
    verify_checkpoint(gcs, manifest)
    assert list_checkpoints(gcs, "run") == [manifest]


@pytest.mark.parametrize("leftover", ["identical", "different"])
def test_a_large_object_that_appears_during_the_commit_is_kept_if_identical_else_replaced(gcs_testbench, tmp_path, leftover):
    gcs = gcs_testbench.store("ckpt")
    key = "run/checkpoint-3/model.safetensors"
    weights = big_files()["model.safetensors"]
    recording = Recording(PlantsFirst(gcs, key, weights if leftover == "identical" else weights[: 9 * MiB]))
    manifest = commit_checkpoint(recording, make_dir(tmp_path / "local", big_files()), "run", 3, metadata={})

    # The create-only upload was refused (fake-gcs-server would have overwritten silently):
    # the identical object is kept, the other one deleted and uploaded again.
    calls = [name for name, k in recording.calls if k == key]
    assert calls == (["upload_file"] if leftover == "identical" else ["upload_file", "delete", "upload_file"])
    verify_checkpoint(gcs, manifest)


def test_corruption_of_a_large_object_is_detected(gcs_testbench, tmp_path, caplog):
    gcs = gcs_testbench.store("ckpt")
    older = commit(gcs, tmp_path, 1)
    manifest = commit_checkpoint(gcs, make_dir(tmp_path / "local", big_files()), "run", 2, metadata={})
    weights = bytearray(big_files()["model.safetensors"])
    weights[6 * MiB] ^= 1  # one bit, same size
    tamper(gcs, "run/checkpoint-2/model.safetensors", bytes(weights))

    with pytest.raises(CorruptObjectError, match="checkpoint-2/model.safetensors"):
        verify_checkpoint(gcs, manifest)
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoints.commits"):
        assert latest_valid_checkpoint(gcs, "run") == older
    assert "skipping checkpoint" in caplog.text
    dest = make_dir(tmp_path / "restore" / "ckpt", {"previous.txt": b"keep me"})
    with pytest.raises(CorruptObjectError, match="model.safetensors"):
        download_checkpoint(gcs, manifest, dest)
    assert tree(dest) == {"previous.txt": b"keep me"}
    assert sorted(p.name for p in dest.parent.iterdir()) == ["ckpt"]


# -- injected faults (the testbench's Retry Test API) ---------------------------------------


@pytest.mark.parametrize(
    "faults",
    [
        pytest.param(["return-503", "return-503"], id="503-twice"),
        pytest.param(["return-503-after-256K"], id="503-after-256K-of-a-chunk"),
        pytest.param(["return-broken-stream"], id="broken-stream-on-a-chunk"),
    ],
)
def test_a_large_commit_survives_faults_on_its_uploads(gcs_testbench, tmp_path, faults):
    test_id = gcs_testbench.retry_test({"storage.objects.insert": faults})
    faulty = gcs_testbench.store("ckpt", retry_test=test_id)
    # One upload at a time in path order: the first requests (and the first response with a
    # body, which a broken stream cuts) are the resumable upload of the 12 MiB model.safetensors.
    local = make_dir(tmp_path / "local", big_files())
    manifest = commit_checkpoint(faulty, local, "run", 1, metadata={}, max_workers=1)
    gcs_testbench.assert_faults_injected(test_id)
    gcs = gcs_testbench.store("ckpt")
    verify_checkpoint(gcs, manifest)
    assert list_checkpoints(gcs, "run") == [manifest]


@pytest.mark.parametrize("fault", ["return-503", "return-broken-stream"])
def test_a_commit_survives_a_fault_on_its_manifest_write(gcs_testbench, tmp_path, fault):
    # A broken stream loses the response of a write that succeeded: the create-only retry is
    # refused, and the commit finds its own manifest there.
    gcs = gcs_testbench.store("ckpt")
    local = make_dir(tmp_path / "local", big_files())
    with pytest.raises(RuntimeError, match="simulated crash"):  # every file uploaded, no manifest
        commit_checkpoint(Recording(gcs, fail=("write_bytes", 1)), local, "run", 1, metadata={})
    test_id = gcs_testbench.retry_test({"storage.objects.insert": [fault]})
    manifest = commit_checkpoint(gcs_testbench.store("ckpt", retry_test=test_id), local, "run", 1, metadata={})
    gcs_testbench.assert_faults_injected(test_id)  # the manifest was its only upload
    verify_checkpoint(gcs, manifest)
    assert list_checkpoints(gcs, "run") == [manifest]


def test_a_download_survives_broken_streams(gcs_testbench, tmp_path):
    gcs = gcs_testbench.store("ckpt")
    manifest = commit_checkpoint(gcs, make_dir(tmp_path / "local", big_files()), "run", 1, metadata={})
    test_id = gcs_testbench.retry_test({"storage.objects.get": ["return-broken-stream", "return-503", "return-broken-stream"]})
    faulty = gcs_testbench.store("ckpt", retry_test=test_id)
    dest = download_checkpoint(faulty, manifest, tmp_path / "restore", max_workers=1)
    gcs_testbench.assert_faults_injected(test_id)
    assert without_manifest(tree(dest)) == big_files()


def test_a_download_that_keeps_breaking_fails_and_leaves_no_partial_file(gcs_testbench, tmp_path):
    gcs = gcs_testbench.store("ckpt")
    manifest = commit_checkpoint(gcs, make_dir(tmp_path / "local", big_files()), "run", 1, metadata={})
    test_id = gcs_testbench.retry_test({"storage.objects.get": ["return-broken-stream"] * 50})
    faulty = gcs_testbench.store("ckpt", retry_test=test_id, retry_deadline=0.5)
    dest = tmp_path / "restore" / "ckpt"
    with pytest.raises(StorageError):
        download_checkpoint(faulty, manifest, dest, max_workers=1)
    assert list((tmp_path / "restore").iterdir()) == []
    entry = manifest.files[0]
    with pytest.raises(StorageError):
        faulty.download_file(f"run/checkpoint-1/{entry.path}", tmp_path / "one" / entry.path,
                             expected_crc32c=entry.crc32c, expected_size=entry.size)
    assert list((tmp_path / "one").iterdir()) == []

# -- outage ----------------------------------------------------------------------------------


def test_commit_survives_a_server_outage(tmp_path, monkeypatch):
    """Stop the emulator in the middle of a commit and start it again: the
    library's retry (deadline 30 s) carries every upload through."""
    files = {f"shard-{i // 50}/part-{i:03d}.bin": bytes([i % 256]) * 2048 for i in range(300)}
    local = make_dir(tmp_path / "local", files)
    with fake_gcs_server(backend="filesystem", root=tmp_path / "gcs") as server:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
        server.reset_bucket(TEST_BUCKET)
        gcs = open_store(f"gs://{TEST_BUCKET}/ckpt", retry_deadline=30, timeout=5)
        on_disk = tmp_path / "gcs" / TEST_BUCKET / "ckpt" / "run" / "checkpoint-9"

        with ThreadPoolExecutor(max_workers=1) as background:
            future = background.submit(commit_checkpoint, gcs, local, "run", 9, metadata={}, max_workers=2)
            deadline = time.monotonic() + 20
            while not future.done() and time.monotonic() < deadline:
                if on_disk.is_dir() and sum(1 for _ in on_disk.rglob("*.bin")) >= 30:
                    break
                time.sleep(0.005)
            assert not future.done(), "the commit finished before the outage could start"
            stopped_at = time.monotonic()

            server.restart(downtime=2.0)

            manifest = future.result(timeout=60)
        assert time.monotonic() - stopped_at >= 2.0
        assert len(manifest.files) == 300
        verify_checkpoint(gcs, manifest)
        assert list_checkpoints(gcs, "run") == [manifest]


# -- local copies: pull into a user's folder, verify, install ---------------------------------------


def test_a_merged_download_writes_only_its_own_files_and_deletes_nothing(store, tmp_path):
    manifest = commit(store, tmp_path, 1)
    dest = make_dir(tmp_path / "mine", {"notes.txt": b"keep me", "config.json": b"stale", "data/x.csv": b"1,2"})
    download_checkpoint(store, manifest, dest, merge=True)
    files = tree(dest)
    assert files["notes.txt"] == b"keep me" and files["data/x.csv"] == b"1,2"  # untouched
    assert {k: files[k] for k in FILES} == FILES  # the checkpoint's own files, written (config.json replaced)
    assert verify_local(dest).files == manifest.files
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left

    # A subfolder only, without its prefix (a task's exported model): the same rules.
    sub = make_dir(tmp_path / "sub", {"README.md": b"mine"})
    download_checkpoint(store, manifest, sub, only="optimizer/", strip=True, merge=True)
    assert tree(sub) == {"README.md": b"mine", "state.pt": FILES["optimizer/state.pt"], MANIFEST_NAME: tree(sub)[MANIFEST_NAME]}
    assert [f.path for f in verify_local(sub).files] == ["state.pt"]


def test_a_merged_download_that_cannot_fit_changes_nothing(store, tmp_path):
    manifest = commit(store, tmp_path, 1)
    dest = make_dir(tmp_path / "mine", {"optimizer": b"a file where the checkpoint has a folder"})
    before = tree(dest)
    with pytest.raises(ValueError, match="is a file"):
        download_checkpoint(store, manifest, dest, merge=True)
    assert tree(dest) == before
    tamper(store, "run/checkpoint-1/config.json", b"changed")
    ok = make_dir(tmp_path / "ok", {"keep.txt": b"x"})
    with pytest.raises(CorruptObjectError):
        download_checkpoint(store, manifest, ok, merge=True)
    assert tree(ok) == {"keep.txt": b"x"}


def test_verify_local_refuses_a_folder_no_commit_finished(store, tmp_path):
    manifest = commit(store, tmp_path, 1)
    with pytest.raises(NotCommitted, match="never committed"):
        verify_local(make_dir(tmp_path / "copied-by-hand"))
    dest = download_checkpoint(store, manifest, tmp_path / "copy")
    (dest / "optimizer" / "state.pt").write_bytes(FILES["optimizer/state.pt"][:10])  # a full disk, say
    with pytest.raises(CorruptObjectError, match="truncated"):
        verify_local(dest)
    (dest / "optimizer" / "state.pt").write_bytes(b"\x02" * len(FILES["optimizer/state.pt"]))
    with pytest.raises(CorruptObjectError, match="changed"):
        verify_local(dest)
    (dest / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(NotCommitted, match="not a valid manifest"):
        verify_local(dest)


def test_install_local_replaces_a_folder_as_a_whole(tmp_path):
    old = make_dir(tmp_path / "final", {"model.bin": b"old", "extra.txt": b"old only"})
    manifest_old = Manifest("run", 1, (FileEntry("model.bin", 3, bytes_crc32c(b"old")),), {})
    install_local(make_dir(tmp_path / "build-old", {"model.bin": b"old"}), old, manifest_old)
    new = make_dir(tmp_path / "build", {"model.bin": b"new!"})
    manifest = Manifest("run", 2, (FileEntry("model.bin", 4, bytes_crc32c(b"new!")),), {})
    install_local(new, tmp_path / "final", manifest)
    assert not new.exists()
    assert verify_local(tmp_path / "final").step == 2
    assert set(tree(tmp_path / "final")) == {"model.bin", MANIFEST_NAME}
