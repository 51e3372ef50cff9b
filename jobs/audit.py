"""audit: near-duplicate rate, per-step sparsity and a report for one generation run.

    spellshield audit RUN_DIR [--index INDEX_DIR] [--radius R]

With ``--index`` every written image is re-encoded from its PNG and searched exactly (one Ray
task per unit tar); the rate is the share of samples strictly within the radius of an indexed
latent. Without it, the rate comes from the sample rows the generator wrote, when they have
one. Writes RUN_DIR/audit/summary.json, report.html and corrected_per_step.png.
"""

from __future__ import annotations

import argparse
import os

import pandas as pd

from indexing.manifest import read_manifest, write_json_atomic
from jobs.runtime import UsageError, progress, ray_cluster
from workers.audit import (
    RunError,
    load_run,
    plot_corrected_share,
    recheck_unit,
    summarize,
    unit_tars,
    write_report,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by generate")
    parser.add_argument("--index", default=None, help="recompute every image's nearest neighbour in this index")
    parser.add_argument("--radius", type=float, default=None, help="near-duplicate radius (default: the run's, else the index's)")
    parser.add_argument("--top", type=int, default=20, help="closest samples listed in the report")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")


def audit(run_dir: str, index: str | None = None, radius: float | None = None, top: int = 20) -> dict:
    """Python API: audit ``run_dir``; returns the summary. Uses Ray when an index is given."""
    try:
        run, samples, hits = load_run(run_dir)
    except RunError as exc:
        raise UsageError(str(exc)) from None
    if radius is not None and not radius > 0:
        raise UsageError(f"--radius must be > 0, got {radius}")
    run_radius = run.get("config", {}).get("radius")
    manifest = read_manifest(index) if index else None
    radius = radius or run_radius or (manifest.suggested_radius if manifest else None)
    inside = None
    samples = samples[samples["image"].notna()].reset_index(drop=True)
    if index is not None:
        if radius is None:
            raise UsageError("no radius: pass --radius (the run and the index have none)")
        import ray

        with ray_cluster():
            task = ray.remote(recheck_unit).options(num_cpus=0.5)
            parts = ray.get([task.remote(path, os.path.abspath(index), radius) for path in unit_tars(run_dir, samples)])
        rechecked = pd.DataFrame([row for part in parts for row in part])
        samples = samples.merge(rechecked, on="sample", how="left")
        missing = samples["audit_inside"].isna().sum()
        if missing:
            raise UsageError(f"{missing} sample rows have no image in {run_dir}/images")
        inside = samples["audit_inside"].astype(bool)
        distance_column, key_column = "audit_nearest_distance", "audit_nearest_key"
    else:
        if samples["inside_shield"].notna().all() and len(samples):
            inside = samples["inside_shield"].astype(bool)
        distance_column, key_column = "nearest_distance", "nearest_key"
    summary = summarize(run, samples, hits, radius, inside)
    summary["index"] = os.path.abspath(index) if index else run.get("config", {}).get("index")
    summary["recomputed_from_images"] = index is not None
    audit_dir = os.path.join(run_dir, "audit")
    os.makedirs(audit_dir, exist_ok=True)
    plot_corrected_share(summary["corrected_share_per_step"], os.path.join(audit_dir, "corrected_per_step.png"),
                         f"{summary['num_samples']} samples, radius {radius if radius is None else round(radius, 4)}")
    offenders = pd.DataFrame()
    if samples[distance_column].notna().any():
        offenders = samples.nsmallest(top, distance_column)[["sample", "seed", "prompt", key_column, distance_column, "active_steps"]]
    summary["report"] = write_report(audit_dir, summary, offenders)
    write_json_atomic(os.path.join(audit_dir, "summary.json"), summary)
    return summary


def run(args) -> int:
    if args.radius is not None and not args.radius > 0:
        raise UsageError(f"--radius must be > 0, got {args.radius}")
    with ray_cluster(args.address):
        summary = audit(args.run_dir, args.index, args.radius, args.top)
    rate = summary["near_duplicate_rate"]
    progress(f"audit: {summary['num_samples']} samples, near-duplicate rate "
             f"{'n/a' if rate is None else f'{rate:.3%}'}, active step fraction {summary['active_step_fraction']:.3%}; "
             f"report: {summary['report']}")
    return 0


def main(argv=None) -> int:
    from jobs.cli import run_single

    return run_single("audit", argv)


if __name__ == "__main__":
    raise SystemExit(main())
