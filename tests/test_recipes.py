"""docs/recipes/ray-job.md runs as written against a real ``ray start --head`` (free ports, its
own temporary directory, auth set the way the recipe says), and a relative path in a Ray job is
refused with one line instead of writing into Ray's copy of the working directory."""

import json
import os
import re
import subprocess
import sys

import pytest

from spellshield.indexing.digits import write_digits_corpus
from tests.cluster import RayHead
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

RECIPE = os.path.join(ROOT, "docs", "recipes", "ray-job.md")


def recipe_block(name: str) -> str:
    """The fenced bash block that follows ``<!-- recipe: NAME -->``."""
    text = open(RECIPE).read()
    match = re.search(r"<!-- recipe: " + re.escape(name) + r" -->\s*```bash\n(.*?)```", text, re.S)
    assert match, f"no recipe {name} in {RECIPE}"
    return match.group(1)


def test_recipe_sets_auth_explicitly():
    block = recipe_block("ray-job")
    assert "export RAY_AUTH_MODE=disabled" in block and "--working-dir ." in block
    assert '"$PWD/index"' in block and '"$PWD/data/' in block


def test_ray_job_recipe_runs_verbatim(tmp_path):
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    for i, shard in enumerate(write_digits_corpus(str(work / "data"), num_shards=10)):
        os.rename(shard, work / "data" / f"train-{i:06d}.tar")  # the names the recipe uses
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # the recipe sets it
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    with RayHead(num_cpus=2) as head:
        env["RAY_ADDRESS"] = head.address
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", recipe_block("ray-job")], cwd=work, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        manifest = json.load(open(work / "index" / "manifest.json"))
        assert manifest["count"] == 1797  # every digit of the ten shards

        # the same job with a relative --out: refused, one line, nothing written anywhere
        relative = head.submit(["python", "-m", "spellshield.jobs.build_index", "--corpus", str(work / "data"), "--out", "index2"],
                               cwd=str(work))
        assert relative.returncode != 0
        output = relative.stdout + relative.stderr
        assert ("spellshield build-index: error: --out index2 is a relative path, and this runs as a Ray job" in output), output[-3000:]
        assert not (work / "index2").exists()
