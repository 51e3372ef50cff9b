"""A node-local cache of files that live on an object store, checked against known sha256s.

    <cache>/<namespace>/<key>/<relative path>      e.g. indexes/<manifest sha256>/shards/shard-00000.faiss

The cache directory is ``SPELLSHIELD_CACHE_DIR``, else ``$XDG_CACHE_HOME/spellshield``, else
``~/.cache/spellshield``. Each Ray node fills its own. A file enters the cache only after its
download matched the expected sha256 (a mismatch fails closed: nothing is cached, the caller
gets a StorageError); a file already there was checked when it entered, so a warm node
downloads nothing. The key (for an index, the sha256 of its manifest) changes with the content,
so a cached copy is never stale. Processes of one node that fill the same entry at once take
turns on a file lock instead of downloading twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from .fs import Location, StorageError, file_sha256, get_file, is_remote, resolve, storage_error

CACHE_ENV = "SPELLSHIELD_CACHE_DIR"


def cache_root(cache_dir: str | None = None) -> str:
    if cache_dir:
        return os.path.abspath(os.path.expanduser(cache_dir))
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "spellshield")


@dataclass
class Fetched:
    directory: str  # the local copy: <cache>/<namespace>/<key>
    downloaded: list[str] = field(default_factory=list)  # relative paths fetched by this call
    reused: list[str] = field(default_factory=list)  # relative paths already in the cache


def fetch_verified(source: Location | str, files: dict[str, str | int], key: str, namespace: str,
                   cache_dir: str | None = None, last: tuple[str, bytes] | None = None) -> Fetched:
    """Copy ``files`` ({relative path: sha256, or size in bytes where no sha256 is recorded})
    from under ``source`` into the cache entry ``key``.

    ``last`` (relative path, bytes) is written after all of them: the file that makes the
    entry a complete directory (an index's manifest). Returns what was downloaded and reused.
    """
    source = source if isinstance(source, Location) else resolve(source)
    directory = os.path.join(cache_root(cache_dir), namespace, key)
    os.makedirs(directory, exist_ok=True)
    result = Fetched(directory)
    with open(os.path.join(directory, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for relative, expected in sorted(files.items()):
            target = os.path.join(directory, *relative.split("/"))
            if os.path.isfile(target):
                result.reused.append(relative)
                continue
            tmp = f"{target}.download-{os.getpid()}"
            get_file(source.child(relative), tmp)
            if isinstance(expected, int):
                actual, what = os.path.getsize(tmp), "size"
            else:
                actual, what = file_sha256(tmp), "sha256"
            if actual != expected:
                os.remove(tmp)
                raise StorageError(f"{source.child(relative).uri} does not match its {what} (expected {str(expected)[:12]}, "
                                   f"got {str(actual)[:12]}): corrupted or replaced; not cached")
            os.replace(tmp, target)
            result.downloaded.append(relative)
        if last is not None:
            name, data = last
            target = os.path.join(directory, name)
            if not os.path.isfile(target):
                tmp = f"{target}.download-{os.getpid()}"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, target)
    return result


def fetch_tree(source: Location | str, namespace: str, cache_dir: str | None = None) -> Fetched:
    """Every file under ``source`` (a model directory) into the cache, checked by size.

    The entry's key hashes the listing (relative names, sizes, modification times), so a
    re-uploaded model gets a new entry instead of a mix of old and new files.
    """
    source = source if isinstance(source, Location) else resolve(source)
    try:
        infos = source.fs.get_file_info(pafs.FileSelector(source.path, recursive=True))
    except FileNotFoundError:
        raise StorageError(f"{source.uri} does not exist") from None
    except OSError as exc:
        raise storage_error(exc, source, "list") from None
    base = source.path.rstrip("/") + "/"
    files = {i.path[len(base):]: int(i.size) for i in infos if i.type == pafs.FileType.File}
    if not files:
        raise StorageError(f"{source.uri} holds no files")
    listing = "\n".join(f"{name}\t{files[name]}\t{i.mtime_ns}" for name, i in
                        sorted((i.path[len(base):], i) for i in infos if i.type == pafs.FileType.File))
    return fetch_verified(source, files, hashlib.sha256(listing.encode()).hexdigest(), namespace, cache_dir)


def local_dir(path: str, namespace: str = "models", cache_dir: str | None = None) -> str:
    """``path`` itself when local; for an object-store URI, this node's cached copy of it."""
    return fetch_tree(path, namespace, cache_dir).directory if is_remote(path) else path
