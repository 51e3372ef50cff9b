"""Object storage against local disk, side by side in one run on the same data (issue 9).

    python -m benchmarks.storage [--shards 4] [--repeats 2] [--cifar-dir DIR] [--out benchmarks/results/storage.json]

A real S3 server (SeaweedFS, tests/s3server.py) on this machine; CIFAR-10 tars of ../shared in
pixel space (32 x 32, D = 3072). Measured in one process, alternating the two modes:

    build   build-index, corpus and --out on local disk vs corpus and --out on S3: images/s
    generate  generate (memorizer over the same tars, shielded by the index just built), model,
            index and --out on local disk vs all three on S3: images/s; the node cache is cold
            on the first S3 run (model and index downloaded), warm after
    cache   the index on S3 opened from a node cache: cold (every shard downloaded and checked)
            vs warm (nothing downloaded), and the same open on the local index

The ratio S3 / local is the cost of object storage *here* (a loopback server on the same 2
cores as the build), not of a cloud store. Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_DIR = os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4, help="CIFAR-10 tars (1,000 images each)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gen-images", type=int, default=64, help="images per generate run")
    parser.add_argument("--gen-steps", type=int, default=50, help="denoising steps per image")
    parser.add_argument("--cifar-dir", default=CIFAR_DIR, help="the CIFAR-10 tars (default ../shared/data/cifar10)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "storage.json"))
    args = parser.parse_args(argv)

    from tests.s3server import S3Server

    work = tempfile.mkdtemp(prefix="spellshield-bench-storage-")
    server = S3Server(os.path.join(work, "s3")).start()
    try:
        os.environ.update(server.env())  # before Ray starts: its workers inherit the variables
        os.environ["RAY_AUTH_MODE"] = "disabled"
        results = run(args, server, work)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    return 0


def run(args, server, work) -> list[dict]:
    import ray

    from spellshield import storage
    from spellshield.indexing.index_cache import fetch_index
    from spellshield.indexing.search import open_index
    from spellshield.jobs.build_index import build_index
    from spellshield.jobs.dataflow import EncodeOptions
    from spellshield.jobs.memorizer import build_memorizer
    from spellshield.storage.cache import CACHE_ENV

    shards = [os.path.join(args.cifar_dir, f"train-{i:06d}.tar") for i in range(args.shards)]
    bucket = server.create_bucket("bench")
    for path in shards:
        storage.put_file(path, f"{bucket}/corpus/{os.path.basename(path)}")
    corpora = {"local": ",".join(shards), "s3": f"{bucket}/corpus/train-{{000000..{args.shards - 1:06d}}}.tar"}
    options = EncodeOptions(resolution=32, batch_size=256)
    results = []
    os.environ[CACHE_ENV] = os.path.join(work, "node-cache")  # before Ray starts: the generation workers' cache
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        for repeat in range(args.repeats):
            for mode in ("local", "s3"):
                out = os.path.join(work, f"index-{mode}-{repeat}") if mode == "local" else f"{bucket}/index-{repeat}"
                started = time.perf_counter()
                manifest = build_index(corpora[mode], out, options, shard_size=2000)
                seconds = time.perf_counter() - started
                row = {"measure": "build", "mode": mode, "repeat": repeat, "images": manifest["count"],
                       "seconds": round(seconds, 3), "images_per_s": round(manifest["count"] / seconds, 1)}
                print(json.dumps(row), flush=True)
                results.append(row)
        model = build_memorizer(corpora["local"], os.path.join(work, "model"), options)
        storage.put_tree(model, f"{bucket}/model")
        places = {"local": (model, os.path.join(work, "index-local-0"), os.path.join(work, "run-local-{}")),
                  "s3": (f"{bucket}/model", f"{bucket}/index-0", f"{bucket}/run-{{}}")}
        for repeat in range(args.repeats):
            for mode in ("local", "s3"):
                results.append(generate_row(args, mode, repeat, *places[mode]))
    finally:
        ray.shutdown()
    for repeat in range(args.repeats):
        os.environ[CACHE_ENV] = os.path.join(work, f"cache-{repeat}")
        for state in ("cold", "warm"):
            started = time.perf_counter()
            fetched = fetch_index(f"{bucket}/index-0")
            fetch_s = time.perf_counter() - started
            started = time.perf_counter()
            open_index(f"{bucket}/index-0")
            open_s = time.perf_counter() - started
            size = sum(os.path.getsize(os.path.join(fetched.directory, n)) for n in fetched.downloaded)
            row = {"measure": "cache", "state": state, "repeat": repeat, "downloaded_files": len(fetched.downloaded),
                   "downloaded_bytes": size, "fetch_seconds": round(fetch_s, 3), "open_seconds": round(open_s, 3)}
            print(json.dumps(row), flush=True)
            results.append(row)
        started = time.perf_counter()
        open_index(os.path.join(work, "index-local-0"))
        row = {"measure": "cache", "state": "local index", "repeat": repeat,
               "open_seconds": round(time.perf_counter() - started, 3)}
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def generate_row(args, mode: str, repeat: int, model: str, index: str, out: str) -> dict:
    """One shielded generate run of ``args.gen_images`` with model, index and run at ``mode``'s place."""
    from benchmarks.generation import unit_breakdown
    from spellshield.jobs.generate import generate, validate
    from spellshield.pipeline.config import GenerateConfig
    from spellshield.storage.cache import cache_root

    cold = mode == "s3" and not os.path.isdir(os.path.join(cache_root(), "indexes"))
    config = validate(GenerateConfig.build(model, out.format(repeat), index=index, num_images=args.gen_images,
                                           steps=args.gen_steps, batch_size=8, unit_size=8, seed=0, workers=2))
    started = time.perf_counter()
    generate(config)
    seconds = time.perf_counter() - started
    units = unit_breakdown(config.out)
    row = {"measure": "generate", "mode": mode, "repeat": repeat, "images": args.gen_images, "steps": args.gen_steps,
           "node_cache": "cold" if cold else ("warm" if mode == "s3" else "-"), "seconds": round(seconds, 3),
           # wall: the whole call (actors start, model and index load, the S3 run's lease and commits);
           # steady: images over the busiest worker's time inside units (benchmarks.generation)
           "images_per_s": round(args.gen_images / seconds, 2), "steady_images_per_s": units["steady_images_per_second"],
           "write_seconds": units["atomic_write_seconds"]}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    raise SystemExit(main())
