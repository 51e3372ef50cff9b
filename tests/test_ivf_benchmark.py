"""The scale benchmark and its synthetic-latent generator run at toy size and check their own answers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT


def test_scale_benchmark_at_toy_size(tmp_path):
    out = tmp_path / "scale.json"
    argv = ["--n", "3000", "--dim", "64", "--dims", "16", "--lists", "32", "--batches", "2", "--threads", "1",
            "--scratch", str(tmp_path / "scratch"), "--out", str(out)]
    proc = subprocess.run([sys.executable, "benchmarks/scale.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["n"] == 3000 and result["dim"] == 64 and result["build"]["lists"] == 32
    assert result["gemm_scan_ms"] >= result["gemm_compute_ms"] > 0 and result["build"]["peak_rss_gb"] > 0
    assert [row["radius_factor"] for row in result["search"]] == [1.0, 0.5, 0.25, 0.125]
    for row in result["search"]:
        assert row["recall"] == 1.0 and row["precision"] == 1.0
        assert 0 < row["probed_fraction"] <= 1 and row["candidates_per_query"] >= 0
    assert result["search"][0]["hits"] >= 2 * 8  # the near half of every batch hits at the suggested radius
    # a second run reopens the structure instead of building it: same radius, queries and answers
    again = tmp_path / "again.json"
    again.write_text(json.dumps({"build": result["build"]}))
    proc = subprocess.run([sys.executable, "benchmarks/scale.py", *argv[:-1], str(again), "--reuse-structure"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    reused = json.loads(again.read_text())
    assert reused["build"] == {**result["build"], "reused": True, "reused_structure": reused["build"]["reused_structure"]}
    assert reused["radius"] == result["radius"] and "built 32 lists" not in proc.stdout and "reusing" in proc.stdout
    assert [(r["hits"], r["lists_per_query"]) for r in reused["search"]] == [(r["hits"], r["lists_per_query"]) for r in result["search"]]
    assert 0 < reused["search_memory_gb"]["at_start"]["VmRSS"] <= reused["search_peak_rss_gb"]
    tables = subprocess.run([sys.executable, "benchmarks/scale.py", "--tables", str(out), str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert tables.returncode == 0, tables.stderr[-2000:]
    assert tables.stdout.count("| synthetic | 3,000 | 32 |") == 8 and "- r x 0.125, N x 1: time x 1.0" in tables.stdout

    # the profile reopens that structure (refitting the very projection) and splits its time
    profile = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "benchmarks/ivf_profile.py", str(out), "--scratch", str(tmp_path / "scratch"),
                           "--batches", "2", "--chunk-rows", "1000", "64", "--head-dims", "16", "4", "--out", str(profile)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(profile.read_text())["rows"]
    # once per block size and head (the candidates of two block sizes, the answers of two heads checked equal by the script)
    assert [(row["chunk_rows"], row["head_dims"], row["radius_factor"]) for row in rows] == [
        (c, k, f) for c in (1000, 64) for k in (16, 4) for f in (1.0, 0.5, 0.25, 0.125)]
    for row in rows:  # the batch's union of lists: at least one query's lists, at most all, at most their sum
        assert 0 < row["union_rows_per_batch"] <= min(3000, row["own_rows_per_batch"])
        assert row["union_rows_per_batch"] >= row["own_rows_per_batch"] / 16
        assert min(row["candidates_ms"], row["probe_ms"], row["read_codes_ms"], row["gemm_ms"]) > 0
        assert 0 <= row["head_survivors_per_batch"] <= row["union_rows_per_batch"]
    for one, head in zip(rows[:4], rows[4:8]):  # a 4-dim first pass keeps at least the rows a 16-dim one keeps
        assert head["head_survivors_per_batch"] >= one["head_survivors_per_batch"]
    assert rows[0]["union_rows_per_batch"] >= rows[-1]["union_rows_per_batch"]
    wrong = subprocess.run([sys.executable, "benchmarks/ivf_profile.py", str(out), "--scratch", str(tmp_path / "scratch"),
                            "--fit-sample", "100"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert wrong.returncode == 2 and "does not reproduce the codes" in wrong.stderr

    # the A/B of two versions of the scan on that structure: HEAD's ivf.py against the working tree's
    ab = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, "benchmarks/ivf_ab.py", str(out), "--scratch", str(tmp_path / "scratch"),
                           "--against", "HEAD", "--batches", "2", "--rounds", "1", "--out", str(ab)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(ab.read_text())
    assert [row["radius_factor"] for row in result["rows"]] == [1.0, 0.5, 0.25, 0.125] and result["n"] == 3000
    assert all(row["before_ms"] > 0 and row["now_ms"] > 0 for row in result["rows"]) and proc.stdout.count("the same hits") == 4
    missing = subprocess.run([sys.executable, "benchmarks/ivf_ab.py", str(out), "--scratch", str(tmp_path / "scratch"),
                              "--against", "no-such-commit"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and "no indexing/ivf.py at no-such-commit" in missing.stderr


def test_scale_benchmark_on_cached_real_latents(tmp_path):
    """``--cifar-taef2 N`` runs on the latents ``benchmarks/search.py`` cached under ``--scratch`` (here a
    stand-in file at that path: encoding 50,000 images is the slow part the cache exists to skip),
    encodes nothing, and its rows are labelled real in the tables."""
    sys.path.insert(0, f"{ROOT}/benchmarks")
    from search import taef2_cache_path

    scratch, out = tmp_path / "scratch", tmp_path / "real.json"
    scratch.mkdir()
    np.save(taef2_cache_path(str(scratch), 2000), np.random.default_rng(1).standard_normal((2000, 48)).astype(np.float32))
    argv = ["--cifar-taef2", "2000", "--dims", "16", "--lists", "16", "--batches", "2", "--threads", "1",
            "--scratch", str(scratch), "--out", str(out)]
    proc = subprocess.run([sys.executable, "benchmarks/scale.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["n"] == 2000 and result["dim"] == 48 and "encode_s" not in result
    assert result["data"].startswith("real: the first 2,000 CIFAR-10 training images through TAEF2 at 64 px")
    assert all(row["recall"] == 1.0 and row["precision"] == 1.0 for row in result["search"])
    tables = subprocess.run([sys.executable, "benchmarks/scale.py", "--tables", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert tables.stdout.count("| real TAEF2 | 2,000 | 16 |") == 4 and "| 2,000 (real TAEF2) |" in tables.stdout
    both = subprocess.run([sys.executable, "benchmarks/scale.py", *argv, "--vectors", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "give one" in both.stderr


def test_synthetic_latents_have_the_real_spectrum(tmp_path):
    sys.path.insert(0, f"{ROOT}/benchmarks")
    from synthetic_latents import generate, load_spectrum

    var, mean = load_spectrum()
    assert len(var) == 2048 and np.all(np.diff(var) <= 1e-9)  # the real TAEF2 latents' PCA variances
    path = generate(str(tmp_path / "v.npy"), 6000, seed=3, dup_share=0.0, log=lambda _m: None)
    x = np.load(path).astype(np.float64)
    assert x.shape == (6000, 2048) and np.load(path, mmap_mode="r").dtype == np.float16
    np.testing.assert_allclose(x.mean(0), mean, atol=0.1)
    top = np.linalg.eigvalsh(np.cov((x - x.mean(0)).T))[::-1][:20]
    np.testing.assert_allclose(top, var[:20], rtol=0.2)  # 6,000 samples: sampling error of a few %
    np.testing.assert_allclose(((x - mean) ** 2).sum(1).mean(), var.sum(), rtol=0.02)
    again = generate(str(tmp_path / "w.npy"), 6000, seed=3, dup_share=0.0, log=lambda _m: None)
    assert np.array_equal(np.load(again), np.load(path))  # seeded: the same file


def test_rows_read_with_pread_equal_the_memory_map(tmp_path):
    from spellshield.indexing.ivf import NpyRows
    from spellshield.indexing.manifest import IndexFormatError

    data = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float16)
    np.save(tmp_path / "a.npy", data)
    rows = NpyRows(str(tmp_path / "a.npy"))
    assert rows.shape == (50, 7) and len(rows) == 50
    np.testing.assert_array_equal(rows[3:17], data[3:17])
    np.testing.assert_array_equal(rows[45:80], data[45:])
    np.testing.assert_array_equal(rows[np.array([0, 4, 4, 49])], data[[0, 4, 4, 49]])
    rows.close()
    with open(tmp_path / "a.npy", "r+b") as f:  # a file cut short of its header's rows is refused
        f.truncate(os.path.getsize(tmp_path / "a.npy") - 3)
    with NpyRows(str(tmp_path / "a.npy")) as rows:
        np.testing.assert_array_equal(rows[0:48], data[:48])
        with pytest.raises(IndexFormatError, match="shorter than its header says"):
            rows[40:50]


def test_scan_kernels_benchmark_runs_every_kernel(tmp_path):
    """benchmarks/scan_kernels.py at toy size: every kernel timed, the JSON written."""
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, "benchmarks/scan_kernels.py", "--rows", "512", "--dims", "8", "24", "--batch", "16",
                           "--lists", "64", "--loops", "2", "--repeats", "1", "--threads", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [(b["rows"], b["dims"], b["batch"]) for b in result["blocks"]] == [(512, 8, 16), (512, 24, 16)]
    for block in result["blocks"]:
        assert min(block["ms"].values()) > 0
        assert block["ms"]["now"] == pytest.approx(sum(block["ms"][k] for k in ("addmm_rows_by_queries", "test_rows_by_queries",
                                                                                "words_rows_by_queries")))
    assert result["gaps"]["lists"] == 64 and 1 <= result["gaps"]["distinct_centres"] <= 16 * 8
    assert min(result["gaps"]["ms"].values()) > 0
