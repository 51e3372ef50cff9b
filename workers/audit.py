"""Reading a run back and measuring it: near-duplicate rates, sparsity, correction sizes.

Plain functions; ``jobs.audit`` fans ``recheck_unit`` out as Ray tasks, one per image tar, and
``workers.report`` draws the plots and writes the HTML.

The near-duplicate rate is computed from the images themselves when an index is given: each
PNG is decoded, encoded with the index's encoder and searched exactly, instead of trusting the
sample rows the generator wrote. Image references are resolved strictly inside the run
directory: a reference with an absolute path or ``..`` is an error, whatever wrote it.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import posixpath
import tarfile

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from spellshield.pipeline.records import HIT_SCHEMA, SAMPLE_SCHEMA
from spellshield.workers.unit_writer import HITS_DIR, IMAGES_DIR, SAMPLES_DIR

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


class RunError(ValueError):
    """A run directory that is missing, holds no finished unit, or points outside itself."""


def load_run(run_dir: str) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """(run.json, samples, hits) of a run; only finished units (those with a samples file)."""
    run_file = os.path.join(run_dir, "run.json")
    if not os.path.isfile(run_file):
        raise RunError(f"{run_dir} is not a run directory: no run.json")
    with open(run_file) as f:
        run = json.load(f)
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


def read_tar_images(tar_path: str) -> dict[str, np.ndarray]:
    """PNG members of one unit tar as uint8 RGB arrays, by member name."""
    out = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".png"):
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                    out[member.name] = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return out


_JUDGES: dict = {}  # index_dir -> workers.final_check.Judges (deterministic: same for every unit)


def recheck_unit(run_dir: str, refs: list[tuple[str, str]], index_dir: str, radius: float, backend: str = "exact") -> list[dict]:
    """Exact nearest corpus latent of each (sample, image reference), recomputed from the PNGs."""
    from spellshield.indexing.encoders import Encoder
    from spellshield.indexing.search import open_index
    from spellshield.workers.final_check import check_images, prepare_judges

    by_tar: dict[str, list[tuple[str, str]]] = {}
    for sample, ref in refs:
        tar_path, member = resolve_image_ref(run_dir, ref)
        by_tar.setdefault(tar_path, []).append((sample, member))
    shield = open_index(index_dir, backend=backend)
    encoder = Encoder(shield.manifest.latent.encoder).init()
    # issue 14: the perceptual and off-manifold judges, calibrated once per index per process
    judges = _JUDGES.get(index_dir) or _JUDGES.setdefault(index_dir, prepare_judges(shield, encoder))
    rows = []
    for tar_path, wanted in by_tar.items():
        images = read_tar_images(tar_path)
        missing = [m for _, m in wanted if m not in images]
        if missing:
            raise RunError(f"{tar_path} lacks {len(missing)} image(s) its sample rows name, e.g. {missing[0]}")
        for start in range(0, len(wanted), 64):
            chunk = wanted[start : start + 64]
            check = check_images(np.stack([images[m] for _, m in chunk]), encoder, shield, radius, judges)
            for j, (sample, _) in enumerate(chunk):
                rows.append({"sample": sample, "audit_nearest_id": int(check.ids[j]), "audit_nearest_key": check.keys[j],
                             "audit_nearest_distance": float(check.distances[j]), "audit_inside": bool(check.inside[j]),
                             **perceptual_audit_columns(check, j)})
    return rows


def perceptual_audit_columns(check, j: int) -> dict:
    """Issue 14: the second judges' columns of one rechecked image, beside the L2 ones."""
    return {"audit_perceptual_copy": bool(check.perceptual_copy[j]), "audit_perceptual_key": check.perceptual_keys[j],
            "audit_perceptual_distance": float(check.perceptual_distances[j]),
            "audit_perceptual_ssim": float(check.perceptual_ssim[j]), "audit_off_manifold": bool(check.off_manifold[j])}


def perceptual_summary(samples: pd.DataFrame) -> dict:
    """Issue 14: the perceptual judge's copy rate and the off-manifold rate, beside the L2 rate."""
    if "audit_perceptual_copy" not in samples:
        return {}
    return {"perceptual_copy": rate(samples["audit_perceptual_copy"].astype(bool)),
            "off_manifold": rate(samples["audit_off_manifold"].astype(bool))}


# -- statistics ------------------------------------------------------------------------------


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (better than p +- z se near 0 and 1)."""
    if trials <= 0:
        return (0.0, 1.0)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def corrected_share_per_step(samples: pd.DataFrame, hits: pd.DataFrame) -> pd.Series:
    """Share of trajectories the shield corrected at each step (the paper's sparsity figure)."""
    steps = int(samples["steps"].max()) if len(samples) else 0
    share = pd.Series(0.0, index=pd.RangeIndex(steps, name="step"))
    if len(hits) and len(samples):
        used = hits[hits["used"] & hits["sample"].isin(samples["sample"])]
        per_step = used.groupby("step")["sample"].nunique() / len(samples)
        share.loc[per_step.index] = per_step.values
    return share


def correction_ratios(hits: pd.DataFrame) -> np.ndarray:
    """correction_norm / model_output_norm, one value per corrected (sample, attempt, step)."""
    if not len(hits):
        return np.zeros(0)
    per_step = hits.drop_duplicates(["sample", "attempt", "step"])
    per_step = per_step[per_step["model_output_norm"] > 0]
    return (per_step["correction_norm"] / per_step["model_output_norm"]).to_numpy()


def rate(inside: pd.Series) -> dict:
    k, n = int(inside.sum()), int(len(inside))
    low, high = wilson_interval(k, n)
    return {"near_duplicates": k, "num_samples": n, "near_duplicate_rate": (k / n) if n else 0.0,
            "near_duplicate_rate_ci95": [low, high]}


def per_prompt_rates(samples: pd.DataFrame, inside: pd.Series) -> list[dict]:
    out = []
    frame = samples.assign(_inside=inside.values)
    for (index, prompt), group in frame.groupby(["prompt_index", frame["prompt"].fillna("")], sort=True):
        out.append({"prompt_index": int(index), "prompt": prompt or None, **rate(group["_inside"])})
    return out


def written_attempt_hits(samples: pd.DataFrame, hits: pd.DataFrame) -> pd.DataFrame:
    """Hit rows of the attempts that were written: a resampled attempt's hits belong to no image."""
    if not len(hits):
        return hits
    return hits.merge(samples.loc[samples["image"].notna(), ["sample", "attempt"]], on=["sample", "attempt"])


def summarize(run: dict, samples: pd.DataFrame, hits: pd.DataFrame, radius: float | None, inside: pd.Series | None) -> dict:
    """The numbers of summary.json for the written samples of a run (one row per written image)."""
    hits = written_attempt_hits(samples, hits)
    share = corrected_share_per_step(samples, hits)
    total_steps = float(samples["steps"].sum())
    ratios = correction_ratios(hits)
    config = run.get("config", {})
    summary = {
        "run": os.path.basename(os.path.normpath(config.get("out", ""))) or None,
        "num_samples": int(len(samples)),
        "radius": radius,
        "near_duplicate_rate": None,
        "near_duplicate_rate_ci95": None,
        "near_duplicates": None,
        "active_step_fraction": float(samples["active_steps"].sum() / total_steps) if total_steps else 0.0,
        "steps": int(samples["steps"].max()) if len(samples) else 0,
        "hits": int(len(hits)),
        "hits_by_source": {str(k): int(v) for k, v in hits.groupby("source").size().items()} if len(hits) else {},
        "corrected_share_per_step": [round(float(v), 6) for v in share.values],
        "correction_ratio_quantiles": {f"{q:g}": float(np.quantile(ratios, q)) for q in (0.5, 0.9, 0.99, 1.0)}
        if len(ratios) else {},
        "shielded": bool(config.get("index")),
        "per_prompt": [],
    }
    if inside is not None:
        summary.update({k: v for k, v in rate(inside).items() if k != "num_samples"})
        summary["per_prompt"] = per_prompt_rates(samples, inside)
    return summary


def corpus_image(index_dir: str, shield, global_id: int) -> np.ndarray:
    """The corpus image behind an index id: from its source tar when reachable, else decoded
    from the stored latent (exact for the pixels encoder)."""
    from spellshield.indexing.corpus import Sample, decode_image, expand_shards, iter_shard
    from spellshield.indexing.encoders import Encoder

    manifest = shield.manifest
    key = shield.keys([global_id])[0]
    corpus = manifest.build.get("corpus")
    shard_name = _source_shard(index_dir, manifest, global_id)
    if corpus and shard_name:
        try:
            for path in expand_shards(corpus):
                if os.path.basename(path) == shard_name:
                    for item in iter_shard(path):
                        if isinstance(item, Sample) and item.key == key:
                            return decode_image(item.image, manifest.latent.resolution)
        except (ValueError, OSError):
            pass
    vector = shield.vectors([global_id]).reshape(1, *manifest.latent.shape)
    return Encoder(manifest.latent.encoder).decode(vector)[0]


def _source_shard(index_dir: str, manifest, global_id: int) -> str | None:
    for shard in manifest.shards:
        if shard.first_id <= global_id <= shard.last_id:
            table = pq.read_table(os.path.join(index_dir, shard.ids_file), columns=["id", "shard"]).to_pandas()
            match = table.loc[table["id"] == global_id, "shard"]
            return str(match.iloc[0]) if len(match) else None
    return None
