"""audit: near-duplicate rates, completeness, the collapse warning, a gate and a report for a run.

    spellshield audit RUN_DIR [--index INDEX_DIR] [--radius R] [--top N] [--compare RUN_B]
                              [--fail-above RATE [--fail-on upper|rate]]

With an index (``--index``, else the run's own) every image file of ``images/*.tar`` is
re-encoded from its bytes and searched exactly (one Ray task per tar): the rate is the share of
images strictly within the radius of an indexed latent, with a 95% Wilson interval, overall and
per prompt. Images no sample row names are audited too and make the run incomplete. Without an
index, the rate comes from the sample rows the generator wrote, when they have one.

The run on disk is checked against its plan (auditing.completeness), the collapse criteria are
evaluated (auditing.collapse), and with ``--fail-above`` the verdict decides the exit status:
0 pass, 1 fail (rate above the limit, or the run incomplete), 2 bad input. Writes
RUN_DIR/audit/summary.json (with ``schema_version`` and ``verdict``), report.html and its
PNGs; with ``--compare RUN_B`` also RUN_DIR/audit/compare.html. The gate applies to RUN_DIR.

RUN_DIR, RUN_B and the index may be ``s3://`` / ``gs://`` URIs: a remote run is read through its
commit records (committed units only) and its report is written back to its own ``audit/``
prefix (``auditing.run_files``); the index is searched from each node's verified cache.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pandas as pd

from spellshield.auditing.collapse import assess_collapse
from spellshield.auditing.completeness import EXAMPLES, check_completeness
from spellshield.auditing.corpus_images import corpus_image
from spellshield.auditing.report import (comparison_warnings, plot_corrected_share, plot_correction_ratios,
                                         plot_nearest_distances, rate_text, save_pair, save_pair_grid, write_comparison,
                                         write_report)
from spellshield.auditing.run_files import (RunError, check_run, image_tars, load_run, local_run, read_tar_images, report_dir,
                                            resolve_image_ref)
from spellshield.auditing.stats import correction_ratios, perceptual_summary, written_attempt_hits
from spellshield.auditing.summary import summarize, verdict
from spellshield.indexing.manifest import manifest_hash, read_manifest, write_json_atomic
from spellshield.jobs.progress import ProgressBar
from spellshield.jobs.checks import from_args
from spellshield.jobs.runtime import UsageError, progress, ray_cluster
from spellshield.pipeline.config import AuditConfig, GateConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("exit status: 0 audited (and, with --fail-above, passed); 1 the gate failed: the rate is above "
                     "--fail-above, or the run is incomplete (units missing against its plan, images no sample row "
                     "names, images that do not decode); 2 bad input")
    AuditConfig.add_arguments(parser)  # every option, default and help declared once, in pipeline.config
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")


def _radius(radius, run: dict, manifest) -> tuple[float | None, str | None]:
    if radius is not None:
        return radius, "--radius"
    shield = (run.get("config") or {}).get("shield") or {}
    if shield.get("radius"):
        return shield["radius"], "the run's shield radius"
    if manifest is not None and manifest.suggested_radius:
        return manifest.suggested_radius, "the index's suggested radius"
    return None, None


def audit(run_dir: str, index: str | None = None, radius: float | None = None, top: int = 12, gate: GateConfig | None = None,
          quiet: bool = False) -> dict:
    """Python API: audit ``run_dir`` (a path or an object-store URI); returns the summary (also
    written to audit/summary.json on the run's own storage). Uses Ray when there is an index."""
    # The values' one check is AuditConfig's (a bad one: UsageError naming its flag); its paths are plain (file://).
    config = from_args(lambda _: AuditConfig(run_dir=run_dir, index=index, radius=radius, top=top,
                                             gate=gate or GateConfig()), None)
    run_dir, index = config.run_dir, config.index
    try:
        with local_run(run_dir) as local:  # a remote run: its committed units, in a temporary directory
            return _audit(run_dir, local, index, radius, top, gate, quiet)
    except RunError as exc:  # the snapshot's; _audit converts its own
        raise UsageError(str(exc)) from None


def _audit(run_dir: str, local: str, index: str | None, radius: float | None, top: int, gate: GateConfig | None,
           quiet: bool) -> dict:
    """``audit`` of the run at ``run_dir``, whose files (a local snapshot for a remote run) are at ``local``."""
    try:
        run, rows, hits = load_run(local)
        index = index or ((run.get("config") or {}).get("shield") or {}).get("index")
        manifest = read_manifest(index) if index else None
        radius, radius_source = _radius(radius, run, manifest)
        samples = rows[rows["image"].notna()].reset_index(drop=True)
        for ref in samples["image"]:
            resolve_image_ref(run_dir, ref)  # refuse before any work: a reference must stay inside the run
        if gate is not None and index is None and not (len(samples) and samples["inside_shield"].notna().all()):
            raise UsageError("--fail-above needs a near-duplicate rate: pass --index (the run has no index and its rows no verdict)")
        completeness = check_completeness(local, run, rows)
        inside, extra_inside, checked = None, None, None
        if index is not None:
            if radius is None:
                raise UsageError("no radius: pass --radius (the run and the index have none)")
            checked, undecodable, missing = _recheck(run_dir, local, samples, index, radius, quiet)
            is_listed = checked["listed"].astype(bool)
            listed = checked.loc[is_listed].drop(columns=["image", "listed"])
            samples = samples.merge(listed, on="sample", how="inner")  # a sample whose image is gone is not audited
            inside = samples["audit_inside"].astype(bool)
            extra_inside = list(checked.loc[~is_listed, "audit_inside"].astype(bool))
            distances = list(checked["audit_nearest_distance"])
            _note_unaudited(completeness, undecodable, missing)
        else:
            if len(samples) and samples["inside_shield"].notna().all():
                inside = samples["inside_shield"].astype(bool)
            distances = list(samples["nearest_distance"].dropna())
    except RunError as exc:
        raise UsageError(str(exc)) from None
    summary = summarize(run, samples, hits, radius, inside, extra_inside)
    # the perceptual copy rate and the off-manifold rate of every image, beside the L2 rate
    summary["second_judges"] = perceptual_summary(checked) if checked is not None else {}
    calibration = manifest.calibration if manifest is not None else None
    summary["audit"] = {"index": os.path.basename(os.path.normpath(index)) if index else None,
                        "index_manifest_sha256": manifest_hash(index) if index else None, "radius_source": radius_source}
    summary["index"] = summary["audit"]["index"]
    summary["recomputed_from_images"] = index is not None
    summary["completeness"] = completeness
    # every attempt counts here: a policy that drops or resamples every bent sample must not hide the bending
    all_steps = float(rows["steps"].sum())
    summary["collapse"] = assess_collapse(float(rows["active_steps"].sum() / all_steps) if all_steps else 0.0, distances, calibration)
    summary["verdict"] = verdict(summary, gate)
    with report_dir(run_dir) as out:  # a remote run's report is uploaded when the block ends
        _write_report(out, local, summary, samples, hits, checked, distances, radius, calibration, index, top)
    return summary


def _write_report(out, local: str, summary: dict, samples, hits, checked, distances, radius, calibration, index, top) -> None:
    audit_dir = out.local
    quantiles = (calibration or {}).get("nn_distance_quantiles") or {}
    plots = {
        "distances": plot_nearest_distances(distances, radius, os.path.join(audit_dir, "nearest_distance.png"),
                                            quantiles.get("0.5"), summary["collapse"]["far_threshold"]),
        "per_step": plot_corrected_share({summary["run"] or "run": summary["corrected_share_per_step"]},
                                         os.path.join(audit_dir, "corrected_per_step.png"),
                                         f"{summary['num_samples']} samples, radius {radius if radius is None else round(radius, 4)}"),
        "ratios": plot_correction_ratios(correction_ratios(written_attempt_hits(samples, hits)),
                                         os.path.join(audit_dir, "correction_ratio.png")),
    }
    names = {"distances": "nearest_distance.png", "per_step": "corrected_per_step.png", "ratios": "correction_ratio.png"}
    for key, name in names.items():
        if not plots[key] and os.path.exists(os.path.join(audit_dir, name)):
            os.remove(os.path.join(audit_dir, name))  # a stale plot of an earlier audit must not stand in
    offenders = _offenders(local, checked, index, top, audit_dir) if checked is not None else []
    if summary["second_judges"]:
        summary["second_judges"]["flagged"] = _flagged(local, checked, index, audit_dir)
    summary["top_offenders"] = [{k: v for k, v in o.items() if k != "thumbnail"} for o in offenders]
    summary["report"] = out.final(write_report(audit_dir, summary, offenders, {k: names[k] if plots[k] else None for k in names}))
    write_json_atomic(os.path.join(audit_dir, "summary.json"), summary)


def _note_unaudited(completeness: dict, undecodable: dict, missing: list[str]) -> None:
    """Images the recheck could not audit make the run incomplete, in words."""
    if missing:
        completeness["problems"].append(f"{len(missing)} written image(s) named by sample rows are not in their tar "
                                        f"(not audited), e.g. {missing[0]}")
    if undecodable:
        first = next(iter(undecodable.items()))
        completeness["problems"].append(f"{len(undecodable)} image file(s) do not decode (not audited), e.g. {first[0]}: {first[1]}")
    completeness["missing_images"] = len(missing)
    completeness["undecodable_images"] = sorted(undecodable)[:EXAMPLES]
    completeness["complete"] = not completeness["problems"]


def _task_path(path: str) -> str:
    """A path as a Ray task on any node takes it: a URI as it is, a local path absolute."""
    from spellshield import storage

    return path if storage.is_remote(path) else os.path.abspath(path)


def _recheck(run_dir: str, local: str, samples: pd.DataFrame, index: str, radius: float, quiet: bool = False):
    """(rows of every image file, {ref: why undecodable}, [listed refs missing]), one Ray task per
    tar; the tasks read ``run_dir`` (on a remote run each fetches its own tar), the driver ``local``."""
    import ray

    from spellshield.auditing.run_files import tar_image_names
    from spellshield.workers.audit import JUDGE_COLUMNS, L2_COLUMNS, recheck_tar

    listed: dict[str, list[tuple[str, str]]] = {tar: [] for tar in image_tars(local)}
    for sample, ref in zip(samples["sample"], samples["image"]):
        tar_ref, member = ref.split("#")
        listed.setdefault(tar_ref, []).append((sample, member))
    sizes = {}
    for tar_ref in listed:
        try:
            sizes[tar_ref] = len(tar_image_names(os.path.join(local, *tar_ref.split("/"))))
        except Exception:  # noqa: BLE001 - a missing or unreadable tar: the task reports it
            sizes[tar_ref] = 0
    bar = ProgressBar("audit", total=sum(sizes.values()), unit="images", quiet=quiet)
    task = ray.remote(recheck_tar).options(num_cpus=0.5)
    results = []
    with ray_cluster():
        pending = {task.remote(_task_path(run_dir), tar_ref, pairs, _task_path(index), radius): tar_ref
                   for tar_ref, pairs in sorted(listed.items())}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            tar_ref = pending.pop(ready[0])
            results.append(ray.get(ready[0]))
            bar.advance(sizes[tar_ref], detail=f"{tar_ref} done, {len(pending)} tars left")
    bar.close()
    rows = [r for part in results for r in part["rows"]]
    columns = ["sample", "image", "listed", *L2_COLUMNS, *JUDGE_COLUMNS]  # (an empty run keeps its columns)
    undecodable = {k: v for part in results for k, v in part["undecodable"].items()}
    missing = [m for part in results for m in part["missing"]]
    return pd.DataFrame(rows, columns=columns), undecodable, missing


def _offenders(run_dir: str, checked: pd.DataFrame, index: str, top: int, audit_dir: str) -> list[dict]:
    """Protected images with audited images inside their radius, most copied first."""
    from spellshield.indexing.search import open_index

    inside = checked.loc[checked["audit_inside"].astype(bool)] if len(checked) else checked
    if top <= 0 or not len(inside):
        return []
    grouped = inside.groupby("audit_nearest_id").agg(
        corpus_key=("audit_nearest_key", "first"), samples_inside=("audit_inside", "sum"),
        min_distance=("audit_nearest_distance", "min"))
    grouped = grouped.sort_values(["samples_inside", "min_distance"], ascending=[False, True]).head(top)
    shield = open_index(index)
    thumbs = os.path.join(audit_dir, "thumbs")
    os.makedirs(thumbs, exist_ok=True)
    out = []
    for rank, (corpus_id, row) in enumerate(grouped.iterrows()):
        closest = inside[inside["audit_nearest_id"] == corpus_id].nsmallest(1, "audit_nearest_distance").iloc[0]
        tar_path, member = resolve_image_ref(run_dir, closest["image"])
        generated = read_tar_images(tar_path, [member])[0][member]
        name = f"offender-{rank:03d}.png"
        save_pair(generated, corpus_image(index, shield, int(corpus_id)), os.path.join(thumbs, name))
        out.append({"corpus_id": int(corpus_id), "corpus_key": str(row["corpus_key"]), "samples_inside": int(row["samples_inside"]),
                    "min_distance": float(row["min_distance"]),
                    "closest_sample": closest["image"] if pd.isna(closest["sample"]) else str(closest["sample"]),
                    "thumbnail": f"thumbs/{name}"})
    return out


FLAGGED_SHOWN = 48  # images the second judges flag, shown in the report's grid (the surest first)
FLAGGED_GRID = "judges_flagged.png"


def flagged_order(checked: pd.DataFrame) -> pd.DataFrame:
    """The flagged rows in the order the report shows them: perceptual copies by low-pass distance,
    then descriptor copies by similarity, then off-manifold ones by distance. Ties (exact copies all
    sit at distance 0) break on the image reference, so the order never depends on which recheck
    task finished first."""
    copy, off = checked["audit_perceptual_copy"].astype(bool), checked["audit_off_manifold"].astype(bool)
    described = checked["audit_descriptor_copy"].fillna(False).astype(bool)
    return pd.concat([checked[copy].sort_values(["audit_perceptual_distance", "image"], kind="stable"),
                      checked[described & ~copy].sort_values(["audit_descriptor_similarity", "image"],
                                                             ascending=[False, True], kind="stable"),
                      checked[off & ~copy & ~described].sort_values(["audit_nearest_distance", "image"],
                                                                    ascending=[False, True], kind="stable")])


def _flagged(run_dir: str, checked: pd.DataFrame, index: str, audit_dir: str, limit: int = FLAGGED_SHOWN) -> dict:
    """The images the perceptual or the off-manifold judge flags (perceptual copies by low-pass
    distance, then off-manifold ones), each beside the protected image it was compared with (the
    perceptual judge's closest, else the L2-nearest), decoded from the index as the judge saw it."""
    from spellshield.indexing.encoders import Encoder
    from spellshield.indexing.search import open_index
    from spellshield.workers.final_check import corpus_images

    grid = os.path.join(audit_dir, FLAGGED_GRID)
    if os.path.exists(grid):
        os.remove(grid)  # a stale grid of an earlier audit must not stand in
    frame = flagged_order(checked)
    shown = frame.head(limit)
    result = {"total": int(len(frame)), "grid": None, "images": []}
    if not len(shown):
        return result
    protected = [int(p if c else (d if dc else n)) for p, d, n, c, dc in zip(
        shown["audit_perceptual_id"], shown["audit_descriptor_id"], shown["audit_nearest_id"], shown["audit_perceptual_copy"],
        shown["audit_descriptor_copy"].fillna(False).astype(bool))]
    shield = open_index(index)
    keys = shield.keys(protected)
    nearest = corpus_images(shield, Encoder(shield.manifest.latent.encoder).init(), protected)
    outputs, tars = [], {}
    for ref in shown["image"]:
        tar_path, member = resolve_image_ref(run_dir, ref)
        outputs.append(tars.setdefault(tar_path, read_tar_images(tar_path)[0])[member])
    save_pair_grid(np.stack(outputs), nearest, grid)
    result["grid"] = FLAGGED_GRID
    result["images"] = [
        {"image": ref, "judge": ", ".join(j for j, on in (("perceptual copy", c), ("descriptor copy", dc), ("off-manifold", o))
                                          if on),
         "protected_key": key, "perceptual_distance": float(d), "perceptual_ssim": float(q)}
        for ref, c, dc, o, key, d, q in zip(shown["image"], shown["audit_perceptual_copy"],
                                            shown["audit_descriptor_copy"].fillna(False).astype(bool), shown["audit_off_manifold"],
                                            keys, shown["audit_perceptual_distance"], shown["audit_perceptual_ssim"])]
    return result


def compare(run_a: str, run_b: str, summary_a: dict, summary_b: dict) -> str:
    """RUN_A/audit/compare.html: the two summaries side by side, per-step shares overlaid, and a
    warning when the runs are not like for like (index, radius, model)."""
    with report_dir(run_a) as out:
        return out.final(_write_comparison(out.local, summary_a, summary_b))


def _write_comparison(audit_dir: str, summary_a: dict, summary_b: dict) -> str:
    name_a = summary_a["run"] or "A"
    name_b = summary_b["run"] or "B"
    if name_b == name_a:
        name_b += " (B)"
    plot = "compare_corrected_per_step.png"
    drawn = plot_corrected_share({name_a: summary_a["corrected_share_per_step"], name_b: summary_b["corrected_share_per_step"]},
                                 os.path.join(audit_dir, plot), "share of trajectories corrected")
    return write_comparison(os.path.join(audit_dir, "compare.html"), {name_a: summary_a, name_b: summary_b},
                            plot if drawn else None, comparison_warnings(summary_a, summary_b))


def describe(summary: dict) -> list[str]:
    """The audit's result in a few lines: rate, completeness, collapse, verdict."""
    completeness = summary.get("completeness") or {}
    lines = [f"{summary['num_images']} images, near-duplicate rate {rate_text(summary)}; "
             f"steps corrected {summary['active_step_fraction']:.1%}"]
    verdict_ = summary.get("verdict") or {}
    lines += [f"warning: {w}" for w in verdict_.get("warnings", [])]
    if verdict_.get("status") == "fail":
        lines += [f"FAIL: {r}" for r in verdict_.get("reasons", [])]
    elif verdict_.get("status") == "pass":
        gate = verdict_["gate"]
        lines.append(f"PASS: {gate['on']} {gate['value']:.2%} <= {gate['fail_above']:.2%}, run complete")
    elif completeness.get("complete"):
        lines.append("run complete: every planned unit whole, every image file named by a sample row")
    return lines


def check_inputs(run_dir: str, index: str | None = None, compare_with: str | None = None) -> None:
    """Refuse, before Ray starts and writing nothing, a run or index that cannot be read or a run
    whose report cannot be written (unreachable store, credentials, bucket, no run.json)."""
    try:
        check_run(run_dir, report=True)
        if compare_with:
            check_run(compare_with)
    except RunError as exc:
        raise UsageError(str(exc)) from None
    if index:
        read_manifest(index)  # IndexFormatError: one line


def run(args) -> int:
    config = from_args(AuditConfig.from_args, args)
    gate = config.gate if config.gate.gated else None
    check_inputs(config.run_dir, config.index, config.compare)
    with ray_cluster(args.address):
        summary = audit(config.run_dir, config.index, config.radius, config.top, gate)
        for line in describe(summary):
            progress(f"audit: {args.run_dir}: {line}")
        progress(f"audit: report: {summary['report']}")
        if args.compare:
            other = audit(args.compare, config.index, config.radius, config.top)
            for line in describe(other):
                progress(f"audit: {args.compare}: {line}")
            for warning in comparison_warnings(summary, other):
                progress(f"audit: compare: warning: {warning}")
            progress(f"audit: comparison: {compare(args.run_dir, args.compare, summary, other)}")
    return summary["verdict"]["exit_status"]


def main(argv=None) -> int:
    from spellshield.jobs.cli import run_single

    return run_single("audit", argv)


if __name__ == "__main__":
    raise SystemExit(main())
