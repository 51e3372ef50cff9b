"""The audit's statistics: binomial rates with Wilson intervals, the paper's per-step sparsity,
the size of the corrections. Plain functions over the sample and hit tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (better than p +- z se near 0 and 1)."""
    if trials <= 0:
        return (0.0, 1.0)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(inside) -> dict:
    """Near-duplicate count, trials, rate and its 95% Wilson interval of a boolean series."""
    inside = pd.Series(inside, dtype=bool)
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


def perceptual_summary(samples) -> dict:
    """The perceptual judge's copy rate and the off-manifold rate of the rechecked images, beside
    the L2 rate (pipeline.judges; the columns of workers.audit.JUDGE_COLUMNS)."""
    if "audit_perceptual_copy" not in samples:
        return {}
    out = {"perceptual_copy": rate(samples["audit_perceptual_copy"].astype(bool)),
           "off_manifold": rate(samples["audit_off_manifold"].astype(bool))}
    if "audit_descriptor_copy" in samples and len(samples) and samples["audit_descriptor_copy"].notna().all():
        out["descriptor_copy"] = rate(samples["audit_descriptor_copy"].astype(bool))  # the index has a descriptor judge
    return out


def search_cost(samples) -> dict:
    """The shield's index searches during sampling (the index_* columns of audit/samples): total
    queries, and candidates and inverted-file lists probed per query; {} when no row counted them
    (no index, index servers, or a run older than those columns)."""
    if "index_queries" not in samples:
        return {}
    counted = samples[samples["index_queries"].notna()]
    queries = float(counted["index_queries"].sum())
    if not queries:
        return {}
    return {"index_queries": queries, "candidates_per_query": float(counted["index_candidates"].sum()) / queries,
            "lists_probed_per_query": float(counted["index_lists_probed"].sum()) / queries}
