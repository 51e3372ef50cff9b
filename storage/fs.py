"""Every path is a URI: ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``file:///abs`` or a plain
local path, resolved to a ``pyarrow.fs`` filesystem and a path on it (the layer Ray Data uses).

Endpoints and credentials come the way the ecosystem passes them and are never taken from the
URI, so they never reach a manifest, ``run.json``, a log or an error line:

    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL   (e.g. http://127.0.0.1:8333 for a local SeaweedFS)
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION
    GOOGLE_APPLICATION_CREDENTIALS           gs://: Google's default credentials (a key file,
                                             gcloud's login, a VM's or a pod's service account)
    STORAGE_EMULATOR_HOST                    gs:// on an emulator (e.g. http://127.0.0.1:4443 for
                                             fake-gcs-server): that endpoint, no credentials

They are read by the SDKs' own credential chains on each process (driver and every Ray
worker), not passed to ``S3FileSystem`` / ``GcsFileSystem``: a pickled filesystem or a
``Location`` sent to a worker carries no secret.

An ``OSError`` of pyarrow becomes a ``StorageError`` with one line that names the problem
(unreachable endpoint, refused credentials, missing bucket, missing object, no write
permission) and the URI, with any credential value scrubbed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from functools import lru_cache
from typing import Callable
from urllib.parse import unquote, urlparse

import braceexpand
import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3", "gs", "gcs")
_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
GCS_EMULATOR_VAR = "STORAGE_EMULATOR_HOST"  # the variable google-cloud-storage and the emulators agree on
GCS_CREDENTIALS_VAR = "GOOGLE_APPLICATION_CREDENTIALS"
# A quick failure on an unreachable endpoint (bad input) instead of the SDKs' long default retries.
# S3 counts attempts; the GCS clients retry for a time instead (15 minutes by default in pyarrow's):
# 3 s, about the window of S3's 3 attempts (an unreachable endpoint then fails in about 5 s).
CONNECT_TIMEOUT_S = 5.0
RETRY_ATTEMPTS = 3
RETRY_TIME_LIMIT_S = 3.0


@dataclass(frozen=True)
class StoreHints:
    """Where one scheme's endpoint and credentials are set: what an error line points to."""
    endpoint: str
    credentials: str


HINTS = {"s3": StoreHints("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"),
         "gs": StoreHints(GCS_EMULATOR_VAR, f"{GCS_CREDENTIALS_VAR} (or the default credentials)")}


class StorageError(ValueError):
    """A path that cannot be used as asked: one line, naming the URI and the problem."""


def scheme_of(uri: str | os.PathLike) -> str:
    """``s3``, ``gs``, ``file`` or ``""`` for a plain local path (a ``pathlib.Path`` is one)."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", os.fspath(uri).strip())
    return match.group(1).lower() if match else ""


def is_remote(uri: str | os.PathLike) -> bool:
    """True for object-store URIs (s3://, gs://); file:// and plain paths are local."""
    return scheme_of(uri) in REMOTE_SCHEMES


@dataclass(frozen=True)
class Location:
    """One resolved path: ``fs`` and ``path`` for pyarrow, ``uri`` canonical for messages and records.

    Pickles as its URI and is resolved again on the receiving process, with that process's
    environment (credentials never travel in the pickle).
    """

    uri: str
    path: str
    fs: pafs.FileSystem = field(compare=False, repr=False)

    @property
    def remote(self) -> bool:
        return is_remote(self.uri)

    def child(self, *names: str) -> "Location":
        parts = [n.strip("/") for n in names if n.strip("/")]
        if not parts:
            return self
        joined = "/".join(parts)
        uri = (self.uri.rstrip("/") + "/" + joined) if self.remote else os.path.join(self.uri, *parts)
        path = (self.path.rstrip("/") + "/" + joined) if self.remote else os.path.join(self.path, *parts)
        return Location(uri, path, self.fs)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def sibling(self, suffix: str) -> "Location":
        """This path with ``suffix`` appended to its last name (``out`` -> ``out.partial``)."""
        return Location(self.uri.rstrip("/") + suffix, self.path.rstrip("/") + suffix, self.fs)

    def __str__(self) -> str:
        return self.uri

    def __reduce__(self):
        return resolve, (self.uri,)


def resolve(uri: str) -> Location:
    """A URI or local path -> Location. Raises StorageError for a URI it cannot use."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError("empty path")
    uri = uri.strip()
    scheme = scheme_of(uri)
    if scheme == "":
        path = os.path.abspath(os.path.expanduser(uri))
        return Location(path, path, _local())
    if scheme == "file":
        path = file_uri_path(uri)
        return Location(path, path, _local())
    parsed = urlparse(uri)
    if scheme not in REMOTE_SCHEMES:
        raise StorageError(f"{uri}: unsupported scheme {scheme}:// (use s3://, gs://, file:// or a local path)")
    scheme = "gs" if scheme == "gcs" else scheme
    hints = HINTS[scheme]
    if "@" in parsed.netloc:
        # Never accept credentials in a URI: the URI is recorded in manifests and run records.
        raise StorageError(f"{scheme}://...: credentials in a URI are refused; use {hints.credentials}")
    if parsed.query or parsed.fragment:
        raise StorageError(f"{scheme}://{parsed.netloc}{parsed.path}: URI options (?...) are not supported; "
                           f"set the endpoint with {hints.endpoint}")
    bucket, key = parsed.netloc, parsed.path.strip("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket")
    path = f"{bucket}/{key}" if key else bucket
    filesystem = _s3(*s3_settings()) if scheme == "s3" else _gcs(*gcs_settings())
    return Location(f"{scheme}://{path}", path, filesystem)


def file_uri_path(uri: str) -> str:
    """The absolute local path a ``file:///abs/path`` (or ``file://localhost/abs/path``) URI names.

    Taken apart by hand, not by ``urlparse``: a corpus glob's ``?`` or a ``#`` in a file name is
    part of the path here, not a query or a fragment. Percent escapes are decoded (``%20``).
    """
    rest = uri.strip().split("://", 1)[1]
    host, slash, path = rest.partition("/")
    if host not in ("", "localhost"):
        raise StorageError(f"{uri}: a file:// URI names a local path (file:///abs/path), not host {host!r}")
    if not path.strip("/"):
        raise StorageError(f"{uri}: a file:// URI needs an absolute path (file:///abs/path)")
    return os.path.abspath(unquote("/" + path))


def normalise(value: str) -> str:
    """A path option's value as the jobs take it: each ``file://`` URI (each part of a comma list,
    as ``--corpus`` and ``--holdout`` take) becomes the local path it names; a plain path or an
    object-store URI is returned as given.

    Applied once where arguments enter (``jobs.paths.normalise_paths`` for the command line, the
    configs' path fields for the Python API), so that the jobs, which tell local from remote by
    ``is_remote`` and hand local paths to ``os`` and ``glob``, never see ``file://``: a raw
    ``file:///x`` there would read as the relative path ``file:/x``. Records (``run.json``, the
    manifest) therefore hold the plain path, the same for ``file:///x`` and ``/x``.
    Raises StorageError for a ``file://`` URI that names a host.
    """
    if not isinstance(value, str) or "file://" not in value.lower():
        return value
    return ",".join(file_uri_path(part) if scheme_of(part) == "file" else part for part in value.split(","))


def s3_settings() -> tuple:
    """(endpoint, region, credentials fingerprint): what an S3FileSystem depends on in this process.

    The fingerprint is a hash, so that a change of credentials in the environment gets a new
    filesystem while the cache key holds no secret.
    """
    endpoint = next((os.environ[v] for v in _ENDPOINT_VARS if os.environ.get(v)), "")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
    fingerprint = hashlib.sha256("\0".join(os.environ.get(v, "") for v in _CREDENTIAL_VARS).encode()).hexdigest()
    return endpoint, region, fingerprint


@lru_cache(maxsize=8)
def _s3(endpoint: str, region: str, fingerprint: str) -> pafs.S3FileSystem:
    options: dict = {"connect_timeout": CONNECT_TIMEOUT_S,
                     "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=RETRY_ATTEMPTS)}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else "https://" + endpoint)
        options["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        options["scheme"] = parsed.scheme
        # A custom endpoint (SeaweedFS, MinIO...) has no region lookup: default to us-east-1.
        options["region"] = region or "us-east-1"
    elif region:
        options["region"] = region
    return pafs.S3FileSystem(**options)


def gcs_settings() -> tuple[str, str]:
    """(emulator endpoint, credentials file): what a GcsFileSystem depends on in this process.

    ``STORAGE_EMULATOR_HOST`` (the emulator convention google-cloud-storage follows) points
    every gs:// call at an emulator, without credentials; else Google's default credentials
    (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's login, the metadata server) are used. The
    credentials file is a path, not a secret: it only keys the cache.
    """
    return os.environ.get(GCS_EMULATOR_VAR, "").strip(), os.environ.get(GCS_CREDENTIALS_VAR, "")


@lru_cache(maxsize=8)
def _gcs(emulator: str, credentials_file: str) -> pafs.GcsFileSystem:
    options: dict = {"retry_time_limit": timedelta(seconds=RETRY_TIME_LIMIT_S)}
    if emulator:
        parsed = urlparse(emulator if "://" in emulator else "http://" + emulator)
        options.update(endpoint_override=parsed.netloc + parsed.path.rstrip("/"), scheme=parsed.scheme, anonymous=True)
    return pafs.GcsFileSystem(**options)


@lru_cache(maxsize=1)
def _local() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


def endpoint_of(location: Location) -> str:
    if not location.remote:
        return "local disk"
    if location.uri.startswith("gs://"):
        return gcs_settings()[0] or "Google Cloud Storage"
    return s3_settings()[0] or "AWS S3"


# --------------------------------------------------------------------------------------------
# Errors: pyarrow's OSError -> one line, no credential


def scrub(text: str) -> str:
    """``text`` with the value of every credential variable replaced by ``***``."""
    for name in _CREDENTIAL_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


# What went wrong, whichever SDK said it (pyarrow's AWS or GCS C++ clients, boto3,
# google-cloud-storage): the kinds of failure that get their own line.
UNREACHABLE, CREDENTIALS, NO_BUCKET, DENIED, MISSING = "unreachable", "credentials", "no bucket", "denied", "missing"
_AWS_KINDS = {"NETWORK_CONNECTION": UNREACHABLE, "SIGNATURE_DOES_NOT_MATCH": CREDENTIALS, "INVALID_ACCESS_KEY_ID": CREDENTIALS,
              "INVALID_CLIENT_TOKEN_ID": CREDENTIALS, "EXPIRED_TOKEN": CREDENTIALS, "MISSING_AUTHENTICATION_TOKEN": CREDENTIALS,
              "NO_SUCH_BUCKET": NO_BUCKET, "ACCESS_DENIED": DENIED, "RESOURCE_NOT_FOUND": MISSING, "NO_SUCH_KEY": MISSING}
# google-cloud-cpp (pyarrow's GCS) names the call that failed; these answer NOT_FOUND only for a
# missing bucket (a missing prefix lists empty, an upload creates its object).
_GCS_BUCKET_CALLS = ("ListObjects", "GetBucketMetadata", "CreateResumableUpload", "InsertObject", "RewriteObject", "CopyObject")


def _kind_of(exc: BaseException, text: str) -> str:
    code = re.search(r"AWS Error ([A-Z_]+)", text)
    if code and code.group(1) in _AWS_KINDS:
        return _AWS_KINDS[code.group(1)]
    if "curlCode" in text or "Could not connect" in text or "Couldn't resolve" in text:
        return UNREACHABLE
    if "InvalidAccessKeyId" in text or "UNAUTHENTICATED" in text:
        return CREDENTIALS
    if "NoSuchBucket" in text or ("NOT_FOUND" in text and any(f"function={call}" in text for call in _GCS_BUCKET_CALLS)):
        return NO_BUCKET
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "PERMISSION_DENIED" in text:
        return DENIED
    if isinstance(exc, FileNotFoundError):
        return MISSING
    return ""


def storage_error(exc: BaseException | None, location: Location | str, action: str, kind: str = "") -> StorageError:
    """The StorageError for ``exc`` raised while trying to ``action`` (read/write/list) ``location``;
    ``kind`` (UNREACHABLE...) where the caller already knows what went wrong."""
    uri = str(location)
    text = str(exc) if exc is not None else ""
    kind = kind or _kind_of(exc, text)
    where = endpoint_of(location) if isinstance(location, Location) else "the object store"
    scheme = "gs" if scheme_of(uri) in ("gs", "gcs") else "s3"
    hints = HINTS[scheme]
    if kind == UNREACHABLE:
        check = (f"is it running, and is {hints.endpoint} right?" if scheme == "s3" or gcs_settings()[0]
                 else "is the network up?")
        message = f"cannot reach the object store at {where} to {action} {uri}; {check}"
    elif kind == CREDENTIALS:
        message = f"the object store at {where} refused the credentials to {action} {uri}; check {hints.credentials}"
    elif kind == NO_BUCKET:
        message = f"bucket {uri.split('://', 1)[-1].split('/', 1)[0]} does not exist ({action} {uri})"
    elif kind == DENIED:
        message = (f"no permission to {action} {uri} (access denied); check the credentials and their permissions"
                   if location and is_remote(uri) else f"no permission to {action} {uri}")
    elif kind == MISSING:
        message = f"{uri} does not exist"
    else:
        first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        message = f"cannot {action} {uri}: {first_line}"
    return StorageError(scrub(message))


# --------------------------------------------------------------------------------------------
# Questions


def _loc(target: Location | str) -> Location:
    return target if isinstance(target, Location) else resolve(target)


def _info(location: Location, action: str = "read") -> pafs.FileInfo:
    try:
        return location.fs.get_file_info(location.path)
    except OSError as exc:
        raise storage_error(exc, location, action) from None


def exists(target: Location | str) -> bool:
    return _info(_loc(target)).type != pafs.FileType.NotFound


def is_file(target: Location | str) -> bool:
    return _info(_loc(target)).type == pafs.FileType.File


def is_dir(target: Location | str) -> bool:
    """A local directory, or an object-store prefix that holds at least one object."""
    return _info(_loc(target)).type == pafs.FileType.Directory


def size(target: Location | str) -> int:
    location = _loc(target)
    info = _info(location)
    if info.type != pafs.FileType.File:
        raise StorageError(f"{location.uri} does not exist" if info.type == pafs.FileType.NotFound
                           else f"{location.uri} is not a file")
    return int(info.size)


def list_dir(target: Location | str, recursive: bool = False) -> list[Location]:
    """Files directly under ``target`` (or all below it), sorted by path; [] when there is none."""
    location = _loc(target)
    try:
        infos = location.fs.get_file_info(pafs.FileSelector(location.path, recursive=recursive, allow_not_found=True))
    except OSError as exc:
        raise storage_error(exc, location, "list") from None
    base = location.path.rstrip("/") + "/"
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    return [location.child(p[len(base):]) if p.startswith(base) else location.child(os.path.basename(p)) for p in files]


def glob(pattern: str) -> list[Location]:
    """Files whose path matches ``pattern`` (``*``, ``?``, ``[...]`` within one path segment), sorted."""
    location = resolve(pattern)
    segments = location.path.split("/")
    first_wild = next((i for i, s in enumerate(segments) if any(c in s for c in "*?[")), None)
    if first_wild is None:
        return [location] if is_file(location) else []
    if location.remote and first_wild == 0:
        raise StorageError(f"{pattern}: a wildcard in the bucket name is not supported")
    root_path = "/".join(segments[:first_wild]) or "/"
    root = Location(location.uri[: len(location.uri) - len(location.path)] + root_path if location.remote else root_path,
                    root_path, location.fs)
    recursive = first_wild < len(segments) - 1
    matches = []
    for candidate in list_dir(root, recursive=recursive):
        parts = candidate.path.split("/")
        if len(parts) == len(segments) and all(fnmatch.fnmatchcase(p, s) for p, s in zip(parts, segments)):
            matches.append(candidate)
    return sorted(matches, key=lambda loc: loc.path)


def expand(spec: str) -> list[str]:
    """A brace pattern and/or glob over URIs -> the matching URIs, in pattern order; missing ones kept.

    ``s3://b/train-{000000..000002}.tar`` -> three URIs; ``s3://b/train-*.tar`` -> every match.
    A plain name is returned as it is (the caller checks that it exists).
    """
    out: list[str] = []
    for expanded in braceexpand.braceexpand(spec):
        if any(ch in expanded for ch in "*?["):
            out.extend(loc.uri for loc in glob(expanded))
        else:
            out.append(expanded)
    return out


def probe(target: Location | str, action: str = "read") -> None:
    """Fail now, with one line, if the store behind ``target`` is unreachable, refuses the
    credentials or has no such bucket. Lists a prefix that does not exist: cheap, writes nothing.

    An access-denied answer is let through: credentials may read objects without the right to
    list them, and the read or write that follows says so precisely.
    """
    location = _loc(target)
    if not location.remote:
        return
    bucket = location.path.split("/", 1)[0]
    try:
        if location.uri.startswith("gs://"):
            # pyarrow's GCS listing of a missing prefix is a bare OSError: ask for the bucket itself
            # (a key that may only touch objects gets access denied, let through below).
            if location.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise storage_error(None, location, action, NO_BUCKET)
            return
        # allow_not_found=False: pyarrow would also call a missing *bucket* "not found" otherwise.
        location.fs.get_file_info(pafs.FileSelector(f"{bucket}/.spellshield-probe-{uuid.uuid4().hex}"))
    except FileNotFoundError:
        return  # the bucket answered: the prefix does not exist, as expected
    except OSError as exc:
        error = storage_error(exc, location, action)
        if "no permission" not in str(error):
            raise error from None


def check_writable(target: Location | str) -> None:
    """Fail now if ``target`` (a directory or prefix to write under) cannot be written.

    On an object store a probe object is written and deleted; locally the nearest existing
    parent must be a writable directory. Writes nothing a reader could take for output.
    """
    location = _loc(target)
    if not location.remote:
        parent = location.path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise StorageError(f"no permission to write {location.uri} ({parent} is not a writable directory)")
        return
    probe(location, "write")
    marker = location.child(f".spellshield-write-probe-{uuid.uuid4().hex}")
    try:
        with marker.fs.open_output_stream(marker.path) as f:
            f.write(b"")
    except OSError as exc:
        raise storage_error(exc, location, "write") from None
    delete(marker)


def check_new_output(target: Location | str, marker: str, finished: Callable[[Location], str]) -> Location:
    """An output prefix a job may create: reachable, no ``marker`` (else ``finished(location)``
    is the error), no other object, writable. Raises StorageError; writes nothing that stays."""
    location = _loc(target)
    probe(location, "write")
    if exists(location.child(marker)):
        raise StorageError(finished(location))
    if list_dir(location, recursive=True):
        raise StorageError(f"{location.uri} is not empty; choose a new or empty prefix")
    check_writable(location)
    return location


# --------------------------------------------------------------------------------------------
# Reading


def open_input_stream(target: Location | str):
    """A sequential binary reader (``tarfile`` mode ``r|*``, hashing)."""
    return _open_input(_loc(target), seekable=False)


def open_input_file(target: Location | str):
    """A seekable binary reader (Parquet footers, FAISS files)."""
    return _open_input(_loc(target), seekable=True)


def _open_input(location: Location, seekable: bool):
    if not location.remote:
        return open(location.path, "rb")
    try:
        return (location.fs.open_input_file if seekable else location.fs.open_input_stream)(location.path)
    except OSError as exc:
        raise storage_error(exc, location, "read") from None


def read_bytes(target: Location | str) -> bytes:
    location = _loc(target)
    try:
        with open_input_stream(location) as f:
            return f.read()
    except StorageError:
        raise
    except OSError as exc:
        raise storage_error(exc, location, "read") from None


def read_json(target: Location | str):
    return json.loads(read_bytes(target))


# --------------------------------------------------------------------------------------------
# Writing: nothing is visible at its final name before it is whole


def write_bytes(target: Location | str, data: bytes) -> None:
    """Write ``data`` so that a reader sees the old object or the whole new one.

    Local: a temporary name beside it, fsync, rename. Object store: one upload, which the store
    makes visible only when it completes (a PUT, or a multipart upload's completion).
    """
    location = _loc(target)
    if not location.remote:
        os.replace(local_tmp_beside(location.path, data), location.path)
        return
    try:
        with location.fs.open_output_stream(location.path) as f:
            f.write(data)
    except OSError as exc:
        raise storage_error(exc, location, "write") from None


def local_tmp_beside(path: str, data: bytes) -> str:
    """A durable (fsynced) temporary file holding ``data`` in ``path``'s directory; its name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write_json(target: Location | str, payload) -> None:
    write_bytes(target, (json.dumps(payload, indent=2) + "\n").encode())


def put_file(local_path: str, target: Location | str) -> None:
    """Copy a finished local file to ``target``, whole or not at all (see ``write_bytes``)."""
    location = _loc(target)
    if not location.remote:
        os.makedirs(os.path.dirname(location.path), exist_ok=True)
        tmp = f"{location.path}.tmp-{os.getpid()}"
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, location.path)
        return
    with open(local_path, "rb") as src:  # a missing local file is the caller's OSError, not the store's
        try:
            with location.fs.open_output_stream(location.path) as dst:
                shutil.copyfileobj(src, dst, length=8 << 20)
        except OSError as exc:
            raise storage_error(exc, location, "write") from None


def get_file(target: Location | str, local_path: str) -> int:
    """Download ``target`` to ``local_path`` (temporary name, then rename). Returns bytes copied."""
    location = _loc(target)
    os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
    tmp = f"{local_path}.tmp-{os.getpid()}"
    try:
        with open_input_stream(location) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=8 << 20)
            copied = dst.tell()
    except StorageError:
        _remove_quietly(tmp)
        raise
    except OSError as exc:
        _remove_quietly(tmp)
        raise storage_error(exc, location, "read") from None
    os.replace(tmp, local_path)
    return copied


def copy(source: Location | str, target: Location | str) -> None:
    """Copy one file or object within one store, whole on arrival (S3: a server-side copy)."""
    source, location = _loc(source), _loc(target)
    if not location.remote:
        put_file(source.path, location)
        return
    try:
        location.fs.copy_file(source.path, location.path)
    except OSError as exc:
        raise storage_error(exc, location, "write") from None


def copy_prefix_to_local(target: Location | str, local_dir: str) -> list[str]:
    """Every file under ``target`` copied to the same relative path under ``local_dir``."""
    location = _loc(target)
    copied = []
    base = location.path.rstrip("/") + "/"
    for item in list_dir(location, recursive=True):
        relative = item.path[len(base):]
        destination = os.path.join(local_dir, *relative.split("/"))
        get_file(item, destination)
        copied.append(destination)
    return copied


def put_tree(local_dir: str, target: Location | str, last: str | None = None) -> list[str]:
    """Every file under ``local_dir`` copied to the same relative path under ``target``.

    ``last`` (a relative path) is copied after all the others: a reader that waits for it (a
    manifest, a part's marker) never sees it before the files it describes.
    """
    location = _loc(target)
    relative = sorted(os.path.relpath(os.path.join(d, n), local_dir) for d, _, names in os.walk(local_dir) for n in names)
    if last is not None:
        if last not in relative:
            raise StorageError(f"{os.path.join(local_dir, last)} is missing")
        relative = [r for r in relative if r != last] + [last]
    for name in relative:
        put_file(os.path.join(local_dir, name), location.child(*name.split(os.sep)))
    return relative


def delete(target: Location | str) -> None:
    """Remove one file or object; a missing one is fine."""
    location = _loc(target)
    try:
        location.fs.delete_file(location.path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if _info(location).type != pafs.FileType.NotFound:
            raise storage_error(exc, location, "delete") from None


def delete_tree(target: Location | str) -> None:
    """Remove a directory or every object under a prefix; a missing one is fine."""
    location = _loc(target)
    if not location.remote:
        shutil.rmtree(location.path, ignore_errors=True)
        return
    for item in list_dir(location, recursive=True):
        delete(item)
    try:
        location.fs.delete_dir(location.path)  # SeaweedFS keeps a directory entry for a prefix
    except OSError:
        pass


def file_sha256(path: str) -> str:
    """sha256 of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
