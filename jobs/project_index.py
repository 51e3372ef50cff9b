"""project-index: fit the ``projected`` backend's PCA filter on an index and write its files.

    spellshield project-index INDEX_DIR [--dims 256] [--sample-size 10000] [--seed 0] [--overwrite]
                              [--lists K] [--code-dtype float16|float32]

Writes ``INDEX_DIR/projection-<dims>/`` (basis, mean, the (N, dims) projections, the full vectors
as a memory-mappable .npy, ids, projection.json) to a temporary directory and renames it into
place. ``open_index(INDEX_DIR, backend="projected", dims=...)`` reads it, and writes it on first
use when it is absent. ``--lists K`` (0: auto, about 2 sqrt(N)) also builds the ``ivf`` backend's
inverted file over that projection (``indexing.ivf``), streaming the memory-mapped vectors; an
existing projection is reused unless ``--overwrite``. No Ray: one process, one shard in memory at a time.
"""

from __future__ import annotations

import argparse
import json
import os

from spellshield.indexing.manifest import read_manifest
from spellshield.jobs.runtime import UsageError, progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index_dir", metavar="INDEX_DIR", help="a finished index directory")
    parser.add_argument("--dims", type=int, default=256, help="projected dimensions d (default 256, at most D)")
    parser.add_argument("--sample-size", type=int, default=10000, help="corpus vectors the PCA is fitted on")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and of the randomised SVD")
    parser.add_argument("--overwrite", action="store_true", help="refit and replace an existing projection")
    parser.add_argument("--lists", type=int, default=None,
                        help="also build the ivf backend's inverted file with this many lists (0: about 2 sqrt(N))")
    parser.add_argument("--code-dtype", default="float16", choices=["float16", "float32"],
                        help="dtype of the inverted file's projected codes (rounding is in the bounds)")


def run(args) -> int:
    from spellshield.indexing.ivf import META as IVF_META, write_ivf
    from spellshield.indexing.projected import META, projection_dir, write_projection

    if args.dims < 1:
        raise UsageError(f"--dims must be >= 1, got {args.dims}")
    if args.sample_size < 1:
        raise UsageError(f"--sample-size must be >= 1, got {args.sample_size}")
    if args.lists is not None and args.lists < 0:
        raise UsageError(f"--lists must be >= 0, got {args.lists}")
    manifest = read_manifest(args.index_dir)  # IndexFormatError (exit 2) before anything is written
    if args.lists is not None and args.lists > manifest.count:
        raise UsageError(f"--lists must be at most the {manifest.count} vectors of the index, got {args.lists}")
    out = projection_dir(args.index_dir, min(args.dims, manifest.latent.dim))
    reuse = args.lists is not None and not args.overwrite and os.path.isfile(os.path.join(out, META))
    if not reuse:
        try:
            out = write_projection(args.index_dir, args.dims, args.sample_size, args.seed, overwrite=args.overwrite)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    with open(os.path.join(out, META)) as f:
        meta = json.load(f)
    progress(f"project-index: {out}: {meta['count']} vectors, {meta['dims']} of {meta['dim']} dims, "
             f"{100 * meta['explained_variance']:.1f}% of the sample's variance kept" + (" (reused)" if reuse else ""))
    if args.lists is not None:
        try:
            path = write_ivf(args.index_dir, meta["dims"], args.lists or None, overwrite=args.overwrite,
                             code_dtype=args.code_dtype, seed=args.seed)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        with open(os.path.join(path, IVF_META)) as f:
            ivf = json.load(f)
        progress(f"project-index: {path}: {ivf['lists']} lists (sizes {ivf['list_sizes']['min']}.."
                 f"{ivf['list_sizes']['max']}), {ivf['code_dtype']} codes, built in {ivf['build_seconds']:.1f} s")
    return 0


def main(argv=None) -> int:
    from spellshield.jobs.cli import run_single

    return run_single("project-index", argv)


if __name__ == "__main__":
    raise SystemExit(main())
