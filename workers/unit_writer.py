"""Writing one work unit's outputs so that they appear whole or not at all.

    images/unit-NNNNN.tar            WebDataset shard: <sample>.png + <sample>.json
    audit/hits/unit-NNNNN.parquet    one row per shield hit per step
    audit/samples/unit-NNNNN.parquet one row per sample; renamed last: it marks the unit done

Each file is written under a temporary name in its final directory and renamed into place
(``os.replace`` is atomic on one filesystem). The samples file goes last, so a unit whose
samples file exists has all three; a unit killed half-way leaves only temporary files, which
``unit_done`` ignores and a rerun overwrites.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from spellshield import storage
from spellshield.pipeline.records import HIT_SCHEMA, SAMPLE_SCHEMA
from spellshield.storage.commit import commit_unit

IMAGES_DIR = "images"
HITS_DIR = os.path.join("audit", "hits")
SAMPLES_DIR = os.path.join("audit", "samples")


def unit_paths(run_dir: str, unit_name: str) -> dict[str, str]:
    return {
        "images": os.path.join(run_dir, IMAGES_DIR, f"{unit_name}.tar"),
        "hits": os.path.join(run_dir, HITS_DIR, f"{unit_name}.parquet"),
        "samples": os.path.join(run_dir, SAMPLES_DIR, f"{unit_name}.parquet"),
    }


def unit_done(run_dir: str, unit_name: str) -> bool:
    if storage.is_remote(run_dir):  # published: its commit record exists and the marker was copied last
        return storage.exists(unit_paths(run_dir, unit_name)["samples"])
    return os.path.isfile(unit_paths(run_dir, unit_name)["samples"])


def _tmp(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_unit(run_dir: str, unit_name: str, images: list[tuple[str, bytes, dict]], hits: list[dict], samples: list[dict]) -> dict:
    """Write a unit's tar, hits and samples (samples last). Returns the final paths."""
    if storage.is_remote(run_dir):
        # No rename on an object store: written whole here, then committed at most once
        # (storage.commit: stage, create-only commit record, publish with samples last).
        with tempfile.TemporaryDirectory(prefix="spellshield-unit-") as local:
            written = write_unit(local, unit_name, images, hits, samples)
            commit_unit(run_dir, unit_name, [(os.path.relpath(p, local), p) for p in written.values()])
        return unit_paths(run_dir, unit_name)
    paths = unit_paths(run_dir, unit_name)
    staged = []
    try:
        for path in paths.values():
            os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp_tar = _tmp(paths["images"])
        staged.append(tmp_tar)
        with wds.TarWriter(tmp_tar) as sink:
            for key, png, meta in images:
                sink.write({"__key__": key, "png": png, "json": json.dumps(meta, sort_keys=True).encode()})
        tmp_hits = _tmp(paths["hits"])
        staged.append(tmp_hits)
        pq.write_table(pa.Table.from_pylist(hits, schema=HIT_SCHEMA), tmp_hits)
        tmp_samples = _tmp(paths["samples"])
        staged.append(tmp_samples)
        pq.write_table(pa.Table.from_pylist(samples, schema=SAMPLE_SCHEMA), tmp_samples)
        os.replace(tmp_tar, paths["images"])
        os.replace(tmp_hits, paths["hits"])
        os.replace(tmp_samples, paths["samples"])  # last: the unit is done from here on
    finally:
        for tmp in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
    return paths

