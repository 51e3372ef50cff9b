"""Exactly once without rename: create-only writes, a driver lease, and unit commits (docs/storage.md).

An object store has no atomic rename and no directory, but it has two things this builds on:
every object appears whole (a PUT, or a multipart upload's completion), and a *conditional*
write: create only (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``) and compare-and-swap
(S3 ``If-Match: <etag>``, GCS ``ifGenerationMatch=<generation>``), which AWS S3, SeaweedFS, GCS
and fake-gcs-server honour. pyarrow.fs has no conditional write, so those two calls go through
each store's SDK (boto3, google-cloud-storage: ``_S3`` and ``_GCS`` below, two backends of one
small protocol); everything else stays on pyarrow.fs. On local disk the same calls use
``os.link`` (fails if the name exists) and a lock.

    create_only(uri, data)           True if this call created the object, False if it existed
    acquire_lease(uri, holder, ttl)  a Lease, or LeaseHeld naming the holder; an expired lease is
                                     taken over by compare-and-swap, so two takers cannot both win
    commit_unit(run, unit, files)    stage -> create-only commit record -> publish (marker last)
    committed_units(run)             the units whose commit record exists
    retract_unit(run, unit)          undo a commit found broken or stale (record first)
    fetch_committed(run, record, f)  a committed file's content (published or staged), sha256-checked
    roll_forward(run)                publish committed units a killed writer left unpublished,
                                     delete attempts that never committed
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

from .fs import (CONNECT_TIMEOUT_S, CREDENTIALS, DENIED, GCS_CREDENTIALS_VAR, GCS_EMULATOR_VAR, MISSING, NO_BUCKET, RETRY_ATTEMPTS,
                 RETRY_TIME_LIMIT_S, UNREACHABLE, Location, StorageError, copy, delete, delete_tree, exists, file_sha256, gcs_settings,
                 get_file, list_dir, local_tmp_beside, put_file, read_bytes, resolve, s3_settings, storage_error)

COMMITS = "_commits"  # <run>/_commits/<unit>.json: the unit is committed (create-only)
ATTEMPTS = "_attempts"  # <run>/_attempts/<unit>/<attempt>/<name>: an attempt's staged files


# --------------------------------------------------------------------------------------------
# Conditional writes: two small backends of one protocol


def _location(target: Location | str) -> Location:
    return target if isinstance(target, Location) else resolve(target)


class _Store:
    """The two calls of the protocol one object store provides, through its own SDK (pyarrow.fs
    has no conditional write). ``version`` names the content of an object: S3's ETag, GCS's
    generation; ``put`` with ``version=None`` creates only."""

    scheme = ""
    package, extra = "", ""

    def __init__(self):
        self._clients = threading.local()  # one client per thread and per environment (endpoint, credentials)

    def client(self):
        key = self._settings()
        cached = getattr(self._clients, "value", None)
        if cached is None or cached[0] != key:
            try:
                cached = (key, self._client())
            except ImportError:
                raise StorageError(f"create-only writes and leases on {self.scheme}:// need {self.package}: "
                                   f"pip install 'spellshield[{self.extra}]'") from None
            self._clients.value = cached
        return cached[1]

    def _settings(self) -> tuple:
        """What the client depends on in this process's environment."""
        raise NotImplementedError

    def _client(self):
        raise NotImplementedError

    def get(self, location: Location, bucket: str, key: str) -> tuple[bytes, str] | None:
        """(content, version), or None when there is no such object."""
        raise NotImplementedError

    def put(self, location: Location, bucket: str, key: str, data: bytes, version: str | None) -> str | None:
        """Write if the object is absent (``version`` None) or still at ``version``: the new
        version, or None when the precondition failed."""
        raise NotImplementedError


class _S3(_Store):
    """``If-None-Match: *`` / ``If-Match: <etag>`` PUTs through boto3 (AWS S3 since 2024, SeaweedFS)."""

    scheme, package, extra = "s3", "boto3", "s3"
    # boto3's error codes, in the terms of storage.fs's error lines
    KINDS = {"SignatureDoesNotMatch": CREDENTIALS, "InvalidAccessKeyId": CREDENTIALS, "AccessDenied": DENIED,
             "NoSuchBucket": NO_BUCKET, "NoSuchKey": MISSING, "404": MISSING}

    def _settings(self):
        return s3_settings()

    def _client(self):
        import boto3
        from botocore.config import Config

        # boto3 reads AWS_ENDPOINT_URL(_S3), the credentials and the region from the environment
        # itself; a custom endpoint without a region gets us-east-1, as in storage.fs.
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return boto3.client("s3", region_name=region, config=Config(connect_timeout=CONNECT_TIMEOUT_S,
                                                                    retries={"max_attempts": RETRY_ATTEMPTS, "mode": "standard"}))

    def _error(self, exc: Exception, location: Location, action: str) -> StorageError:
        from botocore.exceptions import ClientError, EndpointConnectionError

        if isinstance(exc, EndpointConnectionError):
            return storage_error(exc, location, action, UNREACHABLE)
        if isinstance(exc, ClientError):
            return storage_error(exc, location, action, self.KINDS.get(exc.response.get("Error", {}).get("Code", ""), ""))
        return storage_error(exc, location, action)

    def get(self, location, bucket, key):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self.client().get_object(Bucket=bucket, Key=key)
            return answer["Body"].read(), answer["ETag"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._error(exc, location, "read") from None
        except BotoCoreError as exc:
            raise self._error(exc, location, "read") from None

    def put(self, location, bucket, key, data, version):
        from botocore.exceptions import BotoCoreError, ClientError

        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            return self.client().put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412 or exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None  # 409 ConditionalRequestConflict: a concurrent conditional write won
            raise self._error(exc, location, "write") from None
        except BotoCoreError as exc:
            raise self._error(exc, location, "write") from None


class _GCS(_Store):
    """Generation preconditions through google-cloud-storage: ``ifGenerationMatch=0`` (create
    only) and ``ifGenerationMatch=<generation>`` (compare-and-swap), the generation playing the
    ETag's part. The client follows ``STORAGE_EMULATOR_HOST`` (then without credentials) or
    Google's default credentials, as storage.fs's GcsFileSystem does."""

    scheme, package, extra = "gs", "google-cloud-storage", "gcs"

    def _settings(self):
        return gcs_settings()

    def _client(self):
        from google.auth.exceptions import DefaultCredentialsError
        from google.cloud import storage as gcs

        try:
            return gcs.Client()
        except DefaultCredentialsError:
            raise StorageError(f"no Google credentials for gs://: set {GCS_CREDENTIALS_VAR} (a service account key file), "
                               f"log in with gcloud, run where a service account is attached, or set {GCS_EMULATOR_VAR} "
                               f"for an emulator") from None

    def _call(self, location: Location, action: str, call):
        from google.api_core import exceptions as api
        from google.auth import exceptions as auth
        from requests.exceptions import ConnectionError as Unreachable

        try:
            return call()
        except api.NotFound as exc:
            # a download answers 404 for a missing object; an upload only for a missing bucket
            raise storage_error(exc, location, action, MISSING if action == "read" else NO_BUCKET) from None
        except (api.Unauthorized, auth.DefaultCredentialsError, auth.RefreshError) as exc:
            raise storage_error(exc, location, action, CREDENTIALS) from None
        except api.Forbidden as exc:
            raise storage_error(exc, location, action, DENIED) from None
        except (api.RetryError, Unreachable, auth.TransportError) as exc:
            raise storage_error(exc, location, action, UNREACHABLE) from None
        except api.GoogleAPICallError as exc:
            raise storage_error(exc, location, action) from None

    def _options(self) -> dict:
        from google.cloud.storage.retry import DEFAULT_RETRY

        # a conditional write is safe to retry (a retry of a write that landed fails its own
        # precondition, and _conditional_put then finds its bytes there); for a short time, as in storage.fs
        within = getattr(DEFAULT_RETRY, "with_timeout", None) or DEFAULT_RETRY.with_deadline  # google-api-core < 2.16: with_deadline
        return {"timeout": (CONNECT_TIMEOUT_S, 60.0), "retry": within(RETRY_TIME_LIMIT_S)}

    def get(self, location, bucket, key):
        from google.api_core.exceptions import NotFound

        blob = self.client().bucket(bucket).blob(key)

        def download():
            try:
                return blob.download_as_bytes(**self._options())
            except NotFound:
                return None

        data = self._call(location, "read", download)
        return None if data is None else (data, str(blob.generation))  # the generation of the bytes this response carried

    def put(self, location, bucket, key, data, version):
        from google.api_core.exceptions import PreconditionFailed

        if version is not None and not version.isdigit():
            return None  # no generation: no object holds that version
        blob = self.client().bucket(bucket).blob(key)

        def upload():
            try:  # one multipart upload: leases and commit records are far under its 8 MiB
                blob.upload_from_string(data, if_generation_match=0 if version is None else int(version), **self._options())
            except PreconditionFailed:
                return None
            return str(blob.generation)

        return self._call(location, "write", upload)


_STORES = {store.scheme: store for store in (_S3(), _GCS())}


def check_conditional_writes(target: Location | str) -> None:
    """Raise StorageError, before any work, where this module cannot keep its guarantees: a
    remote scheme without a backend here, or a backend whose SDK is not installed."""
    location = _location(target)
    if location.remote:
        _store(location).client()


def _store(location: Location) -> _Store:
    scheme = location.uri.split("://", 1)[0]
    if scheme not in _STORES:
        raise StorageError(f"{location.uri}: runs and leases need create-only writes, implemented for "
                           f"{', '.join(s + '://' for s in _STORES)} and local paths only (see docs/storage.md)")
    return _STORES[scheme]


def _bucket_key(location: Location) -> tuple[str, str]:
    parsed = urlparse(location.uri)
    return parsed.netloc, parsed.path.lstrip("/")


def _conditional_put(location: Location, data: bytes, version: str | None) -> str | None:
    """``put`` on the location's store; the new version, or None when another writer won.

    An SDK retries a write whose answer was lost; if the first try landed, the retry fails its
    own precondition. So a failed precondition is read back: an object holding exactly ``data``
    is this call's write (what this module writes names its writer, an attempt or a driver id,
    so two writers never write the same bytes)."""
    store = _store(location)
    bucket, key = _bucket_key(location)
    new = store.put(location, bucket, key, data, version)
    if new is None:
        current = store.get(location, bucket, key)
        if current is not None and current[0] == data:
            return current[1]
    return new


def read_with_etag(target: Location | str) -> tuple[bytes, str] | None:
    """(content, etag) of the object, or None when there is none. The etag is the store's version
    of the content: S3's ETag, GCS's generation; locally, the content's sha256."""
    location = _location(target)
    if not location.remote:
        try:
            with open(location.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()
    return _store(location).get(location, *_bucket_key(location))


def create_only(target: Location | str, data: bytes) -> bool:
    """Write ``data`` at ``target`` unless something is there. True if this call created it.

    The object appears whole (one PUT; locally a hard link of a finished temporary file, which
    fails when the name exists), and of two concurrent callers exactly one gets True. On an
    object store an object that already holds exactly ``data`` counts as this call's (the SDK's
    retry of a write that landed, see ``_conditional_put``): callers write data naming themselves.
    """
    location = _location(target)
    if location.remote:
        return _conditional_put(location, data, None) is not None
    tmp = local_tmp_beside(location.path, data)
    try:
        os.link(tmp, location.path)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)


def replace_if(target: Location | str, data: bytes, etag: str) -> str | None:
    """Compare-and-swap: write ``data`` only if the object's etag is still ``etag``. New etag or None."""
    location = _location(target)
    if location.remote:
        return _conditional_put(location, data, etag)
    with open(location.path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = read_with_etag(location)
        if current is None or current[1] != etag:
            return None
        os.replace(local_tmp_beside(location.path, data), location.path)
        return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# The driver lease: one driver per output


class LeaseHeld(StorageError):
    """Another driver holds the lease on this output."""


class LeaseLost(RuntimeError):
    """This driver's lease was taken over (it expired): stop writing."""


@dataclass
class Lease:
    location: Location
    holder: dict
    ttl_s: float
    etag: str

    def _payload(self) -> bytes:
        now = time.time()
        return json.dumps({**self.holder, "renewed": now, "expires": now + self.ttl_s}).encode()

    def renew(self) -> None:
        """Extend the lease; raises LeaseLost if another driver took it over meanwhile."""
        etag = replace_if(self.location, self._payload(), self.etag)
        if etag is None:
            raise LeaseLost(f"the lease {self.location.uri} was taken over by another driver")
        self.etag = etag

    def release(self) -> None:
        self._stop.set()
        current = read_with_etag(self.location)
        if current is not None and current[1] == self.etag:
            delete(self.location)

    def keep_alive(self) -> "Lease":
        """Renew every third of the TTL on a daemon thread until ``release`` (or until lost)."""
        def renew():
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    self.renew()
                except (LeaseLost, StorageError):
                    return  # the next commit of this driver is then refused by the store or roll-forward
        threading.Thread(target=renew, name="spellshield-lease", daemon=True).start()
        return self

    def __post_init__(self):
        self._stop = threading.Event()


def holder_identity() -> dict:
    return {"driver": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "acquired": time.time()}


def check_lease_free(target: Location | str, content: bytes | None = None) -> None:
    """Raise LeaseHeld, naming the holder, while a live lease is at ``target`` (reads only)."""
    location = _location(target)
    if content is None:
        current = read_with_etag(location)
        if current is None:
            return
        content = current[0]
    try:
        held = json.loads(content)
        expires = float(held["expires"])
    except (ValueError, KeyError, TypeError):
        return  # unreadable: treated as expired
    if expires > time.time():
        raise LeaseHeld(f"{location.uri} is held by another driver (host {held.get('host')}, pid {held.get('pid')}) "
                        f"for {expires - time.time():.0f} s more; two drivers on one output would mix their runs")


def acquire_lease(target: Location | str, ttl_s: float = 120.0, holder: dict | None = None) -> Lease:
    """Take the lease object at ``target``, or raise LeaseHeld naming its live holder.

    A lease whose ``expires`` has passed (its driver was killed and stopped renewing) is taken
    over with a compare-and-swap on its etag: of two drivers that both see it expired, one wins.
    """
    location = _location(target)
    lease = Lease(location, holder or holder_identity(), ttl_s, "")
    data = lease._payload()
    if create_only(location, data):
        current = read_with_etag(location)
        lease.etag = current[1] if current else ""
        return lease
    current = read_with_etag(location)
    if current is None:  # released between our two calls: try once more
        return acquire_lease(location, ttl_s, lease.holder)
    check_lease_free(location, current[0])
    etag = replace_if(location, data, current[1])
    if etag is None:
        raise LeaseHeld(f"{location.uri} was just taken over by another driver")
    lease.etag = etag
    return lease


LEASE = "_lease.json"
LEASE_TTL_ENV = "SPELLSHIELD_LEASE_TTL"  # seconds; default 60


def open_run(run: Location | str) -> Lease:
    """What a driver does first on a run directory on an object store: take its lease (refused
    while another driver holds it), keep it renewed, and roll forward what a killed driver left."""
    run = _location(run)
    lease = acquire_lease(run.child(LEASE), ttl_s=float(os.environ.get(LEASE_TTL_ENV) or 60)).keep_alive()
    roll_forward(run)
    return lease


# --------------------------------------------------------------------------------------------
# Unit commits


def commit_unit(run: Location | str, unit: str, files: list[tuple[str, str]]) -> bool:
    """Commit one unit's finished local files, given as [(relative final name, local path)] in
    publication order (the marker, e.g. the samples file, last). True if this attempt committed.

    1. stage: upload to ``_attempts/<unit>/<attempt>/`` (whole objects, invisible to readers);
    2. commit: create-only ``_commits/<unit>.json`` naming the attempt and each file's sha256;
       a second attempt of the same unit loses here, deletes its staged objects and returns False;
    3. publish: copy the staged objects to their final names, in order, then drop the stage.
    A writer killed after 2 leaves a committed, unpublished unit: ``roll_forward`` finishes it.
    """
    run = _location(run)
    attempt = uuid.uuid4().hex
    stage = run.child(ATTEMPTS, unit, attempt)
    record = {"unit": unit, "attempt": attempt, "files": []}
    for name, local in files:
        put_file(local, stage.child(name))
        record["files"].append({"name": name, "sha256": file_sha256(local), "size": os.path.getsize(local)})
    if not create_only(_record_of(run, unit), json.dumps(record, indent=1).encode()):
        delete_tree(stage)
        return False
    _publish(run, record)
    return True


def _publish(run: Location, record: dict) -> None:
    """Copy a committed attempt's staged files to their final names, in order, then drop the
    stage. Safe to repeat after a publisher killed at any point: a staged file that is gone was
    copied before the stage began to be dropped (every copy comes first), so its final object
    is this attempt's; one that is neither staged nor published is an error, never skipped."""
    stage = run.child(ATTEMPTS, record["unit"], record["attempt"])
    for item in record["files"]:
        source, final = stage.child(item["name"]), run.child(item["name"])
        if exists(source):
            copy(source, final)
        elif not exists(final):
            raise _lost(final)
    delete_tree(stage)


def _lost(final: Location) -> StorageError:
    """A committed file found under neither its final nor its staged name: fail, never skip."""
    return StorageError(f"{final.uri} is committed but neither published nor staged (was the stage deleted?)")


def _record_of(run: Location, unit: str) -> Location:
    return run.child(COMMITS, f"{unit}.json")


def commit_record(run: Location | str, unit: str) -> dict | None:
    """The commit record of ``unit``, or None while it is not committed."""
    location = _record_of(_location(run), unit)
    return json.loads(read_bytes(location)) if exists(location) else None


def committed_units(run: Location | str) -> dict[str, dict]:
    """{unit: commit record} of every committed unit: what resume skips and audit reads."""
    run = _location(run)
    out = {}
    for item in list_dir(run.child(COMMITS)):
        if item.name.endswith(".json"):
            out[item.name[: -len(".json")]] = json.loads(read_bytes(item))
    return out


def retract_unit(run: Location | str, unit: str) -> None:
    """Undo a unit's commit (with the lease held): its record first, so that from then on its
    published files are leftovers that readers ignore and the next commit overwrites, then
    those files. For a committed unit found broken or stale (a build part whose source tar
    changed): it can then be committed again."""
    run = _location(run)
    record = commit_record(run, unit)
    if record is None:
        return
    delete(_record_of(run, unit))
    for item in record["files"]:
        if exists(run.child(item["name"])):
            delete(run.child(item["name"]))


def fetch_committed(run: Location | str, record: dict, name: str, local_path: str) -> None:
    """Download the committed content of ``name``, a file of the unit ``record`` commits, to
    ``local_path``, checked against the sha256 the record names: the published object, or, while
    the unit is not yet published (its writer was killed between commit and publish), the stage
    the record names. Never a file of another attempt; a reader needs no lease for this."""
    run = _location(run)
    item = next((f for f in record["files"] if f["name"] == name), None)
    if item is None:
        raise StorageError(f"the commit record of {record['unit']} in {run.uri} names no {name}")
    final, staged = run.child(name), run.child(ATTEMPTS, record["unit"], record["attempt"], name)
    # a publisher may copy the object and drop the stage between two looks: look at the final name again
    source = next((loc for loc in (final, staged, final) if exists(loc)), None)
    if source is None:
        raise _lost(final)
    get_file(source, local_path)
    if file_sha256(local_path) != item["sha256"]:
        os.remove(local_path)
        raise StorageError(f"{source.uri} does not match its commit record (sha256 {item['sha256'][:12]}): "
                           f"corrupted or replaced after its unit was committed")


def roll_forward(run: Location | str) -> dict[str, list[str]]:
    """After a crash: publish every committed unit whose stage is still there (its writer died
    mid-publication) and delete every attempt that never committed. Call with the lease held."""
    run = _location(run)
    commits = committed_units(run)
    published, dropped = [], []
    for item in list_dir(run.child(ATTEMPTS), recursive=True):
        relative = item.path[len(run.child(ATTEMPTS).path) + 1:].split("/")
        unit, attempt = relative[0], relative[1]
        if unit in commits and commits[unit]["attempt"] == attempt:
            if unit not in published:
                _publish(run, commits[unit])
                published.append(unit)
        elif exists(item):
            delete(item)
            if unit not in dropped:
                dropped.append(unit)
    return {"published": published, "dropped": dropped}


__all__ = ["COMMITS", "ATTEMPTS", "LEASE", "Lease", "check_conditional_writes", "open_run", "check_lease_free", "LeaseHeld", "LeaseLost", "acquire_lease", "commit_unit", "commit_record", "committed_units", "retract_unit",
           "create_only", "fetch_committed", "read_with_etag", "replace_if", "roll_forward"]
