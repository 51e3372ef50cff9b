"""Checking a finished index directory against its manifest, one shard at a time.

``verify_index`` raises IndexFormatError naming the first problem found, in this order:
the manifest (readable, format version, dtype, metric, shard list), then per shard the files'
existence and sha256, the FAISS index (type for the dtype, dimension, metric, count), the id
table (count, ids unique and contiguous from the shard's first id, equal to the FAISS id map),
then the totals (the shards tile ids 0..count-1 exactly) and rejects.parquet (row count),
then the manifest's own content:

- its calibration is recomputed (same seed and sample size; the corpus 1-NN quantiles and the
  radius the rule gives) and must match: an edited ``suggested_radius`` (a shield quietly
  disabled) fails. A held-out sample's quantiles cannot be recomputed without its images, but
  the suggested radius must still follow the rule from the recorded numbers; pin the whole
  manifest with ``generate --index-sha256`` (the sha256 this check prints) against any edit.
- the files it lists beside the shards (the judges' calibration) must be present with their
  sha256 (their thresholds are not recomputed here: that needs the encoder; ``index calibrate``).
- each corpus tar recorded by the build (path, size, sha256) that is still at its path must
  still have that sha256: an index that no longer matches its corpus fails. Tars no longer at
  their paths (an index moved to another machine) are counted, not failed.

Memory is one shard.
"""

from __future__ import annotations

import os

import faiss
import numpy as np
import pyarrow.parquet as pq

from .calibrate import calibrate_index
from .manifest import (REJECTS, IndexFormatError, file_sha256, manifest_hash, read_listed_bytes, read_listed_json,
                       read_manifest)
from .writer import DTYPES


def verify_index(index_dir: str, check_corpus: bool = True) -> dict:
    """Every check above; returns a summary (count, shards, rejects, manifest_sha256, corpus tars
    checked and absent) when all hold. ``check_corpus=False`` skips reading the corpus tars."""
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
    verify_calibration(index_dir, manifest)
    for name, sha256 in manifest.listed_files.items():  # the judges' calibration and its files: present, unchanged
        if name.endswith(".json"):
            read_listed_json(index_dir, name, sha256)
        else:
            read_listed_bytes(index_dir, name, sha256)
    checked, absent = verify_corpus(manifest) if check_corpus else (0, 0)
    return {"count": manifest.count, "shards": len(manifest.shards), "rejects": manifest.rejects, "dtype": manifest.dtype,
            "manifest_sha256": manifest_hash(index_dir), "corpus_checked": checked, "corpus_absent": absent}


def _close(a, b, rtol: float = 1e-4) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(float(a) - float(b)) <= rtol * max(abs(float(a)), abs(float(b)), 1e-30)


def verify_calibration(index_dir: str, manifest) -> None:
    """The manifest's calibration, recomputed from the index, must be the one it records."""
    recorded = manifest.calibration
    if not recorded:
        return
    try:
        sample_size, seed = int(recorded["sample_size"]), int(recorded["seed"])
    except (KeyError, TypeError, ValueError):
        raise IndexFormatError("manifest calibration has no sample_size/seed: it cannot be reproduced "
                               "(run `index calibrate` again)") from None
    fresh = calibrate_index(index_dir, manifest, sample_size, seed)
    quantiles = recorded.get("nn_distance_quantiles", {})
    for q, value in fresh["nn_distance_quantiles"].items():
        if not _close(quantiles.get(q), value):
            raise IndexFormatError(f"manifest calibration quantile {q} is {quantiles.get(q)!r}, the index gives {value!r} "
                                   f"(the manifest was edited or belongs to another index)")
    expected = fresh["suggested_radius"]
    held = recorded.get("holdout", {}).get("nn_distance_quantiles", {}).get("0.01")
    if held is not None and (expected is None or held < expected):
        expected = held  # the held-out rule (calibrate.HOLDOUT_RULE) from its recorded quantile
    if not _close(recorded.get("suggested_radius"), expected):
        raise IndexFormatError(f"manifest suggested_radius {recorded.get('suggested_radius')!r} is not what its calibration "
                               f"gives ({expected!r}; rule: {recorded.get('rule', fresh['rule'])})")


def verify_corpus(manifest) -> tuple[int, int]:
    """(tars checked, tars absent) of the corpus the build recorded; raises on a changed tar."""
    checked = absent = 0
    for source in manifest.build.get("sources", []):
        path, size, sha256 = source.get("path"), source.get("bytes"), source.get("sha256")
        if not path or not os.path.isfile(path):
            absent += 1
            continue
        if (size is not None and os.path.getsize(path) != size) or file_sha256(path) != sha256:
            raise IndexFormatError(f"corpus tar {path} changed since the index was built (sha256 differs): "
                                   f"the index no longer matches its corpus; rebuild it")
        checked += 1
    return checked, absent


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
    if shards is None:  # and the files listed beside the shards (the judges' calibration)
        for name, sha256 in manifest.listed_files.items():
            read_listed_bytes(index_dir, name, sha256)


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
