"""A run directory's files as the audit reads them: run.json, the sample and hit rows of the
finished units, and the image files of ``images/*.tar``; and where the audit writes its report.

A run on an object store (``s3://``, ``gs://``) is read through the commit protocol
(``storage.commit``): ``local_run`` gives the audit a temporary local snapshot of run.json and of
the files of the *committed* units only, each checked against the sha256 its commit record names
(published, or still staged when its writer died before publishing), so the leftovers of aborted
attempts are never read. A Ray task rechecking a tar fetches that one tar on its own node
(``local_tar``). ``report_dir`` is where the report is written: ``RUN/audit`` of a local run; for
a remote run a temporary copy of the report files, uploaded back to ``RUN/audit/`` at the end
(``summary.json`` last), so nothing but temporary and cache files touch the local disk.

Image references are resolved strictly inside the run directory: a reference with an absolute
path or ``..`` is an error, whatever wrote it. Tar members are read by name only; every member
whose name ends in an image extension is an image of the run (``IMAGE_EXTENSIONS``), whether or
not a sample row names it (issue 13.5: an image no row names is still audited).
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import posixpath
import tarfile
import tempfile
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from spellshield import storage
from spellshield.pipeline.records import HIT_SCHEMA, SAMPLE_SCHEMA
from spellshield.workers.run_layout import AUDIT_DIR, HITS_DIR, IMAGES_DIR, RUN_FILE, SAMPLES_DIR, SUMMARY_FILE

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


# --------------------------------------------------------------------------------------------
# Runs on object storage


def check_run(run_dir: str, report: bool = False) -> None:
    """Refuse, before any work, a path that is no run (RunError) or a store that cannot be used
    (StorageError: unreachable, credentials, bucket); ``report``: also that ``RUN/audit`` is
    writable (on an object store a probe object is written there and deleted)."""
    run = storage.resolve(run_dir)
    storage.probe(run)
    if not storage.is_file(run.child(RUN_FILE)):
        raise RunError(f"{run_dir} is not a run directory: no {RUN_FILE}")
    if report and run.remote:
        storage.check_writable(run.child(AUDIT_DIR))


@contextlib.contextmanager
def local_run(run_dir: str) -> Iterator[str]:
    """A local directory holding the run as the audit reads it: ``run_dir`` itself, or for a run
    on an object store a temporary snapshot of its run.json and its committed units' files."""
    if not storage.is_remote(run_dir):
        yield run_dir
        return
    from spellshield.storage.commit import committed_units, fetch_committed

    run = storage.resolve(run_dir)
    check_run(run_dir)
    with tempfile.TemporaryDirectory(prefix="spellshield-audit-run-") as local:
        storage.get_file(run.child(RUN_FILE), os.path.join(local, RUN_FILE))
        commits = committed_units(run)
        if not commits:
            raise RunError(f"{run.uri} has no finished unit (no committed unit in _commits/)")
        for record in commits.values():
            for item in record["files"]:
                fetch_committed(run, record, item["name"], os.path.join(local, *item["name"].split("/")))
        yield local


@contextlib.contextmanager
def local_tar(run_dir: str, tar_ref: str) -> Iterator[str | None]:
    """The local path of one ``images/*.tar`` of the run, or None when the run has no such
    (committed) tar. A remote run's tar is fetched, sha256-checked, into a temporary file."""
    tar_path, _ = resolve_image_ref(run_dir, f"{tar_ref}#x.png")
    if not storage.is_remote(run_dir):
        yield tar_path if os.path.isfile(tar_path) else None
        return
    from spellshield.storage.commit import commit_record, fetch_committed

    run = storage.resolve(run_dir)
    record = commit_record(run, posixpath.basename(tar_ref)[: -len(".tar")])
    if record is None or not any(item["name"] == tar_ref for item in record["files"]):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="spellshield-audit-tar-") as local:
        path = os.path.join(local, posixpath.basename(tar_ref))
        fetch_committed(run, record, tar_ref, path)
        yield path


def _report_files(audit: storage.Location) -> list[storage.Location]:
    """The report's files under ``RUN/audit/``: everything there except the unit logs."""
    logs = tuple(posixpath.relpath(d, AUDIT_DIR) + "/" for d in (HITS_DIR, SAMPLES_DIR))
    base = audit.path.rstrip("/") + "/"
    return [item for item in storage.list_dir(audit, recursive=True) if not item.path[len(base):].startswith(logs)]


class ReportDir:
    """Where the audit writes its report (see ``report_dir``): ``local`` to write into, ``final``
    what a written file will be called once the report is in place."""

    def __init__(self, run_dir: str, local: str):
        self.run_dir, self.local = run_dir, local

    def final(self, local_path: str) -> str:
        if not storage.is_remote(self.run_dir):
            return local_path
        relative = os.path.relpath(local_path, self.local).replace(os.sep, "/")
        return storage.resolve(self.run_dir).child(AUDIT_DIR, relative).uri


@contextlib.contextmanager
def report_dir(run_dir: str) -> Iterator[ReportDir]:
    """The directory the audit writes its report into: ``RUN/audit`` of a local run. For a run on
    an object store, a temporary copy of its current report files (so an audit that redraws or
    drops a figure acts on them as on local disk); when the block ends without an error, every
    file there is uploaded to ``RUN/audit/`` (``summary.json`` last: a reader that waits for it
    sees the whole report), and report objects the block removed are deleted."""
    if not storage.is_remote(run_dir):
        local = os.path.join(run_dir, AUDIT_DIR)
        os.makedirs(local, exist_ok=True)
        yield ReportDir(run_dir, local)
        return
    audit = storage.resolve(run_dir).child(AUDIT_DIR)
    base = audit.path.rstrip("/") + "/"
    with tempfile.TemporaryDirectory(prefix="spellshield-audit-report-") as local:
        before = {item.path[len(base):]: item for item in _report_files(audit)}
        for relative, item in before.items():
            storage.get_file(item, os.path.join(local, *relative.split("/")))
        yield ReportDir(run_dir, local)
        summary = posixpath.relpath(SUMMARY_FILE, AUDIT_DIR)
        written = storage.put_tree(local, audit, last=summary if os.path.isfile(os.path.join(local, summary)) else None)
        for relative in sorted(set(before) - {w.replace(os.sep, "/") for w in written}):
            storage.delete(before[relative])
