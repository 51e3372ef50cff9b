"""Writing one work unit's outputs (workers.run_layout) so that they appear whole or not at all.

Each file is written under a temporary name in its final directory and renamed into place
(``os.replace`` is atomic on one filesystem). The samples file goes last, so a unit whose
samples file exists has all three; a unit killed half-way leaves only temporary files, which
``unit_done`` ignores and a rerun overwrites.
"""

from __future__ import annotations

import json
import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from spellshield.pipeline.records import HIT_SCHEMA, SAMPLE_SCHEMA
from spellshield.workers.run_layout import unit_paths


def unit_done(run_dir: str, unit_name: str) -> bool:
    return os.path.isfile(unit_paths(run_dir, unit_name)["samples"])


def _tmp(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_unit(run_dir: str, unit_name: str, images: list[tuple[str, bytes, dict]], hits: list[dict], samples: list[dict]) -> dict:
    """Write a unit's tar, hits and samples (samples last). Returns the final paths."""
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

