"""memorizer: save the exact posterior-mean denoiser of a corpus as a diffusers pipeline.

    spellshield memorizer --corpus SHARDS --out MODEL_DIR [--encoder pixels|VAE] [--resolution N]

The corpus goes through the same Ray Data encoding as build-index, so the model's latent space
is the index's; the pipeline directory (MemorizerPipeline: MemorizerUNet + DDIMScheduler, and
the VAE when the encoder is one) loads with ``from_pretrained`` and runs under ``generate``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import numpy as np
import torch

import pyarrow as pa

from spellshield import storage
from spellshield.indexing.corpus import CorpusError, expand_shards
from spellshield.indexing.encoders import load_autoencoder
from spellshield.indexing.manifest import REJECTS
from spellshield.indexing.writer import REJECTS_SCHEMA, write_parquet_atomic
from spellshield.jobs.build_index import add_encoder_arguments, check_output_dir, encode_options, encoder_latent_spec
from spellshield.jobs.dataflow import EncodeOptions, encode_chunks
from spellshield.jobs.runtime import progress, ray_cluster
from spellshield.workers.encode import OK, chunk_latents

MODEL_MARKER = "model_index.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, help="WebDataset shards: brace pattern, glob, directory or comma list")
    parser.add_argument("--out", required=True, help="pipeline directory to create")
    add_encoder_arguments(parser)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")


def make_scheduler():
    from diffusers import DDIMScheduler

    # clip_sample off: clipping x0_hat to [-1, 1] after the SPELL correction could move it back
    # inside a ball; latents are not bounded anyway.
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)


def save_memorizer(latents: torch.Tensor, out: str, encoder: str = "pixels", rejects: list[dict] | None = None) -> str:
    """Python API: write a MemorizerPipeline over ``latents`` (N, C, H, W) to ``out`` (a
    directory, or an s3:// / gs:// prefix).

    ``rejects`` (key, shard, reason) of corpus samples left out go to ``out/rejects.parquet``.
    """
    from spellshield.pipeline.memorizer import MemorizerPipeline, MemorizerUNet

    if storage.is_remote(out):
        # No rename on an object store: saved whole here, then uploaded with model_index.json (the
        # marker from_pretrained and check_output_dir look for) last.
        with tempfile.TemporaryDirectory(prefix="spellshield-memorizer-") as local:
            save_memorizer(latents, os.path.join(local, "model"), encoder, rejects)
            storage.put_tree(os.path.join(local, "model"), out, last=MODEL_MARKER)
        return out
    scheduler = make_scheduler()
    unet = MemorizerUNet.from_latents(latents.float(), scheduler.alphas_cumprod, encoder=encoder)
    vae = None if encoder == "pixels" else load_autoencoder(encoder)
    pipe = MemorizerPipeline(unet=unet, scheduler=scheduler, vae=vae)
    partial = os.path.abspath(out) + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial)
    write_parquet_atomic(pa.Table.from_pylist(rejects or [], schema=REJECTS_SCHEMA), os.path.join(partial, REJECTS))
    if os.path.isdir(out):
        os.rmdir(out)  # check_output_dir allowed only an empty directory
    os.replace(partial, out)
    return out


def collect_latents(corpus: str, options: EncodeOptions) -> tuple[torch.Tensor, list[dict]]:
    """Latents (N, C, H, W) of every decodable corpus image, and a row per rejected sample."""
    shards = expand_shards(corpus)
    shape = encoder_latent_spec(options).shape
    chunks, rejects = [], []
    for row in encode_chunks(list(enumerate(shards)), options):
        rejects += [{"key": str(k), "shard": row["shard"], "reason": str(r)} for k, r in zip(row["keys"], row["reasons"]) if r != OK]
        latents = chunk_latents(row, options.dtype)
        if len(latents):
            chunks.append(latents.astype(np.float32))
    if not chunks:
        raise CorpusError(f"corpus {corpus} has no indexable image ({len(rejects)} rejected)")
    latents = torch.from_numpy(np.concatenate(chunks)).reshape(-1, *shape)
    return latents, rejects


def build_memorizer(corpus: str, out: str, options: EncodeOptions) -> str:
    check_output_dir(out, MODEL_MARKER, "model")
    latents, rejects = collect_latents(corpus, options)
    save_memorizer(latents, out, options.encoder, rejects)
    progress(f"memorizer: {len(latents)} latents of shape {tuple(latents.shape[1:])} ({len(rejects)} rejected) -> {out}")
    return out


def check_inputs(corpus: str, out: str, options: EncodeOptions) -> None:
    """Bad input fails here, before Ray starts: no corpus, a finished --out, an encoder that cannot load."""
    expand_shards(corpus)
    check_output_dir(out, MODEL_MARKER, "model")
    encoder_latent_spec(options)


def run(args) -> int:
    options = encode_options(args)
    check_inputs(args.corpus, args.out, options)
    with ray_cluster(args.address):
        build_memorizer(args.corpus, args.out, options)
    return 0


def main(argv=None) -> int:
    from spellshield.jobs.cli import run_single

    return run_single("memorizer", argv)


if __name__ == "__main__":
    raise SystemExit(main())
