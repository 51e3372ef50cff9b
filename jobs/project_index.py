"""project-index: fit the ``projected`` backend's PCA filter on an index and write its files.

    spellshield project-index INDEX_DIR [--dims 256] [--sample-size 10000] [--seed 0] [--overwrite]
                              [--lists K] [--code-dtype float16|float32]

Writes ``INDEX_DIR/projection-<dims>/`` (basis, mean, the (N, dims) projections, the full vectors
as a memory-mappable .npy, ids, projection.json) to a temporary directory and renames it into
place. ``open_index(INDEX_DIR, backend="projected", dims=...)`` reads it, and writes it on first
use when it is absent. ``--lists K`` (0: auto, about 2 sqrt(N)) also builds the ``ivf`` backend's
inverted file over that projection (``indexing.ivf``), streaming the memory-mapped vectors; an
existing projection is reused unless ``--overwrite``. No Ray: one process, one shard in memory at a time.
INDEX_DIR may be an s3:// / gs:// URI: the files are computed locally and uploaded beside the index.
"""

from __future__ import annotations

import argparse
import json
import os

from spellshield.indexing.manifest import is_remote, read_manifest
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
    if is_remote(args.index_dir):
        return _run_remote(args)
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


def _run_remote(args) -> int:
    """project-index on an index on object storage: run on a local working copy (links to this
    node's verified cache of the index, and the projection files already uploaded), then the
    files it wrote are uploaded beside the index, each metadata file after the files it
    describes, so a reader never meets a projection or inverted file before it is whole.
    ``open_index(uri, backend="projected"|"ivf")`` then fetches them into each node's cache."""
    import tempfile

    from spellshield import storage
    from spellshield.indexing.index_cache import derived_files, fetch_index

    remote = storage.resolve(args.index_dir)
    cached = fetch_index(args.index_dir).directory
    before = derived_files(args.index_dir)
    with tempfile.TemporaryDirectory(prefix="spellshield-project-index-") as work:
        for name in os.listdir(cached):
            if name != ".lock":
                os.symlink(os.path.join(cached, name), os.path.join(work, name))
        for name in before:
            storage.get_file(remote.child(name), os.path.join(work, *name.split("/")))

        def state():  # the files under projection-*/ (the linked index files are not walked into)
            return {os.path.relpath(os.path.join(d, n), work): os.stat(os.path.join(d, n)).st_mtime_ns
                    for d, _, names in os.walk(work) if d != work for n in names}

        old = state()
        try:
            code = run(argparse.Namespace(**{**vars(args), "index_dir": work}))
        except UsageError as exc:  # name the index, not the working copy
            raise UsageError(str(exc).replace(work, remote.uri)) from None
        new = state()
        changed = [name for name in new if old.get(name) != new[name]]
        # metadata last, deepest first: the inverted file's before its projection's
        changed.sort(key=lambda name: (os.path.basename(name).endswith(".json"), -name.count(os.sep), name))
        for name in changed:
            storage.put_file(os.path.join(work, name), remote.child(*name.split(os.sep)))
        for name in sorted(set(before) - {n.replace(os.sep, "/") for n in new}):  # replaced by --overwrite
            storage.delete(remote.child(name))
    progress(f"project-index: {len(changed)} file(s) uploaded beside {remote.uri}")
    return code


def main(argv=None) -> int:
    from spellshield.jobs.cli import run_single

    return run_single("project-index", argv)


if __name__ == "__main__":
    raise SystemExit(main())
