"""Many nodes on one machine: a head and a second node (each with its own custom resource),
the three jobs submitted with ``ray job submit --working-dir .``, generation units spread over
both nodes, and a node lost in the middle of a generation job. This is also the test of the
``ray job submit`` path against a head started with ``ray start --head`` on 127.0.0.1."""

import glob
import json
import os

import pandas as pd
import pytest

from tests.cluster import RayHead, descendants, processes_with
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def samples_of(run_dir):
    return pd.read_parquet(os.path.join(run_dir, "audit", "samples"))


def test_two_node_cluster(digits_corpus, memorizer_model, tmp_path):
    index, run_a, run_b = str(tmp_path / "index"), str(tmp_path / "run-a"), str(tmp_path / "run-b")
    with RayHead(num_cpus=2, resources='{"head_node": 1}') as head:
        node_b = head.add_node(num_cpus=2, resources='{"node_b": 1}')
        built = head.submit(["python", "-m", "spellshield.jobs.build_index", "--corpus", ",".join(digits_corpus[:4]), "--out", index,
                             "--resolution", "8"], cwd=ROOT)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]

        generate = ["python", "-m", "spellshield.jobs.generate", "--model", memorizer_model, "--index", index, "--num-images", "32",
                    "--unit-size", "4", "--batch-size", "4", "--steps", "60", "--workers", "2", "--max-unit-attempts", "5"]
        done = head.submit(generate + ["--out", run_a], cwd=ROOT)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        run = json.load(open(os.path.join(run_a, "run.json")))
        nodes = {u["node"] for u in run["progress"]["units"].values()}
        assert len(nodes) == 2, nodes  # units ran on both nodes

        # The shield served by an index-shard actor on the head, the generation workers on node b.
        run_c = str(tmp_path / "run-c")
        placed = head.submit(["python", "-m", "spellshield.jobs.generate", "--model", memorizer_model, "--index", index, "--out", run_c,
                              "--num-images", "8", "--unit-size", "4", "--batch-size", "4", "--steps", "30",
                              "--workers", "1", "--worker-resources", '{"node_b": 0.01}',
                              "--index-servers", "1", "--index-resources", '{"head_node": 0.01}'], cwd=ROOT)
        assert placed.returncode == 0, placed.stdout[-3000:] + placed.stderr[-3000:]
        run = json.load(open(os.path.join(run_c, "run.json")))
        server_nodes = {s["node"] for s in run["progress"]["index_servers"]}
        worker_nodes = {u["node"] for u in run["progress"]["units"].values()}
        assert len(server_nodes) == 1 and len(worker_nodes) == 1 and server_nodes != worker_nodes

        audited = head.submit(["python", "-m", "spellshield.jobs.audit", run_a, "--index", index], cwd=ROOT)
        assert audited.returncode == 0, audited.stdout[-3000:] + audited.stderr[-3000:]
        assert json.load(open(os.path.join(run_a, "audit", "summary.json")))["num_samples"] == 32

        # Lose node b while it is generating: the job still finishes, every sample once.
        job = head.submit_async(generate + ["--out", run_b], cwd=ROOT)
        deadline_units = lambda: len(glob.glob(os.path.join(run_b, "audit", "samples", "*.parquet")))  # noqa: E731
        import time

        t0 = time.time()
        while time.time() - t0 < 180:
            on_b = processes_with(b"ray::GenerationWorker", among=descendants(node_b.pid))
            if on_b and deadline_units() >= 1:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("node b never ran a generation worker")
        head.kill_node(node_b)
        status = head.wait_job(job)
        assert status == "SUCCEEDED", head.job_logs(job)[-3000:]
    samples = samples_of(run_b)
    written = samples[samples["image"].notna()]  # one row per attempt; each sample written once
    assert len(written) == 32 and written["sample"].is_unique and set(samples["sample"]) == set(written["sample"])
    run = json.load(open(os.path.join(run_b, "run.json")))
    assert run["status"] == "finished" and run["progress"]["actors_replaced"] >= 1
    assert len(glob.glob(os.path.join(run_b, "images", "*.tar"))) == 8
