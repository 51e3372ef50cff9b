"""The collapse warning: 0% copies of noise is not success.

A shield can bring the near-duplicate rate to zero by wrecking the samples: with a radius or an
overcompensation too large for the model, SPELL corrects nearly every step and the outputs end up
far from anything the model learned (colour noise at distance ~40 from the nearest corpus image
when the corpus's own images are ~20 apart). The audit warns, in words and with the figures, when
either holds:

1. **The shield bends most trajectories**: the shield corrected more than ``ACTIVE_STEP_LIMIT``
   (50%) of all denoising steps of all sampling attempts (written, resampled and dropped alike:
   a breach policy that throws the bent samples away must not hide the bending). SPELL's
   corrections are meant to be sparse (the paper reports a few percent of steps).
2. **The outputs are far from the corpus**: more than ``FAR_SHARE_LIMIT`` (50%) of the audited
   images are farther from their nearest corpus image than ``FAR_FACTOR`` (1.5) times the 90%
   quantile of the corpus's own 1-NN distances (``index calibrate``: each indexed image to its
   nearest other one, in the manifest's ``calibration``). New images a model makes sit at about
   the corpus's own neighbour distances; far beyond them is what the model never makes, noise.
   Without a calibration in the manifest this criterion is not evaluated, and the summary says so.
"""

from __future__ import annotations

import numpy as np

ACTIVE_STEP_LIMIT = 0.5
FAR_FACTOR = 1.5
FAR_QUANTILE = "0.9"
FAR_SHARE_LIMIT = 0.5


def assess_collapse(active_step_fraction: float, nearest_distances, calibration: dict | None) -> dict:
    """The ``collapse`` entry of summary.json: {"warning", "reasons", and the figures}."""
    distances = np.asarray([d for d in nearest_distances if d is not None and np.isfinite(d)], dtype=np.float64)
    out = {"warning": False, "reasons": [], "active_step_fraction": float(active_step_fraction),
           "active_step_limit": ACTIVE_STEP_LIMIT, "far_threshold": None, "far_share": None,
           "far_share_limit": FAR_SHARE_LIMIT, "median_nearest_distance": float(np.median(distances)) if len(distances) else None,
           "corpus_nn_distance_quantiles": None}
    if active_step_fraction > ACTIVE_STEP_LIMIT:
        out["reasons"].append(
            f"the shield corrected {active_step_fraction:.1%} of all denoising steps (more than {ACTIVE_STEP_LIMIT:.0%}): "
            "it bends most trajectories, so the images may be the shield's, not the model's")
    quantiles = (calibration or {}).get("nn_distance_quantiles") or {}
    if FAR_QUANTILE in quantiles and len(distances):
        threshold = FAR_FACTOR * float(quantiles[FAR_QUANTILE])
        far = float(np.mean(distances > threshold))
        out.update(far_threshold=threshold, far_share=far, corpus_nn_distance_quantiles=quantiles)
        if far > FAR_SHARE_LIMIT:
            out["reasons"].append(
                f"{far:.1%} of the images are farther from their nearest corpus image than {threshold:.4g} "
                f"({FAR_FACTOR:g} x the corpus's own 90% 1-NN distance {float(quantiles[FAR_QUANTILE]):.4g}; "
                f"median nearest distance {out['median_nearest_distance']:.4g}): they resemble nothing the model learned "
                "(noise?), so a low near-duplicate rate says nothing")
    elif len(distances):
        out["note"] = "the index has no calibration (spellshield index calibrate): the distance criterion was not evaluated"
    out["warning"] = bool(out["reasons"])
    return out
