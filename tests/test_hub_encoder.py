"""An encoder given as a hub id: resolved through the real huggingface_hub cache, offline.

The cache is the layout ``huggingface_hub`` itself writes (``models--owner--name/refs/main`` and
``snapshots/<commit>/``), filled with a tiny AutoencoderKL saved by ``save_pretrained`` inside a
pipeline-style repository (``vae/``). The build runs as a real subprocess with
``HF_HUB_OFFLINE=1`` and its own ``HF_HUB_CACHE``, as a user on a machine without network would
run it after one download: the hub id must index the same latents, under the same fingerprint, as
the directory the VAE came from, so that a local pipeline holding that VAE may use the index.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from spellshield.indexing.corpus import decode_image, iter_shard
from spellshield.indexing.encoders import Encoder, autoencoder_dir, autoencoder_fingerprint
from spellshield.indexing.manifest import read_manifest
from spellshield.indexing.search import open_index
from tests.conftest import ROOT
from tests.test_vae_encoder import save_tiny_vae

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "spellshield-tests/tiny-pipeline"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf-cache")
    storage = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = storage / "snapshots" / COMMIT
    save_tiny_vae(str(snapshot / "vae"), seed=3)
    (snapshot / "vae" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not fetched: fp16 variants are ignored")
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    local = str(tmp_path_factory.mktemp("local") / "vae")
    save_tiny_vae(local, seed=3)  # the same weights, as a plain directory
    return str(cache), str(snapshot / "vae"), local


def offline_env(cache: str) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=cache)


def build(argv, cache):
    return subprocess.run([sys.executable, "-m", "spellshield.jobs.build_index", *argv], cwd=ROOT, env=offline_env(cache),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_hub_id_builds_the_same_index_as_its_directory(hub_cache, digits_corpus, tmp_path):
    cache, snapshot_vae, local = hub_cache
    out = tmp_path / "index"
    proc = build(["--corpus", digits_corpus[0], "--out", str(out), "--encoder", f"{REPO}/vae", "--resolution", "16"], cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = read_manifest(str(out))
    assert manifest.latent.encoder == f"{REPO}/vae" and manifest.latent.encoder_class == "AutoencoderKL"
    # the fingerprint hashes the snapshot's tensors: equal to the plain directory's, so a pipeline
    # directory holding this VAE passes generate's encoder check
    assert manifest.latent.fingerprint == autoencoder_fingerprint(local) == autoencoder_fingerprint(snapshot_vae)
    samples = list(iter_shard(digits_corpus[0]))[:5]
    pixels = np.stack([decode_image(s.image, 16) for s in samples])
    expected = Encoder(local).init().encode(pixels).reshape(len(samples), -1).numpy()
    np.testing.assert_allclose(open_index(str(out)).vectors(range(5)).numpy(), expected, atol=1e-5, rtol=1e-5)


def test_a_hub_id_missing_from_the_offline_cache_is_one_line(hub_cache, digits_corpus, tmp_path):
    cache, _, _ = hub_cache
    out = tmp_path / "index"
    proc = build(["--corpus", digits_corpus[0], "--out", str(out), "--encoder", "nobody-here/no-such-vae"], cache)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "'nobody-here/no-such-vae' is neither a local directory nor a reachable hub id" in lines[0]
    assert not out.exists() and not os.path.exists(str(out) + ".partial")


@pytest.mark.parametrize("spec", ["a/b/c/d", "/no/such/directory/vae", "a//b", "../vae"])
def test_a_spec_that_is_no_directory_and_no_hub_id_is_refused(spec):
    with pytest.raises(ValueError, match="neither a local directory nor a hub id"):
        autoencoder_dir(spec)
