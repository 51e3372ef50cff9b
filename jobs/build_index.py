"""build-index: encode a WebDataset corpus and write a sharded FAISS shield index.

    spellshield build-index --corpus 'data/train-{000000..000009}.tar' --out INDEX_DIR
    python -m jobs.build_index --corpus ... --out ...        (the same, e.g. under ray job submit)
"""

from __future__ import annotations

import argparse
import os
import time

from indexing.calibrate import calibrate
from indexing.corpus import expand_shards
from indexing.encoders import Encoder
from indexing.manifest import MANIFEST
from indexing.search import ExactShield
from indexing.writer import IndexWriter
from jobs.dataflow import EncodeOptions, encode_corpus
from jobs.runtime import UsageError, progress, ray_cluster
from workers.encode import OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, help="WebDataset shards: brace pattern, glob, directory or comma list")
    parser.add_argument("--out", required=True, help="index directory to create")
    add_encoder_arguments(parser)
    parser.add_argument("--shard-size", type=int, default=100_000, help="vectors per FAISS shard (default 100000)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", default="pixels", help="'pixels' or a diffusers autoencoder directory / hub id")
    parser.add_argument("--resolution", type=int, default=32, help="images are resized and centre-cropped to N x N")
    parser.add_argument("--batch-size", type=int, default=256, help="images per encoder batch")
    parser.add_argument("--num-encoders", type=int, default=1, help="encoder actors (one per GPU when there are GPUs)")


def check_output_dir(path: str, marker: str, what: str) -> None:
    """Refuse an output directory that already holds a finished result, or a non-empty one."""
    if os.path.exists(os.path.join(path, marker)):
        raise UsageError(f"{path} already holds a finished {what}; choose another --out")
    if os.path.isfile(path):
        raise UsageError(f"{path} is a file, not a directory")
    if os.path.isdir(path) and os.listdir(path):
        raise UsageError(f"{path} is not empty; choose a new or empty directory")


def encode_options(args) -> EncodeOptions:
    if args.resolution < 1:
        raise UsageError(f"--resolution must be >= 1, got {args.resolution}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    return EncodeOptions(encoder=args.encoder, resolution=args.resolution, batch_size=args.batch_size,
                         num_encoders=max(1, args.num_encoders))


def build_index(corpus: str, out: str, options: EncodeOptions, shard_size: int = 100_000) -> dict:
    """Python API: build the index at ``out``; returns the manifest as a dict. Needs Ray up."""
    shards = expand_shards(corpus)
    check_output_dir(out, MANIFEST, "index")
    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    latent = Encoder(options.encoder).latent_spec(options.resolution)
    writer = IndexWriter(out, latent, shard_size)
    started = time.time()
    done = 0
    try:
        for batch in encode_corpus(shards, options):
            ok = [r == OK for r in batch["reason"]]
            keys = [k for k, good in zip(batch["key"], ok) if good]
            if keys:
                writer.add(keys, [s for s, g in zip(batch["shard"], ok) if g], [h for h, g in zip(batch["sha256"], ok) if g],
                           batch["latent"][ok])
            for key, shard, reason, good in zip(batch["key"], batch["shard"], batch["reason"], ok):
                if not good:
                    writer.reject(str(key), str(shard), str(reason))
            done += len(ok)
        manifest = writer.finish(
            {"corpus": corpus, "source_shards": len(shards), "encode": options.__dict__},
            calibrate=lambda partial, m: calibrate(ExactShield(partial, m)),
        )
    except BaseException:
        writer.abort()
        raise
    elapsed = time.time() - started
    progress(f"build-index: {manifest.count} indexed, {manifest.rejects} rejected, {len(manifest.shards)} shard(s), "
             f"{done / max(elapsed, 1e-9):.1f} images/s -> {out}")
    return manifest.to_json()


def run(args) -> int:
    options = encode_options(args)
    expand_shards(args.corpus)  # bad corpus: fail before starting Ray
    check_output_dir(args.out, MANIFEST, "index")
    with ray_cluster(args.address):
        build_index(args.corpus, args.out, options, args.shard_size)
    return 0


def main(argv=None) -> int:
    from jobs.cli import run_single

    return run_single("build-index", argv)


if __name__ == "__main__":
    raise SystemExit(main())
