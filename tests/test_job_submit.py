"""The jobs under ``ray job submit --working-dir .`` against a real head on 127.0.0.1."""

import json
import os

import pandas as pd
import pytest

from indexing.manifest import read_manifest
from tests.cluster import RayHead
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_build_index_and_generate_as_ray_jobs(digits_corpus, memorizer_model, tmp_path):
    index = str(tmp_path / "index")
    run_dir = str(tmp_path / "run")
    with RayHead(num_cpus=2) as head:
        built = head.submit(["python", "-m", "jobs.build_index", "--corpus", digits_corpus[0], "--out", index,
                             "--resolution", "8"], cwd=ROOT)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
        generated = head.submit(["python", "-m", "jobs.generate", "--model", memorizer_model, "--index", index,
                                 "--out", run_dir, "--num-images", "6", "--steps", "10", "--batch-size", "3"], cwd=ROOT)
        assert generated.returncode == 0, generated.stdout[-3000:] + generated.stderr[-3000:]
        assert "succeeded" in generated.stdout + generated.stderr
    assert read_manifest(index).count == 225
    with open(os.path.join(run_dir, "run.json")) as f:
        assert json.load(f)["status"] == "finished"
    assert len(pd.read_parquet(os.path.join(run_dir, "audit", "samples"))) == 6
