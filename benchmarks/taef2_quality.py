"""TAEF2 reconstruction quality on real CIFAR-10 images, per resolution: PSNR of
decode(encode(x)) in 8-bit pixels (what the README quotes).

    python benchmarks/taef2_quality.py [--shared ../shared] [--images 16] [--resolutions 64 256]

The first ``--images`` CIFAR-10 training images of ../shared (shard 0), bicubic-upscaled from
32x32 to each resolution as the corpus reader does, through the released TAEF2 weights
(``TAEF2.from_pth``). tests/test_taef2.py checks the 64x64 figure's floor on the same images.
Writes benchmarks/results/taef2-quality.json; RESULTS.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=os.path.join(os.path.dirname(ROOT), "shared"),
                        help="the shared folder holding data/cifar10 and models/taef2 (default ../shared)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "taef2-quality.json"))
    args = parser.parse_args(argv)
    cifar, weights = os.path.join(args.shared, "data", "cifar10"), os.path.join(args.shared, "models", "taef2")
    if not (os.path.isdir(cifar) and os.path.isdir(weights)):
        raise SystemExit(f"{args.shared} lacks data/cifar10 or models/taef2: pass --shared")

    import numpy as np
    import torch

    from spellshield.indexing.taef2 import TAEF2
    from spellshield.toys.autoencoders import reconstruction_psnr
    from spellshield.toys.indexes import cifar_images

    model = TAEF2.from_pth(weights).eval()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
               "load_average": os.getloadavg()[0], "images": args.images, "source": "CIFAR-10 train shard 0, 32x32 bicubic-upscaled",
               "resolutions": {}}
    for resolution in args.resolutions:
        started = time.perf_counter()
        values = reconstruction_psnr(model, cifar_images(cifar, args.images, resolution=resolution))
        pooled = 10 * np.log10(255.0**2 / np.mean(255.0**2 / 10 ** (values.astype(np.float64) / 10)))
        results["resolutions"][str(resolution)] = {
            "psnr_mean_db": round(float(values.mean()), 2), "psnr_min_db": round(float(values.min()), 2),
            "psnr_max_db": round(float(values.max()), 2),
            "psnr_of_pooled_mse_db": round(float(pooled), 2),  # one PSNR over all pixels of all images
            "seconds": round(time.perf_counter() - started, 2)}
        print(f"{resolution}x{resolution}: {json.dumps(results['resolutions'][str(resolution)])}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
