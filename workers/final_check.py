"""The exact check of finished images against the shield: what is written is what is checked.

Images are taken as the uint8 pixels that go into the PNG, encoded with the index's own
encoder and searched exactly: the nearest corpus latent (knn, k = 1) and, when a radius is
given, whether any protected latent lies strictly inside it (range search, decided in float64).
The generation worker runs it on every sample before writing; the auditor runs it again from
the image files. With ``judges`` (``prepare_judges``) it also runs the two judges of
pipeline.judges on the same pixels: off-manifold (far from the corpus, or rough as noise) and
the perceptual copy judge (low-pass L2 and SSIM against the nearest protected images, taken
from the exact knn of the L2 check and decoded from the index).

The judges' thresholds are calibrated once per index, on protected images (decoded, for an
autoencoder space): by build-index's final step and ``spellshield index calibrate``
(``calibrate_with_judges``), stored as the index's judges-<sha>.json with its sha256 in the manifest,
and loaded (checked) by every generation worker and audit process (``prepare_judges``).
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from spellshield.indexing.calibrate import calibrate_index, sample_corpus, sample_ids
from spellshield.indexing.encoders import Encoder
from spellshield.indexing.manifest import (JUDGES, IndexFormatError, file_sha256, read_listed_bytes, read_listed_json,
                                           write_listed_bytes, write_listed_json)
from spellshield.pipeline import judges as judge_math

# The perceptual judge compares each image with this many of its nearest protected latents (the
# exact knn of the L2 check): a protected image under noise keeps its original as the L2-nearest
# (noise adds about the same to every distance), so the original is among them.
PERCEPTUAL_CANDIDATES = 8
# Protected images the perceptual thresholds are calibrated on (all of them below this count):
# drawn with a fixed seed (indexing.calibrate.sample_ids), so every process computes the same
# thresholds. A sample of a larger corpus has larger 1-NN distances than the corpus: the radius
# errs on the strict side.
CALIBRATION_SAMPLE = 1000
JUDGES_FORMAT = 1
DECODE_BATCH = 256
DESCRIPTORS = "descriptors-{}.npy"  # a descriptor judge's protected descriptors, named by content


def judge_settings() -> dict:
    """The constants of pipeline.judges a calibration depends on: a stored calibration made with
    other ones is stale, and the judges are calibrated afresh instead (and say so)."""
    return {"format": JUDGES_FORMAT, "blur_fraction": judge_math.BLUR_FRACTION, "ssim_window": judge_math.SSIM_WINDOW,
            "ssim_quantile": judge_math.SSIM_QUANTILE, "radius_rule": judge_math.RADIUS_RULE,
            "roughness_factor": judge_math.ROUGHNESS_FACTOR, "roughness_quantile": judge_math.ROUGHNESS_QUANTILE}


@dataclass(frozen=True)
class DescriptorJudge:
    """A copy-detection model the user brings (TorchScript: (B, 3, H, W) float in [0, 1] -> (B, d)),
    every protected image's unit descriptor by index id, and the threshold (pipeline.judges)."""

    module: object
    protected: np.ndarray  # float32 (N, d)
    threshold: float
    path: str


@dataclass(frozen=True)
class Judges:
    """What the final check judges besides the L2 ball (pipeline.judges), calibrated once."""

    perceptual: judge_math.PerceptualThresholds
    corpus_nn_quantile: float | None  # the index's corpus 1-NN distance quantile (off-manifold scale)
    roughness_limit: float  # off-manifold above this roughness (from the same corpus sample)
    source: str = "computed"  # "stored": the index's judges-<sha>.json; "computed": calibrated in this process
    descriptor: DescriptorJudge | None = None  # only from a stored calibration made with --descriptor


@dataclass(frozen=True)
class FinalCheck:
    ids: np.ndarray  # int64 (B,): nearest corpus latent
    keys: list[str]
    distances: np.ndarray  # float64 (B,)
    inside: np.ndarray | None  # bool (B,): some protected latent strictly within the radius
    # pipeline.judges, when check_images was given judges (else None):
    off_manifold: np.ndarray | None = None  # bool (B,)
    roughness: np.ndarray | None = None  # float64 (B,)
    perceptual_ids: np.ndarray | None = None  # int64 (B,): the closest protected latent in the low-pass space
    perceptual_keys: list[str] | None = None  # its corpus key
    perceptual_distances: np.ndarray | None = None  # float64 (B,): low-pass L2 to it
    perceptual_ssim: np.ndarray | None = None  # float64 (B,): best SSIM over the candidates
    perceptual_copy: np.ndarray | None = None  # bool (B,): the low-pass judge's call
    # the descriptor judge, when the index's judges have one (else None); a breach like perceptual_copy:
    descriptor_ids: np.ndarray | None = None  # int64 (B,): the most similar protected image
    descriptor_keys: list[str] | None = None
    descriptor_similarity: np.ndarray | None = None  # float64 (B,): cosine similarity with it
    descriptor_copy: np.ndarray | None = None  # bool (B,)

    @property
    def copy_judged(self) -> np.ndarray | None:
        """A copy by the perceptual judge or the descriptor judge: what the breach policy counts."""
        if self.perceptual_copy is None:
            return None
        return self.perceptual_copy | self.descriptor_copy if self.descriptor_copy is not None else self.perceptual_copy


def decode_latents(encoder, vectors, shape) -> np.ndarray:
    """uint8 (N, H, W, 3) of flat latents (N, D) as the model would write them (the pixel
    encoder: the images exactly; an autoencoder: decoded), a batch at a time."""
    vectors = torch.as_tensor(vectors)
    return np.concatenate([np.asarray(encoder.decode(vectors[i : i + DECODE_BATCH].reshape(-1, *shape)), dtype=np.uint8)
                           for i in range(0, len(vectors), DECODE_BATCH)])


def corpus_images(shield, encoder, ids: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) of indexed latents as the model would write them."""
    return decode_latents(encoder, shield.vectors(np.asarray(ids, dtype=np.int64)), tuple(shield.manifest.latent.shape))


def judge_calibration(vectors, shape, encoder, seed: int) -> dict:
    """The judges' thresholds from sampled corpus latents (N, D): the content of the index's judges file."""
    images = decode_latents(encoder, vectors, tuple(shape))
    thresholds = judge_math.calibrate(images)
    return {"settings": judge_settings(), "seed": seed, "sample_size": len(images),
            "perceptual": {"radius": thresholds.radius, "ssim_threshold": thresholds.ssim_threshold,
                           "sample_size": thresholds.sample_size, "rule": thresholds.rule},
            "roughness_limit": judge_math.roughness_limit(images)}


def load_descriptor(path: str, sha256: str | None = None):
    """The TorchScript copy-detection module at ``path``; with ``sha256`` (the one the index was
    calibrated with) a changed or missing file fails closed with IndexFormatError."""
    if not os.path.isfile(path):
        raise IndexFormatError(f"descriptor module {path} does not exist")
    if sha256 is not None and file_sha256(path) != sha256:
        raise IndexFormatError(f"descriptor module {path} is not the one the index's judges were calibrated with "
                               "(sha256 differs): refusing to judge with it; run `spellshield index calibrate` again")
    try:
        return torch.jit.load(path, map_location="cpu").eval()
    except (RuntimeError, ValueError) as exc:
        raise IndexFormatError(f"descriptor module {path} is not a TorchScript module: {str(exc).splitlines()[0]}") from None


def describe(module, images_uint8: np.ndarray) -> np.ndarray:
    """Unit descriptors (B, d) float32 of uint8 images (B, H, W, 3), the module fed [0, 1] floats."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    with torch.no_grad():
        out = module(x)
    return judge_math.unit_rows(out.reshape(len(x), -1).cpu().numpy())


def store_judges(index_dir: str, manifest, encoder, sample_size: int = CALIBRATION_SAMPLE, seed: int = 0,
                 descriptor: str | None = None, out_dir: str | None = None) -> dict:
    """Calibrate the judges on the index in ``index_dir`` (its shards read one at a time) and write
    judges-<sha>.json into ``out_dir`` (default: ``index_dir``); returns the manifest entry
    {file, sha256} for ``calibration["judges"]``. With ``descriptor`` (a TorchScript file) also the
    descriptor of every protected image (descriptors-<sha>.npy, in the entry's ``files``) and the
    descriptor judge's threshold."""
    out_dir = out_dir or index_dir
    _, vectors = sample_corpus(index_dir, manifest, sample_size, seed)
    payload = judge_calibration(vectors, manifest.latent.shape, encoder, seed)
    files = {}
    if descriptor:
        module = load_descriptor(descriptor)
        ids, everything = sample_corpus(index_dir, manifest, int(manifest.count), seed)  # all of them, in id order
        protected = np.concatenate([describe(module, decode_latents(encoder, everything[i : i + DECODE_BATCH], manifest.latent.shape))
                                    for i in range(0, len(everything), DECODE_BATCH)])
        buffer = io.BytesIO()
        np.save(buffer, protected)
        stored = write_listed_bytes(out_dir, DESCRIPTORS, buffer.getvalue())
        files[stored["file"]] = stored["sha256"]
        payload["descriptor"] = {"module": os.path.abspath(descriptor), "module_sha256": file_sha256(descriptor),
                                 "descriptors": stored["file"], "count": len(protected), "dim": int(protected.shape[1]),
                                 "threshold": judge_math.descriptor_threshold(protected),
                                 "quantile": judge_math.DESCRIPTOR_QUANTILE}
    entry = write_listed_json(out_dir, JUDGES, payload)
    return {**entry, "files": files} if files else entry


def calibrate_with_judges(index_dir: str, manifest, encoder=None, descriptor: str | None = None,
                          out_dir: str | None = None, **options) -> dict:
    """The manifest's calibration (indexing.calibrate.calibrate_index, ``options``) with the
    judges' calibration stored beside it, or in ``out_dir`` (a new file: the caller's manifest
    rewrite makes it the one listed): build-index's final step and ``index calibrate``."""
    calibration = calibrate_index(index_dir, manifest, **options)
    if encoder is None:
        encoder = Encoder(manifest.latent.encoder, device="cuda" if torch.cuda.is_available() else "cpu").init()
    calibration["judges"] = store_judges(index_dir, manifest, encoder, seed=options.get("seed", 0), descriptor=descriptor,
                                         out_dir=out_dir)
    return calibration


def _descriptor_judge(index_dir: str, manifest, stored: dict) -> DescriptorJudge:
    files = manifest.calibration["judges"].get("files") or {}
    if stored["descriptors"] not in files:
        raise IndexFormatError(f"the manifest of {index_dir} does not list {stored['descriptors']}")
    protected = np.load(io.BytesIO(read_listed_bytes(index_dir, stored["descriptors"], files[stored["descriptors"]])))
    return DescriptorJudge(module=load_descriptor(stored["module"], stored["module_sha256"]), protected=protected,
                           threshold=float(stored["threshold"]), path=stored["module"])


def _judges(payload: dict, manifest, source: str) -> Judges:
    quantiles = (manifest.calibration or {}).get("nn_distance_quantiles") or {}
    scale = quantiles.get(judge_math.DISTANCE_QUANTILE)
    perceptual = payload["perceptual"]
    return Judges(perceptual=judge_math.PerceptualThresholds(
                      radius=float(perceptual["radius"]), ssim_threshold=float(perceptual["ssim_threshold"]),
                      sample_size=int(perceptual["sample_size"]), rule=perceptual["rule"]),
                  corpus_nn_quantile=float(scale) if scale else None,
                  roughness_limit=float(payload["roughness_limit"]), source=source)


def prepare_judges(shield, encoder, sample_size: int = CALIBRATION_SAMPLE, seed: int = 0) -> Judges:
    """The judges of ``shield``'s index: its stored calibration (judges-<sha>.json, checked against the
    manifest's sha256: missing or changed fails closed with IndexFormatError), or, for an index
    without one (built before it existed) or with a stale one, calibrated here on protected
    images, saying so on stderr."""
    manifest = shield.manifest
    if manifest.judges_file:
        name, sha256 = manifest.judges_file
        payload = read_listed_json(shield.index_dir, name, sha256)
        if payload.get("settings") == judge_settings():
            try:
                judges = _judges(payload, manifest, "stored")
                if payload.get("descriptor"):
                    judges = dataclasses.replace(judges, descriptor=_descriptor_judge(shield.index_dir, manifest,
                                                                                      payload["descriptor"]))
                return judges
            except IndexFormatError:
                raise
            except (KeyError, TypeError, ValueError) as exc:
                raise IndexFormatError(f"{shield.index_dir}/{name} is not a judge calibration: {exc!r}") from None
        why = f"its {name} was calibrated with other judge settings"
    else:
        why = "it has no stored judge calibration"
    started = time.time()
    ids = sample_ids(int(manifest.count), sample_size, seed)
    judges = _judges(judge_calibration(shield.vectors(ids), manifest.latent.shape, encoder, seed), manifest, "computed")
    print(f"spellshield: index {shield.index_dir}: {why}; calibrated the judges here on {len(ids)} protected images "
          f"({time.time() - started:.1f} s, in every generation worker and audit process); "
          f"`spellshield index calibrate {shield.index_dir}` stores it once", file=sys.stderr, flush=True)
    return judges


def check_images(images_uint8: np.ndarray, encoder, shield, radius: float | None = None,
                 judges: Judges | None = None) -> FinalCheck:
    """Exact nearest corpus latent of each image (B, H, W, 3) uint8, and the inside-shield flag;
    with ``judges`` also the off-manifold and perceptual-copy verdicts (pipeline.judges)."""
    resolution = shield.manifest.latent.resolution
    if images_uint8.shape[1:3] != (resolution, resolution):
        raise ValueError(
            f"images are {images_uint8.shape[1]}x{images_uint8.shape[2]}, the index was built at {resolution}x{resolution}"
        )
    latents = encoder.encode(images_uint8).reshape(len(images_uint8), -1)
    found = shield.knn(latents, PERCEPTUAL_CANDIDATES if judges is not None else 1)
    ids = np.array([f[0][0] for f in found], dtype=np.int64)
    distances = np.array([float(f[1][0]) for f in found], dtype=np.float64)
    inside = None
    if radius is not None:
        inside = np.array([len(hit_ids) > 0 for hit_ids, _ in shield.range_search(latents, radius)], dtype=bool)
    check = FinalCheck(ids=ids, keys=shield.keys(ids), distances=distances, inside=inside)
    if judges is None:
        return check
    # every image gets K candidates (an index smaller than K: its last one repeated)
    k = max(len(f[0]) for f in found)
    cand_ids = np.array([[int(f[0][min(j, len(f[0]) - 1)]) for j in range(k)] for f in found], dtype=np.int64)
    candidates = corpus_images(shield, encoder, cand_ids.reshape(-1)).reshape(len(found), k, *images_uint8.shape[1:])
    verdict = judge_math.judge(images_uint8, candidates, judges.perceptual)
    closest = cand_ids[np.arange(len(found)), verdict.index]
    if judges.descriptor is not None:  # against every protected image: its copies need not be L2 neighbours
        similarity = describe(judges.descriptor.module, images_uint8) @ judges.descriptor.protected.T
        best = similarity.argmax(axis=1).astype(np.int64)
        score = similarity[np.arange(len(best)), best].astype(np.float64)
        check = dataclasses.replace(check, descriptor_ids=best, descriptor_keys=shield.keys(best), descriptor_similarity=score,
                                    descriptor_copy=score > judges.descriptor.threshold)
    return dataclasses.replace(
        check, off_manifold=judge_math.off_manifold(images_uint8, distances, judges.corpus_nn_quantile, judges.roughness_limit),
        roughness=judge_math.roughness(images_uint8), perceptual_ids=closest.astype(np.int64), perceptual_keys=shield.keys(closest),
        perceptual_distances=verdict.distance, perceptual_ssim=verdict.ssim, perceptual_copy=verdict.copy,
    )
