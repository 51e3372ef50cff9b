"""Writing one work unit's outputs (workers.run_layout) so that they appear whole or not at all.

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

from spellshield import storage
from spellshield.pipeline.records import HIT_SCHEMA, SAMPLE_SCHEMA
from spellshield.workers.run_layout import unit_paths
from spellshield.storage.commit import commit_unit


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
    import webdataset as wds  # here: it imports torch, and the audit's --help imports this module

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



def unit_problems(run_dir: str, unit) -> list[str]:
    """What is wrong with a unit's files on disk against its plan (a ``workers.units.Unit``);
    empty when the unit is whole: its three files exist and read, every planned sample has a row
    and no other sample does, each sample's first attempt used its planned seed, and every
    written sample's image is a member of the unit's tar.

    Whole, not merely marked done: a finished run may since have lost files (a disk problem, a
    partial copy), and both ``generate --resume`` and ``audit`` check every unit this way."""
    import tarfile

    paths = unit_paths(run_dir, unit.name)
    missing = [kind for kind, path in paths.items() if not os.path.isfile(path)]
    if missing:
        return [f"{kind} file missing" for kind in missing]
    try:
        rows = pq.read_table(paths["samples"], columns=["sample", "attempt", "seed", "image"]).to_pandas()
        pq.read_metadata(paths["hits"])
    except Exception as exc:  # noqa: BLE001 - any unreadable Parquet file is the same finding
        return [f"audit rows unreadable ({type(exc).__name__})"]
    problems = []
    planned = {s.key: s.seed for s in unit.samples}
    absent = sorted(set(planned) - set(rows["sample"]))
    extra = sorted(set(rows["sample"]) - set(planned))
    if absent:
        problems.append(f"{len(absent)} planned sample(s) without a row, e.g. {absent[0]}")
    if extra:
        problems.append(f"{len(extra)} row(s) of samples not in the plan, e.g. {extra[0]}")
    first = rows[(rows["attempt"] == 1) & rows["sample"].isin(planned)]
    wrong_seed = sorted(s for s, seed in zip(first["sample"], first["seed"]) if planned[s] != seed)
    if wrong_seed:
        problems.append(f"{len(wrong_seed)} sample(s) whose first attempt is not the planned seed, e.g. {wrong_seed[0]}")
    try:
        with tarfile.open(paths["images"]) as tar:
            members = {m.name for m in tar if m.isfile()}
    except (tarfile.TarError, OSError) as exc:
        return problems + [f"image tar unreadable ({type(exc).__name__})"]
    named = [ref.split("#", 1)[-1] for ref in rows["image"].dropna()]
    lost = sorted(m for m in named if m not in members)
    if lost:
        problems.append(f"{len(lost)} written image(s) missing from its tar, e.g. {lost[0]}")
    return problems


def missing_units(run_dir: str, units) -> list[tuple[object, list[str]]]:
    """(unit, problems) for every planned unit that is not whole on disk (``unit_problems``)."""
    out = []
    for unit in units:
        problems = unit_problems(run_dir, unit)
        if problems:
            out.append((unit, problems))
    return out


def units_to_run(run_dir: str, units) -> list:
    """The planned units that are not whole on disk, in plan order. A broken unit's samples file
    (its done marker) is removed first, so that until the unit is rewritten, whole, nothing
    counts it as done; its other files are overwritten by the rewrite (same seeds, same images)."""
    todo = []
    for unit, _ in missing_units(run_dir, units):
        marker = unit_paths(run_dir, unit.name)["samples"]
        if os.path.exists(marker):
            os.remove(marker)
        todo.append(unit)
    return todo
