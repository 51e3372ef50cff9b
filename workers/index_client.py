"""Index-shard actors behind the shield interface, for an index larger than one machine's memory.

    shield = start_index_servers(index_dir, parts=4, backend="exact", device="cuda",
                                 actor_options=[{"resources": {"node-a": 1}}, ...])
    shield.range_search(queries, radius)      # fanned out to every actor at once, merged exactly
    IndexSource(shield, radius)               # a generation worker uses it like any shield

``RemoteShardedShield`` is the in-process ``ShardedShield`` with its parts replaced by
``IndexShardServer`` actors: the queries go to the object store once, every actor answers in
float64, and the merge is the same code. It pickles (actor handles and the manifest), so the
driver can start the servers once and hand the shield to every generation worker. Fail closed:
if an actor has died, a search raises instead of answering without that part.
"""

from __future__ import annotations

import ray
import torch

from spellshield.indexing.manifest import IndexFormatError, Manifest, read_manifest
from spellshield.indexing.sharded import ShardedShield, shard_groups
from spellshield.workers.index_server import IndexShardServer


class RemoteShardedShield(ShardedShield):
    backend = "sharded-ray"

    def _map(self, method: str, *args) -> list:
        args = [ray.put(a.cpu().numpy()) if torch.is_tensor(a) else a for a in args]
        return ray.get([getattr(actor, method).remote(*args) for actor in self.parts])

    def _map_one(self, part: int, method: str, *args):
        return ray.get(getattr(self.parts[part], method).remote(*args))

    def server_info(self) -> list[dict]:
        """Each server's shards, node and process (without the manifest)."""
        return [{k: v for k, v in info.items() if k != "manifest"} for info in ray.get([a.info.remote() for a in self.parts])]

    def part_stats(self) -> list[dict]:
        return ray.get([actor.stats.remote() for actor in self.parts])

    def close(self) -> None:
        """Stop the shard actors (the shield cannot search afterwards)."""
        for actor in self.parts:
            ray.kill(actor)


def start_index_servers(index_dir: str, parts: int | None = None, backend: str = "exact", device: str = "cpu",
                        actor_options: dict | list[dict] | None = None, **options) -> RemoteShardedShield:
    """One ``IndexShardServer`` actor per group of shards (``parts`` groups; default one per shard).

    ``actor_options`` (one dict for all, or one per part) places the actors: Ray resources,
    ``num_gpus``, a scheduling strategy. By default each takes a quarter of a CPU (a whole one
    each starves Ray on small machines) and one GPU when ``device`` is a GPU. Returns once every
    server has loaded its shards.
    """
    manifest: Manifest = read_manifest(index_dir)
    groups = shard_groups(len(manifest.shards), parts)
    if actor_options is None or isinstance(actor_options, dict):
        default = {"num_cpus": 0.25, **({"num_gpus": 1} if str(device).startswith("cuda") else {})}
        actor_options = [dict(actor_options or default)] * len(groups)
    if len(actor_options) != len(groups):
        raise ValueError(f"{len(actor_options)} actor option sets for {len(groups)} parts")
    server = ray.remote(IndexShardServer)
    actors = [server.options(**opts).remote(index_dir, group, backend, device, **options)
              for opts, group in zip(actor_options, groups)]
    infos = ray.get([actor.info.remote() for actor in actors])
    for info, group in zip(infos, groups):
        expected = sum(manifest.shards[n].count for n in group)
        if info["count"] != expected:
            # Fail closed: a part that does not hold what the manifest says would shield silently less.
            for actor in actors:
                ray.kill(actor)
            raise IndexFormatError(f"{index_dir}: index server for shards {list(group)} holds {info['count']} "
                                   f"vectors, the manifest says {expected}")
    return RemoteShardedShield(index_dir, manifest, actors, groups, "cpu")


__all__ = ["RemoteShardedShield", "start_index_servers"]
