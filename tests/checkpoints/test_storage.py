"""trainer.checkpoints.storage against a real fake-gcs-server and a local folder.

Behaviour both back ends share is tested on both (the ``store`` fixture);
the rest is GCS- or local-specific. No google-cloud-storage mocks.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.gcs_server import TEST_BUCKET, free_port, gcs_server, store, tamper
from tests.gcs_testbench import gcs_testbench
from trainer.checkpoints.storage import (
    CorruptObjectError,
    GcsStore,
    LocalStore,
    NotFound,
    PermanentStorageError,
    PreconditionFailed,
    StorageConfigError,
    StorageError,
    TransientStorageError,
    UnsafeObjectName,
    bytes_crc32c,
    file_crc32c,
    open_store,
    safe_local_path,
)

__all__ = ["gcs_server", "gcs_testbench", "store"]  # fixtures used by name

BAD_KEYS = [
    "../../x",
    "/etc/passwd",
    "a/../../b",
    "a/./b",
    "a//b",
    "a/",
    "",
    "a\\..\\b",
    "C:/windows",
    "c:x",
]


# -- both back ends ---------------------------------------------------------------


def test_round_trip(store, tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(b"\x00\x01" * 5000)

    uploaded = store.upload_file(src, "run/a/weights.bin")
    written = store.write_bytes("run/a/config.json", b'{"x": 1}')

    assert (uploaded.size, uploaded.crc32c) == (10000, file_crc32c(src))
    assert (written.size, written.crc32c) == (8, bytes_crc32c(b'{"x": 1}'))
    assert store.read_bytes("run/a/config.json") == b'{"x": 1}'
    assert store.exists("run/a/weights.bin") and not store.exists("run/a/nothing")
    assert store.info("run/a/weights.bin").crc32c == uploaded.crc32c
    listed = store.list("run/")
    assert [(o.key, o.size, o.crc32c) for o in listed] == [
        ("run/a/config.json", 8, written.crc32c),
        ("run/a/weights.bin", 10000, uploaded.crc32c),
    ]
    assert all(o.updated.tzinfo is not None for o in listed)

    dest = store.download_file(
        "run/a/weights.bin",
        tmp_path / "down" / "w.bin",
        expected_crc32c=uploaded.crc32c,
        expected_size=uploaded.size,
    )
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["w.bin"]  # no temp left

    store.delete("run/a/config.json")
    store.delete("run/a/config.json")  # deleting a missing object is fine
    assert [o.key for o in store.list()] == ["run/a/weights.bin"]


def test_upload_with_a_known_checksum_checks_the_stored_object_against_it(store, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"the bytes the manifest was made from")
    known = file_crc32c(src)
    assert store.upload_file(src, "k", crc32c=known).crc32c == known

    src.write_bytes(b"changed after the manifest was made!")  # same size, other bytes
    with pytest.raises(CorruptObjectError, match=re.escape(known)):
        store.upload_file(src, "k2", crc32c=known)


def test_overwrite_replaces_without_create_only(store):
    store.write_bytes("k", b"one")
    store.write_bytes("k", b"two")
    assert store.read_bytes("k") == b"two"


def test_create_only_refuses_an_existing_object(store, tmp_path):
    # Small objects only: fake-gcs-server enforces ifGenerationMatch=0 only for
    # uploads <= 8 MiB (see test_a_second_large_create_only_upload_is_refused).
    store.write_bytes("k", b"first", create_only=True)
    src = tmp_path / "f"
    src.write_bytes(b"second")
    with pytest.raises(PreconditionFailed, match="already exists"):
        store.write_bytes("k", b"second", create_only=True)
    with pytest.raises(FileExistsError):  # PreconditionFailed is one
        store.upload_file(src, "k", create_only=True)
    assert store.read_bytes("k") == b"first"


def test_create_only_has_one_winner_among_threads(store):
    def write(i: int) -> bool:
        try:
            store.write_bytes("race", f"writer {i}".encode(), create_only=True)
        except PreconditionFailed:
            return False
        return True

    with ThreadPoolExecutor(max_workers=6) as pool:
        won = list(pool.map(write, range(6)))  # any other error is raised here
    assert won.count(True) == 1
    assert store.read_bytes("race") == f"writer {won.index(True)}".encode()


def test_delete_prefix_is_a_string_prefix(store):
    for key in ["run/checkpoint-1/a", "run/checkpoint-1/b/c", "run/checkpoint-10/a", "other"]:
        store.write_bytes(key, b"x")
    assert store.delete_prefix("run/checkpoint-1/") == 2
    assert [o.key for o in store.list()] == ["other", "run/checkpoint-10/a"]
    with pytest.raises(ValueError):
        store.delete_prefix("")


def test_missing_object_raises_not_found(store, tmp_path):
    with pytest.raises(NotFound, match="nothing"):
        store.read_bytes("dir/nothing")
    with pytest.raises(FileNotFoundError):
        store.info("dir/nothing")
    with pytest.raises(NotFound):
        store.download_file("dir/nothing", tmp_path / "d" / "nothing")
    assert list((tmp_path / "d").iterdir()) == []
    assert store.list("dir/") == []


@pytest.mark.parametrize("replacement", [b"EVIL!", b"a different, longer body"], ids=["same-size", "other-size"])
def test_download_detects_changed_bytes(store, tmp_path, replacement):
    original = store.write_bytes("obj", b"hello")
    tamper(store, "obj", replacement)
    dest = tmp_path / "out" / "obj"
    with pytest.raises(CorruptObjectError, match="obj"):
        store.download_file("obj", dest, expected_crc32c=original.crc32c, expected_size=original.size)
    assert list(dest.parent.iterdir()) == []  # neither the file nor a temporary


def test_download_checks_size_alone(store, tmp_path):
    store.write_bytes("obj", b"hello")
    with pytest.raises(CorruptObjectError, match="expected 6"):
        store.download_file("obj", tmp_path / "obj", expected_size=6)
    assert not (tmp_path / "obj").exists()


@pytest.mark.parametrize("key", BAD_KEYS)
def test_every_operation_refuses_unsafe_keys(store, tmp_path, key):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    calls = [
        lambda: store.write_bytes(key, b"x"),
        lambda: store.upload_file(src, key),
        lambda: store.read_bytes(key),
        lambda: store.info(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.download_file(key, tmp_path / "d"),
    ]
    for call in calls:
        with pytest.raises(UnsafeObjectName):
            call()
    assert not (tmp_path / "d").exists()


def test_check_access_succeeds_and_leaves_nothing(store):
    store.check_access()
    store.check_access(write=False)
    assert store.list() == []


# -- generations and conditional writes --------------------------------------------------
# fake-gcs-server v1.54 enforces ifGenerationMatch only on uploads of at most 8 MiB, and not on
# deletes (tests/gcs_server.py): `cas_store` adds the testbench to the usual back ends, and
# `strict_store` replaces fake-gcs-server by it.


def _open_test_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path):
    if kind == "local":
        return open_store(str(tmp_path / "local-store"))
    request.getfixturevalue("gcs_server" if kind == "fake-gcs-server" else "gcs_testbench")
    return open_store(f"gs://{TEST_BUCKET}/prefix", retry_deadline=10, timeout=10)


@pytest.fixture(params=["local", "fake-gcs-server", "testbench"])
def cas_store(request, tmp_path):
    """Back ends that enforce conditional writes of small objects."""
    return _open_test_store(request.param, request, tmp_path)


@pytest.fixture(params=["local", "testbench"])
def strict_store(request, tmp_path):
    """Back ends that enforce conditional deletes too."""
    return _open_test_store(request.param, request, tmp_path)


def test_every_write_gives_a_new_generation_that_every_info_reports(cas_store, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"same")
    first = cas_store.write_bytes("k", b"same")
    assert first.generation
    assert cas_store.info("k").generation == first.generation
    assert [o.generation for o in cas_store.list()] == [first.generation]
    # The same bytes again, by every kind of write: a new generation each time, never an old one
    # (a local file system reuses inodes).
    generations = [first.generation, cas_store.upload_file(src, "k").generation]
    for _ in range(20):
        generations.append(cas_store.write_bytes("k", b"same").generation)
    assert len(set(generations)) == len(generations)
    assert cas_store.info("k").generation == generations[-1]
    assert cas_store.write_bytes("new", b"x", create_only=True).generation == cas_store.info("new").generation


def test_compare_and_swap_succeeds_only_from_the_current_generation(cas_store):
    first = cas_store.write_bytes("k", b"v1")
    second = cas_store.write_bytes("k", b"v2", if_generation=first.generation)
    assert second.generation not in (None, first.generation)
    assert cas_store.read_bytes("k") == b"v2" and cas_store.info("k").generation == second.generation

    with pytest.raises(PreconditionFailed, match=f"no longer at generation {first.generation}"):
        cas_store.write_bytes("k", b"stale", if_generation=first.generation)
    assert cas_store.read_bytes("k") == b"v2"

    rewritten = cas_store.write_bytes("k", b"someone else")
    with pytest.raises(PreconditionFailed):
        cas_store.write_bytes("k", b"late", if_generation=second.generation)
    cas_store.delete("k")
    with pytest.raises(PreconditionFailed):
        cas_store.write_bytes("k", b"after delete", if_generation=rewritten.generation)
    with pytest.raises(PreconditionFailed):
        cas_store.write_bytes("never/written", b"x", if_generation=rewritten.generation)
    assert not cas_store.exists("k") and not cas_store.exists("never/written")

    with pytest.raises(ValueError, match="exclude each other"):
        cas_store.write_bytes("k", b"x", create_only=True, if_generation=first.generation)
    with pytest.raises(ValueError, match="not a generation"):
        cas_store.write_bytes("k", b"x", if_generation="0")  # would mean create-only on GCS


def test_conditional_delete_needs_the_current_generation(strict_store):
    first = strict_store.write_bytes("dir/k", b"v1")
    second = strict_store.write_bytes("dir/k", b"v2")
    with pytest.raises(PreconditionFailed, match=f"no longer at generation {first.generation}"):
        strict_store.delete("dir/k", if_generation=first.generation)
    assert strict_store.read_bytes("dir/k") == b"v2"

    strict_store.delete("dir/k", if_generation=second.generation)
    assert not strict_store.exists("dir/k")
    with pytest.raises(PreconditionFailed):  # gone: someone else changed it
        strict_store.delete("dir/k", if_generation=second.generation)
    with pytest.raises(PreconditionFailed):
        strict_store.delete("nowhere/k", if_generation=second.generation)
    strict_store.delete("dir/k")  # unconditional: missing is fine
    with pytest.raises(ValueError, match="not a generation"):
        strict_store.delete("dir/k", if_generation="")
    assert strict_store.list() == []


def test_read_with_info_returns_the_generation_of_that_content(cas_store):
    written = cas_store.write_bytes("k", b"v1")
    data, info = cas_store.read_with_info("k")
    assert data == b"v1"
    assert (info.key, info.size, info.crc32c, info.generation) == ("k", 2, bytes_crc32c(b"v1"), written.generation)
    cas_store.write_bytes("k", b"v2", if_generation=info.generation)
    assert cas_store.read_with_info("k")[0] == b"v2"
    with pytest.raises(NotFound):
        cas_store.read_with_info("missing")


def test_read_with_info_pairs_content_and_generation_while_a_writer_rewrites(cas_store):
    written: dict[str, bytes] = {}
    done = threading.Event()

    def rewrite() -> None:
        try:
            for i in range(30):
                data = f"version {i}".encode()
                written[cas_store.write_bytes("k", data).generation] = data
                time.sleep(0.002)
        finally:
            done.set()

    written[cas_store.write_bytes("k", b"first").generation] = b"first"
    reads = []
    writer = threading.Thread(target=rewrite)
    writer.start()
    while not done.is_set():
        with contextlib.suppress(TransientStorageError):  # changed twice while read: allowed
            reads.append(cas_store.read_with_info("k"))
    writer.join()
    assert reads
    assert [written[info.generation] for data, info in reads] == [data for data, _ in reads]


def test_one_of_racing_compare_and_swap_writers_wins(cas_store):
    n = 8
    for round_ in range(10):
        base = cas_store.write_bytes("race", b"base")
        start = threading.Barrier(n)

        def swap(i: int, base=base, start=start, round_=round_):
            start.wait()
            try:
                return cas_store.write_bytes("race", f"{round_}: writer {i}".encode(), if_generation=base.generation)
            except PreconditionFailed:
                return None

        with ThreadPoolExecutor(max_workers=n) as pool:
            results = list(pool.map(swap, range(n)))  # any other error is raised here
        winners = [i for i, r in enumerate(results) if r is not None]
        assert len(winners) == 1, results
        data, info = cas_store.read_with_info("race")
        assert data == f"{round_}: writer {winners[0]}".encode()
        assert info.generation == results[winners[0]].generation


# -- safe_local_path ----------------------------------------------------------------


@pytest.mark.parametrize("key", BAD_KEYS)
def test_safe_local_path_refuses(tmp_path, key):
    with pytest.raises(UnsafeObjectName):
        safe_local_path(tmp_path, key)


def test_safe_local_path_refuses_a_symlink_leading_out(tmp_path):
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeObjectName, match="outside"):
        safe_local_path(tmp_path / "dest", "link/x")


def test_safe_local_path_maps_nested_names(tmp_path):
    assert safe_local_path(tmp_path, "a/b/c.bin") == tmp_path / "a" / "b" / "c.bin"
    assert safe_local_path(tmp_path, "..hidden/x..y") == tmp_path / "..hidden" / "x..y"


# -- open_store ------------------------------------------------------------------------


def test_open_store_parses_uris(tmp_path, monkeypatch):
    gcs = open_store("gs://my-bucket/some/prefix/")
    assert isinstance(gcs, GcsStore)
    assert (gcs.bucket_name, gcs.prefix) == ("my-bucket", "some/prefix")
    assert gcs.uri("a/b") == "gs://my-bucket/some/prefix/a/b"
    assert open_store("gs://my-bucket").uri("k") == "gs://my-bucket/k"

    local = open_store(tmp_path.as_uri() + "/store")
    assert isinstance(local, LocalStore) and local.root == tmp_path / "store"
    assert open_store(str(tmp_path / "p")).root == tmp_path / "p"
    monkeypatch.chdir(tmp_path)
    assert open_store("relative/dir").root == tmp_path / "relative" / "dir"


@pytest.mark.parametrize(
    "uri",
    [
        "gs://",
        "gs:///prefix",
        "gs:/my-bucket/x",
        "gs://Not_A_Bucket!/x",
        "gs://b/../x",
        "s3://bucket/key",
        "file://otherhost/path",
        "",
    ],
)
def test_open_store_rejects_bad_uris(uri):
    with pytest.raises(StorageConfigError) as info:
        open_store(uri, setting="CHECKPOINT_URI")
    message = str(info.value)
    assert "\n" not in message and "CHECKPOINT_URI" in message
    assert repr(uri) in message or not uri
    assert isinstance(info.value, ValueError)


def test_modules_import_no_cloud_or_ml_library():
    code = (
        "import sys, trainer; before = set(sys.modules); "
        "import trainer.checkpoints.storage, trainer.checkpoints.commits; "
        "new = set(sys.modules) - before; "
        "bad = sorted(m for m in new if m.split('.')[0] in "
        "('google', 'google_crc32c', 'torch', 'transformers', 'requests')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    root = ROOT
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- GCS only ----------------------------------------------------------------------------


def test_missing_bucket_is_a_permanent_error_naming_it(gcs_server):
    missing = open_store("gs://no-such-bucket/ckpt", retry_deadline=5)
    with pytest.raises(PermanentStorageError) as info:
        missing.check_access()
    assert "gs://no-such-bucket does not exist" in str(info.value)
    assert "make create-bucket" in str(info.value)
    with pytest.raises(PermanentStorageError, match="no-such-bucket"):
        missing.write_bytes("k", b"x")


def test_unreachable_host_fails_fast(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
    unreachable = open_store("gs://test-bucket/ckpt", retry_deadline=1.5, timeout=1)
    started = time.monotonic()
    with pytest.raises(TransientStorageError, match="still failing after retrying"):
        unreachable.write_bytes("k", b"x", create_only=True)
    with pytest.raises(StorageError):
        unreachable.check_access()
    assert time.monotonic() - started < 10


def test_objects_outside_the_prefix_are_invisible(gcs_server, tmp_path):
    bucket = gcs_server.client().bucket(TEST_BUCKET)
    bucket.blob("elsewhere/k").upload_from_string(b"not mine")
    bucket.blob("prefix-sibling/k").upload_from_string(b"not mine")
    scoped = open_store(f"gs://{TEST_BUCKET}/prefix")
    scoped.write_bytes("k", b"mine")
    assert [o.key for o in scoped.list()] == ["k"]
    assert bucket.blob("prefix/k").download_as_bytes() == b"mine"


def test_one_client_shared_by_threads(gcs_server):
    shared = open_store(f"gs://{TEST_BUCKET}/threads")
    clients = []

    def work(i: int) -> None:
        shared.write_bytes(f"k{i}", b"x")
        clients.append(shared.client)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(shared.list()) == 4
    assert len({id(c) for c in clients}) == 1


def test_google_errors_are_translated():
    from google.api_core import exceptions as gexc
    from google.auth.exceptions import DefaultCredentialsError

    gcs = GcsStore("b", "p", retry_deadline=3)
    cases = [
        (gexc.Forbidden("denied"), PermanentStorageError, "permission denied on gs://b/p/k"),
        (gexc.Unauthorized("bad token"), PermanentStorageError, "credentials"),
        (DefaultCredentialsError("none"), PermanentStorageError, "application-default"),
        (gexc.NotFound("gone"), NotFound, "gs://b/p/k does not exist"),
        (gexc.PreconditionFailed("412"), PreconditionFailed, "already exists"),
        (gexc.TooManyRequests("slow"), TransientStorageError, "slow"),
        (gexc.RetryError("deadline", ConnectionError("refused")), TransientStorageError, "3s"),
        (gexc.BadRequest("bad"), StorageError, "bad"),
    ]
    for exc, kind, text in cases:
        mapped = gcs._translate(exc, "k", "object")
        assert type(mapped) is kind and text in str(mapped), (exc, mapped)
    bucket_missing = gcs._translate(gexc.NotFound("gone"), "k", "bucket")
    assert isinstance(bucket_missing, PermanentStorageError)
    assert "bucket gs://b does not exist" in str(bucket_missing)


def test_a_second_large_create_only_upload_is_refused(gcs_testbench, tmp_path):
    # On the testbench: fake-gcs-server lets resumable uploads (> 8 MiB) overwrite (tests/gcs_server.py).
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(b"\x01" * (9 << 20))
    second.write_bytes(b"\x02" * (9 << 20))
    gcs = gcs_testbench.store("big")
    stored = gcs.upload_file(first, "k", create_only=True)
    with pytest.raises(PreconditionFailed, match="already exists"):
        gcs.upload_file(second, "k", create_only=True)
    assert gcs.info("k").crc32c == stored.crc32c == file_crc32c(first)



def test_large_compare_and_swap_is_enforced(gcs_testbench):
    # Above 8 MiB the client uploads resumably, where fake-gcs-server ignores ifGenerationMatch.
    gcs = gcs_testbench.store("big")
    first = gcs.write_bytes("k", b"\x01" * (9 << 20))
    second = gcs.write_bytes("k", b"\x02" * (9 << 20), if_generation=first.generation)
    with pytest.raises(PreconditionFailed):
        gcs.write_bytes("k", b"\x03" * (9 << 20), if_generation=first.generation)
    assert gcs.info("k").generation == second.generation

# -- local only --------------------------------------------------------------------------


def test_local_writes_leave_no_temporary_files(tmp_path):
    local = open_store(str(tmp_path / "s"))
    local.write_bytes("a/b", b"x")
    with pytest.raises(PreconditionFailed):
        local.write_bytes("a/b", b"y", create_only=True)
    assert sorted(p.name for p in (tmp_path / "s" / "a").iterdir()) == ["b"]
    (tmp_path / "s" / "a" / ".~tmp-crashed").write_bytes(b"partial")
    assert [o.key for o in local.list()] == ["a/b"]
    local.delete("a/b")
    assert not (tmp_path / "s" / "a" / "b").exists()


def test_local_compare_and_swap_loses_no_update_among_processes(tmp_path):
    # Processes add to a counter by read_with_info + compare-and-swap, retrying when another won:
    # a swap that was not atomic would lose increments.
    root, go = tmp_path / "s", tmp_path / "go"
    open_store(str(root)).write_bytes("counter", b"0")
    code = """if True:
        import os, sys, time
        from trainer.checkpoints.storage import PreconditionFailed, bytes_crc32c, open_store
        root, go, me, times = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
        store, _ = open_store(root), bytes_crc32c(b"")  # imports done before the start
        open(f"{go}.{me}", "w").close()
        while not os.path.exists(go):
            time.sleep(0.0005)
        done = 0
        while done < times:
            data, info = store.read_with_info("counter")
            try:
                store.write_bytes("counter", str(int(data) + 1).encode(), if_generation=info.generation)
                done += 1
            except PreconditionFailed:
                pass
    """
    n, times = 4, 25
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(root), str(go), f"p{i}", str(times)],
                         cwd=ROOT)
        for i in range(n)
    ]  # fmt: skip
    deadline = time.monotonic() + 60
    while not all(Path(f"{go}.p{i}").exists() for i in range(n)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    assert [p.wait(timeout=60) for p in procs] == [0] * n
    assert open_store(str(root)).read_bytes("counter") == str(n * times).encode()
    assert [o.key for o in open_store(str(root)).list()] == ["counter"]  # the lock file is hidden


def test_local_list_without_checksums(tmp_path):
    local = open_store(str(tmp_path / "s"))
    local.write_bytes("k", b"x")
    assert local.list(checksums=False)[0].crc32c is None
    assert local.list()[0].crc32c == bytes_crc32c(b"x")


def test_local_check_access_names_an_unusable_folder(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    local = open_store(str(tmp_path / "file" / "store"), setting="CHECKPOINT_URI")
    with pytest.raises(PermanentStorageError, match="CHECKPOINT_URI") as info:
        local.check_access()
    assert str(tmp_path / "file" / "store") in str(info.value)


def test_stored_and_downloaded_files_get_the_usual_permissions(tmp_path):
    # mkstemp makes 0600 files: committed checkpoints and pulled models would be private to one user.
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    store = open_store(str(tmp_path / "store"))
    src = tmp_path / "w.bin"
    src.write_bytes(b"w" * 10)
    store.upload_file(src, "a/w.bin", create_only=True)
    store.write_bytes("a/m.json", b"{}")
    down = store.download_file("a/w.bin", tmp_path / "down" / "w.bin")
    for path in (tmp_path / "store" / "a" / "w.bin", tmp_path / "store" / "a" / "m.json", down):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
