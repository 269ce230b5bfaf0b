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
import tempfile
import threading
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
# GCS bucket names: 3-63 characters (up to 222 with dots), lowercase letters,
# digits, '-', '_' and '.', starting and ending with a letter or digit.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_DRIVE = re.compile(r"^[A-Za-z]:")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


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
    """A create-only write found an object already there."""


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
    """

    key: str
    size: int
    crc32c: str | None
    updated: dt.datetime


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
    def write_bytes(self, key: str, data: bytes, *, create_only: bool = False) -> ObjectInfo:
        """Store ``data`` as ``key``; raises as `upload_file`."""

    @abc.abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The content of ``key``. Raises NotFound, UnsafeObjectName, StorageError."""

    @abc.abstractmethod
    def info(self, key: str) -> ObjectInfo:
        """Size, crc32c and update time of ``key``. Raises NotFound, StorageError."""

    @abc.abstractmethod
    def list(self, prefix: str = "", *, checksums: bool = True) -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (a string prefix, not a folder), sorted.

        Keys are returned as stored, without validation: pass them through
        `safe_local_path` before using them as local paths. With
        ``checksums=False`` the local back end skips reading every file.
        Raises PermanentStorageError for a missing bucket, StorageError.
        """

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``. A missing key is not an error (deletes are retried,
        so a lost response must not fail the call). Raises StorageError."""

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


class LocalStore(Store):
    """Objects as files under a root folder.

    Writes go to a temporary file in the target folder, then ``os.replace``
    (or ``os.link`` for create-only, which fails atomically if the name
    exists). Unlike GCS, a key cannot be both an object and a "folder" of
    other objects.
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

    def _write(self, key: str, fill: Callable[[IO[bytes]], str], *, create_only: bool) -> ObjectInfo:
        dest = self._path(key)
        with self._errors(key):
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=_TMP_PREFIX)
            try:
                with os.fdopen(fd, "wb") as f:
                    crc = fill(f)
                    f.flush()
                    os.fsync(f.fileno())
                if create_only:
                    self._link_exclusive(tmp, dest, key)
                else:
                    os.replace(tmp, dest)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            st = dest.stat()
        return ObjectInfo(key, st.st_size, crc, dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc))

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

    def write_bytes(self, key: str, data: bytes, *, create_only: bool = False) -> ObjectInfo:
        validate_key(key)

        def fill(f: IO[bytes]) -> str:
            f.write(data)
            return bytes_crc32c(data)

        return self._write(key, fill, create_only=create_only)

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        with self._errors(key):
            return path.read_bytes()

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
        return ObjectInfo(key, st.st_size, crc, dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc))

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
                    updated = dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc)
                    found.append(ObjectInfo(key, st.st_size, crc, updated))
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._errors(key):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
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
    create-only writes the conditional policy, which retries because the
    ``ifGenerationMatch=0`` precondition makes the call idempotent.
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

    def _upload(self, key: str, send: Callable[..., None], local_crc: str, *, create_only: bool) -> ObjectInfo:
        blob = self._get_bucket().blob(self._name(key))
        with self._errors(key, on_missing="bucket"):
            send(
                blob,
                checksum="crc32c",
                if_generation_match=0 if create_only else None,
                retry=self._retry_if_generation if create_only else self._retry,
                timeout=self.timeout,
            )
        # The server verifies the crc32c we sent; this also catches a server
        # (or emulator) that accepts a wrong checksum.
        if blob.crc32c != local_crc:
            raise CorruptObjectError(f"{self.uri(key)} was stored with crc32c {blob.crc32c}, expected {local_crc} "
                                     "(changed in transit, or the local file changed)")
        return ObjectInfo(key, blob.size, blob.crc32c, _updated(blob.updated))

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

    def write_bytes(self, key: str, data: bytes, *, create_only: bool = False) -> ObjectInfo:
        validate_key(key)

        def send(blob: Any, **kwargs: Any) -> None:
            blob.upload_from_string(data, **kwargs)

        return self._upload(key, send, bytes_crc32c(data), create_only=create_only)

    def read_bytes(self, key: str) -> bytes:
        validate_key(key)
        blob = self._get_bucket().blob(self._name(key))
        with self._errors(key):
            return blob.download_as_bytes(checksum="crc32c", retry=self._retry, timeout=self.timeout)

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
        return ObjectInfo(key, blob.size, blob.crc32c, _updated(blob.updated))

    def list(self, prefix: str = "", *, checksums: bool = True) -> list[ObjectInfo]:
        bucket = self._get_bucket()
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        with self._errors(prefix, on_missing="bucket"):
            blobs = list(bucket.client.list_blobs(bucket, prefix=full or None, retry=self._retry, timeout=self.timeout))
        found = [ObjectInfo(self._key(b.name), b.size, b.crc32c, _updated(b.updated)) for b in blobs]
        return sorted(found, key=lambda o: o.key)

    def _delete_name(self, name: str, key: str) -> None:
        blob = self._get_bucket().blob(name)
        try:
            with self._errors(key):
                blob.delete(retry=self._retry, timeout=self.timeout)
        except NotFound:
            pass

    def delete(self, key: str) -> None:
        validate_key(key)
        self._delete_name(self._name(key), key)

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
