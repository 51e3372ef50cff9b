"""The index directory's manifest.json: what the index holds and how to check it.

    manifest.json                 this file
    shards/shard-00000.faiss      one FAISS index per shard, ids are global int64
    shards/ids-00000.parquet      id (int64), key, shard (source tar), sha256 (of the image bytes)
    rejects.parquet               every corpus sample not indexed, with its reason
    judges-<sha256[:16]>.json     the judges' calibration (workers.final_check), listed with its
                                  sha256 in ``calibration["judges"]`` and checked on every read
    descriptors-<sha256[:16]>.npy with a descriptor judge: every protected image's descriptor,
                                  listed in ``calibration["judges"]["files"]``
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field


from .latent import LatentSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REJECTS = "rejects.parquet"
JUDGES = "judges-{}.json"  # named by its content: a new one never replaces the file an older manifest lists


class IndexFormatError(ValueError):
    """An index directory that is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the index directory
    ids_file: str
    count: int
    first_id: int
    last_id: int
    sha256: str  # of the .faiss file
    ids_sha256: str


@dataclass(frozen=True)
class Manifest:
    latent: LatentSpec
    count: int
    shards: tuple[ShardInfo, ...]
    metric: str = "l2"
    dtype: str = "float32"
    calibration: dict = field(default_factory=dict)
    build: dict = field(default_factory=dict)
    rejects: int = 0
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "latent": self.latent.to_json(),
            "metric": self.metric,
            "dtype": self.dtype,
            "count": self.count,
            "shards": [dict(s.__dict__) for s in self.shards],
            "calibration": self.calibration,
            "build": self.build,
            "rejects": self.rejects,
        }

    @staticmethod
    def from_json(d: dict) -> "Manifest":
        if d.get("format_version") != FORMAT_VERSION:
            raise IndexFormatError(f"unsupported index format version {d.get('format_version')!r}")
        return Manifest(
            latent=LatentSpec.from_json(d["latent"]),
            count=int(d["count"]),
            shards=tuple(ShardInfo(**s) for s in d["shards"]),
            metric=d.get("metric", "l2"),
            dtype=d.get("dtype", "float32"),
            calibration=d.get("calibration", {}),
            build=d.get("build", {}),
            rejects=int(d.get("rejects", 0)),
        )

    @property
    def suggested_radius(self) -> float | None:
        value = self.calibration.get("suggested_radius")
        return float(value) if value is not None else None

    @property
    def judges_file(self) -> tuple[str, str] | None:
        """(file, sha256) of the judges' calibration, when the index has one."""
        entry = self.calibration.get("judges") or {}
        return (entry["file"], entry["sha256"]) if entry.get("file") and entry.get("sha256") else None

    @property
    def listed_files(self) -> dict[str, str]:
        """{file: sha256} of the files beside the shards that the manifest lists: the judges'
        calibration and the files it uses (a descriptor judge's protected descriptors)."""
        if not self.judges_file:
            return {}
        return {**dict([self.judges_file]), **(self.calibration["judges"].get("files") or {})}


def file_sha256(path: str) -> str:
    """sha256 of a local file (its home is the storage layer; imported on use, so that the search
    modules load with torch and numpy alone: benchmarks/gpu_search.py runs without pyarrow)."""
    from spellshield.storage import file_sha256 as sha256_of_file

    return sha256_of_file(path)


def is_remote(path: str) -> bool:
    from spellshield.storage import is_remote as remote

    return remote(path)


def read_manifest(index_dir: str) -> Manifest:
    if is_remote(index_dir):  # s3://, gs:// (issue 9): reads the manifest only, no shard
        from .index_cache import read_remote_manifest

        return read_remote_manifest(index_dir)[1]
    path = os.path.join(index_dir, MANIFEST)
    if not os.path.isdir(index_dir):
        raise IndexFormatError(f"index directory {index_dir} does not exist")
    if not os.path.isfile(path):
        raise IndexFormatError(f"{index_dir} is not a finished index: no {MANIFEST}")
    try:
        with open(path) as f:
            return Manifest.from_json(json.load(f))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise IndexFormatError(f"{path} is not a valid manifest: {exc}") from None


def manifest_hash(index_dir: str) -> str:
    if is_remote(index_dir):
        from .index_cache import read_remote_manifest

        return hashlib.sha256(read_remote_manifest(index_dir)[0]).hexdigest()
    with open(os.path.join(index_dir, MANIFEST), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_listed_bytes(index_dir: str, pattern: str, data: bytes) -> dict:
    """Write ``data`` as ``index_dir/<pattern with the first 16 hex digits of its sha256>``
    (atomically); returns its manifest entry {file, sha256}. Named by content, so that a manifest
    not yet rewritten still finds the file it lists (an interrupted ``index calibrate``)."""
    digest = hashlib.sha256(data).hexdigest()
    name = pattern.format(digest[:16])
    write_bytes_atomic(os.path.join(index_dir, name), data)
    return {"file": name, "sha256": digest}


def write_listed_json(index_dir: str, pattern: str, payload: dict) -> dict:
    return write_listed_bytes(index_dir, pattern, (json.dumps(payload, indent=2) + "\n").encode())


def read_listed_bytes(index_dir: str, name: str, sha256: str) -> bytes:
    """A file the manifest lists, read (local or s3://, gs://) and checked against its sha256:
    missing or changed fails closed with an IndexFormatError, as a changed shard does."""
    where = f"{index_dir.rstrip('/')}/{name}"
    try:
        if is_remote(index_dir):
            from spellshield import storage

            data = storage.read_bytes(storage.resolve(index_dir).child(name))
        else:
            with open(os.path.join(index_dir, name), "rb") as f:
                data = f.read()
    except (OSError, ValueError) as exc:  # storage.StorageError is a ValueError
        raise IndexFormatError(f"index file {where} cannot be read ({exc}): refusing to use the index") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise IndexFormatError(f"index file {where} does not match its sha256 in the manifest (corrupted or replaced)")
    return data


def read_listed_json(index_dir: str, name: str, sha256: str) -> dict:
    data = read_listed_bytes(index_dir, name, sha256)
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise IndexFormatError(f"index file {index_dir.rstrip('/')}/{name} is not valid JSON: {exc}") from None


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write to a temporary name beside ``path``, fsync, then rename over it."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, payload: dict) -> None:
    """``payload`` as indented JSON, written atomically (``write_bytes_atomic``)."""
    write_bytes_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


