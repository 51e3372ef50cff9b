"""The layout of a run directory, declared once (as ``indexing.manifest`` declares the index's).

    RUN/run.json                         what the run is and how far it got (jobs.run_record)
    RUN/.lock                            held (flock) by the one driver writing the run
    RUN/images/unit-NNNNN.tar            WebDataset shard of a unit: <sample>.png + <sample>.json
    RUN/audit/hits/unit-NNNNN.parquet    one row per shield hit per step (pipeline.records)
    RUN/audit/samples/unit-NNNNN.parquet one row per attempt; written last: it marks the unit done
    RUN/audit/summary.json, report.html  the audit's output (jobs.audit)

Paths inside the run are relative POSIX paths; an image is referenced from its sample row as
``images/unit-NNNNN.tar#<sample>.png``.
"""

from __future__ import annotations

import os

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
IMAGES_DIR = "images"
AUDIT_DIR = "audit"
HITS_DIR = f"{AUDIT_DIR}/hits"
SAMPLES_DIR = f"{AUDIT_DIR}/samples"
SUMMARY_FILE = f"{AUDIT_DIR}/summary.json"
REPORT_FILE = f"{AUDIT_DIR}/report.html"
UNIT_PREFIX = "unit-"


def unit_name(index: int) -> str:
    return f"{UNIT_PREFIX}{index:05d}"


def unit_paths(run_dir: str, unit: str) -> dict[str, str]:
    """The three files of a unit, in the order they are written (samples last)."""
    return {
        "images": os.path.join(run_dir, IMAGES_DIR, f"{unit}.tar"),
        "hits": os.path.join(run_dir, HITS_DIR, f"{unit}.parquet"),
        "samples": os.path.join(run_dir, SAMPLES_DIR, f"{unit}.parquet"),
    }


def image_ref(unit: str, sample: str) -> str:
    """How a sample row names its image."""
    return f"{IMAGES_DIR}/{unit}.tar#{sample}.png"


def run_path(run_dir: str, relative: str) -> str:
    return os.path.join(run_dir, *relative.split("/"))
