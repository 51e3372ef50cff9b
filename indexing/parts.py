"""The staging area of a build: one part per source tar, written once, checked by checksum.

A build encodes its corpus into ``<out>.partial/parts/`` before it assembles any FAISS shard:

    <out>.partial/build.json                  the build's config: what the parts depend on
    <out>.partial/parts/part-00003.latents    raw little-endian latents of the indexed samples of
                                              source tar 3, in tar order (n x dim, float32 or float16)
    <out>.partial/parts/part-00003.rows.parquet  key, shard, sha256, reason of every sample of the
                                              tar, in tar order (reason "" = indexed, in latent order)
    <out>.partial/parts/part-00003.json       written last: count, rejects, dtype, dim, sha256 of the
                                              two files and of the source tar as it was read.
                                              Its presence marks the part finished.

A rerun with the same config keeps every finished part whose checksums still hold *and whose
source tar still has the sha256 it had when it was read* (resume by content, not by size: a tar
replaced by other bytes of the same length between a crash and the rerun is encoded again), and
encodes only the other tars (img2dataset's resume-by-what-exists; FAISS big_batch_search's
write-then-rename checkpoints). Part names depend only on the tar's position in the corpus, so
a rerun overwrites instead of duplicating, and global ids (assigned at assembly, in part order)
are the same whether or not the build was interrupted.

An OUT on an object store has the same parts, committed through the commit protocol of
``storage.commit`` instead of renamed (``StagedParts``, docs/storage.md).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spellshield import storage

from .corpus import DEFAULT_MAX_MEMBER_BYTES
from .manifest import file_sha256, write_json_atomic

PARTS = "parts"
BUILD_CONFIG = "build.json"

ROWS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("reason", pa.string(), metadata={"description": "empty when indexed, else why not"}),
    ]
)


class PartialBuildError(ValueError):
    """A ``<out>.partial`` left by a build with another config: resuming it would mix indexes."""


@dataclass(frozen=True)
class BuildConfig:
    """Everything a part's content depends on. Batch size and worker counts are not in it."""

    sources: tuple[tuple[str, int], ...]  # (absolute path, size in bytes) of each tar, corpus order; only
    # the paths must match to resume: content is checked per part (finished_parts)
    encoder: str
    fingerprint: str
    resolution: int
    min_size: int
    dtype: str
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES

    def to_json(self) -> dict:
        d = asdict(self)
        d["sources"] = [list(s) for s in self.sources]
        return d

    @staticmethod
    def from_json(d: dict) -> "BuildConfig":
        return BuildConfig(**{**d, "sources": tuple((str(p), int(n)) for p, n in d["sources"])})

    def difference(self, other: "BuildConfig") -> str | None:
        """A short description of the first field that differs, or None."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine == theirs:
                continue
            if f.name == "sources":
                # The corpus is the same list of tar paths; a tar whose bytes changed (size or
                # content) is not another config: its part fails the content check and is re-encoded.
                if len(mine) != len(theirs):
                    return f"corpus has {len(mine)} shards, the partial build {len(theirs)}"
                for (p, _), (q, _) in zip(mine, theirs):
                    if p != q:
                        return f"corpus shard {p} is {q} in the partial build"
                continue
            return f"{f.name} is {mine!r}, the partial build's is {theirs!r}"
        return None


def sources_of(paths: list[str]) -> tuple[tuple[str, int], ...]:
    """(absolute path or canonical URI, size) of each tar: ``storage`` knows both kinds (issue 9)."""
    return tuple((storage.resolve(p).uri, storage.size(p)) for p in paths)


def check_staging(partial_dir: str, config: BuildConfig) -> bool:
    """True when ``partial_dir`` holds a partial build of ``config`` (resume), False when there is none.

    Raises PartialBuildError, naming the difference, for a partial build of another config.
    Reads only; ``open_staging`` creates.
    """
    path = os.path.join(partial_dir, BUILD_CONFIG)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                previous = BuildConfig.from_json(json.load(f))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise PartialBuildError(f"{partial_dir} holds an unreadable {BUILD_CONFIG} ({exc}); remove it to start over") from None
        difference = config.difference(previous)
        if difference:
            raise PartialBuildError(f"{partial_dir} holds a partial build with another config ({difference}); "
                                    f"rerun with the same arguments or remove it")
        return True
    if os.path.isdir(partial_dir) and os.listdir(partial_dir):
        raise PartialBuildError(f"{partial_dir} exists but is not a partial build (no {BUILD_CONFIG}); remove it")
    return False


def open_staging(partial_dir: str, config: BuildConfig) -> bool:
    """``check_staging``, then create the staging directory if new. Returns True when resuming."""
    resuming = check_staging(partial_dir, config)
    os.makedirs(os.path.join(partial_dir, PARTS), exist_ok=True)
    if not resuming:
        write_json_atomic(os.path.join(partial_dir, BUILD_CONFIG), config.to_json())
    return resuming


@dataclass(frozen=True)
class PartInfo:
    number: int
    source: str
    count: int  # indexed samples: rows of the latents file
    rejects: int
    dim: int
    dtype: str
    latents_sha256: str
    rows_sha256: str
    source_sha256: str = ""  # of the whole source tar as read; "" (a part of an older build): re-encoded

    def to_json(self) -> dict:
        return asdict(self)


def part_paths(parts_dir: str, number: int) -> tuple[str, str, str]:
    stem = os.path.join(parts_dir, f"part-{number:05d}")
    return stem + ".latents", stem + ".rows.parquet", stem + ".json"


class PartWriter:
    """Append one tar's samples in order; ``finish`` makes the part durable and visible."""

    def __init__(self, parts_dir: str, number: int, source: str, dim: int, dtype: str):
        self.parts_dir = parts_dir
        self.number = number
        self.source = source
        self.dim = dim
        self.dtype = np.dtype(dtype)
        self.latents_path, self.rows_path, self.info_path = part_paths(parts_dir, number)
        self._tmp = f"{self.latents_path}.tmp-{os.getpid()}"
        self._file = open(self._tmp, "wb")
        self._digest = hashlib.sha256()
        self._rows: dict[str, list] = {"key": [], "shard": [], "sha256": [], "reason": []}
        self.count = 0

    def add(self, keys, shards, sha256s, reasons, latents: np.ndarray) -> None:
        """``latents``: one row per sample whose reason is "", in order."""
        indexed = sum(1 for r in reasons if r == "")
        latents = np.ascontiguousarray(latents, dtype=self.dtype.newbyteorder("<")).reshape(indexed, self.dim)
        data = latents.tobytes()
        self._file.write(data)
        self._digest.update(data)
        self.count += indexed
        for name, values in (("key", keys), ("shard", shards), ("sha256", sha256s), ("reason", reasons)):
            self._rows[name].extend(str(v) for v in values)

    def finish(self, source_sha256: str) -> PartInfo:
        """``source_sha256``: of the tar whose samples were added (``read_chunks`` computes it as it reads)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        tmp_rows = f"{self.rows_path}.tmp-{os.getpid()}"
        pq.write_table(pa.table(self._rows, schema=ROWS_SCHEMA), tmp_rows)
        os.replace(tmp_rows, self.rows_path)
        os.replace(self._tmp, self.latents_path)
        info = PartInfo(number=self.number, source=self.source, count=self.count,
                        rejects=sum(1 for r in self._rows["reason"] if r != ""), dim=self.dim, dtype=self.dtype.name,
                        latents_sha256=self._digest.hexdigest(), rows_sha256=file_sha256(self.rows_path),
                        source_sha256=source_sha256)
        write_json_atomic(self.info_path, info.to_json())  # last: the part now exists
        return info

    def abort(self) -> None:
        self._file.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


def source_sha256(source: str) -> str | None:
    """sha256 of a corpus tar as it is now (None if it is gone): a local file, or an object-store
    object streamed once (a reused part of a remote corpus costs one read of its tar)."""
    if storage.is_remote(source):
        try:
            digest = hashlib.sha256()
            with storage.open_input_stream(source) as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest()
        except storage.StorageError:
            return None
    return file_sha256(source) if os.path.isfile(source) else None


def finished_parts(parts_dir: str, config: BuildConfig, dim: int, changed: list | None = None) -> dict[int, PartInfo]:
    """Parts whose marker, sizes and checksums hold and whose source tar's sha256 is still the
    one recorded; anything else of theirs is deleted. The sources of parts dropped because their
    tar's content changed are appended to ``changed``, if given.

    Temporary files of an interrupted writer are removed too, so the tars they belong to are
    simply encoded again. Every reused tar is read once here to checksum it.
    """
    for tmp in glob.glob(os.path.join(parts_dir, "*.tmp-*")):
        os.remove(tmp)
    good: dict[int, PartInfo] = {}
    for number, (source, _) in enumerate(config.sources):
        latents_path, rows_path, info_path = part_paths(parts_dir, number)
        info = _valid_part(latents_path, rows_path, info_path, number, source, config.dtype, dim)
        if info is not None and source_sha256(source) != info.source_sha256:
            if changed is not None:
                changed.append(source)
            info = None
        if info is None:
            for path in (info_path, latents_path, rows_path):
                if os.path.exists(path):
                    os.remove(path)
        else:
            good[number] = info
    return good


def _valid_part(latents_path, rows_path, info_path, number, source, dtype, dim) -> PartInfo | None:
    try:
        with open(info_path) as f:
            info = PartInfo(**json.load(f))
    except (OSError, json.JSONDecodeError, TypeError):
        return None
    itemsize = np.dtype(dtype).itemsize
    if (info.number, info.source, info.dtype, info.dim) != (number, source, dtype, dim):
        return None
    if not os.path.isfile(latents_path) or os.path.getsize(latents_path) != info.count * dim * itemsize:
        return None
    if not os.path.isfile(rows_path) or file_sha256(rows_path) != info.rows_sha256:
        return None
    if file_sha256(latents_path) != info.latents_sha256:
        return None
    return info


def iter_part(parts_dir: str, info: PartInfo, rows_per_read: int = 8192):
    """(rows: dict of lists, latents: ndarray) in tar order, ``rows_per_read`` samples at a time.

    ``latents`` holds the rows of the samples whose reason is "" only. Latents are memory-mapped,
    so a part of any size is read in bounded memory.
    """
    latents_path, rows_path, _ = part_paths(parts_dir, info.number)
    latents = np.memmap(latents_path, dtype=np.dtype(info.dtype).newbyteorder("<"), mode="r",
                        shape=(info.count, info.dim)) if info.count else np.empty((0, info.dim), info.dtype)
    position = 0
    for batch in pq.ParquetFile(rows_path).iter_batches(batch_size=rows_per_read):
        rows = batch.to_pydict()
        indexed = sum(1 for r in rows["reason"] if r == "")
        yield rows, np.asarray(latents[position : position + indexed])
        position += indexed
    if position != info.count:
        raise ValueError(f"part {info.number}: rows name {position} indexed samples, its latents hold {info.count}")


def part_unit(number: int) -> str:
    """The part's name as a unit of the commit protocol (and the stem of its files)."""
    return f"part-{number:05d}"


class StagedParts:
    """The parts of a build whose OUT is on an object store, staged at ``OUT.partial`` through
    the commit protocol of ``storage.commit`` (docs/storage.md), so that a build killed on one
    machine resumes on another and a part is committed at most once, whole:

        OUT.partial/build.json                          the build's config
        OUT.partial/_lease.json                         the build driver's lease: a second driver is refused
        OUT.partial/_attempts/part-N/<attempt>/parts/   a part being staged; never read, dropped on resume
        OUT.partial/_commits/part-N.json                create-only: part N is committed, naming its files' sha256
        OUT.partial/parts/part-N.{latents,rows.parquet,json}   its published files

    The driver works in a local copy (``local_partial``) holding only committed parts:
    ``open`` takes the lease and rolls forward (publishes a committed part whose publication a
    killed driver left half done, deletes uncommitted attempts), then fetches ``build.json`` and
    the committed parts; ``push`` commits a part the driver just finished.
    """

    def __init__(self, remote_partial: str, local_partial: str):
        self.remote = storage.resolve(remote_partial)
        self.local = local_partial
        self.lease = None
        self.committed: dict[str, dict] = {}

    def open(self) -> None:
        from spellshield.storage.commit import committed_units, fetch_committed, open_run

        self.lease = open_run(self.remote)  # LeaseHeld while another build driver is alive
        if storage.exists(self.remote.child(BUILD_CONFIG)):
            storage.get_file(self.remote.child(BUILD_CONFIG), os.path.join(self.local, BUILD_CONFIG))
        self.committed = committed_units(self.remote)
        for record in self.committed.values():
            for item in record["files"]:
                try:  # each file checked against the sha256 its commit record names
                    fetch_committed(self.remote, record, item["name"], os.path.join(self.local, *item["name"].split("/")))
                except storage.StorageError:
                    break  # a part that does not hold: finished_parts drops it, retract_all_but un-commits it

    def publish_config(self) -> None:
        """``build.json`` on the store, if it has none yet (a new build)."""
        if not storage.exists(self.remote.child(BUILD_CONFIG)):
            storage.put_file(os.path.join(self.local, BUILD_CONFIG), self.remote.child(BUILD_CONFIG))

    def retract_all_but(self, kept: dict[int, "PartInfo"]) -> None:
        """Undo the commits of the parts ``finished_parts`` did not keep (their tar changed, or
        their files do not match their checksums), so that they can be committed again."""
        from spellshield.storage.commit import retract_unit

        keep = {part_unit(n) for n in kept}
        for unit in sorted(set(self.committed) - keep):
            retract_unit(self.remote, unit)
            del self.committed[unit]

    def push(self, info: "PartInfo") -> None:
        """Commit a finished local part: stage, create-only record, publish with the marker last."""
        from spellshield.storage.commit import LeaseLost, commit_unit

        unit = part_unit(info.number)
        paths = part_paths(os.path.join(self.local, PARTS), info.number)
        if not commit_unit(self.remote, unit, [(f"{PARTS}/{os.path.basename(p)}", p) for p in paths]):
            raise LeaseLost(f"{self.remote.uri}: {unit} was committed by another build driver (this one lost its lease); "
                            f"stopping this build")
        self.committed[unit] = {}

    def close(self) -> None:
        """Release the lease (the staged parts stay for a resume unless the build deleted them)."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None
