"""Generation throughput on CPU workers with the memorizer: the shield's cost, and the cost of
the exactly-once machinery (temporary files + renames per unit, run.json per unit).

    python benchmarks/generation.py [--images 128] [--steps 50] [--workers 2] [--out benchmarks/_work/generation]

Corpus: two CIFAR-10 shards from ../shared (2,000 images, 32x32, pixel space: 3,072-d latents;
the first shard protected), or the scikit-learn digits when ../shared is absent. Writes
benchmarks/results/generation.json; RESULTS.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CIFAR = os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10")


def corpus(work: str) -> tuple[str, str, int]:
    """(protected shards, all shards, resolution)."""
    if os.path.isdir(CIFAR):
        shards = [os.path.join(CIFAR, f"train-00000{i}.tar") for i in range(2)]
        return shards[0], ",".join(shards), 32
    from spellshield.indexing.digits import write_digits_corpus

    shards = write_digits_corpus(os.path.join(work, "digits"), 8)
    return ",".join(shards[:4]), ",".join(shards), 8


def unit_breakdown(run_dir: str) -> dict:
    """Throughput and time split of a finished run (a local directory or an object-store URI)."""
    from spellshield import storage

    progress = storage.read_json(f"{run_dir}/run.json")["progress"]
    units = list(progress["units"].values())
    total = sum(u["seconds"] for u in units)
    busy: dict = {}
    for u in units:
        busy[u["pid"]] = busy.get(u["pid"], 0.0) + u["seconds"]
    write = sum(u["write_seconds"] for u in units)
    return {
        "images_per_second": progress["images_per_second"],  # wall clock, actor start-up included
        # steady state: images over the busiest worker's time inside units (start-up excluded)
        "steady_images_per_second": round(sum(u["samples"] for u in units) / max(busy.values()), 3),
        "job_seconds": progress["seconds"],
        "unit_seconds_total": round(total, 3),
        "sample_seconds": round(sum(u["sample_seconds"] for u in units), 3),
        "final_check_seconds": round(sum(u["check_seconds"] for u in units), 3),
        "atomic_write_seconds": round(write, 3),
        "run_json_seconds": progress.get("run_json_seconds", 0.0),
        # What exactly-once adds per unit: the temporary-file + rename writes of the unit's three
        # files and the driver's run.json update, against the unit's own time.
        "exactly_once_overhead": round((write + progress.get("run_json_seconds", 0.0)) / total, 4) if total else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "_work", "generation"))
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "generation.json"))
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from spellshield.jobs.build_index import build_index
    from spellshield.jobs.dataflow import EncodeOptions
    from spellshield.jobs.generate import generate, validate
    from spellshield.jobs.memorizer import build_memorizer
    from spellshield.pipeline.config import GenerateConfig

    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    protected, everything, resolution = corpus(args.out)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    options = EncodeOptions(resolution=resolution, batch_size=500)
    index, model = os.path.join(args.out, "index"), os.path.join(args.out, "model")
    build_index(protected, index, options)
    build_memorizer(everything, model, options)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
               "corpus": everything, "images": args.images, "steps": args.steps, "workers": args.workers,
               "batch_size": args.batch_size, "runs": {}}
    for name, shield in (("unshielded", None), ("shielded", index)):
        run_dir = os.path.join(args.out, name)
        # the generate command's own defaults (lam 10, M 5, resample), not the tests'
        config = validate(GenerateConfig.build(model, run_dir, index=shield, num_images=args.images, steps=args.steps,
                                               batch_size=args.batch_size, unit_size=2 * args.batch_size, seed=0,
                                               workers=args.workers))
        started = time.time()
        generate(config)
        results["runs"][name] = {"wall_seconds": round(time.time() - started, 3), **unit_breakdown(run_dir)}
        print(name, json.dumps(results["runs"][name]), flush=True)
    plain, shielded = results["runs"]["unshielded"], results["runs"]["shielded"]
    results["shield_cost_ratio"] = round(plain["steady_images_per_second"] / shielded["steady_images_per_second"], 3)
    ray.shutdown()
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
