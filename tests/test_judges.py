"""Issue 14: the off-manifold and perceptual judges (pipeline.judges), the late-step gate of the
correction (SpellConfig.min_noise_radii), and the memorizer writing neither noise nor copies."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from spellshield.indexing.calibrate import calibrate_index
from spellshield.indexing.encoders import PIXELS, Encoder, LatentSpec
from spellshield.indexing.search import open_index
from spellshield.indexing.writer import IndexWriter
from spellshield.pipeline import judges
from spellshield.pipeline.parametrisation import affine_for
from spellshield.pipeline.repellency import repel
from spellshield.pipeline.scheduler import ShieldedScheduler, SpellConfig
from spellshield.pipeline.sources import StaticSource
from spellshield.pipeline.breach import is_breach
from spellshield.indexing.manifest import JUDGES, IndexFormatError, file_sha256, read_manifest, write_listed_json
from spellshield.indexing.verify import verify_index
from spellshield.workers.final_check import calibrate_with_judges, check_images, prepare_judges

from .conftest import CIFAR_DIR, needs_shared


# -- the math, against hand-worked values ---------------------------------------------------------
def test_roughness_and_saturation_hand_worked():
    flat = np.full((1, 4, 4, 3), 77, np.uint8)
    checker = np.zeros((1, 4, 4, 3), np.uint8)
    checker[0, (np.add.outer(np.arange(4), np.arange(4)) % 2) == 1] = 255
    assert judges.roughness(flat)[0] == 0.0
    assert judges.roughness(checker)[0] == 1.0  # every neighbour differs by the full range
    assert judges.saturated_share(checker)[0] == 1.0 and judges.saturated_share(flat)[0] == 0.0
    # a ramp 0, 10, 20, 30 along the width, constant down: dx = 10 everywhere, dy = 0
    ramp = np.broadcast_to(np.array([0, 10, 20, 30], np.uint8)[None, None, :, None], (1, 4, 4, 3))
    assert judges.roughness(ramp)[0] == pytest.approx((10 + 0) / 2 / 255)


def test_gaussian_kernel_and_low_pass_keep_constants():
    k = judges.gaussian_kernel(2.0)
    assert len(k) == 13 and k.sum() == pytest.approx(1.0) and np.allclose(k, k[::-1])
    assert k[6] / k[8] == pytest.approx(math.exp(0.5))  # exp(-(2/2)^2 / 2) relative to the centre
    const = np.full((2, 8, 8, 3), 0.25)
    assert np.allclose(judges.low_pass(const), 0.25)
    # a constant offset c over N values is an L2 distance of c * sqrt(N) in the blurred space too
    assert judges.perceptual_distance(const, const + 0.5)[0] == pytest.approx(0.5 * math.sqrt(8 * 8 * 3))


def test_ssim_hand_worked():
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (1, 9, 9, 3))
    assert judges.ssim(a, a)[0] == pytest.approx(1.0)
    # two constant images: variances and covariance 0, so SSIM = (2 x y + c1) / (x^2 + y^2 + c1)
    x, y = 0.5, -0.25
    c1 = (0.01 * 2) ** 2
    expected = (2 * x * y + c1) / (x * x + y * y + c1)
    got = judges.ssim(np.full((1, 9, 9, 1), x), np.full((1, 9, 9, 1), y))[0]
    assert got == pytest.approx(expected)
    # one 3x3 window (window = image size): the textbook formula with sample (n - 1) statistics
    p, q = rng.uniform(-1, 1, (2, 3, 3))
    n = 9
    mp, mq = p.mean(), q.mean()
    vp, vq = p.var() * n / (n - 1), q.var() * n / (n - 1)
    cov = ((p - mp) * (q - mq)).sum() / (n - 1)
    c2 = (0.03 * 2) ** 2
    by_hand = (2 * mp * mq + c1) * (2 * cov + c2) / ((mp * mp + mq * mq + c1) * (vp + vq + c2))
    assert judges.ssim(p[None, :, :, None], q[None, :, :, None], window=3)[0] == pytest.approx(by_hand)


def test_calibrate_and_judge_hand_worked():
    # three constant 4x4x1 images at 0, 64 and 255: blurring keeps them, so the 1-NN distances
    # are d01, d01 and d12 = (255 - 64) / 127.5 * 4 > d01 = 64 / 127.5 * 4: median d01, radius d01 / 2
    corpus = np.stack([np.full((4, 4, 1), v) for v in (0, 64, 255)]).astype(np.uint8)
    u = corpus.astype(np.float64) / 127.5 - 1
    d01 = (u[1] - u[0]).ravel()
    t = judges.calibrate(corpus)
    assert t.radius == pytest.approx(np.linalg.norm(d01) / 2) and t.sample_size == 3
    verdict = judges.judge(corpus[:1], corpus[None, :2], t)  # image 0 against itself and image 1
    assert verdict.index[0] == 0 and verdict.distance[0] == 0.0 and verdict.copy[0]
    verdict = judges.judge(corpus[1:2], corpus[None, [0, 2]], t)
    assert verdict.index[0] == 0 and verdict.distance[0] == pytest.approx(np.linalg.norm(d01))


def test_off_manifold_rule():
    smooth = np.full((2, 4, 4, 3), 100, np.uint8)
    scale = 10.0
    far = judges.off_manifold(smooth, np.array([scale * judges.DISTANCE_FACTOR * 0.99, scale * judges.DISTANCE_FACTOR * 1.01]),
                              scale, 0.2)
    assert far.tolist() == [False, True]
    assert judges.off_manifold(smooth, None, None, 0.2).tolist() == [False, False]
    noise = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 3)).astype(np.uint8)  # roughness ~ 1/3
    assert judges.off_manifold(noise, None, None, 0.2).tolist() == [True]
    assert judges.off_manifold(noise, None, None, 0.5).tolist() == [False]
    # the limit is read off the corpus: 2 x its 0.99 quantile (all equal here: 2 x 10 / 255 / 2)
    ramp = np.broadcast_to(np.array([0, 10, 20, 30], np.uint8)[None, None, :, None], (5, 4, 4, 3))
    assert judges.roughness_limit(ramp) == pytest.approx(2 * 10 / 2 / 255)


def test_is_breach():
    assert is_breach(None) is None
    assert is_breach(False, False, False) is False
    assert is_breach(True, False, False) and is_breach(False, True, False) and is_breach(False, False, True)
    assert is_breach(False, False, True, off_manifold_breach=False) is False


# -- the late-step gate ---------------------------------------------------------------------------
def test_correction_only_while_the_noise_can_absorb_it():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    dim = 48
    x_t = torch.randn(1, dim, 1, 1, generator=g)
    m = torch.randn(1, dim, 1, 1, generator=g)
    radius = 1.0
    for t in (sched.timesteps[5], sched.timesteps[-1]):
        affine = affine_for(sched, t, x_t)
        x0 = affine.x0_from_output(m, x_t).reshape(1, -1)
        z = x0 + 0.3 * torch.nn.functional.normalize(torch.randn(1, dim, generator=g), dim=1)
        noise = affine.noise_scale * math.sqrt(dim)
        # noise_scale is sigma_t / alpha_t of the DDIM schedule
        abar = float(sched.alphas_cumprod[int(t)])
        assert affine.noise_scale == pytest.approx(math.sqrt((1 - abar) / abar))
        shielded = ShieldedScheduler(sched, [StaticSource(z, radius)], SpellConfig(overcompensation=1.6, correction_iterations=1))
        out = shielded.correct(m, t, x_t, 0, {})
        implied = affine.x0_from_output(out, x_t).reshape(1, -1).double()
        if noise >= radius:  # early: exactly the paper's x0_hat + lam * delta
            expected = x0.double() + 1.6 * repel(x0[0], z, radius).delta
            assert torch.allclose(implied, expected, atol=1e-4) and shielded.log.hits
        else:  # last step: less noise left than a radius, the output is left alone
            assert torch.equal(out, m) and not shielded.log.hits
    assert noise < radius  # the loop did reach the gated case


# -- the final check: a protected image under noise -------------------------------------------------
def smooth_images(count: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """uint8 (N, size, size, 3): random 4x4 colour fields upsampled bilinearly (natural-ish, smooth)."""
    coarse = torch.from_numpy(np.random.default_rng(seed).uniform(-0.9, 0.9, (count, 3, 4, 4))).float()
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    return ((fine.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def pixel_index(path: str, images: np.ndarray, judges: bool = True) -> str:
    """A real calibrated pixel index over ``images`` (N, S, S, 3) uint8, keys p0, p1, ...; with
    ``judges`` finished as build-index finishes one (the judges' calibration stored), without as
    an index built before it existed."""
    size = images.shape[1]
    spec = LatentSpec(PIXELS, "pixels", PIXELS, size, (3, size, size), 1.0, 0.0)
    vectors = Encoder(PIXELS).encode(images).reshape(len(images), -1).numpy()
    writer = IndexWriter(str(path), spec, 1000)
    writer.add([f"p{i}" for i in range(len(images))], ["s.tar"] * len(images), ["0"] * len(images), vectors)
    writer.finish({}, calibrate=calibrate_with_judges if judges else lambda staging, m: calibrate_index(staging, m))
    return str(path)


def test_protected_image_under_noise_passes_l2_and_is_caught_by_the_perceptual_judge(tmp_path):
    protected = smooth_images(64)
    shield = open_index(pixel_index(tmp_path / "index", protected))
    encoder = Encoder(PIXELS).init()
    radius = shield.manifest.suggested_radius
    rng = np.random.default_rng(1)
    unit = protected[:8].astype(np.float64) / 127.5 - 1
    noise = rng.standard_normal(unit.shape)
    noise *= 1.6 * radius / np.linalg.norm(noise.reshape(8, -1), axis=1)[:, None, None, None]
    noisy = np.clip(np.round((unit + noise + 1) * 127.5), 0, 255).astype(np.uint8)
    new = smooth_images(8, seed=99)  # not in the index
    setup = prepare_judges(shield, encoder)
    check = check_images(np.concatenate([noisy, new]), encoder, shield, radius, setup)
    # the L2 judge: no noisy copy is inside its ball (1.6 r, a little less after clipping)
    assert not check.inside[:8].any()
    assert (check.distances[:8] > radius).all()
    assert check.keys[:8] == [f"p{i}" for i in range(8)]  # the original is still the L2-nearest
    # the perceptual judge: every one is a copy of its original; the new images are not copies
    assert check.perceptual_copy[:8].all() and check.perceptual_keys[:8] == [f"p{i}" for i in range(8)]
    assert not check.perceptual_copy[8:].any()
    assert not check.off_manifold[8:].any()  # (the noisy ones are rougher than this very smooth corpus)
    assert all(is_breach(i, p, o) for i, p, o in zip(check.inside[:8], check.perceptual_copy[:8], check.off_manifold[:8]))


# -- the judges' calibration, computed once and stored in the index --------------------------------
def test_judge_calibration_is_stored_in_the_index_and_loaded(tmp_path, capsys):
    protected = smooth_images(64)
    stored_dir = pixel_index(tmp_path / "stored", protected)
    bare_dir = pixel_index(tmp_path / "bare", protected, judges=False)  # an index from before issue 14's part 1
    encoder = Encoder(PIXELS).init()
    manifest = read_manifest(stored_dir)
    name, sha256 = manifest.judges_file
    assert name == JUDGES.format(sha256[:16]) and file_sha256(os.path.join(stored_dir, name)) == sha256
    assert read_manifest(bare_dir).judges_file is None
    capsys.readouterr()
    stored = prepare_judges(open_index(stored_dir), encoder)
    assert stored.source == "stored" and capsys.readouterr().err == ""  # loaded: nothing calibrated, nothing said
    computed = prepare_judges(open_index(bare_dir), encoder)
    err = capsys.readouterr().err
    assert computed.source == "computed"
    assert "has no stored judge calibration" in err and f"`spellshield index calibrate {bare_dir}` stores it" in err
    # either way the thresholds are the math's on the protected images themselves (all 64 < the sample size)
    expected = judges.calibrate(protected)
    quantile = manifest.calibration["nn_distance_quantiles"][judges.DISTANCE_QUANTILE]
    for j in (stored, computed):
        assert j.perceptual == expected and j.roughness_limit == judges.roughness_limit(protected)
        assert j.corpus_nn_quantile == quantile
    # a calibration made with other judge settings is stale: calibrated afresh, and said
    with open(os.path.join(stored_dir, name)) as f:
        payload = json.load(f)
    payload["settings"]["blur_fraction"] = 0.125
    with open(os.path.join(stored_dir, "manifest.json")) as f:
        raw = json.load(f)
    raw["calibration"]["judges"] = write_listed_json(stored_dir, JUDGES, payload)
    with open(os.path.join(stored_dir, "manifest.json"), "w") as f:
        json.dump(raw, f)
    stale = prepare_judges(open_index(stored_dir), encoder)
    assert stale.source == "computed" and stale.perceptual == expected
    assert "was calibrated with other judge settings" in capsys.readouterr().err


def test_tampered_judge_calibration_fails_closed(tmp_path):
    from spellshield.workers.generation import ShieldUnavailable, verify_index_files

    index = pixel_index(tmp_path / "index", smooth_images(32))
    name, _ = read_manifest(index).judges_file
    path = os.path.join(index, name)
    with open(path) as f:
        payload = json.load(f)
    payload["perceptual"]["radius"] = 1e-9  # the perceptual judge quietly disabled
    with open(path, "w") as f:
        json.dump(payload, f)
    encoder = Encoder(PIXELS).init()
    with pytest.raises(IndexFormatError, match=f"{name} does not match its sha256 in the manifest"):
        prepare_judges(open_index(index), encoder)  # the audit's and the generation worker's loader
    with pytest.raises(ShieldUnavailable, match="does not match its sha256"):
        verify_index_files(index)  # what a generation worker checks before it opens the shield
    with pytest.raises(IndexFormatError, match="does not match its sha256"):
        verify_index(index, check_corpus=False)
    os.remove(path)
    with pytest.raises(IndexFormatError, match=f"{name} cannot be read"):
        prepare_judges(open_index(index), encoder)


# -- a pluggable copy-detection descriptor ------------------------------------------------------------
class MirrorDescriptor(torch.nn.Module):
    """A tiny stand-in for SSCD: 4x4 mean colours, summed with their mirror image (so a mirrored
    copy has exactly its original's descriptor), centred."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4)
        both = pooled + torch.flip(pooled, dims=[3])
        return (both - both.mean(dim=(1, 2, 3), keepdim=True)).flatten(1)


def test_descriptor_judge_catches_a_mirrored_copy_and_fails_closed_on_another_module(tmp_path, capsys):
    from spellshield.jobs.cli import main

    protected = smooth_images(64)
    index = pixel_index(tmp_path / "index", protected)
    module = str(tmp_path / "mirror.pt")
    torch.jit.script(MirrorDescriptor()).save(module)
    assert main(["index", "calibrate", index, "--descriptor", module]) == 0
    manifest = read_manifest(index)
    files = manifest.calibration["judges"]["files"]
    assert len(files) == 1 and set(files) <= set(manifest.listed_files) and verify_index(index, check_corpus=False)
    shield = open_index(index)
    encoder = Encoder(PIXELS).init()
    setup = prepare_judges(shield, encoder)
    # the threshold by its rule, brute force: 0.99 quantile of each protected image's best other similarity
    with torch.no_grad():
        mine = MirrorDescriptor()(torch.from_numpy(protected).permute(0, 3, 1, 2).float() / 255).numpy()
    mine /= np.linalg.norm(mine, axis=1, keepdims=True)
    sims = mine @ mine.T
    np.fill_diagonal(sims, -np.inf)
    assert setup.descriptor.threshold == pytest.approx(np.quantile(sims.max(axis=1), 0.99), abs=1e-5)
    mirrored = np.ascontiguousarray(protected[:8, :, ::-1])
    new = smooth_images(8, seed=99)
    check = check_images(np.concatenate([mirrored, new]), encoder, shield, shield.manifest.suggested_radius, setup)
    assert not check.inside[:8].any()  # a mirrored copy is far in L2
    assert check.descriptor_copy[:8].all() and check.descriptor_keys[:8] == [f"p{i}" for i in range(8)]
    assert check.copy_judged[:8].all()  # a breach for the final check (generation: perceptual_copy)
    assert not check.descriptor_copy[8:].any() and not check.copy_judged[8:].any()
    # the module changed after calibration: refuse to judge with it
    with open(module, "ab") as f:
        f.write(b"\0")
    with pytest.raises(IndexFormatError, match="is not the one the index's judges were calibrated with"):
        prepare_judges(open_index(index), encoder)
    # recalibrating without --descriptor drops the judge and its descriptors file
    assert main(["index", "calibrate", index]) == 0
    assert prepare_judges(open_index(index), encoder).descriptor is None
    assert not [f for f in os.listdir(index) if f.startswith("descriptors-")]


# -- the memorizer at reduced size, with the defaults ---------------------------------------------
def memorizer_setup(tmp_path, count: int, protected: int):
    from spellshield.jobs.memorizer import save_memorizer

    from .index_helpers import cifar_pixels

    vectors = cifar_pixels(CIFAR_DIR, count)
    images = Encoder(PIXELS).decode(torch.from_numpy(vectors).reshape(-1, 3, 32, 32))
    model = save_memorizer(torch.from_numpy(vectors).reshape(-1, 3, 32, 32), str(tmp_path / "model"))
    index = pixel_index(tmp_path / "index", images[:protected])
    return model, index, images


def run_worker(tmp_path, name, model, index, samples, spell, policy):
    from spellshield.pipeline.config import GenerateConfig
    from spellshield.workers.generation import GenerationWorker, WorkerRuntime
    from spellshield.workers.units import PromptRequest, plan_samples, plan_units

    run_dir = str(tmp_path / name)
    shield = open_index(index)
    config = GenerateConfig.build(model, run_dir, index=index, radius=shield.manifest.suggested_radius, spell=spell,
                                  steps=50, batch_size=samples, on_breach=policy, max_attempts=4)
    worker = GenerationWorker(config, WorkerRuntime(device="cpu"))
    for unit in plan_units(plan_samples([PromptRequest(None, samples)], base_seed=0), unit_size=samples):
        worker.run_unit(unit)
    return pd.read_parquet(os.path.join(run_dir, "audit", "samples"))


@needs_shared
@pytest.mark.slow
def test_memorizer_with_every_image_protected_writes_no_noise(tmp_path):
    # Every training image protected: any output the memorizer can make is a copy. Before the
    # late-step gate (min_noise_radii=0: every step, the paper's schedule) the push at the last
    # steps turned them into saturated noise, off-manifold; with the defaults they stay the
    # copies they are, and the final check says so.
    model, index, _ = memorizer_setup(tmp_path, 64, 64)
    ungated = run_worker(tmp_path, "ungated", model, index, 6, SpellConfig(min_noise_radii=0), "flag")
    assert ungated["off_manifold"].any()
    gated = run_worker(tmp_path, "gated", model, index, 6, SpellConfig(), "flag")
    assert not gated["off_manifold"].any()
    assert gated["inside_shield"].all() and (gated["action"] == "flagged").all()
    dropped = run_worker(tmp_path, "resample", model, index, 6, SpellConfig(), "resample")
    assert dropped["image"].isna().all()  # nothing can be written: every attempt is a copy


@needs_shared
@pytest.mark.slow
def test_memorizer_half_protected_defaults_write_no_copy_and_no_noise(tmp_path):
    model, index, images = memorizer_setup(tmp_path, 128, 64)
    rows = run_worker(tmp_path, "run", model, index, 16, SpellConfig(), "resample")
    written = rows[rows["image"].notna()]
    assert len(written) >= 12
    assert not written["inside_shield"].any()
    assert not written["perceptual_copy"].any()
    assert not written["off_manifold"].any()
    # what was written is one of the unprotected training images (the memorizer's only outputs)
    assert (written["nearest_distance"] > 0).all()


def test_allow_off_manifold_option_reaches_the_worker(tmp_path):
    import argparse

    from spellshield.jobs.generate import add_arguments
    from spellshield.jobs.memorizer import save_memorizer
    from spellshield.jobs.run_config import config_from_args, validate

    model = save_memorizer(torch.zeros(2, 3, 8, 8), str(tmp_path / "model"))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for extra, expected in (([], False), (["--allow-off-manifold"], True)):
        config = validate(config_from_args(parser.parse_args(["--model", model, "--out", str(tmp_path / "run"), *extra])))
        assert config.breach.allow_off_manifold is expected  # the very object the workers get


def test_audit_reports_the_descriptor_judge_only_where_the_index_has_one():
    from spellshield.auditing.report import judge_rate_text, judges_html
    from spellshield.auditing.stats import perceptual_summary, wilson_interval

    rows = pd.DataFrame({"audit_perceptual_copy": [True, False, False, False], "audit_off_manifold": [False] * 4,
                         "audit_descriptor_copy": [True, True, False, False]})
    second = perceptual_summary(rows)
    assert second["descriptor_copy"] == {"near_duplicates": 2, "num_samples": 4, "near_duplicate_rate": 0.5,
                                         "near_duplicate_rate_ci95": list(wilson_interval(2, 4))}
    page = judges_html({"second_judges": second, "near_duplicate_rate": None})
    assert judge_rate_text(second["descriptor_copy"]) in page and "Descriptor copy" in page
    without = perceptual_summary(rows.assign(audit_descriptor_copy=None))  # an index without a descriptor judge
    assert "descriptor_copy" not in without
    assert "not measured" in judges_html({"second_judges": without, "near_duplicate_rate": None})
