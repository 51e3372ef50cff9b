"""index: look after a finished shield index.

    spellshield index calibrate INDEX_DIR [--holdout SHARDS] [--holdout-size N] [--sample-size N]
    spellshield index verify INDEX_DIR

``calibrate`` recomputes the 1-NN distance quantiles of the corpus (self excluded) and, with
``--holdout``, of images that are not in the index (encoded with the index's encoder), and
writes them with the radius they suggest into the manifest (atomically); it also calibrates the
judges (workers.final_check) into a new judges file of the index, listed with its sha256 in the
manifest, so that generation workers and the audit load it instead of calibrating them each
(the file the manifest listed before is removed once the manifest no longer lists it). INDEX_DIR
and ``--holdout`` may be s3:// URIs (the index is read from this node's cache). ``verify`` checks
checksums, counts, ids and the manifest; a problem ends with one line naming it and exit code 2.
Neither needs Ray.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from spellshield import storage
from spellshield.indexing.calibrate import encode_holdout
from spellshield.indexing.manifest import MANIFEST, REJECTS, read_manifest
from spellshield.indexing.index_cache import local_index_dir
from spellshield.indexing.verify import verify_index
from spellshield.jobs.runtime import UsageError, progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    text = ("1-NN distance quantiles of the corpus and of a held-out sample, and the radius they suggest, into the manifest; "
            "the judges' calibration into the index's judges file")
    cal = sub.add_parser("calibrate", help=text, description=text)
    cal.add_argument("index_dir", metavar="INDEX_DIR", help="a finished index directory")
    cal.add_argument("--holdout", default=None, help="WebDataset shards of images NOT in the index (pattern, glob, dir, list)")
    cal.add_argument("--holdout-size", type=int, default=1000, help="held-out images to encode (default 1000)")
    cal.add_argument("--sample-size", type=int, default=2000, help="corpus latents whose 1-NN is measured (default 2000)")
    cal.add_argument("--seed", type=int, default=0, help="seed of the corpus sample (default 0)")
    cal.add_argument("--batch-size", type=int, default=64, help="images per encoder batch for the held-out sample")
    cal.add_argument("--descriptor", default=None, metavar="MODULE.pt",
                     help="a TorchScript copy-detection model (images (B, 3, H, W) in [0, 1] -> descriptors (B, d)), e.g. "
                          "SSCD: adds the descriptor judge, its threshold calibrated on the protected images (default: none; "
                          "a calibration without it drops it)")
    cal.add_argument("--device", default=None, help="encoder device for the held-out sample and the judges' decoding (default: cuda if available)")
    text = "check checksums, counts, id uniqueness and contiguity, and manifest consistency; exit 2 naming the first problem"
    ver = sub.add_parser("verify", help=text, description=text)
    ver.add_argument("index_dir", metavar="INDEX_DIR", help="a finished index directory")
    ver.add_argument("--no-corpus-check", action="store_true",
                     help="do not read the corpus tars the build recorded (by default each one still at its path must "
                          "have its recorded sha256)")


def calibrate(index_dir: str, holdout: str | None = None, holdout_size: int = 1000, sample_size: int = 2000,
              seed: int = 0, batch_size: int = 64, device: str | None = None, descriptor: str | None = None) -> dict:
    """Python API: recompute the calibration and write it into the manifest; returns it."""
    for name, value in (("--holdout-size", holdout_size), ("--sample-size", sample_size), ("--batch-size", batch_size)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if descriptor is not None and not os.path.isfile(descriptor):
        raise UsageError(f"--descriptor {descriptor} does not exist")
    manifest = read_manifest(index_dir)
    latents, info = None, None
    import torch

    from spellshield.indexing.encoders import Encoder  # here: --help must not import torch
    from spellshield.workers.final_check import calibrate_with_judges

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = Encoder(manifest.latent.encoder, device=device).init()  # the held-out sample; decoding for the judges
    if holdout:
        latents, info = encode_holdout(holdout, encoder, manifest.latent.resolution, holdout_size, batch_size)
        if len(latents) == 0:
            raise UsageError(f"--holdout {holdout} has no decodable image ({info['rejects']} rejected)")
        progress(f"index calibrate: {len(latents)} held-out images encoded with {manifest.latent.encoder}")
    # An index on object storage is read from this node's verified cache, but the judges' new
    # files are written to a temporary directory, not into that cache entry: the entry is keyed by
    # the manifest being replaced and must stay that version (the new manifest gets its own entry
    # on its first fetch). They are uploaded before the manifest that lists them.
    remote = storage.is_remote(index_dir)
    with tempfile.TemporaryDirectory(prefix="spellshield-calibrate-") as scratch:
        out = scratch if remote else index_dir
        calibration = calibrate_with_judges(local_index_dir(index_dir), manifest, encoder, descriptor, out_dir=out,
                                            sample_size=sample_size, seed=seed, holdout=latents, holdout_info=info)
        root = storage.resolve(index_dir)
        judges = calibration["judges"]
        listed = {judges["file"]: judges["sha256"], **(judges.get("files") or {})}
        if remote:
            for name in listed:
                if name not in manifest.listed_files:
                    storage.put_file(os.path.join(out, name), root.child(name))
    # Rewrite only the calibration entry of the manifest as found: locally through a temporary
    # name, on an object store with one PUT (the manifest, the index's finished marker, is
    # replaced whole; its new sha256 keys a new cache entry on each node).
    path = root.child(MANIFEST)
    payload = storage.read_json(path)
    payload["calibration"] = calibration
    storage.write_json(path, payload)
    for name in manifest.listed_files:
        if name not in listed:
            storage.delete(root.child(name))  # listed by no manifest any more
    return calibration


def run(args) -> int:
    if args.index_command == "verify":
        summary = verify_index(local_index_dir(args.index_dir, extras=(REJECTS,)),  # s3://: via this node's cache
                                check_corpus=not args.no_corpus_check)
        corpus = (f"{summary['corpus_checked']} corpus tar(s) unchanged" if not args.no_corpus_check else "corpus not checked")
        if summary["corpus_absent"]:
            corpus += f", {summary['corpus_absent']} not at their recorded paths (not checked)"
        progress(f"index verify: {args.index_dir} is consistent: {summary['count']} vectors ({summary['dtype']}) in "
                 f"{summary['shards']} shard(s), {summary['rejects']} rejects, calibration reproduced, {corpus}; "
                 f"manifest sha256 {summary['manifest_sha256']} (pin it with generate --index-sha256)")
        return 0
    calibration = calibrate(args.index_dir, args.holdout, args.holdout_size, args.sample_size, args.seed,
                            args.batch_size, args.device, args.descriptor)
    quantiles = calibration["nn_distance_quantiles"]
    held = calibration.get("holdout", {}).get("nn_distance_quantiles", {})
    progress(f"index calibrate: corpus 1-NN median {quantiles.get('0.5', float('nan')):.4g}"
             + (f", held-out 1-NN 1% quantile {held['0.01']:.4g}" if held else "")
             + f", suggested radius {calibration['suggested_radius']:.4g} -> {os.path.join(args.index_dir, MANIFEST)}; "
             f"judges' calibration -> {os.path.join(args.index_dir, calibration['judges']['file'])}")
    return 0


def main(argv=None) -> int:
    from spellshield.jobs.cli import run_single

    return run_single("index", argv)


if __name__ == "__main__":
    raise SystemExit(main())
