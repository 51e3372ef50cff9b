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


# The columns of a rechecked image: the L2 judge's, then the second judges' (perceptual_audit_columns).
L2_COLUMNS = ("audit_nearest_id", "audit_nearest_key", "audit_nearest_distance", "audit_inside")
JUDGE_COLUMNS = ("audit_perceptual_copy", "audit_perceptual_id", "audit_perceptual_key", "audit_perceptual_distance",
                 "audit_perceptual_ssim", "audit_off_manifold", "audit_descriptor_copy", "audit_descriptor_id",
                 "audit_descriptor_key", "audit_descriptor_similarity")


def perceptual_audit_columns(check, j: int) -> dict:
    """The second judges' columns of one rechecked image, beside the L2 ones."""
    return {"audit_perceptual_copy": bool(check.perceptual_copy[j]), "audit_perceptual_id": int(check.perceptual_ids[j]),
            "audit_perceptual_key": check.perceptual_keys[j],
            "audit_perceptual_distance": float(check.perceptual_distances[j]),
            "audit_perceptual_ssim": float(check.perceptual_ssim[j]), "audit_off_manifold": bool(check.off_manifold[j]),
            **({"audit_descriptor_copy": bool(check.descriptor_copy[j]), "audit_descriptor_id": int(check.descriptor_ids[j]),
                "audit_descriptor_key": check.descriptor_keys[j],
                "audit_descriptor_similarity": float(check.descriptor_similarity[j])} if check.descriptor_copy is not None else
               {"audit_descriptor_copy": None, "audit_descriptor_id": None, "audit_descriptor_key": None,
                "audit_descriptor_similarity": None})}


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
                         "audit_nearest_id": int(check.ids[j]), "audit_nearest_key": check.keys[j],
                         "audit_nearest_distance": float(check.distances[j]), "audit_inside": bool(check.inside[j]),
                         **perceptual_audit_columns(check, j)})
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
