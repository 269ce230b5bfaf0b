"""The checkpoint commit protocol on top of a `trainer.checkpoints.storage.Store`.

Layout under the store's prefix::

    <run>/checkpoint-<step>/<files...>
    <run>/checkpoint-<step>/MANIFEST.json

A checkpoint is *committed* when its MANIFEST.json exists and parses. The
manifest is written last, create-only, after every file it lists has been
uploaded with its crc32c, and deleted first when a checkpoint is pruned, so a
crash at any point leaves either a committed checkpoint or an *incomplete*
folder that readers skip and a later prune removes. Verification compares
each object's size and crc32c with the manifest, so corruption after the
commit is found before a resume trusts the checkpoint.

A leaf module: it imports only `trainer.checkpoints.storage` and the standard library.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .storage import (
    CorruptObjectError,
    NotFound,
    PreconditionFailed,
    StorageError,
    Store,
    UnsafeObjectName,
    file_crc32c,
    safe_local_path,
    validate_key,
)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "MANIFEST.json"
FORMAT_VERSION = 1
DEFAULT_WORKERS = 4
_STEP_FOLDER = re.compile(r"^checkpoint-(0|[1-9][0-9]*)$")
FINAL_FOLDER = "final"


class CheckpointError(RuntimeError):
    """A checkpoint or the final model could not be committed to the store (retry the job)."""


class ResumeError(ValueError):
    """A checkpoint cannot continue this job (not committed, corrupt, other data); says what to do."""


class ManifestError(ValueError):
    """A MANIFEST.json that does not parse or has an unsupported format."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: path relative to the checkpoint folder."""

    path: str
    size: int
    crc32c: str


@dataclass(frozen=True)
class Manifest:
    """What MANIFEST.json records about one committed checkpoint."""

    run: str
    step: int
    files: tuple[FileEntry, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    created: str = ""  # ISO 8601, UTC
    format_version: int = FORMAT_VERSION
    folder: str = ""  # "" for checkpoint-<step>; FINAL_FOLDER for the finished run's model

    @property
    def prefix(self) -> str:
        """The checkpoint's folder key, e.g. ``"run/checkpoint-100"`` or ``"run/final"``."""
        return f"{_run_folder(self.run)}{self.folder}" if self.folder else checkpoint_prefix(self.run, self.step)

    def to_json(self) -> str:
        """Serialize; raises TypeError if ``metadata`` is not JSON-serializable."""
        body = {
            "format_version": self.format_version,
            "run": self.run,
            "step": self.step,
            "created": self.created,
            "files": [{"path": f.path, "size": f.size, "crc32c": f.crc32c} for f in self.files],
            "metadata": dict(self.metadata),
        }
        return json.dumps(body, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse a manifest. Raises ManifestError naming what is wrong."""
        try:
            body = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"not JSON: {e}") from e
        if not isinstance(body, dict):
            raise ManifestError("not a JSON object")
        version = body.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(f"format_version {version!r} is not {FORMAT_VERSION}: written by another version of this trainer")
        run, step, created = body.get("run"), body.get("step"), body.get("created", "")
        files, metadata = body.get("files"), body.get("metadata", {})
        if not isinstance(run, str) or not run:
            raise ManifestError("'run' must be a non-empty string")
        if not _is_int(step) or step < 0:
            raise ManifestError("'step' must be a non-negative integer")
        if not isinstance(created, str) or not isinstance(metadata, dict):
            raise ManifestError("'created' must be a string and 'metadata' an object")
        if not isinstance(files, list):
            raise ManifestError("'files' must be a list")
        entries = []
        for item in files:
            if not (
                isinstance(item, dict)
                and isinstance(item.get("path"), str)
                and _is_int(item.get("size"))
                and item["size"] >= 0
                and isinstance(item.get("crc32c"), str)
            ):
                raise ManifestError(f"bad file entry {item!r}: needs path, size and crc32c")
            entries.append(FileEntry(item["path"], item["size"], item["crc32c"]))
        return cls(run, step, tuple(entries), metadata, created, version)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _run_folder(run: str) -> str:
    """``"<run>/"``; raises ValueError unless ``run`` is one safe name component."""
    if not isinstance(run, str) or not run or "/" in run:
        raise ValueError(f"run name {run!r} must be a non-empty name without '/'")
    try:
        validate_key(run)
    except UnsafeObjectName as e:
        raise ValueError(f"run name {run!r} is not a safe object name: {e}") from e
    return f"{run}/"


def checkpoint_prefix(run: str, step: int) -> str:
    """The folder key of a checkpoint: ``"<run>/checkpoint-<step>"``.

    Raises ValueError for a run name that is not one safe path component or a
    negative step.
    """
    folder = _run_folder(run)
    if not _is_int(step) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative integer, not {step!r}")
    return f"{folder}checkpoint-{step}"


def _manifest_key(run: str, step: int) -> str:
    return f"{checkpoint_prefix(run, step)}/{MANIFEST_NAME}"


# --------------------------------------------------------------------------
# Commit
# --------------------------------------------------------------------------


def _local_files(local_dir: Path) -> list[tuple[Path, FileEntry]]:
    found = []
    for dirpath, dirnames, filenames in os.walk(local_dir):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            rel = path.relative_to(local_dir).as_posix()
            validate_key(rel)
            if rel == MANIFEST_NAME:
                raise ValueError(f"{path}: {MANIFEST_NAME} is reserved for the commit manifest; rename the file")
            found.append((path, FileEntry(rel, path.stat().st_size, file_crc32c(path))))
    return found


def _run_parallel(tasks: Iterable[Callable[[], None]], max_workers: int) -> None:
    """Run the tasks on a small thread pool; re-raise the first failure after
    the running ones finish (queued ones are cancelled)."""
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        futures = [pool.submit(task) for task in tasks]
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in futures:
            if future.done() and not future.cancelled() and future.exception() is not None:
                raise future.exception()  # type: ignore[misc]


def _upload_one(store: Store, path: Path, key: str, entry: FileEntry) -> None:
    try:
        stored = store.upload_file(path, key, create_only=True, crc32c=entry.crc32c)
    except PreconditionFailed:
        # Already there: our own earlier attempt (a retried request whose
        # first response was lost, or a crashed run). Keep it if identical.
        stored = store.info(key)
        if (stored.size, stored.crc32c) != (entry.size, entry.crc32c):
            logger.warning("replacing %s left over from an interrupted commit", store.uri(key))
            store.delete(key)
            stored = store.upload_file(path, key, create_only=True, crc32c=entry.crc32c)
    if (stored.size, stored.crc32c) != (entry.size, entry.crc32c):
        raise CorruptObjectError(
            f"{store.uri(key)} was stored with size {stored.size} and crc32c {stored.crc32c}, "
            f"but {path} had size {entry.size} and crc32c {entry.crc32c} when the commit "
            "started: was the file modified during the commit?"
        )


def commit_checkpoint(
    store: Store,
    local_dir: str | os.PathLike[str],
    run: str,
    step: int,
    *,
    metadata: Mapping[str, Any],
    max_workers: int = DEFAULT_WORKERS,
    before_manifest: Callable[[], None] | None = None,
) -> Manifest:
    """Upload every file under ``local_dir`` and commit them as ``<run>/checkpoint-<step>``.

    Files are uploaded create-only with their crc32c, up to ``max_workers`` at
    a time; MANIFEST.json (``metadata`` included) is written create-only only
    after all of them succeeded and ``before_manifest`` (the writer's fencing
    check: it raises when this process may no longer write) returned. Safe to call again after a crash: objects
    left by an earlier attempt are kept if identical, else replaced, and
    objects not in the folder are removed. If the step is already committed
    with the same files, that manifest is returned; if it is committed with
    different files but no longer verifies, it is replaced.

    Raises FileNotFoundError for a missing folder, ValueError for an empty
    folder, a file named MANIFEST.json or a bad run name or step,
    UnsafeObjectName for a file name that is not a safe object name,
    TypeError for metadata that is not JSON-serializable,
    PreconditionFailed if the step is already committed, intact, with other
    files (a new run reusing an old run name), CorruptObjectError if a file
    changed while it was uploaded, and StorageError from the store.
    """
    prefix = checkpoint_prefix(run, step)
    local = Path(local_dir)
    if not local.is_dir():
        raise FileNotFoundError(f"checkpoint folder {local} does not exist")
    files = _local_files(local)
    if not files:
        raise ValueError(f"checkpoint folder {local} is empty")
    manifest = Manifest(
        run=run,
        step=step,
        files=tuple(entry for _, entry in files),
        metadata=dict(metadata),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    manifest_bytes = manifest.to_json().encode()  # TypeError now, before any upload

    existing = {o.key[len(prefix) + 1 :]: o for o in store.list(prefix + "/")}
    if MANIFEST_NAME in existing:
        committed = _read_manifest(store, run, step)
        if committed is not None and committed.files == manifest.files:
            logger.info("%s is already committed with these files", store.uri(prefix))
            return committed
        if committed is not None and _verifies(store, committed):
            raise PreconditionFailed(
                f"{store.uri(prefix)} is already committed with different files: "
                "use a new run name, or delete the old run's checkpoints"
            )
        logger.warning("replacing the broken checkpoint %s", store.uri(prefix))
        store.delete(_manifest_key(run, step))
        del existing[MANIFEST_NAME]

    _upload_missing(store, prefix, files, existing, max_workers)
    if before_manifest is not None:
        before_manifest()
    try:
        store.write_bytes(_manifest_key(run, step), manifest_bytes, create_only=True)
    except PreconditionFailed:
        # A retried write whose first response was lost, or a concurrent commit.
        committed = _read_manifest(store, run, step)
        if committed is None or committed.files != manifest.files:
            raise
        return committed
    logger.info("committed %s (%d files)", store.uri(prefix), len(files))
    return manifest


def _upload_missing(
    store: Store, prefix: str, files: list[tuple[Path, FileEntry]], existing: dict[str, Any], max_workers: int
) -> None:
    """Upload the files not already stored identically under ``prefix``; delete leftovers."""
    wanted = {entry.path: entry for _, entry in files}
    for rel, obj in existing.items():
        if _same(obj, wanted.get(rel)):
            continue
        try:
            store.delete(obj.key)
            logger.info("removed %s left over from an interrupted commit", store.uri(obj.key))
        except UnsafeObjectName:  # never downloaded (not in the manifest); prune removes it
            logger.warning("leaving the unsafely named object %s", store.uri(obj.key))
    todo = [(path, f"{prefix}/{entry.path}", entry) for path, entry in files if not _same(existing.get(entry.path), entry)]
    _run_parallel([lambda p=p, k=k, e=e: _upload_one(store, p, k, e) for p, k, e in todo], max_workers)


def commit_final(
    store: Store,
    local_dir: str | os.PathLike[str],
    run: str,
    step: int,
    *,
    metadata: Mapping[str, Any],
    max_workers: int = DEFAULT_WORKERS,
    before_manifest: Callable[[], None] | None = None,
) -> Manifest:
    """Commit the finished run's model, exports and metrics as ``<run>/final``.

    An earlier final (a run that was resumed and finished again) is replaced:
    its manifest is deleted first, so a half-replaced final never looks
    committed. Raises as `commit_checkpoint`.
    """
    local = Path(local_dir)
    files = _local_files(local)
    if not files:
        raise ValueError(f"final model folder {local} is empty")
    prefix = f"{_run_folder(run)}{FINAL_FOLDER}"
    manifest = Manifest(
        run=run, step=step, files=tuple(entry for _, entry in files), metadata=dict(metadata),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), folder=FINAL_FOLDER,
    )
    manifest_bytes = manifest.to_json().encode()
    store.delete(f"{prefix}/{MANIFEST_NAME}")
    existing = {o.key[len(prefix) + 1 :]: o for o in store.list(prefix + "/")}
    _upload_missing(store, prefix, files, existing, max_workers)
    if before_manifest is not None:
        before_manifest()
    store.write_bytes(f"{prefix}/{MANIFEST_NAME}", manifest_bytes, create_only=True)
    logger.info("committed %s (%d files)", store.uri(prefix), len(files))
    return manifest


def read_final(store: Store, run: str) -> Manifest | None:
    """The committed final model of ``run``, or None. Raises StorageError."""
    key = f"{_run_folder(run)}{FINAL_FOLDER}/{MANIFEST_NAME}"
    try:
        manifest = Manifest.from_json(store.read_bytes(key))
    except NotFound:
        return None
    except ManifestError as e:
        logger.warning("ignoring %s: %s", store.uri(key), e)
        return None
    return Manifest(manifest.run, manifest.step, manifest.files, manifest.metadata, manifest.created,
                    manifest.format_version, folder=FINAL_FOLDER)


def _same(obj: Any, entry: FileEntry | None) -> bool:
    return obj is not None and entry is not None and (obj.size, obj.crc32c) == (entry.size, entry.crc32c)


# --------------------------------------------------------------------------
# Listing and verification
# --------------------------------------------------------------------------


def _read_manifest(store: Store, run: str, step: int) -> Manifest | None:
    """The parsed manifest, or None (with a warning) if it is missing or broken."""
    key = _manifest_key(run, step)
    try:
        manifest = Manifest.from_json(store.read_bytes(key))
    except NotFound:
        return None
    except ManifestError as e:
        logger.warning("ignoring %s: %s", store.uri(key), e)
        return None
    if (manifest.run, manifest.step) != (run, step):
        logger.warning(
            "ignoring %s: it describes run %r step %d",
            store.uri(key),
            manifest.run,
            manifest.step,
        )
        return None
    return manifest


def _scan(store: Store, run: str) -> tuple[list[Manifest], list[int]]:
    """Committed manifests and incomplete steps of ``run``, both by step."""
    root = _run_folder(run)
    has_manifest: dict[int, bool] = {}
    for obj in store.list(root, checksums=False):
        folder, _, name = obj.key[len(root) :].partition("/")
        match = _STEP_FOLDER.match(folder)
        if match is None or not name:
            continue
        step = int(match.group(1))
        has_manifest[step] = has_manifest.get(step, False) or name == MANIFEST_NAME
    committed, incomplete = [], []
    for step in sorted(has_manifest):
        manifest = _read_manifest(store, run, step) if has_manifest[step] else None
        if manifest is None:
            incomplete.append(step)
        else:
            committed.append(manifest)
    return committed, incomplete


_COMMITTED_MANIFEST = re.compile(rf"^[^/]+/(?:{FINAL_FOLDER}|checkpoint-(?:0|[1-9][0-9]*))/{re.escape(MANIFEST_NAME)}$")


@dataclass(frozen=True)
class StoredRun:
    """A run folder of a store, and when its newest checkpoint or final model was committed."""

    name: str
    committed: dt.datetime | None  # the store's time of that MANIFEST.json; None: nothing committed


def list_runs(store: Store) -> list[StoredRun]:
    """Every run folder at the top of the store: those with a committed checkpoint or final model
    first, the one committed last first, then the others by name. One listing of the store,
    no manifest read (a manifest that does not parse still counts here). Raises StorageError."""
    runs: dict[str, dt.datetime | None] = {}
    for obj in store.list("", checksums=False):
        run, slash, _ = obj.key.partition("/")
        if not slash or run.startswith("."):  # an object beside the runs, a hidden folder
            continue
        newest = runs.setdefault(run, None)
        if _COMMITTED_MANIFEST.match(obj.key) and (newest is None or obj.updated > newest):
            runs[run] = obj.updated
    committed = sorted((StoredRun(n, t) for n, t in runs.items() if t is not None), key=lambda r: (r.committed, r.name),
                       reverse=True)
    return committed + [StoredRun(n, None) for n in sorted(runs) if runs[n] is None]


def list_checkpoints(store: Store, run: str) -> list[Manifest]:
    """Committed checkpoints of ``run`` (manifest present and parsing), oldest first.

    Not verified: see `verify_checkpoint`. Raises ValueError for a bad run
    name, StorageError from the store.
    """
    return _scan(store, run)[0]


def list_incomplete(store: Store, run: str) -> list[int]:
    """Steps of ``run`` whose folder has objects but no valid manifest (an
    interrupted commit or prune), ascending. Raises as `list_checkpoints`."""
    return _scan(store, run)[1]


def verify_checkpoint(store: Store, manifest: Manifest) -> None:
    """Check that every file in the manifest exists with its size and crc32c.

    Raises CorruptObjectError naming the first missing or different object,
    UnsafeObjectName for a listed path that is not a safe relative name, and
    StorageError from the store.
    """
    prefix = manifest.prefix
    stored = {o.key: o for o in store.list(prefix + "/")}
    for entry in manifest.files:
        validate_key(entry.path)
        key = f"{prefix}/{entry.path}"
        obj = stored.get(key)
        if obj is None:
            raise CorruptObjectError(f"{store.uri(key)} is listed in the manifest but missing")
        if obj.size != entry.size or obj.crc32c != entry.crc32c:
            raise CorruptObjectError(
                f"{store.uri(key)} has size {obj.size} and crc32c {obj.crc32c}; the manifest "
                f"says size {entry.size} and crc32c {entry.crc32c}"
            )


def _verifies(store: Store, manifest: Manifest) -> bool:
    try:
        verify_checkpoint(store, manifest)
    except (CorruptObjectError, UnsafeObjectName):
        return False
    return True


def latest_valid_checkpoint(store: Store, run: str, *, verify: bool = True) -> Manifest | None:
    """The newest committed checkpoint of ``run`` that verifies, or None.

    Corrupt or unsafe checkpoints are skipped with a warning naming them, and
    older ones tried; incomplete folders newer than the result are reported
    in a warning. Errors reaching the store are raised, not skipped: a
    network failure must not make the run resume from an older checkpoint.
    Raises StorageError, ValueError for a bad run name.
    """
    committed, incomplete = _scan(store, run)
    chosen = None
    for manifest in reversed(committed):
        if verify:
            try:
                verify_checkpoint(store, manifest)
            except (CorruptObjectError, UnsafeObjectName) as e:
                logger.warning("skipping checkpoint %s: %s", store.uri(manifest.prefix), e)
                continue
        chosen = manifest
        break
    newer = [s for s in incomplete if chosen is None or s > chosen.step]
    if newer:
        logger.warning(
            "ignoring incomplete checkpoints (no valid %s, an interrupted commit): %s",
            MANIFEST_NAME,
            ", ".join(store.uri(checkpoint_prefix(run, s)) for s in newer),
        )
    return chosen


# --------------------------------------------------------------------------
# Download and pruning
# --------------------------------------------------------------------------


def download_checkpoint(
    store: Store,
    manifest: Manifest,
    dest_dir: str | os.PathLike[str],
    *,
    only: str | None = None,
    strip: bool = False,
    merge: bool = False,
    write_manifest: bool = True,
    max_workers: int = DEFAULT_WORKERS,
) -> Path:
    """Download the checkpoint's files (those whose path starts with ``only``,
    if given; with ``strip``, placed without that prefix) into ``dest_dir``
    and return it.

    Files go into a temporary folder next to ``dest_dir``, each verified
    against the manifest's size and crc32c, so nothing reaches ``dest_dir``
    unless every file arrived intact; on failure ``dest_dir`` is untouched.
    Every path is checked with `safe_local_path` before anything is written.

    Without ``merge`` (a folder this job owns, e.g. its working copy of the
    checkpoint it resumes) an existing ``dest_dir`` is replaced by the
    download as a whole, with the manifest unless ``write_manifest`` is
    false (a working copy that will be changed). With ``merge`` (a user's folder: `pull --dest`) only
    the checkpoint's own files are written into it, and a MANIFEST.json
    listing them, written last, makes the folder a committed copy that
    `verify_local` checks; nothing else in the folder is deleted or changed.

    Raises UnsafeObjectName, CorruptObjectError, NotFound for a missing
    object, ValueError if ``only`` matches no file or a downloaded path
    would replace a folder (or need one where a file is), StorageError.
    """
    dest = Path(dest_dir).absolute()
    entries = [e for e in manifest.files if only is None or e.path.startswith(only)]
    if not entries:
        raise ValueError(f"no file of {store.uri(manifest.prefix)} matches only={only!r}")

    def local_name(entry: FileEntry) -> str:
        return entry.path[len(only):] if strip and only else entry.path

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    try:
        targets = [(entry, safe_local_path(staging, local_name(entry))) for entry in entries]
        if merge:
            for entry in entries:  # refuse before anything is written, never half-way through
                _check_merge_target(dest, local_name(entry))

        def fetch(entry: FileEntry, target: Path) -> None:
            store.download_file(
                f"{manifest.prefix}/{entry.path}",
                target,
                expected_crc32c=entry.crc32c,
                expected_size=entry.size,
            )

        _run_parallel([lambda e=e, t=t: fetch(e, t) for e, t in targets], max_workers)
        rebased = dataclasses.replace(manifest, files=tuple(dataclasses.replace(e, path=local_name(e)) for e in entries))
        if merge:
            _merge_into(staging, dest, rebased)
        else:
            if write_manifest:
                write_local_manifest(staging, rebased)
            if dest.exists():
                old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex}"
                os.rename(dest, old)
                os.rename(staging, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    logger.info("downloaded %s to %s", store.uri(manifest.prefix), dest)
    return dest


def _check_merge_target(dest: Path, rel: str) -> None:
    """Raise ValueError if writing ``rel`` under ``dest`` would replace a folder or need a folder where a file is."""
    target = safe_local_path(dest, rel)
    if target.is_dir():
        raise ValueError(f"{target} is a folder, but the checkpoint has a file of that name: choose another --dest")
    parent = target.parent
    while parent != dest and not parent.exists():
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"{parent} is a file, but the checkpoint needs a folder there: choose another --dest")


def _merge_into(staging: Path, dest: Path, manifest: Manifest) -> None:
    """Move the verified files from ``staging`` into ``dest``; its MANIFEST.json goes first and comes back last."""
    dest.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (dest / MANIFEST_NAME).unlink()  # a half-merged folder must not look committed
    for entry in manifest.files:
        target = safe_local_path(dest, entry.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(safe_local_path(staging, entry.path), target)
    write_local_manifest(dest, manifest)


# --------------------------------------------------------------------------
# Local copies: committed folders on this machine's disk
# --------------------------------------------------------------------------


class NotCommitted(StorageError):
    """A local model folder that no commit finished: no MANIFEST.json, or one that does not parse."""


def write_local_manifest(folder: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``manifest`` as ``folder/MANIFEST.json`` atomically (temporary name, then rename)."""
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, path)
    return path


def read_local_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """The MANIFEST.json of a local folder. Raises NotCommitted when it is missing or broken."""
    path = Path(folder) / MANIFEST_NAME
    try:
        return Manifest.from_json(path.read_bytes())
    except FileNotFoundError:
        raise NotCommitted(f"{folder} has no {MANIFEST_NAME}: it was never committed (an interrupted run or copy)") from None
    except ManifestError as e:
        raise NotCommitted(f"{path} is not a valid manifest ({e})") from None


def verify_local(folder: str | os.PathLike[str]) -> Manifest:
    """Check that a local folder is a complete committed copy: every file its MANIFEST.json
    lists is there with that size and crc32c (other files are ignored). Returns the manifest.

    Raises NotCommitted (no or broken manifest), CorruptObjectError naming the first missing,
    truncated or changed file, UnsafeObjectName for a listed path leading outside the folder.
    """
    manifest = read_local_manifest(folder)
    for entry in manifest.files:
        path = safe_local_path(folder, entry.path)
        if not path.is_file():
            raise CorruptObjectError(f"{path} is listed in {Path(folder) / MANIFEST_NAME} but missing")
        size = path.stat().st_size
        if size != entry.size:
            raise CorruptObjectError(f"{path} has {size} bytes, but the manifest says {entry.size} (truncated or changed)")
        crc = file_crc32c(path)
        if crc != entry.crc32c:
            raise CorruptObjectError(f"{path} has crc32c {crc}, but the manifest says {entry.crc32c} (changed after the commit)")
    return manifest


def install_local(src: str | os.PathLike[str], dest: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Put the committed folder ``src`` at ``dest`` (same file system) with its manifest, written last.

    An earlier ``dest`` loses its manifest first and is replaced as a whole, so at no point
    does a mix of old and new files look committed.
    """
    src, dest = Path(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dest.exists():
        with contextlib.suppress(FileNotFoundError):
            (dest / MANIFEST_NAME).unlink()
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex}"
        os.rename(dest, old)
    os.rename(src, dest)
    write_local_manifest(dest, manifest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def prune_checkpoints(store: Store, run: str, *, keep: int, protect_steps: Iterable[int] = ()) -> list[int]:
    """Delete committed checkpoints older than the newest ``keep``, except
    ``protect_steps`` (e.g. the best one); return the deleted steps.

    Each checkpoint's manifest is deleted first, so an interrupted prune
    leaves an incomplete folder, never a committed checkpoint with missing
    files. Incomplete folders older than the newest committed checkpoint are
    removed as well (newer ones may be a commit in progress). Do not prune
    while an older step of the same run is being committed.

    Raises ValueError if ``keep`` < 1, StorageError from the store.
    """
    if not _is_int(keep) or keep < 1:
        raise ValueError(f"keep must be an integer >= 1, not {keep!r}")
    protected = set(protect_steps)
    committed, incomplete = _scan(store, run)
    steps = [m.step for m in committed]
    doomed = [s for s in steps[: max(len(steps) - keep, 0)] if s not in protected]
    for step in doomed:
        logger.info("pruning checkpoint %s", store.uri(checkpoint_prefix(run, step)))
        store.delete(_manifest_key(run, step))
        store.delete_prefix(checkpoint_prefix(run, step) + "/")
    if steps:
        for step in incomplete:
            if step < steps[-1]:
                logger.info("removing incomplete checkpoint %s", store.uri(checkpoint_prefix(run, step)))
                store.delete_prefix(checkpoint_prefix(run, step) + "/")
    return doomed
