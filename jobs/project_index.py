"""project-index: fit the ``projected`` backend's PCA filter on an index and write its files.

    spellshield project-index INDEX_DIR [--dims 256] [--sample-size 10000] [--seed 0] [--overwrite]

Writes ``INDEX_DIR/projection-<dims>/`` (basis, mean, the (N, dims) projections, the full vectors
as a memory-mappable .npy, ids, projection.json) to a temporary directory and renames it into
place. ``open_index(INDEX_DIR, backend="projected", dims=...)`` reads it, and writes it on first
use when it is absent. No Ray: one process, one shard in memory at a time.
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


def run(args) -> int:
    from spellshield.indexing.projected import META, write_projection

    if args.dims < 1:
        raise UsageError(f"--dims must be >= 1, got {args.dims}")
    if args.sample_size < 1:
        raise UsageError(f"--sample-size must be >= 1, got {args.sample_size}")
    read_manifest(args.index_dir)  # IndexFormatError (exit 2) before anything is written
    try:
        out = write_projection(args.index_dir, args.dims, args.sample_size, args.seed, overwrite=args.overwrite)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    with open(os.path.join(out, META)) as f:
        meta = json.load(f)
    progress(f"project-index: {out}: {meta['count']} vectors, {meta['dims']} of {meta['dim']} dims, "
             f"{100 * meta['explained_variance']:.1f}% of the sample's variance kept")
    return 0


def main(argv=None) -> int:
    from spellshield.jobs.cli import run_single

    return run_single("project-index", argv)


if __name__ == "__main__":
    raise SystemExit(main())
