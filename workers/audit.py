"""What the audit runs on Ray: one task per image tar re-encodes every image file from its
bytes and searches the index exactly, instead of trusting the sample rows the generator wrote.

Everything else of the audit (reading the run, completeness, statistics, the report) is plain
code in ``spellshield.auditing``; ``jobs.audit`` fans ``recheck_tar`` out and gathers the rows.
"""

from __future__ import annotations

import numpy as np

from spellshield.auditing.run_files import RunError, local_tar, read_tar_images, resolve_image_ref

CHUNK = 64  # images encoded and searched together
_JUDGES: dict = {}  # index_dir -> workers.final_check.Judges (deterministic: the same for every tar)


def _check(images: list[np.ndarray], index_dir: str, radius: float, backend: str):
    from spellshield.indexing.encoders import Encoder
    from spellshield.indexing.search import open_index
    from spellshield.workers.final_check import check_images, prepare_judges

    shield = open_index(index_dir, backend=backend)
    encoder = Encoder(shield.manifest.latent.encoder).init()
    # the perceptual and off-manifold judges beside the L2 one, calibrated once per index per process
    judges = _JUDGES.get(index_dir) or _JUDGES.setdefault(index_dir, prepare_judges(shield, encoder))
    for start in range(0, len(images), CHUNK):
        yield start, check_images(np.stack(images[start : start + CHUNK]), encoder, shield, radius, judges)


# The columns of a rechecked image, each with the field of final_check.FinalCheck it holds and its
# type (None: a corpus key, as it is): declared once here; the column lists and every row are
# derived from these tables.
L2_FIELDS = {"audit_nearest_id": ("ids", int), "audit_nearest_key": ("keys", None),
             "audit_nearest_distance": ("distances", float), "audit_inside": ("inside", bool)}
PERCEPTUAL_FIELDS = {"audit_perceptual_copy": ("perceptual_copy", bool), "audit_perceptual_id": ("perceptual_ids", int),
                     "audit_perceptual_key": ("perceptual_keys", None),
                     "audit_perceptual_distance": ("perceptual_distances", float),
                     "audit_perceptual_ssim": ("perceptual_ssim", float), "audit_off_manifold": ("off_manifold", bool)}
# Only an index calibrated with --descriptor has this judge; otherwise its columns are null.
DESCRIPTOR_FIELDS = {"audit_descriptor_copy": ("descriptor_copy", bool), "audit_descriptor_id": ("descriptor_ids", int),
                     "audit_descriptor_key": ("descriptor_keys", None),
                     "audit_descriptor_similarity": ("descriptor_similarity", float)}
L2_COLUMNS = tuple(L2_FIELDS)
JUDGE_COLUMNS = (*PERCEPTUAL_FIELDS, *DESCRIPTOR_FIELDS)


def _columns(check, j: int, table: dict) -> dict:
    return {column: getattr(check, name)[j] if kind is None else kind(getattr(check, name)[j])
            for column, (name, kind) in table.items()}


def perceptual_audit_columns(check, j: int) -> dict:
    """The second judges' columns (JUDGE_COLUMNS) of one rechecked image, beside the L2 ones."""
    descriptor = _columns(check, j, DESCRIPTOR_FIELDS) if check.descriptor_copy is not None else dict.fromkeys(DESCRIPTOR_FIELDS)
    return {**_columns(check, j, PERCEPTUAL_FIELDS), **descriptor}


def recheck_tar(run_dir: str, tar_ref: str, listed: list[tuple[str, str]], index_dir: str, radius: float,
                backend: str = "exact") -> dict:
    """Every image file of one ``images/*.tar``, searched exactly. ``run_dir`` and ``index_dir``
    may be object-store URIs: the tar is fetched to a temporary file, the index to the node's cache.

    ``listed``: (sample, member) pairs the sample rows name in this tar. Returns {"rows": one per
    image member (sample None when no row names it), "undecodable": {ref: reason}, "missing":
    [refs of listed members the tar lacks]}.
    """
    with local_tar(run_dir, tar_ref) as tar_path:  # a run on an object store: its committed tar, fetched here
        if tar_path is None:
            return {"rows": [], "undecodable": {}, "missing": [f"{tar_ref}#{m}" for _, m in listed]}
        images, bad = read_tar_images(tar_path)
    from spellshield.indexing.manifest import read_manifest

    size = read_manifest(index_dir).latent.resolution
    for name in [n for n, im in images.items() if im.shape[:2] != (size, size)]:
        height, width = images.pop(name).shape[:2]
        bad[name] = f"a {width}x{height} image; the index is {size}x{size}"
    sample_of = {member: sample for sample, member in listed}
    names = sorted(images)
    rows = []
    for start, check in _check([images[n] for n in names], index_dir, radius, backend) if names else ():
        for j, name in enumerate(names[start : start + CHUNK]):
            rows.append({"sample": sample_of.get(name), "image": f"{tar_ref}#{name}", "listed": name in sample_of,
                         **_columns(check, j, L2_FIELDS), **perceptual_audit_columns(check, j)})
    return {"rows": rows, "undecodable": {f"{tar_ref}#{k}": v for k, v in bad.items()},
            "missing": [f"{tar_ref}#{m}" for _, m in listed if m not in images and m not in bad]}


def recheck_unit(run_dir: str, refs: list[tuple[str, str]], index_dir: str, radius: float, backend: str = "exact") -> list[dict]:
    """Exact nearest corpus latent of each (sample, image reference), recomputed from the PNGs;
    RunError when a named image is not in its tar."""
    by_tar: dict[str, list[tuple[str, str]]] = {}
    for sample, ref in refs:
        resolve_image_ref(run_dir, ref)
        tar_ref, member = ref.split("#")
        by_tar.setdefault(tar_ref, []).append((sample, member))
    rows = []
    for tar_ref, wanted in by_tar.items():
        found = recheck_tar(run_dir, tar_ref, wanted, index_dir, radius, backend)
        if found["missing"]:
            raise RunError(f"{tar_ref} lacks {len(found['missing'])} image(s) its sample rows name, e.g. {found['missing'][0]}")
        rows += [{k: v for k, v in r.items() if k not in ("image", "listed")} for r in found["rows"] if r["listed"]]
    return rows
