"""The documentation is the code's: generated references up to date, the README's Python runs
as written, every figure the README states names the benchmark that produced it."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_generated_references_are_up_to_date():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gen_docs.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_formats_doc_lists_every_column():
    from spellshield.pipeline.records import HIT_SCHEMA, SAMPLE_SCHEMA, describe

    with open(os.path.join(ROOT, "docs", "formats.md")) as f:
        formats = f.read()
    for schema in (HIT_SCHEMA, SAMPLE_SCHEMA):
        for name, type_, description in describe(schema):
            assert f"| `{name}` | {type_} | {description} |" in formats, name


def test_links_and_figure_scripts_exist():
    text = readme()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert os.path.exists(os.path.join(ROOT, target)), target
    figures = text.split("## Figures", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in figures.splitlines() if line.startswith("| ") and "`benchmarks/" in line]
    assert len(rows) >= 4
    for line in rows:
        script = re.search(r"`(benchmarks/[^`]+\.py)`", line).group(1)
        assert os.path.isfile(os.path.join(ROOT, script)), script


@pytest.mark.slow
def test_readme_python_runs_as_written(tmp_path):
    block = re.search(r"```python\n(import spellshield\n.*?)```", readme(), re.S).group(1)
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.endswith("of 16 images inside a protected ball"), proc.stdout
    assert (tmp_path / "run" / "audit" / "summary.json").is_file() and (tmp_path / "index" / "manifest.json").is_file()
