"""The Ray Data runner that turns corpus shards into latents, in corpus order.

    shard paths -> read_shard_rows (flat_map, one task per tar)
                -> decode_batch     (map_batches, CPU tasks)
                -> BatchEncoder     (map_batches, actor pool; GPUs when the cluster has them)
                -> driver           (iter_batches, order preserved)

Order is preserved so that global ids, and therefore the index, are the same on every run.
Encoder actors ask for a fraction of a CPU: a whole one each deadlocks Ray Data on a 2-core
machine, where the read and decode tasks need the other core.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Iterator

import ray

from workers.encode import BatchEncoder, decode_batch, read_shard_rows


@dataclass(frozen=True)
class EncodeOptions:
    encoder: str = "pixels"
    resolution: int = 32
    batch_size: int = 256
    num_encoders: int = 1
    min_size: int = 8


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def encode_corpus(shards: list[str], options: EncodeOptions) -> Iterator[dict]:
    """Yield numpy batches with key, shard, sha256, reason, latent (B, D), in corpus order."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    # Ray Data's own progress bars where there is a terminal; otherwise its per-operator log
    # lines would bury the job's messages, so the jobs print their own progress lines.
    ctx.enable_progress_bars = sys.stderr.isatty()
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    gpus = cluster_gpus()
    items = [{"path": path, "shard_index": i} for i, path in enumerate(shards)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.flat_map(read_shard_rows, num_cpus=0.5)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"resolution": options.resolution, "min_size": options.min_size},
        batch_size=options.batch_size,
        batch_format="numpy",
        num_cpus=0.5,
    )
    workers = max(1, min(options.num_encoders, gpus) if gpus else options.num_encoders)
    ds = ds.map_batches(
        BatchEncoder,
        fn_constructor_kwargs={"encoder_spec": options.encoder, "device": "cuda" if gpus else "cpu"},
        compute=ray.data.ActorPoolStrategy(size=workers),
        batch_size=options.batch_size,
        batch_format="numpy",
        num_gpus=1 if gpus else 0,
        num_cpus=0.25 if gpus else 0.5,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)
