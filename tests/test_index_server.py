"""Index-shard servers: the plain class, and real Ray actors behind the shield interface on the
local cluster, against brute force; the shield travels to a Ray task like to a generation worker."""

import pickle

import numpy as np
import pytest
import torch

from spellshield.indexing.search import open_index
from spellshield.pipeline.sources import IndexSource
from tests.index_helpers import brute_force, write_index
from spellshield.workers.index_server import IndexShardServer


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    rng = np.random.default_rng(11)
    base = (rng.standard_normal((900, 16)) / (1 + np.arange(16)) ** 0.5).astype(np.float32)
    path = write_index(tmp_path_factory.mktemp("served") / "index", base, 200)  # 5 shards
    queries = np.concatenate([base[:6] + 0.05, rng.standard_normal((4, 16)).astype(np.float32)]).astype(np.float32)
    return path, base, queries


def test_plain_server_answers_for_its_shards(index):
    path, base, queries = index
    server = IndexShardServer(path, [1, 3], backend="faiss")
    d = brute_force(base, queries)
    radius = float(np.quantile(d, 0.05))
    own = np.r_[200:400, 600:800]
    for i, (ids, dist) in enumerate(server.range_search64(queries, np.full(len(queries), radius), None)):
        assert dist.dtype == np.float64
        assert sorted(ids.tolist()) == own[d[i, own] < radius].tolist()
    assert server.keys([250, 799]) == ["k250", "k799"]
    np.testing.assert_array_equal(server.vectors([650]), base[[650]])
    assert server.info()["count"] == 400 and server.info()["manifest"]["count"] == 900


@pytest.mark.slow
def test_ray_shard_actors_search_like_one_shield(ray_session, index):
    from spellshield.workers.index_client import start_index_servers

    ray = ray_session
    path, base, queries = index
    node = ray.get_runtime_context().get_node_id()
    placement = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    shield = start_index_servers(path, parts=2, backend="projected", dims=4,
                                 actor_options=[{"num_cpus": 0.1, "scheduling_strategy": placement}] * 2)
    try:
        d = brute_force(base, queries)
        local = open_index(path)
        for quantile in (0.01, 0.1):
            radius = float(np.quantile(d, quantile))
            remote = shield.range_search(torch.from_numpy(queries), radius)
            for i, ((ids, dist), (l_ids, l_dist)) in enumerate(zip(remote, local.range_search(queries, radius))):
                assert sorted(ids.tolist()) == np.flatnonzero(d[i] < radius).tolist()
                assert ids.tolist() == l_ids.tolist() and dist.tolist() == l_dist.tolist()
        for (ids, _), (l_ids, _) in zip(shield.knn(queries, 9), local.knn(queries, 9)):
            assert ids.tolist() == l_ids.tolist()
        assert torch.equal(shield.vectors([899, 0, 450]), torch.from_numpy(base[[899, 0, 450]]))
        assert shield.keys([899, 0, 450]) == ["k899", "k0", "k450"]
        assert sum(s["candidates"] for s in shield.part_stats()) > 0

        # The shield pickles (actor handles + manifest): a generation worker can use it remotely.
        @ray.remote(num_cpus=0.1)
        def search_elsewhere(shield_bytes, q, radius):
            source = IndexSource(pickle.loads(shield_bytes), radius)
            return [n.ids.tolist() for n in source.find(torch.from_numpy(q))]

        radius = float(np.quantile(d, 0.02))
        far = ray.get(search_elsewhere.remote(pickle.dumps(shield), queries, radius))
        assert far == [[int(j) for j in ids] for ids, _ in local.range_search(queries, radius)]

        # Fail closed: with one part gone, a search raises instead of answering without it.
        ray.kill(shield.parts[1])
        with pytest.raises(ray.exceptions.RayActorError):
            shield.range_search(queries, radius)
    finally:
        shield.close()
