"""Start-up time of the command line: how long ``--help`` takes, the first thing a user runs.

    python benchmarks/cli_startup.py [--runs 5] [--out benchmarks/results/cli-startup.json]

Every command's and action's ``--help`` is measured (``jobs.cli.every_command``). Each runs ``--runs`` times in a fresh subprocess (wall clock, median reported, all runs
kept) after one untimed warm-up run (the OS file cache), and once more under ``python -X
importtime`` to name the packages that cost the most and the spellshield module that first
imports each, and whether torch or Ray was imported at all. Target: under 2 s on the 2-core development VM. The load average is recorded:
the VM is shared, and imports are CPU- and disk-bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPELLSHIELD = os.path.join(os.path.dirname(sys.executable), "spellshield")  # the console script of this environment
TARGET_SECONDS = 2.0


def commands() -> dict[str, list[str]]:
    """``spellshield --help``, every command's and action's ``--help`` (jobs.cli.every_command),
    and one job run as a module, as under ``ray job submit``."""
    from spellshield.jobs.cli import every_command

    found = {"spellshield --help": [SPELLSHIELD, "--help"]}
    for words in every_command():
        found[f"spellshield {' '.join(words)} --help"] = [SPELLSHIELD, *words, "--help"]
    found["python -m spellshield.jobs.generate --help"] = [sys.executable, "-m", "spellshield.jobs.generate", "--help"]
    return found


def wall_seconds(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - started


HEAVY = ("torch", "ray")  # what no --help may import (tests/test_cli_help.py)


def import_profile(argv: list[str], most: int = 6) -> tuple[list[dict], list[str]]:
    """The packages that spellshield modules import directly and that took longest (cumulative,
    their own dependencies included), with the spellshield module that imported each first; and
    which of ``HEAVY`` were imported at all."""
    python = [sys.executable, "-X", "importtime"]
    if argv[0] == SPELLSHIELD:  # the console script is `from spellshield.jobs.cli import main; main()`
        python += ["-c", "import sys; from spellshield.jobs.cli import main; sys.exit(main(sys.argv[1:]))", *argv[1:]]
    else:
        python += argv[1:]
    lines = subprocess.run(python, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT).stderr.splitlines()
    rows = []  # (depth, module, cumulative microseconds), children before their parent
    for line in lines:
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append((len(m.group(2)) // 2, m.group(3), int(m.group(1))))
    found = []
    for i, (depth, module, micros) in enumerate(rows):
        if "." in module or module.startswith(("spellshield", "_")) or micros < 50_000:
            continue
        importer = next((r[1] for r in rows[i + 1:] if r[0] == depth - 1), None)  # its parent in the import tree
        if importer is None or not importer.startswith("spellshield"):
            continue  # the interpreter's own start-up, or a dependency of a package already counted
        found.append({"package": module, "seconds": round(micros / 1e6, 3), "first_imported_by": importer})
    heavy = sorted({module for _, module, _ in rows} & set(HEAVY))
    return sorted(found, key=lambda r: -r["seconds"])[:most], heavy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cli-startup.json"))
    args = parser.parse_args(argv)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
               "runs": args.runs, "target_seconds": TARGET_SECONDS, "load_average_before": round(os.getloadavg()[0], 2),
               "commands": {}}
    for name, command in commands().items():
        wall_seconds(command)  # warm-up: the OS file cache
        times = [wall_seconds(command) for _ in range(args.runs)]
        median = statistics.median(times)
        costliest, heavy = import_profile(command)
        results["commands"][name] = {"median_seconds": round(median, 3), "seconds": [round(t, 3) for t in times],
                                     "under_target": median < TARGET_SECONDS, "costliest_imports": costliest,
                                     "imports_torch_or_ray": heavy}
        print(f"{name}: median {median:.2f} s over {args.runs} runs", flush=True)
    results["load_average_after"] = round(os.getloadavg()[0], 2)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
