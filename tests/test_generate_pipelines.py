"""generate --model on real conditional pipelines (tiny, saved to disk): a StableDiffusionPipeline
with classifier-free guidance and a StableDiffusion3Pipeline (flow matching), each shielded by an
index built in its own VAE's latent space, with prompts from a JSONL file and the batch and
history sources on. Runs the real jobs on the session's Ray cluster."""

import json
import os

import pandas as pd
import pytest

from spellshield.jobs.build_index import build_index
from spellshield.jobs.dataflow import EncodeOptions
from spellshield.jobs.generate import generate, validate
from spellshield.jobs.runtime import UsageError
from spellshield.toys import pipelines as tiny_pipelines
from tests.test_generate import gen_config, tar_images

pytestmark = pytest.mark.slow

DOG = "../../a/dog\\..\\x"  # a prompt shaped like a path: it must never become one
PROMPTS = [
    {"prompt": "a red cat", "num_images": 3},
    DOG,
    {"prompt": "a bird", "seeds": [7, 8]},
]


@pytest.fixture(scope="module")
def conditional_runs(ray_session, digits_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conditional")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    runs = {}
    for name, save, resolution in (("sd", tiny_pipelines.save_stable_diffusion, 16), ("sd3", tiny_pipelines.save_sd3, 8)):
        model = save(str(tmp / name))
        index = str(tmp / f"{name}-index")
        build_index(digits_corpus[0], index, EncodeOptions(encoder=os.path.join(model, "vae"), resolution=resolution,
                                                           batch_size=128))
        out = tmp / f"{name}-run"
        config = validate(gen_config(model, out, index, num_images=None, prompts=str(prompts), batch_size=2, steps=6,
                                   batch_radius=1e3, history_radius=1e3, history_size=2, guidance_scale=3.0,
                                   # untrained tiny pipelines draw noise: off-manifold by design, not the subject here
                                   allow_off_manifold=True,
                                   # radii of 1e3 force batch and history hits: correct at every step (the paper's schedule)
                                   min_noise_radii=0))
        generate(config)
        runs[name] = (str(out), config, resolution)
    return runs


@pytest.mark.parametrize("name", ["sd", "sd3"])
def test_prompts_run_shielded(conditional_runs, name):
    out, config, resolution = conditional_runs[name]
    rows = pd.read_parquet(os.path.join(out, "audit", "samples"))
    final = rows[rows["action"] != "resampled"]
    assert len(final) == 6 and final["sample"].is_unique
    assert final.groupby("prompt").size().to_dict() == {"a red cat": 3, DOG: 1, "a bird": 2}
    assert sorted(final.loc[(final["prompt"] == "a bird") & (final["attempt"] == 1), "seed"]) == [7, 8]
    assert final["nearest_key"].notna().all() and final["radius"].notna().all()
    images = tar_images(os.path.join(out, "images", "unit-00000.tar"))
    assert set(images) == set(final.loc[final["image"].notna(), "sample"])
    assert all(im.shape == (resolution, resolution, 3) for im in images.values())
    # files are named by the run, never by a prompt: nothing outside the run directory, no "dog"
    written = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files]
    assert all(os.path.realpath(w).startswith(os.path.realpath(out) + os.sep) for w in written)
    assert not any("dog" in w for w in written)
    assert not os.path.exists(os.path.join(os.path.dirname(out), "a"))


@pytest.mark.parametrize("name", ["sd", "sd3"])
def test_batch_and_history_hits_stay_within_a_prompt(conditional_runs, name):
    out, config, _ = conditional_runs[name]
    rows = pd.read_parquet(os.path.join(out, "audit", "samples"))
    hits = pd.read_parquet(os.path.join(out, "audit", "hits"))
    prompt_of = dict(zip(rows["sample"], rows["prompt"]))
    batch = hits[hits["source"] == "batch"]
    history = hits[hits["source"] == "history"]
    assert len(batch) > 0 and len(history) > 0
    # a sibling of the same prompt, never the sample itself, never another prompt
    assert (batch["neighbour_key"] != batch["sample"]).all()
    assert (batch["neighbour_key"].map(prompt_of) == batch["prompt"]).all()
    # batches of 2: [cat, cat], [cat, dog], [bird, bird]; the third cat is pushed from the first
    # two (earlier outputs of its prompt), nobody else has an earlier output of their prompt
    assert (history["neighbour_key"].map(prompt_of) == history["prompt"]).all()
    assert set(history["prompt"]) == {"a red cat"} and set(history["neighbour_key"]) <= {"s000000", "s000001"}
    assert (history["radius"] == 1e3).all() and (batch["radius"] == 1e3).all()


def test_guidance_scale_needs_a_conditional_model(ray_session, memorizer_model, tmp_path):
    with pytest.raises(UsageError, match="unconditional"):
        validate(gen_config(memorizer_model, tmp_path / "run", guidance_scale=2.0))
