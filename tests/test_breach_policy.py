"""The final-check policy: with resample or drop, no written image lies inside the shield.

Tested on the memorizer (it copies its data, half of which is protected) with SPELL made almost
powerless (lam = 1e-9), so that breaches are common and the policy, not the correction, has to
keep every copy out. What is written is re-checked from the PNG files, as the audit does."""

import os

import pandas as pd
import pytest

from spellshield.pipeline.scheduler import SpellConfig
from spellshield.workers.audit import recheck_unit
from spellshield.pipeline.breach import decide, derive_seed, is_breach
from spellshield.pipeline.config import GenerateConfig
from spellshield.workers.generation import GenerationWorker, WorkerRuntime
from spellshield.workers.units import PromptRequest, plan_samples, plan_units

pytestmark = pytest.mark.slow

NUM = 16


def test_derive_seed_is_deterministic_and_fresh():
    assert derive_seed(123, 1) == 123
    seeds = [derive_seed(123, a) for a in range(1, 6)]
    assert seeds == [derive_seed(123, a) for a in range(1, 6)]  # same on any worker, any retry
    assert len(set(seeds)) == 5 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(124, 2) != derive_seed(123, 2)
    with pytest.raises(ValueError, match="attempt"):
        derive_seed(1, 0)


def test_decide_truth_table():
    assert decide("resample", False, 1, 3) == "kept"
    assert decide("resample", None, 1, 3) == "kept"  # no index: nothing to check
    assert decide("resample", True, 1, 3) == "resampled"
    assert decide("resample", True, 2, 3) == "resampled"
    assert decide("resample", True, 3, 3) == "dropped"
    assert decide("drop", True, 1, 3) == "dropped"
    assert decide("flag", True, 1, 3) == "flagged"
    with pytest.raises(ValueError, match="policy"):
        decide("ignore", True, 1, 3)


def run_policy(model, index, run_dir, policy, max_attempts=3):
    from spellshield.indexing.manifest import read_manifest

    radius = read_manifest(index).suggested_radius
    config = GenerateConfig.build(model, str(run_dir), index=index, radius=radius, spell=SpellConfig(overcompensation=1e-9),
                                  steps=12, batch_size=8, on_breach=policy, max_attempts=max_attempts)
    worker = GenerationWorker(config, WorkerRuntime(device="cpu"))
    units = plan_units(plan_samples([PromptRequest(None, NUM)], base_seed=0), unit_size=NUM)
    for unit in units:
        worker.run_unit(unit)
    rows = pd.read_parquet(os.path.join(run_dir, "audit", "samples"))
    written = rows[rows["image"].notna()]
    rechecked = pd.DataFrame(recheck_unit(run_dir, list(zip(written["sample"], written["image"])), index, radius))
    return rows, rechecked, radius


def breach(row) -> bool:
    """A breach: inside the L2 ball, a perceptual copy, or off-manifold (pipeline.breach.is_breach)."""
    return bool(is_breach(bool(row["inside_shield"]), bool(row["perceptual_copy"]), bool(row["off_manifold"])))


@pytest.fixture(scope="module")
def policies(memorizer_model, protected_index, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("policy")
    return {p: run_policy(memorizer_model, protected_index, tmp / p, p) for p in ("resample", "drop", "flag")}


def test_breaches_are_common_without_the_policy(policies):
    rows, _, _ = policies["flag"]
    assert rows["inside_shield"].mean() >= 0.25  # the memorizer copies protected images


def test_resample_writes_no_copy(policies):
    rows, rechecked, radius = policies["resample"]
    assert not rows.duplicated(["sample", "attempt"]).any()
    final = rows[rows["action"] != "resampled"]
    assert len(final) == NUM and final["sample"].is_unique  # every requested sample ends once
    assert set(final["action"]) <= {"kept", "dropped"}
    # every breach was resampled with the derived seed, up to 3 attempts, then dropped
    first_seeds = rows[rows["attempt"] == 1].set_index("sample")["seed"]
    for _, r in rows.iterrows():
        assert r["seed"] == derive_seed(int(first_seeds[r["sample"]]), int(r["attempt"]))
        assert r["action"] == decide("resample", breach(r), int(r["attempt"]), 3)
        if r["action"] == "resampled":
            assert ((rows["sample"] == r["sample"]) & (rows["attempt"] == r["attempt"] + 1)).any()
    assert (rows["attempt"] > 1).any()
    # what is written: exactly the kept rows, and none of them inside, recomputed from the PNGs
    kept = rows[rows["action"] == "kept"]
    assert sorted(rechecked["sample"]) == sorted(kept["sample"])
    assert not rechecked["audit_inside"].any()
    assert not rechecked["audit_perceptual_copy"].any() and not rechecked["audit_off_manifold"].any()
    assert (rechecked["audit_nearest_distance"] >= radius).all()
    assert rows.loc[rows["image"].isna(), "action"].isin(["resampled", "dropped"]).all()


def test_drop_writes_no_copy(policies):
    rows, rechecked, radius = policies["drop"]
    assert len(rows) == NUM and (rows["attempt"] == 1).all()
    assert (rows["action"] == rows.apply(breach, axis=1).map({True: "dropped", False: "kept"})).all()
    assert sorted(rechecked["sample"]) == sorted(rows.loc[rows["action"] == "kept", "sample"])
    assert not rechecked["audit_inside"].any()


def test_flag_writes_everything_and_flags_copies(policies):
    rows, rechecked, radius = policies["flag"]
    assert len(rows) == NUM and len(rechecked) == NUM
    merged = rows.merge(rechecked, on="sample")
    assert (merged["audit_inside"] == merged["inside_shield"]).all()
    assert (merged["action"] == merged.apply(breach, axis=1).map({True: "flagged", False: "kept"})).all()
