"""`spellshield --help` imports no job module; every command's --help (and every action's, such as
`index calibrate`) exits 0 without importing torch or Ray, and shows that command's options. The
time it takes is measured by benchmarks/cli_startup.py."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PROBE = """
import contextlib, io, json, sys
from spellshield.jobs.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
heavy = sorted(m for m in sys.modules if m.startswith("spellshield.jobs.") or m in ("torch", "ray", "pandas", "faiss", "diffusers"))
print(json.dumps({"code": code, "help": out.getvalue(), "imported": heavy}))
"""


def probe(*argv):
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_top_level_help_imports_no_job():
    result = probe("--help")
    assert result["code"] == 0 and result["imported"] == ["spellshield.jobs.cli"]
    for command in ("build-index", "generate", "audit", "demo"):
        assert command in result["help"]


def test_generate_help_imports_neither_torch_nor_ray():
    result = probe("generate", "--help")
    assert result["code"] == 0 and "--overcompensation" in result["help"] and "(default 10.0" in result["help"]
    assert not {"torch", "ray", "pandas", "faiss", "diffusers"} & set(result["imported"]), result["imported"]


def every_command():
    from spellshield.jobs.cli import every_command

    return every_command()


@pytest.mark.parametrize("words", every_command(), ids=" ".join)
def test_every_command_help_imports_neither_torch_nor_ray(words):
    result = probe(*words, "--help")
    assert result["code"] == 0 and result["help"].startswith(f"usage: spellshield {' '.join(words)} ")
    assert not {"torch", "ray"} & set(result["imported"]), result["imported"]


def test_every_command_is_probed():
    # the list the test above and benchmarks/cli_startup.py walk: every command and every index action
    assert [" ".join(w) for w in every_command()] == ["build-index", "memorizer", "generate", "audit", "index",
                                                      "index calibrate", "index verify", "project-index", "demo"]


@pytest.mark.slow
def test_command_help_imports_that_command_only():
    result = probe("build-index", "--help")
    assert result["code"] == 0 and "--corpus" in result["help"] and "--shard-size" in result["help"]
    assert "spellshield.jobs.build_index" in result["imported"] and "spellshield.jobs.generate" not in result["imported"]


@pytest.mark.slow
def test_startup_benchmark_writes_its_figures(tmp_path):
    out = tmp_path / "cli-startup.json"
    proc = subprocess.run([sys.executable, "benchmarks/cli_startup.py", "--runs", "1", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result["commands"]) == (["spellshield --help"] + [f"spellshield {' '.join(w)} --help" for w in every_command()]
                                        + ["python -m spellshield.jobs.generate --help"])
    for figures in result["commands"].values():
        assert len(figures["seconds"]) == 1 and figures["median_seconds"] == figures["seconds"][0] > 0
        assert figures["imports_torch_or_ray"] == []
        for cost in figures["costliest_imports"]:  # packages a spellshield module imports directly
            assert cost["seconds"] >= 0.05 and cost["first_imported_by"].startswith("spellshield.")
