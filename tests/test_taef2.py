"""TAEF2: the released weights load strictly into a real diffusers model that reconstructs real
images, matches an independent re-implementation of the reference network, and keeps one
fingerprint through save_pretrained inside a pipeline directory."""

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from spellshield.indexing.encoders import Encoder, autoencoder_fingerprint, load_autoencoder
from spellshield.indexing.taef2 import TAEF2, released_state_dict
from spellshield.toys.autoencoders import reconstruction_psnr as psnr
from spellshield.toys.indexes import cifar_images
from tests.conftest import CIFAR_DIR, SHARED

TAEF2_DIR = os.path.join(SHARED, "models", "taef2")
needs_taef2 = pytest.mark.skipif(not os.path.isdir(TAEF2_DIR) or not os.path.isdir(CIFAR_DIR),
                                 reason="../shared (TAEF2 weights, CIFAR-10 shards) is absent")
pytestmark = needs_taef2


# -- an independent re-implementation of the reference network (TAESD's taesd.py layout, with the
# -- flux_2 mid-block GroupNorm branch), written from the shared README, not from spellshield.indexing.taef2
def _conv(n_in, n_out, **kw):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class _RefBlock(nn.Module):
    def __init__(self, n, pool=False):
        super().__init__()
        self.conv = nn.Sequential(_conv(n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))
        self.pool = nn.Sequential(nn.Conv2d(n, 4 * n, 1, bias=False), nn.GroupNorm(4, 4 * n), nn.ReLU(),
                                  nn.Conv2d(4 * n, n, 1, bias=False)) if pool else None

    def forward(self, x):
        if self.pool is not None:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + x)


class _Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


def reference_encoder():
    b = _RefBlock
    return nn.Sequential(_conv(3, 64), b(64), _conv(64, 64, stride=2, bias=False), b(64), b(64), b(64),
                         _conv(64, 64, stride=2, bias=False), b(64), b(64), b(64),
                         _conv(64, 64, stride=2, bias=False), b(64, True), b(64, True), b(64, True), _conv(64, 32))


def reference_decoder():
    b = _RefBlock
    up = lambda: nn.Upsample(scale_factor=2)  # noqa: E731
    return nn.Sequential(_Clamp(), _conv(32, 64), nn.ReLU(), b(64, True), b(64, True), b(64, True), up(),
                         _conv(64, 64, bias=False), b(64), b(64), b(64), up(), _conv(64, 64, bias=False),
                         b(64), b(64), b(64), up(), _conv(64, 64, bias=False), b(64), _conv(64, 3))


@pytest.fixture(scope="module")
def taef2():
    return TAEF2.from_pth(TAEF2_DIR)


@pytest.fixture(scope="module")
def images64():
    return cifar_images(CIFAR_DIR, 16, resolution=64)  # the first 16, bicubic-upscaled from 32x32


def test_strict_load_and_shapes(taef2):
    state = released_state_dict(TAEF2_DIR)
    assert set(state) == set(taef2.state_dict())  # every released tensor has a home, and nothing else
    assert sum(".pool." in k for k in state) == 24
    x = torch.zeros(2, 3, 64, 48)
    with torch.no_grad():
        z = taef2.encode(x).latents
        y = taef2.decode(z).sample
    assert z.shape == (2, 32, 8, 6) and y.shape == (2, 3, 64, 48)


def test_matches_reference_network(taef2, images64):
    """Same outputs as the reference layout fed [0, 1] images, weights loaded strictly into both."""
    enc, dec = reference_encoder().eval(), reference_decoder().eval()
    enc.load_state_dict(torch.load(os.path.join(TAEF2_DIR, "taef2_encoder.pth"), weights_only=True), strict=True)
    dec.load_state_dict(torch.load(os.path.join(TAEF2_DIR, "taef2_decoder.pth"), weights_only=True), strict=True)
    enc.float(), dec.float()
    x = torch.from_numpy(images64[:4]).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        ref_z = enc(x)
        ref_y = dec(ref_z).clamp(0, 1)
        z = taef2.encode(x * 2 - 1).latents
        y = (taef2.decode(z).sample.clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(z, ref_z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-4)


def test_reconstruction_psnr_on_real_images(taef2, images64):
    """31.5 dB mean, 26.4 dB worst on these 16 CIFAR images at 64x64 (benchmarks/taef2_quality.py
    measures them, and 256x256, for benchmarks/RESULTS.md and the README)."""
    values = psnr(taef2, images64)
    assert values.mean() > 28.0 and values.min() > 24.0
    # the stock AutoencoderTiny loads the same weights only non-strictly, and is a different model
    from diffusers import AutoencoderTiny

    stock = AutoencoderTiny(latent_channels=32).eval()
    result = stock.load_state_dict(taef2.state_dict(), strict=False)
    assert len(result.unexpected_keys) == 24 and not result.missing_keys
    assert psnr(stock, images64[:4]).mean() < values.mean() - 8


def test_save_pretrained_in_a_pipeline_keeps_weights_and_fingerprint(taef2, tmp_path):
    from spellshield.jobs.memorizer import make_scheduler
    from spellshield.pipeline.loading import describe_model, load_pipeline
    from spellshield.pipeline.memorizer import MemorizerPipeline, MemorizerUNet

    scheduler = make_scheduler()
    unet = MemorizerUNet.from_latents(torch.zeros(2, 32, 4, 4), scheduler.alphas_cumprod, encoder=TAEF2_DIR)
    MemorizerPipeline(unet=unet, scheduler=scheduler, vae=load_autoencoder(TAEF2_DIR)).save_pretrained(tmp_path / "model")
    with open(tmp_path / "model" / "model_index.json") as f:
        assert json.load(f)["vae"] == ["spellshield.indexing.taef2", "TAEF2"]
    spec = describe_model(str(tmp_path / "model"))
    assert autoencoder_fingerprint(spec.vae_path) == autoencoder_fingerprint(TAEF2_DIR)
    pipe = load_pipeline(str(tmp_path / "model"))
    assert type(pipe.vae) is TAEF2
    for key, value in taef2.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[key], value), key
    # a different model has a different fingerprint
    other = TAEF2.from_pth(TAEF2_DIR)
    with torch.no_grad():
        other.encoder.layers[0].bias[0] += 1
    other.save_pretrained(tmp_path / "other")
    assert autoencoder_fingerprint(str(tmp_path / "other")) != autoencoder_fingerprint(TAEF2_DIR)


def test_encoder_spec_on_the_weights_directory(images64):
    encoder = Encoder(TAEF2_DIR).init()
    spec = encoder.latent_spec(64)
    assert spec.shape == (32, 8, 8) and spec.encoder_class == "TAEF2"
    assert spec.fingerprint == autoencoder_fingerprint(TAEF2_DIR) and spec.scaling_factor == 1.0
    latents = encoder.encode(images64[:2])
    assert latents.shape == (2, 32, 8, 8) and torch.isfinite(latents).all()


def test_build_index_with_the_weights_directory(ray_session, tmp_path):
    """`--encoder <taef2 dir>` through the Ray build: stored vectors are TAEF2's latents of the images."""
    from spellshield.indexing.corpus import decode_image, iter_shard
    from spellshield.indexing.manifest import read_manifest
    from spellshield.indexing.search import open_index
    from spellshield.jobs.build_index import build_index
    from spellshield.jobs.dataflow import EncodeOptions
    from tests.conftest import add_tar_members

    samples = []
    for item in iter_shard(os.path.join(CIFAR_DIR, "train-000000.tar")):
        samples.append(item)
        if len(samples) == 12:
            break
    tar = str(tmp_path / "cifar-small-000000.tar")
    add_tar_members(tar, [(f"{s.key}.jpg", s.image) for s in samples])
    out = str(tmp_path / "index")
    build_index(tar, out, EncodeOptions(encoder=TAEF2_DIR, resolution=32, batch_size=5), shard_size=100)
    manifest = read_manifest(out)
    assert manifest.count == 12 and manifest.latent.encoder_class == "TAEF2" and manifest.latent.shape == (32, 4, 4)
    assert manifest.latent.fingerprint == autoencoder_fingerprint(TAEF2_DIR)
    pixels = np.stack([decode_image(s.image, 32) for s in samples])
    expected = Encoder(TAEF2_DIR).init().encode(pixels).reshape(12, -1).numpy()
    np.testing.assert_allclose(open_index(out).vectors(range(12)).numpy(), expected, atol=1e-4, rtol=1e-4)
