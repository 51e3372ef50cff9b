"""The Ray Data runner that turns corpus tars into encoded chunks, streaming, in corpus order.

    (part, tar path) items -> read_chunks   (flat_map, CPU tasks: read, decode, resize)
                           -> ChunkEncoder  (map, actor pool: one actor per GPU when the
                                             cluster has GPUs, else CPU actors)
                           -> driver        (iter_rows, order preserved)

Ray Data's streaming executor keeps a bounded number of chunks in flight between the stages
(backpressure on the object store), so host memory depends on the chunk size and the number
of workers, not on the corpus size. Order is preserved so that the driver can append each
tar's chunks to its part file as they come.

Encoder actors ask for a fraction of a CPU: a whole one each deadlocks Ray Data on a 2-core
machine, where the read tasks need the other core. The two stages ask for different CPU
fractions (0.5 and 0.25) on purpose: with equal resources Ray Data fuses them into one actor,
which would then read, decode and encode in turn instead of overlapping reading with encoding.
"""

from __future__ import annotations

import logging
import sys
from typing import Iterator

import ray

from spellshield.pipeline.config import EncodeConfig
from spellshield.workers.encode import ChunkEncoder, read_chunks


# The encoding options are declared once, with their defaults and checks, in pipeline.config.
# ``EncodeOptions`` is its former name here, kept while the callers on other branches move over.
EncodeOptions = EncodeConfig


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def encoder_pool(options: EncodeConfig, gpus: int) -> dict:
    """Actor-pool arguments for the encoder stage on a cluster with ``gpus`` GPUs."""
    if gpus:
        size = min(options.num_encoders, gpus) if options.num_encoders else gpus
        return {"concurrency": max(1, size), "num_gpus": 1, "num_cpus": 0.25, "device": "cuda"}
    return {"concurrency": max(1, options.num_encoders or 1), "num_gpus": 0, "num_cpus": 0.25, "device": "cpu"}


def encode_chunks(tars: list[tuple[int, str]], options: EncodeConfig) -> Iterator[dict]:
    """Encoded chunk rows (see ``workers.encode``) of the (part number, tar path) pairs, in order."""
    if not tars:
        return
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    # Ray Data's own progress bars where there is a terminal; otherwise its per-operator log
    # lines would bury the job's messages, so the jobs print their own progress lines.
    ctx.enable_progress_bars = sys.stderr.isatty()
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    pool = encoder_pool(options, cluster_gpus())
    items = [{"part": part, "path": path} for part, path in tars]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(
        read_chunks,
        fn_kwargs={"resolution": options.resolution, "chunk_size": options.batch_size, "min_size": options.min_size,
                   "max_member_bytes": options.max_member_bytes},
        num_cpus=0.5,
    )
    ds = ds.map(
        ChunkEncoder,
        fn_constructor_kwargs={"encoder_spec": options.encoder, "device": pool["device"], "dtype": options.dtype},
        concurrency=pool["concurrency"],
        num_gpus=pool["num_gpus"],
        num_cpus=pool["num_cpus"],
    )
    yield from ds.iter_rows()
