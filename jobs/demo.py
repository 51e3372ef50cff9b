"""demo: the whole pipeline offline, in one command, on a small real corpus.

    spellshield demo --out DIR          (DIR: a local directory or an s3:// / gs:// prefix)

1. writes scikit-learn's 1,797 handwritten digits (8x8, shipped inside its wheel) as 8
   WebDataset shards in DIR/corpus;
2. protects half of them: build-index over shards 0-3 -> DIR/index;
3. trains nothing: the memorizer over all 8 shards -> DIR/model, a model that reproduces its
   training images (the worst case a shield must handle);
4. generates the same seeds without and with the shield -> DIR/run-unshielded, DIR/run-shielded;
5. audits both against the protected index and writes DIR/summary.json with the two
   near-duplicate rates (share of written samples within the radius of a protected image), and
   for the shielded run how many samples SPELL alone left inside before the final check
   resampled them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import pandas as pd

from spellshield import storage
from spellshield.indexing.digits import write_digits_corpus
from spellshield.jobs.audit import audit
from spellshield.jobs.build_index import build_index, check_output_dir
from spellshield.jobs.dataflow import EncodeOptions
from spellshield.jobs.generate import generate, validate
from spellshield.pipeline.config import GenerateConfig, SpellConfig
from spellshield.jobs.memorizer import build_memorizer
from spellshield.jobs.runtime import UsageError, progress, ray_cluster
from spellshield.workers.run_layout import SAMPLES_DIR

NUM_SHARDS = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory for everything the demo writes")
    parser.add_argument("--num-images", type=int, default=128, help="samples per run (default 128)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--overcompensation", type=float, default=SpellConfig.overcompensation,
                        help=f"lam of the shielded run (default {SpellConfig.overcompensation:g})")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")


def demo(out: str, num_images: int = 128, steps: int = 50, overcompensation: float = SpellConfig.overcompensation) -> dict:
    """Python API of the demo (Ray must be up)."""
    started = time.time()
    shards = _write_corpus(out)
    protected = ",".join(shards[: NUM_SHARDS // 2])
    everything = ",".join(shards)
    options = EncodeOptions(encoder="pixels", resolution=8, batch_size=512)
    index_dir, model_dir = _under(out, "index"), _under(out, "model")
    build_index(protected, index_dir, options, shard_size=500)
    build_memorizer(everything, model_dir, options)
    rates = {}
    for name, index in (("unshielded", None), ("shielded", index_dir)):
        run_dir = _under(out, f"run-{name}")
        generate(validate(GenerateConfig.build(model_dir, run_dir, index=index, overcompensation=overcompensation,
                                               num_images=num_images, batch_size=32, steps=steps)))
        summary = audit(run_dir, index=index_dir)
        logs = storage.resolve(run_dir).child(SAMPLES_DIR)
        rows = pd.read_parquet(logs.path, filesystem=logs.fs)
        first = rows[rows["attempt"] == 1]
        summary["inside_before_final_check"] = float(first["inside_shield"].mean()) if index else None
        summary["actions"] = {str(k): int(v) for k, v in rows["action"].value_counts().items()}
        rates[name] = summary
        progress(f"demo: {name}: near-duplicate rate {summary['near_duplicate_rate']:.1%} "
                 f"({summary['near_duplicates']}/{summary['num_samples']})")
    result = {
        "near_duplicate_rate_unshielded": rates["unshielded"]["near_duplicate_rate"],
        "near_duplicate_rate_shielded": rates["shielded"]["near_duplicate_rate"],
        "inside_before_final_check_shielded": rates["shielded"]["inside_before_final_check"],
        "actions_shielded": rates["shielded"]["actions"],
        "radius": rates["shielded"]["radius"],
        "num_images": num_images,
        "steps": steps,
        "overcompensation": overcompensation,
        "protected_shards": NUM_SHARDS // 2,
        "corpus_shards": NUM_SHARDS,
        "active_step_fraction_shielded": rates["shielded"]["active_step_fraction"],
        "reports": {name: s["report"] for name, s in rates.items()},
        "seconds": round(time.time() - started, 1),
    }
    storage.write_json(_under(out, "summary.json"), result)
    return result


def _under(out: str, name: str) -> str:
    """``out/name``: a local path, or a URI under an s3:// / gs:// prefix."""
    return storage.resolve(out).child(name).uri if storage.is_remote(out) else os.path.join(out, name)


def _write_corpus(out: str) -> list[str]:
    """The digits shards in ``out/corpus``; on an object store written locally first, then uploaded."""
    if not storage.is_remote(out):
        return write_digits_corpus(os.path.join(out, "corpus"), NUM_SHARDS)
    with tempfile.TemporaryDirectory(prefix="spellshield-demo-") as local:
        paths = write_digits_corpus(local, NUM_SHARDS)
        storage.put_tree(local, _under(out, "corpus"))
        return [_under(out, f"corpus/{os.path.basename(p)}") for p in paths]


def run(args) -> int:
    if args.num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    check_output_dir(args.out, "summary.json", "demo")
    with ray_cluster(args.address):
        result = demo(args.out, args.num_images, args.steps, args.overcompensation)
    print(f"near-duplicate rate of protected images, unshielded: {result['near_duplicate_rate_unshielded']:.1%}")
    print(f"near-duplicate rate of protected images, shielded:   {result['near_duplicate_rate_shielded']:.1%} "
          f"(SPELL alone left {result['inside_before_final_check_shielded']:.1%} inside; the final check: "
          f"{result['actions_shielded'].get('resampled', 0)} resampled, {result['actions_shielded'].get('dropped', 0)} dropped)")
    print(f"reports: {result['reports']['unshielded']}")
    print(f"         {result['reports']['shielded']}")
    print(f"summary: {os.path.join(args.out, 'summary.json')} ({result['seconds']} s)")
    return 0


def main(argv=None) -> int:
    from spellshield.jobs.cli import run_single

    return run_single("demo", argv)


if __name__ == "__main__":
    raise SystemExit(main())
