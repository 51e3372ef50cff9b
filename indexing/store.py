"""Reading the stored vectors of an index directory, shard by shard, without searching them.

A shard file holds ``IndexIDMap2(IndexFlatL2)`` (manifest ``dtype: float32``) or
``IndexIDMap2(IndexScalarQuantizer(d, QT_fp16, METRIC_L2))`` (``dtype: float16``). Either way the
vectors the index reconstructs *are* the stored truth every backend's exact re-check compares
against: for float16 shards the codes are IEEE half floats, read here as ``np.float16`` without
any rounding. FAISS is imported only when a shard file is read, pyarrow only when keys are.
"""

from __future__ import annotations

import os

import numpy as np

from .manifest import IndexFormatError, Manifest, ShardInfo

DTYPES = {"float32": np.float32, "float16": np.float16}


def storage_dtype(manifest: Manifest) -> np.dtype:
    if manifest.dtype not in DTYPES:
        raise IndexFormatError(f"unsupported index dtype {manifest.dtype!r} (expected one of {', '.join(DTYPES)})")
    return np.dtype(DTYPES[manifest.dtype])


def select_shards(manifest: Manifest, shards=None) -> list[ShardInfo]:
    """The manifest's shards, or those numbered in ``shards`` (positions in the manifest)."""
    if shards is None:
        return list(manifest.shards)
    numbers = [int(s) for s in shards]
    bad = [n for n in numbers if not 0 <= n < len(manifest.shards)]
    if bad or not numbers or len(set(numbers)) != len(numbers):
        raise ValueError(f"shard numbers must be distinct, in 0..{len(manifest.shards) - 1}, got {list(shards)}")
    return [manifest.shards[n] for n in numbers]


def read_shard_index(index_dir: str, shard: ShardInfo):
    import faiss

    path = os.path.join(index_dir, shard.file)
    if not os.path.isfile(path):
        raise IndexFormatError(f"index shard {path} is missing")
    return faiss.read_index(path)


def shard_arrays(index, dtype: np.dtype, path: str = "shard") -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 (n,), vectors (n, d) in ``dtype``) of one IndexIDMap2 shard, insertion order."""
    import faiss

    if not isinstance(index, faiss.IndexIDMap2) and not isinstance(index, faiss.IndexIDMap):
        raise IndexFormatError(f"{path} is a {type(index).__name__}, expected IndexIDMap2")
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    inner = faiss.downcast_index(index.index)
    n, d = inner.ntotal, inner.d
    if dtype == np.float32:
        if not isinstance(inner, faiss.IndexFlatL2):
            raise IndexFormatError(f"{path} holds {type(inner).__name__}; a float32 index stores IndexFlatL2")
        vectors = faiss.vector_to_array(inner.codes).view(np.float32).reshape(n, d)
    else:
        if not (isinstance(inner, faiss.IndexScalarQuantizer) and inner.sq.qtype == faiss.ScalarQuantizer.QT_fp16
                and inner.metric_type == faiss.METRIC_L2):
            raise IndexFormatError(f"{path} holds {type(inner).__name__}; a float16 index stores "
                                   "IndexScalarQuantizer(QT_fp16, METRIC_L2)")
        vectors = faiss.vector_to_array(inner.codes).view(np.float16).reshape(n, d)
    if len(ids) != n:
        raise IndexFormatError(f"{path} has {n} vectors but {len(ids)} ids")
    return ids, vectors


def load_shard(index_dir: str, shard: ShardInfo, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    return shard_arrays(read_shard_index(index_dir, shard), dtype, os.path.join(index_dir, shard.file))


def load_vectors(index_dir: str, manifest: Manifest, shards=None) -> tuple[np.ndarray, np.ndarray]:
    """All (ids, vectors) of the selected shards in one array each (vectors in the manifest dtype)."""
    dtype = storage_dtype(manifest)
    chosen = select_shards(manifest, shards)
    total = sum(s.count for s in chosen)
    ids = np.empty(total, np.int64)
    vectors = np.empty((total, manifest.latent.dim), dtype)
    row = 0
    for shard in chosen:
        shard_ids, shard_vectors = load_shard(index_dir, shard, dtype)
        if len(shard_ids) != shard.count:
            raise IndexFormatError(f"{shard.file} holds {len(shard_ids)} vectors, the manifest says {shard.count}")
        ids[row : row + len(shard_ids)] = shard_ids
        vectors[row : row + len(shard_ids)] = shard_vectors
        row += len(shard_ids)
    return ids, vectors


class RowLookup:
    """Global id -> row of a concatenated array (a dense table when ids are compact, else a sort)."""

    def __init__(self, ids: np.ndarray):
        self.ids = np.asarray(ids, np.int64)
        if len(self.ids) == 0:
            raise ValueError("an empty id list")
        self.low = int(self.ids.min())
        span = int(self.ids.max()) - self.low + 1
        self._table = None
        if span <= 4 * len(self.ids) + 1024:
            self._table = np.full(span, -1, np.int64)
            self._table[self.ids - self.low] = np.arange(len(self.ids))
        else:
            self._order = np.argsort(self.ids, kind="stable")
            self._sorted = self.ids[self._order]

    def rows(self, ids) -> np.ndarray:
        """Rows of ``ids``; raises KeyError for an id this array does not hold."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if self._table is not None:
            offset = ids - self.low
            ok = (offset >= 0) & (offset < len(self._table))
            rows = np.full(len(ids), -1, np.int64)
            rows[ok] = self._table[offset[ok]]
        else:
            pos = np.minimum(np.searchsorted(self._sorted, ids), len(self._sorted) - 1)
            rows = np.where(self._sorted[pos] == ids, self._order[pos], -1)
        if np.any(rows < 0):
            raise KeyError(f"ids not in this index: {ids[rows < 0][:5].tolist()}")
        return rows


class KeyTable:
    """Corpus keys of the selected shards, read from their ids-*.parquet on first use."""

    def __init__(self, index_dir: str, shards: list[ShardInfo]):
        self.index_dir = index_dir
        self.shards = shards
        self._lookup: RowLookup | None = None
        self._keys: np.ndarray | None = None

    def keys(self, ids) -> list[str]:
        if self._keys is None:
            import pyarrow.parquet as pq

            id_parts, key_parts = [], []
            for s in self.shards:
                table = pq.read_table(os.path.join(self.index_dir, s.ids_file), columns=["id", "key"])
                id_parts.append(table.column("id").to_numpy())
                key_parts.append(np.array(table.column("key").to_pylist(), dtype=object))
            self._lookup = RowLookup(np.concatenate(id_parts))
            self._keys = np.concatenate(key_parts)
        return [self._keys[r] for r in self._lookup.rows(ids)]
