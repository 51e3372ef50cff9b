"""The build benchmarks' measuring code runs at toy size on the CPU (the lead runs the GPU one)."""

import subprocess
import sys

import numpy as np

from benchmarks.build_index import TreeSampler, encode_vs_bare
from tests.test_vae_encoder import save_tiny_vae


def test_encode_vs_bare_runs_on_cpu(ray_session, digits_corpus, tmp_path):
    vae = save_tiny_vae(str(tmp_path / "vae"), seed=0)
    result = encode_vs_bare(",".join(digits_corpus[:2]), vae, resolution=16, batch_size=64, device="cpu")
    assert result["images"] == 450 and result["chunks"] == 8  # 225 images per tar: chunks of 64, 64, 64, 33
    assert result["device"] == "cpu" and result["bare_images_per_second"] > 0
    for key in ("steady_images_per_second", "end_to_end_images_per_second", "ratio_steady", "ratio_end_to_end"):
        assert np.isfinite(result[key]) and result[key] > 0, key


def test_tree_sampler_sees_a_child_process_memory():
    code = "import time; block = bytearray(64 << 20); block[::4096] = b'x' * len(block[::4096]); time.sleep(1.5)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    with TreeSampler(proc.pid, interval=0.1) as sampler:
        proc.wait()
    assert sampler.peak["driver_rss"] >= 64 << 20 and sampler.peak["tree_pss_sum"] >= 60 << 20
