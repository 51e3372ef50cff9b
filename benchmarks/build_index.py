"""Build-index benchmarks: throughput and peak memory of real builds, and encoder throughput.

    python -m benchmarks.build_index build --images 5000 50000 [--shard-size 10000] [--resolution 32]
        a real `python -m spellshield.jobs.build_index` per size (CIFAR-10 tars of ../shared, pixel space),
        its process tree sampled from /proc: images/s, peak RSS of the driver, of each Ray
        worker and of all workers together, peak PSS of the whole tree (shared pages counted once)
    python -m benchmarks.build_index taef2-cpu [--images 32] [--resolution 256] [--batch-size 8]
        the bare TAEF2 encoder on this machine's CPU (torch threads = cores)
    python -m benchmarks.build_index encode-vs-bare --corpus SHARDS --encoder DIR [--resolution 256]
        build-pipeline encode throughput (Ray Data: read, decode, encoder pool, parts written)
        against the bare encoder on the same device, pixels decoded beforehand (target >= 90%)

Each prints one JSON object per measurement; the figures are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from spellshield.toys.processes import descendants  # /proc walk shared with the cluster tests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_DIR = os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10")


# -- memory of a process tree ------------------------------------------------------------------
def _proc_memory(pid: int) -> tuple[int, int, str] | None:
    """(RSS, PSS) in bytes and the command line's first word of one process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split(":")[0] in ("Rss", "Pss")}
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            name = f.read().split(b"\0")[0].decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return None
    return fields.get("Rss", 0), fields.get("Pss", 0), name


class TreeSampler:
    """Peak memory of a process and all its descendants, sampled from /proc every ``interval`` s.

    Ray names its worker processes ``ray::<task or actor>``; everything else below the driver is
    Ray's own system processes (GCS, raylet, agents). RSS counts shared pages (the object store
    mapped by several workers) in every process; PSS shares them out, so the tree's PSS sum is
    the honest total.
    """

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid = pid
        self.interval = interval
        self.peak = {"driver_rss": 0, "worker_rss_max": 0, "workers_rss_sum": 0, "tree_rss_sum": 0, "tree_pss_sum": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        driver = workers = worker_max = rss_sum = pss_sum = 0
        for pid in [self.pid, *descendants(self.pid)]:
            memory = _proc_memory(pid)
            if memory is None:
                continue
            rss, pss, name = memory
            rss_sum += rss
            pss_sum += pss
            if pid == self.pid:
                driver = rss
            elif name.startswith("ray::"):
                workers += rss
                worker_max = max(worker_max, rss)
        for key, value in (("driver_rss", driver), ("worker_rss_max", worker_max), ("workers_rss_sum", workers),
                           ("tree_rss_sum", rss_sum), ("tree_pss_sum", pss_sum)):
            self.peak[key] = max(self.peak[key], value)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


def cifar_tars(images: int) -> list[str]:
    count = -(-images // 1000)
    paths = [os.path.join(CIFAR_DIR, f"train-{i:06d}.tar") for i in range(count)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"missing CIFAR shards (../shared): {missing[0]}")
    return paths


def build_benchmark(images: int, shard_size: int, resolution: int = 32, dtype: str = "float32", batch_size: int = 256) -> dict:
    """One real build of ``images`` CIFAR images (whole tars) in a subprocess; time and memory."""
    tars = cifar_tars(images)
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        out = os.path.join(tmp, "index")
        cmd = [sys.executable, "-m", "spellshield.jobs.build_index", "--corpus", ",".join(tars), "--out", out,
               "--resolution", str(resolution), "--shard-size", str(shard_size), "--dtype", dtype,
               "--batch-size", str(batch_size)]
        env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
        env.pop("RAY_ADDRESS", None)
        started = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        with TreeSampler(proc.pid) as sampler:
            _, err = proc.communicate()
        wall = time.time() - started
        if proc.returncode != 0:
            raise SystemExit(f"build failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
        with open(os.path.join(out, "manifest.json")) as f:
            build = json.load(f)["build"]
    mib = 1 << 20
    return {
        "benchmark": "build", "images": len(tars) * 1000, "resolution": resolution, "dtype": dtype,
        "shard_size": shard_size, "wall_seconds": round(wall, 1),
        "images_per_second_wall": round(len(tars) * 1000 / wall, 1),
        "encode_seconds": build["encode_seconds"],
        "images_per_second_encode": round(len(tars) * 1000 / build["encode_seconds"], 1),
        "assemble_seconds": build["seconds"], "calibrate_seconds": build.get("calibrate_seconds"),
        **{f"peak_{k}_mib": round(v / mib) for k, v in sampler.peak.items()},
    }


# -- encoder throughput ---------------------------------------------------------------------------
def bare_encoder_throughput(encoder_spec: str, pixels: np.ndarray, batch_size: int, device: str) -> float:
    """Images/s of ``Encoder.encode`` alone on decoded pixels (one warm-up batch first)."""
    import torch

    from spellshield.indexing.encoders import Encoder

    encoder = Encoder(encoder_spec, device=device).init()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    encoder.encode(pixels[:batch_size]).cpu()
    sync()
    started = time.perf_counter()
    for start in range(0, len(pixels), batch_size):
        encoder.encode(pixels[start : start + batch_size]).cpu()  # .cpu(): the pipeline copies back too
    sync()
    return len(pixels) / (time.perf_counter() - started)


def pipeline_encode_throughput(corpus: str, encoder_spec: str, resolution: int, batch_size: int, dtype: str = "float32") -> dict:
    """The build's encode phase (``jobs.build_index.encode_parts``) over ``corpus``; needs Ray up.

    Steady state: images arriving after the first chunk, over the time from the first chunk to
    the last (actor start-up and model loading excluded); end to end: all images over all time.
    """
    from spellshield.indexing.corpus import expand_shards
    from spellshield.indexing.encoders import Encoder
    from spellshield.jobs.build_index import encode_parts
    from spellshield.jobs.dataflow import EncodeOptions

    shards = expand_shards(corpus)
    options = EncodeOptions(encoder=encoder_spec, resolution=resolution, batch_size=batch_size, dtype=dtype)
    dim = Encoder(encoder_spec).latent_spec(resolution).dim
    arrivals: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as parts_dir:
        started = time.perf_counter()
        encode_parts(shards, {}, parts_dir, dim, options,
                     on_chunk=lambda row: arrivals.append((time.perf_counter(), sum(r == "" for r in row["reasons"]))))
        total = time.perf_counter() - started
    images = sum(n for _, n in arrivals)
    steady_images = images - arrivals[0][1]
    steady_time = arrivals[-1][0] - arrivals[0][0]
    return {"images": images, "chunks": len(arrivals), "end_to_end_images_per_second": images / total,
            "steady_images_per_second": steady_images / steady_time if steady_time > 0 else float("nan")}


def decoded_pixels(corpus: str, resolution: int, limit: int | None = None) -> np.ndarray:
    from spellshield.indexing.corpus import Sample, decode_image, expand_shards, iter_shard

    out = []
    for path in expand_shards(corpus):
        for item in iter_shard(path):
            if isinstance(item, Sample):
                try:
                    out.append(decode_image(item.image, resolution))
                except ValueError:
                    continue
                if limit and len(out) == limit:
                    return np.stack(out)
    return np.stack(out)


def encode_vs_bare(corpus: str, encoder_spec: str, resolution: int, batch_size: int, device: str | None = None,
                   dtype: str = "float32", bare_images: int = 4096) -> dict:
    """Build-pipeline encode throughput against the bare encoder on the same device.

    The pipeline runs on the Ray cluster that is up (its encoder actors take a GPU when the
    cluster has one) over the whole corpus; the bare encoder runs here on ``device`` (default:
    cuda if available) over its first ``bare_images`` images, decoded beforehand (host memory).
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = pipeline_encode_throughput(corpus, encoder_spec, resolution, batch_size, dtype)
    bare = bare_encoder_throughput(encoder_spec, decoded_pixels(corpus, resolution, bare_images), batch_size, device)
    return {"benchmark": "encode-vs-bare", "encoder": encoder_spec, "resolution": resolution, "batch_size": batch_size,
            "bare_images": bare_images,
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            **pipeline, "bare_images_per_second": bare,
            "ratio_steady": pipeline["steady_images_per_second"] / bare,
            "ratio_end_to_end": pipeline["end_to_end_images_per_second"] / bare}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.build_index", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("build", help="real builds of CIFAR-10 subsets: images/s and peak memory")
    b.add_argument("--images", type=int, nargs="+", default=[5000, 50000])
    b.add_argument("--shard-size", type=int, default=10_000)
    b.add_argument("--resolution", type=int, default=32)
    b.add_argument("--dtype", default="float32")
    t = sub.add_parser("taef2-cpu", help="bare TAEF2 encoder throughput on the CPU")
    t.add_argument("--images", type=int, default=32)
    t.add_argument("--resolution", type=int, default=256)
    t.add_argument("--batch-size", type=int, default=8)
    e = sub.add_parser("encode-vs-bare", help="build-pipeline encode throughput vs the bare encoder (GPU)")
    e.add_argument("--corpus", required=True)
    e.add_argument("--encoder", required=True)
    e.add_argument("--resolution", type=int, default=256)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--dtype", default="float32")
    e.add_argument("--bare-images", type=int, default=4096, help="images for the bare-encoder measurement")
    args = parser.parse_args(argv)
    if args.what == "build":
        for images in args.images:
            print(json.dumps(build_benchmark(images, args.shard_size, args.resolution, args.dtype)), flush=True)
    elif args.what == "taef2-cpu":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        taef2 = os.path.join(os.path.dirname(ROOT), "shared", "models", "taef2")
        pixels = decoded_pixels(os.path.join(CIFAR_DIR, "train-000000.tar"), args.resolution, args.images)
        rate = bare_encoder_throughput(taef2, pixels, args.batch_size, "cpu")
        print(json.dumps({"benchmark": "taef2-cpu", "images": len(pixels), "resolution": args.resolution,
                          "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                          "images_per_second": round(rate, 2)}))
    else:
        import ray

        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, logging_level="ERROR")
        try:
            print(json.dumps(encode_vs_bare(args.corpus, args.encoder, args.resolution, args.batch_size, dtype=args.dtype,
                                            bare_images=args.bare_images)))
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
