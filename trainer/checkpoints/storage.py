"""A small object-store interface with a GCS and a local-filesystem back end.

`open_store(uri)` returns a `Store` for ``gs://bucket/prefix``, ``file:///path``
or a plain path. Keys are relative to the store's prefix and '/'-separated.
Every back end raises only the `StorageError` family defined here, so callers
(the checkpoint code) never see a Google type.

This module is a leaf: it imports only the standard library at import time.
``google.cloud.storage`` and ``google_crc32c`` are imported where they are used.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import datetime as dt
import errno
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

DEFAULT_RETRY_DEADLINE = 120.0  # seconds of retrying transient errors per call
DEFAULT_TIMEOUT = 60.0  # seconds per HTTP request
DEFAULT_SETTING = "CHECKPOINT_URI"  # the setting named in "fix ..." messages

_CHUNK = 1 << 20
# Temporary files of the local back end; list() never reports them.
_TMP_PREFIX = ".~tmp-"
# The lock file of a folder's conditional writes and deletes (local back end). mkstemp's
# names after _TMP_PREFIX have no '.', so no temporary file can take this name.
_LOCK_NAME = f"{_TMP_PREFIX}cas.lock"
# Generations: GCS's are positive integers; the local back end's are "<inode>-<mtime ns>".
_GCS_GENERATION = re.compile(r"^[1-9][0-9]*$")
_LOCAL_GENERATION = re.compile(r"^[0-9]+-[0-9]+$")
# GCS bucket names: 3-63 characters (up to 222 with dots), lowercase letters,
# digits, '-', '_' and '.', starting and ending with a letter or digit.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_DRIVE = re.compile(r"^[A-Za-z]:")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def _umask() -> int:
    """This process's umask, read without changing it (os.umask would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


_FILE_MODE = 0o666 & ~_umask()


class StorageError(Exception):
    """Base class of every error raised by this module."""


class StorageConfigError(StorageError, ValueError):
    """The storage URI cannot be used (bad scheme, no bucket, bad name)."""


class PermanentStorageError(StorageError):
    """Retrying will not help: missing bucket, permission denied, bad credentials."""


class TransientStorageError(StorageError):
    """The store kept failing or stayed unreachable for the whole retry deadline."""


class NotFound(StorageError, FileNotFoundError):
    """The object does not exist."""


class PreconditionFailed(StorageError, FileExistsError):
    """A create-only write found an object already there, or a conditional write or
    delete found the object at another generation (or gone)."""


class CorruptObjectError(StorageError):
    """An object's bytes do not match the expected size or crc32c."""


class UnsafeObjectName(StorageError):
    """An object name that cannot be mapped safely to a local path."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object.

    ``crc32c`` is base64 of the big-endian CRC32C, as GCS reports it. It is
    None only from ``list(checksums=False)`` on a back end that would have to
    read the data to compute it (local).

    ``generation`` is an opaque token that changes on every write of the key
    (GCS: the object generation; local: inode and modification time), for
    ``write_bytes(..., if_generation=)`` and ``delete(..., if_generation=)``.
    Every Store method that returns ObjectInfo fills it.
    """

    key: str
    size: int
    crc32c: str | None
    updated: dt.datetime
    generation: str | None = None


# --------------------------------------------------------------------------
# Checksums and names
# --------------------------------------------------------------------------


def _checksum() -> Any:
    import google_crc32c  # a dependency of google-cloud-storage

    return google_crc32c.Checksum()


def _encode(checksum: Any) -> str:
    return base64.b64encode(checksum.digest()).decode("ascii")


def bytes_crc32c(data: bytes) -> str:
    """CRC32C of ``data``, base64-encoded as GCS reports it."""
    checksum = _checksum()
    checksum.update(data)
    return _encode(checksum)


def file_crc32c(path: str | os.PathLike[str]) -> str:
    """CRC32C of a local file, base64-encoded as GCS reports it.

    Raises OSError if the file cannot be read.
    """
    checksum = _checksum()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            checksum.update(chunk)
    return _encode(checksum)


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object name.

    Safe means: non-empty, '/'-separated, not absolute, no empty, '.' or '..'
    components, no backslash, NUL or drive letter.

    Raises UnsafeObjectName otherwise.
    """
    reason = None
    if not isinstance(key, str) or not key:
        reason = "it is empty"
    elif "\\" in key or "\x00" in key:
        reason = "it contains a backslash or NUL"
    elif key.startswith("/"):
        reason = "it is absolute"
    else:
        for part in key.split("/"):
            if part in ("", ".", ".."):
                reason = f"it has a {part or 'empty'!r} component"
                break
            if _DRIVE.match(part):
                reason = "it has a drive letter"
                break
    if reason is not None:
        raise UnsafeObjectName(
            f"unsafe object name {key!r}: {reason}; object names must be relative "
            "'/'-separated paths without '', '.' or '..' components, backslashes "
            "or drive letters"
        )
    return key


def safe_local_path(dest_dir: str | os.PathLike[str], key: str) -> Path:
    """The local path for object ``key`` under ``dest_dir``, guaranteed inside it.

    Every download into a folder goes through this function.

    Raises UnsafeObjectName for names with '..', absolute paths, backslashes,
    drive letters or empty components, or that resolve outside ``dest_dir``.
    """
    validate_key(key)
    root = Path(dest_dir).absolute()
    path = root.joinpath(*key.split("/"))
    # Also refuse a path that a symlink inside dest_dir would lead outside it.
    if not path.resolve().is_relative_to(root.resolve()):
        raise UnsafeObjectName(f"object name {key!r} resolves outside {root}")
    return path


def _updated(value: dt.datetime | None) -> dt.datetime:
    return value if value is not None else dt.datetime.fromtimestamp(0, dt.timezone.utc)


def _check_generation(if_generation: object, form: re.Pattern[str], store: Store, *, create_only: bool = False) -> None:
    """Raise ValueError if ``create_only`` is set too, or ``if_generation`` does not have
    the form of ``store``'s generations."""
    if create_only:
        raise ValueError("create_only and if_generation exclude each other: pass one of them")
    if not isinstance(if_generation, str) or not form.match(if_generation):
        raise ValueError(
            f"if_generation={if_generation!r} is not a generation of {store!r}: "
            "pass the ObjectInfo.generation that this store returned"
        )


# --------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------


class Store(abc.ABC):
    """An object store rooted at a prefix. Methods are safe to call from several threads."""

    setting: str = DEFAULT_SETTING

    @abc.abstractmethod
    def uri(self, key: str = "") -> str:
        """The URI of ``key`` (or of the store itself) for messages and logs."""

    @abc.abstractmethod
    def check_access(self, *, write: bool = True) -> None:
        """Fail fast at start-up if the store cannot be used.

        Lists the prefix and, with ``write``, writes and deletes a probe object.
        Raises PermanentStorageError (missing bucket, permission denied, bad
        credentials) with one line naming the location and the fix, or
        TransientStorageError if the store stayed unreachable.
        """

    @abc.abstractmethod
    def upload_file(
        self, local_path: str | os.PathLike[str], key: str, *, create_only: bool = False, crc32c: str | None = None
    ) -> ObjectInfo:
        """Store a local file as ``key``, sent with its crc32c.

        ``crc32c``: the file's checksum when the caller has it already (a
        commit computes it for the manifest), which saves reading the file a
        second time; the stored object is checked against it.

        Raises PreconditionFailed if ``create_only`` and ``key`` exists,
        CorruptObjectError if the stored checksum differs from the local one,
        UnsafeObjectName, OSError if the local file cannot be read, and the
        other StorageError types.
        """

    @abc.abstractmethod
    def write_bytes(
        self, key: str, data: bytes, *, create_only: bool = False, if_generation: str | None = None
    ) -> ObjectInfo:
        """Store ``data`` as ``key``.

        ``if_generation``: compare-and-swap; the write succeeds only if the
        stored object's generation is still exactly this one (an
        `ObjectInfo.generation` of this store). Exactly one of several writers
        starting from the same generation wins; the returned ObjectInfo holds
        the new generation. On GCS a retried request whose first attempt
        succeeded but whose response was lost also answers PreconditionFailed:
        a caller that must know reads the object back.

        Raises PreconditionFailed if ``create_only`` and ``key`` exists, or if
        ``if_generation`` no longer matches (rewritten or deleted meanwhile);
        ValueError for both ``create_only`` and ``if_generation``, or an
        ``if_generation`` that is not a generation of this kind of store;
        otherwise as `upload_file`.
        """

    @abc.abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The content of ``key``. Raises NotFound, UnsafeObjectName, StorageError."""

    @abc.abstractmethod
    def read_with_info(self, key: str) -> tuple[bytes, ObjectInfo]:
        """The content of ``key`` and the ObjectInfo (generation included) of
        exactly that content, e.g. to compare-and-swap it afterwards.

        Raises NotFound, UnsafeObjectName, TransientStorageError if the object
        kept changing while it was read, StorageError.
        """

    @abc.abstractmethod
    def info(self, key: str) -> ObjectInfo:
        """Size, crc32c, update time and generation of ``key``. Raises NotFound, StorageError."""

    @abc.abstractmethod
    def list(self, prefix: str = "", *, checksums: bool = True) -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (a string prefix, not a folder), sorted.

        Keys are returned as stored, without validation: pass them through
        `safe_local_path` before using them as local paths. With
        ``checksums=False`` the local back end skips reading every file.
        Raises PermanentStorageError for a missing bucket, StorageError.
        """

    @abc.abstractmethod
    def delete(self, key: str, *, if_generation: str | None = None) -> None:
        """Delete ``key``. A missing key is not an error (deletes are retried,
        so a lost response must not fail the call).

        ``if_generation``: delete only if the stored object is still at
        exactly this generation; then a missing object is an error too (it
        was changed meanwhile). As for `write_bytes`, a retried conditional
        delete whose first response was lost answers PreconditionFailed on GCS.

        Raises PreconditionFailed if ``if_generation`` does not match or the
        object is gone, ValueError for an ``if_generation`` that is not a
        generation of this kind of store, UnsafeObjectName, StorageError.
        """

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with ``prefix``; returns how many.

        Pass a prefix ending in '/' to delete a folder: ``"run/checkpoint-1"``
        would also match ``"run/checkpoint-10/..."``.
        Raises ValueError for an empty prefix, StorageError.
        """

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` exists. Raises UnsafeObjectName, StorageError."""

    @abc.abstractmethod
    def _download_to(self, key: str, file: IO[bytes]) -> None:
        """Write the content of ``key`` into an open binary file."""

    def download_file(
        self,
        key: str,
        local_path: str | os.PathLike[str],
        *,
        expected_crc32c: str | None = None,
        expected_size: int | None = None,
    ) -> Path:
        """Download ``key`` to ``local_path`` atomically and verify it.

        The data goes to a temporary name in the destination folder and is
        renamed into place only after its size and crc32c match the expected
        values, so ``local_path`` never holds a partial or corrupt file.
        To download into a folder by object name, build ``local_path`` with
        `safe_local_path`.

        Raises NotFound, CorruptObjectError (nothing is left at local_path),
        UnsafeObjectName, StorageError.
        """
        validate_key(key)
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
        os.fchmod(fd, _FILE_MODE)  # mkstemp's 0600 would make every downloaded file private
        try:
            with os.fdopen(fd, "wb") as f:
                self._download_to(key, f)
                f.flush()
                os.fsync(f.fileno())
            size = os.path.getsize(tmp)
            if expected_size is not None and size != expected_size:
                raise CorruptObjectError(f"{self.uri(key)} has {size} bytes, expected {expected_size}")
            if expected_crc32c is not None:
                crc = file_crc32c(tmp)
                if crc != expected_crc32c:
                    raise CorruptObjectError(f"{self.uri(key)} has crc32c {crc}, expected {expected_crc32c}")
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return dest


def open_store(
    uri: str,
    *,
    retry_deadline: float = DEFAULT_RETRY_DEADLINE,
    timeout: float = DEFAULT_TIMEOUT,
    setting: str = DEFAULT_SETTING,
) -> Store:
    """Open ``gs://bucket/prefix``, ``file:///abs/path`` or a local path.

    ``retry_deadline`` (total seconds of retrying transient errors per call)
    and ``timeout`` (seconds per HTTP request) apply to GCS. ``setting`` is
    the configuration name that error messages tell the user to fix.
    Nothing is contacted here: call `Store.check_access` at start-up.

    Raises StorageConfigError naming the URI and the fix.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise StorageConfigError(f"empty storage URI: set {setting} to gs://BUCKET/PREFIX or a local path")
    scheme = _SCHEME.match(uri)
    if scheme is None:  # a plain path (a Windows drive letter has a 1-letter "scheme")
        return LocalStore(Path(uri).absolute(), setting=setting)
    forms = "use gs://BUCKET/PREFIX, file:///ABSOLUTE/PATH or a local path"
    name = scheme.group(1).lower()
    if name == "gs" and uri[3:5] == "//":
        bucket, _, prefix = uri[5:].partition("/")
        if not bucket:
            raise StorageConfigError(f"storage URI {uri!r} has no bucket name: set {setting} to gs://BUCKET/PREFIX")
        if not _BUCKET_NAME.match(bucket):
            raise StorageConfigError(
                f"storage URI {uri!r}: {bucket!r} is not a valid GCS bucket name "
                f"(3-63 lowercase letters, digits, '-', '_', '.'): fix {setting}"
            )
        prefix = prefix.strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except UnsafeObjectName as e:
                raise StorageConfigError(f"storage URI {uri!r}: {e}: fix {setting}") from e
        return GcsStore(bucket, prefix, retry_deadline=retry_deadline, timeout=timeout, setting=setting)
    if name == "file" and uri[5:7] == "//":
        parts = urllib.parse.urlsplit(uri)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise StorageConfigError(
                f"storage URI {uri!r} is not a local absolute file URI: set {setting} to file:///ABSOLUTE/PATH"
            )
        return LocalStore(Path(urllib.parse.unquote(parts.path)), setting=setting)
    raise StorageConfigError(f"unsupported storage URI {uri!r}: {forms} (set {setting})")


# --------------------------------------------------------------------------
# Local filesystem
# --------------------------------------------------------------------------


def _local_generation(st: os.stat_result) -> str:
    return f"{st.st_ino}-{st.st_mtime_ns}"


def _local_info(key: str, st: os.stat_result, crc32c: str | None) -> ObjectInfo:
    updated = dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc)
    return ObjectInfo(key, st.st_size, crc32c, updated, _local_generation(st))


_stamp_lock = threading.Lock()
_last_stamp = 0


def _stamp(path: str, *, later_than: int = 0) -> os.stat_result:
    """Give ``path`` a modification time that no earlier write of this process had, and later
    than ``later_than`` (ns); return its stat. This keeps local generations from repeating."""
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(time.time_ns(), _last_stamp + 1, later_than + 1)
        ns = _last_stamp
    os.utime(path, ns=(ns, ns))
    return os.stat(path)


class LocalStore(Store):
    """Objects as files under a root folder.

    Writes go to a temporary file in the target folder, then ``os.replace``
    (or ``os.link`` for create-only, which fails atomically if the name
    exists). Unlike GCS, a key cannot be both an object and a "folder" of
    other objects.

    Generations are "<inode>-<mtime in ns>". Every write gives its new file a
    fresh modification time, a conditional write one later than the file it
    replaces, so a key's generation never comes back even when the file
    system reuses the inode (on file systems with nanosecond timestamps:
    ext4, XFS, btrfs, tmpfs). Conditional writes and deletes check and act
    under an exclusive ``flock`` on a lock file in the object's folder
    (hidden like the temporary files; it stays there), which makes them
    atomic among the threads and processes of one machine, and with
    create-only writes; an unconditional write or delete racing with them
    is not serialized.
    """

    def __init__(self, root: str | os.PathLike[str], *, setting: str = DEFAULT_SETTING):
        self.root = Path(root).absolute()
        self.setting = setting

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def uri(self, key: str = "") -> str:
        base = self.root.as_uri()
        return f"{base}/{key}" if key else base

    def _path(self, key: str) -> Path:
        return safe_local_path(self.root, key)

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except FileNotFoundError as e:
            raise NotFound(f"{self.uri(key)} does not exist") from e
        except PermissionError as e:
            raise PermanentStorageError(
                f"permission denied on {self.uri(key)} ({e.strerror}): fix the folder's permissions or {self.setting}"
            ) from e
        except OSError as e:
            raise StorageError(f"{self.uri(key)}: {e}") from e

    def check_access(self, *, write: bool = True) -> None:
        if not self.root.exists():
            # Nothing is created before the job really writes: check where the folder would go.
            parent = next(p for p in self.root.parents if p.exists())
            if not parent.is_dir() or (write and not os.access(parent, os.W_OK | os.X_OK)):
                raise PermanentStorageError(f"cannot create the storage folder {self.root} under {parent}: fix {self.setting}")
            return
        if not self.root.is_dir():
            raise PermanentStorageError(f"the storage folder {self.root} is a file: fix {self.setting}")
        if write and not os.access(self.root, os.R_OK | os.W_OK | os.X_OK):
            raise PermanentStorageError(f"the storage folder {self.root} is not writable: fix its permissions or {self.setting}")
        if write:
            probe = f".access-check-{uuid.uuid4().hex}"
            self.write_bytes(probe, b"", create_only=True)
            self.delete(probe)

    def _write(
        self, key: str, fill: Callable[[IO[bytes]], str], *, create_only: bool, if_generation: str | None = None
    ) -> ObjectInfo:
        dest = self._path(key)
        with self._errors(key):
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=_TMP_PREFIX)
            os.fchmod(fd, _FILE_MODE)  # as any file this process creates, not mkstemp's 0600
            try:
                with os.fdopen(fd, "wb") as f:
                    crc = fill(f)
                    f.flush()
                    os.fsync(f.fileno())
                # The new file's own stat: once renamed, the name may already hold a newer write.
                if if_generation is not None:
                    with self._folder_lock(dest.parent):
                        current = self._stat_or_none(dest)
                        if current is None or _local_generation(current) != if_generation:
                            raise PreconditionFailed(self._changed(key, if_generation, current))
                        st = _stamp(tmp, later_than=current.st_mtime_ns)
                        os.replace(tmp, dest)
                elif create_only:
                    st = _stamp(tmp)
                    self._link_exclusive(tmp, dest, key)
                else:
                    st = _stamp(tmp)
                    os.replace(tmp, dest)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        return _local_info(key, st, crc)

    @contextlib.contextmanager
    def _folder_lock(self, folder: Path) -> Iterator[None]:
        """Hold the exclusive lock of ``folder``'s conditional operations.
        Raises FileNotFoundError if the folder does not exist."""
        import fcntl  # POSIX only, like the local back end's atomic renames

        fd = os.open(folder / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _stat_or_none(path: Path) -> os.stat_result | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return st if stat.S_ISREG(st.st_mode) else None

    def _changed(self, key: str, expected: str, current: os.stat_result | None) -> str:
        now = "it no longer exists" if current is None else f"it is at generation {_local_generation(current)} now"
        return f"{self.uri(key)} is no longer at generation {expected}: {now}"

    def _link_exclusive(self, tmp: str, dest: Path, key: str) -> None:
        try:
            os.link(tmp, dest)
            return
        except FileExistsError as e:
            raise PreconditionFailed(f"{self.uri(key)} already exists") from e
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
        # No hard links here (e.g. a FUSE mount such as /gcs/<bucket>): claim
        # the name with O_EXCL, then replace the empty placeholder. A reader
        # may briefly see an empty file, never a partial one.
        try:
            os.close(os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError as e:
            raise PreconditionFailed(f"{self.uri(key)} already exists") from e
        os.replace(tmp, dest)

    def upload_file(
        self, local_path: str | os.PathLike[str], key: str, *, create_only: bool = False, crc32c: str | None = None
    ) -> ObjectInfo:
        validate_key(key)
        with open(local_path, "rb") as src:

            def fill(f: IO[bytes]) -> str:
                checksum = _checksum()
                while chunk := src.read(_CHUNK):
                    checksum.update(chunk)
                    f.write(chunk)
                crc = _encode(checksum)
                if crc32c is not None and crc != crc32c:
                    raise CorruptObjectError(f"{local_path} has crc32c {crc} now, expected {crc32c}: was it modified?")
                return crc

            return self._write(key, fill, create_only=create_only)

    def write_bytes(
        self, key: str, data: bytes, *, create_only: bool = False, if_generation: str | None = None
    ) -> ObjectInfo:
        validate_key(key)
        if if_generation is not None:
            _check_generation(if_generation, _LOCAL_GENERATION, self, create_only=create_only)

        def fill(f: IO[bytes]) -> str:
            f.write(data)
            return bytes_crc32c(data)

        return self._write(key, fill, create_only=create_only, if_generation=if_generation)

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        with self._errors(key):
            return path.read_bytes()

    def read_with_info(self, key: str) -> tuple[bytes, ObjectInfo]:
        path = self._path(key)
        with self._errors(key):
            for _ in range(2):
                # Writes replace the file (a new inode), so the open file keeps the content of the
                # generation it had when opened; only a writer changing the file in place (not
                # this class) moves its mtime meanwhile.
                with open(path, "rb") as f:
                    before = os.fstat(f.fileno())
                    data = f.read()
                    after = os.fstat(f.fileno())
                if (before.st_mtime_ns, before.st_size) == (after.st_mtime_ns, len(data)):
                    return data, _local_info(key, after, bytes_crc32c(data))
        raise TransientStorageError(f"{self.uri(key)} changed while it was read, twice: try again")

    def _download_to(self, key: str, file: IO[bytes]) -> None:
        path = self._path(key)
        with self._errors(key), open(path, "rb") as src:
            shutil.copyfileobj(src, file, _CHUNK)

    def info(self, key: str) -> ObjectInfo:
        path = self._path(key)
        with self._errors(key):
            if not path.is_file():
                raise FileNotFoundError(key)
            st = path.stat()
            crc = file_crc32c(path)
        return _local_info(key, st, crc)

    def list(self, prefix: str = "", *, checksums: bool = True) -> list[ObjectInfo]:
        folder = prefix.rpartition("/")[0]
        start = self._path(folder) if folder else self.root
        found = []
        with self._errors(prefix):
            for dirpath, _, filenames in os.walk(start):
                for name in filenames:
                    if name.startswith(_TMP_PREFIX):
                        continue
                    path = Path(dirpath, name)
                    key = path.relative_to(self.root).as_posix()
                    if not key.startswith(prefix):
                        continue
                    try:
                        st = path.stat()
                        crc = file_crc32c(path) if checksums else None
                    except FileNotFoundError:  # deleted while listing
                        continue
                    found.append(_local_info(key, st, crc))
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str, *, if_generation: str | None = None) -> None:
        path = self._path(key)
        if if_generation is not None:
            _check_generation(if_generation, _LOCAL_GENERATION, self)
        with self._errors(key):
            if if_generation is None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            else:
                try:
                    with self._folder_lock(path.parent):
                        current = self._stat_or_none(path)
                        if current is None or _local_generation(current) != if_generation:
                            raise PreconditionFailed(self._changed(key, if_generation, current))
                        path.unlink()
                except FileNotFoundError as e:  # no folder, so no object
                    raise PreconditionFailed(self._changed(key, if_generation, None)) from e
            self._remove_empty_parents(path.parent)

    def _remove_empty_parents(self, folder: Path) -> None:
        while folder != self.root and folder.is_relative_to(self.root):
            try:
                folder.rmdir()
            except OSError:  # not empty, or already gone
                return
            folder = folder.parent

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix")
        objects = self.list(prefix, checksums=False)
        for obj in objects:
            self.delete(obj.key)
        return len(objects)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()


# --------------------------------------------------------------------------
# Google Cloud Storage
# --------------------------------------------------------------------------


class GcsStore(Store):
    """Objects in a GCS bucket under a prefix.

    One ``storage.Client`` per store, created on first use and shared by all
    threads. With ``STORAGE_EMULATOR_HOST`` set it uses anonymous credentials
    and the project from ``GOOGLE_CLOUD_PROJECT`` (default "test").

    Retries use the library's policies: ``DEFAULT_RETRY`` (429, 5xx,
    connection errors; never 403/404) with ``retry_deadline``, and for
    create-only and conditional writes and deletes the conditional policy,
    which retries because the ``ifGenerationMatch`` precondition makes the
    call idempotent. Generations are the objects' GCS generations.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        retry_deadline: float = DEFAULT_RETRY_DEADLINE,
        timeout: float = DEFAULT_TIMEOUT,
        setting: str = DEFAULT_SETTING,
    ):
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self.retry_deadline = retry_deadline
        self.timeout = timeout
        self.setting = setting
        self._lock = threading.Lock()
        self._bucket: Any = None

    def __repr__(self) -> str:
        return f"GcsStore({self.uri()!r})"

    def uri(self, key: str = "") -> str:
        name = self._name(key) if key else self.prefix
        return f"gs://{self.bucket_name}/{name}" if name else f"gs://{self.bucket_name}"

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _key(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if self.prefix else name

    # -- client and retry policies --------------------------------------------

    def _get_bucket(self) -> Any:
        with self._lock:
            if self._bucket is None:
                self._retry, self._retry_if_generation = self._make_retries()
                with self._errors("", on_missing="bucket"):
                    self._bucket = self._make_client().bucket(self.bucket_name)
            return self._bucket

    @property
    def client(self) -> Any:
        """The store's one ``google.cloud.storage.Client``."""
        return self._get_bucket().client

    def create_bucket(self, *, location: str, project: str | None = None) -> bool:
        """Create the bucket (uniform bucket-level access) in `location` unless it exists.

        Returns True when it was created, False when it was already there.
        Raises PermanentStorageError (no permission, name taken by another project), StorageError.
        """
        from google.api_core import exceptions

        bucket = self._get_bucket()
        with self._errors("", on_missing="bucket"):
            if bucket.exists(retry=self._retry):
                return False
        bucket.iam_configuration.uniform_bucket_level_access_enabled = True
        try:
            with self._errors(""):
                bucket.client.create_bucket(bucket, location=location, project=project, retry=self._retry)
        except StorageError as e:
            if isinstance(e.__cause__, exceptions.Conflict):  # created meanwhile, or taken by another project
                if bucket.exists(retry=self._retry):
                    return False
                raise PermanentStorageError(f"bucket name gs://{self.bucket_name} is taken: choose another in {self.setting}") from e
            raise
        return True

    def _make_client(self) -> Any:
        from google.cloud import storage

        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            project = os.environ.get("GOOGLE_CLOUD_PROJECT") or "test"
            return storage.Client(project=project, credentials=AnonymousCredentials())
        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or None)

    def _make_retries(self) -> tuple[Any, Any]:
        from google.cloud.storage.retry import (
            DEFAULT_RETRY,
            ConditionalRetryPolicy,
            is_generation_specified,
        )

        retry = DEFAULT_RETRY.with_timeout(self.retry_deadline)
        return retry, ConditionalRetryPolicy(retry, is_generation_specified, ["query_params"])

    @contextlib.contextmanager
    def _errors(self, key: str, *, on_missing: str = "object") -> Iterator[None]:
        """Translate google/requests exceptions into StorageError types.

        ``on_missing``: what a 404 means: "object" (NotFound) or "bucket"
        (PermanentStorageError telling how to create it).
        """
        try:
            yield
        except StorageError:
            raise
        except Exception as e:
            mapped = self._translate(e, key, on_missing)
            if mapped is None:
                raise
            raise mapped from e

    def _translate(self, exc: Exception, key: str, on_missing: str) -> StorageError | None:
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exc
        from google.cloud.storage import exceptions as gcs_exc

        where = self.uri(key)
        bucket = f"gs://{self.bucket_name}"
        if isinstance(exc, gexc.RetryError):
            return TransientStorageError(
                f"{where}: still failing after retrying for {self.retry_deadline:g}s (last error: {exc.cause})"
            )
        if isinstance(exc, gexc.NotFound):
            if on_missing == "bucket":
                return PermanentStorageError(
                    f"bucket {bucket} does not exist: create it with `make create-bucket` or fix {self.setting}"
                )
            return NotFound(f"{where} does not exist")
        if isinstance(exc, gexc.PreconditionFailed):
            return PreconditionFailed(f"{where} already exists")
        if isinstance(exc, gexc.Forbidden):
            return PermanentStorageError(
                f"permission denied on {where}: grant the job's service account "
                f"roles/storage.objectUser on {bucket} or fix {self.setting} ({exc.message})"
            )
        if isinstance(exc, auth_exc.TransportError):  # e.g. the token server is unreachable
            return TransientStorageError(f"{where}: cannot reach the credentials service ({exc})")
        if isinstance(exc, gexc.Unauthorized | auth_exc.GoogleAuthError):
            return PermanentStorageError(
                f"no valid Google Cloud credentials for {bucket} ({exc}): run "
                "`gcloud auth application-default login`, set "
                "GOOGLE_APPLICATION_CREDENTIALS, or set STORAGE_EMULATOR_HOST for an emulator"
            )
        if isinstance(exc, gcs_exc.DataCorruption):
            return CorruptObjectError(f"{where}: checksum mismatch in transfer ({exc})")
        if isinstance(exc, gexc.GoogleAPICallError):
            if exc.code in (408, 429) or (exc.code or 0) >= 500:
                return TransientStorageError(f"{where}: {exc.message}")
            return StorageError(f"{where}: {exc.message}")
        if isinstance(exc, gcs_exc.InvalidResponse):
            return StorageError(f"{where}: unexpected response {exc}")
        if isinstance(exc, OSError) or _is_requests_error(exc):
            # Connection errors that a call without retry let through.
            return TransientStorageError(f"{where}: {exc}")
        return None

    # -- operations ------------------------------------------------------------

    def check_access(self, *, write: bool = True) -> None:
        bucket = self._get_bucket()
        with self._errors("", on_missing="bucket"):
            prefix = f"{self.prefix}/" if self.prefix else ""
            blobs = bucket.client.list_blobs(bucket, prefix=prefix, max_results=1, retry=self._retry, timeout=self.timeout)
            list(blobs)
        if write:
            probe = f".access-check-{uuid.uuid4().hex}"
            self.write_bytes(probe, b"", create_only=True)
            self.delete(probe)

    def _upload(
        self, key: str, send: Callable[..., None], local_crc: str, *, create_only: bool, if_generation: str | None = None
    ) -> ObjectInfo:
        match = None  # the ifGenerationMatch precondition
        if create_only:
            match = 0  # only if there is no live object
        elif if_generation is not None:
            match = int(if_generation)
        blob = self._get_bucket().blob(self._name(key))
        try:
            with self._errors(key, on_missing="bucket"):
                send(
                    blob,
                    checksum="crc32c",
                    if_generation_match=match,
                    retry=self._retry if match is None else self._retry_if_generation,
                    timeout=self.timeout,
                )
        except PreconditionFailed as e:
            if if_generation is None:
                raise
            raise PreconditionFailed(self._changed(key, if_generation)) from e.__cause__
        # The server verifies the crc32c we sent; this also catches a server
        # (or emulator) that accepts a wrong checksum.
        if blob.crc32c != local_crc:
            raise CorruptObjectError(f"{self.uri(key)} was stored with crc32c {blob.crc32c}, expected {local_crc} "
                                     "(changed in transit, or the local file changed)")
        return self._info(key, blob)

    def _info(self, key: str, blob: Any) -> ObjectInfo:
        generation = None if blob.generation is None else str(blob.generation)
        return ObjectInfo(key, blob.size, blob.crc32c, _updated(blob.updated), generation)

    def _changed(self, key: str, expected: str) -> str:
        return f"{self.uri(key)} is no longer at generation {expected}: rewritten or deleted meanwhile"

    def upload_file(
        self, local_path: str | os.PathLike[str], key: str, *, create_only: bool = False, crc32c: str | None = None
    ) -> ObjectInfo:
        validate_key(key)
        crc = crc32c or file_crc32c(local_path)
        with open(local_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size

            def send(blob: Any, **kwargs: Any) -> None:
                blob.upload_from_file(f, size=size, **kwargs)

            return self._upload(key, send, crc, create_only=create_only)

    def write_bytes(
        self, key: str, data: bytes, *, create_only: bool = False, if_generation: str | None = None
    ) -> ObjectInfo:
        validate_key(key)
        if if_generation is not None:
            _check_generation(if_generation, _GCS_GENERATION, self, create_only=create_only)

        def send(blob: Any, **kwargs: Any) -> None:
            blob.upload_from_string(data, **kwargs)

        return self._upload(key, send, bytes_crc32c(data), create_only=create_only, if_generation=if_generation)

    def read_bytes(self, key: str) -> bytes:
        validate_key(key)
        blob = self._get_bucket().blob(self._name(key))
        with self._errors(key):
            return blob.download_as_bytes(checksum="crc32c", retry=self._retry, timeout=self.timeout)

    def read_with_info(self, key: str) -> tuple[bytes, ObjectInfo]:
        validate_key(key)
        bucket = self._get_bucket()
        for _ in range(2):
            with self._errors(key):
                blob = bucket.get_blob(self._name(key), retry=self._retry, timeout=self.timeout)
            if blob is None:
                raise NotFound(f"{self.uri(key)} does not exist")
            info = self._info(key, blob)
            try:
                with self._errors(key):
                    # blob.generation is set: this downloads exactly that generation (retries too).
                    data = blob.download_as_bytes(checksum="crc32c", retry=self._retry, timeout=self.timeout)
            except NotFound:  # that generation is gone: rewritten or deleted since get_blob
                continue
            # The download reports the generation it served (None: no header); a server that
            # ignored the pin may have served another.
            served = blob.generation
            if (served is None or str(served) == info.generation) and bytes_crc32c(data) == info.crc32c:
                return data, info
        raise TransientStorageError(f"{self.uri(key)} changed while it was read, twice: try again")

    def _download_to(self, key: str, file: IO[bytes]) -> None:
        blob = self._get_bucket().blob(self._name(key))
        with self._errors(key):
            blob.download_to_file(file, checksum="crc32c", retry=self._retry, timeout=self.timeout)

    def info(self, key: str) -> ObjectInfo:
        validate_key(key)
        bucket = self._get_bucket()
        with self._errors(key):
            blob = bucket.get_blob(self._name(key), retry=self._retry, timeout=self.timeout)
        if blob is None:
            raise NotFound(f"{self.uri(key)} does not exist")
        return self._info(key, blob)

    def list(self, prefix: str = "", *, checksums: bool = True) -> list[ObjectInfo]:
        bucket = self._get_bucket()
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        with self._errors(prefix, on_missing="bucket"):
            blobs = list(bucket.client.list_blobs(bucket, prefix=full or None, retry=self._retry, timeout=self.timeout))
        found = [self._info(self._key(b.name), b) for b in blobs]
        return sorted(found, key=lambda o: o.key)

    def _delete_name(self, name: str, key: str) -> None:
        blob = self._get_bucket().blob(name)
        try:
            with self._errors(key):
                blob.delete(retry=self._retry, timeout=self.timeout)
        except NotFound:
            pass

    def delete(self, key: str, *, if_generation: str | None = None) -> None:
        validate_key(key)
        if if_generation is None:
            self._delete_name(self._name(key), key)
            return
        _check_generation(if_generation, _GCS_GENERATION, self)
        blob = self._get_bucket().blob(self._name(key))
        try:
            with self._errors(key):
                blob.delete(if_generation_match=int(if_generation), retry=self._retry_if_generation, timeout=self.timeout)
        except (NotFound, PreconditionFailed) as e:  # 404: gone, so changed too
            raise PreconditionFailed(self._changed(key, if_generation)) from e.__cause__

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix")
        # Names as listed (possibly unsafe ones such as "a/../b"), not re-validated.
        objects = self.list(prefix, checksums=False)
        for obj in objects:
            self._delete_name(self._name(obj.key), obj.key)
        return len(objects)

    def exists(self, key: str) -> bool:
        validate_key(key)
        blob = self._get_bucket().blob(self._name(key))
        with self._errors(key):
            return bool(blob.exists(retry=self._retry, timeout=self.timeout))


def _is_requests_error(exc: Exception) -> bool:
    try:
        import requests
    except ImportError:  # pragma: no cover - requests comes with google-cloud-storage
        return False
    return isinstance(exc, requests.RequestException)
