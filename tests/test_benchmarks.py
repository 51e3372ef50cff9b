"""The GPU search benchmark runs at toy size on the CPU, with FAISS, pyarrow, PIL and Ray made
unimportable (the lent GPU machine has torch and numpy only), and checks its own answers."""

import json
import subprocess
import sys

from tests.conftest import ROOT

BLOCK = "import sys\nfor m in ['faiss', 'pyarrow', 'PIL', 'ray', 'diffusers', 'braceexpand', 'webdataset', 'pandas']: sys.modules[m] = None\n"


def test_gpu_search_benchmark_at_toy_size_without_faiss(tmp_path):
    out = tmp_path / "gpu_search.json"
    argv = ["--n", "3000", "--dim", "64", "--device", "cpu", "--steps", "4", "--fit-sample", "1000", "--out", str(out)]
    code = BLOCK + f"sys.argv = ['gpu_search.py'] + {argv!r}\nimport runpy\nrunpy.run_path('benchmarks/gpu_search.py', run_name='__main__')\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["n"] == 3000 and result["dim"] == 64 and len(result["rounds"]) == 2
    for round_ in result["rounds"]:
        assert round_["exact_and_projected_agree_on_every_step"] and round_["brute_force_float64_agrees"]
        assert round_["exact"]["steps"] == 4 and round_["projected"]["median_ms"] > 0
        assert round_["exact"]["hits_per_query"] >= 0.5  # the near half of each batch hits
