"""Writing an index directory: FAISS shards with global ids, id tables, rejects, manifest.

Vectors arrive in corpus order and get consecutive global ids from 0; every ``shard_size``
vectors become one FAISS file plus its id table. The storage type is the manifest's ``dtype``:

    float32   IndexIDMap2(IndexFlatL2(d))
    float16   IndexIDMap2(IndexScalarQuantizer(d, QT_fp16, METRIC_L2)); its reconstructed vectors
              are the latents rounded to float16 (round to nearest even, as numpy's astype), and
              those are the stored truth every exact re-check uses.

Memory is one shard (``shard_size x d`` stored values, plus FAISS's growth slack), never the
corpus: vectors go straight into the shard's FAISS index, which is written and dropped when full.
Everything is written under a staging directory (default ``<out>.partial/``) that is renamed to
``<out>`` only when the manifest is complete, so a reader never sees a half-written index.
"""

from __future__ import annotations

import os
import shutil
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .corpus import CorpusError
from .latent import LatentSpec
from .manifest import MANIFEST, REJECTS, Manifest, ShardInfo, file_sha256, write_json_atomic
from .store import DTYPES  # storage dtype name -> numpy type, declared once

IDS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), metadata={"description": "global id of the vector in the FAISS shard"}),
        pa.field("key", pa.string(), metadata={"description": "WebDataset key of the corpus sample"}),
        pa.field("shard", pa.string(), metadata={"description": "source tar the sample came from"}),
        pa.field("sha256", pa.string(), metadata={"description": "sha256 of the image bytes"}),
    ]
)
REJECTS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), metadata={"description": "WebDataset key, '*' when the tar broke before one"}),
        pa.field("shard", pa.string(), metadata={"description": "source tar"}),
        pa.field("reason", pa.string(), metadata={"description": "why the sample is not indexed"}),
    ]
)


def write_parquet_atomic(table: pa.Table, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def shard_names(number: int) -> tuple[str, str]:
    return f"shards/shard-{number:05d}.faiss", f"shards/ids-{number:05d}.parquet"


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"latent dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def new_shard_index(dim: int, dtype: str):
    """The empty FAISS index of one shard for this storage dtype (see the module doc)."""
    if check_dtype(dtype) == "float16":
        base = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
    else:
        base = faiss.IndexFlatL2(dim)
    return faiss.IndexIDMap2(base)


class ShardSink:
    """Vectors in corpus order -> FAISS shard files of ``shard_size`` with consecutive global ids."""

    def __init__(self, index_dir: str, dim: int, dtype: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {shard_size}")
        self.index_dir = index_dir
        self.dim = dim
        self.dtype = check_dtype(dtype)
        self.shard_size = shard_size
        self.shards: list[ShardInfo] = []
        self.count = 0
        self._index = None
        self._columns: dict[str, list] = {"key": [], "shard": [], "sha256": []}
        os.makedirs(os.path.join(index_dir, "shards"), exist_ok=True)

    def add(self, keys, shards, sha256, vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors).reshape(len(keys), -1)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {vectors.shape[1]}, the latent spec says {self.dim}")
        if self.dtype == "float16":
            # Round here, whatever the caller passed, so that the stored values are fp16 by rule.
            vectors = vectors.astype(np.float16)
        start = 0
        while start < len(keys):
            if self._index is None:
                self._index = new_shard_index(self.dim, self.dtype)
            take = min(len(keys) - start, self.shard_size - self._index.ntotal)
            first = self.count + self._index.ntotal
            block = np.ascontiguousarray(vectors[start : start + take], dtype=np.float32)
            self._index.add_with_ids(block, np.arange(first, first + take, dtype=np.int64))
            self._columns["key"].extend(str(k) for k in keys[start : start + take])
            self._columns["shard"].extend(str(s) for s in shards[start : start + take])
            self._columns["sha256"].extend(str(h) for h in sha256[start : start + take])
            start += take
            if self._index.ntotal == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        index = self._index
        if index is None or index.ntotal == 0:
            return
        n = index.ntotal
        ids = np.arange(self.count, self.count + n, dtype=np.int64)
        number = len(self.shards)
        faiss_name, ids_name = shard_names(number)
        faiss_path = os.path.join(self.index_dir, faiss_name)
        ids_path = os.path.join(self.index_dir, ids_name)
        faiss.write_index(index, faiss_path + ".tmp")
        os.replace(faiss_path + ".tmp", faiss_path)
        write_parquet_atomic(pa.table({"id": ids, **self._columns}, schema=IDS_SCHEMA), ids_path)
        self.shards.append(ShardInfo(file=faiss_name, ids_file=ids_name, count=n, first_id=int(ids[0]),
                                     last_id=int(ids[-1]), sha256=file_sha256(faiss_path), ids_sha256=file_sha256(ids_path)))
        self.count += n
        self._index = None
        self._columns = {"key": [], "shard": [], "sha256": []}

    def close(self) -> list[ShardInfo]:
        self._flush()
        return self.shards


class RejectSink:
    """Reject rows streamed to ``rejects.parquet`` in row groups: memory stays bounded."""

    def __init__(self, path: str, rows_per_group: int = 10_000):
        self.path = path
        self.count = 0
        self._tmp = f"{path}.tmp-{os.getpid()}"
        self._writer = pq.ParquetWriter(self._tmp, REJECTS_SCHEMA)
        self._rows: list[dict] = []
        self._rows_per_group = rows_per_group
        self.first_reason: str | None = None

    def add(self, key: str, shard: str, reason: str) -> None:
        self._rows.append({"key": key, "shard": shard, "reason": reason})
        self.first_reason = self.first_reason or reason
        self.count += 1
        if len(self._rows) >= self._rows_per_group:
            self._write()

    def _write(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=REJECTS_SCHEMA))
            self._rows = []

    def close(self) -> None:
        self._write()
        self._writer.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._writer.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


class IndexWriter:
    """Accumulate vectors in corpus order into an index directory, published on ``finish``.

    ``staging_dir`` (default ``<out>.partial``) is emptied first and renamed to ``<out>`` when
    the manifest is written.
    """

    def __init__(self, out_dir: str, latent: LatentSpec, shard_size: int = 100_000, dtype: str = "float32",
                 staging_dir: str | None = None):
        if shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {shard_size}")
        self.out_dir = os.path.abspath(out_dir)
        self.partial_dir = os.path.abspath(staging_dir) if staging_dir else self.out_dir + ".partial"
        self.latent = latent
        self.dtype = check_dtype(dtype)
        self._started = time.time()
        if os.path.exists(self.partial_dir):
            shutil.rmtree(self.partial_dir)
        os.makedirs(self.partial_dir)
        self._sink = ShardSink(self.partial_dir, latent.dim, dtype, shard_size)
        self._rejects = RejectSink(os.path.join(self.partial_dir, REJECTS))

    @property
    def count(self) -> int:
        return self._sink.count + (self._sink._index.ntotal if self._sink._index is not None else 0)

    def add(self, keys, shards, sha256, vectors: np.ndarray) -> None:
        self._sink.add(keys, shards, sha256, vectors)

    def reject(self, key: str, shard: str, reason: str) -> None:
        self._rejects.add(key, shard, reason)

    def abort(self) -> None:
        self._rejects.abort()
        shutil.rmtree(self.partial_dir, ignore_errors=True)

    def finish(self, build_info: dict, calibrate=None) -> Manifest:
        """Flush, write rejects and manifest, then rename the staging directory to ``<out>``.

        The manifest's ``build`` gets ``seconds`` (from this writer's creation to the last shard)
        and, with ``calibrate``, ``calibrate_seconds``.

        ``calibrate(staging_dir, manifest) -> dict`` may add nearest-neighbour quantiles; it
        runs before the rename so that the published index is complete.
        """
        shards = self._sink.close()
        if self._sink.count == 0:
            rejected, first = self._rejects.count, self._rejects.first_reason or "no samples"
            self.abort()
            raise CorpusError(f"corpus has no indexable image ({rejected} rejected; first: {first})")
        self._rejects.close()
        info = {**build_info, "seconds": round(time.time() - self._started, 3)}
        manifest = Manifest(latent=self.latent, count=self._sink.count, shards=tuple(shards), dtype=self.dtype,
                            build=info, rejects=self._rejects.count)
        if calibrate is not None:
            started = time.time()
            calibration = calibrate(self.partial_dir, manifest)
            info["calibrate_seconds"] = round(time.time() - started, 3)
            manifest = Manifest(**{**manifest.__dict__, "calibration": calibration, "build": info})
        write_json_atomic(os.path.join(self.partial_dir, MANIFEST), manifest.to_json())
        if os.path.exists(self.out_dir):
            # Only an empty directory may be replaced; the CLI refuses a finished index earlier.
            os.rmdir(self.out_dir)
        os.replace(self.partial_dir, self.out_dir)
        return manifest


def assemble_parts(parts_dir: str, parts: list, writer: IndexWriter) -> None:
    """Feed finished parts (``indexing.parts.PartInfo``), in corpus order, into ``writer``.

    Streams part by part and a few thousand rows at a time (the latents are memory-mapped), so
    memory is the writer's one open shard whatever the corpus size.
    """
    from .parts import iter_part

    for info in sorted(parts, key=lambda p: p.number):
        for rows, latents in iter_part(parts_dir, info):
            indexed = [i for i, reason in enumerate(rows["reason"]) if reason == ""]
            if indexed:
                writer.add([rows["key"][i] for i in indexed], [rows["shard"][i] for i in indexed],
                           [rows["sha256"][i] for i in indexed], latents)
            for key, shard, reason in zip(rows["key"], rows["shard"], rows["reason"]):
                if reason != "":
                    writer.reject(key, shard, reason)
