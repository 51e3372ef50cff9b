"""Writing an index directory: FAISS shards with global ids, id tables, rejects, manifest.

Vectors arrive in corpus order and get consecutive global ids from 0; every ``shard_size``
vectors become one FAISS ``IndexIDMap2(IndexFlatL2)`` file plus its id table. Everything is
written under ``<out>.partial/`` and the directory is renamed to ``<out>`` only when the
manifest is complete, so a reader never sees a half-written index and a crash leaves the
previous state (nothing, or the partial build) untouched.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .corpus import CorpusError
from .encoders import LatentSpec
from .manifest import MANIFEST, REJECTS, Manifest, ShardInfo, file_sha256, write_json_atomic

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


@dataclass
class _Pending:
    keys: list
    shards: list
    sha256: list
    vectors: list


class IndexWriter:
    """Accumulate vectors in corpus order; flush a FAISS shard every ``shard_size`` vectors."""

    def __init__(self, out_dir: str, latent: LatentSpec, shard_size: int = 100_000):
        if shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {shard_size}")
        self.out_dir = os.path.abspath(out_dir)
        self.partial_dir = self.out_dir + ".partial"
        self.latent = latent
        self.shard_size = shard_size
        self.shards: list[ShardInfo] = []
        self.rejects: list[dict] = []
        self.count = 0
        self._pending = _Pending([], [], [], [])
        self._pending_count = 0
        self._started = time.time()
        if os.path.exists(self.partial_dir):
            shutil.rmtree(self.partial_dir)
        os.makedirs(os.path.join(self.partial_dir, "shards"))

    def add(self, keys, shards, sha256, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(keys), -1)
        if vectors.shape[1] != self.latent.dim:
            raise ValueError(f"vectors have dimension {vectors.shape[1]}, the latent spec says {self.latent.dim}")
        start = 0
        while start < len(keys):
            take = min(len(keys) - start, self.shard_size - self._pending_count)
            p = self._pending
            p.keys.extend(keys[start : start + take])
            p.shards.extend(shards[start : start + take])
            p.sha256.extend(sha256[start : start + take])
            p.vectors.append(vectors[start : start + take])
            self._pending_count += take
            start += take
            if self._pending_count == self.shard_size:
                self._flush()

    def reject(self, key: str, shard: str, reason: str) -> None:
        self.rejects.append({"key": key, "shard": shard, "reason": reason})

    def _flush(self) -> None:
        if self._pending_count == 0:
            return
        p = self._pending
        vectors = np.concatenate(p.vectors)
        ids = np.arange(self.count, self.count + len(vectors), dtype=np.int64)
        index = faiss.IndexIDMap2(faiss.IndexFlatL2(vectors.shape[1]))
        index.add_with_ids(vectors, ids)
        number = len(self.shards)
        faiss_name, ids_name = shard_names(number)
        faiss_path = os.path.join(self.partial_dir, faiss_name)
        ids_path = os.path.join(self.partial_dir, ids_name)
        faiss.write_index(index, faiss_path + ".tmp")
        os.replace(faiss_path + ".tmp", faiss_path)
        table = pa.table({"id": ids, "key": p.keys, "shard": p.shards, "sha256": p.sha256}, schema=IDS_SCHEMA)
        write_parquet_atomic(table, ids_path)
        self.shards.append(
            ShardInfo(
                file=faiss_name,
                ids_file=ids_name,
                count=len(vectors),
                first_id=int(ids[0]),
                last_id=int(ids[-1]),
                sha256=file_sha256(faiss_path),
                ids_sha256=file_sha256(ids_path),
            )
        )
        self.count += len(vectors)
        self._pending = _Pending([], [], [], [])
        self._pending_count = 0

    def abort(self) -> None:
        shutil.rmtree(self.partial_dir, ignore_errors=True)

    def finish(self, build_info: dict, calibrate=None) -> Manifest:
        """Flush, write rejects and manifest, then rename ``<out>.partial`` to ``<out>``.

        ``calibrate(partial_dir, manifest) -> dict`` may add nearest-neighbour quantiles; it
        runs before the rename so that the published index is complete.
        """
        self._flush()
        if self.count == 0:
            self.abort()
            first = self.rejects[0]["reason"] if self.rejects else "no samples"
            raise CorpusError(f"corpus has no indexable image ({len(self.rejects)} rejected; first: {first})")
        write_parquet_atomic(pa.Table.from_pylist(self.rejects, schema=REJECTS_SCHEMA), os.path.join(self.partial_dir, REJECTS))
        info = {**build_info, "seconds": round(time.time() - self._started, 3)}
        manifest = Manifest(latent=self.latent, count=self.count, shards=tuple(self.shards), build=info, rejects=len(self.rejects))
        if calibrate is not None:
            manifest = Manifest(**{**manifest.__dict__, "calibration": calibrate(self.partial_dir, manifest)})
        write_json_atomic(os.path.join(self.partial_dir, MANIFEST), manifest.to_json())
        if os.path.exists(self.out_dir):
            # Only an empty directory may be replaced; the CLI refuses a finished index earlier.
            os.rmdir(self.out_dir)
        os.replace(self.partial_dir, self.out_dir)
        return manifest
