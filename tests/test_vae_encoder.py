"""A diffusers autoencoder as the encoder: index, memorizer and generate in its latent space.

The autoencoder is a tiny AutoencoderKL with random weights, saved with ``save_pretrained``
and loaded through the same ``--encoder DIR`` path users take."""

import os

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import AutoencoderKL

from spellshield.indexing.encoders import autoencoder_fingerprint
from spellshield.indexing.manifest import read_manifest
from spellshield.jobs.build_index import build_index
from spellshield.jobs.dataflow import EncodeOptions
from spellshield.jobs.generate import generate, validate
from spellshield.jobs.memorizer import build_memorizer
from spellshield.jobs.runtime import UsageError
from spellshield.pipeline.loading import describe_model
from tests.test_generate import gen_config


def save_tiny_vae(path: str, seed: int) -> str:
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4, sample_size=16, scaling_factor=0.5,
    )
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae_setup(ray_session, digits_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vae")
    vae = save_tiny_vae(str(tmp / "vae"), seed=0)
    options = EncodeOptions(encoder=vae, resolution=16, batch_size=128)
    index = str(tmp / "index")
    build_index(",".join(digits_corpus[:2]), index, options, shard_size=1000)
    model = str(tmp / "model")
    build_memorizer(",".join(digits_corpus[:4]), model, options)
    return tmp, vae, index, model


def test_index_stores_scaled_latents(vae_setup, digits_corpus):
    tmp, vae, index, model = vae_setup
    manifest = read_manifest(index)
    assert manifest.latent.shape == (4, 8, 8) and manifest.latent.encoder_class == "AutoencoderKL"
    assert manifest.latent.scaling_factor == 0.5
    assert manifest.latent.fingerprint == autoencoder_fingerprint(vae)
    # the stored vector of sample 0 is (mean of the posterior) * scaling_factor
    from spellshield.indexing.corpus import decode_image, iter_shard
    from spellshield.indexing.search import open_index

    first = next(iter_shard(digits_corpus[0]))
    pixels = decode_image(first.image, 16)[None]
    loaded = AutoencoderKL.from_pretrained(vae)
    with torch.no_grad():
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        expected = loaded.encode(x).latent_dist.mean * 0.5
    stored = open_index(index).vectors([0])
    np.testing.assert_allclose(stored.numpy()[0], expected.reshape(-1).numpy(), atol=1e-5)


def test_model_carries_the_vae_and_generates(vae_setup):
    tmp, vae, index, model = vae_setup
    spec = describe_model(model)
    assert spec.latent_shape == (4, 8, 8) and spec.vae_path is not None
    assert autoencoder_fingerprint(spec.vae_path) == autoencoder_fingerprint(vae)  # same weights, re-saved
    out = tmp / "run"
    # an untrained tiny VAE decodes noise: off-manifold by design, not the subject here
    info = generate(validate(gen_config(model, out, index, num_images=4, steps=10, allow_off_manifold=True)))
    samples = pd.read_parquet(os.path.join(out, "audit", "samples"))
    assert len(samples[samples["action"] != "resampled"]) == 4 and info["units_done"] == 1
    assert samples["nearest_key"].notna().all()


def test_other_vae_is_refused(vae_setup, tmp_path):
    tmp, vae, index, model = vae_setup
    other = save_tiny_vae(str(tmp_path / "other-vae"), seed=1)
    # same latent shape, different weights: the index cannot shield this model
    other_index = tmp_path / "other-index"
    build_index(read_manifest(index).build["corpus"], str(other_index), EncodeOptions(encoder=other, resolution=16, batch_size=128))
    with pytest.raises(UsageError, match="index encoder .* is not the model's"):
        validate(gen_config(model, tmp_path / "run", str(other_index)))
    assert not (tmp_path / "run").exists()
