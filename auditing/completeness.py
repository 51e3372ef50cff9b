"""Is the run on disk the run that was planned? The audit's answer, before any rate is trusted.

The plan is recomputed from run.json (``workers.units.plan_from_record``: the same units, samples
and seeds ``generate`` planned). Every planned unit is checked whole (``unit_problems``: three
files, one row per planned sample, planned seeds, every written image in its tar), and every
image member of every ``images/*.tar`` is matched against the sample rows.

An image file no sample row names (issue 13.5) is audited anyway, with the rows' images (it is
an image of the run: whoever ships the run ships it), and it makes the run *incomplete*: the
rows no longer describe the run, so ``--fail-above`` fails on it whatever the rate.
"""

from __future__ import annotations

import os

import pandas as pd

from spellshield.auditing.run_files import image_tars, tar_image_names
from spellshield.workers.unit_writer import unit_problems
from spellshield.workers.units import plan_from_record

EXAMPLES = 20  # names listed per finding in summary.json and the report; counts are always whole


def check_completeness(run_dir: str, run: dict, samples: pd.DataFrame) -> dict:
    """The ``completeness`` entry of summary.json (counts, missing units, unlisted images)."""
    written = samples[samples["image"].notna()]
    listed = set(written["image"])
    unlisted = []
    for tar_ref in image_tars(run_dir):
        try:
            names = tar_image_names(os.path.join(run_dir, *tar_ref.split("/")))
        except Exception as exc:  # noqa: BLE001 - an unreadable tar is a finding, not a crash
            unlisted.append(f"{tar_ref} (unreadable: {type(exc).__name__})")
            continue
        unlisted += [f"{tar_ref}#{name}" for name in names if f"{tar_ref}#{name}" not in listed]
    out = {"plan_known": True, "units_planned": None, "units_whole": None, "samples_planned": None,
           "samples_with_rows": int(samples["sample"].nunique()), "samples_written": int(written["sample"].nunique()),
           "samples_dropped": int(samples["sample"].nunique() - written["sample"].nunique()),
           "missing_units": [], "missing_samples": 0, "unlisted_images": len(unlisted),
           "unlisted_image_examples": unlisted[:EXAMPLES], "problems": []}
    try:
        units = plan_from_record(run.get("config") or {})
    except ValueError as exc:
        out["plan_known"] = False
        out["problems"].append(f"the plan cannot be read from run.json: {exc}")
        units = None
    if units is not None:
        broken = [(u, p) for u in units for p in [unit_problems(run_dir, u)] if p]
        planned_keys = {s.key for u in units for s in u.samples}
        out.update(units_planned=len(units), units_whole=len(units) - len(broken), samples_planned=len(planned_keys),
                   missing_samples=len(planned_keys - set(samples["sample"])),
                   missing_units=[{"unit": u.name, "samples": len(u.samples), "problems": p} for u, p in broken])
        if broken:
            out["problems"].append(f"{len(broken)} of {len(units)} planned units are not whole on disk "
                                   f"({', '.join(u.name for u, _ in broken[:EXAMPLES])}"
                                   f"{', ...' if len(broken) > EXAMPLES else ''})")
        if out["missing_samples"]:
            out["problems"].append(f"{out['missing_samples']} of {len(planned_keys)} planned samples have no row")
    if unlisted:
        out["problems"].append(f"{len(unlisted)} image file(s) in images/*.tar that no sample row names "
                               f"(audited anyway), e.g. {unlisted[0]}")
    status = run.get("status")
    if status != "finished":
        out["problems"].append(f"run.json says the run is {status!r}, not finished")
    out["complete"] = not out["problems"]
    return out
