"""An index on object storage is searched from a node-local copy (``storage.cache``).

    local_index_dir("s3://bucket/index")  -> ~/.cache/spellshield/indexes/<manifest sha256>

Only the files a searcher serves are fetched (every shard, or the shard servers' ``shards``),
each checked against the sha256 its manifest records before it enters the cache; a mismatch
fails closed with an IndexFormatError, as a corrupted local index does. The entry is keyed by the
manifest's sha256, so a rebuilt index never meets a stale copy, and a warm node (a later run,
another job, a restarted actor) downloads nothing. A local path is returned as it is.
"""

from __future__ import annotations

import hashlib
import json

from spellshield import storage
from spellshield.storage.cache import Fetched, fetch_verified

from .manifest import MANIFEST, IndexFormatError, Manifest

NAMESPACE = "indexes"


def read_remote_manifest(index: str) -> tuple[bytes, Manifest]:
    """The manifest of an index on object storage: its bytes (hashed for the cache key) and content."""
    try:
        manifest_location = storage.resolve(index).child(MANIFEST)
        storage.probe(manifest_location)  # unreachable store, refused credentials, missing bucket: say which
        if not storage.exists(manifest_location):
            raise IndexFormatError(f"{storage.resolve(index).uri} is not a finished index: no {MANIFEST}")
        data = storage.read_bytes(manifest_location)
    except storage.StorageError as exc:
        raise IndexFormatError(str(exc)) from None
    try:
        return data, Manifest.from_json(json.loads(data))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise IndexFormatError(f"{manifest_location.uri} is not a valid manifest: {exc}") from None


def fetch_index(index: str, shards=None, cache_dir: str | None = None, extras: tuple[str, ...] = ()) -> Fetched:
    """Fill this node's cache with the manifest and the files of ``shards`` (default all) of ``index``.

    ``extras``: other files of the index the caller needs (``index verify``: rejects.parquet),
    which the manifest holds no sha256 of: checked by size, then by the caller.
    """
    data, manifest = read_remote_manifest(index)
    location = storage.resolve(index)
    try:
        selected = manifest.shards if shards is None else [manifest.shards[n] for n in shards]
        files = {}
        for shard in selected:
            files[shard.file] = shard.sha256
            files[shard.ids_file] = shard.ids_sha256
        files.update(manifest.listed_files)  # the judges' calibration, read by every generation worker
        for name in extras:
            files[name] = storage.size(location.child(name))
        return fetch_verified(location, files, key=hashlib.sha256(data).hexdigest(), namespace=NAMESPACE,
                              cache_dir=cache_dir, last=(MANIFEST, data))
    except storage.StorageError as exc:
        raise IndexFormatError(str(exc)) from None


DERIVED_PREFIX = "projection-"  # project-index's files beside an index: the projected and ivf backends'
DERIVED_BACKENDS = ("projected", "ivf")


def derived_files(index: str) -> tuple[str, ...]:
    """Relative names of the files ``project-index`` uploaded beside an index on object storage
    (``projection-<d>/...``, with its inverted files); their own metadata anchors them to the
    manifest's sha256 and the ivf files carry checksums, so the cache checks them by size."""
    location = storage.resolve(index)
    base = location.path.rstrip("/") + "/"
    names = (item.path[len(base):] for item in storage.list_dir(location, recursive=True))
    return tuple(name for name in names if name.startswith(DERIVED_PREFIX))


def local_index_dir(index: str, shards=None, cache_dir: str | None = None, extras: tuple[str, ...] = (),
                    backend: str = "exact") -> str:
    """A local directory to search ``index`` from: ``index`` itself, or its verified cached copy
    (with project-index's files when ``backend`` reads them)."""
    if not storage.is_remote(index):
        return index
    if backend in DERIVED_BACKENDS:
        try:
            extras = tuple(extras) + derived_files(index)
        except storage.StorageError as exc:
            raise IndexFormatError(str(exc)) from None
    return fetch_index(index, shards, cache_dir, extras).directory
