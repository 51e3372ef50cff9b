"""summary.json: the numbers of an audit, the run's settings, completeness, the collapse
warning and the gate's verdict. ``SCHEMA_VERSION`` is bumped whenever a key changes meaning.

The gate (``spellshield audit RUN --fail-above RATE [--fail-on upper|rate]``): the audit fails
(exit status 1; 2 stays bad input) when the gated value is strictly above RATE, or when the run
is incomplete (``auditing.completeness``). The gated value is, by default, the upper bound of the
95% Wilson interval (``--fail-on upper``): a pipeline passes only when the data show the rate is
at most RATE, so a handful of samples cannot pass by luck; ``--fail-on rate`` gates the point
estimate. The collapse warning never fails the gate by itself: it is in the verdict's warnings.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from spellshield.auditing.stats import (corrected_share_per_step, correction_ratios, per_prompt_rates, rate, search_cost,
                                        written_attempt_hits)
from spellshield.pipeline.config import GateConfig, GenerateConfig

SCHEMA_VERSION = 2
EXIT_FAIL = 1  # the gate failed; 2 is bad input (jobs.cli)


def run_settings(run: dict) -> dict:
    """What the run was made with, as a reviewer needs it: model, shield, SPELL, breach policy.

    Read through ``GenerateConfig.from_json`` (the shape run.json is written from); a config it
    cannot read gives None for each setting (the completeness check says the run has no plan)."""
    try:
        config = GenerateConfig.from_json(run["config"])
    except (KeyError, TypeError, ValueError):
        unknown = dict.fromkeys(_settings(GenerateConfig(model="-", out="-"), run))  # the same keys, all None
        return {**unknown, "shielded": False, "status": run.get("status")}
    return _settings(config, run)


def _settings(config: GenerateConfig, run: dict) -> dict:
    shield, spell, sampling, breach = config.shield, config.spell, config.sampling, config.breach
    return {
        "model": os.path.basename(os.path.normpath(config.model)),
        "shielded": shield.index is not None,
        "shield_index": os.path.basename(os.path.normpath(shield.index)) if shield.index else None,
        "shield_index_manifest_sha256": run.get("index_manifest_sha256"),
        "shield_radius": shield.radius,
        "overcompensation": spell.overcompensation,
        "correction_iterations": spell.correction_iterations,
        "max_neighbours": spell.max_neighbours,
        "on_breach": breach.on_breach,
        "max_attempts": breach.max_attempts,
        "steps": sampling.steps,
        "seed": sampling.seed,
        "search_backend": shield.search_backend,
        "batch_radius": shield.batch_radius,
        "history_radius": shield.history_radius,
        "guidance_scale": sampling.guidance_scale,
        "status": run.get("status"),
    }


def summarize(run: dict, samples: pd.DataFrame, hits: pd.DataFrame, radius: float | None, inside: pd.Series | None,
              extra_inside: list[bool] | None = None) -> dict:
    """The numbers for the written samples of a run (one row per written image).

    ``inside``: per written sample, strictly within the radius; ``extra_inside``: the same for
    image files no sample row names. The near-duplicate rate counts both (every image of the
    run); the per-prompt rates only the samples.
    """
    hits = written_attempt_hits(samples, hits)
    share = corrected_share_per_step(samples, hits)
    total_steps = float(samples["steps"].sum())
    ratios = correction_ratios(hits)
    config = run.get("config") or {}
    summary = {
        "schema_version": SCHEMA_VERSION,
        "run": os.path.basename(os.path.normpath(config.get("out", ""))) or None,
        "num_samples": int(len(samples)),
        "num_images": int(len(samples)),
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
        "shielded": bool((config.get("shield") or {}).get("index")),
        "index_search": search_cost(samples),
        "settings": run_settings(run),
        "per_prompt": [],
    }
    if inside is not None:
        every = list(inside.astype(bool)) + list(extra_inside or [])
        overall = rate(every)
        summary["num_images"] = overall.pop("num_samples")
        summary.update(overall)
        summary["per_prompt"] = per_prompt_rates(samples, inside)
    return summary


def verdict(summary: dict, gate: GateConfig | None) -> dict:
    """The ``verdict`` entry: status pass / fail / not gated, the exit status, and why."""
    reasons, warnings = [], []
    completeness = summary.get("completeness") or {}
    if not completeness.get("complete", True):
        (reasons if gate else warnings).extend(f"incomplete: {p}" for p in completeness.get("problems", []))
    collapse = summary.get("collapse") or {}
    warnings.extend(f"collapse: {r}" for r in collapse.get("reasons", []))
    out = {"status": "not gated", "exit_status": 0, "gate": None, "reasons": reasons, "warnings": warnings}
    if gate is None or not gate.gated:
        return out
    value = None
    if summary.get("near_duplicate_rate") is not None:
        value = summary["near_duplicate_rate_ci95"][1] if gate.fail_on == "upper" else summary["near_duplicate_rate"]
    out["gate"] = {"fail_above": gate.fail_above, "on": gate.fail_on, "value": value}
    if value is None:
        reasons.append("no near-duplicate rate to gate on (audit with --index)")
    elif value > gate.fail_above:
        what = "upper bound of the 95% interval" if gate.fail_on == "upper" else "near-duplicate rate"
        reasons.append(f"{what} {value:.2%} is above {gate.fail_above:.2%}")
    out["status"] = "fail" if reasons else "pass"
    out["exit_status"] = EXIT_FAIL if reasons else 0
    return out
