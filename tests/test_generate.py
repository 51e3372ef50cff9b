"""generate on a real local Ray cluster: files per unit, audit rows = requested samples,
noise that depends only on the seed, and the shield working on the memorizer."""

import glob
import io
import os
import tarfile

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spellshield.jobs.generate import generate, validate
from spellshield.pipeline.config import GenerateConfig
from spellshield.pipeline.records import HIT_SCHEMA, SAMPLE_SCHEMA


def gen_config(model, out, index=None, **overrides) -> GenerateConfig:
    """A small run of the tests' memorizer: the keyword API, defaults but for these."""
    options = dict(index=index, overcompensation=1.6, correction_iterations=1, num_images=10, batch_size=4, steps=20,
                   seed=100)
    options.update(overrides)
    return GenerateConfig.build(model, str(out), **options)


def tar_images(path):
    out = {}
    with tarfile.open(path) as tar:
        for m in tar:
            if m.name.endswith(".png"):
                out[m.name[:-4]] = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
    return out


@pytest.fixture(scope="module")
def shielded_run(ray_session, memorizer_model, protected_index, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "shielded"
    config = validate(gen_config(memorizer_model, out, protected_index, num_images=22, unit_size=8))
    info = generate(config)
    return str(out), config, info


def test_unit_files_and_row_counts(shielded_run):
    out, config, info = shielded_run
    assert info["units_total"] == 3 and info["units_done"] == 3
    rows = pd.concat([pq.read_table(f).to_pandas() for f in sorted(glob.glob(f"{out}/audit/samples/*.parquet"))])
    # one row per attempt; every requested sample ends in exactly one final row
    assert not rows.duplicated(["sample", "attempt"]).any()
    samples = rows[rows["action"] != "resampled"]
    assert len(samples) == 22  # exactly what was requested
    assert samples["sample"].is_unique
    first = rows[rows["attempt"] == 1]
    assert len(first) == 22 and sorted(first["seed"]) == list(range(100, 122))
    samples = samples[samples["image"].notna()]
    assert pq.read_schema(glob.glob(f"{out}/audit/samples/*.parquet")[0]).equals(SAMPLE_SCHEMA, check_metadata=False)
    assert pq.read_schema(glob.glob(f"{out}/audit/hits/*.parquet")[0]).equals(HIT_SCHEMA, check_metadata=False)
    images = {}
    for tar in sorted(glob.glob(f"{out}/images/unit-*.tar")):
        images.update(tar_images(tar))
    assert set(images) == set(samples["sample"])
    assert not glob.glob(f"{out}/**/*.tmp-*", recursive=True)
    # the image reference of each row points inside the run directory, at its own image
    for ref, key in zip(samples["image"], samples["sample"]):
        tar_name, member = ref.split("#")
        assert os.path.isfile(os.path.join(out, tar_name)) and member == f"{key}.png"


def test_hits_are_consistent(shielded_run):
    out, config, info = shielded_run
    hits = pd.read_parquet(f"{out}/audit/hits")
    samples = pd.read_parquet(f"{out}/audit/samples")
    assert len(hits) > 0
    assert (hits["distance"] < hits["radius"]).all()  # a hit is strictly inside its ball
    regular = hits[~hits["degenerate"]]
    assert np.allclose(regular["weight"], regular["radius"] / regular["distance"] - 1)
    # x0_hat on a protected point (the memorizer snaps onto its data): the documented fallback
    assert (hits.loc[hits["degenerate"], "distance"] <= 1e-6 * hits.loc[hits["degenerate"], "radius"]).all()
    assert (hits["radius"] == config.shield.radius).all()
    active = hits.groupby(["sample", "attempt"])["step"].nunique()
    merged = samples.set_index(["sample", "attempt"])["active_steps"]
    assert (merged.loc[active.index] == active).all()
    # hits of an attempt carry that attempt's seed
    seeds = samples.set_index(["sample", "attempt"])["seed"]
    assert (hits.set_index(["sample", "attempt"])["seed"] == seeds.loc[hits.set_index(["sample", "attempt"]).index]).all()
    assert (samples["steps"] == 20).all()


def test_sample_rows_agree_with_the_final_check(shielded_run):
    out, config, info = shielded_run
    samples = pd.read_parquet(f"{out}/audit/samples")
    assert (samples["inside_shield"] == (samples["nearest_distance"] < config.shield.radius)).all()
    # SPELL alone (first attempts, before the final-check policy) leaves some of 22 copies: since
    # the late-step gate (issue 14) the ones it cannot save end as copies, not as noise, and the
    # final check resamples them
    assert samples.loc[samples["attempt"] == 1, "inside_shield"].sum() <= 11
    # resample: breaching attempts are not written, and the written ones are all outside
    assert (samples.loc[samples["inside_shield"], "action"].isin(["resampled", "dropped"])).all()
    assert (samples.loc[samples["image"].notna(), "action"] == "kept").all()


def test_noise_depends_only_on_seed(ray_session, memorizer_model, tmp_path):
    # Unshielded, the same seeds with another batch size and unit size give the same images.
    a = validate(gen_config(memorizer_model, tmp_path / "a", num_images=6, batch_size=4, unit_size=4))
    b = validate(gen_config(memorizer_model, tmp_path / "b", num_images=6, batch_size=3, unit_size=6))
    generate(a)
    generate(b)
    images_a, images_b = {}, {}
    for path in glob.glob(str(tmp_path / "a" / "images" / "*.tar")):
        images_a.update(tar_images(path))
    for path in glob.glob(str(tmp_path / "b" / "images" / "*.tar")):
        images_b.update(tar_images(path))
    assert images_a.keys() == images_b.keys()
    for key in images_a:
        assert np.array_equal(images_a[key], images_b[key])


def test_unshielded_memorizer_copies_protected_images(ray_session, memorizer_model, protected_index, shielded_run, tmp_path):
    from spellshield.jobs.audit import audit

    config = validate(gen_config(memorizer_model, tmp_path / "plain", num_images=22, unit_size=8))
    generate(config)
    plain = audit(str(tmp_path / "plain"), index=protected_index)
    # half the memorized corpus is protected: about half the samples are copies of it
    assert plain["num_samples"] == 22
    assert 0.2 <= plain["near_duplicate_rate"] <= 0.8
    assert plain["active_step_fraction"] == 0
    # the same seeds with the shield: the audit, recomputed from the PNGs, finds far fewer
    shielded = audit(shielded_run[0], index=protected_index)
    assert 20 <= shielded["num_samples"] <= 22  # a sample copied on all 4 attempts is dropped
    assert shielded["near_duplicate_rate"] <= plain["near_duplicate_rate"] / 3
    assert shielded["active_step_fraction"] > 0
