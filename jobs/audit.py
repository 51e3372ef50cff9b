"""audit: near-duplicate rates, per-step sparsity and a report for a generation run.

    spellshield audit RUN_DIR [--index INDEX_DIR] [--radius R] [--top N] [--compare RUN_B]

With ``--index`` every written image is re-encoded from its PNG and searched exactly (one Ray
task per unit tar): the rate is the share of samples strictly within the radius of an indexed
latent, with a 95% Wilson interval, overall and per prompt. Without it, the rate comes from the
sample rows the generator wrote, when they have one. Writes RUN_DIR/audit/summary.json,
report.html and its PNGs; with ``--compare RUN_B`` also RUN_DIR/audit/compare.html.
"""

from __future__ import annotations

import argparse
import os

import pandas as pd

from spellshield.indexing.manifest import read_manifest, write_json_atomic
from spellshield.jobs.runtime import UsageError, progress, ray_cluster
from spellshield.workers.audit import (
    RunError,
    corpus_image,
    correction_ratios,
    load_run,
    perceptual_summary,
    read_tar_images,
    recheck_unit,
    resolve_image_ref,
    summarize,
    written_attempt_hits,
)
from spellshield.workers.report import plot_correction_ratios, plot_corrected_share, save_pair, write_comparison, write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by generate")
    parser.add_argument("--index", default=None, help="recompute every image's nearest neighbour in this index")
    parser.add_argument("--radius", type=float, default=None, help="near-duplicate radius (default: the run's, else the index's)")
    parser.add_argument("--top", type=int, default=12, help="offending corpus images shown in the report (default 12)")
    parser.add_argument("--compare", default=None, metavar="RUN_B", help="a second run to put side by side")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")


def audit(run_dir: str, index: str | None = None, radius: float | None = None, top: int = 12) -> dict:
    """Python API: audit ``run_dir``; returns the summary. Uses Ray when an index is given."""
    try:
        run, samples, hits = load_run(run_dir)
        if radius is not None and not radius > 0:
            raise UsageError(f"--radius must be > 0, got {radius}")
        index = index or run.get("config", {}).get("index")
        manifest = read_manifest(index) if index else None
        radius = radius or run.get("config", {}).get("radius") or (manifest.suggested_radius if manifest else None)
        samples = samples[samples["image"].notna()].reset_index(drop=True)
        for ref in samples["image"]:
            resolve_image_ref(run_dir, ref)  # refuse before any work: a reference must stay inside the run
        inside = None
        if index is not None:
            if radius is None:
                raise UsageError("no radius: pass --radius (the run and the index have none)")
            samples = samples.merge(_recheck(run_dir, samples, index, radius), on="sample", how="left")
            inside = samples["audit_inside"].astype(bool)
        elif len(samples) and samples["inside_shield"].notna().all():
            inside = samples["inside_shield"].astype(bool)
    except RunError as exc:
        raise UsageError(str(exc)) from None
    summary = summarize(run, samples, hits, radius, inside)
    summary["second_judges"] = perceptual_summary(samples)  # issue 14: perceptual copies, off-manifold
    summary["index"] = os.path.abspath(index) if index else None
    summary["recomputed_from_images"] = index is not None
    audit_dir = os.path.join(run_dir, "audit")
    os.makedirs(audit_dir, exist_ok=True)
    plot_corrected_share({summary["run"] or "run": summary["corrected_share_per_step"]},
                         os.path.join(audit_dir, "corrected_per_step.png"),
                         f"{summary['num_samples']} samples, radius {radius if radius is None else round(radius, 4)}")
    plot_correction_ratios(correction_ratios(written_attempt_hits(samples, hits)), os.path.join(audit_dir, "correction_ratio.png"))
    offenders = _offenders(run_dir, samples, index, top, audit_dir) if index is not None else []
    summary["top_offenders"] = [{k: v for k, v in o.items() if k != "thumbnail"} for o in offenders]
    summary["report"] = write_report(audit_dir, summary, offenders)
    write_json_atomic(os.path.join(audit_dir, "summary.json"), summary)
    return summary


def _recheck(run_dir: str, samples: pd.DataFrame, index: str, radius: float) -> pd.DataFrame:
    import ray

    task = ray.remote(recheck_unit).options(num_cpus=0.5)
    with ray_cluster():
        parts = ray.get([
            task.remote(os.path.abspath(run_dir), list(zip(group["sample"], group["image"])), os.path.abspath(index), radius)
            for _, group in samples.groupby("unit")
        ])
    return pd.DataFrame([row for part in parts for row in part])


def _offenders(run_dir: str, samples: pd.DataFrame, index: str, top: int, audit_dir: str) -> list[dict]:
    """Corpus images most copied: those with samples inside the radius first, then the closest."""
    from spellshield.indexing.search import open_index

    if top <= 0 or not len(samples):
        return []
    grouped = samples.groupby("audit_nearest_id").agg(
        corpus_key=("audit_nearest_key", "first"), samples_inside=("audit_inside", "sum"),
        min_distance=("audit_nearest_distance", "min"))
    grouped = grouped.sort_values(["samples_inside", "min_distance"], ascending=[False, True]).head(top)
    shield = open_index(index)
    thumbs = os.path.join(audit_dir, "thumbs")
    os.makedirs(thumbs, exist_ok=True)
    out = []
    for rank, (corpus_id, row) in enumerate(grouped.iterrows()):
        closest = samples[samples["audit_nearest_id"] == corpus_id].nsmallest(1, "audit_nearest_distance").iloc[0]
        tar_path, member = resolve_image_ref(run_dir, closest["image"])
        generated = read_tar_images(tar_path)[member]
        name = f"offender-{rank:03d}.png"
        save_pair(generated, corpus_image(index, shield, int(corpus_id)), os.path.join(thumbs, name))
        out.append({"corpus_id": int(corpus_id), "corpus_key": str(row["corpus_key"]), "samples_inside": int(row["samples_inside"]),
                    "min_distance": float(row["min_distance"]), "closest_sample": str(closest["sample"]),
                    "thumbnail": f"thumbs/{name}"})
    return out


def compare(run_a: str, run_b: str, summary_a: dict, summary_b: dict) -> str:
    """RUN_A/audit/compare.html: the two summaries side by side, per-step shares overlaid."""
    audit_dir = os.path.join(run_a, "audit")
    name_a = summary_a["run"] or "A"
    name_b = summary_b["run"] or "B"
    if name_b == name_a:
        name_b += " (B)"
    plot_corrected_share({name_a: summary_a["corrected_share_per_step"], name_b: summary_b["corrected_share_per_step"]},
                         os.path.join(audit_dir, "compare_corrected_per_step.png"), "share of trajectories corrected")
    return write_comparison(os.path.join(audit_dir, "compare.html"), {name_a: summary_a, name_b: summary_b},
                            "compare_corrected_per_step.png")


def _describe(summary: dict) -> str:
    rate = summary["near_duplicate_rate"]
    if rate is None:
        return f"{summary['num_samples']} samples, near-duplicate rate n/a"
    low, high = summary["near_duplicate_rate_ci95"]
    return (f"{summary['num_samples']} samples, near-duplicate rate {rate:.3%} (95% CI {low:.3%} to {high:.3%}), "
            f"active step fraction {summary['active_step_fraction']:.3%}")


def run(args) -> int:
    if args.radius is not None and not args.radius > 0:
        raise UsageError(f"--radius must be > 0, got {args.radius}")
    for path in filter(None, (args.run_dir, args.compare)):
        if not os.path.isfile(os.path.join(path, "run.json")):
            raise UsageError(f"{path} is not a run directory: no run.json")
    with ray_cluster(args.address):
        summary = audit(args.run_dir, args.index, args.radius, args.top)
        progress(f"audit: {args.run_dir}: {_describe(summary)}; report: {summary['report']}")
        if args.compare:
            other = audit(args.compare, args.index, args.radius, args.top)
            progress(f"audit: {args.compare}: {_describe(other)}")
            progress(f"audit: comparison: {compare(args.run_dir, args.compare, summary, other)}")
    return 0


def main(argv=None) -> int:
    from spellshield.jobs.cli import run_single

    return run_single("audit", argv)


if __name__ == "__main__":
    raise SystemExit(main())
