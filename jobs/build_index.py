"""build-index: encode a WebDataset corpus and write a sharded FAISS shield index.

    spellshield build-index --corpus 'data/train-{000000..000009}.tar' --out INDEX_DIR
    python -m spellshield.jobs.build_index --corpus ... --out ...        (the same, e.g. under ray job submit)

Two phases, both in bounded memory:

1. encode: Ray Data streams the tars through the encoder pool (``jobs.dataflow``); the driver
   appends each tar's latents, id rows and rejects to a *part* under ``OUT.partial/parts``
   (``indexing.parts``), made durable and checksummed when the tar is done.
2. assemble: the parts, in corpus order, become FAISS shards of ``--shard-size`` with global ids,
   id tables, rejects.parquet and a calibrated manifest in ``OUT.partial/index``, renamed to
   ``OUT`` at the end.

Rerunning an interrupted build with the same arguments resumes it: finished parts whose
checksums hold are kept, only the other tars are encoded, and the index is the one an
uninterrupted build writes. A partial build made with other arguments is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spellshield import storage
from spellshield.indexing.corpus import CorpusError, expand_shards
from spellshield.indexing.manifest import MANIFEST
from spellshield.indexing.parts import BuildConfig as StagedBuild  # what a partial build was started with
from spellshield.indexing.parts import (BUILD_CONFIG, PARTS, PartialBuildError, PartWriter, StagedParts, check_staging,
                                        finished_parts, open_staging, sources_of)
from spellshield.jobs.checks import check_out_path, from_args, weight_load_errors
from spellshield.jobs.progress import ProgressBar
from spellshield.jobs.runtime import UsageError, progress, ray_cluster
from spellshield.pipeline.config import DEFAULT_SHARD_SIZE, BuildConfig, EncodeConfig

if TYPE_CHECKING:
    from spellshield.indexing.encoders import LatentSpec

# torch (the encoders), FAISS (the writer) and Ray (the dataflow) are imported inside the
# functions that run a build: --help imports this module and must stay under 2 s
# (benchmarks/cli_startup.py, tests/test_cli_help.py).


def add_arguments(parser: argparse.ArgumentParser) -> None:
    BuildConfig.add_arguments(parser)  # every option, default and help declared once, in pipeline.config
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")


def check_output_dir(path: str, marker: str, what: str) -> None:
    """Refuse an output directory that already holds a finished result, or a non-empty one."""
    if storage.is_remote(path):
        return _check_remote_output(path, marker, what)
    if os.path.exists(os.path.join(path, marker)):
        raise UsageError(f"{path} already holds a finished {what}; choose another --out")
    if os.path.isfile(path):
        raise UsageError(f"{path} is a file, not a directory")
    if os.path.isdir(path) and os.listdir(path):
        raise UsageError(f"{path} is not empty; choose a new or empty directory")


def _check_remote_output(uri: str, marker: str, what: str) -> None:
    """``check_output_dir`` on an object store: reachable, writable, no result, no other objects."""
    try:
        storage.check_new_output(uri, marker, lambda out: f"{out.uri} already holds a finished {what}; choose another --out")
    except storage.StorageError as exc:
        raise UsageError(str(exc)) from None


def encoder_latent_spec(options: EncodeConfig) -> LatentSpec:
    """The latent spec of ``--encoder`` at ``--resolution``; an encoder that cannot load is a usage error.

    Weights that do not decode (a truncated or foreign .pth/.bin/.safetensors) are one line too;
    diffusers' own log lines about them are silenced while it tries, so that line is the only one."""
    from diffusers.utils import logging as diffusers_logging

    from spellshield.indexing.encoders import Encoder

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL + 10)
    try:
        return Encoder(options.encoder).latent_spec(options.resolution)
    except ValueError as exc:
        raise UsageError(f"--encoder: {exc}") from None
    except weight_load_errors() as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        if isinstance(exc, pickle.UnpicklingError):
            first = "not a weights-only torch file"
        raise UsageError(f"--encoder {options.encoder}: its weights cannot be loaded ({type(exc).__name__}: {first})") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)


@dataclass(frozen=True)
class BuildPlan:
    shards: tuple[str, ...]
    latent: LatentSpec
    config: StagedBuild
    partial: str  # OUT.partial; "" for an OUT on an object store (a local working copy is made at the start)
    resuming: bool
    remote_partial: str = ""  # OUT.partial's URI for an OUT on an object store: where the parts are staged


def plan_build(config: BuildConfig) -> BuildPlan:
    """Validate everything that can be checked before any encoding (the values themselves were
    checked by the config); creates nothing."""
    corpus, out, options = config.corpus, config.out, config.encode
    shards = expand_shards(corpus)
    # A symlinked OUT would be replaced by the finished index's rename only at the very end.
    check_out_path(out, allow_symlink=False)
    check_output_dir(out, MANIFEST, "index")
    latent = encoder_latent_spec(options)
    staged = StagedBuild(sources=sources_of(shards), encoder=options.encoder, fingerprint=latent.fingerprint,
                         resolution=options.resolution, min_size=options.min_size, dtype=options.dtype,
                         max_member_bytes=options.max_member_bytes)
    partial, remote_partial = os.path.abspath(out) + ".partial", ""
    try:
        if storage.is_remote(out):
            partial, remote_partial = "", storage.resolve(out).uri + ".partial"
            resuming = _check_remote_staging(remote_partial, staged)
        else:
            resuming = check_staging(partial, staged)
    except PartialBuildError as exc:
        raise UsageError(str(exc)) from None
    except storage.StorageError as exc:
        raise UsageError(str(exc)) from None
    return BuildPlan(tuple(shards), latent, staged, partial, resuming, remote_partial)


def _check_remote_staging(remote_partial: str, config: StagedBuild) -> bool:
    """``check_staging`` of a partial build staged on an object store (reads its build.json only)."""
    from spellshield.storage.commit import LEASE, check_lease_free

    remote = storage.resolve(remote_partial)
    check_lease_free(remote.child(LEASE))  # a live build driver holds it: refused before Ray starts
    with tempfile.TemporaryDirectory(prefix="spellshield-plan-") as tmp:
        if storage.exists(remote.child(BUILD_CONFIG)):
            storage.get_file(remote.child(BUILD_CONFIG), os.path.join(tmp, BUILD_CONFIG))
        elif [o for o in storage.list_dir(remote, recursive=True) if o.name != LEASE]:
            raise PartialBuildError(f"{remote.uri} exists but is not a partial build (no {BUILD_CONFIG}); remove it")
        try:
            return check_staging(tmp, config)
        except PartialBuildError as exc:
            raise PartialBuildError(str(exc).replace(tmp, remote.uri)) from None


def build_index(corpus: str | BuildConfig, out: str | None = None, options: EncodeConfig | None = None,
                shard_size: int = DEFAULT_SHARD_SIZE, plan: BuildPlan | None = None) -> dict:
    """Build (or resume building) the index of a ``BuildConfig`` (or of ``corpus``, ``out``,
    ``options``, ``shard_size``); returns the manifest. Needs Ray up (``spellshield.build_index``
    starts it)."""
    config = corpus if isinstance(corpus, BuildConfig) else BuildConfig(corpus, out, options or EncodeConfig(), shard_size)
    corpus, out, options, shard_size = config.corpus, config.out, config.encode, config.shard_size
    started = time.time()
    plan = plan or plan_build(config)
    shards, latent = list(plan.shards), plan.latent
    # An OUT on an object store: its parts are staged at OUT.partial on the store (a resume may
    # run on another machine) and worked on in a local copy, made here and removed at the end.
    partial = plan.partial or tempfile.mkdtemp(prefix="spellshield-build-")
    # Parts of a remote OUT are committed through storage.commit (indexing.parts.StagedParts):
    # the local copy starts with the committed parts only, an aborted attempt's leftovers are dropped.
    staged = StagedParts(plan.remote_partial, partial) if plan.remote_partial else None
    try:  # the lease is released however the build ends (a finished build's went with the staging prefix)
        if staged is not None:
            staged.open()  # the build's lease: a second driver on this OUT is refused
        open_staging(partial, plan.config)
        if staged is not None:
            staged.publish_config()
        parts_dir = os.path.join(partial, PARTS)
        changed: list[str] = []
        parts = finished_parts(parts_dir, plan.config, latent.dim, changed)
        if staged is not None:
            staged.retract_all_but(parts)  # committed parts that no longer hold are encoded again
        for source in changed:
            progress(f"build-index: {source} changed since its part was written (sha256 differs): encoding it again")
        if plan.resuming:
            progress(f"build-index: resuming {out}: {len(parts)} of {len(shards)} parts finished (checksums verified)")
        reused = len(parts)
        encode_started = time.time()
        try:
            encoded = encode_parts(shards, parts, parts_dir, latent.dim, options, on_part=staged.push if staged else None)
        except BaseException:
            if staged is not None:
                shutil.rmtree(partial, ignore_errors=True)  # a working copy: the committed parts are on the store
            raise
        images = sum(p.count + p.rejects for p in parts.values())
        manifest = _assemble(out, partial, parts_dir, latent, options, shard_size, list(parts.values()),
                             {"corpus": corpus, "source_shards": len(shards), "encode": dataclasses.asdict(options),
                              "resumed_parts": reused, "encode_seconds": round(time.time() - encode_started, 3),
                              "sources": source_records(parts, plan.config.sources)}, remote_partial=plan.remote_partial)
    finally:
        if staged is not None:
            staged.close()
    elapsed = time.time() - started
    progress(f"build-index: {manifest.count} indexed, {manifest.rejects} rejected, {len(manifest.shards)} shard(s), "
             f"{encoded} part(s) encoded, {reused} reused, {images / max(elapsed, 1e-9):.1f} images/s -> {out}")
    return manifest.to_json()


def source_records(parts: dict, sources) -> list[dict]:
    """The manifest's record of the corpus: each tar's path, size and sha256 as it was read, in
    corpus order (``index verify`` compares them with the tars where they still are)."""
    return [{"path": path, "bytes": size, "sha256": parts[number].source_sha256}
            for number, (path, size) in enumerate(sources)]


def encode_parts(shards: list[str], parts: dict, parts_dir: str, dim: int, options: EncodeConfig, on_chunk=None,
                 on_part=None) -> int:
    """Encode every tar without a finished part; adds their PartInfo to ``parts``.

    ``on_chunk(row)``, if given, sees every encoded chunk row as it arrives (benchmarks time it);
    ``on_part(info)`` every finished part (a remote build stages it on the object store).
    """
    from spellshield.jobs.dataflow import encode_chunks
    from spellshield.workers.encode import chunk_latents

    todo = [(number, path) for number, path in enumerate(shards) if number not in parts]
    writer: PartWriter | None = None
    written, images = 0, 0
    bar = ProgressBar("build-index", total=len(todo), unit="tars")
    try:
        for row in encode_chunks(todo, options):
            if on_chunk is not None:
                on_chunk(row)
            if writer is None:
                number = int(row["part"])
                writer = PartWriter(parts_dir, number, storage.resolve(shards[number]).uri, dim, options.dtype)
            keys = row["keys"]
            writer.add(keys, [row["shard"]] * len(keys), row["sha256"], row["reasons"], chunk_latents(row, options.dtype))
            images += len(keys)
            detail = f"{images} images encoded, {os.path.basename(shards[int(row['part'])])}"
            if row["last"]:
                info = writer.finish(row["tar_sha256"])
                writer = None
                if on_part is not None:
                    on_part(info)
                parts[info.number] = info
                written += 1
                bar.advance(1, detail=detail + " done")
            else:
                bar.advance(0, detail=detail)  # a line at most every 10 s (a bar on a terminal) between tars
        bar.close()
    finally:
        if writer is not None:
            writer.abort()
    return written


def _assemble(out, partial, parts_dir, latent, options, shard_size, parts, build_info, remote_partial=""):
    from spellshield.indexing.writer import IndexWriter, assemble_parts
    from spellshield.workers.final_check import calibrate_with_judges

    # A remote OUT is assembled in the local working copy, then uploaded with the manifest last.
    local_out = os.path.join(partial, "published") if remote_partial else out
    writer = IndexWriter(local_out, latent, shard_size, options.dtype, staging_dir=os.path.join(partial, "index"))
    try:
        assemble_parts(parts_dir, parts, writer)
        manifest = writer.finish(build_info, calibrate=calibrate_with_judges)  # 1-NN quantiles, the judges' file
        if remote_partial:
            storage.put_tree(local_out, out, last=MANIFEST)
    except CorpusError:
        writer.abort()
        shutil.rmtree(partial, ignore_errors=True)  # nothing indexable: leave nothing behind
        if remote_partial:
            storage.delete_tree(remote_partial)
        raise
    except BaseException:
        writer.abort()  # the parts stay: a rerun assembles again without encoding
        if remote_partial:
            shutil.rmtree(partial, ignore_errors=True)  # a working copy; the staged parts are on the store
        raise
    shutil.rmtree(partial, ignore_errors=True)
    if remote_partial:
        storage.delete_tree(remote_partial)
    return manifest


def run(args) -> int:
    config = from_args(BuildConfig.from_args, args)
    plan = plan_build(config)  # bad input: fail before starting Ray
    with ray_cluster(args.address):
        build_index(config, plan=plan)
    return 0


def main(argv=None) -> int:
    from spellshield.jobs.cli import run_single

    return run_single("build-index", argv)


if __name__ == "__main__":
    raise SystemExit(main())
