"""The build's encode stage against the bare encoder on one GPU, without Ray.

    python benchmarks/gpu_encode.py --tars 'DIR/train-{000000..000007}.tar' --encoder DIR/taef2 \
        --resolution 256 --batch-size 128 --out results.json

The lent GPU machines cannot take Ray (its wheel is larger than what travels there), so this
measures the part of the build pipeline that decides GPU throughput, with the build's own code:
``workers.encode.read_chunks`` decodes each tar into fixed chunks in CPU worker processes (as
the Ray read tasks do) and ``workers.encode.ChunkEncoder`` encodes the chunks on the GPU as they
arrive (as an encoder actor does, bytes in, bytes out). The bare encoder is ``Encoder.encode`` on
pixels decoded beforehand, same batch size, same device. Ratio = pipeline / bare (target >= 0.9).
What this leaves out is Ray's own transport between the stages (object store, scheduling).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _decode_tar(job: tuple[int, str, int, int]) -> list[dict]:
    from spellshield.workers.encode import read_chunks

    part, path, resolution, chunk_size = job
    return list(read_chunks({"path": path, "part": part}, resolution, chunk_size))


def pipeline_throughput(tars: list[str], spec: str, resolution: int, batch_size: int, device: str, workers: int) -> dict:
    import torch

    from spellshield.workers.encode import ChunkEncoder

    encoder = ChunkEncoder(spec, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    arrivals = []
    ctx = mp.get_context("spawn")  # CUDA is initialised in this process: never fork it
    started = time.perf_counter()
    with ctx.Pool(workers) as pool:
        for chunks in pool.imap_unordered(_decode_tar, [(i, t, resolution, batch_size) for i, t in enumerate(tars)]):
            for row in chunks:
                n = sum(r == "" for r in row["reasons"])
                if n:
                    encoder(row)
                    sync()
                    arrivals.append((time.perf_counter(), n))
    total = time.perf_counter() - started
    images = sum(n for _, n in arrivals)
    # steady state: from the first encoded chunk on (process start-up and model load excluded)
    steady = (images - arrivals[0][1]) / (arrivals[-1][0] - arrivals[0][0])
    return {"images": images, "chunks": len(arrivals), "end_to_end_images_per_second": images / total,
            "steady_images_per_second": steady}


def bare_throughput(tars: list[str], spec: str, resolution: int, batch_size: int, device: str, limit: int) -> float:
    """The bare encoder on the first ``limit`` images, decoded beforehand by the same chunk reader."""
    import numpy as np

    from benchmarks.build_index import bare_encoder_throughput  # stdlib + numpy at import: fine here

    pixels = []
    for i, path in enumerate(tars):
        for row in _decode_tar((i, path, resolution, batch_size)):
            n = sum(r == "" for r in row["reasons"])
            pixels.append(np.frombuffer(row["pixels"], np.uint8).reshape(n, resolution, resolution, 3))
        if sum(len(p) for p in pixels) >= limit:
            break
    return bare_encoder_throughput(spec, np.concatenate(pixels)[:limit].copy(), batch_size, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tars", required=True)
    parser.add_argument("--encoder", required=True)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--bare-images", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import torch

    from spellshield.indexing.corpus import expand_shards

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tars = expand_shards(args.tars)
    pipeline = pipeline_throughput(tars, args.encoder, args.resolution, args.batch_size, device, args.workers)
    bare = bare_throughput(tars, args.encoder, args.resolution, args.batch_size, device, args.bare_images)
    result = {"benchmark": "gpu-encode", "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "encoder": args.encoder, "resolution": args.resolution, "batch_size": args.batch_size,
              "decode_workers": args.workers, "tars": len(tars), **pipeline, "bare_images_per_second": bare,
              "ratio_steady": pipeline["steady_images_per_second"] / bare,
              "ratio_end_to_end": pipeline["end_to_end_images_per_second"] / bare}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
