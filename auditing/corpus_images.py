"""The corpus image behind an index id, for the offenders' thumbnails."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq


def corpus_image(index_dir: str, shield, global_id: int) -> np.ndarray:
    """The corpus image behind an index id: from its source tar when reachable, else decoded
    from the stored latent (exact for the pixels encoder)."""
    from spellshield.indexing.corpus import Sample, decode_image, expand_shards, iter_shard
    from spellshield.indexing.encoders import Encoder

    manifest = shield.manifest
    key = shield.keys([global_id])[0]
    corpus = manifest.build.get("corpus")
    shard_name = _source_shard(index_dir, manifest, global_id)
    if corpus and shard_name:
        try:
            for path in expand_shards(corpus):
                if os.path.basename(path) == shard_name:
                    for item in iter_shard(path):
                        if isinstance(item, Sample) and item.key == key:
                            return decode_image(item.image, manifest.latent.resolution)
        except (ValueError, OSError):
            pass
    vector = shield.vectors([global_id]).reshape(1, *manifest.latent.shape)
    return Encoder(manifest.latent.encoder).decode(vector)[0]


def _source_shard(index_dir: str, manifest, global_id: int) -> str | None:
    from spellshield.indexing.index_cache import local_index_dir

    index_dir = local_index_dir(index_dir)  # an index on object storage: this node's (already filled) cache
    for shard in manifest.shards:
        if shard.first_id <= global_id <= shard.last_id:
            table = pq.read_table(os.path.join(index_dir, shard.ids_file), columns=["id", "shard"]).to_pandas()
            match = table.loc[table["id"] == global_id, "shard"]
            return str(match.iloc[0]) if len(match) else None
    return None
