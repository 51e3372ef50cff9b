"""A run directory's files as the audit reads them: run.json, the sample and hit rows of the
finished units, and the image files of ``images/*.tar``.

Image references are resolved strictly inside the run directory: a reference with an absolute
path or ``..`` is an error, whatever wrote it. Tar members are read by name only; every member
whose name ends in an image extension is an image of the run (``IMAGE_EXTENSIONS``), whether or
not a sample row names it (issue 13.5: an image no row names is still audited).
"""

from __future__ import annotations

import glob
import io
import json
import os
import posixpath
import tarfile

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from spellshield.pipeline.records import HIT_SCHEMA, SAMPLE_SCHEMA
from spellshield.workers.run_layout import HITS_DIR, IMAGES_DIR, RUN_FILE, SAMPLES_DIR

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class RunError(ValueError):
    """A run directory that is missing, holds no finished unit, or points outside itself."""


def read_run(run_dir: str) -> dict:
    run_file = os.path.join(run_dir, RUN_FILE)
    if not os.path.isfile(run_file):
        raise RunError(f"{run_dir} is not a run directory: no {RUN_FILE}")
    try:
        with open(run_file) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise RunError(f"{run_file} is not valid JSON: {exc.msg}") from None


def load_run(run_dir: str) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """(run.json, samples, hits) of a run; only finished units (those with a samples file)."""
    run = read_run(run_dir)
    sample_files = sorted(glob.glob(os.path.join(run_dir, SAMPLES_DIR, "unit-*.parquet")))
    if not sample_files:
        raise RunError(f"{run_dir} has no finished unit (audit/samples is empty)")
    samples = pd.concat([pq.read_table(f, schema=SAMPLE_SCHEMA).to_pandas() for f in sample_files], ignore_index=True)
    units = {os.path.basename(f) for f in sample_files}
    hit_files = [f for f in sorted(glob.glob(os.path.join(run_dir, HITS_DIR, "unit-*.parquet"))) if os.path.basename(f) in units]
    hits = (
        pd.concat([pq.read_table(f, schema=HIT_SCHEMA).to_pandas() for f in hit_files], ignore_index=True)
        if hit_files
        else HIT_SCHEMA.empty_table().to_pandas()
    )
    return run, samples, hits


def resolve_image_ref(run_dir: str, ref: str) -> tuple[str, str]:
    """``images/unit-NNNNN.tar#<member>`` -> (tar path inside run_dir, member name).

    Raises RunError for anything that could leave the run directory or its images folder.
    """
    if not isinstance(ref, str) or ref.count("#") != 1:
        raise RunError(f"malformed image reference {ref!r}")
    tar_part, member = ref.split("#")
    normal = posixpath.normpath(tar_part)
    if (
        os.path.isabs(tar_part)
        or "\\" in tar_part
        or normal.startswith("..")
        or posixpath.dirname(normal) != IMAGES_DIR
        or not normal.endswith(".tar")
        or "/" in member
        or "\\" in member
        or member in ("", ".", "..")
    ):
        raise RunError(f"image reference {ref!r} points outside {run_dir}/{IMAGES_DIR}")
    return os.path.join(run_dir, *normal.split("/")), member


def image_tars(run_dir: str) -> list[str]:
    """Every ``images/*.tar`` of the run, as references relative to the run (``images/x.tar``)."""
    return [f"{IMAGES_DIR}/{os.path.basename(p)}" for p in sorted(glob.glob(os.path.join(run_dir, IMAGES_DIR, "*.tar")))]


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def tar_image_names(tar_path: str) -> list[str]:
    """Names of the image members of a tar (headers only: nothing is decoded)."""
    with tarfile.open(tar_path) as tar:
        return [m.name for m in tar if m.isfile() and is_image_name(m.name)]


def read_tar_images(tar_path: str, names=None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Image members of one tar (all, or those in ``names``) as uint8 RGB arrays by member name,
    and {member: reason} for those that do not decode."""
    from PIL import Image

    out, bad = {}, {}
    wanted = set(names) if names is not None else None
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not (member.isfile() and is_image_name(member.name)) or (wanted is not None and member.name not in wanted):
                continue
            try:
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                    out[member.name] = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except Exception as exc:  # noqa: BLE001 - any decoder failure is the same finding
                bad[member.name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return out, bad
