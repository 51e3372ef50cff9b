"""Exactly once without rename: create-only writes, a driver lease, and unit commits (docs/storage.md).

An object store has no atomic rename and no directory, but it has two things this builds on:
every object appears whole (a PUT, or a multipart upload's completion), and a *conditional*
PUT (``If-None-Match: *``, create only; ``If-Match: <etag>``, compare-and-swap), which AWS S3,
GCS (generation preconditions) and SeaweedFS honour. pyarrow.fs has no conditional PUT, so the
two conditional calls go through boto3 (the AWS SDK for Python); everything else stays on
pyarrow.fs. On local disk the same calls use ``os.link`` (fails if the name exists) and a lock.

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

from .fs import (Location, StorageError, copy, delete, delete_tree, exists, file_sha256, get_file, list_dir, local_tmp_beside,
                 put_file, read_bytes, resolve, storage_error)

COMMITS = "_commits"  # <run>/_commits/<unit>.json: the unit is committed (create-only)
ATTEMPTS = "_attempts"  # <run>/_attempts/<unit>/<attempt>/<name>: an attempt's staged files


# --------------------------------------------------------------------------------------------
# Conditional writes


def _location(target: Location | str) -> Location:
    return target if isinstance(target, Location) else resolve(target)


def _s3_client():
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise StorageError("create-only writes and leases on s3:// need boto3: pip install 'spellshield[s3]'") from None

    # boto3 reads AWS_ENDPOINT_URL(_S3), the credentials and the region from the environment
    # itself; a custom endpoint without a region gets us-east-1, as in storage.fs.
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client("s3", region_name=region,
                        config=Config(connect_timeout=5, retries={"max_attempts": 3, "mode": "standard"}))


def check_conditional_writes(target: Location | str) -> None:
    """Raise StorageError, before any work, where this module cannot keep its guarantees.

    gs:// has the primitive (``ifGenerationMatch=0`` and ``ifGenerationMatch=<generation>``
    preconditions of the JSON API), but pyarrow's GcsFileSystem does not expose it and no GCS
    client is a dependency yet, so a run or lease on gs:// is refused rather than run without
    at-most-once commits or the second-driver refusal (docs/storage.md)."""
    location = _location(target)
    if location.remote and not location.uri.startswith("s3://"):
        raise StorageError(f"{location.uri}: runs and leases need create-only writes, implemented for s3:// and local "
                           f"paths only (not gs:// yet, see docs/storage.md); write the run to s3:// or a local path")


def _bucket_key(location: Location) -> tuple[str, str]:
    check_conditional_writes(location)
    parsed = urlparse(location.uri)
    return parsed.netloc, parsed.path.lstrip("/")


_BOTO_CODES = {"SignatureDoesNotMatch": "SIGNATURE_DOES_NOT_MATCH", "InvalidAccessKeyId": "INVALID_ACCESS_KEY_ID",
               "AccessDenied": "ACCESS_DENIED", "NoSuchBucket": "NO_SUCH_BUCKET", "NoSuchKey": "NO_SUCH_KEY", "404": "NO_SUCH_KEY"}


def _boto_error(exc: Exception, location: Location, action: str) -> StorageError:
    from botocore.exceptions import ClientError, EndpointConnectionError

    if isinstance(exc, EndpointConnectionError):
        return storage_error(OSError("AWS Error NETWORK_CONNECTION"), location, action)
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        return storage_error(OSError(f"AWS Error {_BOTO_CODES.get(code, code)}"), location, action)
    return storage_error(exc, location, action)


def _s3_put(location: Location, data: bytes, **condition) -> str | None:
    """PUT with a precondition; the new ETag, or None when the precondition failed."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _bucket_key(location)
    try:
        return _s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 412 or exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return None  # 409 ConditionalRequestConflict: a concurrent conditional write won
        raise _boto_error(exc, location, "write") from None
    except BotoCoreError as exc:
        raise _boto_error(exc, location, "write") from None


def read_with_etag(target: Location | str) -> tuple[bytes, str] | None:
    """(content, etag) of the object, or None when there is none. Local etag: the content's sha256."""
    location = _location(target)
    if not location.remote:
        try:
            with open(location.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _bucket_key(location)
    try:
        answer = _s3_client().get_object(Bucket=bucket, Key=key)
        return answer["Body"].read(), answer["ETag"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise _boto_error(exc, location, "read") from None
    except BotoCoreError as exc:
        raise _boto_error(exc, location, "read") from None


def create_only(target: Location | str, data: bytes) -> bool:
    """Write ``data`` at ``target`` unless something is there. True if this call created it.

    The object appears whole (one PUT; locally a hard link of a finished temporary file, which
    fails when the name exists), and of two concurrent callers exactly one gets True.
    """
    location = _location(target)
    if location.remote:
        return _s3_put(location, data, IfNoneMatch="*") is not None
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
        return _s3_put(location, data, IfMatch=etag)
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
    stage = run.child(ATTEMPTS, record["unit"], record["attempt"])
    for item in record["files"]:
        copy(stage.child(item["name"]), run.child(item["name"]))
    delete_tree(stage)


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
        raise StorageError(f"{final.uri} is committed but neither published nor staged (was the stage deleted?)")
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
