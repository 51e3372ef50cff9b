"""Checking a finished index directory against its manifest, one shard at a time.

``verify_index`` raises IndexFormatError naming the first problem found, in this order:
the manifest (readable, format version, dtype, metric, shard list), then per shard the files'
existence and sha256, the FAISS index (type for the dtype, dimension, metric, count), the id
table (count, ids unique and contiguous from the shard's first id, equal to the FAISS id map),
then the totals (the shards tile ids 0..count-1 exactly) and rejects.parquet (row count).
Memory is one shard.
"""

from __future__ import annotations

import os

import faiss
import numpy as np
import pyarrow.parquet as pq

from .manifest import REJECTS, IndexFormatError, file_sha256, read_manifest
from .writer import DTYPES


def verify_index(index_dir: str) -> dict:
    """Every check above; returns a summary (count, shards, rejects) when all hold."""
    manifest = read_manifest(index_dir)
    if manifest.dtype not in DTYPES:
        raise IndexFormatError(f"manifest dtype {manifest.dtype!r} is not one of {', '.join(DTYPES)}")
    if manifest.metric != "l2":
        raise IndexFormatError(f"manifest metric {manifest.metric!r} is not 'l2'")
    if not manifest.shards:
        raise IndexFormatError("manifest lists no shards")
    next_id = 0
    for shard in manifest.shards:
        if shard.first_id != next_id:
            raise IndexFormatError(f"{shard.file}: first id {shard.first_id}, expected {next_id} "
                                   f"(shards must tile ids 0..count-1 in order)")
        if shard.last_id - shard.first_id + 1 != shard.count:
            raise IndexFormatError(f"{shard.file}: ids {shard.first_id}..{shard.last_id} do not hold its count {shard.count}")
        _verify_shard(index_dir, manifest, shard)
        next_id = shard.last_id + 1
    total = sum(s.count for s in manifest.shards)
    if total != manifest.count:
        raise IndexFormatError(f"manifest count {manifest.count} differs from the shards' total {total}")
    rejects_path = os.path.join(index_dir, REJECTS)
    if not os.path.isfile(rejects_path):
        raise IndexFormatError(f"{REJECTS} is missing")
    rejects = pq.ParquetFile(rejects_path).metadata.num_rows
    if rejects != manifest.rejects:
        raise IndexFormatError(f"{REJECTS} has {rejects} rows, the manifest says {manifest.rejects}")
    radius = manifest.calibration.get("suggested_radius")
    if radius is not None and not radius > 0:
        raise IndexFormatError(f"manifest suggested_radius {radius!r} is not > 0")
    return {"count": manifest.count, "shards": len(manifest.shards), "rejects": manifest.rejects, "dtype": manifest.dtype}


def verify_checksums(index_dir: str, manifest, shards=None) -> None:
    """Every shard file and id table (of ``shards``, default all) present with the manifest's sha256.

    This is the check a searcher runs before it trusts its shards (fail closed); verify_index
    runs it too, then the deeper checks."""
    for shard in manifest.shards if shards is None else [manifest.shards[n] for n in shards]:
        for name, expected in ((shard.file, shard.sha256), (shard.ids_file, shard.ids_sha256)):
            path = os.path.join(index_dir, name)
            if not os.path.isfile(path):
                raise IndexFormatError(f"index file {path} is missing")
            if file_sha256(path) != expected:
                raise IndexFormatError(f"index file {path} does not match its sha256 in the manifest (corrupted or replaced)")


def _verify_shard(index_dir: str, manifest, shard) -> None:
    verify_checksums(index_dir, manifest, [manifest.shards.index(shard)])
    try:
        index = faiss.read_index(os.path.join(index_dir, shard.file))
    except RuntimeError as exc:
        raise IndexFormatError(f"{shard.file} is not a readable FAISS index: {str(exc).splitlines()[0]}") from None
    # read_index returns the concrete class; (re-)downcasting it would drop the owning wrapper
    if not isinstance(index, faiss.IndexIDMap2):
        raise IndexFormatError(f"{shard.file} is a {type(index).__name__}, not an IndexIDMap2")
    inner = faiss.downcast_index(index.index)
    wanted = faiss.IndexScalarQuantizer if manifest.dtype == "float16" else faiss.IndexFlatL2
    if type(inner) is not wanted or (manifest.dtype == "float16" and inner.sq.qtype != faiss.ScalarQuantizer.QT_fp16):
        raise IndexFormatError(f"{shard.file} holds a {type(inner).__name__}, dtype {manifest.dtype} needs {wanted.__name__}"
                               + (" (QT_fp16)" if manifest.dtype == "float16" else ""))
    if index.d != manifest.latent.dim or index.metric_type != faiss.METRIC_L2:
        raise IndexFormatError(f"{shard.file}: dimension {index.d} / metric {index.metric_type}, the manifest says "
                               f"{manifest.latent.dim} / L2")
    if index.ntotal != shard.count:
        raise IndexFormatError(f"{shard.file} holds {index.ntotal} vectors, the manifest says {shard.count}")
    table = pq.read_table(os.path.join(index_dir, shard.ids_file))
    if "id" not in table.column_names or "key" not in table.column_names:
        raise IndexFormatError(f"{shard.ids_file} has no id/key columns")
    ids = table.column("id").to_numpy()
    if len(ids) != shard.count:
        raise IndexFormatError(f"{shard.ids_file} has {len(ids)} rows, the manifest says {shard.count}")
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        duplicate = int(unique[np.argmax(counts > 1)])
        raise IndexFormatError(f"{shard.ids_file}: id {duplicate} appears {int(counts.max())} times")
    if not np.array_equal(ids, np.arange(shard.first_id, shard.last_id + 1)):
        raise IndexFormatError(f"{shard.ids_file}: ids are not {shard.first_id}..{shard.last_id} in order")
    if not np.array_equal(faiss.vector_to_array(index.id_map), ids):
        raise IndexFormatError(f"{shard.file}: its FAISS ids differ from {shard.ids_file}")
