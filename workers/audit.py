"""Reading a run's audit logs and images back, and turning them into rates, plots and a report.

Plain functions; ``jobs.audit`` fans ``recheck_unit`` out as Ray tasks, one per image tar.

The near-duplicate rate is computed from the images themselves when an index is given: each
PNG is decoded, encoded with the index's encoder and searched exactly, instead of trusting the
sample rows the generator wrote.
"""

from __future__ import annotations

import glob
import html
import io
import json
import os
import tarfile

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from pipeline.records import HIT_SCHEMA, SAMPLE_SCHEMA
from workers.unit_writer import HITS_DIR, IMAGES_DIR, SAMPLES_DIR


class RunError(ValueError):
    """A run directory that is missing or holds no finished unit."""


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


def read_unit_images(tar_path: str) -> tuple[list[str], np.ndarray]:
    """Sample keys and uint8 RGB images of one unit tar, in file order."""
    keys, images = [], []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".png"):
                keys.append(member.name[: -len(".png")])
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                    images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return keys, (np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8))


def recheck_unit(tar_path: str, index_dir: str, radius: float, backend: str = "exact") -> list[dict]:
    """Exact nearest corpus latent of every image in ``tar_path``, recomputed from the PNGs."""
    from indexing.encoders import Encoder
    from indexing.search import open_index
    from workers.final_check import check_images

    keys, images = read_unit_images(tar_path)
    if not keys:
        return []
    shield = open_index(index_dir, backend=backend)
    encoder = Encoder(shield.manifest.latent.encoder).init()
    rows = []
    for start in range(0, len(keys), 64):
        check = check_images(images[start : start + 64], encoder, shield, radius)
        for j, key in enumerate(keys[start : start + 64]):
            rows.append({"sample": key, "audit_nearest_id": int(check.ids[j]), "audit_nearest_key": check.keys[j],
                         "audit_nearest_distance": float(check.distances[j]), "audit_inside": bool(check.inside[j])})
    return rows


def unit_tars(run_dir: str, samples: pd.DataFrame) -> list[str]:
    names = sorted({f"unit-{int(u):05d}.tar" for u in samples["unit"]})
    return [os.path.join(run_dir, IMAGES_DIR, n) for n in names]


def corrected_share_per_step(samples: pd.DataFrame, hits: pd.DataFrame) -> pd.Series:
    """Share of trajectories the shield corrected at each step (the paper's sparsity figure)."""
    steps = int(samples["steps"].max()) if len(samples) else 0
    share = pd.Series(0.0, index=pd.RangeIndex(steps, name="step"))
    if len(hits) and len(samples):
        used = hits[hits["used"]]
        per_step = used.groupby("step")["sample"].nunique() / len(samples)
        share.loc[per_step.index] = per_step.values
    return share


def summarize(run: dict, samples: pd.DataFrame, hits: pd.DataFrame, radius: float | None, inside: pd.Series | None) -> dict:
    written = samples[samples["image"].notna()]
    # only the attempts that were written: a resampled attempt's hits are not those of any image
    written_hits = hits.merge(written[["sample", "attempt"]], on=["sample", "attempt"]) if len(hits) else hits
    share = corrected_share_per_step(written, written_hits)
    total_steps = float(written["steps"].sum())
    summary = {
        "run": os.path.basename(os.path.normpath(run.get("config", {}).get("out", ""))) or None,
        "num_samples": int(len(written)),
        "radius": radius,
        "near_duplicate_rate": None,
        "near_duplicates": None,
        "active_step_fraction": float(written["active_steps"].sum() / total_steps) if total_steps else 0.0,
        "steps": int(written["steps"].max()) if len(written) else 0,
        "hits": int(len(hits)),
        "hits_by_source": {str(k): int(v) for k, v in hits.groupby("source").size().items()} if len(hits) else {},
        "corrected_share_per_step": [round(float(v), 6) for v in share.values],
        "max_correction_ratio_mean": float(written["max_correction_ratio"].mean()) if len(written) else 0.0,
        "shielded": bool(run.get("config", {}).get("index")),
    }
    if inside is not None:
        summary["near_duplicates"] = int(inside.sum())
        summary["near_duplicate_rate"] = float(inside.mean()) if len(inside) else 0.0
    return summary


def plot_corrected_share(share: list[float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.bar(range(len(share)), share, color="#3a6ea5", width=0.85)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("share of trajectories corrected")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(audit_dir: str, summary: dict, offenders: pd.DataFrame) -> str:
    """audit/report.html: the numbers, the per-step plot and the closest samples."""
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in summary.items() if k != "corrected_share_per_step")
    worst = offenders.to_html(index=False, escape=True, float_format=lambda v: f"{v:.4f}") if len(offenders) else "<p>none</p>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>spellshield audit</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:left}}</style></head><body>
<h1>spellshield audit: {html.escape(str(summary.get('run')))}</h1>
<table>{rows}</table>
<h2>Share of trajectories corrected at each step</h2>
<img src="corrected_per_step.png" alt="share of trajectories corrected per step">
<h2>Closest samples to the corpus</h2>{worst}
</body></html>
"""
    path = os.path.join(audit_dir, "report.html")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(page)
    os.replace(tmp, path)
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
    return "-" if value is None else str(value)
